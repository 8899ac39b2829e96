"""Where the WorkerPool puts a slot: the least busy ready worker, and, while more than one
disk has a frontend, never a disk's last idle worker to a disk already at the workers. The
workers here are handles with real pipes and no process: placement only."""
from __future__ import annotations

import os
import socket

import pytest

from vblk.ipc import Op, SlotArea, pack_slots
from vblk.supervisor.pool import WorkerHandle, WorkerPool


class Restarts:
    def worker_restarted(self) -> None:
        pass


@pytest.fixture
def pool():
    p = WorkerPool(3, {0: None, 1: None}, SlotArea.create(16), Restarts())
    ends = []
    for i in range(3):
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


def post(pool: WorkerPool, slot: int, disk: int) -> int:
    pool.post(slot, int(Op.READ), 0, 0, 4096, [], 1, disk)
    return pool.owner[slot]


def test_one_disk_alone_spreads_over_every_worker(pool):
    assert sorted(post(pool, s, 0) for s in range(3)) == [0, 1, 2]


def test_with_two_disks_connected_a_busy_disk_leaves_the_last_idle_worker_to_the_other(pool):
    pool.reserve = True
    placed = [post(pool, s, 0) for s in range(6)]
    assert len(set(placed)) == 2                  # disk 0 used two workers, not three
    idle = ({0, 1, 2} - set(placed)).pop()
    assert post(pool, 6, 1) == idle               # disk 1's request finds it free
    pool.flush()


def test_a_disk_whose_requests_all_came_back_counts_as_idle_again(pool):
    pool.reserve = True
    busy = {post(pool, 0, 1), post(pool, 1, 1)}
    last = ({0, 1, 2} - busy).pop()
    assert post(pool, 2, 0) == last               # disk 0 had nothing at the workers
    os.write(pool.complete_w, pack_slots([2]))
    assert [s for s, _, _ in pool.reap()] == [2]
    assert pool.disk_load == {0: 0, 1: 2}
    assert post(pool, 3, 0) == last               # and has nothing again
