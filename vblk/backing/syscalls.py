"""The Linux calls behind discard and write-zeroes on a file or a block device.

Python has no fallocate with flags, so libc's is called through ctypes; BLKDISCARD and
BLKZEROOUT are ioctls taking u64[2] {start, length}. Offsets here are absolute byte offsets
in the file or device (the backing has added its window's start). Errors are OSErrors with
the errno set.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# <linux/fs.h>: _IO(0x12, 119) and _IO(0x12, 127), both taking u64[2] {start, length}
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
_RANGE = struct.Struct("=QQ")

ZERO_CHUNK = 1 << 20              # the pwritev fallback writes at most this much per call

libc = ctypes.CDLL(None, use_errno=True)      # this process's libc, errno kept (vblk.uring too)
_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` flags; OSError on failure (EINTR retried)."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def blkdiscard(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKDISCARD, _RANGE.pack(offset, length))


def blkzeroout(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKZEROOUT, _RANGE.pack(offset, length))


def write_zeroes_slowly(fd: int, offset: int, length: int) -> None:
    """Plain zero writes, for stores that cannot zero a range any other way."""
    zeros = mmap.mmap(-1, min(length, ZERO_CHUNK))     # page-aligned, fine for O_DIRECT too
    try:
        view = memoryview(zeros)
        end = offset + length
        while offset < end:
            n = os.pwritev(fd, [view[:min(len(view), end - offset)]], offset)
            if n <= 0:
                raise OSError(errno.EIO, "zero write made no progress")
            offset += n
        view.release()
    finally:
        zeros.close()


def full_io(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
    """preadv/pwritev until every byte moved (short transfers are continued, EOF is an
    error)."""
    call = os.pwritev if write else os.preadv
    while bufs:
        n = call(fd, bufs, offset)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of the backing store")
        offset += n
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        if n:
            bufs = [bufs[0][n:]] + bufs[1:]


def bounced_io(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
    """O_DIRECT with misaligned guest buffers: go through one page-aligned buffer."""
    total = sum(len(b) for b in bufs)
    bounce = mmap.mmap(-1, max(total, 1))
    try:
        view = memoryview(bounce)
        if write:
            pos = 0
            for b in bufs:
                view[pos:pos + len(b)] = b
                pos += len(b)
            full_io(fd, [view[:total]], offset, True)
        else:
            full_io(fd, [view[:total]], offset, False)
            pos = 0
            for b in bufs:
                b[:] = view[pos:pos + len(b)]
                pos += len(b)
        view.release()
    finally:
        bounce.close()
