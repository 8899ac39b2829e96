"""The fuzz tests' shared knobs and the counts a run reports for ``scripts/fuzz-long`` (one
JSON line per test, in ``$VBLK_FUZZ_STATS``; nothing is written when it is unset)."""
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


def examples(default: int) -> int:
    """Examples per round: ``$VBLK_FUZZ_EXAMPLES``, else ``default``."""
    return int(os.environ.get("VBLK_FUZZ_EXAMPLES", str(default)))


def rounds() -> int:
    """Rounds (a fresh Hypothesis run each): ``$VBLK_FUZZ_ROUNDS``, default 1."""
    return int(os.environ.get("VBLK_FUZZ_ROUNDS", "1"))


def hypothesis_settings(max_examples: int, shards: int = 1):
    """Settings for a fuzz test: no deadline, no example database, every health check off.
    With several rounds (or ``shards``, copies of the test run in parallel) each must explore new
    ground, so they never run
    derandomized (Hypothesis' CI profile would replay the same examples every round)."""
    from hypothesis import HealthCheck, settings
    return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck),
                    **({"derandomize": False} if rounds() > 1 or shards > 1 else {}))
