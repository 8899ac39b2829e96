"""``vblk bench``: load any vhost-user-blk backend and measure it; compare vblk with qsd.

Theory of operation
-------------------
The load comes from the package's own frontend -- ``GuestRam`` and ``VhostUserFrontend``
(``vblk.testing.frontend``: memfd guest RAM, QEMU 7.2's handshake) and ``SplitDriver``
(``vblk.testing.driver``: the split ring, driver side) -- driven the way a guest's
virtio-blk driver with preallocated requests drives a device:

* Every in-flight position (a *slot*) owns, for the whole run, a request header with its
  status byte, a data buffer of ``bs`` bytes and a descriptor chain (or one indirect
  descriptor and its table), all written once at setup. A request rewrites only the header's
  type and sector, resets the status byte and appends the slot's head to the avail ring;
  ``randrw`` also flips the data descriptors' WRITE flag when a slot changes direction.
  Nothing is allocated or copied per request.
* Each pass of the loop fills every free slot, publishes the new heads with one 16-bit store
  of ``avail.idx`` and at most one kick per queue, then reaps the used rings. Only when
  nothing completed does it re-arm interrupts (``used_event``, or clearing NO_INTERRUPT) and
  sleep on the call eventfds, as Linux's virtio-blk does (``--busy-poll`` spins instead).
* ``perf_counter_ns`` is read once per publish and once per reaped batch: a request's latency
  runs from just before the publish that made it visible to just after the read of
  ``used.idx`` that showed it complete. (Taken
  after the kick instead, it can miss the whole request: on two CPUs the woken backend may
  run, and complete it, before ``eventfd_write`` returns.)
* Every status byte is checked; a non-OK (or never written) status counts as an error. A used
  id that is not in flight, a silent backend (``timeout``), a closed socket or a signalled
  error eventfd ends the run with a ``BackendError``.
* Client CPU is this process's user + system time (``time.process_time_ns``, the precise
  form of ``os.times()``) over the wall time of the load: a client that is the bottleneck
  shows ~100 %. Server CPU (``--compare``) is the same for the server's process group.

``compare`` serves two copies of one image (vblk takes an exclusive lock) with vblk and
qemu-storage-daemon in the same cache mode, runs each workload against both, alternately,
for several rounds, and reports medians and the ratio vblk/qsd. ``plot_sweep`` draws IOPS and
p50 latency against queue depth (matplotlib, imported only there).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TextIO

from vblk.errors import ConfigError
from vblk.interpreter import python_command
from vblk.testing.driver import RingLayout, SplitDriver
from vblk.testing.frontend import (BackendClosed, BackendError, BackendTimeout, BadReply,
                                   GuestRam, VhostUserFrontend, VringError)
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import SECTOR_SIZE, DescFlag, Feature
from vblk.virtio.ring import DESC, MAX_INDIRECT, USED_ELEM

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PATTERNS = ("randread", "randwrite", "read", "write", "randrw")
MAX_RING = 1024                 # libvhost-user's (so qsd's) VIRTQUEUE_MAX_SIZE
MAX_QD = 1024
MAX_RAM = 4 * GiB               # guest RAM the client may map for its buffers
PAGE = 4096
HEADER_BLOCK = 64               # 16-byte header + status byte, cache-line apart
STATUS_UNSET = 0xFF
DEFAULT_DURATION = 5.0
DEFAULT_WORKLOADS = ("randread:4k:1", "randread:4k:32", "read:128k:8", "write:128k:8",
                     "randwrite:4k:32")
SWEEP_QDS = (1, 2, 4, 8, 16, 32)
BACKENDS = ("vblk", "qsd")
START_TIMEOUT = 30.0

_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_T_IN, _T_OUT = 0, 1


class BenchError(ConfigError):
    """A workload or option that cannot run against this backend (exit status 2)."""


# -- sizes and workloads ------------------------------------------------------------------
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_size(text: str, what: str = "size") -> int:
    """``4k``, ``128K``, ``1M``, ``1GiB``, ``4096`` -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise BenchError(f"{what} {text!r} is not a size (a number with an optional K/M/G/T suffix)")
    return int(match[1]) * _UNITS[match[2].lower()]


def format_size(n: int) -> str:
    """The shortest exact ``4k`` / ``128k`` / ``1M`` spelling of ``n`` bytes."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


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

    @classmethod
    def parse(cls, spec: str, **kw) -> "Workload":
        """``PATTERN:BS:QD`` (e.g. ``randread:4k:32``); ``kw`` sets the other fields."""
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].strip().isdigit():
            raise BenchError(f"workload {spec!r} is not PATTERN:BS:QD (e.g. randread:4k:32)")
        return cls(pattern=parts[0].strip(), bs=parse_size(parts[1], "block size"),
                   qd=int(parts[2]), **kw).checked()

    def checked(self) -> "Workload":
        """Self, after the checks that need no backend; BenchError names the bad option."""
        if self.pattern not in PATTERNS:
            raise BenchError(f"--pattern {self.pattern!r}: use one of {', '.join(PATTERNS)}")
        if self.bs <= 0 or self.bs % SECTOR_SIZE:
            raise BenchError(f"--bs {self.bs}: a block size is a positive multiple of 512 bytes")
        if self.bs > 64 * MiB:
            raise BenchError(f"--bs {format_size(self.bs)}: at most 64M")
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
        return f"{format_size(self.bs)} {self.pattern}{mix} QD{self.qd}{queues}"


# -- results --------------------------------------------------------------------------------
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
    limit_source: str = ""         # where they came from: "control socket" or "--limit-*"

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


def backend_limits(socket_path: str | os.PathLike, timeout: float = 2.0) -> tuple[int, int] | None:
    """(IOPS, bytes/s) limits of the vblk serving ``socket_path``, asked of its control socket
    (``socket_path`` + ``.ctl``); None if there is none or it does not say (qsd, an old vblk)."""
    from vblk.control import ControlError, default_control_path, fetch_stats
    path = default_control_path(os.fspath(socket_path))
    if not os.path.exists(path):
        return None
    try:
        limits = fetch_stats(path, timeout=timeout).get("limits")
    except ControlError:
        return None
    if not isinstance(limits, dict):
        return None
    return int(limits.get("iops") or 0), int(limits.get("bps") or 0)


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


# -- the load -------------------------------------------------------------------------------
class _Slot:
    """One preallocated request: its head, where its header, status byte and data live."""
    __slots__ = ("head", "hdr", "status", "data_descs", "is_read", "t0")

    def __init__(self, head: int, hdr: int, data_descs: list[tuple[int, int, int, int, int]],
                 is_read: bool) -> None:
        self.head, self.hdr, self.status = head, hdr, hdr + OUTHDR.size
        self.data_descs = data_descs     # (ram offset, addr, len, flags without WRITE, next)
        self.is_read = is_read
        self.t0 = -1                     # publish time; -1 when not in flight


class _Queue:
    __slots__ = ("index", "driver", "kick", "used_off", "mask", "slots", "free", "by_head")

    def __init__(self, index: int, driver: SplitDriver, used_off: int, size: int) -> None:
        self.index, self.driver, self.kick = index, driver, -1
        self.used_off, self.mask = used_off, size - 1
        self.slots: list[_Slot] = []
        self.free: list[_Slot] = []
        self.by_head: list[_Slot | None] = [None] * size


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


Progress = Callable[[int, int, int], None]      # (elapsed ns, completed, errors)


class Runner:
    """One connection to a backend, set up for one workload: ``run()`` it, then ``close()``.

    The constructor does the handshake and every check that needs the backend's answers
    (queues offered, capacity, block size, read-only, segment limits); BenchError says which
    option does not fit."""

    def __init__(self, socket_path: str | os.PathLike, workload: Workload, *,
                 timeout: float = 10.0, busy_poll: bool = False) -> None:
        self.w = workload.checked()
        self.timeout_ns = int(timeout * 1e9)
        self.busy_poll = busy_poll
        self.frontend: VhostUserFrontend | None = None
        self.ram: GuestRam | None = None
        self.queues: list[_Queue] = []
        self.broken = False
        try:
            self._setup(socket_path, timeout)
        except BaseException:
            self.close(graceful=False)
            raise

    # -- setup ---------------------------------------------------------------------------
    def _setup(self, path: str | os.PathLike, timeout: float) -> None:
        w = self.w
        fe = self.frontend = VhostUserFrontend(path, timeout=timeout)
        cfg = fe.handshake()
        feats = fe.negotiate()
        if w.queues > fe.max_queues:
            raise BenchError(f"--queues {w.queues}: the backend offers {fe.max_queues} "
                             f"queue{'s' * (fe.max_queues != 1)} (GET_QUEUE_NUM)")
        if w.writes and feats & Feature.BLK_RO.mask:
            raise BenchError(f"--pattern {w.pattern} writes, and the backend's disk is read-only")
        lbs = cfg.blk_size if feats & Feature.BLK_BLK_SIZE.mask and cfg.blk_size else SECTOR_SIZE
        capacity = cfg.capacity * SECTOR_SIZE
        size = capacity - w.offset if w.size is None else w.size
        if w.bs % lbs or w.offset % lbs or size % lbs:
            raise BenchError(f"--bs/--offset/--size must be multiples of the disk's logical "
                             f"block size, {lbs} bytes")
        if w.offset + max(size, w.bs) > capacity:
            raise BenchError(f"region {w.offset}+{size} (--offset/--size) does not fit the "
                             f"disk's {capacity} bytes")
        self.capacity, self.region_size = capacity, size
        self.nblocks = size // w.bs
        piece = cfg.size_max if feats & Feature.BLK_SIZE_MAX.mask and cfg.size_max else w.bs
        pieces = -(-w.bs // piece)
        if feats & Feature.BLK_SEG_MAX.mask and cfg.seg_max and pieces > cfg.seg_max:
            raise BenchError(f"--bs {format_size(w.bs)} needs {pieces} segments of at most "
                             f"{piece} bytes; the backend takes {cfg.seg_max}")
        descs = pieces + 2
        indirect = w.qd * descs > MAX_RING
        if indirect and not feats & Feature.RING_INDIRECT_DESC.mask:
            raise BenchError(f"--qd {w.qd} needs more than {MAX_RING} descriptors and the "
                             "backend has no indirect descriptors")
        if indirect and descs > MAX_INDIRECT:
            raise BenchError(f"--bs {format_size(w.bs)}: {descs} descriptors per request")
        ring_size = _pow2(w.qd if indirect else w.qd * descs)

        # Guest RAM: the rings, then headers, indirect tables and page-aligned data buffers.
        layouts, cursor = [], 0
        for _ in range(w.queues):
            layouts.append(RingLayout.at(cursor, ring_size))
            cursor = _align(layouts[-1].end, PAGE)
        nslots = w.qd * w.queues
        headers, cursor = cursor, _align(cursor + HEADER_BLOCK * nslots, PAGE)
        tables, cursor = cursor, _align(cursor + (16 * descs * nslots if indirect else 0), PAGE)
        data, cursor = cursor, cursor + _align(w.bs, PAGE) * nslots
        if cursor > MAX_RAM:
            raise BenchError(f"--qd {w.qd} x --queues {w.queues} x --bs {format_size(w.bs)} "
                             f"needs {cursor // MiB} MiB of buffers; at most {MAX_RAM // MiB}")
        self.ram = GuestRam(-(-cursor // MiB))
        fe.set_memory(self.ram)

        rng = random.Random(w.seed ^ 0x5EED)
        first_read = w.pattern != "write" and w.pattern != "randwrite"
        event_idx = bool(feats & Feature.RING_EVENT_IDX.mask)
        view = self.ram.view
        for qi, layout in enumerate(layouts):
            driver = SplitDriver(view, layout, base=0, event_idx=event_idx)
            q = _Queue(qi, driver, layout.used + 4, ring_size)
            self.queues.append(q)
            for k in range(w.qd):
                n = qi * w.qd + k
                hdr, buf = headers + HEADER_BLOCK * n, data + _align(w.bs, PAGE) * n
                if w.writes:
                    view[buf:buf + w.bs] = rng.randbytes(w.bs)
                bufs = [(hdr, OUTHDR.size, 0)]
                bufs += [(buf + i * piece, min(piece, w.bs - i * piece), _WRITE * first_read)
                         for i in range(pieces)]
                bufs.append((hdr + OUTHDR.size, 1, _WRITE))
                if indirect:
                    table = tables + 16 * descs * n
                    entries = [(a, ln, f | (_NEXT if i + 1 < descs else 0), i + 1 if i + 1 < descs else 0)
                               for i, (a, ln, f) in enumerate(bufs)]
                    driver.write_table(table, entries)
                    head = driver.alloc_descriptors(1)[0]
                    driver.write_descriptor(head, table, 16 * descs, _INDIRECT)
                    where = [table + 16 * i for i in range(descs)]
                    nexts = [e[3] for e in entries]
                else:
                    idx = driver.alloc_descriptors(descs)
                    for i, (a, ln, f) in enumerate(bufs):
                        last = i + 1 == descs
                        driver.write_descriptor(idx[i], a, ln, f | (0 if last else _NEXT),
                                                0 if last else idx[i + 1])
                    head = idx[0]
                    where = [layout.desc + 16 * i for i in idx]
                    nexts = [0 if i + 1 == descs else idx[i + 1] for i in range(descs)]
                data_descs = [(where[i], a, ln, _NEXT, nexts[i])
                              for i, (a, ln, _f) in enumerate(bufs) if 0 < i < descs - 1]
                view[hdr + OUTHDR.size] = STATUS_UNSET
                slot = _Slot(head, hdr, data_descs, first_read)
                q.slots.append(slot)
                q.by_head[head] = slot
            q.free = list(reversed(q.slots))
            q.kick = fe.start_queue(qi, layout).kick
            driver.suppress_interrupts()
        self._poll = select.poll()
        self._errfds = {fe.queues[q.index].err for q in self.queues}
        for q in self.queues:
            self._poll.register(fe.queues[q.index].call, select.POLLIN)
        for fd in (*self._errfds, fe.sock.fileno()):
            self._poll.register(fd, select.POLLIN)

    # -- the load loop ---------------------------------------------------------------------
    def run(self, progress: Progress | None = None,
            cpu_probe: Callable[[], float] | None = None) -> Result:
        """Run the workload once; ``cpu_probe()`` (seconds of CPU) is read around the load."""
        w = self.w
        view = self.ram.view
        pack_hdr, unpack_used, pack_desc = OUTHDR.pack_into, USED_ELEM.unpack_from, DESC.pack_into
        pc = time.perf_counter_ns
        rnd = random.Random(w.seed).random
        nblocks, spb, first = self.nblocks, w.bs // SECTOR_SIZE, w.offset // SECTOR_SIZE
        rand = w.pattern.startswith("rand")
        mixed = w.pattern == "randrw"
        share = w.rwmix / 100
        fixed_read = w.pattern in ("read", "randread")
        limit = -1 if w.ops is None else w.ops
        lat = array("q")
        record = lat.append
        queues = self.queues
        submitted = completed = errors = reads = inflight = cursor = 0
        batch: list[_Slot] = []
        server0 = cpu_probe() if cpu_probe else None
        cpu0 = time.process_time_ns()
        t_start = pc()
        end = None if w.duration is None else t_start + int(w.duration * 1e9)
        last_done = t_start
        next_tick = t_start + 250_000_000
        submitting = True
        while True:
            if submitting:
                if (end is not None and pc() >= end) or submitted == limit:
                    submitting = False
                else:
                    for q in queues:
                        free = q.free
                        if not free:
                            continue
                        push = q.driver.push_head
                        while free and submitted != limit:
                            s = free.pop()
                            if rand:
                                block = int(rnd() * nblocks)
                            else:
                                block = cursor
                                cursor = cursor + 1 if cursor + 1 < nblocks else 0
                            if mixed:
                                is_read = rnd() < share
                                if is_read != s.is_read:
                                    s.is_read = is_read
                                    for off, addr, ln, flags, nxt in s.data_descs:
                                        pack_desc(view, off, addr, ln,
                                                  flags | _WRITE if is_read else flags, nxt)
                            else:
                                is_read = fixed_read
                            pack_hdr(view, s.hdr, _T_IN if is_read else _T_OUT, 0,
                                     first + block * spb)
                            view[s.status] = STATUS_UNSET
                            push(s.head)
                            batch.append(s)
                            submitted += 1
                        # Stamp before publishing: the kick can let the backend run (and
                        # finish) before eventfd_write returns.
                        t = pc()
                        for s in batch:
                            s.t0 = t
                        if q.driver.publish():
                            os.eventfd_write(q.kick, 1)
                        inflight += len(batch)
                        batch.clear()
            if not inflight:
                if not submitting:
                    break
                continue
            # Reap the used rings; the clock is read after used.idx, so nothing reaped can
            # have completed after it.
            done = 0
            for q in queues:
                driver = q.driver
                n = driver.used_pending()
                if not n:
                    continue
                t = pc()
                idx, mask, base, by_head, free = (driver.last_used_idx, q.mask, q.used_off,
                                                  q.by_head, q.free)
                for _ in range(n):
                    head, _len = unpack_used(view, base + ((idx & mask) << 3))
                    idx = (idx + 1) & 0xFFFF
                    s = by_head[head] if head <= mask else None
                    if s is None or s.t0 < 0:
                        self.broken = True
                        raise BadReply(f"queue {q.index}: the backend returned id {head}, "
                                       "which is not in flight")
                    record(t - s.t0)
                    s.t0 = -1
                    if view[s.status]:
                        errors += 1
                    if s.is_read:
                        reads += 1
                    free.append(s)
                driver.last_used_idx = idx
                done += n
            if done:
                completed += done
                inflight -= done
                last_done = t
            else:
                self._sleep(last_done + self.timeout_ns, inflight)
                t = pc()
            if progress is not None and t >= next_tick:
                progress(t - t_start, completed, errors)
                next_tick = t + 250_000_000
        cpu1 = time.process_time_ns()
        server1 = cpu_probe() if cpu_probe else None
        seconds = (last_done - t_start) / 1e9
        wall = (pc() - t_start) / 1e9
        client = max(0, cpu1 - cpu0) / 1e9 / wall * 100 if wall else 0.0
        server = None if server0 is None else (server1 - server0) / wall * 100
        if progress is not None:
            progress(last_done - t_start, completed, errors)
        return Result(workload=w, ops=completed, reads=reads, writes=completed - reads,
                      errors=errors, bytes=completed * w.bs, seconds=seconds,
                      lat_us=latency_summary(lat), client_cpu=client, server_cpu=server)

    def _sleep(self, deadline_ns: int, inflight: int) -> None:
        """Wait for a completion: re-arm interrupts and sleep, or spin with ``busy_poll``."""
        now = time.perf_counter_ns()
        if now >= deadline_ns:
            self.broken = True
            raise BackendTimeout(f"{inflight} requests in flight and none completed for "
                                 f"{self.timeout_ns / 1e9:g} s")
        if self.busy_poll:
            events = self._poll.poll(0)
        else:
            if any([q.driver.arm_interrupts() for q in self.queues]):
                events = []
            else:
                events = self._poll.poll(min(250, max(1, (deadline_ns - now) // 1_000_000)))
            for q in self.queues:
                q.driver.suppress_interrupts()
        for fd, _ in events:
            if fd in self._errfds:
                if _drain(fd):
                    self.broken = True
                    raise VringError("the backend signalled an error on a queue's error eventfd")
            elif fd == self.frontend.sock.fileno():
                self._check_socket(inflight)
            else:
                _drain(fd)

    def _check_socket(self, inflight: int) -> None:
        try:
            data = self.frontend.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.broken = True
            raise BackendClosed(f"connection failed: {exc}") from exc
        self.broken = True
        if not data:
            raise BackendClosed(f"the backend closed the connection with {inflight} requests "
                                "in flight")
        raise BadReply("the backend sent an unsolicited message on the frontend channel")

    # -- lifetime ------------------------------------------------------------------------
    def close(self, *, graceful: bool = True) -> None:
        """Stop the queues (unless broken), unmap the rings and guest RAM, close the socket."""
        fe, self.frontend = self.frontend, None
        try:
            if fe is not None and graceful and not self.broken:
                for q in self.queues:
                    if q.index in fe.queues:
                        fe.stop_queue(q.index)
        finally:
            for q in self.queues:
                q.driver.close()
            self.queues = []
            if fe is not None:
                fe.close()
            if self.ram is not None:
                self.ram.close()
                self.ram = None

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(graceful=exc_type is None)


def _drain(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def run_workload(socket_path: str | os.PathLike, workload: Workload, *, timeout: float = 10.0,
                 busy_poll: bool = False, progress: Progress | None = None,
                 cpu_probe: Callable[[], float] | None = None, backend: str = "") -> Result:
    """Connect, run ``workload`` once, disconnect; the Result's ``backend`` is the label."""
    with Runner(socket_path, workload, timeout=timeout, busy_poll=busy_poll) as runner:
        result = runner.run(progress, cpu_probe)
    result.backend = backend or os.fspath(socket_path)
    return result


class ProgressLine:
    """A progress bar on a terminal (one line, rewritten), or a line a second elsewhere."""

    def __init__(self, stream: TextIO, label: str, workload: Workload) -> None:
        self.stream, self.label, self.w = stream, label, workload
        self.tty = stream.isatty()
        self.last = (0, 0)                  # (elapsed ns, completed) at the previous call
        self.state: tuple[int, int, int] | None = None
        self.printed_at = time.monotonic()

    def __call__(self, elapsed_ns: int, completed: int, errors: int) -> None:
        t0, c0 = self.last
        self.last = (elapsed_ns, completed)
        self.rate = (completed - c0) / ((elapsed_ns - t0) / 1e9) if elapsed_ns > t0 else 0.0
        self.state = (elapsed_ns, completed, errors)
        now = time.monotonic()
        if self.tty or now - self.printed_at >= 1.0:
            self.printed_at = now
            self._show()
            self.state = None

    def _show(self) -> None:
        elapsed_ns, completed, errors = self.last[0], self.last[1], self.state[2]
        done = (elapsed_ns / 1e9 / self.w.duration if self.w.duration
                else completed / self.w.ops)
        bar = "#" * int(min(1.0, done) * 20)
        err = f"  {errors} errors" if errors else ""
        line = (f"{self.label} [{bar:<20}] {elapsed_ns / 1e9:6.1f} s {completed:>10,} ops "
                f"{self.rate / 1e3:8.1f}k IOPS{err}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Clear the terminal line; elsewhere print the last state if it was not printed."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        elif self.state is not None:
            self._show()


# -- reporting --------------------------------------------------------------------------------
def format_result(r: Result) -> str:
    w, lat = r.workload, r.lat_us
    span = (f"{w.duration:g} s" if w.duration is not None else f"{w.ops:,} ops")
    lines = [
        f"{r.backend}: {w.label}, {w.queues} queue{'s' * (w.queues > 1)}, region "
        f"{format_size(w.offset)}+{format_size(w.size) if w.size else 'end'}, {span}, seed {w.seed}",
        f"  ops         {r.ops:,} (reads {r.reads:,}, writes {r.writes:,}) in {r.seconds:.3f} s",
        f"  errors      {r.errors}" + ("   <-- requests failed" if r.errors else ""),
        f"  IOPS        {r.iops:,.0f}",
        f"  MB/s        {r.mb_per_s:,.1f}   (10^6 bytes)",
        f"  latency µs  p50 {lat['p50']:.1f}   p99 {lat['p99']:.1f}   p99.9 {lat['p99_9']:.1f}"
        f"   (min {lat['min']:.1f}, mean {lat['mean']:.1f}, max {lat['max']:.1f})",
        f"  client CPU  {r.client_cpu:.0f} % of one core",
    ]
    if r.server_cpu is not None:
        lines.append(f"  server CPU  {r.server_cpu:.0f} % of one core")
    source = f" ({r.limit_source})" if r.limit_source else ""
    if r.limit_iops:
        lines.append(f"  IOPS limit  {r.limit_iops:,}{source}: achieved {r.iops:,.1f} = "
                     f"{r.iops_ratio:.3f} of the limit")
    if r.limit_bps:
        lines.append(f"  bps limit   {r.limit_bps:,} bytes/s{source}: achieved "
                     f"{r.bytes / r.seconds:,.0f} = {r.bps_ratio:.3f} of the limit")
    return "\n".join(lines)


# -- servers for --compare --------------------------------------------------------------------
def qsd_command(image: str | os.PathLike, sock: str, *extra: str,
                writethrough: bool | None = None, queues: int = 1,
                discard: bool = False) -> list[str]:
    """A qemu-storage-daemon vhost-user-blk export of the raw ``image`` (node ``disk0``), the
    one the tests and ``--compare`` use: page cache on (cache.direct=off), and with
    ``writethrough`` given, a flush after every write (True) or none (False). ``extra`` goes
    on qsd's command line first (e.g. a QMP monitor). ``discard`` passes the guest's discards
    to the file (``discard=unmap`` on both nodes)."""
    path = os.fspath(image).replace(",", ",,")
    unmap = ",discard=unmap" if discard else ""
    export = ("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
              f"addr.path={sock},writable=on,num-queues={queues}")
    if writethrough is not None:
        export += f",writethrough={'on' if writethrough else 'off'}"
    return ["qemu-storage-daemon", *extra,
            "--blockdev", f"driver=file,node-name=file0,filename={path},cache.direct=off{unmap}",
            "--blockdev", f"driver=raw,node-name=disk0,file=file0{unmap}",
            "--export", export]


def vblk_command(image: str | os.PathLike, sock: str, *, writethrough: bool,
                 extra: Sequence[str] = ()) -> list[str]:
    return python_command("vblk.cli", "serve", os.fspath(image), "--socket-path", sock,
            "--log-level", "warning", "--writethru" if writethrough else "--writeback", *extra)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _stat_fields(int(name))[2:3] == [str(pgid).encode()]:
            pids.append(int(name))
    return pids


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (state ppid pgrp ... utime(11) stime(12)), or []."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid``."""
    total = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Server:
    """A backend started for --compare in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], sock: str, log_path: Path,
                 env: dict | None = None) -> None:
        self.name, self.cmd, self.sock, self.log_path = name, cmd, sock, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BackendClosed(f"{self.name} exited with status {self.proc.returncode}: "
                                f"{self.log_tail() or '(empty log)'}")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if os.path.exists(self.sock):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    try:
                        probe.connect(self.sock)
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise BackendTimeout(f"{self.name} did not listen on {self.sock} within {timeout:g} s: "
                             f"{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # a worker left behind
        except (ProcessLookupError, PermissionError):
            pass


def copy_image(src: Path, dst: Path) -> None:
    """Copy keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range), then flush it to disk so
    write-back of the copy does not run during the first measurement."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:                      # ENXIO: only a hole is left
                break
            stop = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < stop:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), stop - off, off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range stopped at {off} of {src}")
                off += n
            pos = stop
        os.ftruncate(fo.fileno(), size)
        os.fsync(fo.fileno())


def source_version(repo: str) -> str | None:
    """The git commit of the vblk code in ``repo``, with the files changed since, and any
    VBLK_* environment variables (the served code, for a result to be reproducible)."""
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VBLK_"))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no",
                                "--", "vblk", "workers", "cli"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return env or None
    if head.returncode != 0:
        return env or None
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    text = head.stdout.strip() + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")
    return f"{text}{' ' + env if env else ''}"


def split_cache_mode(vblk_args: str, cache: str | None) -> tuple[bool, list[str]]:
    """(writethrough?, vblk's extra args without the cache flag) from --vblk-args/--cache."""
    try:
        args = shlex.split(vblk_args)
    except ValueError as exc:
        raise BenchError(f"--vblk-args {vblk_args!r}: {exc}") from None
    flags = [a for a in args if a in ("--writeback", "--writethru")]
    rest = [a for a in args if a not in ("--writeback", "--writethru")]
    implied = None if not flags else ("writeback" if flags[-1] == "--writeback" else "writethrough")
    if cache is not None and cache not in ("writethrough", "writeback"):
        raise BenchError(f"--cache {cache!r}: writethrough or writeback")
    if cache is not None and implied is not None and cache != implied:
        raise BenchError(f"--cache {cache} contradicts {flags[-1]} in --vblk-args")
    mode = cache or implied or "writethrough"
    for bad in ("--socket-path", "--fd", "--log-level"):
        if any(a == bad or a.startswith(bad + "=") for a in rest):
            raise BenchError(f"--vblk-args: {bad} is set by vblk bench")
    return mode == "writethrough", rest


@dataclass
class Comparison:
    """Everything ``compare`` measured: per workload, every run of both backends."""
    image: str
    writethrough: bool
    rounds: int
    commands: dict[str, list[str]]
    runs: dict[str, dict[str, list[Result]]] = field(default_factory=dict)   # label -> backend
    sweep: dict[int, dict[str, list[Result]]] = field(default_factory=dict)  # qd -> backend
    sweep_label: str = ""
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)   # start, end
    source: str | None = None            # the vblk code that was served (git)
    load: str = "frontend"               # what made the load: "frontend" or "guest" (fio)
    notes: list[str] = field(default_factory=list)   # more header lines for the table

    @staticmethod
    def medians(results: list[Result]) -> dict:
        def med(values: list[float | None]) -> float | None:
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None
        return {"iops": med([r.iops for r in results]),
                "mb_per_s": med([r.mb_per_s for r in results]),
                "p50_us": med([r.lat_us["p50"] for r in results]),
                "p99_us": med([r.lat_us["p99"] for r in results]),
                "p99_9_us": med([r.lat_us["p99_9"] for r in results]),
                "client_cpu_pct": med([r.client_cpu for r in results]),
                "server_cpu_pct": med([r.server_cpu for r in results]),
                "errors": sum(r.errors for r in results),
                "iops_range": [min(r.iops for r in results), max(r.iops for r in results)]}

    @staticmethod
    def ratios(a: dict, b: dict) -> dict:
        def ratio(x: float | None, y: float | None) -> float | None:
            return None if not x or not y else x / y
        return {k: ratio(a[k], b[k]) for k in ("iops", "mb_per_s", "p50_us")}

    @property
    def errors(self) -> int:
        return sum(r.errors for group in (*self.runs.values(), *self.sweep.values())
                   for results in group.values() for r in results)

    def to_dict(self) -> dict:
        def rows(groups: dict) -> list[dict]:
            out = []
            for key, by_backend in groups.items():
                med = {b: self.medians(rs) for b, rs in by_backend.items()}
                out.append({"workload": next(iter(by_backend.values()))[0].workload.label,
                            "qd": next(iter(by_backend.values()))[0].workload.qd,
                            "median": med, "ratio_vblk_qsd": self.ratios(med["vblk"], med["qsd"]),
                            "runs": {b: [r.to_dict() for r in rs] for b, rs in by_backend.items()}})
            return out
        return {"image": self.image, "cache": "writethrough" if self.writethrough else "writeback",
                "rounds": self.rounds, "commands": self.commands, "errors": self.errors,
                "workloads": rows(self.runs), "sweep": rows(self.sweep),
                "sweep_workload": self.sweep_label or None, "loadavg": self.loadavg,
                "vblk_source": self.source, "load": self.load, "notes": self.notes}


def provenance_lines(source: str | None, loadavg: list[tuple[float, float, float]]) -> list[str]:
    """The header lines saying which vblk code ran and how loaded the machine was."""
    out = []
    if source:
        out.append(f"  vblk source: {source}")
    if loadavg:
        out.append("  load average (1/5/15 min) at start " + "/".join(f"{v:.2f}" for v in loadavg[0])
                   + ", at end " + "/".join(f"{v:.2f}" for v in loadavg[-1]))
    return out


def format_comparison(c: Comparison) -> str:
    cache = "writethrough" if c.writethrough else "writeback"
    by = ", fio in the test guest" if c.load == "guest" else ""
    out = [f"vblk vs qemu-storage-daemon{by}, {cache}, medians of {c.rounds} round"
           f"{'s' * (c.rounds > 1)} (alternating)",
           f"  vblk: {shlex.join(c.commands['vblk'])}",
           f"  qsd:  {shlex.join(c.commands['qsd'])}"]
    out += [f"  {note}" for note in c.notes]
    out += provenance_lines(c.source, c.loadavg)
    out.append("")
    head = (f"{'workload':<20} {'backend':<9} {'IOPS':>10} {'MB/s':>9} {'p50 µs':>9} "
            f"{'p99 µs':>9} {'p99.9 µs':>9} {'errors':>6} "
            f"{'guest CPU' if c.load == 'guest' else 'client CPU':>10} {'server CPU':>10}")
    out += [head, "-" * len(head)]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} %"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    for groups in (c.runs, c.sweep):
        for by_backend in groups.values():
            label = next(iter(by_backend.values()))[0].workload.label
            med = {b: c.medians(rs) for b, rs in by_backend.items()}
            for i, b in enumerate(BACKENDS):
                m = med[b]
                out.append(f"{label if i == 0 else '':<20} {b:<9} {m['iops']:>10,.0f} "
                           f"{m['mb_per_s']:>9,.1f} {m['p50_us']:>9.1f} {m['p99_us']:>9.1f} "
                           f"{m['p99_9_us']:>9.1f} {m['errors']:>6} "
                           f"{pct(m['client_cpu_pct']):>10} {pct(m['server_cpu_pct']):>10}")
            r = c.ratios(med["vblk"], med["qsd"])
            out.append(f"{'':<20} {'vblk/qsd':<9} {x(r['iops']):>10} {x(r['mb_per_s']):>9} "
                       f"{x(r['p50_us']):>9}")
        if groups is c.runs and c.sweep:
            out.append(f"-- queue-depth sweep: {c.sweep_label} --")
    if c.errors:
        out.append(f"{c.errors} requests failed")
    return "\n".join(out)


@dataclass
class ServedPair:
    """vblk and qsd serving two fresh copies of one image (``serve_pair``)."""
    image: Path
    writethrough: bool
    commands: dict[str, list[str]]
    servers: dict[str, Server]
    source: str | None                   # the vblk code that is served (git)
    workdir: Path


@contextlib.contextmanager
def serve_pair(image: str | os.PathLike, *, vblk_args: str = "", cache: str | None = None,
               queues: int = 1, workdir: str | None = None, keep: bool = False,
               log: TextIO | None = None) -> Iterator[ServedPair]:
    """Copy ``image`` twice, serve one copy with ``vblk serve`` and the other with
    qemu-storage-daemon in the same cache mode, wait until both listen; on exit stop both and
    remove the copies (unless ``keep``). BenchError for a bad option, before anything starts."""
    src = Path(image)
    if not src.is_file():
        raise BenchError(f"--compare {image}: not a regular file")
    if shutil.which("qemu-storage-daemon") is None:
        raise BenchError("--compare needs qemu-storage-daemon on PATH (Debian: qemu-system-common)")
    writethrough, extra = split_cache_mode(vblk_args, cache)
    if workdir is not None and "," in os.path.abspath(workdir):
        raise BenchError(f"--workdir {workdir}: a path with a comma cannot be an image spec")
    work = Path(tempfile.mkdtemp(prefix="vblk-bench-", dir=workdir))
    sockdir = tempfile.mkdtemp(prefix="vblk-bench-", dir="/tmp")    # sun_path is short
    servers: dict[str, Server] = {}
    say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
    try:
        if "," in str(work):
            raise BenchError(f"--workdir {work}: a path with a comma cannot be an image spec")
        images = {b: work / f"{b}.img" for b in BACKENDS}
        say(f"copying {src} ({src.stat().st_size / MiB:,.0f} MiB) twice into {work}")
        for path in images.values():
            copy_image(src, path)
        socks = {b: os.path.join(sockdir, f"{b}.sock") for b in BACKENDS}
        commands = {"vblk": vblk_command(images["vblk"], socks["vblk"], writethrough=writethrough,
                                         extra=extra),
                    "qsd": qsd_command(images["qsd"], socks["qsd"], writethrough=writethrough,
                                       queues=queues)}
        repo = str(Path(__file__).resolve().parents[2])
        for b in BACKENDS:
            servers[b] = Server(b, commands[b], socks[b], work / f"{b}.log")
        for server in servers.values():
            server.wait_listening()
        yield ServedPair(src, writethrough, commands, servers, source_version(repo), work)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
        if keep:
            say(f"kept {work} (image copies and server logs)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def compare(image: str | os.PathLike, workloads: Sequence[Workload], *, rounds: int = 3,
            vblk_args: str = "", cache: str | None = None, workdir: str | None = None,
            keep: bool = False, sweep: Workload | None = None, timeout: float = 10.0,
            busy_poll: bool = False, progress: TextIO | None = None,
            log: TextIO | None = None) -> Comparison:
    """Serve two copies of ``image`` with vblk and qsd and run every workload against both,
    A B A B, ``rounds`` times (round r uses seed + r for both). ``sweep`` adds the same runs
    at each queue depth of SWEEP_QDS. Writes go to the copies, identically on both."""
    if not 1 <= rounds <= 100:
        raise BenchError(f"--rounds {rounds}: 1..100")
    queues = max(w.queues for w in [*workloads, *([sweep] if sweep else [])])
    with serve_pair(image, vblk_args=vblk_args, cache=cache, queues=queues, workdir=workdir,
                    keep=keep, log=log) as pair:
        servers = pair.servers
        result = Comparison(str(pair.image), pair.writethrough, rounds, pair.commands,
                            source=pair.source)
        result.loadavg.append(os.getloadavg())

        def one(tag: str, w: Workload, b: str) -> Result:
            server = servers[b]
            server.check_alive()
            line = ProgressLine(progress, f"{tag} {b:<4} {w.label:<18}", w) if progress else None
            try:
                return run_workload(server.sock, w, timeout=timeout, busy_poll=busy_poll,
                                    progress=line, cpu_probe=server.cpu_seconds, backend=b)
            except BackendError as exc:
                raise BackendError(f"{b}, {w.label}: {exc}; log: {server.log_tail(600)}") from exc
            finally:
                if line:
                    line.finish()

        for r in range(rounds):
            for w in workloads:
                wr = replace(w, seed=w.seed + r)
                group = result.runs.setdefault(w.label, {b: [] for b in BACKENDS})
                for b in BACKENDS:
                    group[b].append(one(f"[{r + 1}/{rounds}]", wr, b))
        if sweep is not None:
            result.sweep_label = f"{format_size(sweep.bs)} {sweep.pattern}, QD {SWEEP_QDS}"
            for r in range(rounds):
                for qd in SWEEP_QDS:
                    wr = replace(sweep, qd=qd, seed=sweep.seed + r)
                    group = result.sweep.setdefault(qd, {b: [] for b in BACKENDS})
                    for b in BACKENDS:
                        group[b].append(one(f"[sweep {r + 1}/{rounds}]", wr, b))
        result.loadavg.append(os.getloadavg())
        return result


# -- plot ---------------------------------------------------------------------------------------
def check_plot_support() -> None:
    """BenchError now, before any run, if matplotlib is missing."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib (pip install 'vblk[bench]' or matplotlib)")


def plot_sweep(c: Comparison, path: str | os.PathLike) -> None:
    """IOPS and p50 latency against queue depth, one line per backend, into a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    qds = sorted(c.sweep)
    fig, (ax_iops, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b, marker in zip(BACKENDS, ("o", "s")):
        med = [c.medians(c.sweep[qd][b]) for qd in qds]
        ax_iops.plot(qds, [m["iops"] for m in med], marker=marker, label=b)
        ax_lat.plot(qds, [m["p50_us"] for m in med], marker=marker, label=b)
    for ax, ylabel in ((ax_iops, "IOPS (median)"), (ax_lat, "p50 latency, µs (median)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(qds, [str(q) for q in qds])
        ax.set_xlabel("queue depth")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_iops.set_ylim(bottom=0)
    ax_lat.set_yscale("log")
    ax_lat.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    cache = "writethrough" if c.writethrough else "writeback"
    extra = " ".join(c.commands["vblk"][c.commands["vblk"].index("--log-level") + 2:])
    fig.suptitle(f"{c.sweep_label}: vblk ({extra}) vs qemu-storage-daemon, {cache}, "
                 f"medians of {c.rounds}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["BenchError", "Comparison", "DEFAULT_WORKLOADS", "PATTERNS", "ProgressLine", "Result",
           "Runner", "SWEEP_QDS", "ServedPair", "Workload", "check_plot_support", "compare",
           "copy_image", "format_comparison", "format_result", "format_size", "latency_summary",
           "parse_size", "plot_sweep", "qsd_command", "run_workload", "serve_pair",
           "vblk_command"]
