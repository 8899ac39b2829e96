"""Many disks, one supervisor: what each disk has of its own, and what all of them share.

Theory of operation
-------------------
``vblk serve --config FILE`` serves N disks from one supervisor process and one pool of
worker processes; ``vblk serve SPEC`` is the same code with a list of one disk (disk number
0, no name). A disk (``ServedDisk``) is everything a guest's device is:

    per disk   its backing (open, its window locked), BlkDevice (geometry, config, features),
               listening socket, FrontendLink and Session (one frontend at a time), Queues
               (rings, kicks, calls, inflight region, memory table and its generation),
               DataPath (admission, completions, the used rings), Limiter, Stats, control
               socket (``SOCKET.ctl``: stats, resize, limit) and metrics endpoint, and a log
               name (``disk=NAME`` on every line logged while its handlers run)
    shared     the EventLoop (one epoll), the WorkerPool and its slot area (one memfd), the
               completion pipe, the signals, the host-wide control socket (stats of every
               disk; ``vblk disk add`` and ``vblk disk remove``, see vblk.supervisor.host)

Slots. The slot area holds every blocking disk's slots, each disk a contiguous range of its
own ``slots`` (``SlotShare``): disk d's slot k is slot ``base_d + k`` of the area. With a host
control socket the area is sized with room for disks added later, and a removed disk's range
goes back to the free ones (vblk.supervisor.slotranges). The
DataPath keeps numbering its slots 0..slots-1 as before; its SlotShare adds the base and
stamps the disk number in the slot (vblk.ipc), so a worker knows which backing and which
memory table the slot's pieces refer to. Each worker holds every disk's backing fd and every
disk's memory table, generation-tracked per disk (vblk.workers.loop): a disk's new table goes
to every worker before any slot that uses it, exactly as with one disk. Completions come
back on the one completion pipe; the ``CompletionRouter`` reads them, hands each to the
SlotShare its slot number falls in (local number again), and runs each disk's completion
handler once per wake-up. A worker that dies has its slots re-issued by the pool, whichever
disk they belong to: the pool deals in slot numbers only, and a re-issued slot still carries
its disk. A disk added at run time is one more number in the pool's table of backings, and
its fd goes to every worker (``WorkerPool.add_disk``); a removed one leaves both.

Backings whose I/O completes on an eventfd (RBD) are not in the pool: each such disk has an
InProcessEngine of its own, watched by the shared loop.

Isolation. Every handler a disk's rooms watch runs through its ``DiskLoop``: in the disk's log
context, and if it raises, only that disk's frontend is dropped. A frontend's protocol errors,
a guest's broken rings and a backing's I/O errors stay in the disk's own Session, DataPath and
Stats. The nested wait of a stop or a new memory table (vblk.supervisor.queues), which waits
for a disk's requests in flight inside its frontend's message, holds up that disk only: the
loop serves the engine and every other disk's fds meanwhile (each fd is watched with its
DiskLoop as owner; vblk.supervisor.loop.serve_until), so an image that stalls stalls its own
guest, not its neighbours.

Fairness. A disk can never hold more slots than its own range, so one that floods cannot take
another's slots; inside a disk the multiqueue budget (vblk.supervisor.datapath) shares them
among its rings. The loop is shared: a drain serving reads from the page cache ends its
turn as soon as another disk's kick (or anything else) is ready (``DiskLoop.turns``; Turns in
vblk.supervisor.datapath), and after a batch of completions every disk's are published
before any disk refills (``CompletionRouter``). The workers are
shared: the pool puts each slot with the least busy worker, and keeps its last worker for
a disk with nothing at the workers (the quiet worker, vblk.supervisor.pool). Rate limits are
per disk, as before.

The io_uring. A file disk sends its writes, and the reads the page cache does not hold, to an
io_uring of its own instead of the workers (``SlotShare.ring``, vblk.supervisor.ringio): the
ring's eventfd is watched by the disk's loop like an in-process engine's, and a request the
ring could not finish goes to the workers under the same slot.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import time

from vblk.backing import Backing, open_backing
from vblk.control import listener_path
from vblk.device import BlkDevice, DiscardLimits, Geometry
from vblk.hostconfig import DiskEntry
from vblk.ipc import Pieces
from vblk.listening import open_listener
from vblk.logs import enter_disk, leave_disk, quote
from vblk.memory import GuestMemory
from vblk.options import ServeConfig, default_max_discard_sectors
from vblk.ratelimit import Limiter
from vblk.stats import Stats
from vblk.supervisor.connection import FrontendLink
from vblk.supervisor.datapath import DRAIN_QUANTUM, TURN_MIN, DataPath
from vblk.supervisor.disk_ops import DiskOps
from vblk.supervisor.loop import EventLoop, run_guarded
from vblk.supervisor.pool import WorkerPool
from vblk.supervisor.queues import Queues
from vblk.supervisor.ringio import RingIO

log = logging.getLogger("vblk.supervisor")


class DiskLoop:
    """The shared event loop as one disk's rooms see it: each handler they watch runs in the
    disk's log context, and one that raises costs this disk's frontend its connection only."""

    def __init__(self, loop: EventLoop, name: str) -> None:
        self.loop = loop
        self.name = name
        self.on_error = lambda: None             # set once the disk's FrontendLink exists
        self._peek = functools.partial(loop.epoll.poll, 0, 1)    # anything ready? (turns)

    @property
    def stopping(self) -> bool:
        return self.loop.stopping

    def call(self, handler):
        """Run ``handler`` in the disk's log context; if it raises, drop the disk's frontend
        (and answer None)."""
        outer = enter_disk(self.name)
        try:
            return run_guarded(handler, self.on_error)
        finally:
            leave_disk(outer)

    def guarded(self, handler):
        """``handler``, to be run through ``call``."""
        return lambda: self.call(handler)

    @property
    def waiting(self) -> bool:
        """Inside a nested wait (vblk.supervisor.loop.serve_until): its fds wait."""
        return self in self.loop.waiting

    def watch(self, fd: int, handler, group: str) -> None:
        self.loop.watch(fd, self.guarded(handler), group, owner=self)

    def unwatch(self, fd: int) -> None:
        self.loop.unwatch(fd)

    def watching(self, fd: int) -> bool:
        return self.loop.watching(fd)

    def turns(self) -> tuple:
        """A drain's turns (vblk.supervisor.datapath, Turns): the loop's peek, how many reads
        served from the cache between two peeks, and how long a turn lasts before the first:
        1 and TURN_MIN while another ring runs."""
        if self.loop.kicks > 1:
            return self._peek, 1, TURN_MIN
        return self._peek, DRAIN_QUANTUM, 0.0

    def call_later(self, delay: float, handler) -> None:
        self.loop.call_later(delay, self.guarded(handler))

    def serve_until(self, done, group: str, timeout: float) -> bool:
        return self.loop.serve_until(done, group, timeout, owner=self)


class SlotShare:
    """One disk's engine over the shared pool: its slots ``base .. base + count - 1`` of the
    slot area, known to its DataPath as 0 .. count - 1."""

    def __init__(self, pool: WorkerPool, disk: int, base: int, count: int,
                 ring: RingIO | None = None) -> None:
        self.pool = pool
        self.disk = disk
        self.base = base
        self.count = count
        self.completion_fd = pool.completion_fd
        self.done: list[tuple[int, int, int]] = []      # filled by the CompletionRouter
        self.collect = lambda: None        # the disk's: complete what is in ``done``
        self.refill = lambda: None         # the disk's: give its free slots to its rings
        self.ring = ring                   # its io_uring (vblk.supervisor.ringio), if any

    def post(self, slot: int, op: int, flags: int, offset: int, length: int, pieces: Pieces,
             generation: int) -> None:
        ring = self.ring
        if ring is not None and ring.take(slot, op, flags, offset, length, pieces, generation):
            return
        self.pool.post(self.base + slot, op, flags, offset, length, pieces, generation,
                       self.disk)

    def flush(self) -> None:
        self.pool.flush()
        if self.ring is not None:
            self.ring.submit()

    def reap(self) -> list[tuple[int, int, int]]:
        done, self.done = self.done, []
        if self.ring is not None:
            finished, redo = self.ring.reap()
            done += finished
            for request in redo:
                slot, *rest = request
                self.pool.post(self.base + slot, *rest, self.disk)
            if redo:
                self.pool.flush()
        return done

    def set_memory(self, memory: GuestMemory, regions: list[list[int]], fds: list[int]) -> None:
        if self.ring is not None:
            self.ring.set_memory(memory)
        self.pool.set_memory(memory, regions, fds, self.disk)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


class CompletionRouter:
    """The pool's completion pipe, read once per wake-up, each slot to its disk's share."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.owner: list[SlotShare | None] = [None] * pool.slots.count

    def add(self, share: SlotShare) -> None:
        self.owner[share.base:share.base + share.count] = [share] * share.count

    def remove(self, share: SlotShare) -> None:
        """A removed disk's range: completions for it (none, unless its stop timed out) are
        dropped from now on."""
        self.owner[share.base:share.base + share.count] = [None] * share.count

    def on_completions(self) -> None:
        """Every touched disk's completions are published before any disk takes new requests
        from its rings: a disk that floods refills its slots after its neighbours' requests
        are answered, not before."""
        touched: list[SlotShare] = []
        owner = self.owner
        for slot, status, err in self.pool.reap():
            share = owner[slot]
            if share is None:
                continue
            if not share.done:
                touched.append(share)
            share.done.append((slot - share.base, status, err))
        for share in touched:
            share.collect()
        for share in touched:
            share.refill()


class WorkerRestarts:
    """What the pool tells about a worker restart, told to every disk it serves (``disks``:
    the served disks as they are at the time, added and removed ones included)."""

    def __init__(self, disks: list[ServedDisk]) -> None:
        self.disks = disks

    def worker_restarted(self) -> None:
        for d in self.disks:
            if isinstance(d.engine, SlotShare):
                d.stats.worker_restarted()


def make_device(config: ServeConfig, backing: Backing) -> BlkDevice:
    """ACRN's device for this disk: geometry from the backing, queues and discard from the
    options."""
    info = backing.info
    geometry = Geometry(size_bytes=info.size, logical_block_size=info.logical_block_size,
                        physical_block_size=info.physical_block_size, readonly=info.readonly,
                        serial=info.serial)
    discard = None
    if config.disk.discard is not None:
        d = config.disk.discard
        max_sectors = d.max_sectors if d.max_sectors is not None else \
            default_max_discard_sectors(info.size)
        discard = DiscardLimits(max_sectors, d.max_segments, d.alignment)
    return BlkDevice(geometry, writeback=info.writeback, num_queues=config.disk.num_queues,
                     discard=discard)


def open_control(config: ServeConfig, listener: socket.socket, stats: Stats):
    """The control socket (``--control-socket``, default: the listening socket's path +
    ``.ctl``) and the ``--metrics-listen`` endpoint; None if there is neither."""
    from vblk.control import SUN_PATH_MAX, ControlServer, default_control_path, parse_listen_address
    path = config.control_socket
    if path is None:
        bound = listener_path(listener)
        if bound is not None and len(os.fsencode(default_control_path(bound))) <= SUN_PATH_MAX:
            path = default_control_path(bound)
        else:
            log.info("event=no_control_socket reason=%s",
                     quote("the listening socket has no path" if bound is None
                           else "path too long"))
    metrics = parse_listen_address(config.metrics_listen) if config.metrics_listen else None
    if path is None and metrics is None:
        return None
    stats.info["control"] = path
    return ControlServer(stats.snapshot, path=path, metrics=metrics)


def log_serving(config: ServeConfig, backing: Backing, device: BlkDevice) -> None:
    info = backing.info
    d = device.discard
    log.info("event=serving image=%s size=%d lbs=%d pbs=%d ro=%s cache=%s discard=%s socket=%s "
             "iops_limit=%d bps_limit=%d incoming=%s", quote(info.path), info.size,
             info.logical_block_size,
             info.physical_block_size, info.readonly,
             "writeback" if info.writeback else "writethrough",
             f"{d.max_sectors}:{d.max_segments}:{d.alignment}" if d else "off",
             quote(config.socket_path or f"fd:{config.listen_fd}"), config.limits.iops,
             config.limits.bps, config.incoming)


class ServedDisk:
    """One disk: from its open backing to its listening socket, its rooms and its control."""

    def __init__(self, number: int, name: str, config: ServeConfig, backing: Backing,
                 device: BlkDevice, workers: int) -> None:
        self.number = number
        self.name = name
        self.config = config
        self.backing = backing
        self.device = device
        info = {"image": backing.info.path}
        if name:
            info["disk"] = name
        self.stats = Stats(device.num_queues, workers=workers if backing.blocking else 0,
                           info=info)
        self.stats.capacity_bytes = device.geometry.size_bytes
        self.engine = None                    # a SlotShare or the disk's own InProcessEngine
        self.listener = None
        self.created: str | None = None       # the socket path this disk created
        self.control = None
        self.loop: DiskLoop | None = None
        self.data: DataPath | None = None
        self.link: FrontendLink | None = None

    @classmethod
    def open(cls, number: int, entry: DiskEntry, workers: int) -> ServedDisk:
        """Open the disk's backing -- its window locked, unless it is a migration's
        destination -- and make its device (ConfigError if the backing is refused)."""
        backing = open_backing(entry.serve.disk, lock=not entry.serve.incoming)
        try:
            return cls(number, entry.name, entry.serve, backing,
                       make_device(entry.serve, backing), workers)
        except BaseException:
            backing.close()
            raise

    def open_sockets(self) -> None:
        """Its listening socket, then its control socket and metrics endpoint (``close``
        closes whatever was opened if this raises)."""
        config = self.config
        self.listener, self.created = open_listener(config.socket_path, config.listen_fd,
                                                    config.socket_mode, config.socket_group)
        self.stats.info["socket"] = listener_path(self.listener)
        log_serving(config, self.backing, self.device)
        self.control = open_control(config, self.listener, self.stats)

    def build(self, loop: EventLoop, router: CompletionRouter | None) -> None:
        """Its rooms, on the shared loop (the listener and control socket are open)."""
        config, backing = self.config, self.backing
        limiter = Limiter(config.limits, now=time.monotonic())
        self.stats.limiter = limiter
        inline = backing.caches and os.environ.get("VBLK_INLINE_READS", "1") != "0"
        data = self.data = DataPath(self.device, backing, config.slots, self.stats, limiter,
                                    inline_reads=inline)
        data.engine = self.engine
        dloop = self.loop = DiskLoop(loop, self.name)
        queues = Queues(dloop, data, self.stats, holds_lock=not config.incoming)
        data.turns = dloop.turns
        data.on_hot = lambda: loop.hot.append((dloop, data, queues))
        link = self.link = FrontendLink(dloop, self.device, queues, self.stats, self.listener)
        dloop.on_error = link.disconnect
        if isinstance(self.engine, SlotShare):
            self.engine.collect = dloop.guarded(data.collect)
            self.engine.refill = dloop.guarded(data.refill)
            router.add(self.engine)
            if self.engine.ring is not None:
                dloop.watch(self.engine.ring.completion_fd, data.on_completions, "engine")
        else:
            dloop.watch(self.engine.completion_fd, data.on_completions, "engine")
        if self.control is not None:
            DiskOps(self.device, backing, data, link, self.stats).register(self.control)
            dloop.watch(self.control.fileno(), self.control.on_readable, "frontend")
        link.listen()

    def stop(self) -> None:
        """Drop the frontend: its rings stop once their requests are done."""
        if self.link is not None:
            self.link.disconnect()

    def withdraw(self, router: CompletionRouter | None) -> int:
        """Stop serving, for good (``vblk disk remove``): drop the frontend -- its rings stop
        once their requests are done -- and stop listening, then unwatch the disk's
        completions and control socket and close its sockets. What is still in flight (0
        unless the stop timed out, see vblk.supervisor.queues)."""
        self.link.close()
        if isinstance(self.engine, SlotShare):
            router.remove(self.engine)
            if self.engine.ring is not None:
                self.loop.unwatch(self.engine.ring.completion_fd)
        else:
            self.loop.unwatch(self.engine.completion_fd)
        if self.control is not None:
            self.loop.unwatch(self.control.fileno())
        self.close()
        return len(self.data.inflight)

    def release(self) -> None:
        """Give the image back: unlock the window now -- workers may hold the same open file
        description a moment longer, until they read the disk's removal -- and close it."""
        try:
            self.backing.release_window()
        except NotImplementedError:
            pass
        self.backing.close()

    def close(self) -> None:
        if self.data is not None:       # unmapped unless a stop gave up on requests yet
            self.data.swap_memory(GuestMemory.empty())
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.created:
            try:
                os.unlink(self.created)
            except FileNotFoundError:
                pass
            self.created = None
