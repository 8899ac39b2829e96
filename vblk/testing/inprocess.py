"""The supervisor's data path in one process, for fast tests: no socket, no worker process.

``InProcessDisk`` assembles what ``vblk serve`` assembles for a connected frontend -- a
``DataPath`` over a ``BlkDevice``, a backing and the in-process engine (the fake pool), guest
RAM in a memfd mapped the way the session maps it, one split ring per queue -- and plays the
guest's driver on the other side (vblk.testing.driver). ``submit`` puts requests on a ring,
``run`` kicks and then serves the engine's completions the way the event loop would, until
the driver has every answer back.

The backing defaults to a ``MemoryBacking``; a test may pass any other (a file, say) as long
as its ``submit`` completes through ``completion_fd``.
"""
from __future__ import annotations

import itertools
import os
import select
import time
from dataclasses import dataclass

from vblk.backing import Backing
from vblk.backing.memory import MemoryBacking, drop_store
from vblk.device import BlkDevice, DiscardLimits, Geometry
from vblk.memory import GuestMemory
from vblk.ratelimit import Limiter, Limits
from vblk.stats import Stats
from vblk.supervisor.datapath import DataPath
from vblk.supervisor.inprocess import InProcessEngine
from vblk.testing.driver import Allocator, RingLayout, SplitDriver
from vblk.testing.frontend import GuestRam
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import BlkType
from vblk.virtio.ring import SplitRing

MiB = 1 << 20
STATUS_UNSET = 0xFF


@dataclass
class Answer:
    tag: int
    queue: int
    status: int
    used_len: int
    data: bytes = b""


class InProcessDisk:
    def __init__(self, *, size: int = 8 * MiB, queues: int = 1, slots: int = 64,
                 queue_size: int = 128, writeback: bool = False, backing: Backing | None = None,
                 limits: Limits = Limits(), discard: DiscardLimits | None = None,
                 inline_reads: bool = False) -> None:
        self._store = None
        if backing is None:
            self._store = f"inprocess-{id(self)}"
            backing = MemoryBacking.open(self._store, size=size, writeback=writeback)
        self.backing = backing
        info = backing.info
        self.device = BlkDevice(Geometry(info.size, info.logical_block_size,
                                         info.physical_block_size, info.readonly, info.serial),
                                writeback=info.writeback, num_queues=queues, discard=discard)
        self.stats = Stats(queues)
        self.slots = slots
        self.engine = InProcessEngine(backing)
        self.data = DataPath(self.device, backing, slots, self.stats,
                             Limiter(limits, now=time.monotonic()), inline_reads=inline_reads)
        self.data.engine = self.engine
        self.broken: list[int] = []
        self.data.on_broken = self.broken.append
        # guest RAM: rings first, then buffers
        self.ram = GuestRam(16)
        self.memory = GuestMemory.from_fds(self.ram.regions, [self.ram.fd], 1)
        self.data.memory = self.memory
        self.engine.set_memory(self.memory, [], [])
        self.allocator = Allocator(MiB, self.ram.size - MiB)
        self.drivers: list[SplitDriver] = []
        self.calls: list[int] = []
        gpa = 0
        for q in range(queues):
            layout = RingLayout.at(gpa, queue_size)
            gpa = layout.end
            driver = SplitDriver(self.ram.view, layout, allocator=self.allocator)
            self.drivers.append(driver)
            u = self.ram.uva
            self.data.rings[q] = SplitRing(self.memory, queue_size, u(layout.desc),
                                           u(layout.avail), u(layout.used), last_avail_idx=0,
                                           indirect=True, event_idx=False)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.calls.append(call)
            self.data.calls[q] = call
        self._tags = itertools.count(1)
        self._pending: dict[tuple[int, int], tuple[int, int, int, int]] = {}
        self.answers: dict[int, Answer] = {}

    # -- the guest's side ----------------------------------------------------------------------
    def submit(self, rtype: int, sector: int = 0, *, data: bytes | None = None, nbytes: int = 0,
               queue: int = 0, publish: bool = True) -> int:
        """Put one request on ``queue``'s ring; its tag."""
        header = self.allocator.alloc(OUTHDR.size + 1)
        self.ram.write(header, OUTHDR.pack(int(rtype), 0, sector) + bytes([STATUS_UNSET]))
        buffers = [(header, OUTHDR.size, False)]
        length = len(data) if data is not None else nbytes
        buf = self.allocator.alloc(length) if length else None
        if data is not None:
            self.ram.write(buf, data)
            buffers.append((buf, length, False))
        elif nbytes:
            buffers.append((buf, nbytes, True))
        buffers.append((header + OUTHDR.size, 1, True))
        head = self.drivers[queue].add_chain(buffers, indirect=True)     # as Linux does
        tag = next(self._tags)
        self._pending[(queue, head)] = (tag, header, buf or 0, nbytes if data is None else 0)
        if publish:
            self.drivers[queue].publish()
        return tag

    def publish(self, queue: int = 0) -> None:
        self.drivers[queue].publish()

    def _reap(self) -> None:
        for q, driver in enumerate(self.drivers):
            for head, used in driver.used_since_last():
                tag, header, buf, nbytes = self._pending.pop((q, head))
                status = self.ram.read(header + OUTHDR.size, 1)[0]
                data = self.ram.read(buf, nbytes) if nbytes else b""
                self.answers[tag] = Answer(tag, q, status, used, data)
                self.allocator.free(header)
                if buf:
                    self.allocator.free(buf)

    # -- the supervisor's side -------------------------------------------------------------------
    def kick(self, queue: int = 0) -> None:
        self.data.drain(queue)

    def serve(self, timeout: float = 10.0) -> None:
        """Serve completions, as the event loop would, until none are in flight."""
        deadline = time.monotonic() + timeout
        while self.data.inflight:
            left = deadline - time.monotonic()
            assert left > 0, f"{len(self.data.inflight)} requests still in flight"
            if select.select([self.engine.completion_fd], [], [], left)[0]:
                self.data.on_completions()
        self._reap()

    def run(self, *tags: int, queues=None) -> list[Answer]:
        """Kick every queue (or ``queues``), serve, and return the answers of ``tags``."""
        for q in (range(len(self.drivers)) if queues is None else queues):
            self.kick(q)
        self.serve()
        return [self.answers.pop(t) for t in tags]

    # -- shortcuts -------------------------------------------------------------------------------
    def write(self, sector: int, data: bytes, queue: int = 0) -> Answer:
        return self.run(self.submit(BlkType.OUT, sector, data=data, queue=queue))[0]

    def read(self, sector: int, nbytes: int, queue: int = 0) -> Answer:
        return self.run(self.submit(BlkType.IN, sector, nbytes=nbytes, queue=queue))[0]

    def close(self) -> None:
        for d in self.drivers:
            d.close()
        for r in self.data.rings.values():
            r.detach()
        self.memory.close()
        self.ram.close()
        for fd in self.calls:
            os.close(fd)
        self.backing.close()
        if self._store is not None:
            drop_store(self._store)

    def __enter__(self) -> InProcessDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
