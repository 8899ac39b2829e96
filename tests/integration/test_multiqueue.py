"""Multiqueue (VIRTIO_BLK_F_MQ) through the Python frontend: vblk --num-queues against
qemu-storage-daemon num-queues=, same requests, same results.

Each queue is its own ring in its own part of the frontend's RAM, all served by one backend;
data written through one queue reads back through every other.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from vblk.control import fetch_stats
from vblk.testing.frontend import BackendError, BlkClient
from vblk.virtio.constants import BlkStatus, BlkType, Feature

MiB = 1 << 20
QUEUES = 4


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    return path


def serve(backend: str, request, image: Path, queues: int) -> str:
    if backend == "vblk":
        return request.getfixturevalue("vblk_server")(image, "--num-queues", str(queues))
    return request.getfixturevalue("qsd_server")(image, num_queues=queues)


def connect(sock: str, queues: int) -> list[BlkClient]:
    first = BlkClient.connect(sock, ram_mib=64, area=(0, 8 * MiB), queue_size=64)
    try:
        return first.open_queues(queues, queue_size=64)
    except BaseException:
        first.close()
        raise


def close(clients: list[BlkClient]) -> None:
    for c in reversed(clients):
        c.close()


def wait_for(client: BlkClient, tags: list[int]) -> dict[int, object]:
    done = {}
    while len(done) < len(tags):
        for c in client.wait(1):
            done[c.tag] = c
    return done


@pytest.mark.parametrize("backend", ["vblk", "qsd"])
def test_four_queues_carry_interleaved_requests(backend, request, image):
    sock = serve(backend, request, image, QUEUES)
    clients = connect(sock, QUEUES)
    try:
        assert clients[0].config.num_queues == QUEUES
        assert clients[0].frontend.offered_features & Feature.BLK_MQ.mask
        rng = random.Random(4)
        expect: dict[int, bytes] = {}
        tags: list[list[int]] = [[] for _ in clients]
        # 16 writes in flight on each queue at once, to disjoint 4 KiB blocks
        for block in range(QUEUES * 16):
            data = rng.randbytes(4096)
            expect[block] = data
            q = block % QUEUES
            tags[q].append(clients[q].submit(BlkType.OUT, block * 8, data=data))
        for c, t in zip(clients, tags):
            assert all(d.status == BlkStatus.OK for d in wait_for(c, t).values())
        # every block reads back through a queue other than the one that wrote it
        for block, data in expect.items():
            done = clients[(block + 1) % QUEUES].read(block * 8, 4096)
            assert done.status == BlkStatus.OK and done.data == data, block
        assert clients[3].flush().status == BlkStatus.OK
        if backend == "vblk":     # the stats saw every queue work
            snap = fetch_stats(sock + ".ctl")
            assert [q["types"]["write"]["requests"] for q in snap["queues"]] == [16] * QUEUES
    finally:
        close(clients)
    with open(image, "rb") as f:
        for block, data in expect.items():
            assert os.pread(f.fileno(), 4096, block * 4096) == data


@pytest.mark.parametrize("backend", ["vblk", "qsd"])
def test_a_queue_beyond_the_count_cannot_be_started(backend, request, image):
    sock = serve(backend, request, image, 2)
    first = BlkClient.connect(sock, ram_mib=64, area=(0, 8 * MiB), queue_size=64)
    try:
        with pytest.raises((BackendError, OSError)):
            first.open_queues(3, queue_size=64)
    finally:
        first.close(graceful=False)


def test_a_flooded_queue_does_not_starve_another(vblk_server, image, monkeypatch):
    """With the only worker stopped, queue 0 fills all 16 slots and keeps 44 more requests
    waiting; queue 1 then asks for 8. Once the worker runs again every request of both
    queues completes with the right data (which queue gets the freed slots first is the
    slot_budget policy, unit-tested in tests/unit/test_slot_budget.py). Writes go to the
    worker, not the write ring, so that stopping it holds them."""
    monkeypatch.setenv("VBLK_URING", "0")
    sock = vblk_server(image, "--num-queues", "2", "--slots", "16", "--workers", "1")
    flood, other = clients = connect(sock, 2)
    pid = sock.proc.pid
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        (worker,) = map(int, f.read().split())         # --workers 1
    try:
        flood.indirect = other.indirect = True
        os.kill(worker, signal.SIGSTOP)
        try:
            flood_tags = [flood.submit(BlkType.OUT, i * 8, data=bytes([i]) * 4096)
                          for i in range(60)]
            deadline = time.monotonic() + 10
            while fetch_stats(sock + ".ctl")["queues"][0]["in_flight"] < 16:
                assert time.monotonic() < deadline, "queue 0 did not fill the slots"
                time.sleep(0.02)
            other_tags = [other.submit(BlkType.OUT, 8192 + i * 8, data=b"\xcd" * 4096)
                          for i in range(8)]
            time.sleep(0.2)
            snap = fetch_stats(sock + ".ctl")
            assert [q["in_flight"] for q in snap["queues"]] == [16, 0]
        finally:
            os.kill(worker, signal.SIGCONT)
        assert all(d.status == BlkStatus.OK for d in wait_for(other, other_tags).values())
        assert all(d.status == BlkStatus.OK for d in wait_for(flood, flood_tags).values())
        for i in (0, 17, 59):
            assert flood.read(i * 8, 4096).data == bytes([i]) * 4096
    finally:
        close(clients)
