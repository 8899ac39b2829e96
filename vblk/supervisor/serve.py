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
    loop and the shared pool.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

from vblk import sdnotify
from vblk.backing import Backing, open_backing
from vblk.control import listener_path
from vblk.device import BlkDevice, DiscardLimits, Geometry
from vblk.errors import ConfigError
from vblk.hostconfig import HostConfig
from vblk.ipc import SlotArea
from vblk.listening import open_listener
from vblk.logs import disk_context, quote
from vblk.options import ServeConfig, default_max_discard_sectors
from vblk.stats import Stats
from vblk.supervisor.disks import CompletionRouter, ServedDisk, SlotShare, WorkerRestarts
from vblk.supervisor.inprocess import InProcessEngine
from vblk.supervisor.loop import EventLoop
from vblk.supervisor.pool import WorkerPool

log = logging.getLogger("vblk.supervisor")


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


def serve(config: ServeConfig | HostConfig) -> int:
    """Run vblk for one disk (a ServeConfig) or many (a HostConfig) until SIGTERM/SIGINT; the
    exit status. WorkerStartError (and ConfigError) propagate before anything is listening."""
    host = config if isinstance(config, HostConfig) else HostConfig.single(config)
    with contextlib.ExitStack() as stack:
        disks = []
        for number, entry in enumerate(host.disks):
            with disk_context(entry.name), _naming(number, entry.name):
                backing = stack.enter_context(open_backing(entry.serve.disk,
                                                           lock=not entry.serve.incoming))
                disks.append(ServedDisk(number, entry.name, entry.serve, backing,
                                        make_device(entry.serve, backing), host.workers))
        pool = make_pool(host, disks)
        try:
            if pool is not None:
                pool.start()
            return _serve_started(host, disks, pool)
        finally:
            if pool is not None:
                pool.stop()
                pool.close()
            for disk in disks:
                if not isinstance(disk.engine, SlotShare):
                    disk.engine.stop()
                    disk.engine.close()


def make_pool(host: HostConfig, disks: list[ServedDisk]) -> WorkerPool | None:
    """One pool of worker processes for every disk whose backing blocks, over one slot area
    where each has a range of its own (its SlotShare); every other disk gets its backing's
    own submission (InProcessEngine). None if no disk blocks."""
    blocking = [d for d in disks if d.backing.blocking]
    for d in disks:
        if not d.backing.blocking:
            d.engine = InProcessEngine(d.backing)
    if not blocking:
        return None
    total = sum(d.config.slots for d in blocking)
    pool = WorkerPool(host.workers, {d.number: d.backing for d in blocking},
                      SlotArea.create(total), WorkerRestarts([d.stats for d in blocking]),
                      host.log_level)
    base = 0
    for d in blocking:
        d.engine = SlotShare(pool, d.number, base, d.config.slots)
        base += d.config.slots
    return pool


@contextlib.contextmanager
def _naming(number: int, name: str):
    """A ConfigError about one of several disks says which."""
    try:
        yield
    except ConfigError as exc:
        if not name:
            raise
        raise ConfigError(f"disk {number + 1} ({name}): {exc}") from None


def _serve_started(host: HostConfig, disks: list[ServedDisk], pool: WorkerPool | None) -> int:
    with contextlib.ExitStack() as stack:
        for disk in disks:
            stack.callback(disk.close)
            config = disk.config
            with disk_context(disk.name), _naming(disk.number, disk.name):
                disk.listener, disk.created = open_listener(config.socket_path, config.listen_fd,
                                                            config.socket_mode, config.socket_group)
                disk.stats.info["socket"] = listener_path(disk.listener)
                _log_serving(config, disk.backing, disk.device)
                disk.control = open_control(config, disk.listener, disk.stats)
        host_control = open_host_control(host, disks, pool)
        if host_control is not None:
            stack.callback(host_control.close)
        _run(host, disks, pool, host_control)
    return 0


def open_host_control(host: HostConfig, disks: list[ServedDisk], pool: WorkerPool | None):
    """The host-wide control socket (``control-socket`` in the config): ``stats`` of every
    disk at once. None if not asked for."""
    if host.control_socket is None:
        return None
    from vblk.control import ControlServer
    started = time.monotonic()

    def snapshot(*, histograms: bool = False) -> dict:
        return {"pid": os.getpid(), "uptime_s": round(time.monotonic() - started, 3),
                "time": time.time(),
                "workers": {"count": pool.count if pool is not None else 0,
                            "alive": pool.alive if pool is not None else 0},
                "disks": {d.name: d.stats.snapshot(histograms=histograms) for d in disks}}
    return ControlServer(snapshot, path=host.control_socket)


def _run(host: HostConfig, disks: list[ServedDisk], pool: WorkerPool | None, host_control) -> None:
    loop = EventLoop(on_error=lambda: [d.stop() for d in disks])
    router = CompletionRouter(pool) if pool is not None else None
    try:
        if pool is not None:
            pool.attach(loop)
            loop.watch(pool.completion_fd, router.on_completions, "engine")
        for disk in disks:
            disk.build(loop, router)
        if host_control is not None:
            loop.watch(host_control.fileno(), host_control.on_readable, "frontend")
        with loop.signals():
            slots = sum(d.config.slots for d in disks)
            for disk in disks:
                with disk_context(disk.name):
                    log.info("event=listening workers=%d slots=%d", disk.stats.workers,
                             disk.config.slots)
            if len(disks) > 1:
                log.info("event=host_listening disks=%d workers=%d slots=%d", len(disks),
                         pool.count if pool is not None else 0, slots)
            sdnotify.ready("waiting for a frontend" if len(disks) == 1
                           else f"serving {len(disks)} disks")
            try:
                loop.run(timeout=lambda: _soonest(disks), tick=lambda: _tick(disks),
                         poll=lambda: _poll(disks))
            finally:
                loop.stopping = True
                sdnotify.stopping()
                for disk in disks:
                    disk.stop()        # its rings stop once their requests are done
    finally:
        loop.close()
        log.info("event=stopped")


def _soonest(disks: list[ServedDisk]) -> float:
    """How long the loop may sleep: until the first disk's tokens are due, else -1."""
    soonest = -1.0
    for d in disks:
        t = d.data.timeout()
        if t >= 0 and (soonest < 0 or t < soonest):
            soonest = t
    return soonest


def _tick(disks: list[ServedDisk]) -> None:
    for d in disks:
        if (d.data.throttled or d.data.backlog) and not d.loop.waiting:
            d.loop.call(d.data.tick)


def _poll(disks: list[ServedDisk]) -> bool:
    found = False
    for d in disks:
        if d.data.rings:
            found |= bool(d.loop.call(d.data.poll))
    return found


def _log_serving(config: ServeConfig, backing: Backing, device: BlkDevice) -> None:
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
