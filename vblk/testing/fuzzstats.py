"""Counts a fuzz run reports for ``scripts/fuzz-long`` (one JSON line per test, in
``$VBLK_FUZZ_STATS``; nothing is written when it is unset)."""
from __future__ import annotations

import json
import os
from collections import Counter


def record(kind: str, counts: Counter, seconds: float, cpu_seconds: float) -> None:
    """Append this run's counts (O_APPEND keeps concurrent xdist workers' lines whole)."""
    path = os.environ.get("VBLK_FUZZ_STATS")
    if not path:
        return
    line = json.dumps({"kind": kind, "seconds": round(seconds, 3),
                       "cpu_seconds": round(cpu_seconds, 3), **counts}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
