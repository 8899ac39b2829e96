"""The inflight region: what a restarted backend learns from what a dead one left."""
import pytest

from vblk.virtio.inflight import DESC_STATE, QUEUE_HEAD, InflightQueue, queue_region_size

Q = 8


def region():
    return memoryview(bytearray(queue_region_size(Q)))


def test_region_size_follows_libvhost_user_and_fits_the_header():
    assert queue_region_size(128) == 2112
    for q in (1, 2, 4, 64, 1024, 32768):
        assert queue_region_size(q) % 64 == 0
        assert queue_region_size(q) >= QUEUE_HEAD.size + DESC_STATE.size * q


def test_a_fresh_region_is_initialised_and_asks_for_nothing():
    view = region()
    assert InflightQueue(view, Q).recover(5, lambda i: 0) == []
    _, version, desc_num, _, used = QUEUE_HEAD.unpack_from(view, 0)
    assert (version, desc_num, used) == (1, Q, 5)


def test_heads_left_in_flight_come_back_oldest_first():
    view = region()
    q = InflightQueue(view, Q)
    q.recover(0, lambda i: 0)
    for head in (3, 1, 6):
        q.begin(head)
    q.end(1)
    q.published(1)
    again = InflightQueue(view, Q)
    assert again.recover(1, lambda i: 1) == [3, 6]
    again.begin(2)                        # the counter resumes after the oldest survivors
    assert InflightQueue(view, Q).recover(1, lambda i: 1) == [3, 6, 2]


def test_a_crash_between_publishing_and_clearing_a_batch_loses_nothing_and_redoes_nothing():
    view = region()
    q = InflightQueue(view, Q)
    q.recover(0, lambda i: 0)
    for head in (0, 1, 2, 3):
        q.begin(head)
    # the dead backend published used entries 0..2 (heads 2, 0, 3) but cleared none of them
    used_ring = {0: 2, 1: 0, 2: 3}
    assert InflightQueue(view, Q).recover(3, used_ring.__getitem__) == [1]


@pytest.mark.parametrize("version,desc_num", [(0, Q), (1, Q * 2), (7, Q)])
def test_a_region_of_another_shape_is_reset(version, desc_num):
    view = region()
    QUEUE_HEAD.pack_into(view, 0, 0, version, desc_num, 0, 0)
    DESC_STATE.pack_into(view, QUEUE_HEAD.size, 1, 0, 0)
    assert InflightQueue(view, Q).recover(0, lambda i: 0) == []
