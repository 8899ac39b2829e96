"""A file disk's I/O through an io_uring: reads that miss the page cache and writes, without
a worker.

Theory of operation
-------------------
A write to a file without O_DIRECT is a copy into the page cache (and, in write-through, an
fdatasync). Through a worker it costs two wake-ups and two pipe writes besides the copy, and
the worker's Python per request; the supervisor cannot make the copy itself, because a
buffered write can block (dirty-page throttling, the journal) and ext4 refuses
``RWF_NOWAIT`` on one. An io_uring (vblk.uring) runs it on the kernel's own io-wq threads
instead: the supervisor writes one SQE per write pointing at the guest's buffers (the
addresses of its memory table, as for librbd), one ``io_uring_enter`` per drain sends them,
and the ring's eventfd, on the disk's loop, brings the completions back. Nothing the
supervisor calls blocks.

Reads come here when the page cache does not hold them (a hit is copied in the loop:
``Backing.read_cached``), and there the kernel needs no thread: a buffered read of ext4 or
XFS is started from ``io_uring_enter`` and finished when the page arrives
(``FMODE_BUF_RASYNC``), an O_DIRECT one (``nocache``) goes to the device the same way, and
the worker's hop and wake-ups are gone from the device's time (`vblk bench --compare --cold`,
4k random reads of a 1 GiB image the page cache does not hold, against qsd: QD1 1.27×, QD32
0.90×; through the workers 0.96× and 0.58×). On an O_DIRECT
disk the writes too need no thread; a buffered write is a copy into the page cache made by
io-wq (``writes`` counts those in flight: vblk.supervisor.loop, Polling gives way).

Durable writes (FLAG_SYNC: write-through) keep group commit: a drain's durable writes are
linked into one chain (IOSQE_IO_LINK: each starts when the one before it wrote every byte)
that ends with an fdatasync, so that fdatasync covers every one of them, and none completes
before it returned 0. The chain is queued as a whole at the drain's ``submit``, after the
drain's other requests, so nothing else falls inside it. Flushes, discards and zeroes keep
the workers. Nothing orders requests in flight against each other, and FLUSH covers what
has *completed* before it: a write reaped from the ring is in the page cache (or on the
device), where the worker's ``fdatasync`` finds it.

A request that is short or fails (ENOSPC, EIO, EINVAL for an O_DIRECT buffer that is not
aligned, anything), or a write whose chain's fdatasync did not return 0 (it failed, or was
cancelled because a write before it fell short), is not finished here: it is posted to the
workers whole, under the same slot, and the worker -- which moves every byte or says why,
bouncing misaligned O_DIRECT buffers, through the one place that turns a store's errors into
statuses (vblk.workers.execute) -- decides. Doing it twice is harmless: the guest's buffer
does not change before the request completes. The same goes for a request the ring has no
room for, or whose memory table is not the current one.

The guest memory the SQEs point at stays mapped while they run: the data path changes the
memory table only when no request is in flight (so does librbd's engine).
"""
from __future__ import annotations

import logging
import os

from vblk.backing.file import FileBacking
from vblk.ipc import FLAG_SYNC, Op, Pieces
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.uring import Ring
from vblk.virtio.constants import BlkStatus

log = logging.getLogger("vblk.supervisor")

_WRITE = int(Op.WRITE)
_READ = int(Op.READ)
_OK = int(BlkStatus.OK)


def ring_for(backing, slots: int) -> RingIO | None:
    """A RingIO for ``backing`` if it can take one: a regular file or block device (a
    read-only one's ring takes reads only: ``check_window`` refuses its writes, which the
    workers then refuse), on a machine and kernel with io_uring. ``VBLK_URING=0`` turns it
    off. None otherwise (logged)."""
    if not isinstance(backing, FileBacking):
        return None
    if os.environ.get("VBLK_URING", "1") == "0":
        return None
    try:
        ring = Ring(2 << max(slots - 1, 1).bit_length())    # writes and their fdatasyncs
    except OSError as exc:
        log.info("event=no_io_ring reason=%s", quote(str(exc)))
        return None
    return RingIO(backing, ring, direct=backing.direct)


_GROUP = 1 << 32          # the user data of a chain's fdatasync: _GROUP | its number


class RingIO:
    """One disk's reads (past the page cache) and writes on its own io_uring; see the
    module doc."""

    def __init__(self, backing: FileBacking, ring: Ring, direct: bool = False) -> None:
        self.backing = backing
        self.direct = direct                     # O_DIRECT: no io-wq thread for anything
        self.writes = 0                          # writes running (with FLAG_SYNC or not)
        self.ring = ring
        self.completion_fd = ring.event_fd
        self.memory = GuestMemory.empty()
        self.running: dict[int, tuple] = {}      # slot -> its request, as posted
        self.chain: list[tuple] = []             # this drain's durable writes (slot, at, iov)
        self.groups: dict[int, list[int]] = {}   # a chain's fdatasync tag -> its writes
        self.failed: set[int] = set()            # durable writes that did not write it all
        self._groups = 0

    def take(self, slot: int, op: int, flags: int, offset: int, length: int, pieces: Pieces,
             generation: int) -> bool:
        """Start the request if it is one this ring runs (at the next ``submit``); False: it
        is the workers'."""
        if op == _WRITE:
            write = True
        elif op == _READ:
            write = False
        else:
            return False
        # room for it, the chain's writes waiting for ``submit`` and the chain's fdatasync
        if generation != self.memory.generation or self.ring.space() - len(self.chain) < 2:
            return False
        backing = self.backing
        try:
            backing.check_window(offset, length, write)
        except OSError:
            return False                  # the worker refuses it, and says why
        self.running[slot] = (slot, op, flags, offset, length, pieces, generation)
        at, iov = backing.start + offset, self.memory.addresses(pieces)
        if not write:
            self.ring.readv(slot, backing.fd, at, iov)
            return True
        self.writes += 1
        if flags & FLAG_SYNC:
            self.chain.append((slot, at, iov))       # queued together at ``submit``
        else:
            self.ring.writev(slot, backing.fd, at, iov)
        return True

    def submit(self) -> None:
        """Send what was taken; the drain's durable writes go last, as one chain of linked
        writes that ends with the fdatasync covering them all (group commit, as a worker's
        batch)."""
        if self.chain:
            fd = self.backing.fd
            for slot, at, iov in self.chain:
                self.ring.writev(slot, fd, at, iov, link=True)
            self._groups += 1
            tag = _GROUP | self._groups
            self.ring.fdatasync(tag, fd)
            self.groups[tag] = [slot for slot, _, _ in self.chain]
            self.chain = []
        self.ring.submit()

    def reap(self) -> tuple[list[tuple[int, int, int]], list[tuple]]:
        """(slot, status, errno) of the requests done, and those to post to the workers
        instead (short or failed, or their chain's fdatasync did not succeed: see the module
        doc)."""
        done, redo = [], []
        running = self.running
        for tag, res in self.ring.completions():
            if tag & _GROUP:
                for slot in self.groups.pop(tag, ()):
                    request = running.pop(slot, None)
                    if request is None:
                        continue
                    self.writes -= 1
                    if res == 0 and slot not in self.failed:
                        done.append((slot, _OK, 0))
                    else:
                        self.failed.discard(slot)
                        redo.append(request)
                continue
            request = running.get(tag)
            if request is None:
                continue
            if request[1] == _WRITE and request[2] & FLAG_SYNC:    # its chain's fdatasync decides
                if res != request[4]:
                    self.failed.add(tag)
                continue
            del running[tag]
            if request[1] == _WRITE:
                self.writes -= 1
            if res == request[4]:
                done.append((tag, _OK, 0))
            else:
                redo.append(request)
        if redo:
            log.info("event=ring_requests_retried count=%d", len(redo))
        return done, redo

    def set_memory(self, memory: GuestMemory) -> None:
        self.memory = memory

    def close(self) -> None:
        self.ring.close()
