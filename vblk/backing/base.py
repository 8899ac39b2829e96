"""The backing interface: what vblk does to a disk, whatever holds it.

Theory of operation
-------------------
A ``Backing`` is one open, locked window of a store -- ``[start, start + size)`` of a file,
a block device, a buffer in memory (tests), later an RBD image -- seen from the guest's side:
every offset it takes counts bytes from the window's first byte, and the window's own checks
(``check_window``) refuse anything outside it before the store is touched, whatever the caller
(the device has already checked against the disk's size; this is the second wall).

How far a request may reach, ``reach``: the window's size when a range was given (a resize
never widens the operator's window); without a range, everything from the start on, because
the image may grow and a live resize may show the guest more of it.

Two ways to run an operation, and every backing offers both:

* **blocking** -- ``readv`` / ``writev`` / ``flush`` / ``discard`` / ``write_zeroes``: return
  when done, raise ``OSError`` (with errno) when not. The worker processes call these.
  ``read_cached`` is the one call that must never block: it answers from a cache or says no
  (False, nothing promised), and the supervisor calls it inline for page-cache hits.
* **submitted** -- ``submit(tag, op, ...)`` starts one operation; when ``completion_fd`` (an
  eventfd, non-blocking) becomes readable, ``reap()`` returns ``(tag, errno)`` pairs for the
  operations that finished (errno 0: done). This is the shape of a store whose I/O completes
  on someone else's threads (librbd's): nothing blocks the caller's event loop and the
  completions arrive through epoll. The default here runs the blocking call at once and
  reports it, which is right for memory and good enough for tests over files.

``handoff()`` describes the backing to a worker process (a dict and fds for the worker's
argv and ``pass_fds``), and ``vblk.backing.attach`` rebuilds it there: the worker shares the
open file description (and so its lock) but never opens or locks anything itself. A backing
that cannot cross a process boundary (memory) raises NotImplementedError, and is served by
the in-process engine instead of worker processes.
"""
from __future__ import annotations

import errno
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

from vblk.ipc import Op
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus

UNBOUNDED = (1 << 63) - 1          # the reach of a window without a range, before its start


@dataclass(frozen=True, slots=True)
class BackingInfo:
    """What the guest will see, and where it lies in the store."""
    path: str                      # as the operator named it
    kind: str                      # "regular file", "block device", "memory"
    readonly: bool
    writeback: bool                # the initial cache mode; the guest may toggle it
    nocache: bool
    logical_block_size: int
    physical_block_size: int
    start: int                     # byte offset of the guest's byte 0 in the store
    size: int                      # bytes the guest sees, whole logical blocks
    image_size: int                # bytes in the whole store
    serial: bytes                  # exactly 20 bytes, NUL-padded
    ranged: bool                   # a range was given: its size is the most a resize may reach

    @property
    def is_block_device(self) -> bool:
        return self.kind == "block device"

    @property
    def capacity_sectors(self) -> int:
        """virtio-blk capacity: always in 512-byte sectors."""
        return self.size // SECTOR_SIZE

    @property
    def serial_text(self) -> str:
        return self.serial.rstrip(b"\0").decode("ascii")

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def reach(self) -> int:
        """Bytes from the window's start that any operation may touch (see the module doc)."""
        return self.size if self.ranged else UNBOUNDED - self.start


def info_to_dict(info: BackingInfo) -> dict:
    """``info`` as plain JSON-able data (for a worker's command line)."""
    d = {f: getattr(info, f) for f in info.__dataclass_fields__}
    d["serial"] = info.serial.hex()
    return d


def info_from_dict(d: dict) -> BackingInfo:
    return BackingInfo(**{**d, "serial": bytes.fromhex(d["serial"])})


def status_for(op: int, err: int) -> int:
    """What the guest is told when ``op`` ended with ``err`` (0: done): UNSUPP for a discard
    the store cannot do, IOERR for any other failure."""
    if not err:
        return BlkStatus.OK
    if op == Op.DISCARD and err in (errno.EOPNOTSUPP, errno.ENOTTY):
        return BlkStatus.UNSUPP
    return BlkStatus.IOERR


class Backing(ABC):
    """One open window of a store. Offsets count from the window's start."""

    blocking = True      # its calls block: served from worker processes (else in-process)
    caches = False       # read_cached can answer (the data path asks it before a worker)
    writes_durable = False   # a completed write is durable already (no flush needed after it)
    takes_pieces = False     # submit_pieces takes guest-memory addresses (no memoryviews)

    def __init__(self, info: BackingInfo) -> None:
        self.info = info
        self.reach = info.reach
        self._efd = -1                 # completion eventfd of the submitted path, made on demand
        self._done: list[tuple[int, int]] = []

    # -- the window ----------------------------------------------------------------------
    def check_window(self, offset: int, length: int, write: bool) -> None:
        """OSError (EINVAL outside the window, EBADF writing a read-only one) unless the
        operation may run; the operations call it themselves, and a caller with several
        ranges calls it for all of them before running any."""
        if offset < 0 or length < 0 or offset + length > self.reach:
            raise OSError(errno.EINVAL, f"bytes {offset}+{length} are outside the window "
                                        f"(0..{self.reach})")
        if write and self.info.readonly:
            raise OSError(errno.EBADF, "the window is read-only")

    # -- blocking operations ---------------------------------------------------------------
    def readv(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill ``bufs`` (in order) from ``offset``; every byte or OSError."""
        self.check_window(offset, sum(len(b) for b in bufs), False)
        self._readv(offset, bufs)

    def writev(self, offset: int, bufs: list[memoryview]) -> None:
        """Write ``bufs`` (in order) at ``offset``; every byte or OSError. Durable only after
        a later ``flush``."""
        self.check_window(offset, sum(len(b) for b in bufs), True)
        self._writev(offset, bufs)

    def flush(self) -> None:
        """Make every write that completed before this call durable."""
        if not self.info.readonly:
            self._flush()

    def discard(self, offset: int, length: int) -> None:
        """Let the store drop ``length`` bytes at ``offset``; what they read back as after
        is the store's business. OSError(EOPNOTSUPP) if it cannot discard."""
        self.check_window(offset, length, True)
        self._discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make ``length`` bytes at ``offset`` read back as zeroes; ``unmap``: the space may be
        deallocated while doing so (never required)."""
        self.check_window(offset, length, True)
        self._write_zeroes(offset, length, unmap)

    def read_cached(self, offset: int, bufs: list[memoryview]) -> bool:
        """Fill ``bufs`` from a cache without ever blocking; False (nothing promised, the
        buffers may hold anything) when it cannot."""
        return False

    @abstractmethod
    def _readv(self, offset: int, bufs: list[memoryview]) -> None: ...

    @abstractmethod
    def _writev(self, offset: int, bufs: list[memoryview]) -> None: ...

    @abstractmethod
    def _flush(self) -> None: ...

    @abstractmethod
    def _discard(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    # -- submitted operations ----------------------------------------------------------------
    @property
    def completion_fd(self) -> int:
        """An eventfd that is readable while ``reap`` has results."""
        if self._efd < 0:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return self._efd

    def submit(self, tag: int, op: Op, offset: int = 0, bufs: list[memoryview] = (),
               length: int = 0, unmap: bool = False) -> None:
        """Start ``op`` (READ/WRITE into/from ``bufs``, FLUSH, DISCARD/WRITE_ZEROES of
        ``length`` bytes); its ``(tag, errno)`` comes out of ``reap``. Never raises for the
        operation itself: a failure is its errno. This default runs it now."""
        try:
            if op == Op.READ:
                self.readv(offset, list(bufs))
            elif op == Op.WRITE:
                self.writev(offset, list(bufs))
            elif op == Op.FLUSH:
                self.flush()
            elif op == Op.DISCARD:
                self.discard(offset, length)
            elif op == Op.WRITE_ZEROES:
                self.write_zeroes(offset, length, unmap)
            else:
                raise OSError(errno.EINVAL, f"unknown operation {op}")
            err = 0
        except OSError as exc:
            err = exc.errno or errno.EIO
        self._done.append((tag, err))
        os.eventfd_write(self.completion_fd, 1)

    def submit_pieces(self, tag: int, op: Op, offset: int, pieces, memory) -> None:
        """``submit`` of a READ or WRITE whose buffers are (region, offset, length) pieces of
        ``memory`` (a GuestMemory), for backings that hand addresses to a C library
        (``takes_pieces``): no memoryview per request."""
        raise NotImplementedError

    def reap(self) -> list[tuple[int, int]]:
        """The ``(tag, errno)`` of every submitted operation finished since the last call."""
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass
        done, self._done = self._done, []
        return done

    # -- size ------------------------------------------------------------------------------
    @abstractmethod
    def resize_limit(self) -> tuple[int, str]:
        """The most bytes a live resize may show the guest now, and what sets that bound
        (for the operator's message)."""

    def resize_window(self, old_size: int, new_size: int) -> None:  # noqa: B027 (optional)
        """The window now spans ``new_size`` bytes (ResizeRefused if it cannot: nothing
        changed). The default has nothing to move."""

    # -- the write lock, handed over in a live migration ---------------------------------------
    def release_window(self) -> None:
        """Give up the window's lock (a migration's source, once its rings stopped); reads and
        writes must not follow until ``take_window``."""
        raise NotImplementedError

    def take_window(self) -> None:
        """Take the window's lock (a migration's destination, when its rings start; a source
        whose migration was cancelled); ConfigError if another holds it."""
        raise NotImplementedError

    # -- processes -------------------------------------------------------------------------
    def handoff(self) -> tuple[dict, list[int]]:
        """(description, fds) from which ``vblk.backing.attach`` rebuilds this backing in a
        worker process."""
        raise NotImplementedError(f"a {self.info.kind} backing cannot be used from another process")

    def close(self) -> None:
        """Release the store (and its lock). Safe to call twice."""
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
