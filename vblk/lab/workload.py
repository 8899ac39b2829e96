"""What a benchmark runs and what it measured; knows no backend, socket or process.

``Workload`` is the I/O pattern and its shape (block size, queue depth, queues, how long,
which bytes) with every check that needs no backend; ``Result`` is one run's numbers, and
``latency_summary`` turns per-request latencies into its percentiles. ``BenchError`` is the
one error a bad workload or option raises (exit status 2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from vblk.errors import ConfigError
from vblk.units import KiB, MiB, parse_size, spell_size
from vblk.virtio.constants import SECTOR_SIZE

PATTERNS = ("randread", "randwrite", "read", "write", "randrw")
MAX_QD = 1024
DEFAULT_DURATION = 5.0
DEFAULT_WORKLOADS = ("randread:4k:1", "randread:4k:32", "read:128k:8", "write:128k:8",
                     "randwrite:4k:1", "randwrite:4k:32")


class BenchError(ConfigError):
    """A workload or option that cannot run against this backend (exit status 2)."""


def size_option(text: str, what: str) -> int:
    """A size option (``--bs 4k``) read by vblk's one size grammar (``vblk.units``), its
    refusal as a BenchError like every other bad bench option."""
    try:
        return parse_size(text, what)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None


# -- what to run ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Workload:
    """What to run: the I/O pattern and its shape, how long, and over which bytes."""
    pattern: str = "randread"
    bs: int = 4 * KiB
    qd: int = 1                          # requests in flight per queue
    rwmix: int = 50                      # randrw: percent of reads
    queues: int = 1
    duration: float | None = DEFAULT_DURATION
    ops: int | None = None               # instead of duration: this many requests
    size: int | None = None              # bytes of the region; None: to the end of the disk
    offset: int = 0
    seed: int = 1
    flush_every: int = 0                 # a FLUSH after every this many writes, per queue (0: none)

    @classmethod
    def parse(cls, spec: str, **kw) -> Workload:
        """``PATTERN:BS:QD`` (e.g. ``randread:4k:32``); ``kw`` sets the other fields."""
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            raise BenchError(f"workload {spec!r} is not PATTERN:BS:QD (e.g. randread:4k:32)")
        return cls(pattern=parts[0].strip(), bs=size_option(parts[1], "block size"),
                   qd=int(parts[2]), **kw).checked()

    def checked(self) -> Workload:
        """Self, after the checks that need no backend; BenchError names the bad option."""
        if self.pattern not in PATTERNS:
            raise BenchError(f"--pattern {self.pattern!r}: use one of {', '.join(PATTERNS)}")
        if self.bs <= 0 or self.bs % SECTOR_SIZE:
            raise BenchError(f"--bs {self.bs}: a block size is a positive multiple of 512 bytes")
        if self.bs > 64 * MiB:
            raise BenchError(f"--bs {spell_size(self.bs)}: at most 64M")
        if not 1 <= self.qd <= MAX_QD:
            raise BenchError(f"--qd {self.qd}: the queue depth is 1..{MAX_QD}")
        if not 0 <= self.rwmix <= 100:
            raise BenchError(f"--rwmix {self.rwmix}: a read share in percent, 0..100")
        if not 1 <= self.queues <= 64:
            raise BenchError(f"--queues {self.queues}: 1..64")
        if (self.duration is None) == (self.ops is None):
            raise BenchError("give one of --duration and --ops")
        if self.duration is not None and not 0 < self.duration <= 86400:
            raise BenchError(f"--duration {self.duration:g}: more than 0, at most 86400 seconds")
        if self.ops is not None and self.ops <= 0:
            raise BenchError(f"--ops {self.ops}: at least 1")
        if self.offset < 0 or self.offset % SECTOR_SIZE:
            raise BenchError(f"--offset {self.offset}: a multiple of 512 bytes")
        if not 0 <= self.flush_every <= 1_000_000:
            raise BenchError(f"--flush-every {self.flush_every}: 0 (none) to 1000000 writes")
        if self.flush_every and not self.writes:
            raise BenchError(f"--flush-every {self.flush_every}: --pattern {self.pattern} "
                             f"writes nothing to flush")
        if self.size is not None and self.size < self.bs:
            raise BenchError(f"--size {self.size}: smaller than one block of {self.bs} bytes")
        return self

    @property
    def reads(self) -> bool:
        return self.pattern in ("read", "randread", "randrw")

    @property
    def writes(self) -> bool:
        return self.pattern in ("write", "randwrite", "randrw")

    @property
    def label(self) -> str:
        mix = f"{self.rwmix}" if self.pattern == "randrw" else ""
        queues = f" x{self.queues}q" if self.queues > 1 else ""
        flush = f" flush/{self.flush_every}" if self.flush_every else ""
        return f"{spell_size(self.bs)} {self.pattern}{mix} QD{self.qd}{queues}{flush}"


# -- what came out --------------------------------------------------------------------------
@dataclass(slots=True)
class Result:
    """One run's numbers. Latencies are microseconds; CPU shares are percent of one core."""
    workload: Workload
    ops: int
    reads: int
    writes: int
    errors: int
    bytes: int
    seconds: float
    lat_us: dict[str, float]
    client_cpu: float
    server_cpu: float | None = None
    backend: str = ""
    limit_iops: int = 0            # the rate limits the backend should hold (0: none known)
    limit_bps: int = 0
    limit_source: str = ""         # where they came from: "control socket" or "--iops-limit/..."
    flushes: int = 0               # FLUSH requests done (--flush-every), in ``ops`` too

    @property
    def iops_ratio(self) -> float | None:
        """Achieved IOPS / the IOPS limit (None without one)."""
        return self.iops / self.limit_iops if self.limit_iops else None

    @property
    def bps_ratio(self) -> float | None:
        """Achieved bytes/s / the bytes/s limit (None without one)."""
        if not self.limit_bps or self.seconds <= 0:
            return None
        return self.bytes / self.seconds / self.limit_bps

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        w = asdict(self.workload)
        return {"backend": self.backend, "workload": {**w, "label": self.workload.label},
                "ops": self.ops, "reads": self.reads, "writes": self.writes,
                "flushes": self.flushes,
                "errors": self.errors, "bytes": self.bytes, "seconds": round(self.seconds, 6),
                "iops": round(self.iops, 1), "mb_per_s": round(self.mb_per_s, 3),
                "lat_us": {k: round(v, 2) for k, v in self.lat_us.items()},
                "client_cpu_pct": round(self.client_cpu, 1),
                "server_cpu_pct": None if self.server_cpu is None else round(self.server_cpu, 1),
                "limits": {"iops": self.limit_iops, "bps": self.limit_bps,
                           "source": self.limit_source or None,
                           "iops_ratio": _round(self.iops_ratio, 4),
                           "bps_ratio": _round(self.bps_ratio, 4)}}


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def latency_summary(lat_ns: Sequence[int]) -> dict[str, float]:
    """min/mean/p50/p99/p99.9/max in µs; percentiles by nearest rank, so they are ordered."""
    if not lat_ns:
        return {k: 0.0 for k in ("min", "mean", "p50", "p99", "p99_9", "max")}
    s = sorted(lat_ns)
    n = len(s)

    def rank(q: float) -> float:
        return s[max(0, math.ceil(q * n) - 1)] / 1e3

    return {"min": s[0] / 1e3, "mean": sum(s) / n / 1e3, "p50": rank(0.50), "p99": rank(0.99),
            "p99_9": rank(0.999), "max": s[-1] / 1e3}
