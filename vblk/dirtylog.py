"""The dirty log of a live migration: which guest pages vblk wrote.

Theory of operation
-------------------
While QEMU migrates a guest it copies guest memory to the destination over and over, each
time only the pages written since the last copy. Pages the guest's CPUs write it knows; pages
a vhost-user backend writes (data read from the disk into guest buffers, status bytes, the
used ring) the backend must tell it, in a shared bitmap: one bit per 4 KiB guest-physical
page, bit ``p % 8`` of byte ``p // 8`` for page ``p = gpa // 4096``
(docs/interop/vhost-user.rst, "Migration"). QEMU hands the bitmap over with SET_LOG_BASE (a
memfd, its size and offset) and says when logging is on with the VHOST_F_LOG_ALL feature bit.

Who writes it: the supervisor only. Workers write data into guest memory, but the supervisor
marks those pages when it completes the request -- after the data is in memory, before the
used element that announces it (data -> log -> used entry -> log -> used.idx -> log ->
notify). QEMU clears the bitmap concurrently with 64-bit atomic exchanges; Python has no
atomic OR on shared memory, and two processes setting bits in one byte by read-modify-write
could lose one. One writer cannot: at worst its read-modify-write re-sets a bit QEMU just took,
and that page is copied once more.

A page past the end of the bitmap (a hostile or buggy frontend's log too small for its own
memory table) is not marked and counted in ``missed``; nothing outside the map is touched.
"""
from __future__ import annotations

import logging
import mmap
import os

from vblk.errors import FrontendProtocolError

log = logging.getLogger(__name__)

PAGE_SHIFT = 12                   # the log's granule: 4 KiB guest-physical pages
MAX_LOG_BYTES = 1 << 32           # a log for 128 TiB of guest memory: more is refused


class DirtyLog:
    """A mapped log (``SET_LOG_BASE``); ``mark`` sets the bits of the pages a write touched."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        if not 0 < size <= MAX_LOG_BYTES or offset < 0 or offset > MAX_LOG_BYTES:
            raise FrontendProtocolError(f"dirty log of {size} bytes at offset {offset}")
        try:
            held = os.fstat(fd).st_size
            if held < offset + size:      # marking past its end would be SIGBUS
                raise FrontendProtocolError(f"dirty log fd holds {held} bytes, the log needs "
                                            f"{offset + size}")
            self.mm = mmap.mmap(fd, offset + size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise FrontendProtocolError(f"cannot map the dirty log: {exc}") from exc
        self.bits = memoryview(self.mm)[offset:offset + size]
        self.pages = size * 8
        self.missed = 0

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of ``[gpa, gpa + length)``."""
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if last >= self.pages:
            self.missed += 1
            last = self.pages - 1
        bits = self.bits
        for page in range(first, last + 1):
            bits[page >> 3] |= 1 << (page & 7)

    def mark_pieces(self, memory, pieces) -> None:
        """Mark the pages of (region, mapping offset, length) pieces of ``memory``."""
        for region, off, n in pieces:
            self.mark(memory.gpa_of(region, off), n)

    def close(self) -> None:
        self.bits.release()
        try:
            self.mm.close()
        except BufferError:
            log.warning("event=unmap_deferred what=dirty_log")


def marked_pages(bitmap: bytes) -> set[int]:
    """The page numbers whose bits are set in ``bitmap`` (tests, and whoever reads a log)."""
    out = set()
    for i, byte in enumerate(bytes(bitmap)):
        if byte:
            out.update(i * 8 + b for b in range(8) if byte >> b & 1)
    return out
