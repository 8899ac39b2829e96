"""The data path in-process (vblk.testing.inprocess): kick -> drain -> slot -> in-process
engine over a memory backing -> completion -> used ring. No socket, no worker process."""
from __future__ import annotations

import os
import time

from vblk.backing.memory import MemoryBacking, drop_store, memory_store
from vblk.device import DiscardLimits
from vblk.memory import GuestMemory
from vblk.ratelimit import Limits
from vblk.supervisor.datapath import DRAIN_QUANTUM
from vblk.testing.inprocess import STATUS_UNSET, InProcessDisk
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.blk import DISCARD_SEGMENT, OUTHDR
from vblk.virtio.constants import BLK_ID_BYTES, BlkStatus, BlkType

MiB = 1 << 20


def store_bytes(disk: InProcessDisk, offset: int, n: int) -> bytes:
    return bytes(disk.backing.store.data[offset:offset + n])


def test_writes_and_reads_go_through_slots_and_come_back_on_the_used_ring():
    with InProcessDisk() as disk:
        data = os.urandom(8192)
        w = disk.write(16, data)
        assert (w.status, w.used_len) == (BlkStatus.OK, 1)
        assert store_bytes(disk, 16 * 512, 8192) == data
        r = disk.read(16, 8192)
        assert (r.status, r.used_len, r.data) == (BlkStatus.OK, 8193, data)
        assert len(disk.data.free) == disk.slots and not disk.data.inflight
        snap = disk.stats.snapshot()
        assert snap["queues"][0]["types"]["write"]["requests"] == 1
        assert snap["queues"][0]["types"]["read"]["requests"] == 1


def test_more_requests_than_slots_all_complete_in_turn():
    with InProcessDisk(slots=4, queue_size=64) as disk:
        blocks = {i: os.urandom(4096) for i in range(40)}
        tags = [disk.submit(BlkType.OUT, i * 8, data=b) for i, b in blocks.items()]
        assert all(a.status == BlkStatus.OK for a in disk.run(*tags))
        tags = [disk.submit(BlkType.IN, i * 8, nbytes=4096) for i in blocks]
        answers = disk.run(*tags)
        assert [a.data for a in answers] == list(blocks.values())
        assert len(disk.data.free) == 4


def test_write_through_flushes_before_each_write_completes_and_write_back_does_not():
    with InProcessDisk() as disk:
        disk.write(0, b"a" * 4096)
        disk.write(8, b"b" * 4096)
        assert disk.backing.store.flushes == 2
    with InProcessDisk(writeback=True) as disk:
        disk.write(0, b"a" * 4096)
        disk.write(8, b"b" * 4096)
        assert disk.backing.store.flushes == 0
        assert disk.run(disk.submit(BlkType.FLUSH))[0].status == BlkStatus.OK
        assert disk.backing.store.flushes == 1


def test_requests_past_the_end_fail_without_touching_the_store():
    with InProcessDisk(size=MiB) as disk:
        before = store_bytes(disk, 0, MiB)
        a = disk.write(MiB // 512 - 4, b"x" * 4096)
        assert a.status == BlkStatus.IOERR
        assert disk.read(MiB // 512, 512).status == BlkStatus.IOERR
        assert store_bytes(disk, 0, MiB) == before


def test_get_id_completes_without_the_engine():
    with InProcessDisk() as disk:
        a = disk.run(disk.submit(BlkType.GET_ID, nbytes=BLK_ID_BYTES))[0]
        assert a.status == BlkStatus.OK and a.data == disk.backing.info.serial


def test_discard_and_write_zeroes_reach_the_store():
    with InProcessDisk(discard=DiscardLimits(2048, 2, 0)) as disk:
        disk.write(0, os.urandom(64 * 1024))
        seg = DISCARD_SEGMENT.pack(8, 16, 0) + DISCARD_SEGMENT.pack(64, 8, 0)
        assert disk.run(disk.submit(BlkType.DISCARD, data=seg))[0].status == BlkStatus.OK
        zero = DISCARD_SEGMENT.pack(100, 4, 0)
        assert disk.run(disk.submit(BlkType.WRITE_ZEROES, data=zero))[0].status == BlkStatus.OK
        assert store_bytes(disk, 8 * 512, 16 * 512) == bytes(16 * 512)
        assert store_bytes(disk, 64 * 512, 8 * 512) == bytes(8 * 512)
        assert store_bytes(disk, 100 * 512, 4 * 512) == bytes(4 * 512)
        assert store_bytes(disk, 0, 512) != bytes(512)


def test_a_failing_store_gives_ioerr_and_frees_the_slot(monkeypatch):
    with InProcessDisk() as disk:
        def broken(offset, bufs):
            raise OSError(5, "medium error")
        monkeypatch.setattr(disk.backing, "_readv", broken)
        assert disk.read(0, 4096).status == BlkStatus.IOERR
        assert len(disk.data.free) == disk.slots
        monkeypatch.undo()
        assert disk.read(0, 4096).status == BlkStatus.OK


def test_a_flooding_queue_leaves_slots_for_the_other():
    with InProcessDisk(queues=2, slots=8, queue_size=64) as disk:
        alone = [disk.submit(BlkType.IN, i, nbytes=4096, queue=0) for i in range(16)]
        disk.kick(0)
        assert disk.data.held[0] == 8        # alone, a queue may take every slot
        disk.serve()
        flood = [disk.submit(BlkType.IN, i, nbytes=4096, queue=0) for i in range(48)]
        other = disk.submit(BlkType.IN, 0, nbytes=512, queue=1)
        disk.kick(0)
        assert disk.data.held[0] == 4        # while queue 1 waits: its share, no more
        disk.kick(1)
        assert disk.data.held[1] == 1
        disk.serve()
        answers = [disk.answers.pop(t) for t in alone + flood + [other]]
        assert all(a.status == BlkStatus.OK for a in answers)


def test_a_rate_limit_leaves_requests_on_the_ring_until_tokens_are_due():
    with InProcessDisk(limits=Limits(iops=50, iops_burst=5)) as disk:
        tags = [disk.submit(BlkType.IN, i, nbytes=512) for i in range(12)]
        disk.kick()
        assert 0 in disk.data.throttled and disk.data.timeout() > 0
        disk.serve()
        assert len(disk.answers) == 5 or len(disk.answers) == 6
        deadline = time.monotonic() + 5
        while len(disk.answers) < 12:
            assert time.monotonic() < deadline
            time.sleep(max(0.0, disk.data.timeout()))
            disk.data.tick()
            disk.serve()
        assert all(disk.answers.pop(t).status == BlkStatus.OK for t in tags)
        assert not disk.data.throttled


def test_a_ring_whose_avail_index_runs_ahead_is_reported_broken():
    with InProcessDisk(queue_size=64) as disk:
        disk.drivers[0].set_avail_idx(1000)
        disk.kick()
        assert disk.broken == [0] and 0 in disk.data.broken


def test_inline_reads_are_served_from_the_backings_cache():
    name = "inline-cache"
    memory_store(name, 4 * MiB).data[4096:8192] = b"c" * 4096
    try:
        backing = MemoryBacking.open(name, caches=True)
        with InProcessDisk(backing=backing, inline_reads=True) as disk:
            tag = disk.submit(BlkType.IN, 8, nbytes=4096)
            disk.kick()
            assert not disk.data.inflight           # done in the drain, no slot taken
            disk.serve()
            assert disk.answers.pop(tag).data == b"c" * 4096
            assert disk.stats.snapshot()["queues"][0]["types"]["read"]["requests"] == 1
    finally:
        drop_store(name)


def test_a_slot_for_a_memory_table_the_engine_does_not_have_fails_cleanly():
    with InProcessDisk() as disk:
        disk.write(0, b"m" * 4096)
        current = disk.engine.memory
        disk.engine.memory = GuestMemory.empty()        # the engine is a table behind
        try:
            assert disk.read(0, 4096).status == BlkStatus.IOERR
        finally:
            disk.engine.memory = current
        assert disk.read(0, 4096).data == b"m" * 4096


def test_a_status_goes_to_its_guest_address_in_a_table_that_changed_in_flight():
    """The status byte is written where admission found it, unless the memory table changed
    meanwhile (a ring stop that timed out): then at its guest address in the new table."""
    with InProcessDisk() as disk:
        (whole,) = disk.ram.regions
        assert whole.guest_phys_addr == 0 and whole.mmap_offset == 0
        cut = [MemRegion(0, MiB, whole.userspace_addr, 0),            # region 0 ends at 1 MiB
               MemRegion(MiB, whole.memory_size - MiB, whole.userspace_addr + MiB, MiB)]
        tag = disk.submit(BlkType.OUT, 0, data=b"s" * 4096)     # its header is past 1 MiB
        disk.kick()                       # taken, run and finished by the engine; not reaped
        new = GuestMemory.from_fds(cut, [disk.ram.fd, disk.ram.fd], disk.memory.generation + 1)
        old, disk.data.memory = disk.data.memory, new
        try:
            disk.serve()                 # region 0 of the new table cannot hold that offset
        finally:
            disk.data.memory = old
            new.close()
        answer = disk.answers.pop(tag)
        assert (answer.status, answer.used_len) == (BlkStatus.OK, 1)
        assert store_bytes(disk, 0, 4096) == b"s" * 4096


def test_a_request_its_ring_stopped_without_finishes_with_no_status_and_frees_its_slot():
    """A stop that gave up waiting orphans the ring's requests: when one finishes, its slot
    is free again and nothing reaches the guest (a ring started again on that queue is
    another driver's)."""
    with InProcessDisk(slots=4, writeback=True) as disk:
        tag = disk.submit(BlkType.OUT, 0, data=b"o" * 4096)
        disk.kick()                               # taken and run; not reaped yet
        assert disk.data.orphan(0) == 1
        assert not disk.data.inflight and len(disk.data.free) == 3
        disk.data.on_completions()
        assert len(disk.data.free) == 4 and not disk.data.orphans
        assert disk.drivers[0].used_pending() == 0            # no used element
        tag_, head_hdr = next(iter(disk._pending.values()))[:2]
        assert tag_ == tag
        assert disk.ram.read(head_hdr + OUTHDR.size, 1) == bytes([STATUS_UNSET])
        assert disk.stats.snapshot()["queues"][0]["in_flight"] == 0
        assert disk.write(8, b"n" * 4096).status == BlkStatus.OK     # the queue goes on


def test_a_memory_table_replaced_with_requests_in_flight_is_unmapped_when_they_finish():
    """(Tables of the same guest RAM as the rings', so that the rings go on.)"""
    with InProcessDisk(writeback=True) as disk:
        def table() -> GuestMemory:
            t = GuestMemory.from_fds(disk.ram.regions, [disk.ram.fd],
                                     disk.data.memory.generation + 1)
            disk.engine.set_memory(t, [], [])
            return t
        first = disk.data.memory = table()
        second = table()
        disk.data.swap_memory(second)                  # nothing in flight: unmapped at once
        assert first.regions == [] and disk.data.memory is second
        tag = disk.submit(BlkType.OUT, 0, data=b"r" * 4096)
        disk.kick()
        third = table()
        disk.data.swap_memory(third)
        assert second.regions and disk.data.retired == [second]     # the write may use it
        disk.serve()
        assert disk.answers.pop(tag).status == BlkStatus.OK
        assert second.regions == [] and disk.data.retired == []
        third.close()


def test_a_driver_refilling_as_fast_as_reads_are_copied_gets_turns_not_the_loop():
    """Reads the cache holds free no slot, so only DRAIN_QUANTUM ends a drain whose driver puts
    a new request on the ring for each one copied; the rest waits in ``backlog`` and the
    other queue is served in between."""
    store = f"refill-{id(object())}"
    backing = MemoryBacking.open(store, size=8 * MiB, caches=True)
    try:
        with InProcessDisk(queues=2, queue_size=256, backing=backing, inline_reads=True) as disk:
            copied = []
            read_cached = backing.read_cached

            def refilling(offset, bufs):
                copied.append(offset)
                if len(copied) < 1000:          # the driver reaps and queues the next at once
                    disk._reap()
                    disk.submit(BlkType.IN, len(copied) % 64, nbytes=4096, queue=0)
                return read_cached(offset, bufs)

            backing.read_cached = refilling
            disk.submit(BlkType.IN, 0, nbytes=4096, queue=0)
            disk.kick(0)
            assert len(copied) == DRAIN_QUANTUM
            assert disk.data.backlog == {0} and disk.data.timeout() == 0
            other = disk.submit(BlkType.IN, 8, nbytes=512, queue=1)
            disk.kick(1)                      # the other queue's turn comes at once
            disk._reap()
            assert disk.answers.pop(other).status == BlkStatus.OK
            assert len(copied) == DRAIN_QUANTUM + 1
            while disk.data.backlog:          # the loop's ticks drain the rest, a quantum each
                before = len(copied)
                disk.data.tick()
                assert len(copied) - before <= DRAIN_QUANTUM
            disk._reap()
            assert len(copied) == 1000 + 1 and disk.data.timeout() == -1
            assert all(a.status == BlkStatus.OK for a in disk.answers.values())
    finally:
        drop_store(store)


def test_a_drain_ends_its_turn_when_the_loop_says_something_waits_and_only_then():
    """turns() gives the drain its peek at the loop: while it sees nothing waiting the drain
    serves every read the driver offers (work-conserving); once it sees something, the drain
    stops after the read in hand and the ring goes to ``backlog``."""
    store = f"turns-{id(object())}"
    backing = MemoryBacking.open(store, size=8 * MiB, caches=True)
    try:
        with InProcessDisk(queue_size=256, backing=backing, inline_reads=True) as disk:
            waiting = []
            disk.data.turns = lambda: (lambda: bool(waiting), 1, 0.0)
            tags = [disk.submit(BlkType.IN, i * 8, nbytes=4096) for i in range(100)]
            disk.kick(0)
            disk._reap()
            assert all(disk.answers.pop(t).status == BlkStatus.OK for t in tags)
            assert not disk.data.backlog                 # nobody waited: all 100 in one drain
            tags = [disk.submit(BlkType.IN, i * 8, nbytes=4096) for i in range(100)]
            waiting.append("a neighbour's kick")
            disk.kick(0)
            disk._reap()
            assert len(disk.answers) == 1 and disk.data.backlog == {0}
            waiting.clear()
            disk.data.tick()                             # the loop's next turn: the rest
            disk._reap()
            assert sorted(disk.answers) == tags and not disk.data.backlog
    finally:
        drop_store(store)


def test_a_turn_lasts_its_least_time_before_the_drain_looks_whether_anything_waits():
    """The third thing turns() gives: how long a turn lasts before the first peek. Within
    it a waiting neighbour does not end the turn (here it never runs out: the drain serves
    all 100 reads), and the peek is not even asked; once it is over, the next read ends it."""
    store = f"turns-least-{id(object())}"
    backing = MemoryBacking.open(store, size=8 * MiB, caches=True)
    try:
        with InProcessDisk(queue_size=256, backing=backing, inline_reads=True) as disk:
            peeks = []

            def peek():
                peeks.append(1)
                return True                              # a neighbour always waits
            disk.data.turns = lambda: (peek, 1, 3600.0)
            tags = [disk.submit(BlkType.IN, i * 8, nbytes=4096) for i in range(100)]
            disk.kick(0)
            disk._reap()
            assert sorted(disk.answers) == tags and not disk.data.backlog and not peeks
            disk.answers.clear()
            disk.data.turns = lambda: (peek, 1, 1e-9)    # over before the first read is done
            tags = [disk.submit(BlkType.IN, i * 8, nbytes=4096) for i in range(100)]
            disk.kick(0)
            disk._reap()
            assert len(disk.answers) == 1 and disk.data.backlog == {0} and peeks == [1]
    finally:
        drop_store(store)


def test_a_stopping_ring_is_not_drained_while_its_stop_waits_for_what_was_taken():
    """vhost-user: a ring told to stop (GET_VRING_BASE) is processed no more. While the stop
    waits for the requests taken before it, their completions free slots, and the refill
    that follows must not take what the driver offered since: that stays in the avail ring
    for the next owner (a migration's destination), and the stop's answer counts only what
    was taken before it."""
    with InProcessDisk(writeback=True) as disk:
        ring = disk.data.rings[0]
        first = [disk.submit(BlkType.OUT, i * 8, data=b"a" * 4096) for i in range(2)]
        disk.kick()                                    # taken, and run: to be reaped
        assert ring.last_avail_idx == 2
        later = [disk.submit(BlkType.OUT, 64 + i * 8, data=b"b" * 4096) for i in range(2)]
        disk.data.stopping.add(0)                      # what Queues.stop_queue does first
        disk.data.on_completions()                     # the wait serves the completions
        assert ring.last_avail_idx == 2 and ring.pending() == 2
        assert not disk.data.busy(0)
        disk.data.poll()                               # nor does polling take them
        disk.data.tick()
        assert ring.last_avail_idx == 2
        disk.data.stopping.discard(0)                  # a ring started again takes them
        disk.kick()
        disk.serve()
        assert {disk.answers.pop(t).status for t in first + later} == {BlkStatus.OK}
