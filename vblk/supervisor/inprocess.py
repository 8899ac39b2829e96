"""The in-process I/O engine: slots run through the backing's submitted operations.

For a backing whose I/O completes elsewhere -- on librbd's threads, say -- worker processes
would only add a hop: the supervisor submits each slot's operation itself
(``Backing.submit``) and the backing's completion eventfd, watched by the event loop, brings
the results back (``reap``). Nothing here blocks unless the backing's ``submit`` does: the
default ``Backing.submit`` runs the blocking call at once, which makes this engine the fake
pool of in-process tests (a memory backing: the whole data path, no processes).

A slot's life here: ``flush`` takes every posted slot (``SlotArea.take``, as a worker would),
turns it into one submitted operation per range (discard, write-zeroes) or one per buffer
list (read, write), or a flush; ``reap`` collects the parts, and when the last part of a
write-through write (or discard / write-zeroes) is done, submits the flush that makes it
durable before the slot is finished -- unless the backing's completed writes are durable
already (``Backing.writes_durable``: librbd without its cache). A slot whose records do not
add up, or whose memory generation is not the current one, is finished with IOERR without
touching the backing.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from vblk.backing import Backing, status_for
from vblk.ipc import FLAG_SYNC, FLAG_UNMAP, MAX_IOV, Op, SlotArea, decode_ranges
from vblk.memory import GuestMemory
from vblk.virtio.constants import BlkStatus

log = logging.getLogger("vblk.supervisor")


@dataclass(slots=True)
class _Running:
    op: int
    flags: int
    parts: int                       # submitted operations not yet reaped
    err: int = 0                     # the first failure among them
    flushing: bool = False           # the durability flush is what is running now
    views: list = field(default_factory=list)


class InProcessEngine:
    def __init__(self, backing: Backing, slots: SlotArea) -> None:
        self.backing = backing
        self.slots = slots
        self.completion_fd = backing.completion_fd
        self.memory = GuestMemory.empty()
        self.posted: list[int] = []
        self.running: dict[int, _Running] = {}
        self.done: list[int] = []

    def post(self, slot: int, durable_write: bool) -> None:
        self.posted.append(slot)

    def flush(self) -> None:
        posted, self.posted = self.posted, []
        for slot in posted:
            self._start_slot(slot)

    def _start_slot(self, slot: int) -> None:
        op, flags, offset, length, gen, iovs = self.slots.take(slot, 0)
        try:
            if op in (Op.DISCARD, Op.WRITE_ZEROES):
                try:
                    ranges = decode_ranges(offset, length, iovs)
                except ValueError as exc:
                    raise OSError(errno.EINVAL, str(exc)) from None
                for off, n in ranges:             # all of them refused, or none
                    self.backing.check_window(off, n, True)
                self.running[slot] = _Running(op, flags, len(ranges))
                for off, n in ranges:
                    self.backing.submit(slot, Op(op), off, length=n, unmap=bool(flags & FLAG_UNMAP))
            elif op == Op.FLUSH:
                self.running[slot] = _Running(op, flags, 1)
                self.backing.submit(slot, Op.FLUSH)
            elif op in (Op.READ, Op.WRITE):
                if gen != self.memory.generation:
                    raise OSError(errno.ESTALE, f"slot for memory generation {gen}, "
                                                f"engine has {self.memory.generation}")
                if len(iovs) > MAX_IOV or sum(n for _, _, n in iovs) != length:
                    raise OSError(errno.EINVAL, "slot iovecs do not add up")
                views = self.memory.iovecs(iovs)
                self.running[slot] = _Running(op, flags, 1, views=views)
                self.backing.submit(slot, Op(op), offset, views)
            else:
                raise OSError(errno.EINVAL, f"unknown op {op}")
        except (OSError, IndexError) as exc:
            err = getattr(exc, "errno", None) or errno.EIO
            log.warning("event=io_error engine=inprocess slot=%d op=%d error=%r", slot, op, exc)
            self.running.pop(slot, None)
            self.slots.finish(slot, BlkStatus.IOERR, err)
            self.done.append(slot)
            os.eventfd_write(self.completion_fd, 1)        # the loop comes to reap it

    def reap(self) -> list[int]:
        for slot, err in self.backing.reap():
            run = self.running.get(slot)
            if run is None:
                continue
            run.parts -= 1
            run.err = run.err or err
            if run.parts:
                continue
            if (not run.flushing and not run.err and run.flags & FLAG_SYNC
                    and run.op in (Op.WRITE, Op.DISCARD, Op.WRITE_ZEROES)
                    and not self.backing.writes_durable):
                run.flushing = True          # durable before it completes
                run.parts = 1
                self.backing.submit(slot, Op.FLUSH)
                continue
            del self.running[slot]
            for v in run.views:
                v.release()
            self.slots.finish(slot, status_for(run.op, run.err), run.err)
            self.done.append(slot)
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
