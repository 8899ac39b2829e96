"""Where the WorkerPool puts a slot: reads with the least busy ready worker, buffered writes on
at most WRITE_SPREAD workers at once, durable writes of a batch all with one; with more than
one disk, the last worker kept for disks with nothing at the workers. The workers here
are handles with real pipes and no process: placement only."""
from __future__ import annotations

import os
import socket

import pytest

from vblk.ipc import FLAG_SYNC, Op, SlotArea, pack_slots
from vblk.supervisor import pool as pool_module
from vblk.supervisor.pool import WorkerHandle, WorkerPool


class Restarts:
    def worker_restarted(self) -> None:
        pass


@pytest.fixture
def pool(monkeypatch, request):
    """Four workers serving disk 0 (and disk 1 with ``@pytest.mark.parametrize("pool", [2],
    indirect=True)``)."""
    monkeypatch.setattr(pool_module, "WRITE_SPREAD", 2)
    disks = getattr(request, "param", 1)
    p = WorkerPool(4, {d: None for d in range(disks)}, SlotArea.create(32), Restarts())
    ends = []
    for i in range(4):
        r, w = os.pipe()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        p.workers[i] = WorkerHandle(i, None, w, a, ready=True)
        ends += [r, b]
    yield p
    for w in p.workers:
        w.close()
    for e in ends:
        e.close() if isinstance(e, socket.socket) else os.close(e)
    p.close()


def post(pool: WorkerPool, slot: int, op: Op, flags: int = 0, disk: int = 0) -> int:
    pool.post(slot, int(op), flags, 0, 4096, [], 1, disk)
    return pool.owner[slot]


def reap(pool: WorkerPool, slots: list[int]) -> None:
    os.write(pool.complete_w, pack_slots(slots))
    assert sorted(s for s, _, _ in pool.reap()) == sorted(slots)


def test_reads_spread_over_every_worker(pool):
    assert sorted(post(pool, s, Op.READ) for s in range(4)) == [0, 1, 2, 3]


def test_buffered_writes_keep_to_as_many_workers_as_cpus(pool):
    placed = [post(pool, s, Op.WRITE) for s in range(8)]
    assert len(set(placed)) == 2 and placed.count(placed[0]) == 4
    pool.flush()
    # once they are done, the next writes may take any idle worker again
    os.write(pool.complete_w, pack_slots(list(range(8))))
    assert len(pool.reap()) == 8
    assert len({post(pool, s, Op.WRITE) for s in range(8, 16)}) == 2


def test_a_read_still_finds_an_idle_worker_beside_buffered_writes(pool):
    writers = {post(pool, s, Op.WRITE) for s in range(6)}
    assert post(pool, 6, Op.READ) not in writers


def test_durable_writes_of_one_batch_go_to_one_worker(pool):
    assert len({post(pool, s, Op.WRITE, FLAG_SYNC) for s in range(5)}) == 1


def test_one_disk_has_every_worker(pool):
    assert sorted(post(pool, s, Op.READ) for s in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("pool", [2], indirect=True)
def test_with_two_disks_a_flood_leaves_the_quiet_worker_to_a_quiet_disk(pool):
    flood = [post(pool, s, Op.READ, disk=0) for s in range(1, 13)]
    assert flood.count(3) == 1 and flood[0] == 3       # its first request found disk 0 idle
    assert sorted(set(flood[1:])) == [0, 1, 2]          # the rest never went to worker 3
    reap(pool, [1])                                     # worker 3 is free again
    assert post(pool, 13, Op.WRITE, FLAG_SYNC, disk=1) == 3   # disk 1 had nothing at the workers
    assert post(pool, 14, Op.READ, disk=1) != 3         # now it has: the least busy rule
    # the flood goes on: still never on worker 3, even while worker 3 has nothing to do
    reap(pool, [13, 14])
    assert 3 not in {post(pool, s, Op.READ, disk=0) for s in range(15, 24)}
    # a slot reported twice (a dying worker's) counts once: disk 1 is still quiet
    reap(pool, [14])
    assert post(pool, 24, Op.READ, disk=1) == 3


def test_awaiting_while_a_few_requests_are_at_the_workers(pool, monkeypatch):
    monkeypatch.setattr(pool_module, "AWAIT_AT_MOST", 2)
    assert not pool.awaiting()                  # nothing at the workers: nothing to wait for
    post(pool, 0, Op.READ)
    assert pool.awaiting()
    post(pool, 1, Op.READ)
    assert pool.awaiting()
    post(pool, 2, Op.READ)
    assert not pool.awaiting()                  # more: the workers need the CPUs
    reap(pool, [0, 1])
    assert pool.awaiting()
    reap(pool, [1])                             # reported twice: counted once
    assert pool.awaiting()
    reap(pool, [2])
    assert not pool.awaiting()
