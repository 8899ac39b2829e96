"""A worker process's loop: take slot numbers, execute them, report them.

The worker maps the same slot memfd and guest-memory fds as the supervisor (the memory
arrives on its control socket, msgpack + SCM_RIGHTS, whenever a table changes) and holds
the backings the supervisor handed off (vblk.backing.attach). A supervisor serving several
disks shares its workers among them: each slot names its disk, and the worker keeps one
backing and one memory table (with its own generation) per disk; a disk added at run time
arrives as a control message with its backing's fd, and one removed goes with another
(vblk.ipc). It waits on two fds: the control socket and its submission pipe. Slot numbers
arrive in batches; it runs them in order and returns all the finished numbers in one write
to the completion pipe.

Group commit (write-through): the writes of a batch that must be durable (FLAG_SYNC) are all
made first, then one ``flush`` per disk they went to covers every one of them -- each
finished before it started -- and only after those return is any slot of the batch marked
DONE and reported. A failed flush fails every write it was to cover (that disk's only).
Durability is the same as one flush per write; the cost is one per disk per batch.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket

from vblk import ipc
from vblk.backing import Backing, attach
from vblk.ipc import SlotArea
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.constants import BlkStatus
from vblk.workers.execute import execute

log = logging.getLogger("vblk.worker")


class Worker:
    def __init__(self, index: int, disks: dict[int, Backing] | Backing, slots: SlotArea,
                 submit_fd: int, complete_fd: int, control: socket.socket) -> None:
        """``disks``: disk number -> its backing (a lone backing is disk 0)."""
        self.index = index
        self.disks = disks if isinstance(disks, dict) else {0: disks}
        self.slots = slots
        self.submit_fd = submit_fd
        self.complete_fd = complete_fd
        self.control = control
        self.memories: dict[int, GuestMemory] = {}     # disk number -> its table

    def backing_for(self, disk: int) -> Backing:
        """Disk ``disk``'s backing (OSError if this worker was not given that disk). A disk
        added at run time was announced on the control socket before its first slot was
        written (vblk.ipc): what is waiting there is read first, without blocking."""
        backing = self.disks.get(disk)
        while backing is None and select.select([self.control], [], [], 0)[0]:
            if not self.handle_control():
                break
            backing = self.disks.get(disk)
        if backing is None:
            raise OSError(errno.ENODEV, f"slot for disk {disk}, which this worker does not have")
        return backing

    # -- control -------------------------------------------------------------------------
    def handle_control(self) -> bool:
        """Apply one control message; False when the supervisor is gone or says stop."""
        msg, fds = ipc.recv_control(self.control)
        try:
            if msg is None or msg.get("op") == "stop":
                return False
            op, disk = msg.get("op"), msg.get("disk", 0)
            if op == "memory":
                descs = [MemRegion(*r) for r in msg["regions"]]
                new = GuestMemory.from_fds(descs, fds, msg["generation"])
                old = self.memories.get(disk)
                if old is not None:
                    old.close()
                self.memories[disk] = new
            elif op == "disk-add":
                self.disks[disk] = attach(ipc.received_backing(msg, fds))
                fds = []                              # the backing owns its fd now
                log.info("event=disk_added worker=%d disk=%d", self.index, disk)
            elif op == "disk-remove":
                self.remove_disk(disk)
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def remove_disk(self, disk: int) -> None:
        """Close disk ``disk``'s backing and its memory table (nothing of it is in flight)."""
        backing = self.disks.pop(disk, None)
        if backing is not None:
            backing.close()
        memory = self.memories.pop(disk, None)
        if memory is not None:
            memory.close()
        log.info("event=disk_removed worker=%d disk=%d", self.index, disk)

    def _generation(self, disk: int) -> int:
        memory = self.memories.get(disk)
        return 0 if memory is None else memory.generation

    def memory_for(self, disk: int, generation: int) -> GuestMemory | None:
        """Disk ``disk``'s table of ``generation``, waiting for it if the supervisor's message
        is still on its way (it sends a new table before any slot that uses it)."""
        while self._generation(disk) < generation:
            if not self.handle_control():
                return None
        memory = self.memories.get(disk)
        return memory if memory is not None and memory.generation == generation else None

    # -- I/O -----------------------------------------------------------------------------
    def run_batch(self, batch: array.array) -> None:
        """Run a batch of slots, group-commit its durable writes, then mark them all DONE."""
        slots = self.slots
        disks = [slots.disk(i) for i in batch]
        results = [execute(slots, i, self.index, self.backing_for, self.memory_for)
                   for i in batch]
        for disk in sorted({d for d, (_, _, sync) in zip(disks, results) if sync}):
            try:
                self.disks[disk].flush()
            except OSError as exc:
                err = exc.errno or errno.EIO
                log.warning("event=io_error worker=%d disk=%d op=flush error=%s", self.index,
                            disk, quote(repr(exc)))
                results = [(BlkStatus.IOERR, err, False) if r[2] and d == disk else r
                           for d, r in zip(disks, results)]
        for i, (status, err, _) in zip(batch, results):
            slots.finish(i, status, err)

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
