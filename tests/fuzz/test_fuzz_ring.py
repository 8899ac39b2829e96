"""Fuzz the guest-facing data path: SplitRing, parse_request and BlkDevice.plan.

A case is a whole guest: 1-3 memory regions (memfds, gaps or no gaps between them, random
mmap offsets, any order in the table), a queue of random size laid out somewhere in them (or
at a wild address), descriptor tables and indirect tables built from chain specs that are
then mutated (wrong flags, wrong next, loops, bad table lengths, wild addresses), random
avail and used indices and heads, sometimes an inflight region (what a frontend hands a
restarted backend) with random contents, and noise everywhere else. Hypothesis draws the
knobs (sizes, rates, what to break) and a seed; each example runs VBLK_FUZZ_GUESTS guests
(default 8) from that seed, which keeps Hypothesis' own cost per guest small.

Invariants, for every case:

* ``SplitRing(...)``, ``pending``, ``pop``, ``walk``, ``parse_request`` and ``plan`` either
  succeed or raise ``GuestError`` (``RingBroken`` included) -- nothing else;
* ``walk`` returns at most ``queue_size + MAX_INDIRECT`` segments;
* every piece ``GuestMemory.translate`` returns lies inside its region's mapping, and the
  pieces cover exactly the bytes asked for;
* every read/write ``IoPlan`` lies inside ``[0, size_bytes)`` of the disk, and so
  does every range of a discard / write-zeroes plan (whole logical blocks, never on a
  read-only disk);
  a flush plan moves no bytes;
* walking, parsing and planning write nothing; pop/put_used/publish/kick suppression write
  only inside the used ring.

Chains that were not mutated also get a differential check: the walk must return exactly
the segments that were laid out, and parse/plan must give what the virtio-blk and ACRN
rules (restated independently below) say.

Knobs (environment): VBLK_FUZZ_EXAMPLES examples per round (default 300),
VBLK_FUZZ_ROUNDS rounds (a fresh Hypothesis run each, default 1), VBLK_FUZZ_SHARDS copies
of the test (for -n N, default 1), VBLK_FUZZ_STATS a file that gets one JSON line of
counts per test run (scripts/fuzz-long adds them up).
"""
from __future__ import annotations

import os
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblk.admission import admit_chain
from vblk.device import (
    WRITE_ZEROES_MAX_SECTORS,
    WRITE_ZEROES_MAX_SEG,
    BlkDevice,
    Completion,
    DiscardLimits,
    Geometry,
    IoPlan,
)
from vblk.errors import GuestError, RingBroken
from vblk.ipc import Op
from vblk.memory import GuestMemory
from vblk.testing import fuzzstats
from vblk.testing.fuzzstats import record
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.blk import OUTHDR, parse_request, read_data_out
from vblk.virtio.constants import BLK_ID_BYTES, BLK_T_BARRIER, BlkStatus, BlkType
from vblk.virtio.fastpath import simple_rw
from vblk.virtio.ring import (
    DESC,
    MAX_INDIRECT,
    U16,
    SplitRing,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
)

try:        # the inflight region (backend restarts): another input the frontend controls
    from vblk.virtio.inflight import DESC_STATE, QUEUE_HEAD, InflightQueue, queue_region_size
except ImportError:                                   # pragma: no cover
    InflightQueue = None

EXAMPLES = fuzzstats.examples(300)
GUESTS = int(os.environ.get("VBLK_FUZZ_GUESTS", "8"))
ROUNDS = fuzzstats.rounds()
SHARDS = int(os.environ.get("VBLK_FUZZ_SHARDS", "1"))

NEXT, WRITE, INDIRECT = 1, 2, 4
PAGE = 4096
UVA = 0x7F00_0000_0000
U64_MAX = (1 << 64) - 1

SETTINGS = fuzzstats.hypothesis_settings(EXAMPLES, SHARDS)


# -- the generated guest ------------------------------------------------------------------

@dataclass
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    noise: bool


@dataclass
class Chain:
    segments: list[tuple[int, int, int]]     # (addr, len, flags) as laid out, in chain order
    indirect: bool
    mutated: bool
    head: int = -1                            # ring descriptor index, set when placed


@dataclass
class Case:
    regions: list[Region]
    order: list[int]                          # order of the regions in the memory table
    queue_size: int
    ring_gpas: tuple[int, int, int] | None    # desc, avail, used (None: wild qvas below)
    ring_qvas: tuple[int, int, int]
    last_avail: int
    avail_idx: int
    avail_flags: int
    used_event: int
    heads: list[int]                          # avail ring entries, from last_avail on
    chains: list[Chain]
    writes: list[tuple[int, bytes]]           # (gpa, bytes): tables, descriptors, headers
    extra_heads: list[int]                    # walked directly, not through pop
    negotiated_indirect: bool
    event_idx: bool
    geometry: Geometry
    seed: int
    used_idx: int = 0                         # used.idx as the frontend left it
    inflight: bytes | None = None             # a queue's inflight region, if one is attached


class Bump:
    """Non-overlapping placement of the structures the walker reads (rings, tables, headers)."""

    def __init__(self, regions: list[Region], rng: random.Random) -> None:
        self.regions = regions
        self.rng = rng
        self.next = [r.gpa for r in regions]

    def alloc(self, i: int, n: int, align: int, pad: int) -> int | None:
        r = self.regions[i]
        gpa = -(-(self.next[i] + pad) // align) * align
        if gpa + n > r.gpa + r.size:
            return None
        self.next[i] = gpa + n
        return gpa

    def any(self, n: int, align: int = 16) -> int | None:
        pad = self.rng.choice([0, 0, 16, 64, 1000])
        start = self.rng.randrange(len(self.regions))
        for k in range(len(self.regions)):
            gpa = self.alloc((start + k) % len(self.regions), n, align, pad)
            if gpa is not None:
                return gpa
        return None


def uva_of(regions: list[Region], gpa: int) -> int:
    for r in regions:
        if r.gpa <= gpa < r.gpa + r.size:
            return r.uva + gpa - r.gpa
    raise AssertionError(f"{gpa:#x} not in a region")


QUEUE_SIZES = [1, 2, 4, 8, 8, 16, 16, 32, 64, 128, 256, 1024]
MAX_QUEUE = 32768                        # drawn rarely: a 512 KiB descriptor table
BAD_QUEUE_SIZES = [0, 3, 100, 65536, 1 << 20]
TYPES = [BlkType.IN] * 4 + [BlkType.OUT] * 4 + [BlkType.FLUSH,
         BlkType.FLUSH_OUT, BlkType.GET_ID, BlkType.GET_ID, BlkType.DISCARD, BlkType.WRITE_ZEROES,
         2, 3, 0x7FFFFFFF, BlkType.IN | BLK_T_BARRIER, BlkType.OUT | BLK_T_BARRIER, 0xFFFFFFFF]
LENGTHS = [0, 1, 15, 16, 17, 511, 512, 1024, 4095, 4096, 8192, 65536, 0xFFFFFFFF]


@dataclass(frozen=True)
class Knobs:
    """What Hypothesis chooses (and shrinks); the bulk comes from ``random.Random(seed)``."""
    seed: int
    queue_size: int
    nregions: int
    wild_ring: bool
    negotiated_indirect: bool
    event_idx: bool
    nchains: int
    mutate_rate: float
    wild_rate: float
    indirect_rate: float
    ahead: str
    lbs: int
    readonly: bool
    noise: bool


def knobs() -> st.SearchStrategy[Knobs]:
    return st.builds(
        Knobs,
        seed=st.integers(0, U64_MAX),
        queue_size=st.sampled_from(QUEUE_SIZES * 4 + BAD_QUEUE_SIZES + [MAX_QUEUE]),
        nregions=st.integers(1, 3),
        wild_ring=st.sampled_from([False] * 19 + [True]),
        negotiated_indirect=st.sampled_from([True] * 7 + [False]),
        event_idx=st.booleans(),
        nchains=st.integers(0, 6),
        mutate_rate=st.sampled_from([0.0, 0.0, 0.1, 0.3, 1.0]),
        wild_rate=st.sampled_from([0.0, 0.02, 0.1, 0.4]),
        indirect_rate=st.sampled_from([0.0, 0.25, 0.75]),
        ahead=st.sampled_from(["exact", "exact", "exact", "small", "any"]),
        lbs=st.sampled_from([512, 512, 1024, 2048, 4096]),
        readonly=st.sampled_from([False, False, False, True]),
        noise=st.booleans(),
    )


def make_geometry(k: Knobs, rng: random.Random) -> Geometry:
    blocks = rng.choice([1, 2, 8, 2048, 1 << 20, rng.randint(1, 1 << 30)])
    return Geometry(size_bytes=k.lbs * blocks, logical_block_size=k.lbs,
                    physical_block_size=k.lbs, readonly=k.readonly,
                    serial=b"FUZZ-SERIAL-01234567")


def make_regions(k: Knobs, rng: random.Random, ring_need: int) -> list[Region]:
    gpa = rng.choice([0, 0x1000, 0x7FFF_F000, 1 << 32, 1 << 48, (1 << 64) - (1 << 22)])
    regions = []
    for i in range(k.nregions):
        if i == 0:
            size = ring_need + rng.choice([0, 64, PAGE, 3 * PAGE, 16 * PAGE, rng.randint(0, 5000)])
        else:
            size = rng.choice([PAGE, 2 * PAGE, 8 * PAGE, rng.randint(16, 5 * PAGE)])
        regions.append(Region(gpa, size, UVA + (i << 36) + rng.choice([0, PAGE, 0x123000]),
                              rng.choice([0, 0, PAGE, 17, 8191]), k.noise))
        gpa += size + rng.choice([0, 0, 1, 16, PAGE, 1 << 20])
    if regions[-1].gpa + regions[-1].size > 1 << 64:     # keep the table valid: slide down
        shift = regions[-1].gpa + regions[-1].size - (1 << 64)
        for r in regions:
            r.gpa -= shift
    return regions


def pointer(k: Knobs, rng: random.Random, regions: list[Region]) -> int:
    """A guest-physical address: inside a region (sometimes near an edge), or wild."""
    x = rng.random()
    if x < k.wild_rate:
        return rng.choice([0, 1 << 63, U64_MAX, U64_MAX - 15, rng.randrange(1 << 64)])
    r = rng.choice(regions)
    if x < 2 * k.wild_rate:
        return r.gpa + r.size + rng.randint(-32, 16)
    return r.gpa + rng.randrange(r.size)


def request_segments(k: Knobs, rng: random.Random, regions, header_gpa, g: Geometry):
    """One request as a driver would lay it out (before any mutation): the header (written
    at ``header_gpa``), data that usually suits the type, usually a status byte.
    Returns (header bytes or None, segments)."""
    lbs, cap = g.logical_block_size, g.size_bytes // 512
    per_block = lbs // 512
    rtype = rng.choice(TYPES) if rng.random() < 0.95 else rng.randrange(1 << 32)
    nblocks = rng.choice([0, 1, 1, 2, 8, 33])
    if rng.random() < 0.6:                    # a sector that fits the disk
        sector = rng.randint(0, max(cap // per_block - nblocks, 0)) * per_block
    else:
        sector = rng.choice([1, 7, 8, cap - 1, cap - per_block, cap, cap + 1, cap - 16 * per_block,
                             2 ** 54, (2 ** 63) // 512, U64_MAX, U64_MAX - 7,
                             rng.randrange(1 << 64), rng.randint(0, cap)])
    header = OUTHDR.pack(int(rtype), rng.choice([0, 0xFFFFFFFF]), max(sector, 0) & U64_MAX)
    segs: list[tuple[int, int, int]] = []
    base_type = int(rtype) & ~BLK_T_BARRIER
    if (header_gpa is not None and base_type in (BlkType.DISCARD, BlkType.WRITE_ZEROES)
            and rng.random() < 0.7):
        # discard / write-zeroes segments right after the header, in the same descriptor
        n = rng.choice([1, 1, 1, 2, 4, 5])
        for _ in range(n):
            count = rng.choice([per_block, 8 * per_block, 0, 1, rng.randint(1, 1 << 16), 2 ** 32 - 1])
            start = (rng.randint(0, max(cap // per_block - 1, 0)) * per_block if rng.random() < 0.7
                     else rng.choice([1, cap, cap - 1, U64_MAX, 2 ** 63]))
            header += struct.pack("<QII", start & U64_MAX, count,
                                  rng.choice([0, 0, 1, 2, 0x8000_0000]))
        segs.append((header_gpa, len(header) - rng.choice([0, 0, 0, 0, 1, 8]), 0))
        if rng.random() < 0.9:
            segs.append((pointer(k, rng, regions), 1, WRITE))
        return header, segs
    if header_gpa is not None:
        segs.append((header_gpa, rng.choice([16, 16, 16, 16, 0, 8, 24, 16 + 512]), 0))
    writable = base_type != BlkType.OUT if rng.random() < 0.85 else rng.random() < 0.5
    total = nblocks * lbs if rng.random() < 0.8 else rng.choice(LENGTHS + [rng.randint(0, 1 << 17)])
    if base_type == BlkType.GET_ID and rng.random() < 0.7:
        total = rng.choice([20, 20, 1, 7, 64])
    pieces = rng.choice([1, 1, 1, 2, 3]) if total else rng.choice([0, 0, 1])
    for p in range(pieces):
        length = total // pieces + (total % pieces if p == pieces - 1 else 0)
        if rng.random() < 0.05:
            writable = not writable
        segs.append((pointer(k, rng, regions), length, WRITE if writable else 0))
    if rng.random() < 0.9:                    # usually a status byte, last
        segs.append((pointer(k, rng, regions), rng.choice([1, 1, 1, 1, 0, 2, 513]), WRITE))
    if not segs:
        segs.append((pointer(k, rng, regions), 1, WRITE))
    if rng.random() < 0.03:                   # any order at all
        rng.shuffle(segs)
    return (header if header_gpa is not None else None), segs


def mutate(rng: random.Random, descs: list[list[int]]) -> None:
    i = rng.randrange(len(descs))
    what = rng.choice(["flags", "next", "addr", "len", "drop_next"])
    if what == "flags":
        descs[i][2] = rng.choice([rng.randrange(8), rng.randrange(1 << 16)])
    elif what == "next":
        descs[i][2] |= NEXT
        descs[i][3] = rng.choice([rng.randrange(len(descs) + 2), rng.randrange(1 << 16)])
    elif what == "addr":
        descs[i][0] = rng.randrange(1 << 64)
    elif what == "len":
        descs[i][1] = rng.choice([0, 0xFFFFFFFF, 16 * 1025])
    else:
        descs[i][2] &= ~NEXT


def generate(k: Knobs) -> Case:
    rng = random.Random(k.seed)
    g = make_geometry(k, rng)
    q = k.queue_size
    qq = q if q in QUEUE_SIZES or q == MAX_QUEUE else 8     # a bad size: lay it out as 8
    need = desc_table_bytes(qq) + avail_ring_bytes(qq) + used_ring_bytes(qq) + 256
    regions = make_regions(k, rng, need)
    bump = Bump(regions, rng)
    writes: list[tuple[int, bytes]] = []

    # -- the three ring areas: placed without overlap, or at wild addresses
    if k.wild_ring:
        qvas = []
        for _ in range(3):
            r = rng.choice(regions)
            qvas.append(rng.choice([rng.randrange(1 << 64), rng.randint(r.uva, r.uva + r.size + 64),
                                    r.uva + r.size - 2]))
        ring_gpas = None
    else:
        d = bump.alloc(0, desc_table_bytes(qq), 16, 0)
        a = bump.alloc(0, avail_ring_bytes(qq), 2, rng.choice([0, 32]))
        u = bump.alloc(0, used_ring_bytes(qq), 4, rng.choice([0, 4, 100]))
        assert None not in (d, a, u)
        ring_gpas = (d, a, u)
        qvas = [uva_of(regions, x) for x in ring_gpas]

    # -- chains: laid out, then maybe mutated
    free = rng.sample(range(qq), min(qq, 64))     # descriptor indices the chains may take
    chains: list[Chain] = []
    for _ in range(k.nchains):
        hdr = bump.any(16 + 512) if rng.random() < 0.95 else None
        header, segs = request_segments(k, rng, regions, hdr, g)
        if header is not None:
            writes.append((hdr, header))
        descs = [[a, n, f, 0] for a, n, f in segs]
        for i in range(len(descs) - 1):
            descs[i][2] |= NEXT
        mutated = rng.random() < k.mutate_rate
        if mutated:
            mutate(rng, descs)
        if rng.random() < k.indirect_rate:
            n = len(descs)
            table = bump.any(16 * n)
            if table is None or not free:
                continue
            for i, dsc in enumerate(descs):
                if dsc[2] & NEXT and not (mutated and dsc[3] != 0):
                    dsc[3] = i + 1
            writes.append((table, b"".join(DESC.pack(*dsc) for dsc in descs)))
            tlen, tflags = 16 * n, INDIRECT
            if rng.random() < k.mutate_rate / 2:
                mutated = True
                tlen = rng.choice([0, 8, 16 * n + 8, 16 * (MAX_INDIRECT + 1), 0xFFFFFFF0])
                tflags = rng.choice([INDIRECT | NEXT, INDIRECT | WRITE, INDIRECT])
            head = free.pop()
            if ring_gpas:
                writes.append((ring_gpas[0] + 16 * head,
                               DESC.pack(table, tlen, tflags, rng.randrange(1 << 16))))
            chains.append(Chain(segs, True, mutated, head))
        else:
            if len(descs) > len(free):
                continue
            idx = [free.pop() for _ in descs]
            for i, dsc in enumerate(descs):
                if dsc[2] & NEXT:
                    if mutated and dsc[3] != 0:    # a mutated next: keep it (maybe a loop)
                        dsc[3] = idx[dsc[3]] if dsc[3] < len(idx) else dsc[3]
                    else:
                        dsc[3] = idx[i + 1] if i + 1 < len(idx) else rng.randrange(1 << 16)
                if ring_gpas:
                    writes.append((ring_gpas[0] + 16 * idx[i], DESC.pack(*dsc)))
            chains.append(Chain(segs, False, mutated, idx[0]))
    if ring_gpas and free and rng.random() < 0.05:     # a nested indirect table
        inner, outer = bump.any(32), bump.any(16)
        if inner is not None and outer is not None:
            writes.append((inner, DESC.pack(outer, 16, INDIRECT, 0) * 2))
            writes.append((outer, DESC.pack(inner, 32, INDIRECT, 0)))
            head = free.pop()
            writes.append((ring_gpas[0] + 16 * head, DESC.pack(outer, 16, INDIRECT, 0)))
            chains.append(Chain([], True, True, head))

    # -- the avail ring
    last_avail = rng.choice([0, 0, 0xFFFF, 0xFFFE, qq, rng.randrange(1 << 16)])
    heads = [c.head for c in chains]
    heads += [rng.choice([rng.randrange(qq), rng.randrange(1 << 16)])
              for _ in range(rng.choice([0, 0, 1, 3]))]
    heads = heads[:qq]
    ahead = {"exact": len(heads),           # (walking 32768 noise heads would take long)
             "small": rng.choice([rng.randint(0, min(qq, 300)), qq + 1, qq if qq <= 1024 else 0]),
             "any": rng.randrange(1 << 16)}[k.ahead]
    order = list(range(len(regions)))
    if rng.random() < 0.5:
        rng.shuffle(order)
    used_idx = rng.choice([0, 0, 0, rng.randrange(1 << 16), 0xFFFF])
    inflight = None
    if InflightQueue is not None and rng.random() < 0.2 and hasattr(SplitRing, "attach_inflight"):
        inflight = bytearray(queue_region_size(qq) + rng.choice([0, 64]))
        QUEUE_HEAD.pack_into(inflight, 0, rng.randrange(1 << 64), rng.choice([1, 1, 1, 0, 2]),
                             rng.choice([qq, qq, qq, qq + 1, 0, 0xFFFF]), rng.randrange(1 << 16),
                             rng.choice([used_idx, (used_idx - rng.randint(0, qq + 2)) & 0xFFFF,
                                         rng.randrange(1 << 16)]))
        for head in rng.sample(range(qq), min(qq, 64)):
            DESC_STATE.pack_into(inflight, QUEUE_HEAD.size + DESC_STATE.size * head,
                                 rng.choice([0, 1, 1, rng.randrange(256)]), rng.randrange(1 << 16),
                                 rng.choice([head, rng.randrange(1 << 64), 0]))
        inflight = bytes(inflight)
    return Case(
        regions=regions, order=order, queue_size=q, ring_gpas=ring_gpas if q == qq else None,
        ring_qvas=tuple(qvas), last_avail=last_avail, avail_idx=(last_avail + ahead) & 0xFFFF,
        avail_flags=rng.choice([0, 1, 0xFFFF]), used_event=rng.randrange(1 << 16),
        heads=heads, chains=chains, writes=writes,
        extra_heads=[rng.choice([rng.randint(0, qq), rng.randrange(1 << 16)])
                     for _ in range(rng.choice([0, 0, 1, 2]))],
        negotiated_indirect=k.negotiated_indirect, event_idx=k.event_idx, geometry=g,
        seed=rng.randrange(1 << 32), used_idx=used_idx, inflight=inflight)


# -- building the memory --------------------------------------------------------------------

def build_memory(case: Case) -> GuestMemory:
    rng = random.Random(case.seed)
    descs, fds = [], []
    try:
        for i in case.order:
            r = case.regions[i]
            fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
            fds.append(fd)
            os.ftruncate(fd, r.mmap_offset + r.size)
            if r.noise:
                os.pwrite(fd, rng.randbytes(r.size), r.mmap_offset)
            descs.append(MemRegion(r.gpa, r.size, r.uva, r.mmap_offset))
        mem = GuestMemory.from_fds(descs, fds)
    finally:
        for fd in fds:
            os.close(fd)
    if case.ring_gpas is not None:       # a fresh ring, then the chains, then the avail ring
        d, a, u = case.ring_gpas
        q = case.queue_size
        mem.write(d, rng.randbytes(desc_table_bytes(q)) if rng.random() < 0.5 else bytes(desc_table_bytes(q)))
        used = bytearray(used_ring_bytes(q))
        if rng.random() < 0.3:                    # used elements left by an earlier run
            used[4:4 + 8 * q] = rng.randbytes(8 * q)
        U16.pack_into(used, 2, case.used_idx)
        mem.write(u, bytes(used))
        for gpa, data in case.writes:
            mem.write(gpa, data)
        ring = bytearray(avail_ring_bytes(q))
        U16.pack_into(ring, 0, case.avail_flags)
        U16.pack_into(ring, 2, case.avail_idx)
        ring[4:4 + 2 * q] = rng.randbytes(2 * q)
        for k, head in enumerate(case.heads):
            U16.pack_into(ring, 4 + 2 * ((case.last_avail + k) % q), head)
        U16.pack_into(ring, 4 + 2 * q, case.used_event)
        mem.write(a, bytes(ring))
    return mem


def snapshot(mem: GuestMemory) -> list[bytes]:
    return [r.view.tobytes() for r in mem.regions]


def assert_unchanged_outside(mem: GuestMemory, before: list[bytes], allowed, what: str) -> None:
    """Every byte of guest memory is as in ``before`` except in ``allowed`` = (region, lo, hi)."""
    region, lo, hi = allowed
    for i, r in enumerate(mem.regions):
        now = r.view.tobytes()
        if i == region:
            ok = now[:lo] == before[i][:lo] and now[hi:] == before[i][hi:]
        else:
            ok = now == before[i]
        if not ok:
            diff = [k for k in range(len(now)) if now[k] != before[i][k]]
            raise AssertionError(f"{what} wrote region {i} bytes {diff[:8]}..., allowed {allowed}")


# -- the independent restatement of the rules (for unmutated chains) -----------------------

class RefMemory:
    """Byte reads by guest-physical address over the generated layout (no vblk code)."""

    def __init__(self, mem: GuestMemory, case: Case) -> None:
        self.spans = [(case.regions[i].gpa, case.regions[i].size, mem.regions[k].view,
                       case.regions[i].mmap_offset) for k, i in enumerate(case.order)]

    def read(self, gpa: int, n: int) -> bytes | None:
        out = b""
        while n:
            for base, size, view, off in self.spans:
                if base <= gpa < base + size:
                    take = min(n, base + size - gpa)
                    out += view[off + gpa - base:off + gpa - base + take].tobytes()
                    gpa, n = gpa + take, n - take
                    break
            else:
                return None
        return out


def expected_walk(chain: Chain, negotiated: bool):
    """The segments walk() must return, or None when it must raise GuestError."""
    if chain.indirect and not negotiated:
        return None
    seen_write = False
    for _, _, f in chain.segments:
        if f & WRITE:
            seen_write = True
        elif seen_write:
            return None
    return [(a, n, bool(f & WRITE)) for a, n, f in chain.segments]


def expected_outcome(segs, ref: RefMemory, device: BlkDevice):
    """'guest-error', or (type, sector, data_out, data_in, status_addr, bad, plan-as-tuple)."""
    writable = [i for i, (_, n, w) in enumerate(segs) if w and n]
    if not writable or any(not w for _, _, w in segs[writable[-1]:]):
        return "guest-error"
    last = writable[-1]
    a, n, _ = segs[last]
    status = a + n - 1
    data_in = [(x, k) for x, k, w in segs[:last] if w and k] + ([(a, n - 1)] if n > 1 else [])
    readable = [(x, k) for x, k, w in segs if not w and k]
    header, need, data_out = b"", 16, []
    for x, k in readable:
        take = min(need, k)
        if take:
            got = ref.read(x, take)
            if got is None:
                return "guest-error"
            header += got
            need -= take
        if take < k:
            data_out.append((x + take, k - take))
    g = device.geometry
    if need:
        return (None, None, None, None, status, True, ("done", BlkStatus.IOERR))
    rtype, _, sector = OUTHDR.unpack(header)
    rtype &= ~BLK_T_BARRIER
    out_len = sum(k for _, k in data_out)
    in_len = sum(k for _, k in data_in)
    if rtype in (BlkType.IN, BlkType.OUT):
        write = rtype == BlkType.OUT
        start, length = sector * 512, out_len if write else in_len
        if (write and (data_in or g.readonly)) or (not write and data_out):
            plan = ("done", BlkStatus.IOERR)
        elif length % g.logical_block_size or start % g.logical_block_size:
            plan = ("done", BlkStatus.IOERR)
        elif start + length > g.size_bytes:
            plan = ("done", BlkStatus.IOERR)
        else:
            plan = ("io", Op.WRITE if write else Op.READ, start, length)
    elif rtype in (BlkType.FLUSH, BlkType.FLUSH_OUT):
        plan = ("done", BlkStatus.OK) if g.readonly else ("io", Op.FLUSH, 0, 0)
    elif rtype == BlkType.GET_ID:
        plan = ("done", BlkStatus.IOERR) if data_out or not data_in else ("done", BlkStatus.OK)
    elif rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
        plan = expected_zeroing(rtype, data_out, data_in, ref, device)
    else:
        plan = ("done", BlkStatus.UNSUPP)
    return (rtype, sector, data_out, data_in, status, False, plan)


def expected_zeroing(rtype, data_out, data_in, ref: RefMemory, device: BlkDevice):
    """DISCARD / WRITE_ZEROES by the virtio spec and ACRN's checks, from the reference memory."""
    g, discard = device.geometry, rtype == BlkType.DISCARD
    if g.readonly:
        return ("done", BlkStatus.IOERR)
    if discard and device.discard is None:
        return ("done", BlkStatus.UNSUPP)
    if data_in:
        return ("done", BlkStatus.IOERR)
    out_len = sum(k for _, k in data_out)
    max_seg = device.discard.max_segments if discard else WRITE_ZEROES_MAX_SEG
    if out_len == 0 or out_len % 16 or out_len // 16 > max_seg:
        return ("done", BlkStatus.IOERR)
    payload = b""
    for x, k in data_out:
        got = ref.read(x, k)
        if got is None:
            return ("done", BlkStatus.IOERR)
        payload += got
    max_sectors = device.discard.max_sectors if discard else WRITE_ZEROES_MAX_SECTORS
    align = device.discard.alignment if discard else 0
    cap, lbs, ranges, unmap = g.size_bytes // 512, g.logical_block_size, [], True
    for i in range(0, out_len, 16):
        sector, count, flags = struct.unpack_from("<QII", payload, i)
        if count == 0 or count > max_sectors or sector + count > cap:
            return ("done", BlkStatus.IOERR)
        if flags & ~(0 if discard else 1):
            return ("done", BlkStatus.UNSUPP)
        if (sector * 512) % lbs or (count * 512) % lbs or (align and sector % align):
            return ("done", BlkStatus.IOERR)
        ranges.append((sector * 512, count * 512))
        unmap = unmap and bool(flags & 1)
    return ("io", Op.DISCARD if discard else Op.WRITE_ZEROES, ranges[0][0],
            sum(n for _, n in ranges), tuple(ranges),
            (not discard) and unmap and device.discard is not None)


def plan_tuple(plan):
    if isinstance(plan, Completion):
        return ("done", plan.status)
    if plan.op in (Op.DISCARD, Op.WRITE_ZEROES):
        return ("io", plan.op, plan.offset, plan.length, plan.ranges, plan.unmap)
    return ("io", plan.op, plan.offset, plan.length)


# -- the invariants -------------------------------------------------------------------------

def check_translation(mem: GuestMemory, gpa: int, length: int, stats: Counter) -> None:
    try:
        pieces = mem.translate(gpa, length)
    except GuestError:
        stats["translate_refused"] += 1
        return
    assert sum(n for _, _, n in pieces) == length
    for i, off, n in pieces:
        r = mem.regions[i]
        assert r.base <= off and off + n <= r.base + r.size, (gpa, length, pieces)
        assert n > 0
    stats["translate_ok"] += 1


def check_plan(plan, device: BlkDevice, req, stats: Counter) -> None:
    g = device.geometry
    if isinstance(plan, IoPlan):
        if plan.op == Op.FLUSH:
            assert plan.length == 0
        elif plan.op in (Op.DISCARD, Op.WRITE_ZEROES):
            assert not g.readonly and plan.ranges and plan.offset == plan.ranges[0][0]
            assert plan.length == sum(n for _, n in plan.ranges)
            for off, n in plan.ranges:         # every range inside the window, whole blocks
                assert n > 0 and off % g.logical_block_size == 0 and n % g.logical_block_size == 0
                assert 0 <= off and off + n <= g.size_bytes, plan
            assert not (plan.op == Op.DISCARD and device.discard is None)
        else:
            assert plan.op in (Op.READ, Op.WRITE)
            assert plan.length >= 0
            assert plan.offset >= 0, plan
            assert plan.offset + plan.length <= g.size_bytes, plan
            expect = req.in_len if plan.op == Op.READ else req.out_len
            assert plan.length == expect
            assert not (plan.op == Op.WRITE and g.readonly)
        stats[f"plan_io_{plan.op}"] += 1
    else:
        assert isinstance(plan, Completion)
        assert plan.status in (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP)
        assert len(plan.fill) <= BLK_ID_BYTES
        stats[f"plan_status_{int(plan.status)}"] += 1


def run_case(case: Case, stats: Counter) -> None:
    stats["cases"] += 1
    mem = build_memory(case)
    ring = None
    try:
        g = case.geometry
        # discard on for every other disk size, with a one-block alignment and 4 segments
        discard = (DiscardLimits(min(max(g.capacity, g.logical_block_size // 512), 2 ** 32 - 8)
                                 // (g.logical_block_size // 512) * (g.logical_block_size // 512),
                                 4, g.logical_block_size // 512)
                   if (g.size_bytes // g.logical_block_size) % 2 == 0 else None)
        device = BlkDevice(g, writeback=False, discard=discard)
        d, a, u = case.ring_qvas
        try:
            ring = SplitRing(mem, case.queue_size, d, a, u, last_avail_idx=case.last_avail,
                             indirect=case.negotiated_indirect, event_idx=case.event_idx)
        except GuestError:
            stats["ring_refused"] += 1
            assert case.ring_gpas is None, "a ring laid out inside memory was refused"
            return
        assert case.queue_size in QUEUE_SIZES or case.queue_size == MAX_QUEUE
        stats["rings"] += 1
        stats[f"queue_{case.queue_size}"] += 1
        before = snapshot(mem)
        resubmit = attach_inflight(ring, case, stats) if case.inflight is not None else []
        laid_out = case.ring_gpas is not None and case.inflight is None
        by_head = {c.head: c for c in case.chains} if case.ring_gpas is not None else {}
        ahead = (case.avail_idx - case.last_avail) & 0xFFFF
        popped = []
        try:
            n = ring.pending()
            assert 0 <= n <= ring.size
            assert n == ahead or not laid_out
            for _ in range(n):
                popped.append(ring.pop())
        except RingBroken:
            stats["ring_broken"] += 1
            assert ahead > case.queue_size or not laid_out
        for k, head in enumerate(popped):
            if laid_out and k < len(case.heads):
                assert head == case.heads[k]
        ref = RefMemory(mem, case)
        for head in resubmit + popped + case.extra_heads:
            walk_one(ring, mem, device, head, by_head.get(head), case, ref, stats)
        # walking, parsing and planning are read-only (pop may only touch avail_event)
        allowed = used_span(mem, ring)
        assert_unchanged_outside(mem, before, allowed, "pop/walk/parse/plan")
        # completion: used elements, one index store, kick suppression
        for head in resubmit + popped:
            ring.put_used(head, 1)
        ring.publish_used()
        assert ring._used_idx16[0] == ring.used_idx
        ring.set_kicks_wanted(False)
        ring.set_kicks_wanted(True)
        ring.needs_notify()
        assert_unchanged_outside(mem, before, allowed, "put_used/publish/kick suppression")
    finally:
        if ring is not None:
            ring.detach()
        mem.close()


def attach_inflight(ring: SplitRing, case: Case, stats: Counter) -> list[int]:
    """Attach a frontend-supplied inflight region; what it says to re-run must be sane."""
    region = bytearray(case.inflight)
    used_idx = ring.used_idx
    heads = ring.attach_inflight(InflightQueue(memoryview(region), ring.size))
    assert len(heads) == len(set(heads)) <= ring.size, heads
    assert all(0 <= h < ring.size for h in heads), heads
    assert ring.last_avail_idx == (used_idx + len(heads)) & 0xFFFF
    stats["inflight_attached"] += 1
    stats["inflight_resubmitted"] += len(heads)
    return heads


def used_span(mem: GuestMemory, ring: SplitRing) -> tuple[int, int, int]:
    for i, r in enumerate(mem.regions):
        if r.view is ring._used:
            return i, ring._used_off, ring._used_off + used_ring_bytes(ring.size)
    raise AssertionError("used ring not in any region")


def walk_one(ring, mem, device, head, chain, case, ref, stats) -> None:
    # The fast path looks first, as in the supervisor; it may only accept what the general
    # path below runs as a plain read or write, with the same answer.
    fast = simple_rw(ring, mem, device.geometry, head)
    general = walk_general(ring, mem, device, head, chain, case, ref, stats)
    if fast is None:
        return
    stats["fast_accepted"] += 1
    assert general is not None, f"the fast path accepted what the general path does not run: {fast}"
    op, offset, length, pieces, status_addr, status_region, status_off = fast
    assert (op, offset, length, pieces, status_addr) == general
    assert mem.translate(status_addr, 1) == [(status_region, status_off, 1)]


def walk_general(ring, mem, device, head, chain, case, ref, stats):
    """Walk, parse and plan ``head`` and check every invariant; returns (op, offset, length,
    pieces, status_addr) when the supervisor would hand it to I/O as a plain read or write
    (what the fast path may accept), else None."""
    stats["walks"] += 1
    try:
        segs = ring.walk(head)
    except GuestError:
        stats["walk_refused"] += 1
        if chain is not None and not chain.mutated:
            assert expected_walk(chain, case.negotiated_indirect) is None, \
                f"a well-formed chain was refused: {chain}"
            stats["oracle_walk"] += 1
        return None
    assert 1 <= len(segs) <= ring.size + MAX_INDIRECT
    for addr, length, _writable in segs:
        assert 0 <= addr <= U64_MAX and 0 <= length <= 0xFFFFFFFF
        check_translation(mem, addr, length, stats)
    oracle = chain is not None and not chain.mutated
    if oracle:
        assert segs == expected_walk(chain, case.negotiated_indirect)
        stats["oracle_walk"] += 1
    try:
        req = parse_request(segs, mem)
    except GuestError:
        stats["parse_refused"] += 1
        if oracle:
            assert expected_outcome(segs, ref, device) == "guest-error"
        return None
    stats["parsed"] += 1
    for addr, n in req.data_in + req.data_out:
        assert n > 0
        check_translation(mem, addr, n, stats)
    assert any(a <= req.status_addr < a + n for a, n, w in segs if w)
    want_bytes = device.segment_bytes_wanted(req)
    try:                      # as the supervisor does: the segments read from guest memory
        plan = device.plan(req, read_data_out(req, mem, want_bytes) if want_bytes else b"")
    except GuestError:
        plan = Completion(BlkStatus.IOERR, reason="segments unreadable")
    check_plan(plan, device, req, stats)
    if oracle:
        want = expected_outcome(segs, ref, device)
        assert want != "guest-error", f"parse accepted {segs}"
        if want[5]:
            assert req.bad and req.status_addr == want[4]
        else:
            assert (req.type, req.sector, req.data_out, req.data_in, req.status_addr) == want[:5]
        assert plan_tuple(plan) == want[6], (plan, want)
        stats["oracle_plan"] += 1
    if isinstance(plan, Completion) or plan.op not in (Op.READ, Op.WRITE):
        return None
    try:                      # what the supervisor decides (its last checks before I/O)
        req, plan, pieces = admit_chain(ring, mem, device, head)
    except GuestError:
        return None
    if isinstance(plan, Completion):
        return None
    return plan.op, plan.offset, plan.length, pieces, req.status_addr


@pytest.mark.parametrize("shard", range(SHARDS))
def test_ring_walker_parser_and_plan_hold_their_invariants(shard):
    stats: Counter = Counter()

    @SETTINGS
    @given(k=knobs())
    def one(k):
        for i in range(GUESTS):
            guest = replace(k, seed=(k.seed + i * 0x9E3779B97F4A7C15) % (1 << 64))
            try:
                run_case(generate(guest), stats)
            except BaseException as exc:
                exc.add_note(f"replay: run_case(generate({guest!r}), Counter())")
                raise

    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(ROUNDS):
        one()
    record("ring", stats, time.monotonic() - t0, time.process_time() - c0)
    assert stats["cases"] >= EXAMPLES * ROUNDS * GUESTS
    # the generator must reach every stage, or the invariants are checked on nothing
    if stats["cases"] >= 2000:
        for key in ("rings", "walks", "parsed", "oracle_plan", "ring_broken", "walk_refused",
                    "plan_io_0", "plan_io_1", "fast_accepted"):
            assert stats[key], (key, dict(stats))
