"""vblk's log format: one line per event, ``key=value`` fields, on stderr.

Under journald (JOURNAL_STREAM set) the timestamp is left out: the journal adds its own.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

_disk: str = ""                 # the disk whose handler runs now ("" none, or the only one)
_make_record = logging.getLogRecordFactory()


def _record(*args, **kwargs) -> logging.LogRecord:
    record = _make_record(*args, **kwargs)
    if _disk and isinstance(record.msg, str):
        record.msg = f"disk={_disk} {record.msg}"     # names are [A-Za-z0-9_.-]: no %
    return record


logging.setLogRecordFactory(_record)


def enter_disk(name: str) -> str:
    """From now on lines name disk ``name``; returns the name to give ``leave_disk``."""
    global _disk
    outer, _disk = _disk, name
    return outer


def leave_disk(outer: str) -> None:
    global _disk
    _disk = outer


@contextmanager
def disk_context(name: str):
    """Lines logged inside name disk ``name`` (nested: the innermost wins)."""
    outer = enter_disk(name)
    try:
        yield
    finally:
        leave_disk(outer)


def configure_logging(level: str) -> None:
    fmt = "level=%(levelname)s logger=%(name)s %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "ts=%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True, format=fmt,
                        datefmt="%Y-%m-%dT%H:%M:%S")


class RateLimitedLog:
    """At most ``burst`` lines per ``period`` seconds per event kind; counts what it drops."""

    def __init__(self, burst: int = 20, period: float = 10.0,
                 logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("vblk")
        self.burst, self.period = burst, period
        self.window: dict[str, tuple[float, int]] = {}

    def warning(self, kind: str, fmt: str, *args) -> None:
        now = time.monotonic()
        start, count = self.window.get(kind, (now, 0))
        if now - start > self.period:
            if count > self.burst:
                self.log.warning("event=log_suppressed kind=%s count=%d", kind, count - self.burst)
            start, count = now, 0
        self.window[kind] = (start, count + 1)
        if count < self.burst:
            self.log.warning(fmt, *args)
