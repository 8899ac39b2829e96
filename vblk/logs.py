"""vblk's log format: one line per event, ``key=value`` fields, on stderr.

A value is written bare when it can be (numbers, names, most paths); one with a space, a
quote, an ``=``, a backslash or a control character -- a path like ``/srv/my disk.img``, a
reason in words -- is written in double quotes, backslashes, double quotes and control
characters escaped (logfmt's convention), so a ``key=value`` parser always finds every field:
log such a value through ``quote``.

Under journald (JOURNAL_STREAM set) the timestamp is left out: the journal adds its own.
"""
from __future__ import annotations

import logging
import os
import re
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

_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: object) -> str:
    """``value`` as one log field's value: bare if it can be, else in double quotes."""
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    escaped = "".join(_ESCAPES.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x20 or ord(c) == 0x7F
                                   else c) for c in text)
    return f'"{escaped}"'


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
