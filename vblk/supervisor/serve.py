"""The composition root: ``serve(config)`` builds one disk's supervisor and runs it.

Order matters, and it is the order an operator can rely on: the image is opened and its
window locked; the I/O engine is started (worker processes that are all ready, or
WorkerStartError and nothing else created); only then is the listening socket created, the
control socket opened, READY=1 sent to systemd and ``event=listening`` logged. On SIGTERM or
SIGINT the loop ends, the frontend is dropped (its rings stop after their requests finish),
the workers are stopped, and everything is closed in the reverse order.

    FrontendLink (connection.py) --Session--> Queues (queues.py) --> DataPath (datapath.py)
        DataPath --requests--> engine: WorkerPool (pool.py, over vblk.ipc's shared-memory
                                   slots) | InProcessEngine (inprocess.py)
    EventLoop (loop.py) runs them all; DiskOps (disk_ops.py) answers resize and limit.
"""
from __future__ import annotations

import logging
import os
import socket
import time

from vblk import sdnotify
from vblk.backing import Backing, open_backing
from vblk.control import listener_path
from vblk.device import BlkDevice, DiscardLimits, Geometry
from vblk.ipc import SlotArea
from vblk.listening import open_listener
from vblk.logs import quote
from vblk.options import ServeConfig, default_max_discard_sectors
from vblk.ratelimit import Limiter
from vblk.stats import Stats
from vblk.supervisor.connection import FrontendLink
from vblk.supervisor.datapath import DataPath
from vblk.supervisor.disk_ops import DiskOps
from vblk.supervisor.inprocess import InProcessEngine
from vblk.supervisor.loop import EventLoop
from vblk.supervisor.pool import WorkerPool
from vblk.supervisor.queues import Queues

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


def make_engine(config: ServeConfig, backing: Backing, stats: Stats):
    """Worker processes for a backing whose calls block; the backing's own submission
    otherwise."""
    if backing.blocking:
        return WorkerPool(config.workers, backing, SlotArea.create(config.slots), stats,
                          config.log_level)
    return InProcessEngine(backing)


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


def serve(config: ServeConfig) -> int:
    """Run vblk for one disk until SIGTERM/SIGINT; the exit status. WorkerStartError (and
    ConfigError) propagate before anything is listening."""
    with open_backing(config.disk, lock=not config.incoming) as backing:
        device = make_device(config, backing)
        workers = config.workers if backing.blocking else 0
        stats = Stats(device.num_queues, workers=workers, info={"image": backing.info.path})
        stats.capacity_bytes = device.geometry.size_bytes
        engine = make_engine(config, backing, stats)
        try:
            engine.start()
            return _serve_started(config, backing, device, stats, engine)
        finally:
            engine.stop()
            engine.close()


def _serve_started(config: ServeConfig, backing: Backing, device: BlkDevice, stats: Stats,
                   engine) -> int:
    listener, created = open_listener(config.socket_path, config.listen_fd, config.socket_mode,
                                      config.socket_group)
    try:
        stats.info["socket"] = listener_path(listener)
        _log_serving(config, backing, device)
        control = open_control(config, listener, stats)
        try:
            _run(config, backing, device, stats, engine, listener, control)
        finally:
            if control is not None:
                control.close()
    finally:
        listener.close()
        if created:
            try:
                os.unlink(created)
            except FileNotFoundError:
                pass
    return 0


def _run(config, backing, device, stats, engine, listener, control) -> None:
    limiter = Limiter(config.limits, now=time.monotonic())
    stats.limiter = limiter
    inline = backing.caches and os.environ.get("VBLK_INLINE_READS", "1") != "0"
    data = DataPath(device, backing, config.slots, stats, limiter, inline_reads=inline)
    data.engine = engine
    link: FrontendLink | None = None
    loop = EventLoop(on_error=lambda: link.disconnect())
    queues = Queues(loop, data, stats, holds_lock=not config.incoming)
    link = FrontendLink(loop, device, queues, stats, listener)
    try:
        engine.attach(loop)
        loop.watch(engine.completion_fd, data.on_completions, "engine")
        if control is not None:
            DiskOps(device, backing, data, link, stats).register(control)
            loop.watch(control.fileno(), control.on_readable, "frontend")
        link.listen()
        with loop.signals():
            log.info("event=listening workers=%d slots=%d", stats.workers, config.slots)
            sdnotify.ready("waiting for a frontend")
            try:
                loop.run(timeout=data.timeout, tick=data.tick, poll=data.poll)
            finally:
                loop.stopping = True
                sdnotify.stopping()
                link.disconnect()          # its rings stop once their requests are done
    finally:
        data.memory.close()
        loop.close()
        log.info("event=stopped")


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
