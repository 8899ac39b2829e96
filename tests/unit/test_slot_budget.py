"""Multiqueue fairness: how many slots one ring may take (vblk.slots.slot_budget)."""
from hypothesis import given
from hypothesis import strategies as st

from vblk.supervisor.datapath import slot_budget


def test_a_lone_ring_takes_every_free_slot():
    assert slot_budget(free=64, total=64, held=0, rings=1, others_waiting=False) == 64
    assert slot_budget(free=10, total=64, held=54, rings=1, others_waiting=True) == 10


def test_with_no_one_else_waiting_a_ring_of_several_takes_them_all():
    assert slot_budget(free=64, total=64, held=0, rings=4, others_waiting=False) == 64


def test_while_others_wait_a_ring_stops_at_its_share():
    assert slot_budget(free=64, total=64, held=0, rings=4, others_waiting=True) == 16
    assert slot_budget(free=30, total=64, held=10, rings=4, others_waiting=True) == 6
    assert slot_budget(free=30, total=64, held=40, rings=4, others_waiting=True) == 0


def test_every_ring_gets_at_least_one_slot_when_rings_outnumber_slots():
    assert slot_budget(free=4, total=4, held=0, rings=8, others_waiting=True) == 1


@given(st.integers(1, 64), st.integers(1, 64), st.data())
def test_simulated_rings_share_slots_fairly(total, rings, data):
    """Rings that always have work, served in turns as slots free up, never starve one
    another: each ends up holding an equal share to within one slot."""
    held = [0] * rings
    free = total
    for step in range(4 * total):
        done = data.draw(st.integers(0, rings - 1))      # a completion on some ring
        if held[done]:
            held[done] -= 1
            free += 1
        for k in range(rings):
            q = (step + k) % rings
            take = slot_budget(free, total, held[q], rings, others_waiting=True)
            assert 0 <= take <= free
            held[q] += take
            free -= take
    assert sum(held) + free == total
    share = max(1, total // rings)
    assert all(h <= max(share, 1) for h in held)


def test_freed_slots_reach_the_waiting_ring_whichever_ring_goes_first():
    """Ring 0 held all 16 slots; 8 come back while both rings have work. Whichever ring is
    drained first, ring 1 gets its share in this round (without the budget, ring 0 drained
    first would take all 8 back)."""
    for order in ((0, 1), (1, 0)):
        held, free = [8, 0], 8            # ring 0's 8 completions returned their slots
        for q in order:
            take = slot_budget(free, 16, held[q], 2, others_waiting=True)
            held[q] += take
            free -= take
        assert held == [8, 8], order
