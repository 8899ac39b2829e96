"""The disks one supervisor serves, as they change at run time: ``vblk disk add`` and ``vblk
disk remove`` over the host control socket (``control-socket`` in the config).

Theory of operation
-------------------
``Host`` holds the served disks (a list the loop's timers, the stats and the shutdown read as
it is at the time), the worker pool and the free ranges of its slot area
(vblk.supervisor.slotranges). The config file is never rewritten: a change lasts until the
supervisor stops, and a restart serves what the file says (as qemu-storage-daemon's
block-export-add).

Adding (``{"op": "disk-add", "disk": TABLE, "where": FILE}``) goes in two halves. The first
touches nothing: the table is parsed and checked by the config's rules as if it were the last
table of the file the running disks came from (vblk.hostconfig: name, socket paths, the image
and its window, overlap with a served writer, the lock), and the disk must fit a free slot
range. A refusal there is a ConfigError, and nothing has changed. The second half opens: the
backing (its window locked) and the listening and control sockets -- a failure there (a lock
someone took meanwhile, a socket that cannot be bound) closes what it opened and is a refusal
too. Only then, where nothing can fail, does the disk get its number and slot range
(SlotShare), every worker its backing's fd (``WorkerPool.add_disk``: before any slot of the
disk, see vblk.ipc), and its rooms their place on the loop.

Removing (``{"op": "disk-remove", "name": NAME, "force": bool}``) refuses while a frontend is
connected, unless forced. Forced, the frontend is dropped as on SIGTERM: its rings stop once
their requests in flight are done -- the nested wait of vblk.supervisor.queues, which keeps
every disk's completions flowing -- and what is done is in the guest's used ring. Then the
disk stops listening, its fds are unwatched, its sockets closed (the ones it created
unlinked), every worker told to drop it, its window unlocked and its backing closed, and its
slot range freed for the next disk (kept, and logged, in the one case where a request is still
with a worker: a stop that timed out).

Isolation: the other disks are not touched by either. An add or remove runs in the host
control socket's handler, between two turns of the loop. A forced remove's wait is the
removed disk's nested wait (vblk.supervisor.loop): the other disks are served meanwhile, and
the host control socket -- no disk's -- waits, so no add or remove ever runs inside another.
A bug in either handler is logged and answered as an error; it drops no frontend (the loop's
own guard would drop them all).

RBD disks are neither added nor removed at run time: connecting to a cluster and opening an
image (and closing them) block for as long as the cluster takes, and this is the one thread
every disk is served from.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

from vblk.backing.rbd_spec import is_rbd
from vblk.errors import ConfigError, VblkError
from vblk.hostconfig import DiskEntry, HostConfig, check_added_disk, parse_added_disk
from vblk.logs import disk_context, quote
from vblk.supervisor.disks import CompletionRouter, ServedDisk, SlotShare
from vblk.supervisor.loop import EventLoop
from vblk.supervisor.pool import WorkerPool
from vblk.supervisor.ringio import ring_for
from vblk.supervisor.slotranges import SlotRanges

log = logging.getLogger("vblk.supervisor")


class Host:
    """Every disk this supervisor serves, the worker pool they share and its free slot ranges;
    the host control socket's ``disk-add`` and ``disk-remove`` (see the module doc)."""

    def __init__(self, config: HostConfig, disks: list[ServedDisk], pool: WorkerPool | None,
                 ranges: SlotRanges | None) -> None:
        self.config = config
        self.disks = disks                   # served now (the list itself changes)
        self.pool = pool
        self.ranges = ranges                 # the pool's slot area; None without a pool
        self.next_number = len(disks)        # a disk's number is never reused
        self.loop: EventLoop | None = None
        self.router: CompletionRouter | None = None
        self.started = time.monotonic()
        # after a disk is added or removed: the loop's request counts take the disks served
        # now (vblk.supervisor.serve)
        self.on_disks_changed: Callable[[], None] = lambda: None

    def start(self, loop: EventLoop, router: CompletionRouter | None) -> None:
        """Every disk's rooms on the loop (their sockets are open)."""
        self.loop, self.router = loop, router
        for disk in self.disks:
            disk.build(loop, router)

    def register(self, control) -> None:
        control.register("disk-add", lambda request: self._answer(self.add, request))
        control.register("disk-remove", lambda request: self._answer(self.remove, request))

    def snapshot(self, *, histograms: bool = False) -> dict:
        """``vblk stats`` of the host: every disk served now."""
        pool = self.pool
        return {"pid": os.getpid(), "uptime_s": round(time.monotonic() - self.started, 3),
                "time": time.time(),
                "workers": {"count": pool.count if pool is not None else 0,
                            "alive": pool.alive if pool is not None else 0},
                "slots": None if self.ranges is None else {
                    "capacity": self.ranges.capacity, "free": self.ranges.free_slots,
                    "largest_free_range": self.ranges.largest},
                "disks": {d.name: d.stats.snapshot(histograms=histograms) for d in self.disks}}

    def close_sockets(self) -> None:
        for disk in self.disks:
            disk.close()

    def _answer(self, action, request: dict) -> dict:
        """``action(request)``; a refusal (VblkError) is logged and the control server's to
        answer, a bug is logged and answered here, without dropping any frontend."""
        try:
            return action(request)
        except VblkError as exc:
            log.warning("event=%s_refused reason=%s", str(request.get("op")).replace("-", "_"),
                        quote(exc))
            raise
        except Exception as exc:
            log.exception("event=internal_error op=%s", quote(request.get("op")))
            return {"ok": False, "error": f"internal error in vblk: {exc!r} (see its log)"}

    # -- disk add --------------------------------------------------------------------------
    def add(self, request: dict) -> dict:
        """Check the disk whole (nothing touched), open it, then serve it; see the module
        doc. ConfigError: refused, nothing changed."""
        where = request.get("where")
        where = where if isinstance(where, str) and where else "disk add"
        number = self.next_number
        warnings: list[str] = []
        entry, label = parse_added_disk(request.get("disk"), number, self.config, where,
                                        warnings)
        self._check(entry, label, where)
        with disk_context(entry.name):
            disk = self._open(number, entry, label, where)
            self.next_number += 1
            base = self.ranges.take(disk.config.slots)
            disk.engine = SlotShare(self.pool, number, base, disk.config.slots,
                                    ring_for(disk.backing, disk.config.slots))
            self.pool.add_disk(number, disk.backing)
            self.disks.append(disk)
            disk.build(self.loop, self.router)
            self.on_disks_changed()
            log.info("event=disk_added number=%d slots=%d..%d socket=%s", number + 1, base,
                     base + disk.config.slots - 1, quote(disk.config.socket_path))
            log.info("event=listening workers=%d slots=%d", disk.stats.workers, disk.config.slots)
        return {"ok": True, "disk": entry.name, "number": number + 1,
                "socket": disk.config.socket_path, "control": disk.stats.info.get("control"),
                "slots": [base, disk.config.slots], "warnings": warnings}

    def _check(self, entry: DiskEntry, label: str, where: str) -> None:
        """Everything that refuses the disk before anything is opened."""
        refuse = f"{where}: {label}: "
        if is_rbd(entry.serve.disk.path):
            raise ConfigError(refuse + "an RBD disk cannot be added at run time (the cluster "
                              "connection would hold up every other disk while it is made); "
                              "put it in the config and restart")
        if self.pool is None:
            raise ConfigError(refuse + "this vblk runs no worker processes (every disk of its "
                              "config is RBD), so it cannot serve a file or block device "
                              "added now; put it in the config and restart")
        slots = entry.serve.slots
        if not self.ranges.fits(slots):
            r = self.ranges
            raise ConfigError(refuse + f"no room for its {slots} slots: {r.free_slots} of the "
                              f"slot area's {r.capacity} are free, the largest free range "
                              f"holds {r.largest} (give it fewer slots, or raise slot-capacity "
                              f"in the config and restart)")
        check_added_disk(entry, label, self._served(), self.config, where)

    def _served(self) -> list[tuple[str, DiskEntry, object]]:
        """The served disks as check_added_disk sees them, each window at its size now."""
        return [(f"disk {d.number + 1} ({d.name})", DiskEntry(d.name, d.config),
                 dataclasses.replace(d.backing.info, size=d.device.geometry.size_bytes))
                for d in self.disks]

    def _open(self, number: int, entry: DiskEntry, label: str, where: str) -> ServedDisk:
        """Its backing (window locked) and sockets, or a refusal with all of them closed."""
        try:
            disk = ServedDisk.open(number, entry, self.config.workers)
        except (ConfigError, OSError) as exc:
            raise ConfigError(f"{where}: {label}: {_reason(exc)}") from None
        try:
            disk.open_sockets()
        except BaseException as exc:
            disk.close()
            disk.release()
            if isinstance(exc, (ConfigError, OSError)):
                raise ConfigError(f"{where}: {label}: {_reason(exc)}") from None
            raise
        return disk

    # -- disk remove -----------------------------------------------------------------------
    def remove(self, request: dict) -> dict:
        """Stop serving disk NAME and give back all it held; see the module doc."""
        name, force = request.get("name"), request.get("force") is True
        disk = self._named(name)
        if not isinstance(disk.engine, SlotShare):
            raise ConfigError(f"disk {name} is an RBD disk, and an RBD disk cannot be removed "
                              f"at run time (closing the image would hold up every other "
                              f"disk); take it out of the config and restart")
        connected = disk.link.conn is not None
        if connected and not force:
            raise ConfigError(f"disk {name} has a frontend connected: shut down or detach "
                              f"what uses it first, or remove it with --force (its requests "
                              f"in flight complete, then it is disconnected)")
        with disk_context(disk.name):
            in_flight = len(disk.data.inflight)
            left = disk.withdraw(self.router)
            self.disks.remove(disk)
            self.on_disks_changed()
            self.pool.remove_disk(disk.number)
            disk.release()
            share = disk.engine
            if left:                # (and its ring, whose writes may still be running)
                log.error("event=slot_range_kept slots=%d..%d in_flight=%d", share.base,
                          share.base + share.count - 1, left)
            else:
                self.ranges.give_back(share.base, share.count)
                share.close()
            log.info("event=disk_removed forced=%s frontend=%s completed=%d", force, connected,
                     in_flight - left)
        return {"ok": True, "disk": disk.name, "frontend_dropped": connected,
                "completed": in_flight - left, "still_in_flight": left}

    def _named(self, name: object) -> ServedDisk:
        for disk in self.disks:
            if disk.name == name:
                return disk
        names = ", ".join(d.name for d in self.disks) or "none"
        raise ConfigError(f"no disk named {name!r} is served (disks: {names})")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
