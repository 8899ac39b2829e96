"""Kicks held while the loop polls (vblk.supervisor.queues, hold_kicks / release_kicks): a
request the driver adds while they are held asks for no kick, so the release must kick for it
-- else the loop sleeps and the request waits for ever."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from vblk.supervisor.queues import Queues
from vblk.testing.inprocess import InProcessDisk
from vblk.virtio.constants import BlkStatus, BlkType


@pytest.fixture
def disk():
    with InProcessDisk(queue_size=64) as d:
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        queues = Queues(SimpleNamespace(), d.data, d.stats)
        queues.kicks[0] = kick
        d.data.on_broken = d.broken.append
        yield d, queues, kick
        os.close(kick)


def kicked(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def test_a_request_added_while_kicks_were_held_is_kicked_at_the_release(disk):
    d, queues, kick = disk
    queues.hold_kicks()
    tag = d.submit(BlkType.IN, 0, nbytes=4096, publish=False)
    assert d.drivers[0].publish() is False         # held: the driver does not kick
    queues.release_kicks()
    assert kicked(kick)                            # the release kicks in its place
    d.kick(0)                                      # what the kick handler does
    d.serve()
    assert d.answers[tag].status == BlkStatus.OK


def test_a_release_with_nothing_added_kicks_nothing_and_kicks_are_wanted_again(disk):
    d, queues, kick = disk
    queues.hold_kicks()
    queues.release_kicks()
    assert not kicked(kick)
    d.submit(BlkType.IN, 0, nbytes=4096, publish=False)
    assert d.drivers[0].publish() is True          # the driver kicks on its own again


def test_a_throttled_ring_is_left_to_the_tick(disk):
    d, queues, kick = disk
    queues.hold_kicks()
    d.submit(BlkType.IN, 0, nbytes=4096)
    d.data.throttled.add(0)                        # its drain waits for tokens: the tick's
    queues.release_kicks()
    assert not kicked(kick)
