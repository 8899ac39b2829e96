"""The dirty log of a migration: the bitmap itself, and what the data path marks in it
(in-process: vblk.testing.inprocess, a memory backing)."""
from __future__ import annotations

import mmap
import os

import pytest

from vblk.dirtylog import DirtyLog, marked_pages
from vblk.errors import FrontendProtocolError
from vblk.testing.inprocess import InProcessDisk
from vblk.virtio.constants import BLK_ID_BYTES, BlkType

MiB = 1 << 20
PAGE = 4096


def memfd_log(size: int, offset: int = 0):
    fd = os.memfd_create("vblk-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, offset + size)
    return fd, mmap.mmap(fd, offset + size)


def test_marks_every_page_a_range_touches_and_nothing_else():
    fd, mm = memfd_log(64, offset=4096)
    try:
        log = DirtyLog(fd, 64, 4096)
        log.mark(0x1FFF, 2)                         # straddles pages 1 and 2
        log.mark(10 * PAGE, PAGE)                   # exactly page 10
        log.mark(100 * PAGE + 5, 0)                 # nothing
        assert marked_pages(mm[4096:4096 + 64]) == {1, 2, 10}
        assert mm[:4096] == bytes(4096)             # before the offset: untouched
        log.mark(64 * 8 * PAGE - 1, 10)             # runs past the end of the log
        assert log.missed == 1 and max(marked_pages(mm[4096:])) == 64 * 8 - 1
        log.close()
    finally:
        mm.close()
        os.close(fd)


@pytest.mark.parametrize("size, offset, held", [(0, 0, 4096), (4096, 0, 100), (2 << 32, 0, 4096),
                                                (4096, 4096, 4096)])
def test_a_log_that_cannot_be_mapped_whole_is_refused(size, offset, held):
    fd = os.memfd_create("vblk-log", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, held)
        with pytest.raises(FrontendProtocolError):
            DirtyLog(fd, size, offset)
    finally:
        os.close(fd)


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))


def test_the_data_path_marks_what_it_writes_into_guest_memory_while_logging_is_on():
    with InProcessDisk(queue_size=64) as disk:
        ring_pages = pages(disk.data.rings[0].used_gpa, disk.data.rings[0].used_bytes)
        fd, mm = memfd_log(disk.ram.size // PAGE // 8)
        log = DirtyLog(fd, disk.ram.size // PAGE // 8, 0)
        try:
            disk.write(0, os.urandom(64 * 1024))    # before logging: nothing marked
            assert marked_pages(mm) == set()
            disk.data.set_dirty_log(log, True)
            tag = disk.submit(BlkType.IN, 0, nbytes=3 * PAGE)
            header, buf, _ = next(iter(disk._pending.values()))[1:]
            disk.run(tag)
            read_pages = pages(buf, 3 * PAGE) | pages(header + 16, 1)
            assert read_pages | ring_pages <= marked_pages(mm)
            mm[:] = bytes(len(mm))                  # QEMU took the bits
            tag = disk.submit(BlkType.OUT, 8, data=b"w" * 2 * PAGE)
            header, buf, _ = next(iter(disk._pending.values()))[1:]
            disk.run(tag)
            got = marked_pages(mm)
            assert pages(header + 16, 1) | ring_pages <= got      # status byte and used ring
            only_read = pages(buf, 2 * PAGE) - pages(header + 16, 1)   # the device only read
            assert only_read and not only_read & got
            mm[:] = bytes(len(mm))
            tag = disk.submit(BlkType.GET_ID, nbytes=BLK_ID_BYTES)
            header, buf, _ = next(iter(disk._pending.values()))[1:]
            disk.run(tag)
            assert pages(buf, BLK_ID_BYTES) | pages(header + 16, 1) <= marked_pages(mm)
            disk.data.set_dirty_log(log, False)     # logging off again: nothing more marked
            mm[:] = bytes(len(mm))
            disk.read(0, 4 * PAGE)
            assert marked_pages(mm) == set()
        finally:
            disk.data.set_dirty_log(None, False)
            log.close()
            mm.close()
            os.close(fd)
