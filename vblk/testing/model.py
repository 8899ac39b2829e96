"""What a disk must hold under a concurrent random workload, and the workload itself.

Theory of operation
-------------------
Every sector the stress test writes is *self-describing*: 32 copies of a 16-byte record
``(sector, write id, salt)``. Write id 0 is the initial image. So a read never needs a copy of
the disk: each 512-byte sector either decodes to a well-formed pattern for the right sector and
salt, naming the write it came from, or it is garbage.

``DiskModel`` tracks, per sector, the set of write ids it may hold. Normally that is one id.
While writes to a sector are in flight it is unknown: a read overlapping such a sector in any
part of its lifetime does not check it. When the last write in flight on a sector completes,
the sector may hold any write submitted since it was last quiet (the device may apply
concurrent writes in any order), plus its previous content if one of them failed. A checked
read that sees one of the candidates pins the sector to it.

``Workload`` draws operations (read / write / flush, sizes up to ``max_bytes``, a hot region
to make requests collide, optional indirect chains and split data) from a seeded RNG, so a
failing run is reproduced by its seed. ``run_stress`` drives any client with the
``BlkClient`` interface at a given queue depth and returns a ``StressReport``.
"""
from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass, field

from vblk.virtio.constants import SECTOR_SIZE, BlkStatus, BlkType

RECORD = struct.Struct("<QII")                  # sector, write id, salt
RECORDS_PER_SECTOR = SECTOR_SIZE // RECORD.size


def sector_pattern(salt: int, write_id: int, sector: int) -> bytes:
    return RECORD.pack(sector, write_id, salt) * RECORDS_PER_SECTOR


def pattern(salt: int, write_id: int, sector: int, count: int) -> bytes:
    """The bytes write ``write_id`` puts in ``count`` sectors from ``sector``."""
    return b"".join(sector_pattern(salt, write_id, s) for s in range(sector, sector + count))


def write_initial_image(path: str, nsectors: int, salt: int) -> None:
    """Create ``path`` holding write 0 in every sector."""
    chunk = 2048
    with open(path, "wb") as f:
        for s in range(0, nsectors, chunk):
            f.write(pattern(salt, 0, s, min(chunk, nsectors - s)))


@dataclass(slots=True)
class _ReadToken:
    sector: int
    count: int
    quiet_gens: list[int | None]        # the sector's write generation, or None if a write was in flight


class DiskModel:
    """The write ids each sector may hold, given the writes submitted and completed."""

    def __init__(self, nsectors: int, salt: int) -> None:
        self.nsectors = nsectors
        self.salt = salt
        self._version = [0] * nsectors          # the id, when exactly one is possible
        self._maybe: dict[int, set[int]] = {}   # sectors with several possible ids
        self._inflight = [0] * nsectors         # writes in flight per sector
        self._gen = [0] * nsectors              # bumped by every write submitted
        self._epoch: dict[int, set[int]] = {}   # ids written since the sector was last quiet
        self._epoch_prior: dict[int, set[int]] = {}
        self._epoch_failed: set[int] = set()
        self._next_id = 1
        self.checked_sectors = 0
        self.unchecked_sectors = 0

    def candidates(self, sector: int) -> set[int]:
        return self._maybe.get(sector) or {self._version[sector]}

    # -- writes --------------------------------------------------------------------------
    def begin_write(self, sector: int, count: int) -> tuple[int, bytes]:
        """A write is about to be submitted: returns its id and data."""
        self._check_range(sector, count)
        wid = self._next_id
        self._next_id += 1
        for s in range(sector, sector + count):
            if self._inflight[s] == 0:
                self._epoch[s] = set()
                self._epoch_prior[s] = self.candidates(s)
            self._epoch[s].add(wid)
            self._inflight[s] += 1
            self._gen[s] += 1
        return wid, pattern(self.salt, wid, sector, count)

    def end_write(self, wid: int, sector: int, count: int, ok: bool) -> None:
        for s in range(sector, sector + count):
            if not ok:
                self._epoch_failed.add(s)
            self._inflight[s] -= 1
            if self._inflight[s]:
                continue
            cands = self._epoch.pop(s)
            prior = self._epoch_prior.pop(s)
            if s in self._epoch_failed:
                self._epoch_failed.discard(s)
                cands |= prior
            self._set(s, cands)

    def _set(self, s: int, cands: set[int]) -> None:
        if len(cands) == 1:
            self._version[s] = next(iter(cands))
            self._maybe.pop(s, None)
        else:
            self._maybe[s] = cands

    # -- reads ---------------------------------------------------------------------------
    def begin_read(self, sector: int, count: int) -> _ReadToken:
        self._check_range(sector, count)
        gens = [None if self._inflight[s] else self._gen[s] for s in range(sector, sector + count)]
        return _ReadToken(sector, count, gens)

    def end_read(self, token: _ReadToken, data: bytes) -> list[str]:
        """Check what a read returned; returns a description of every bad sector."""
        if len(data) != token.count * SECTOR_SIZE:
            return [f"read of {token.count} sectors at {token.sector} returned {len(data)} bytes"]
        errors = []
        for i, gen in enumerate(token.quiet_gens):
            s = token.sector + i
            if gen is None or gen != self._gen[s]:
                self.unchecked_sectors += 1
                continue
            self.checked_sectors += 1
            got = data[i * SECTOR_SIZE:(i + 1) * SECTOR_SIZE]
            got_sector, wid, salt = RECORD.unpack_from(got)
            cands = self.candidates(s)
            if got != sector_pattern(salt, wid, got_sector) or salt != self.salt:
                errors.append(f"sector {s}: garbage (first record sector={got_sector} id={wid} "
                              f"salt={salt:#x}); expected id in {sorted(cands)}")
            elif got_sector != s:
                errors.append(f"sector {s}: holds sector {got_sector}'s data (id {wid})")
            elif wid not in cands:
                errors.append(f"sector {s}: holds write {wid}, expected one of {sorted(cands)}")
            elif len(cands) > 1:
                self._set(s, {wid})
        return errors

    def _check_range(self, sector: int, count: int) -> None:
        if count <= 0 or sector < 0 or sector + count > self.nsectors:
            raise ValueError(f"range {sector}+{count} outside a disk of {self.nsectors} sectors")


@dataclass(frozen=True, slots=True)
class Op:
    kind: int                   # BlkType.IN, OUT or FLUSH
    sector: int = 0
    count: int = 0              # sectors
    indirect: bool = False
    segments: int = 1


class Workload:
    """A seeded stream of random operations on a disk of ``nsectors``."""

    def __init__(self, seed: int, nsectors: int, *, max_bytes: int = 128 * 1024,
                 read_share: float = 0.5, flush_share: float = 0.03,
                 indirect_share: float = 0.0, max_segments: int = 1,
                 hot_sectors: int = 2048, hot_share: float = 0.3) -> None:
        self.rng = random.Random(seed)
        self.nsectors = nsectors
        self.max_sectors = max(1, min(max_bytes // SECTOR_SIZE, nsectors))
        self.read_share, self.flush_share = read_share, flush_share
        self.indirect_share, self.max_segments = indirect_share, max_segments
        self.hot_sectors = min(hot_sectors, nsectors)
        self.hot_share = hot_share

    def next_op(self) -> Op:
        r = self.rng
        x = r.random()
        if x < self.flush_share:
            return Op(BlkType.FLUSH)
        kind = BlkType.IN if x < self.flush_share + self.read_share else BlkType.OUT
        shape = r.random()
        if shape < 0.5:
            count = 8                                            # one 4 KiB page
        elif shape < 0.7:
            count = 1 << r.randrange(self.max_sectors.bit_length())
        else:
            count = r.randint(1, self.max_sectors)
        count = min(count, self.max_sectors)
        span = self.hot_sectors if r.random() < self.hot_share else self.nsectors
        span = max(span, count)
        sector = r.randrange(span - count + 1)
        if shape < 0.5:
            sector -= sector % 8
        segments = r.randint(1, min(self.max_segments, count * SECTOR_SIZE))
        return Op(kind, sector, count, r.random() < self.indirect_share, segments)


@dataclass
class StressReport:
    seed: int
    ops: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes: int = 0
    seconds: float = 0.0
    checked_sectors: int = 0
    unchecked_sectors: int = 0
    mismatches: list[str] = field(default_factory=list)
    bad_status: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return len(self.mismatches) + len(self.bad_status)

    def summary(self) -> str:
        rate = self.ops / self.seconds if self.seconds else 0.0
        return (f"seed={self.seed} ops={self.ops} (r {self.reads} / w {self.writes} / f {self.flushes}) "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.1f} s ({rate:.0f} ops/s); "
                f"sectors checked {self.checked_sectors}, unchecked {self.unchecked_sectors}; "
                f"{len(self.mismatches)} mismatches, {len(self.bad_status)} bad statuses")


def read_back(client, model: DiskModel, *, chunk: int = 256) -> list[str]:
    """Every sector of the disk, read through ``client`` in ``chunk``-sector reads and checked
    against ``model`` (with nothing in flight, each sector must hold what the model says)."""
    problems: list[str] = []
    for sector in range(0, model.nsectors, chunk):
        count = min(chunk, model.nsectors - sector)
        token = model.begin_read(sector, count)
        problems += model.end_read(token, client.read(sector, count * SECTOR_SIZE).data)
    return problems


def run_stress(client, model: DiskModel, workload: Workload, ops: int, *, qd: int = 16,
               seed: int = 0, max_errors: int = 50) -> StressReport:
    """Run ``ops`` operations keeping up to ``qd`` in flight; verify every read against ``model``.

    ``client`` is a ``BlkClient`` (submit / publish / wait / driver). Stops submitting once
    ``max_errors`` problems were seen."""
    report = StressReport(seed)
    inflight: dict[int, tuple[Op, object]] = {}
    waiting: Op | None = None                 # drawn, but the ring had no room for it
    start = time.monotonic()
    while inflight or (report.ops < ops and report.errors < max_errors):
        while report.ops < ops and report.errors < max_errors and len(inflight) < qd:
            op, waiting = waiting or workload.next_op(), None
            if client.driver.num_free < (1 if op.indirect else op.segments + 2):
                waiting = op
                break
            tag, token = submit_op(client, model, op)
            inflight[tag] = (op, token)
            report.ops += 1
        client.publish()
        for c in client.wait(1):
            op, token = inflight.pop(c.tag)
            account_op(report, model, op, token, c)
    report.seconds = time.monotonic() - start
    report.checked_sectors = model.checked_sectors
    report.unchecked_sectors = model.unchecked_sectors
    return report


def submit_op(client, model: DiskModel, op: Op) -> tuple[int, object]:
    """Submit ``op`` unpublished; returns its tag and what its completion needs."""
    if op.kind == BlkType.FLUSH:
        return client.submit(BlkType.FLUSH, 0, publish=False), None
    kw = dict(indirect=op.indirect, segments=op.segments, publish=False)
    if op.kind == BlkType.IN:
        token = model.begin_read(op.sector, op.count)
        return client.submit(BlkType.IN, op.sector, nbytes=op.count * SECTOR_SIZE, **kw), token
    wid, data = model.begin_write(op.sector, op.count)
    return client.submit(BlkType.OUT, op.sector, data=data, **kw), wid


def account_op(report: StressReport, model: DiskModel, op: Op, token: object, c) -> None:
    ok = c.status == BlkStatus.OK
    if not ok:
        report.bad_status.append(f"{BlkType(op.kind).name} sector {op.sector} count {op.count}: "
                                 f"status {c.status}")
    if op.kind == BlkType.FLUSH:
        report.flushes += 1
        return
    report.bytes += op.count * SECTOR_SIZE
    if op.kind == BlkType.OUT:
        report.writes += 1
        model.end_write(token, op.sector, op.count, ok)
        return
    report.reads += 1
    if ok:
        errors = model.end_read(token, c.data)
        report.mismatches.extend(f"read sector {op.sector} count {op.count}: {e}" for e in errors)
