"""vblk's log format: one line per event, ``key=value`` fields, on stderr.

Under journald (JOURNAL_STREAM set) the timestamp is left out: the journal adds its own.
"""
from __future__ import annotations

import logging
import os
import sys


def configure_logging(level: str) -> None:
    fmt = "level=%(levelname)s logger=%(name)s %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "ts=%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), stream=sys.stderr, force=True, format=fmt,
                        datefmt="%Y-%m-%dT%H:%M:%S")
