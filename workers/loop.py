"""A worker process's loop: take slot numbers, execute them, report them.

The worker maps the same slot memfd and guest-memory fds as the supervisor (the memory
arrives on its control socket, msgpack + SCM_RIGHTS, whenever the table changes) and holds
the backing the supervisor handed off (vblk.backing.attach). It waits on two fds: the control
socket and its submission pipe. Slot numbers arrive in batches; it runs them in order and
returns all the finished numbers in one write to the completion pipe.

Group commit (write-through): the writes of a batch that must be durable (FLAG_SYNC) are all
made first, then one ``flush`` covers every one of them -- each finished before it started --
and only after it returns is any slot of the batch marked DONE and reported. A failed flush
fails every write it was to cover. Durability is the same as one flush per write; the cost is
one per batch.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket

from vblk import ipc
from vblk.backing import Backing
from vblk.ipc import SlotArea
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.constants import BlkStatus
from vblk.workers.execute import execute

log = logging.getLogger("vblk.worker")


class Worker:
    def __init__(self, index: int, backing: Backing, slots: SlotArea, submit_fd: int,
                 complete_fd: int, control: socket.socket) -> None:
        self.index = index
        self.backing = backing
        self.slots = slots
        self.submit_fd = submit_fd
        self.complete_fd = complete_fd
        self.control = control
        self.memory = GuestMemory.empty()

    # -- control -------------------------------------------------------------------------
    def handle_control(self) -> bool:
        """Apply one control message; False when the supervisor is gone or says stop."""
        msg, fds = ipc.recv_control(self.control)
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

    def memory_for(self, generation: int) -> GuestMemory | None:
        """The table of ``generation``, waiting for it if the supervisor's message is still
        on its way (it sends a new table before any slot that uses it)."""
        while self.memory.generation < generation:
            if not self.handle_control():
                return None
        return self.memory if self.memory.generation == generation else None

    # -- I/O -----------------------------------------------------------------------------
    def run_batch(self, batch: array.array) -> None:
        """Run a batch of slots, group-commit its durable writes, then mark them all DONE."""
        results = [execute(self.slots, i, self.index, self.backing, self.memory_for)
                   for i in batch]
        if any(needs_flush for _, _, needs_flush in results):
            try:
                self.backing.flush()
            except OSError as exc:
                err = exc.errno or errno.EIO
                log.warning("event=io_error worker=%d op=flush error=%s", self.index,
                            quote(repr(exc)))
                results = [(BlkStatus.IOERR, err, False) if needs_flush else (status, e, False)
                           for status, e, needs_flush in results]
        for i, (status, err, _) in zip(batch, results):
            self.slots.finish(i, status, err)

    # -- loop ----------------------------------------------------------------------------
    def run(self) -> int:
        ipc.send_control(self.control, ipc.READY)
        poller = select.poll()
        poller.register(self.control, select.POLLIN)
        poller.register(self.submit_fd, select.POLLIN)
        ctl = self.control.fileno()
        while True:
            for fd, _ev in poller.poll():
                if fd == ctl:
                    if not self.handle_control():
                        return 0
                elif fd == self.submit_fd:
                    data = os.read(self.submit_fd, ipc.SLOT_NUMBER * ipc.PIPE_BATCH)
                    if not data:
                        return 0
                    done = ipc.unpack_slots(data)
                    self.run_batch(done)
                    os.write(self.complete_fd, done.tobytes())
