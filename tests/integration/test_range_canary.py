"""Canaries around a --range window: thousands of hostile requests against the real process.

The image has distinct canary bytes before and after the window the guest is served. A
seeded random mix of requests goes in through BlkClient over a real socket and real worker
processes:

* reads and writes in range (whole blocks, 1-4 segments, direct or indirect), checked
  against a model of the window's contents;
* reads and writes out of range, at huge sectors (2**63/512, 2**64-1), with lengths that
  are not whole blocks, with data in the wrong direction, with more buffers than a slot
  holds;
* flushes, GET_ID with every buffer size, unknown types (and the legacy barrier bit);
* raw malformed chains (``submit_raw``): loops, next out of the table, no status byte,
  INDIRECT+NEXT, bad and huge indirect tables, nested indirect, header, data, status byte
  or tables outside guest RAM, readable after writable, zero-length and huge descriptors;
* now and then an avail index that runs ahead (the ring is broken: VringError, reconnect),
  and an abrupt disconnect with writes in flight (reconnect, check each write happened
  whole or not at all).

Every well-formed request must get exactly the status (and used length) the rules give;
every raw chain the used length and status byte its defect gives. At the end vblk is still
alive and serves a correct write and read, the window equals the model, and every byte
outside the window is unchanged.

Run twice: ``--range START/SIZE`` (512-byte blocks, writethrough) and the ACRN string
``img,range=S/N,sectorsize=4096`` (writeback). VBLK_CANARY_OPS sets the number of
operations per run (default 2000), VBLK_CANARY_SEED the seed (default 1).
"""
from __future__ import annotations

import json
import os
import random
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from vblk.ipc import MAX_IOV
from vblk.testing.frontend import DEFAULT_FEATURES, STATUS_UNSET, BlkClient, VringError
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import BLK_ID_BYTES, BLK_T_BARRIER, BlkStatus, BlkType, Feature

MiB = 1 << 20
OPS = int(os.environ.get("VBLK_CANARY_OPS", "2000"))
SEED = int(os.environ.get("VBLK_CANARY_SEED", "1"))
STATS_FILE = os.environ.get("VBLK_FUZZ_STATS")
IMAGE_SIZE = 4 * MiB
TIMEOUT = 10.0                        # per request and per batch
BATCH = 16
QUEUE = 128
NEXT, WRITE, INDIRECT = 1, 2, 4
OK, IOERR, UNSUPP = int(BlkStatus.OK), int(BlkStatus.IOERR), int(BlkStatus.UNSUPP)
UNKNOWN_TYPES = [2, 3, 6, 7, 9, 10, 12, 14, 0x7FFFFFFF, BLK_T_BARRIER | 14]
ZEROING = (int(BlkType.DISCARD), int(BlkType.WRITE_ZEROES))
WRITE_ZEROES_MAX_SECTORS, UNMAP = 65536, 1
FEATURES = DEFAULT_FEATURES | Feature.BLK_DISCARD.mask | Feature.BLK_WRITE_ZEROES.mask


def canary(tag: bytes, n: int) -> bytes:
    """n bytes no request could plausibly write: the tag and the offset, over and over."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"<%s-%08x>" % (tag, i)
        i += 1
    return bytes(out[:n])


@dataclass
class Window:
    start: int              # bytes into the image
    size: int
    lbs: int
    discard_sectors: int    # the discard limits vblk is started with
    discard_segments: int


@dataclass
class Run:
    """The client of the moment, the model of the window and the counts."""
    server: str
    window: Window
    model: bytearray
    rng: random.Random
    client: BlkClient | None = None
    serial: bytes | None = None
    stats: Counter = field(default_factory=Counter)

    def connect(self) -> BlkClient:
        self.client = BlkClient.connect(self.server, timeout=TIMEOUT, queue_size=QUEUE, ram_mib=32,
                                        features=FEATURES)
        self.stats["connections"] += 1
        return self.client

    def reconnect(self) -> BlkClient:
        self.client.close(graceful=False)
        return self.connect()


# -- well-formed requests ----------------------------------------------------------------

@dataclass
class Request:
    rtype: int
    sector: int
    data: bytes | None = None          # device-readable payload
    nbytes: int = 0                    # device-writable buffer
    segments: int | list[int] = 1     # a count, or the sizes of the pieces
    indirect: bool = False

    @property
    def nsegs(self) -> int:
        return self.segments if isinstance(self.segments, int) else len(self.segments)

    @property
    def length(self) -> int:
        return len(self.data) if self.data is not None else self.nbytes

    def expected(self, w: Window) -> int:
        """The status ACRN's rules (and vblk's one slot limit) give this request."""
        t = self.rtype & ~BLK_T_BARRIER
        if t in (BlkType.IN, BlkType.OUT):
            if t == BlkType.OUT and self.data is None and self.nbytes:
                return IOERR                       # a write with device-writable data
            if t == BlkType.IN and self.data is not None and self.data:
                return IOERR                       # a read with device-readable data
            start = self.sector * 512
            if self.length % w.lbs or start % w.lbs or start + self.length > w.size:
                return IOERR
            if self.nsegs > MAX_IOV:
                return IOERR
            return OK
        if t in ZEROING:
            return self._expected_zeroing(t, w)
        if t in (BlkType.FLUSH, BlkType.FLUSH_OUT):
            return OK
        if t == BlkType.GET_ID:
            return OK if self.data is None and self.nbytes else IOERR
        return UNSUPP

    def _expected_zeroing(self, t: int, w: Window) -> int:
        """DISCARD / WRITE_ZEROES: the virtio spec's and ACRN's checks, in vblk's order."""
        if self.data is None or not self.data or len(self.data) % 16:
            return IOERR                           # writable buffer, nothing, or a partial one
        n = len(self.data) // 16
        max_segments = w.discard_segments if t == BlkType.DISCARD else 1
        max_sectors = w.discard_sectors if t == BlkType.DISCARD else WRITE_ZEROES_MAX_SECTORS
        if n > max_segments:
            return IOERR
        for sector, count, flags in self.zeroing_segments():
            if count == 0 or count > max_sectors or sector + count > w.size // 512:
                return IOERR
            if flags & ~(0 if t == BlkType.DISCARD else UNMAP):
                return UNSUPP
            if (sector * 512) % w.lbs or (count * 512) % w.lbs:
                return IOERR
        return OK

    def zeroing_segments(self) -> list[tuple[int, int, int]]:
        return [struct.unpack_from("<QII", self.data, i) for i in range(0, len(self.data) // 16 * 16, 16)]

    def byte_range(self, w: Window) -> tuple[int, int] | None:
        """The window bytes this request reads or writes if it succeeds."""
        t = self.rtype & ~BLK_T_BARRIER
        if t in (BlkType.IN, BlkType.OUT) and self.expected(w) == OK and self.length:
            return self.sector * 512, self.sector * 512 + self.length
        return None


def random_request(run: Run) -> tuple[str, Request]:
    rng, w = run.rng, run.window
    blocks = w.size // w.lbs
    per = w.lbs // 512
    kind = rng.choices(["read", "write", "read_bad", "write_bad", "flush", "get_id", "unknown",
                        "wrong_direction", "many_buffers", "zeroing"],
                       [28, 28, 10, 10, 4, 5, 5, 4, 1, 10])[0]
    segs = rng.choice([1, 1, 1, 2, 3, 4])
    indirect = rng.random() < 0.3
    if kind in ("read", "write"):
        n = rng.choice([1, 1, 2, 3, 8, 16])
        n = min(n, blocks)
        first = rng.choice([0, blocks - n, rng.randint(0, blocks - n)])
        sector, length = first * per, n * w.lbs
        rtype = int(BlkType.IN if kind == "read" else BlkType.OUT)
        if rng.random() < 0.05:
            rtype |= BLK_T_BARRIER
        if kind == "read":
            return kind, Request(rtype, sector, nbytes=length, segments=min(segs, length), indirect=indirect)
        return kind, Request(rtype, sector, data=rng.randbytes(length), segments=min(segs, length),
                             indirect=indirect)
    if kind in ("read_bad", "write_bad"):
        sector, length = rng.choice([
            (blocks * per, w.lbs),                         # starts at the end
            ((blocks - 1) * per, 2 * w.lbs),               # runs past the end
            (blocks * per + per, w.lbs),                   # past the end
            (2 ** 63 // 512, w.lbs),                       # huge
            (2 ** 64 - 1, w.lbs),                          # the largest sector there is
            ((2 ** 64 - 512) // 512, 512),
            (0, w.lbs + 1),                                # not whole blocks
            (0, w.lbs - 1),
            (1, w.lbs) if w.lbs > 512 else (0, 100),       # not on a block boundary
            (per, 3),
        ])
        rtype = int(BlkType.IN if kind == "read_bad" else BlkType.OUT)
        segs = min(segs, length)
        if kind == "read_bad":
            return kind, Request(rtype, sector, nbytes=length, segments=segs, indirect=indirect)
        return kind, Request(rtype, sector, data=rng.randbytes(length), segments=segs, indirect=indirect)
    if kind == "flush":
        rtype = rng.choice([int(BlkType.FLUSH), int(BlkType.FLUSH_OUT), int(BlkType.FLUSH) | BLK_T_BARRIER])
        return kind, Request(rtype, rng.choice([0, 2 ** 63]), nbytes=rng.choice([0, 0, 512]))
    if kind == "get_id":
        choice = rng.random()
        if choice < 0.15:
            return kind, Request(int(BlkType.GET_ID), 0)                        # no buffer
        if choice < 0.25:
            return kind, Request(int(BlkType.GET_ID), 0, data=b"x" * 20)        # wrong way
        return kind, Request(int(BlkType.GET_ID), 0, nbytes=rng.choice([20, 20, 1, 7, 19, 64, 512]))
    if kind == "zeroing":
        return kind, zeroing_request(rng, w, blocks, per, segs, indirect)
    if kind == "unknown":
        rtype = rng.choice(UNKNOWN_TYPES + [rng.randrange(14, 1 << 31)])
        return kind, Request(rtype, rng.randrange(1 << 64), nbytes=rng.choice([0, 512]))
    if kind == "wrong_direction":
        if rng.random() < 0.5:
            return kind, Request(int(BlkType.IN), 0, data=rng.randbytes(w.lbs))
        return kind, Request(int(BlkType.OUT), 0, nbytes=w.lbs)
    # many_buffers: more pieces than one slot holds (only an indirect table has room)
    n = rng.choice([MAX_IOV, MAX_IOV + 1, 300])
    length = n * 512 if w.lbs == 512 else -(-n * 512 // w.lbs) * w.lbs
    sizes = [512] * (n - 1) + [length - 512 * (n - 1)]
    return kind, Request(int(BlkType.IN), 0, nbytes=length, segments=sizes, indirect=True)


def zeroing_request(rng: random.Random, w: Window, blocks: int, per: int, segs: int,
                    indirect: bool) -> Request:
    """DISCARD / WRITE_ZEROES: mostly good segments, some hostile (past the end, wrapping,
    zero or too many sectors, partial blocks, reserved flags), the data sometimes truncated,
    split over descriptors or in a device-writable buffer."""
    rtype = rng.choice([*ZEROING, BLK_T_BARRIER | int(BlkType.DISCARD)])
    n = rng.choice([1, 1, 1, 2, w.discard_segments, w.discard_segments + 1])
    triples = []
    for _ in range(n):
        count_blocks = rng.choice([1, 1, 2, 8, 64])
        first = rng.randint(0, max(blocks - count_blocks, 0))
        sector, count = first * per, min(count_blocks, blocks) * per
        r = rng.random()
        if r < 0.05:
            sector = blocks * per                            # starts at the end
        elif r < 0.10:
            sector = 2 ** 64 - per                           # wraps around
        elif r < 0.13:
            count = 0
        elif r < 0.16:
            count = w.discard_sectors + per                  # above the limit
        elif r < 0.20 and per > 1:
            sector += 1                                      # not on a block boundary
        flags = rng.choices([0, UNMAP, 2, 0x8000_0000], [85, 10, 3, 2])[0]
        triples.append((sector, count, flags))
    data = b"".join(struct.pack("<QII", *t) for t in triples)
    if rng.random() < 0.05:
        return Request(rtype, 0, nbytes=len(data))           # the wrong direction
    if rng.random() < 0.05:
        data = data[:rng.randrange(len(data))] or data[:1]   # not whole segments
    return Request(rtype, 0, data=data, segments=min(segs, len(data)), indirect=indirect)


def check_completion(run: Run, kind: str, req: Request, done) -> None:
    w = run.window
    want = req.expected(w)
    assert done.status == want, (f"{kind} {req.rtype:#x} sector {req.sector} length {req.length} "
                                 f"segments {req.nsegs}: status {done.status}, want {want}")
    t = req.rtype & ~BLK_T_BARRIER
    if want == OK and t == BlkType.IN:
        assert done.used_len == req.length + 1
        lo, hi = req.byte_range(w) or (0, 0)
        assert done.data == bytes(run.model[lo:hi]), f"read of sector {req.sector} returned wrong data"
    elif want == OK and t == BlkType.GET_ID:
        n = min(req.nbytes, BLK_ID_BYTES)
        assert done.used_len == 1 + n
        assert done.data[:n] == run.serial[:n]
    else:
        assert done.used_len == 1, (kind, done)
    if want == OK and t == BlkType.OUT and req.length:
        lo, hi = req.byte_range(w)
        run.model[lo:hi] = req.data
    if want == OK and t in ZEROING:             # a regular file: discarded bytes read as zeroes
        for sector, count, _ in req.zeroing_segments():
            run.model[sector * 512:(sector + count) * 512] = bytes(count * 512)
        run.stats["zeroing_ok"] += 1
    run.stats[f"status_{want}"] += 1


def submit(client: BlkClient, req: Request) -> int:
    return client.submit(req.rtype, req.sector, data=req.data, nbytes=req.nbytes,
                         segments=req.segments, indirect=req.indirect, publish=False)


# -- raw malformed chains -----------------------------------------------------------------

@dataclass
class Raw:
    name: str
    descs: list
    used_len: int
    status_gpa: int | None
    status: int | None                 # None: the status byte stays untouched
    allocations: list
    writes_window: tuple[int, bytes] | None = None   # (window offset, data) if it reaches disk


def raw_chain(run: Run) -> Raw:
    """One malformed chain and what vblk must answer for it."""
    c, rng, w = run.client, run.rng, run.window
    ram_end = c.ram.end
    hdr = c.allocator.alloc(64)
    data = c.allocator.alloc(max(w.lbs, 512) * 2)
    table = c.allocator.alloc(16 * 8)
    allocs = [hdr, data, table]
    status = hdr + 32
    oor = rng.choice([ram_end, ram_end + 4096, 2 ** 64 - 4096, 2 ** 63, ram_end - 8])
    sector = rng.randrange(0, w.size // w.lbs) * (w.lbs // 512)
    rtype = rng.choice([BlkType.IN, BlkType.OUT])
    c.ram.write(hdr, OUTHDR.pack(rtype, 0, sector))
    c.ram.write(status, bytes([STATUS_UNSET]))
    data_flag = WRITE if rtype == BlkType.IN else 0
    lbs = w.lbs
    name = rng.choice(["loop", "next_outside", "no_status", "indirect_and_next", "table_len",
                       "table_outside", "nested_indirect", "table_next_outside", "data_outside",
                       "header_outside", "status_outside", "header_writable",
                       "readable_after_writable",
                       "status_only", "zero_length_data", "huge_length", "loop_in_table"])
    untouched = (0, status, None)
    if name == "loop":
        descs = [(hdr, 16, NEXT, 1), (data, lbs, data_flag | NEXT, 2), (status, 1, WRITE | NEXT, 1)]
        result = untouched
    elif name == "next_outside":
        descs = [(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, rng.choice([QUEUE, 999, 0xFFFF]))]
        result = untouched
    elif name == "no_status":
        descs = [(hdr, 16, NEXT, 1), (data, lbs, 0, 0)] if rng.random() < 0.5 else [(hdr, 16, 0, 0)]
        result = untouched
    elif name == "indirect_and_next":
        c.driver.write_table(table, [(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
        descs = [(table, 32, INDIRECT | NEXT, 1), (status, 1, WRITE, 0)]
        result = untouched
    elif name == "table_len":
        c.driver.write_table(table, [(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)])
        descs = [(table, rng.choice([0, 8, 24, 16 * 1025, 16 * 4096, 0xFFFFFFF0]), INDIRECT, 0)]
        result = untouched
    elif name == "table_outside":
        descs = [(oor, 32, INDIRECT, 0)]
        result = untouched
    elif name == "nested_indirect":
        c.driver.write_table(table, [(hdr, 16, NEXT, 1), (table, 32, INDIRECT, 0)])
        descs = [(table, 32, INDIRECT, 0)]
        result = untouched
    elif name == "table_next_outside":
        c.driver.write_table(table, [(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, 2)])
        descs = [(table, 32, INDIRECT, 0)]
        result = untouched
    elif name == "loop_in_table":
        c.driver.write_table(table, [(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, 1)])
        descs = [(table, 32, INDIRECT, 0)]
        result = untouched
    elif name == "data_outside":
        # a whole, in-range request whose data buffer is not in RAM: IOERR, disk untouched
        descs = [(hdr, 16, NEXT, 1), (oor, lbs, data_flag | NEXT, 2), (status, 1, WRITE, 0)]
        result = (1, status, IOERR)
    elif name == "status_outside":
        # checked before any I/O: returned with no status, and a write never reaches the disk
        outside = rng.choice([ram_end, ram_end + 4096, 2 ** 64 - 4096, 2 ** 63])
        descs = [(hdr, 16, NEXT, 1), (data, lbs, data_flag | NEXT, 2), (outside, 1, WRITE, 0)]
        result = untouched
    elif name == "header_outside":
        descs = [(oor, 16, NEXT, 1), (status, 1, WRITE, 0)]
        result = untouched
    elif name == "header_writable":
        descs = [(hdr, 16, WRITE | NEXT, 1), (status, 1, WRITE, 0)]
        result = (1, status, IOERR)                # no readable header: IOERR in the status
    elif name == "readable_after_writable":
        descs = [(hdr, 16, NEXT, 1), (status, 1, WRITE | NEXT, 2), (data, lbs, 0, 0)]
        result = untouched
    elif name == "status_only":
        descs = [(status, 1, WRITE, 0)]
        result = (1, status, IOERR)
    elif name == "zero_length_data":
        # no data at all: a zero-length read or write at an in-range sector succeeds
        descs = [(hdr, 16, NEXT, 1), (data, 0, data_flag | NEXT, 2), (status, 1, WRITE, 0)]
        result = (1, status, OK)
    else:  # huge_length
        descs = [(hdr, 16, NEXT, 1), (data, rng.choice([0xFFFFFFFF, 0xFFFFFE00]), data_flag | NEXT, 2),
                 (status, 1, WRITE, 0)]
        result = (1, status, IOERR)
    used_len, status_gpa, st = result
    return Raw(name, descs, used_len, status_gpa, st, allocs)


def run_raw(run: Run) -> None:
    c = run.client
    raw = raw_chain(run)
    c.submit_raw(raw.descs)
    [done] = c.wait(1, timeout=TIMEOUT)
    assert done.used_len == raw.used_len, f"raw {raw.name}: used len {done.used_len}, want {raw.used_len}"
    if raw.status_gpa is not None:
        got = c.ram.read(raw.status_gpa, 1)[0]
        want = STATUS_UNSET if raw.status is None else raw.status
        assert got == want, f"raw {raw.name}: status byte {got}, want {want}"
    for a in raw.allocations:
        c.allocator.free(a)
    run.stats[f"raw_{raw.name}"] += 1
    run.stats["raw_chains"] += 1


# -- ring breaking and abrupt disconnects -------------------------------------------------

def break_ring(run: Run) -> None:
    """An avail index far ahead: vblk stops the ring and signals the error eventfd."""
    c = run.client
    c.submit(BlkType.IN, 0, nbytes=run.window.lbs, publish=False)
    c.driver.set_avail_idx(c.driver.published_idx + QUEUE + 1 + run.rng.randrange(1000))
    os.eventfd_write(c.fds.kick, 1)
    with pytest.raises(VringError):
        c.wait(1, timeout=TIMEOUT)
    run.stats["ring_broken"] += 1
    run.reconnect()


def abrupt_disconnect(run: Run) -> None:
    """Writes in flight, then the connection drops: each write lands whole or not at all."""
    c, w, rng = run.client, run.window, run.rng
    writes = []
    for _ in range(rng.randint(1, 8)):
        n = rng.choice([1, 2, 8])
        first = rng.randrange(0, w.size // w.lbs - n + 1)
        lo, hi = first * w.lbs, (first + n) * w.lbs
        if any(lo < b and a < hi for a, b, _ in writes):
            continue
        data = rng.randbytes(hi - lo)
        c.submit(BlkType.OUT, lo // 512, data=data)
        writes.append((lo, hi, data))
    run.reconnect()
    for lo, hi, data in writes:
        got = run.client.read(lo // 512, hi - lo)
        assert got.status == OK
        assert got.data in (data, bytes(run.model[lo:hi])), "a write landed in part"
        run.model[lo:hi] = got.data
    run.stats["abrupt_disconnects"] += 1


# -- the run ------------------------------------------------------------------------------

def drive(run: Run, ops: int) -> None:
    batch: list[tuple[int, str, Request]] = []
    busy: list[tuple[int, int, bool]] = []         # (lo, hi, is_write) of the batch

    def flush_batch() -> None:
        if not batch:
            return
        c = run.client
        c.publish()
        try:
            done = {d.tag: d for d in c.wait(len(batch), timeout=TIMEOUT)}
        except VringError as exc:
            raise AssertionError("vblk broke the ring over well-formed requests: "
                                 f"{[(k, r.rtype, r.sector, r.length) for _, k, r in batch]}") from exc
        for tag, kind, req in batch:
            check_completion(run, kind, req, done[tag])
        batch.clear()
        busy.clear()

    for _ in range(ops):
        x = run.rng.random()
        run.stats["ops"] += 1
        if x < 0.003:
            flush_batch()
            break_ring(run)
            continue
        if x < 0.006:
            flush_batch()
            abrupt_disconnect(run)
            continue
        if x < 0.15:
            flush_batch()
            run_raw(run)
            continue
        kind, req = random_request(run)
        if kind == "zeroing":                      # may cover many ranges: run it alone
            flush_batch()
            batch.append((submit(run.client, req), kind, req))
            run.stats[f"op_{kind}"] += 1
            flush_batch()
            continue
        rng_ = req.byte_range(run.window)
        is_write = (req.rtype & ~BLK_T_BARRIER) == BlkType.OUT
        if rng_ and any(rng_[0] < hi and lo < rng_[1] and (w or is_write) for lo, hi, w in busy):
            flush_batch()                          # keep the model exact: no overlap in flight
        batch.append((submit(run.client, req), kind, req))
        run.stats[f"op_{kind}"] += 1
        if rng_:
            busy.append((*rng_, is_write))
        if len(batch) >= BATCH or run.rng.random() < 0.2:
            flush_batch()
    flush_batch()


def make_image(path, window: Window) -> tuple[bytes, bytes]:
    before = canary(b"CANARY-BEFORE", window.start)
    after = canary(b"CANARY-AFTER", IMAGE_SIZE - window.start - window.size)
    inside = random.Random(SEED).randbytes(window.size)
    with open(path, "wb") as f:
        f.write(before + inside + after)
    return before, after


CONFIGS = {
    # START and SIZE deliberately not powers of two; 512-byte blocks; writethrough
    # discard: at most 64 sectors in each of up to 4 segments
    "range_flag": (Window(MiB + 3 * 512, MiB + 5 * 512, 512, 64, 4),
                   lambda img, w: (str(img), "--range", f"{w.start}/{w.size}",
                                   "--discard-limits", f"{w.discard_sectors}:{w.discard_segments}:0")),
    # ACRN's string: range in 4096-byte logical sectors; writeback (flushes do the syncing);
    # discard with ACRN's defaults (the whole disk, one segment)
    "acrn_range_4k": (Window(300 * 4096, 200 * 4096, 4096, 200 * 8, 1),
                      lambda img, w: (f"{img},range={w.start // 4096}/{w.size // 4096},"
                                      f"sectorsize=4096,writeback,discard",)),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_hostile_requests_never_touch_bytes_outside_the_window(tmp_path, vblk_server, config):
    window, args = CONFIGS[config]
    image = tmp_path / "canary.img"
    before, after = make_image(image, window)
    server = vblk_server(*args(image, window), "--log-level", "error")
    model = bytearray(open(image, "rb").read()[window.start:window.start + window.size])
    run = Run(server, window, model, random.Random(f"{SEED}-{config}"))
    t0 = time.monotonic()
    c = run.connect()
    try:
        assert c.config.capacity * 512 == window.size
        assert c.config.blk_size == window.lbs
        run.serial = c.get_id().data
        drive(run, OPS)
        # still alive, still right
        assert server.proc.poll() is None, "vblk died"
        c = run.client
        probe = random.Random(SEED).randbytes(2 * window.lbs)
        last = window.size // 512 - 2 * (window.lbs // 512)
        for sector in (0, last):
            assert c.write(sector, probe).status == OK
            assert c.read(sector, len(probe)).data == probe
            run.model[sector * 512:sector * 512 + len(probe)] = probe
        assert c.flush().status == OK
    finally:
        if run.client is not None:
            run.client.close(graceful=False)
    elapsed = time.monotonic() - t0
    assert server.proc.poll() is None, "vblk died"
    data = open(image, "rb").read()
    assert len(data) == IMAGE_SIZE
    assert data[:window.start] == before, "bytes before the window changed"
    assert data[window.start + window.size:] == after, "bytes after the window changed"
    assert data[window.start:window.start + window.size] == bytes(run.model), \
        "the window does not hold what the guest wrote"
    stats = dict(run.stats, seconds=round(elapsed, 2), config=config)
    print(f"\ncanary {config}: {json.dumps(stats, sort_keys=True)}")
    if STATS_FILE:
        with open(STATS_FILE, "a") as f:
            f.write(json.dumps({"kind": "canary", **stats}) + "\n")
    if OPS >= 1000:
        for key in ("status_0", "status_1", "status_2", "raw_chains", "zeroing_ok"):
            assert run.stats[key], (key, stats)


# -- regressions for what this fuzzing found --------------------------------------------------

def test_a_write_whose_status_byte_is_outside_ram_does_not_reach_the_disk(tmp_path, vblk_server):
    """Found by the canary run: the status address used to be checked only after the I/O."""
    image = tmp_path / "status.img"
    image.write_bytes(bytes(MiB))
    with BlkClient.connect(vblk_server(image, "--log-level", "error"), timeout=TIMEOUT) as c:
        hdr, data = c.allocator.alloc(64), c.allocator.alloc(512)
        c.ram.write(hdr, OUTHDR.pack(BlkType.OUT, 0, 8))
        c.ram.write(data, b"W" * 512)
        c.submit_raw([(hdr, 16, NEXT, 1), (data, 512, NEXT, 2), (c.ram.end + 4096, 1, WRITE, 0)])
        [done] = c.wait(1)
        assert done.used_len == 0
        assert c.flush().status == OK
    assert image.read_bytes()[8 * 512:9 * 512] == bytes(512), "the write was executed"


def test_a_memory_table_without_the_running_ring_is_refused_and_the_next_frontend_served(
        tmp_path, vblk_server):
    """Found by the session fuzzer: such a table used to replace the supervisor's memory
    anyway, so the ring was silently no longer served (the guest hung)."""
    from vblk.testing.frontend import BackendClosed, BackendRefused
    from vblk.vhost_user import messages as m

    image = tmp_path / "remap.img"
    image.write_bytes(bytes(MiB))
    server = vblk_server(image, "--log-level", "error")
    with BlkClient.connect(server, timeout=5.0) as c:
        assert c.write(0, b"A" * 512).status == OK
        r = c.ram.regions[0]
        moved = m.MemRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr + (1 << 40),
                            r.mmap_offset)          # the ring's frontend address is not in it
        with pytest.raises((BackendRefused, BackendClosed)):
            c.frontend.set_mem_table([moved], [c.ram.fd])
        c.broken = True                             # the backend drops us: no goodbye
    with BlkClient.connect(server, timeout=5.0) as c:
        assert c.read(0, 512).data == b"A" * 512
        assert c.write(8, b"B" * 512).status == OK
    assert server.proc.poll() is None
