"""Discard and write-zeroes on the backing store: the blocking calls a worker makes.

Ranges are absolute byte offsets in the backing store (already checked against the window).

===================  ===========================================  ==============================
request              regular file                                 block device
===================  ===========================================  ==============================
DISCARD              fallocate(PUNCH_HOLE | KEEP_SIZE)            ioctl BLKDISCARD
WRITE_ZEROES         fallocate(ZERO_RANGE | KEEP_SIZE), else      ioctl BLKZEROOUT
                     pwritev of zeroes (EOPNOTSUPP: e.g. tmpfs)
WRITE_ZEROES+UNMAP   fallocate(PUNCH_HOLE | KEEP_SIZE), else as   fallocate(PUNCH_HOLE |
(discard on)         without UNMAP                                KEEP_SIZE) (the kernel zeroes,
                                                                  unmapping where it can), else
                                                                  BLKZEROOUT
===================  ===========================================  ==============================

A punched hole in a regular file reads back as zeroes; a discarded range of a block device
reads back as whatever the device returns (zeroes only where the device guarantees it, which is
why WRITE_ZEROES on a device never uses BLKDISCARD). Python has no fallocate with flags, so
libc's is called through ctypes. Errors are OSErrors with the errno set.
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

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` flags; OSError on failure (EINTR retried)."""
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate(mode={mode:#x}, {offset}, {length}): {os.strerror(err)}")


def _range_ioctl(fd: int, request: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, request, _RANGE.pack(offset, length))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


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


def discard(fd: int, block_device: bool, offset: int, length: int) -> None:
    if block_device:
        _range_ioctl(fd, BLKDISCARD, offset, length)
    else:
        punch_hole(fd, offset, length)


def write_zeroes(fd: int, block_device: bool, offset: int, length: int, unmap: bool) -> None:
    if unmap:
        try:
            punch_hole(fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
    if block_device:
        _range_ioctl(fd, BLKZEROOUT, offset, length)
        return
    try:
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        write_zeroes_slowly(fd, offset, length)
