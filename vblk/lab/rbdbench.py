"""librbd's own ceiling beside a comparison on RBD: ``rbd bench`` with each workload's pattern.

``bench_args`` turns a workload into ``rbd bench`` options (``--io-type read|write|readwrite``,
``--io-size`` = block size, ``--io-threads`` = requests in flight, ``--io-pattern rand|seq``,
``--rw-mix-read``) with librbd's cache off, as vblk and qsd have it. rbd bench has no time
limit, only ``--io-total``: a workload of ``--ops N`` gets N requests; one of ``--duration T``
gets T seconds' worth at a pace (the IOPS of its last rbd bench run, at first the faster
backend's), so a run lasts about T and never unbounded (a timeout kills it). ``parse_rbd_bench``
reads rbd's final ``elapsed: ... ops: ... ops/sec: ...`` line. rbd bench is librbd and its
client in one process with no vhost-user, ring or guest memory between them: what a backend
could reach at most on this cluster. It covers the whole image (no --offset/--size).
"""
from __future__ import annotations

import math
import re
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from vblk.lab.rbdimage import RbdSource, last_words
from vblk.lab.workload import Workload

NAME = "rbd bench"
_FINAL = re.compile(r"^\s*elapsed:\s*(\S+)\s+ops:\s*(\d+)\s+ops/sec:\s*(\S+)", re.M)
_IO_TYPE = {"randread": "read", "read": "read", "randwrite": "write", "write": "write",
            "randrw": "readwrite"}
MIN_OPS_PER_THREAD = 64          # the least a run does, per request in flight
TIMEOUT_SLACK = 30.0             # seconds beyond 4x the expected run before it is killed


class RbdBenchOutputError(ValueError):
    """rbd bench printed no usable final line."""


def bench_args(w: Workload, io_total: int) -> list[str]:
    """``rbd bench`` options for workload ``w`` moving ``io_total`` bytes."""
    args = ["bench", "--io-type", _IO_TYPE[w.pattern], "--io-size", str(w.bs),
            "--io-threads", str(w.qd * w.queues),
            "--io-pattern", "rand" if w.pattern.startswith("rand") else "seq",
            "--io-total", str(io_total)]
    if w.pattern == "randrw":
        args += ["--rw-mix-read", str(w.rwmix)]
    return [*args, "--rbd_cache=false"]


def parse_rbd_bench(text: str) -> tuple[int, float]:
    """(ops, ops/sec) from rbd bench's output: its last ``elapsed:`` line (the per-second
    table and the read_/write_ lines of a readwrite run are ignored)."""
    found = _FINAL.findall(text)
    if not found:
        raise RbdBenchOutputError("no final `elapsed: ... ops: ... ops/sec: ...` line")
    _, ops, rate = found[-1]
    try:
        iops = float(rate)
    except ValueError:
        raise RbdBenchOutputError(f"ops/sec {rate!r} is not a number") from None
    if int(ops) <= 0 or not math.isfinite(iops) or iops <= 0:
        raise RbdBenchOutputError(f"ops {ops}, ops/sec {rate}: nothing was measured")
    return int(ops), iops


@dataclass
class CeilingRun:
    """One rbd bench run: its rate, the CPU its process took, or why it failed."""
    workload: Workload
    command: list[str]
    ops: int = 0
    iops: float = 0.0
    seconds: float = 0.0             # wall clock of the process, start-up included
    cpu_pct: float | None = None     # user + system of the rbd process, % of one core
    error: str | None = None

    @property
    def mb_per_s(self) -> float:
        return self.iops * self.workload.bs / 1e6

    def to_dict(self) -> dict:
        return {"command": self.command, "ops": self.ops, "iops": round(self.iops, 1),
                "mb_per_s": round(self.mb_per_s, 3), "seconds": round(self.seconds, 3),
                "cpu_pct": None if self.cpu_pct is None else round(self.cpu_pct, 1),
                "error": self.error}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RbdBench:
    """Runs rbd bench on one image of a source's pool, pacing each workload by its last run."""

    def __init__(self, source: RbdSource, image: str,
                 say: Callable[[str], None] = lambda msg: None) -> None:
        self.source, self.image, self.say = source, image, say
        self.pace: dict[Workload, float] = {}        # workload (seed 0) -> last IOPS

    def run(self, w: Workload, *, hint_iops: float, tag: str = "") -> CeilingRun:
        """One run of ``w``; ``hint_iops`` paces a --duration workload's first run."""
        key = _unseeded(w)
        pace = self.pace.get(key) or max(hint_iops, 1.0)
        ops = w.ops if w.ops is not None else max(math.ceil(pace * w.duration),
                                                  MIN_OPS_PER_THREAD * w.qd * w.queues)
        argv = self.source.rbd_argv(*bench_args(w, ops * w.bs),
                                    f"{self.source.spec.pool}/{self.image}")
        timeout = TIMEOUT_SLACK + 4 * ops / pace
        run = CeilingRun(w, argv)
        cpu0, t0 = _children_cpu(), time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            run.error = f"killed after {timeout:.0f} s ({ops:,} requests at ~{pace:,.0f} IOPS)"
        else:
            run.seconds = time.monotonic() - t0
            run.cpu_pct = (_children_cpu() - cpu0) / run.seconds * 100 if run.seconds else None
            if proc.returncode != 0:
                run.error = f"exit status {proc.returncode}: {last_words(proc.stderr)}"
            else:
                try:
                    run.ops, run.iops = parse_rbd_bench(proc.stdout)
                    self.pace[key] = run.iops
                except RbdBenchOutputError as exc:
                    run.error = f"{exc}: {last_words(proc.stdout + proc.stderr)}"
        self.say(f"{tag} {NAME} {w.label}: " + (f"{run.iops:,.0f} IOPS" if run.error is None
                                                else f"failed, {run.error}"))
        return run


def _unseeded(w: Workload) -> Workload:
    return replace(w, seed=0)


def ceiling_note(source: RbdSource, image: str, workloads: list[Workload]) -> str:
    """The table's header line saying what the ceiling rows are."""
    region = any(w.offset or w.size for w in workloads)
    return (f"{NAME}: `{' '.join(source.rbd_argv('bench'))} ... {source.spec.pool}/{image}` "
            "(qsd's copy) after each pair of runs, the workload's pattern, block size and "
            "requests in flight, rbd_cache=false, the whole image"
            + (" (not --offset/--size)" if region else "")
            + "; librbd and its client in one process; its CPU is in the client CPU column")
