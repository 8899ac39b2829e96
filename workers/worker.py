"""A worker process: takes ioreq slots, does the I/O straight into or out of guest memory.

The worker maps the same guest-memory fds as the supervisor (sent over its control socket with
SCM_RIGHTS, msgpack-encoded, whenever the memory table changes) and the same slot memfd. It
waits on two fds: the control socket and its submission pipe. Slot numbers arrive in batches;
it runs them in order and returns all the finished numbers in one write to the completion pipe.

Group commit (write-through): the writes of a batch that must be durable (FLAG_SYNC) are all
made first, then one ``fdatasync`` covers every one of them -- each finished before it started
-- and only after it returns is any slot of the batch marked DONE and reported. A failed
fdatasync fails every write it was to cover. Durability is the same as one fdatasync per
write; the cost is one per batch.

Discard and write-zeroes slots carry byte ranges of the backing store instead of guest
buffers (see vblk.slots); the worker checks them against the window it was started with
before ``workers.zeroing`` touches anything.

Errors never leave a slot hanging: an OSError (or a slot that refers to memory the worker does
not have) becomes IOERR with the errno recorded for the supervisor's log.
"""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import stat

import msgpack

from vblk.memory import GuestMemory
from vblk.slots import FLAG_SYNC, FLAG_UNMAP, MAX_IOV, SlotArea, decode_ranges
from vblk.vhost_user.messages import MemRegion
from vblk.device import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES
from vblk.virtio.constants import BlkStatus
from vblk.workers import zeroing

log = logging.getLogger("vblk.worker")

CONTROL_MAX = 65536
MAX_CONTROL_FDS = 64
BATCH = 256


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the supervisor goes, so no worker is ever orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def recv_control(sock: socket.socket) -> tuple[dict | None, list[int]]:
    msg, fds, _flags, _ = socket.recv_fds(sock, CONTROL_MAX, MAX_CONTROL_FDS)
    if not msg:
        return None, fds
    return msgpack.unpackb(msg), fds


class Worker:
    def __init__(self, index: int, backing_fd: int, slots: SlotArea, submit_fd: int,
                 complete_fd: int, control: socket.socket,
                 window: tuple[int, int] | None = None) -> None:
        self.index = index
        self.fd = backing_fd
        self.window = window              # [start, end) bytes discard/write-zeroes may touch
        self.block_device = stat.S_ISBLK(os.fstat(backing_fd).st_mode)
        self.slots = slots
        self.submit_fd = submit_fd
        self.complete_fd = complete_fd
        self.control = control
        self.memory = GuestMemory.empty()
        self.direct = bool(fcntl.fcntl(backing_fd, fcntl.F_GETFL) & os.O_DIRECT)

    # -- control -------------------------------------------------------------------------
    def handle_control(self) -> bool:
        """Apply one control message; False when the supervisor is gone or says stop."""
        msg, fds = recv_control(self.control)
        try:
            if msg is None or msg.get("op") == "stop":
                return False
            if msg.get("op") == "memory":
                descs = [MemRegion(*r) for r in msg["regions"]]
                new = GuestMemory.from_fds(descs, fds, msg["generation"])
                self.memory.close()
                self.memory = new
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def wait_for_generation(self, generation: int) -> bool:
        while self.memory.generation < generation:
            if not self.handle_control():
                return False
        return True

    # -- I/O -----------------------------------------------------------------------------
    def execute(self, i: int) -> tuple[int, int, bool]:
        """Run slot i; returns (status, errno, durable write awaiting the batch's fdatasync).
        The slot is not marked DONE here (see ``run_batch``)."""
        op, flags, offset, length, gen, iovs = self.slots.take(i, self.index)
        status, err, needs_sync = BlkStatus.OK, 0, False
        try:
            if op in (OP_DISCARD, OP_WRITE_ZEROES):        # no guest memory involved
                status = self._zeroing(op, flags, offset, length, iovs)
                needs_sync = status == BlkStatus.OK and bool(flags & FLAG_SYNC)
            else:
                needs_sync = self._memory_io(op, flags, offset, length, gen, iovs)
        except (OSError, IndexError, ValueError) as exc:
            status = BlkStatus.IOERR
            err = getattr(exc, "errno", None) or errno.EIO
            log.warning("event=io_error worker=%d slot=%d op=%d offset=%d length=%d error=%r",
                        self.index, i, op, offset, length, exc)
        return status, err, needs_sync

    def run_batch(self, batch: array.array) -> None:
        """Run a batch of slots, group-commit its durable writes, then mark them all DONE."""
        results = [self.execute(i) for i in batch]
        if any(needs_sync for _, _, needs_sync in results):
            try:
                os.fdatasync(self.fd)
            except OSError as exc:
                err = exc.errno or errno.EIO
                log.warning("event=io_error worker=%d op=fdatasync error=%r", self.index, exc)
                results = [(BlkStatus.IOERR, err, False) if needs_sync else (status, e, False)
                           for status, e, needs_sync in results]
        for i, (status, err, _) in zip(batch, results):
            self.slots.finish(i, status, err)

    def _memory_io(self, op: int, flags: int, offset: int, length: int, gen: int,
                   iovs: list[tuple[int, int, int]]) -> bool:
        """Read, write or flush; True for a write that waits for the batch's fdatasync."""
        if gen != self.memory.generation and op != OP_FLUSH:
            # The supervisor sends a new memory table before any slot that uses it.
            if not self.wait_for_generation(gen) or gen != self.memory.generation:
                raise OSError(errno.ESTALE, f"slot for memory generation {gen}, "
                              f"worker has {self.memory.generation}")
        if len(iovs) > MAX_IOV or sum(n for _, _, n in iovs) != length:
            raise OSError(errno.EINVAL, "slot iovecs do not add up")
        if op == OP_READ:
            self._transfer(iovs, offset, write=False)
        elif op == OP_WRITE:
            self._transfer(iovs, offset, write=True)
            return bool(flags & FLAG_SYNC)
        elif op == OP_FLUSH:
            os.fdatasync(self.fd)
        else:
            raise OSError(errno.EINVAL, f"unknown op {op}")
        return False

    def _zeroing(self, op: int, flags: int, offset: int, length: int,
                 iovs: list[tuple[int, int, int]]) -> int:
        """Discard or zero the slot's ranges; the status (UNSUPP when the store cannot
        discard). Raises OSError (-> IOERR) for records that break the encoding or the window."""
        try:
            ranges = decode_ranges(offset, length, iovs)
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None
        if self.window is not None:
            start, end = self.window
            for off, n in ranges:
                if off < start or off + n > end:
                    raise OSError(errno.EINVAL, f"range {off}+{n} outside the window {start}..{end}")
        try:
            for off, n in ranges:
                if op == OP_DISCARD:
                    zeroing.discard(self.fd, self.block_device, off, n)
                else:
                    zeroing.write_zeroes(self.fd, self.block_device, off, n, bool(flags & FLAG_UNMAP))
        except OSError as exc:
            if op == OP_DISCARD and exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                log.warning("event=discard_unsupported worker=%d error=%r", self.index, exc)
                return BlkStatus.UNSUPP
            raise
        return BlkStatus.OK            # with FLAG_SYNC the batch's fdatasync covers it

    def _transfer(self, iovs: list[tuple[int, int, int]], offset: int, write: bool) -> None:
        bufs = self.memory.iovecs(iovs)
        try:
            try:
                _full_io(self.fd, bufs, offset, write)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                _bounced_io(self.fd, bufs, offset, write)
        finally:
            for b in bufs:
                b.release()

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> int:
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.submit_fd, select.POLLIN)
        ctl = self.control.fileno()
        while True:
            for fd, ev in poller.poll():
                if fd == ctl:
                    if not self.handle_control():
                        return 0
                elif fd == self.submit_fd:
                    data = os.read(self.submit_fd, 4 * BATCH)
                    if not data:
                        return 0
                    done = array.array("I")
                    done.frombytes(data)
                    self.run_batch(done)
                    os.write(self.complete_fd, done.tobytes())


def _full_io(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
    """preadv/pwritev until every byte moved (short transfers are continued, EOF is an error)."""
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


def _bounced_io(fd: int, bufs: list[memoryview], offset: int, write: bool) -> None:
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
            _full_io(fd, [view[:total]], offset, True)
        else:
            _full_io(fd, [view[:total]], offset, False)
            pos = 0
            for b in bufs:
                b[:] = view[pos:pos + len(b)]
                pos += len(b)
        view.release()
    finally:
        bounce.close()
