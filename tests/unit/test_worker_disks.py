"""Disks added and removed at run time, as a worker sees them: the disk-add and disk-remove
control messages (vblk.ipc) over a real SOCK_SEQPACKET pair with the backing's fd by
SCM_RIGHTS, and a worker (vblk.workers.loop, in this process) serving slots of the added disk."""
from __future__ import annotations

import array
import errno
import os
import socket

import pytest

from vblk import ipc
from vblk.backing.local import open_local
from vblk.ipc import Op, SlotArea, SlotState, encode_ranges
from vblk.options import parse_acrn
from vblk.virtio.constants import BlkStatus
from vblk.workers.loop import Worker

KiB = 1024


def image(tmp_path, name: str, fill: int):
    path = tmp_path / name
    path.write_bytes(bytes([fill]) * (64 * KiB))
    return path


@pytest.fixture
def pair():
    supervisor, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield supervisor, worker
    supervisor.close()
    worker.close()


def test_a_disk_add_message_carries_the_backing_and_its_fd(tmp_path, pair):
    supervisor, worker = pair
    with open_local(parse_acrn(str(image(tmp_path, "a.img", 1)))) as backing:
        desc, fds = backing.handoff()
        ipc.send_control(supervisor, ipc.disk_add_message(7, desc), fds)
        msg, got = ipc.recv_control(worker)
        try:
            assert msg["op"] == "disk-add" and msg["disk"] == 7
            received = ipc.received_backing(msg, got)
            assert received["fd"] == got[0] != backing.fd
            assert os.fstat(got[0]).st_ino == os.fstat(backing.fd).st_ino
            assert {k: v for k, v in received.items() if k != "fd"} == \
                {k: v for k, v in desc.items() if k != "fd"}
        finally:
            for fd in got:
                os.close(fd)
    with pytest.raises(ValueError, match="came with 0 fds"):
        ipc.received_backing(msg, [])
    assert ipc.disk_remove_message(7) == {"op": "disk-remove", "disk": 7}


def test_a_worker_serves_a_disk_announced_after_it_started_and_forgets_it_when_removed(
        tmp_path, pair):
    supervisor, worker_end = pair
    first = open_local(parse_acrn(str(image(tmp_path, "first.img", 1))))
    added_path = image(tmp_path, "added.img", 0xAA)
    added = open_local(parse_acrn(str(added_path)))
    area = SlotArea.create(4)
    w = Worker(0, {0: first}, area, -1, -1, worker_end)
    try:
        desc, fds = added.handoff()
        ipc.send_control(supervisor, ipc.disk_add_message(3, desc), fds)
        # The slot comes before the worker looked at its control socket: the announcement is
        # already waiting there, and running the slot finds it.
        area.post(0, Op.WRITE_ZEROES, 0, 4 * KiB, 4 * KiB, 0, encode_ranges([(4 * KiB, 4 * KiB)]),
                  disk=3)
        w.run_batch(array.array("I", [0]))
        assert area.result(0) == (SlotState.DONE, BlkStatus.OK, 0)
        data = added_path.read_bytes()
        assert data[4 * KiB:8 * KiB] == bytes(4 * KiB) and data[:4 * KiB] == b"\xaa" * 4 * KiB
        held = w.disks[3]
        assert held.fd != added.fd

        ipc.send_control(supervisor, ipc.disk_remove_message(3))
        assert w.handle_control()
        assert 3 not in w.disks and held.fd == -1           # its fd is closed
        area.post(1, Op.WRITE_ZEROES, 0, 0, 4 * KiB, 0, encode_ranges([(0, 4 * KiB)]), disk=3)
        w.run_batch(array.array("I", [1]))
        assert area.result(1) == (SlotState.DONE, BlkStatus.IOERR, errno.ENODEV)
        assert added_path.read_bytes()[:4 * KiB] == b"\xaa" * 4 * KiB
        assert 0 in w.disks                                  # the other disk is untouched
    finally:
        for b in w.disks.values():
            b.close()
        first.close()
        added.close()
        area.close()
