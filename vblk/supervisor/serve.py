"""The composition root: ``serve(config)`` builds the supervisor of one disk (``vblk serve
SPEC``) or of many (``vblk serve --config FILE``; see vblk.supervisor.disks for what is each
disk's and what is shared) and runs it.

Order matters, and it is the order an operator can rely on: every image is opened and its
window locked (one that cannot be closes the ones before); the I/O engine is started (worker
processes that are all ready, or WorkerStartError and nothing else created); only then are
the listening sockets created, the control sockets opened, READY=1 sent to systemd and
``event=listening`` logged for each disk. On SIGTERM or SIGINT the loop ends, every frontend
is dropped (its rings stop after their requests finish), the workers are stopped, and
everything is closed in the reverse order.

    FrontendLink (connection.py) --Session--> Queues (queues.py) --> DataPath (datapath.py)
        DataPath --requests--> engine: WorkerPool (pool.py, over vblk.ipc's shared-memory
                                   slots) | InProcessEngine (inprocess.py)
    EventLoop (loop.py) runs them all; DiskOps (disk_ops.py) answers resize and limit;
    ServedDisk, SlotShare, CompletionRouter (disks.py) put one disk's rooms on the shared
    loop and the shared pool; Host (host.py) holds the served disks and adds and removes
    them at run time (vblk disk add / remove, on the host control socket), over the free
    ranges of the slot area (slotranges.py).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from vblk import sdnotify
from vblk.errors import ConfigError
from vblk.hostconfig import HostConfig, slot_area_size
from vblk.ipc import SlotArea
from vblk.logs import disk_context
from vblk.options import ServeConfig
from vblk.supervisor.disks import CompletionRouter, ServedDisk, SlotShare, WorkerRestarts
from vblk.supervisor.host import Host
from vblk.supervisor.inprocess import InProcessEngine
from vblk.supervisor.loop import EventLoop
from vblk.supervisor.pool import AWAIT_AT_MOST, WorkerPool, awaited
from vblk.supervisor.ringio import ring_for
from vblk.supervisor.slotranges import SlotRanges

log = logging.getLogger("vblk.supervisor")


def serve(config: ServeConfig | HostConfig) -> int:
    """Run vblk for one disk (a ServeConfig) or many (a HostConfig) until SIGTERM/SIGINT; the
    exit status. WorkerStartError (and ConfigError) propagate before anything is listening."""
    host = config if isinstance(config, HostConfig) else HostConfig.single(config)
    disks: list[ServedDisk] = []          # served now: vblk disk add / remove change it
    try:
        for number, entry in enumerate(host.disks):
            with disk_context(entry.name), _naming(number, entry.name):
                disks.append(ServedDisk.open(number, entry, host.workers))
        pool, ranges = make_pool(host, disks)
        try:
            if pool is not None:
                pool.start()
            return _serve_started(Host(host, disks, pool, ranges))
        finally:
            if pool is not None:
                pool.stop()
                pool.close()
            for disk in disks:
                if isinstance(disk.engine, SlotShare):
                    disk.engine.close()
                elif disk.engine is not None:
                    disk.engine.stop()
                    disk.engine.close()
    finally:
        for disk in reversed(disks):
            disk.backing.close()


def make_pool(host: HostConfig, disks: list[ServedDisk]) -> tuple[WorkerPool | None,
                                                                    SlotRanges | None]:
    """One pool of worker processes for every disk whose backing blocks, over one slot area
    where each has a range of its own (its SlotShare), and the area's free ranges: the area
    has room for disks added later if the host has a control socket (``slot_area_size``).
    Every other disk gets its backing's own submission (InProcessEngine). (None, None) if no
    disk blocks."""
    blocking = [d for d in disks if d.backing.blocking]
    for d in disks:
        if not d.backing.blocking:
            d.engine = InProcessEngine(d.backing)
    if not blocking:
        return None, None
    capacity = slot_area_size(host, sum(d.config.slots for d in blocking))
    pool = WorkerPool(host.workers, {d.number: d.backing for d in blocking},
                      SlotArea.create(capacity), WorkerRestarts(disks), host.log_level)
    ranges = SlotRanges(capacity)
    for d in blocking:
        d.engine = SlotShare(pool, d.number, ranges.take(d.config.slots), d.config.slots,
                             ring_for(d.backing, d.config.slots))
    return pool, ranges


@contextlib.contextmanager
def _naming(number: int, name: str):
    """A ConfigError about one of several disks says which."""
    try:
        yield
    except ConfigError as exc:
        if not name:
            raise
        raise ConfigError(f"disk {number + 1} ({name}): {exc}") from None


def _serve_started(host: Host) -> int:
    loop = EventLoop(on_error=lambda: [d.stop() for d in host.disks],
                     poll_us=host.config.poll_us)
    try:
        # The loop's signal handling is in place before the sockets exist (a frontend or
        # systemd may see them at once): a SIGTERM or SIGINT from then on ends vblk in order
        # once the loop runs, instead of killing it half started.
        with loop.signals(), contextlib.ExitStack() as stack:
            stack.callback(host.close_sockets)
            for disk in host.disks:
                with disk_context(disk.name), _naming(disk.number, disk.name):
                    disk.open_sockets()
            host_control = open_host_control(host)
            if host_control is not None:
                stack.callback(host_control.close)
            _run(host, host_control, loop)
    finally:
        loop.close()
        log.info("event=stopped")
    return 0


def open_host_control(host: Host):
    """The host-wide control socket (``control-socket`` in the config): ``stats`` of every
    disk at once, ``disk-add`` and ``disk-remove`` (vblk.supervisor.host). None if not asked
    for."""
    if host.config.control_socket is None:
        return None
    from vblk.control import ControlServer
    control = ControlServer(host.snapshot, path=host.config.control_socket)
    host.register(control)
    return control


def _run(host: Host, host_control, loop: EventLoop) -> None:
    disks, pool = host.disks, host.pool
    router = CompletionRouter(pool) if pool is not None else None
    if pool is not None:
        pool.attach(loop)
        loop.watch(pool.completion_fd, router.on_completions, "engine")
    host.start(loop, router)

    def count_requests() -> None:
        """The loop's ``awaiting`` and ``crowded`` over the disks served now."""
        loop.awaiting = _awaiting(pool, disks)
        loop.crowded = _crowded(disks)
    count_requests()
    host.on_disks_changed = count_requests
    if host_control is not None:
        loop.watch(host_control.fileno(), host_control.on_readable, "frontend")
    slots = sum(d.config.slots for d in disks)
    for disk in disks:
        with disk_context(disk.name):
            log.info("event=listening workers=%d slots=%d poll_us=%d",
                     disk.stats.workers, disk.config.slots, round(loop.poll_max * 1e6))
    if len(disks) > 1:
        log.info("event=host_listening disks=%d workers=%d slots=%d", len(disks),
                 pool.count if pool is not None else 0, slots)
    sdnotify.ready("waiting for a frontend" if len(disks) == 1
                   else f"serving {len(disks)} disks")
    try:
        loop.run(timeout=lambda: _soonest(disks), tick=lambda: _tick(disks),
                 poll=lambda: _poll(loop))
    finally:
        loop.stopping = True
        sdnotify.stopping()
        for disk in disks:
            disk.stop()        # its rings stop once their requests are done


def _awaiting(pool: WorkerPool | None, disks: list[ServedDisk]) -> Callable[[], bool]:
    """The loop's ``awaiting`` (vblk.supervisor.loop, Waiting polls): a few requests at the
    workers, the in-process engines (RBD's) and the disks' io_urings together (of ``disks``
    as the list is now: made again after a disk add or remove)."""
    running = [d.engine.running for d in disks if isinstance(d.engine, InProcessEngine)]
    running += [ring.running for ring in _rings(disks)]
    if not running:
        return pool.awaiting if pool is not None else (lambda: False)

    def awaiting() -> bool:
        n = pool.posted if pool is not None else 0
        for requests in running:
            n += len(requests)
        return awaited(n)
    return awaiting


def _crowded(disks: list[ServedDisk]) -> Callable[[], bool]:
    """The loop's ``crowded`` (vblk.supervisor.loop, Polling gives way): more than
    AWAIT_AT_MOST writes on the rings of buffered disks -- the copies io-wq makes -- (of
    ``disks`` as the list is now: made again after a disk add or remove; reads, and anything
    on an O_DIRECT disk's ring, need no kernel thread: they are the device's time)."""
    rings = [ring for ring in _rings(disks) if not ring.direct]
    if not rings:
        return lambda: False
    return lambda: sum(ring.writes for ring in rings) > AWAIT_AT_MOST


def _rings(disks: list[ServedDisk]) -> list:
    """The io_uring (vblk.supervisor.ringio) of each disk that has one."""
    return [d.engine.ring for d in disks
            if isinstance(d.engine, SlotShare) and d.engine.ring is not None]


def _soonest(disks: list[ServedDisk]) -> float:
    """How long the loop may sleep: until the first disk's tokens are due, else -1."""
    soonest = -1.0
    for d in disks:
        data = d.data
        if data.backlog or data.throttled:      # (every other disk's timeout is -1)
            t = data.timeout()
            if t >= 0 and (soonest < 0 or t < soonest):
                soonest = t
    return soonest


def _tick(disks: list[ServedDisk]) -> None:
    for d in disks:
        data = d.data
        if (data.throttled or data.backlog) and not d.loop.waiting:
            d.loop.call(data.tick)


def _poll(loop: EventLoop) -> bool:
    """One look at the rings of the disks that took requests since the loop last slept
    (vblk.supervisor.loop, Polling)."""
    found = False
    for dloop, data, _ in loop.hot:
        if data.rings:
            found |= bool(dloop.call(data.poll))
    return found
