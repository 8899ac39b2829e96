"""The free ranges of the shared slot area (vblk.supervisor.slotranges)."""
from __future__ import annotations

import random

import pytest

from vblk.supervisor.slotranges import SlotRanges


def test_disks_take_contiguous_ranges_one_after_another():
    r = SlotRanges(256)
    assert [r.take(64), r.take(64), r.take(32)] == [0, 64, 128]
    assert r.free == [(160, 96)] and r.free_slots == 96 and r.largest == 96


def test_a_removed_disks_range_is_what_the_next_disk_of_its_size_gets():
    r = SlotRanges(1024)
    a, b, c = r.take(64), r.take(128), r.take(64)
    r.give_back(b, 128)
    assert r.take(128) == b                    # the hole, not the larger free tail
    r.give_back(a, 64)
    assert r.take(32) == a                     # best fit: the 64-slot hole, not the big tail
    assert r.take(32) == a + 32
    assert c == 192


def test_ranges_given_back_merge_with_their_neighbours():
    r = SlotRanges(300)
    bases = [r.take(100) for _ in range(3)]
    r.give_back(bases[0], 100)
    r.give_back(bases[2], 100)
    assert r.free == [(0, 100), (200, 100)]
    r.give_back(bases[1], 100)
    assert r.free == [(0, 300)]
    assert r.take(300) == 0


def test_an_add_that_does_not_fit_is_refused_and_takes_nothing():
    r = SlotRanges(128)
    r.take(64)
    b = r.take(32)
    r.take(32)
    r.give_back(b, 32)
    assert r.free_slots == 32 and not r.fits(64)
    with pytest.raises(ValueError, match="largest free range: 32 of 32 free"):
        r.take(64)
    assert r.free == [(64, 32)]
    assert not r.fits(0) and SlotRanges(0).largest == 0 and not SlotRanges(0).fits(1)


@pytest.mark.parametrize("base,count", [(0, 64), (32, 64), (-1, 2), (120, 16), (10, 0)])
def test_a_range_cannot_be_given_back_twice_or_from_outside(base, count):
    r = SlotRanges(128)
    r.take(32)
    with pytest.raises(ValueError):
        r.give_back(base, count)
    assert r.free == [(32, 96)]


def test_random_adds_and_removes_never_hand_out_a_slot_twice():
    rng = random.Random(7)
    r = SlotRanges(4096)
    held: dict[int, int] = {}
    for _ in range(3000):
        if held and rng.random() < 0.45:
            base = rng.choice(list(held))
            r.give_back(base, held.pop(base))
        else:
            count = rng.choice([1, 16, 64, 256, 512])
            if r.fits(count):
                held[r.take(count)] = count
        used = sorted((b, b + n) for b, n in held.items())
        assert all(e1 <= b2 for (_, e1), (b2, _) in zip(used, used[1:]))
        assert r.free_slots + sum(held.values()) == 4096
        assert all(b1 + n1 < b2 for (b1, n1), (b2, _) in zip(r.free, r.free[1:]))  # merged
    for base, count in held.items():
        r.give_back(base, count)
    assert r.free == [(0, 4096)]
