"""One slot, executed against the backing: the only place in a worker where a store's errors
become virtio-blk statuses (through ``vblk.backing.status_for``).

Reads and writes move data straight between the store and guest memory (the slot's records
are (region, offset, length) pieces of the worker's own mapping of the same memfds).
Discard and write-zeroes records are byte ranges of the disk instead (vblk.ipc); they are
decoded and refused whole if any breaks the encoding. The window itself -- that no offset
reaches outside the disk -- is the backing's own check (vblk.backing.base).

A write-through write (FLAG_SYNC) is not made durable here: ``execute`` says it needs the
batch's flush (see vblk.workers.loop, group commit). Discard and write-zeroes with FLAG_SYNC
too.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from vblk.backing import Backing, status_for
from vblk.ipc import FLAG_SYNC, FLAG_UNMAP, MAX_IOV, Op, SlotArea, decode_ranges
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.virtio.constants import BlkStatus

log = logging.getLogger("vblk.worker")


def execute(slots: SlotArea, i: int, worker: int, backing_for: Callable[[int], Backing],
            memory_for: Callable[[int, int], GuestMemory | None]) -> tuple[int, int, bool]:
    """Run slot ``i``; (status, errno, needs the batch's flush of the slot's disk).
    ``backing_for(disk)`` is the slot's disk (OSError if unknown), ``memory_for(disk,
    generation)`` the guest memory its pieces refer to (None: that table never came). The
    slot is not marked DONE here."""
    disk = slots.disk(i)
    op, flags, offset, length, gen, iovs = slots.take(i, worker)
    try:
        backing = backing_for(disk)
        if op == Op.READ or op == Op.WRITE:
            if len(iovs) > MAX_IOV or sum(n for _, _, n in iovs) != length:
                raise OSError(errno.EINVAL, "slot iovecs do not add up")
            memory = memory_for(disk, gen)
            if memory is None:
                raise OSError(errno.ESTALE, f"slot for disk {disk}'s memory generation {gen} "
                                            f"the worker never got")
            bufs = memory.iovecs(iovs)
            try:
                if op == Op.READ:
                    backing.readv(offset, bufs)
                else:
                    backing.writev(offset, bufs)
            finally:
                for b in bufs:
                    b.release()
            return BlkStatus.OK, 0, op == Op.WRITE and bool(flags & FLAG_SYNC)
        if op == Op.FLUSH:
            backing.flush()
            return BlkStatus.OK, 0, False
        if op == Op.DISCARD or op == Op.WRITE_ZEROES:
            try:
                ranges = decode_ranges(offset, length, iovs)
            except ValueError as exc:
                raise OSError(errno.EINVAL, str(exc)) from None
            for off, n in ranges:             # all of them refused, or none
                backing.check_window(off, n, True)
            for off, n in ranges:
                if op == Op.DISCARD:
                    backing.discard(off, n)
                else:
                    backing.write_zeroes(off, n, bool(flags & FLAG_UNMAP))
            return BlkStatus.OK, 0, bool(flags & FLAG_SYNC)
        raise OSError(errno.EINVAL, f"unknown op {op}")
    except (OSError, IndexError, ValueError) as exc:
        err = getattr(exc, "errno", None) or errno.EIO
        status = status_for(op, err)
        if status == BlkStatus.UNSUPP:
            log.warning("event=discard_unsupported worker=%d error=%s", worker, quote(repr(exc)))
        else:
            log.warning("event=io_error worker=%d disk=%d slot=%d op=%d offset=%d length=%d "
                        "error=%s", worker, disk, i, op, offset, length, quote(repr(exc)))
        return status, err, False
