"""The operator's requests to a running disk, from the control socket: ``resize`` and
``limit``.

A resize is checked against what the store holds now (``Backing.resize_limit``), moves the
window's lock (``Backing.resize_window``), swaps the device's geometry and tells the frontend
(CONFIG_CHANGE_MSG on the backend channel, without waiting: see vblk.supervisor.connection).
Requests already under way finish; later ones are checked against the new end. A refused
resize raises ResizeRefused (the control server answers it as an error) with nothing changed.

A limit change replaces the token buckets' rates and bursts (vblk.ratelimit) and lets the
loop look at throttled rings again at once.
"""
from __future__ import annotations

import logging
import time

from vblk.backing import Backing
from vblk.device import BlkDevice
from vblk.logs import quote
from vblk.ratelimit import Limits
from vblk.resize import check_new_size, parse_new_size
from vblk.stats import Stats
from vblk.supervisor.connection import FrontendLink
from vblk.supervisor.datapath import DataPath

log = logging.getLogger("vblk.supervisor")


class DiskOps:
    def __init__(self, device: BlkDevice, backing: Backing, data: DataPath, link: FrontendLink,
                 stats: Stats) -> None:
        self.device = device
        self.backing = backing
        self.data = data
        self.link = link
        self.live = stats

    def register(self, control) -> None:
        control.register("resize", self.resize)
        control.register("limit", self.limit)

    def resize(self, request: dict) -> dict:
        """``{"op": "resize", "size": 4096 | "64M"}``: check, apply, notify."""
        size = parse_new_size(request.get("size"))
        g = self.device.geometry
        limit, limit_what = self.backing.resize_limit()
        check_new_size(size, g.logical_block_size, limit, limit_what)
        self.backing.resize_window(g.size_bytes, size)
        old = self.device.resize(size)
        self.live.resized(size)
        notified, reason = self.link.notify_config_change()
        log.info("event=resized old_bytes=%d new_bytes=%d notified=%s reason=%s",
                 old, size, notified, quote(reason))
        return {"ok": True, "old_bytes": old, "new_bytes": size, "notified": notified,
                "reason": reason}

    def limit(self, request: dict) -> dict:
        """``{"op": "limit", "iops": N, "bps": N, "iops_burst": N, "bps_burst": N}``, every
        key optional (0 = unlimited; a burst left out with its rate given goes back to the
        default). Answers the limits in effect."""
        limiter = self.data.limiter
        now = time.monotonic()
        keys = ("iops", "bps", "iops_burst", "bps_burst")
        if any(k in request for k in keys):
            old = limiter.limits()
            values = {k: getattr(old, k) for k in keys}
            for kind in ("iops", "bps"):
                if kind in request:
                    values[kind] = request[kind] or 0
                    values[f"{kind}_burst"] = None
            for k in ("iops_burst", "bps_burst"):
                if k in request:
                    values[k] = request[k] or None
            try:
                limits = Limits(**values)
            except (TypeError, ValueError) as exc:
                return {"ok": False, "error": str(exc)}
            limiter.set(now, limits)
            log.info("event=limits_changed iops=%d bps=%d iops_burst=%s bps_burst=%s",
                     limits.iops, limits.bps, limits.iops_burst, limits.bps_burst)
            self.data.wake_at = now            # let the loop look at throttled rings again
        return {"ok": True, "limits": limiter.snapshot(now)}
