"""Adaptive polling: the supervisor's polling window (vblk.supervisor.loop.adapt_poll_window),
the waiting window and what polling looks at."""
import time
from types import SimpleNamespace

from vblk.backing.memory import MemoryBacking, drop_store
from vblk.ipc import Op
from vblk.supervisor import pool, serve
from vblk.supervisor.inprocess import InProcessEngine
from vblk.supervisor.loop import POLL_MIN, EventLoop, adapt_poll_window

MAX = 50e-6


def test_short_sleeps_open_the_window_up_to_the_maximum():
    w = 0.0
    seen = []
    for _ in range(10):
        w = adapt_poll_window(w, 10e-6, MAX)
        seen.append(w)
    assert seen[0] == POLL_MIN
    assert seen == sorted(seen) and seen[-1] == MAX


def test_long_sleeps_close_it():
    w = MAX
    for _ in range(6):
        w = adapt_poll_window(w, 300e-6, MAX)
    assert w == 0.0


def test_a_closed_window_stays_closed_while_the_guest_is_slow():
    assert adapt_poll_window(0.0, 1e-3, MAX) == 0.0


def test_the_waiting_window_holds_only_while_requests_are_awaited():
    loop = EventLoop(on_error=lambda: None)
    try:
        loop.poll_window, loop.wait_window = 10e-6, 300e-6
        awaited = [True]
        loop.awaiting = lambda: awaited[0]
        assert loop._window() == 300e-6
        awaited[0] = False                      # the completion came: back to the short one
        assert loop._window() == 10e-6
        loop.wait_window = 4e-6                 # a closing waiting window never shortens
        awaited[0] = True
        assert loop._window() == 10e-6
    finally:
        loop.close()


def test_a_waiting_poll_that_finds_the_cpu_wanted_closes_its_window():
    """Time away from the CPU during a waiting poll (here a sleep inside it, as a preemption
    would be) closes the waiting window; the short window is left as it was. (The window is
    20 ms, not the real 400 µs, so that even on a loaded machine the poll runs before its
    deadline passes.)"""
    loop = EventLoop(on_error=lambda: None)
    try:
        loop.poll_window, loop.wait_window = 10e-6, 20e-3
        loop.awaiting = lambda: True
        looks = []

        def poll() -> bool:
            looks.append(1)
            time.sleep(1e-3)
            return False

        loop._poll(poll)
        assert looks and loop.wait_window == 0.0 and loop.poll_window == 10e-6
    finally:
        loop.close()


def test_requests_at_an_in_process_engine_are_awaited_too(monkeypatch):
    """RBD's requests run in the supervisor's own engine: the loop's ``awaiting`` counts them
    with the workers' (here: no pool, one in-process engine over a memory backing)."""

    monkeypatch.setattr(pool, "AWAIT_AT_MOST", 1)
    backing = MemoryBacking.open("awaiting-test", size=1 << 20)
    try:
        engine = InProcessEngine(backing)
        awaiting = serve._awaiting(None, [SimpleNamespace(engine=engine)])
        assert not awaiting()
        engine.post(0, int(Op.FLUSH), 0, 0, 0, [], 0)
        engine.flush()
        assert awaiting()                        # one request at the engine
        engine.post(1, int(Op.FLUSH), 0, 0, 0, [], 0)
        engine.flush()
        assert not awaiting()                    # more than AWAIT_AT_MOST
        assert sorted(slot for slot, _, _ in engine.reap()) == [0, 1]
        assert not awaiting()
        assert serve._awaiting(None, [])() is False
    finally:
        backing.close()
        drop_store("awaiting-test")


def test_polling_looks_only_at_disks_that_drained_since_the_loop_slept():
    """serve's poll goes over ``loop.hot`` only (a connected disk whose driver is idle costs it
    nothing), and a polling run that ends -- the loop is about to sleep -- clears the list and
    each data path's flag, so the next drain puts its disk back."""

    class Data:
        def __init__(self) -> None:
            self.rings, self.hot, self.looks = {0: object()}, False, 0

        def poll(self) -> bool:
            self.looks += 1
            return False

    dloop = SimpleNamespace(call=lambda f: f())
    busy, idle = Data(), Data()
    kicks = []
    queues = SimpleNamespace(hold_kicks=lambda: kicks.append("held"),
                             release_kicks=lambda: kicks.append("released"))
    loop = EventLoop(on_error=lambda: None)
    try:
        busy.hot = True
        loop.hot.append((dloop, busy, queues))  # what busy's first drain did
        assert serve._poll(loop) is False
        assert (busy.looks, idle.looks) == (1, 0)
        loop.poll_window = 1e-6
        loop._poll(lambda: False)               # nothing turned up: the loop will sleep
        assert loop.hot == [] and busy.hot is False
        assert kicks == ["held", "released"]    # kicks wanted again before the sleep
    finally:
        loop.close()


def test_the_loop_does_not_poll_while_the_write_rings_are_crowded():
    """Polling gives way: with more than AWAIT_AT_MOST writes on the rings the loop sleeps
    after activity instead of polling (the kernel's threads need the CPU)."""
    import os
    seen = {}
    for crowded in (False, True):
        loop = EventLoop(on_error=lambda: None)
        fd = os.eventfd(1)
        polls, ticks = [], []
        try:
            loop.poll_window = 20e-3
            loop.crowded = lambda c=crowded: c
            loop.watch(fd, lambda fd=fd: os.eventfd_read(fd), "rings")

            def tick(ticks=ticks, loop=loop) -> None:
                ticks.append(1)
                if len(ticks) >= 3:
                    loop.stopping = True

            loop.run(timeout=lambda: 0.001, tick=tick, poll=lambda p=polls: p.append(1) or False)
            seen[crowded] = len(polls)
        finally:
            loop.close()
            os.close(fd)
    assert seen[False] > 0 and seen[True] == 0


def test_crowded_counts_the_writes_on_every_buffered_disks_ring(monkeypatch):
    from vblk.supervisor.disks import SlotShare
    monkeypatch.setattr(serve, "AWAIT_AT_MOST", 1)
    pool_ = SimpleNamespace(completion_fd=-1)
    rings = [SimpleNamespace(writes=0, direct=False), SimpleNamespace(writes=0, direct=False)]
    direct = SimpleNamespace(writes=0, direct=True)       # O_DIRECT: no kernel thread
    disks = [SimpleNamespace(engine=SlotShare(pool_, n, 4 * n, 4, ring)) for n, ring in
             enumerate(rings)]
    disks.append(SimpleNamespace(engine=SlotShare(pool_, 2, 8, 4)))     # no ring
    disks.append(SimpleNamespace(engine=SlotShare(pool_, 3, 12, 4, direct)))
    crowded = serve._crowded(disks)
    assert not crowded()
    direct.writes = 3
    assert not crowded()
    rings[0].writes = 1
    assert not crowded()                        # one write: awaited, not crowded
    rings[1].writes = 1
    assert crowded()
    alone = serve._crowded(disks[:1])
    assert not alone()
    rings[0].writes = 2
    assert alone()
    assert serve._crowded([])() is False
