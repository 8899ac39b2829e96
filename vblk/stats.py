"""Live statistics: counters the supervisor bumps per request, and snapshots of them.

Theory of operation
-------------------
The hot path is two calls per request, ``started(queue, rtype, nbytes)`` when a chain is
admitted and ``finished(queue, rtype, status, latency_ns)`` when its status byte is written.
Each touches only preallocated Python lists of ints: per queue, requests and bytes indexed by
request kind (read, write, flush, get_id, discard, write_zeroes, other), a latency histogram per
kind, a latency sum
per kind, the in-flight count and the IOERR / UNSUPP counts. Nothing is allocated per request
(small ints are cached; the rest are in-place list stores) and nothing is locked: one thread,
the supervisor's event loop, writes them.

The histogram has fixed log2 buckets in microseconds: bucket ``b`` counts latencies ``L`` with
``L // 1000`` of bit length ``b``, i.e. bucket 0 is ``[0, 1)`` µs and bucket ``b >= 1`` is
``[2**(b-1), 2**b)`` µs; the last bucket also takes everything longer. Percentiles are
interpolated linearly inside the bucket they fall in, so they are estimates good to a factor
of two at worst, which is what an operator needs to tell 50 µs from 5 ms.

``snapshot()`` turns the counters into a plain dict (msgpack- and JSON-friendly) for the
control socket, ``vblk stats`` and the Prometheus exporter.
"""
from __future__ import annotations

import os
import time

KINDS = ("read", "write", "flush", "get_id", "discard", "write_zeroes", "other")
READ, WRITE, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, OTHER = range(len(KINDS))
# virtio_blk_outhdr.type -> kind (VIRTIO_BLK_T_IN 0, OUT 1, FLUSH 4, FLUSH_OUT 5, GET_ID 8,
# DISCARD 11, WRITE_ZEROES 13); a discard's or write-zeroes' bytes are the bytes it covers
_KIND_OF = {0: READ, 1: WRITE, 4: FLUSH, 5: FLUSH, 8: GET_ID, 11: DISCARD, 13: WRITE_ZEROES}
BUCKETS = 32                      # bucket 31 starts at 2**30 µs (18 minutes)
_LAST = BUCKETS - 1
STATUS_IOERR, STATUS_UNSUPP = 1, 2
QUANTILES = (("p50", 0.5), ("p99", 0.99), ("p99_9", 0.999))


def bucket_upper_us(b: int) -> int:
    """The exclusive upper bound of bucket ``b`` in µs (the last bucket is open-ended)."""
    return 1 << b


class QueueStats:
    """One virtqueue's counters. Plain attributes and lists: read them, do not replace them."""

    __slots__ = ("requests", "bytes", "latency", "latency_sum_ns", "in_flight", "ioerr",
                 "unsupp", "refused")

    def __init__(self) -> None:
        n = len(KINDS)
        self.requests = [0] * n
        self.bytes = [0] * n
        self.latency = [[0] * BUCKETS for _ in range(n)]
        self.latency_sum_ns = [0] * n
        self.in_flight = 0
        self.ioerr = 0
        self.unsupp = 0
        self.refused = 0


class Stats:
    """Counters for one vblk process: ``queues`` virtqueues and its worker pool."""

    def __init__(self, queues: int = 1, *, workers: int = 0, info: dict | None = None) -> None:
        self.queues = [QueueStats() for _ in range(queues)]
        self.workers = workers
        self.worker_restarts = 0
        self.info = dict(info or {})
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.frontend_since: float | None = None       # wall clock, None when disconnected
        self.frontend_connections = 0
        self.capacity_bytes: int | None = None         # what the guest sees (follows resizes)
        self.resizes = 0
        self.limiter = None          # a vblk.ratelimit.Limiter, set by the supervisor

    # -- the hot path --------------------------------------------------------------------
    def started(self, queue: int, rtype: int, nbytes: int) -> None:
        """A request of virtio type ``rtype`` moving ``nbytes`` of data was admitted."""
        q = self.queues[queue]
        k = _KIND_OF.get(rtype, OTHER)
        q.requests[k] += 1
        q.bytes[k] += nbytes
        q.in_flight += 1

    def finished(self, queue: int, rtype: int, status: int, latency_ns: int) -> None:
        """The request's status byte (``status``) was written ``latency_ns`` after ``started``."""
        q = self.queues[queue]
        k = _KIND_OF.get(rtype, OTHER)
        q.in_flight -= 1
        if status:
            if status == STATUS_IOERR:
                q.ioerr += 1
            elif status == STATUS_UNSUPP:
                q.unsupp += 1
        b = (latency_ns // 1000).bit_length()
        q.latency[k][b if b < _LAST else _LAST] += 1
        q.latency_sum_ns[k] += latency_ns

    def served(self, queue: int, count: int, nbytes: int) -> None:
        """``count`` reads of ``nbytes`` in all were started and finished OK at once (page-cache
        hits): ``started`` + ``finished`` with a latency of 0 for each, in one step."""
        q = self.queues[queue]
        q.requests[READ] += count
        q.bytes[READ] += nbytes
        q.latency[READ][0] += count

    def refused(self, queue: int) -> None:
        """A chain the device could not parse was returned without a status (no ``started``)."""
        self.queues[queue].refused += 1

    # -- rare events ---------------------------------------------------------------------
    def frontend_connected(self) -> None:
        self.frontend_since = time.time()
        self.frontend_connections += 1

    def frontend_disconnected(self) -> None:
        self.frontend_since = None

    def worker_restarted(self) -> None:
        self.worker_restarts += 1

    def resized(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.resizes += 1

    # -- reading -------------------------------------------------------------------------
    def snapshot(self, *, histograms: bool = False) -> dict:
        """Everything as a plain dict; ``histograms`` adds the raw latency buckets per kind
        (``latency_buckets``, bucket ``b`` below ``bucket_upper_us(b)`` µs) and sums."""
        now = time.time()
        queues = []
        for index, q in enumerate(self.queues):
            kinds = {}
            for k, name in enumerate(KINDS):
                entry = {"requests": q.requests[k], "bytes": q.bytes[k],
                         "latency_us": percentiles(q.latency[k])}
                if histograms:
                    entry["latency_buckets"] = list(q.latency[k])
                    entry["latency_sum_ns"] = q.latency_sum_ns[k]
                kinds[name] = entry
            merged = [sum(column) for column in zip(*q.latency)]
            queues.append({
                "queue": index,
                "requests": sum(q.requests),
                "bytes": sum(q.bytes),
                "in_flight": q.in_flight,
                "ioerr": q.ioerr,
                "unsupp": q.unsupp,
                "refused": q.refused,
                "latency_us": percentiles(merged),
                "types": kinds,
            })
        since = self.frontend_since
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "started_at": self.started_at,
            "time": now,
            "frontend": {"connected": since is not None, "since": since,
                         "connections": self.frontend_connections},
            "workers": {"count": self.workers, "restarts": self.worker_restarts},
            "disk": {"capacity_bytes": self.capacity_bytes, "resizes": self.resizes},
            "info": dict(self.info),
            "queues": queues,
            "limits": None if self.limiter is None else self.limiter.snapshot(time.monotonic()),
        }


def percentiles(buckets: list[int]) -> dict[str, float | None]:
    """p50 / p99 / p99.9 in µs from a log2 histogram (None when it is empty)."""
    total = sum(buckets)
    out: dict[str, float | None] = {}
    for name, q in QUANTILES:
        out[name] = None if total == 0 else round(_quantile(buckets, total, q), 1)
    return out


def _quantile(buckets: list[int], total: int, q: float) -> float:
    rank = q * total                      # the rank-th smallest value, 0 < rank <= total
    seen = 0
    for b, count in enumerate(buckets):
        if count and seen + count >= rank:
            low = 0 if b == 0 else 1 << (b - 1)
            high = 1 << b
            return low + (high - low) * (rank - seen) / count
        seen += count
    return float(1 << _LAST)
