"""Live resize rules: the size text, every refusal, the device swap and the window's limit."""
import fcntl
import os

import pytest

from vblk.backing import BackingInfo
from vblk.backing.file import FileBacking
from vblk.backing.locks import _FLOCK, F_OFD_SETLK
from vblk.device import BlkDevice, Completion, Geometry, IoPlan
from vblk.errors import ResizeRefused
from vblk.resize import MAX_SIZE_BYTES, check_new_size, describe, parse_new_size
from vblk.virtio.blk import BlkRequest
from vblk.virtio.constants import BlkStatus, BlkType

MiB = 1 << 20


@pytest.mark.parametrize("text,want", [("4096", 4096), ("64K", 64 << 10), ("3m", 3 * MiB),
                                       ("2G", 2 << 30), ("1T", 1 << 40), (" 512 ", 512),
                                       (8192, 8192)])
def test_sizes_are_bytes_or_suffixed(text, want):
    assert parse_new_size(text) == want


@pytest.mark.parametrize("bad", ["", "12Q", "-4096", "1.5G", "0x1000", "G", "4 K", None, True,
                                 3.0, [4096]])
def test_unreadable_sizes_are_refused(bad):
    with pytest.raises(ResizeRefused, match="not a size"):
        parse_new_size(bad)


def test_size_rules_refuse_zero_negative_partial_blocks_and_too_big():
    check_new_size(4096, 4096, 8192, "the file")
    check_new_size(8192, 4096, 8192, "the file")          # exactly the limit is fine
    for size, match in ((0, "at least one logical block"), (-512, "at least one"),
                        (4096 + 512, "not a whole number of 4096-byte"),
                        (12288, "more than the file"),
                        (MAX_SIZE_BYTES + 512, "capacity field")):
        with pytest.raises(ResizeRefused, match=match):
            check_new_size(size, 4096, 1 << 70 if "capacity" in match else 8192, "the file")


def test_too_big_says_what_sets_the_limit_and_that_vblk_never_grows_the_image():
    with pytest.raises(ResizeRefused) as info:
        check_new_size(2 * MiB, 512, MiB, "what the file d.img holds now (1048576 bytes)")
    assert "d.img holds now (1048576 bytes)" in str(info.value)
    assert "never grows" in str(info.value)


def read(sector, nbytes):
    return BlkRequest(BlkType.IN, sector, [], [(0x1000, nbytes)], 0x2000)


def test_device_resize_checks_new_requests_against_the_new_end():
    dev = BlkDevice(Geometry(4 * MiB), writeback=False)
    last = 4 * MiB // 512 - 8
    assert isinstance(dev.plan(read(last, 4096)), IoPlan)
    assert dev.resize(2 * MiB) == 4 * MiB
    assert dev.geometry.size_bytes == 2 * MiB
    assert dev.config().capacity == 2 * MiB // 512
    past = dev.plan(read(last, 4096))
    assert isinstance(past, Completion) and past.status == BlkStatus.IOERR
    assert dev.plan(read(2 * MiB // 512 - 8, 4096)) == IoPlan(0, 2 * MiB - 4096, 4096)
    dev.resize(8 * MiB)
    assert dev.plan(read(8 * MiB // 512 - 8, 4096)) == IoPlan(0, 8 * MiB - 4096, 4096)


def info(path, *, size, start=0, ranged=False, readonly=False, lbs=512):
    return BackingInfo(path=str(path), kind="regular file", readonly=readonly, writeback=False,
                       nocache=False, logical_block_size=lbs, physical_block_size=lbs,
                       start=start, size=size, image_size=os.path.getsize(path),
                       serial=b"S" * 20, ranged=ranged)


def test_limit_is_the_file_now_less_the_start_in_whole_blocks(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    os.truncate(img, 4 * MiB)
    with FileBacking(info(img, size=4 * MiB, lbs=4096), os.open(img, os.O_RDONLY)) as b:
        assert b.resize_limit()[0] == 4 * MiB
        os.truncate(img, 6 * MiB + 1000)                    # grown behind vblk's back
        limit, what = b.resize_limit()
        assert limit == 6 * MiB and str(img) in what
    with FileBacking(info(img, size=MiB, start=MiB, lbs=4096), os.open(img, os.O_RDONLY)) as b:
        assert b.resize_limit()[0] == 5 * MiB


def test_limit_with_a_range_is_the_range(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 * MiB))
    with FileBacking(info(img, size=2 * MiB, start=MiB, ranged=True), os.open(img, os.O_RDONLY)) as b:
        limit, what = b.resize_limit()
    assert limit == 2 * MiB and "range" in what


def test_relock_takes_the_new_bytes_and_refuses_when_another_process_holds_them(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8 * MiB))
    ours = FileBacking(info(img, size=2 * MiB), os.open(img, os.O_RDWR))
    other = os.open(img, os.O_RDWR)        # a second open file description: another owner
    try:
        fcntl.fcntl(ours.fd, F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 2 * MiB, 0))
        ours.resize_window(2 * MiB, 4 * MiB)
        with pytest.raises(OSError):        # now ours
            fcntl.fcntl(other, F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 3 * MiB, MiB, 0))
        ours.resize_window(4 * MiB, MiB)                      # shrink releases the tail
        fcntl.fcntl(other, F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 3 * MiB, MiB, 0))
        with pytest.raises(ResizeRefused, match="in use by another process"):
            ours.resize_window(MiB, 4 * MiB)
    finally:
        ours.close()
        os.close(other)


def test_describe_says_old_new_and_whether_the_guest_was_told():
    assert describe(MiB, 2 * MiB, True, "") == ("resized from 1048576 to 2097152 bytes "
                                                "(2048 -> 4096 sectors); the frontend was notified")
    assert "not notified (no frontend)" in describe(MiB, 512, False, "no frontend")


def test_notification_send_is_bounded_when_the_frontend_does_not_read():
    import socket
    import time

    from vblk.supervisor.connection import send_bounded
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        while True:                                  # fill the channel: QEMU stuck
            ours.send(b"x" * 65536)
    except BlockingIOError:
        pass
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="no room on the backend channel"):
        send_bounded(ours.fileno(), b"\0" * 12, 0.2)
    assert time.monotonic() - t0 < 1.0
    theirs.close()
    with pytest.raises(OSError):                     # a dead channel: EPIPE, no SIGPIPE
        send_bounded(ours.fileno(), b"\0" * 12, 0.2)
    assert ours.fileno() >= 0                        # still ours to close (not detached twice)
    ours.close()


def test_a_backend_channel_that_is_no_socket_fails_cleanly_and_stays_ours():
    from vblk.supervisor.connection import send_bounded
    fd = os.eventfd(0, os.EFD_CLOEXEC)               # a hostile frontend's "channel"
    try:
        with pytest.raises(OSError):
            send_bounded(fd, b"\0" * 12, 0.1)
        os.fstat(fd)                                 # not closed behind the session's back
    finally:
        os.close(fd)
