"""Shared-memory ioreq slots: the records requests travel in between supervisor and workers.

Theory of operation
-------------------
The supervisor creates one memfd holding ``count`` fixed-size slots and hands it to every
worker. A slot goes through the states ACRN's blockif elements do:

    FREE --(supervisor fills it)--> PENDING --(a worker takes it)--> BUSY
         <--(supervisor completes)-- DONE <--(the worker finishes)--/

The supervisor keeps the free list, and for each worker the slots it handed that worker
(pending until the worker marks them BUSY). It sends slot numbers through the worker's
submission pipe, many per write; a worker sends finished slot numbers back through the one
completion pipe, many per write. Pipe writes of a few slot numbers are atomic (< PIPE_BUF).
So each direction costs one wake-up per batch, not per request.

Only the slot's owner of the moment writes it: the supervisor while FREE/DONE, the worker
while PENDING/BUSY. The pipes order the hand-overs.

Layout of one slot (little-endian), declared once here:
    head: state u32, op u32, flags u32, niov u32, offset u64, length u64,
          generation u32, worker u32, status i32, errno i32          (48 bytes)
    iov[MAX_IOV]: offset u64 (into the region's mapping), length u32, region u32  (16 bytes each)

For the ops that touch no guest memory (discard, write-zeroes) the iov records are byte
ranges of the backing store instead: offset u64 = absolute byte offset, length u32 = number
of 512-byte sectors, region u32 = RANGE_REGION; the head's offset is the first range's and its
length the bytes all ranges cover. ``encode_ranges`` / ``decode_ranges`` are the only
translations, and ``decode_ranges`` refuses any record that breaks the encoding.
"""
from __future__ import annotations

import enum
import mmap
import os
import struct

HEAD = struct.Struct("<IIIIQQIIii")
IOV = struct.Struct("<QII")
MAX_IOV = 264                     # seg_max 256 plus a few splits at region boundaries
SLOT_SIZE = (HEAD.size + IOV.size * MAX_IOV + 63) // 64 * 64
INDEX = struct.Struct("<I")       # a slot number in a pipe

FLAG_SYNC = 1                     # writethrough: the write is durable before it completes
FLAG_UNMAP = 2                    # write-zeroes may deallocate (punch a hole)
RANGE_REGION = 0xFFFF_FFFF        # region field of a range record (no guest memory region)
RANGE_UNIT = 512                  # a range record's length counts 512-byte sectors


def encode_ranges(ranges) -> list[tuple[int, int, int]]:
    """[(absolute byte offset, bytes)] -> slot records as ``post`` takes them."""
    out = []
    for offset, nbytes in ranges:
        if offset < 0 or nbytes <= 0 or offset % RANGE_UNIT or nbytes % RANGE_UNIT \
                or nbytes // RANGE_UNIT > 0xFFFF_FFFF:
            raise ValueError(f"range {offset}+{nbytes} cannot be encoded")
        out.append((RANGE_REGION, offset, nbytes // RANGE_UNIT))
    return out


def decode_ranges(offset: int, length: int,
                  iovs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Slot records (as ``take`` returns them) -> [(absolute byte offset, bytes)]; ValueError
    unless they are 1..MAX_IOV range records, sector-aligned, starting at ``offset`` and
    covering exactly ``length`` bytes."""
    if not 1 <= len(iovs) <= MAX_IOV:
        raise ValueError(f"{len(iovs)} range records")
    ranges = []
    for region, off, sectors in iovs:
        if region != RANGE_REGION or sectors == 0 or off % RANGE_UNIT:
            raise ValueError(f"bad range record ({off}, {sectors}, {region:#x})")
        ranges.append((off, sectors * RANGE_UNIT))
    if ranges[0][0] != offset or sum(n for _, n in ranges) != length:
        raise ValueError("range records do not match the slot's offset and length")
    return ranges


def slot_budget(free: int, total: int, held: int, rings: int, others_waiting: bool) -> int:
    """How many more slots one ring may take now (multiqueue fairness, work-conserving).

    A ring alone, or one whose siblings have nothing waiting, may take every free slot. While
    another ring waits, no ring grows past an equal share of all slots (at least one), so a
    queue that floods the device cannot starve the others: the slots its completions free go
    to the waiting rings first."""
    if rings <= 1 or not others_waiting:
        return free
    share = max(1, total // rings)
    return max(0, min(free, share - held))


class SlotState(enum.IntEnum):
    FREE = 0
    PENDING = 1
    BUSY = 2
    DONE = 3


class SlotArea:
    """The mapped slot memory; one per process."""

    def __init__(self, fd: int, count: int) -> None:
        self.count = count
        self.fd = fd
        self.mm = mmap.mmap(fd, count * SLOT_SIZE, mmap.MAP_SHARED)
        self.view = memoryview(self.mm)

    @classmethod
    def create(cls, count: int) -> "SlotArea":
        fd = os.memfd_create("vblk-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, count * SLOT_SIZE)
        return cls(fd, count)

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        os.close(self.fd)

    # -- supervisor side -----------------------------------------------------------------
    def post(self, i: int, op: int, flags: int, offset: int, length: int, generation: int,
             iovs: list[tuple[int, int, int]]) -> None:
        """Fill slot i (FREE) with a request and mark it PENDING. iovs: (region, offset, len)."""
        base = i * SLOT_SIZE
        pos = base + HEAD.size
        for region, off, n in iovs:
            IOV.pack_into(self.view, pos, off, n, region)
            pos += IOV.size
        HEAD.pack_into(self.view, base, SlotState.PENDING, op, flags, len(iovs), offset, length,
                       generation, 0, 0, 0)

    def result(self, i: int) -> tuple[int, int, int]:
        """(state, status, errno) of slot i."""
        f = HEAD.unpack_from(self.view, i * SLOT_SIZE)
        return f[0], f[8], f[9]

    def state(self, i: int) -> int:
        return INDEX.unpack_from(self.view, i * SLOT_SIZE)[0]

    def set_state(self, i: int, state: int) -> None:
        INDEX.pack_into(self.view, i * SLOT_SIZE, state)

    def owner(self, i: int) -> int:
        return HEAD.unpack_from(self.view, i * SLOT_SIZE)[7]

    # -- worker side ---------------------------------------------------------------------
    def take(self, i: int, worker: int) -> tuple[int, int, int, int, int, list[tuple[int, int, int]]]:
        """Mark slot i BUSY for ``worker``; returns (op, flags, offset, length, generation, iovs)."""
        base = i * SLOT_SIZE
        state, op, flags, niov, offset, length, gen, _, _, _ = HEAD.unpack_from(self.view, base)
        if niov > MAX_IOV:
            niov = MAX_IOV + 1            # reported as an error by the worker
        HEAD.pack_into(self.view, base, SlotState.BUSY, op, flags, niov, offset, length, gen,
                       worker, 0, 0)
        iovs = []
        pos = base + HEAD.size
        for _ in range(min(niov, MAX_IOV)):
            off, n, region = IOV.unpack_from(self.view, pos)
            iovs.append((region, off, n))
            pos += IOV.size
        return op, flags, offset, length, gen, iovs

    def finish(self, i: int, status: int, err: int) -> None:
        base = i * SLOT_SIZE
        f = list(HEAD.unpack_from(self.view, base))
        f[0], f[8], f[9] = SlotState.DONE, status, err
        HEAD.pack_into(self.view, base, *f)
