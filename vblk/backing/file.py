"""A regular file or a block device as the disk: the calls on its fd.

===================  ===========================================  ==============================
request              regular file                                 block device
===================  ===========================================  ==============================
read / write         preadv / pwritev until every byte moved (O_DIRECT with a misaligned guest
                     buffer: through one page-aligned bounce buffer)
flush                fdatasync
DISCARD              fallocate(PUNCH_HOLE | KEEP_SIZE)            ioctl BLKDISCARD
WRITE_ZEROES         fallocate(ZERO_RANGE | KEEP_SIZE), else      ioctl BLKZEROOUT
                     pwritev of zeroes (EOPNOTSUPP: e.g. tmpfs)
WRITE_ZEROES+UNMAP   fallocate(PUNCH_HOLE | KEEP_SIZE), else as   fallocate(PUNCH_HOLE |
(discard on)         without UNMAP                                KEEP_SIZE) (the kernel zeroes,
                                                                  unmapping where it can), else
                                                                  BLKZEROOUT
cached read          preadv(RWF_NOWAIT): all of it from the page cache, or nothing promised
size now             fstat                                        ioctl BLKGETSIZE64
===================  ===========================================  ==============================

A punched hole in a regular file reads back as zeroes; a discarded range of a block device
reads back as whatever the device returns (zeroes only where the device guarantees it, which is
why WRITE_ZEROES on a device never uses BLKDISCARD).

The fd is opened (and the window locked) by vblk.backing.local in the supervisor; a worker
gets the same open file description by inheritance (``handoff`` / ``vblk.backing.attach``),
so the lock is neither taken again nor bounced between vblk's processes.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct

from vblk.backing import locks, syscalls
from vblk.backing.base import Backing, BackingInfo, info_from_dict, info_to_dict

BLKGETSIZE64 = 0x80081272          # _IOR(0x12, 114, size_t): size in bytes, u64


class FileBacking(Backing):
    """A regular file (or, through BlockDeviceBacking, a block device) opened on ``fd``; the
    backing owns the fd from now on."""

    def __init__(self, info: BackingInfo, fd: int, locked: bool = True) -> None:
        super().__init__(info)
        self.fd = fd
        self.locked = locked                 # this open file description holds the window's lock
        self.window_size = info.size         # what the lock covers (follows live resizes)
        self.start = info.start
        self.direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        # Page-cache hits are served inline; with O_DIRECT there is no page cache to hit.
        self.caches = hasattr(os, "RWF_NOWAIT") and not self.direct

    # -- I/O -------------------------------------------------------------------------------
    def _transfer(self, offset: int, bufs: list[memoryview], write: bool) -> None:
        try:
            syscalls.full_io(self.fd, bufs, self.start + offset, write)
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self.direct:
                raise
            syscalls.bounced_io(self.fd, bufs, self.start + offset, write)

    def _readv(self, offset: int, bufs: list[memoryview]) -> None:
        self._transfer(offset, bufs, False)

    def _writev(self, offset: int, bufs: list[memoryview]) -> None:
        self._transfer(offset, bufs, True)

    def _flush(self) -> None:
        os.fdatasync(self.fd)

    def _discard(self, offset: int, length: int) -> None:
        syscalls.punch_hole(self.fd, self.start + offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        at = self.start + offset
        if unmap:
            try:
                syscalls.punch_hole(self.fd, at, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
        try:
            syscalls.zero_range(self.fd, at, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            syscalls.write_zeroes_slowly(self.fd, at, length)

    def read_cached(self, offset: int, bufs: list[memoryview]) -> bool:
        if not self.caches:
            return False
        total = sum(map(len, bufs))
        if offset < 0 or offset + total > self.reach:
            return False
        try:
            return os.preadv(self.fd, bufs, self.start + offset, os.RWF_NOWAIT) == total
        except OSError:            # BlockingIOError: not all cached; anything else: let a worker tell
            return False

    # -- size --------------------------------------------------------------------------------
    def _image_size(self) -> int:
        return os.fstat(self.fd).st_size

    def resize_limit(self) -> tuple[int, str]:
        """With a range: the range's size (the operator's window never widens). Otherwise the
        image as it is now -- a regular file is re-stat'ed (so ``truncate -s`` / ``qemu-img
        resize`` then ``vblk resize`` works), a block device asked again -- less the window's
        start, rounded down to whole logical blocks. vblk never grows the image itself."""
        info = self.info
        if info.ranged:
            return info.size, f"the range's size ({info.size} bytes)"
        lbs = info.logical_block_size
        limit = max(0, self._image_size() - info.start) // lbs * lbs
        where = f" after byte {info.start}" if info.start else ""
        what = "block device" if info.is_block_device else "file"
        return limit, f"what the {what} {info.path} holds{where} now ({limit} bytes)"

    def resize_window(self, old_size: int, new_size: int) -> None:
        if self.locked:
            locks.move_lock(self.fd, self.info.path, self.start, old_size, new_size,
                            self.info.readonly)
        self.window_size = new_size

    def release_window(self) -> None:
        if self.locked:
            locks.release_lock(self.fd, self.start, self.window_size)
            self.locked = False

    def take_window(self) -> None:
        if not self.locked:
            locks.take_lock(self.fd, self.info.path, self.start, self.window_size,
                            self.info.readonly)
            self.locked = True

    # -- processes ---------------------------------------------------------------------------
    def handoff(self) -> tuple[dict, list[int]]:
        return {"kind": self.info.kind, "fd": self.fd, "info": info_to_dict(self.info)}, [self.fd]

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class BlockDeviceBacking(FileBacking):
    """A block device: discard and zeroing by ioctl, its size by BLKGETSIZE64."""

    def _discard(self, offset: int, length: int) -> None:
        syscalls.blkdiscard(self.fd, self.start + offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        at = self.start + offset
        if unmap:
            try:
                syscalls.punch_hole(self.fd, at, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
        syscalls.blkzeroout(self.fd, at, length)

    def _image_size(self) -> int:
        buf = fcntl.ioctl(self.fd, BLKGETSIZE64, bytes(8))
        return struct.unpack("Q", buf)[0]


def attach_fd(desc: dict) -> FileBacking:
    """The worker's side of ``handoff``: the same backing over the inherited fd."""
    info = info_from_dict(desc["info"])
    cls = BlockDeviceBacking if info.is_block_device else FileBacking
    return cls(info, desc["fd"])
