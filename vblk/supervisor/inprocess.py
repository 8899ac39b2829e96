"""The in-process I/O engine: requests run through the backing's submitted operations.

For a backing whose I/O completes elsewhere -- on librbd's threads, say -- worker processes
would only add a hop: the supervisor submits each request's operation itself
(``Backing.submit``, or ``Backing.submit_pieces`` when the backing takes guest-memory
addresses directly) and the backing's completion eventfd, watched by the event loop, brings
the results back (``reap``). Nothing here blocks unless the backing's ``submit`` does: the
default ``Backing.submit`` runs the blocking call at once, which makes this engine the fake
pool of in-process tests (a memory backing: the whole data path, no processes).

No shared-memory slot is involved: the slot number is only the request's name. ``flush``
starts every posted request: one submitted operation per range (discard, write-zeroes), one
per buffer list (read, write), or a flush; ``reap`` collects the parts, and when the last part
of a write-through write (or discard / write-zeroes) is done, submits the flush that makes it
durable before the request is finished -- unless the backing's completed writes are durable
already (``Backing.writes_durable``: librbd without its cache). A request for a memory table
the engine does not have is finished with IOERR without touching the backing.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from vblk.backing import Backing, status_for
from vblk.ipc import FLAG_SYNC, FLAG_UNMAP, Op, Pieces
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.virtio.constants import BlkStatus

log = logging.getLogger("vblk.supervisor")

_READ, _WRITE, _FLUSH = int(Op.READ), int(Op.WRITE), int(Op.FLUSH)
_DISCARD, _WRITE_ZEROES = int(Op.DISCARD), int(Op.WRITE_ZEROES)


@dataclass(slots=True)
class _Running:
    op: int
    flags: int
    parts: int                       # submitted operations not yet reaped
    err: int = 0                     # the first failure among them
    flushing: bool = False           # the durability flush is what is running now
    views: list = field(default_factory=list)


class InProcessEngine:
    def __init__(self, backing: Backing) -> None:
        self.backing = backing
        self.completion_fd = backing.completion_fd
        self.memory = GuestMemory.empty()
        self.posted: list[tuple] = []
        self.running: dict[int, _Running] = {}
        self.done: list[tuple[int, int, int]] = []
        self.pieces_direct = backing.takes_pieces     # addresses, no memoryviews
        self.flush_writes = not backing.writes_durable

    def post(self, slot: int, op: int, flags: int, offset: int, length: int, pieces: Pieces,
             generation: int) -> None:
        self.posted.append((slot, op, flags, offset, length, pieces, generation))

    def flush(self) -> None:
        if self.posted:
            posted, self.posted = self.posted, []
            for request in posted:
                self._start(*request)

    def _start(self, slot: int, op: int, flags: int, offset: int, length: int, pieces: Pieces,
               generation: int) -> None:
        backing = self.backing
        try:
            if op == _READ or op == _WRITE:
                memory = self.memory
                if generation != memory.generation:
                    raise OSError(errno.ESTALE, f"request for memory generation {generation}, "
                                                f"engine has {memory.generation}")
                if self.pieces_direct:
                    self.running[slot] = _Running(op, flags, 1)
                    backing.submit_pieces(slot, op, offset, pieces, memory)
                else:
                    views = memory.iovecs(pieces)
                    self.running[slot] = _Running(op, flags, 1, views=views)
                    backing.submit(slot, Op(op), offset, views)
            elif op == _DISCARD or op == _WRITE_ZEROES:
                ranges = [(off, n) for _, off, n in _ranges(pieces)]
                for off, n in ranges:             # all of them refused, or none
                    backing.check_window(off, n, True)
                self.running[slot] = _Running(op, flags, len(ranges))
                for off, n in ranges:
                    backing.submit(slot, Op(op), off, length=n, unmap=bool(flags & FLAG_UNMAP))
            elif op == _FLUSH:
                self.running[slot] = _Running(op, flags, 1)
                backing.submit(slot, Op.FLUSH)
            else:
                raise OSError(errno.EINVAL, f"unknown op {op}")
        except (OSError, IndexError) as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            log.warning("event=io_error engine=inprocess slot=%d op=%d error=%s", slot, op,
                        quote(repr(exc)))
            run = self.running.pop(slot, None)
            if run is not None:
                for v in run.views:
                    v.release()
            self.done.append((slot, BlkStatus.IOERR, err))
            os.eventfd_write(self.completion_fd, 1)        # the loop comes to reap it

    def reap(self) -> list[tuple[int, int, int]]:
        running = self.running
        for slot, err in self.backing.reap():
            run = running.get(slot)
            if run is None:
                continue
            run.parts -= 1
            if err and not run.err:
                run.err = err
            if run.parts:
                continue
            if (not run.flushing and not run.err and run.flags & FLAG_SYNC and self.flush_writes
                    and run.op != _READ and run.op != _FLUSH):
                run.flushing = True          # durable before it completes
                run.parts = 1
                self.backing.submit(slot, Op.FLUSH)
                continue
            del running[slot]
            for v in run.views:
                v.release()
            self.done.append((slot, status_for(run.op, run.err), run.err))
        done, self.done = self.done, []
        return done

    def set_memory(self, memory: GuestMemory, regions: list[list[int]], fds: list[int]) -> None:
        self.memory = memory

    def start(self) -> None:
        """Nothing to start: the backing is open."""

    def attach(self, loop) -> None:
        """Nothing to watch besides the completion fd (the data path watches that)."""

    def stop(self) -> None:
        """Nothing runs here once the data path has waited for its requests."""

    def close(self) -> None:
        pass


def _ranges(pieces: Pieces) -> Pieces:
    """A discard / write-zeroes request's pieces are (RANGE_REGION, offset, sectors) records
    (vblk.ipc.encode_ranges): as (region, byte offset, bytes)."""
    from vblk.ipc import RANGE_UNIT
    return [(region, off, sectors * RANGE_UNIT) for region, off, sectors in pieces]
