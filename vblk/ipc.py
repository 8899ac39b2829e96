"""The contract between the supervisor and its worker processes, declared once: operations,
the shared-memory slot layout, pipe framing, control messages and the worker's command line.

Theory of operation
-------------------
The supervisor creates one memfd holding ``count`` fixed-size ioreq slots and hands it to
every worker. One supervisor may serve several disks over one pool of workers (see
vblk.supervisor.disks): each slot names its disk (the head's ``disk`` field), and a worker
holds every disk's backing and every disk's guest memory table, keyed by that number.

A slot goes through the states ACRN's blockif elements do:

    FREE --(supervisor fills it)--> PENDING --(a worker takes it)--> BUSY
         <--(supervisor completes)-- DONE <--(the worker finishes)--/

Only the slot's owner of the moment writes it: the supervisor while FREE/DONE, the worker
while PENDING/BUSY. Slot numbers travel through pipes, which order the hand-overs: the
supervisor writes them to a worker's own submission pipe, many per write; workers write
finished ones to the one completion pipe, many per write. A slot number is a native u32
(``pack_slots``/``unpack_slots``); a write of up to PIPE_BUF bytes is atomic, so batches from
several workers never interleave mid-number. One wake-up per batch in each direction.

Layout of one slot (little-endian):
    head: state u32, op u32, flags u32, niov u32, offset u64, length u64,
          generation u32, worker u32, status i32, errno i32, disk u32, reserved u32  (56 bytes)
    iov[MAX_IOV]: offset u64 (into the region's mapping), length u32, region u32  (16 bytes each)

``disk`` is the number the supervisor gave the disk the slot is for (0 for ``vblk serve
SPEC``); ``generation`` is that disk's memory table generation. ``offset`` counts bytes from
the start of the disk's window (the backing adds where the window lies). For the operations
that touch no guest memory (discard, write-zeroes) the iov records are byte ranges of the
disk instead: offset u64 = byte offset, length u32 = number of 512-byte sectors, region u32 =
RANGE_REGION; the head's offset is the first range's and its length the bytes all ranges
cover. ``encode_ranges`` / ``decode_ranges`` are the only
translations, and ``decode_ranges`` refuses any record that breaks the encoding.

Control messages (msgpack maps on a SOCK_SEQPACKET pair, one per worker, fds by SCM_RIGHTS):
    worker -> supervisor  {"op": "ready"}       once it can take slots (see the pool's backoff)
    supervisor -> worker  {"op": "memory", "disk": d, "generation": g, "regions": [[gpa, size,
                           uva, mmap_offset], ...]} + one fd per region, whenever disk d's
                           table changes
                          {"op": "disk-add", "disk": d, "backing": DESC} + the backing's fds
                                                (``Backing.handoff``), when a disk is added at
                                                run time (``vblk disk add``); DESC's "fd" is
                                                the supervisor's number, the worker uses the
                                                fd that came with the message
                                                (``received_backing``)
                          {"op": "disk-remove", "disk": d}   close disk d's backing and drop
                                                its memory table (``vblk disk remove``; the
                                                supervisor sends it when none of d's slots is
                                                in flight)
                          {"op": "stop"}        finish and exit (EOF means the same)

A disk added at run time is announced on the control socket before any of its slots is
written to a submission pipe (its memory table, and so its first slot, comes later still): a
worker that meets a slot for a disk it does not know yet finds the announcement already
waiting on its control socket. A worker started after the add gets the disk in its argv, as
every disk of the config.
"""
from __future__ import annotations

import array
import enum
import json
import mmap
import os
import socket
import struct
from dataclasses import dataclass

import msgpack

# -- operations ------------------------------------------------------------------------------


class Op(enum.IntEnum):
    """What a slot asks for (the slot's op field)."""
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


FLAG_SYNC = 1                     # write-through: durable before it completes
FLAG_UNMAP = 2                    # write-zeroes may deallocate (punch a hole)

# -- slots -----------------------------------------------------------------------------------

HEAD = struct.Struct("<IIIIQQIIiiII")
IOV = struct.Struct("<QII")
MAX_IOV = 264                     # seg_max 256 plus a few splits at region boundaries
SLOT_SIZE = (HEAD.size + IOV.size * MAX_IOV + 63) // 64 * 64
_DISK = struct.Struct("<I")
_DISK_OFFSET = HEAD.size - 8      # the head's disk field
RANGE_REGION = 0xFFFF_FFFF        # region field of a range record (no guest memory region)
RANGE_UNIT = 512                  # a range record's length counts 512-byte sectors

Pieces = list[tuple[int, int, int]]     # (region, offset in its mapping, length)


class SlotState(enum.IntEnum):
    FREE = 0
    PENDING = 1
    BUSY = 2
    DONE = 3


def encode_ranges(ranges) -> Pieces:
    """[(byte offset, bytes)] -> slot records as ``SlotArea.post`` takes them."""
    out = []
    for offset, nbytes in ranges:
        if offset < 0 or nbytes <= 0 or offset % RANGE_UNIT or nbytes % RANGE_UNIT \
                or nbytes // RANGE_UNIT > 0xFFFF_FFFF:
            raise ValueError(f"range {offset}+{nbytes} cannot be encoded")
        out.append((RANGE_REGION, offset, nbytes // RANGE_UNIT))
    return out


def decode_ranges(offset: int, length: int, iovs: Pieces) -> list[tuple[int, int]]:
    """Slot records (as ``take`` returns them) -> [(byte offset, bytes)]; ValueError unless
    they are 1..MAX_IOV range records, sector-aligned, starting at ``offset`` and covering
    exactly ``length`` bytes."""
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


class SlotArea:
    """The mapped slot memory; one mapping per process."""

    def __init__(self, fd: int, count: int) -> None:
        self.count = count
        self.fd = fd
        self.mm = mmap.mmap(fd, count * SLOT_SIZE, mmap.MAP_SHARED)
        self.view = memoryview(self.mm)

    @classmethod
    def create(cls, count: int) -> SlotArea:
        fd = os.memfd_create("vblk-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, count * SLOT_SIZE)
        return cls(fd, count)

    def close(self) -> None:
        self.view.release()
        self.mm.close()
        os.close(self.fd)

    # -- supervisor side -----------------------------------------------------------------
    def post(self, i: int, op: int, flags: int, offset: int, length: int, generation: int,
             iovs: Pieces, disk: int = 0) -> None:
        """Fill slot i (FREE) with a request for ``disk`` and mark it PENDING. iovs: (region,
        offset, len)."""
        base = i * SLOT_SIZE
        pos = base + HEAD.size
        for region, off, n in iovs:
            IOV.pack_into(self.view, pos, off, n, region)
            pos += IOV.size
        HEAD.pack_into(self.view, base, SlotState.PENDING, op, flags, len(iovs), offset, length,
                       generation, 0, 0, 0, disk, 0)

    def result(self, i: int) -> tuple[int, int, int]:
        """(state, status, errno) of slot i."""
        f = HEAD.unpack_from(self.view, i * SLOT_SIZE)
        return f[0], f[8], f[9]

    def set_state(self, i: int, state: int) -> None:
        struct.pack_into("<I", self.view, i * SLOT_SIZE, state)

    # -- worker side (and the in-process engine) -------------------------------------------
    def disk(self, i: int) -> int:
        """The disk slot i is for."""
        return _DISK.unpack_from(self.view, i * SLOT_SIZE + _DISK_OFFSET)[0]

    def take(self, i: int, worker: int) -> tuple[int, int, int, int, int, Pieces]:
        """Mark slot i BUSY for ``worker``; returns (op, flags, offset, length, generation,
        iovs). More than MAX_IOV records come back as MAX_IOV + 1 of them (an error for the
        executor to report, never a read past the slot)."""
        base = i * SLOT_SIZE
        _state, op, flags, niov, offset, length, gen, _, _, _, disk, _ = \
            HEAD.unpack_from(self.view, base)
        HEAD.pack_into(self.view, base, SlotState.BUSY, op, flags, niov, offset, length, gen,
                       worker, 0, 0, disk, 0)
        iovs = []
        pos = base + HEAD.size
        for _ in range(min(niov, MAX_IOV)):
            off, n, region = IOV.unpack_from(self.view, pos)
            iovs.append((region, off, n))
            pos += IOV.size
        if niov > MAX_IOV:
            iovs.append((RANGE_REGION, 0, 0))
        return op, flags, offset, length, gen, iovs

    def finish(self, i: int, status: int, err: int) -> None:
        base = i * SLOT_SIZE
        f = list(HEAD.unpack_from(self.view, base))
        f[0], f[8], f[9] = SlotState.DONE, status, err
        HEAD.pack_into(self.view, base, *f)


# -- pipes -----------------------------------------------------------------------------------

SLOT_NUMBER = 4                   # bytes per slot number in a pipe (native u32)
PIPE_BATCH = 256                  # slot numbers a worker reads at once


def pack_slots(slots) -> bytes:
    return array.array("I", slots).tobytes()


def unpack_slots(data: bytes) -> array.array:
    """The slot numbers in ``data`` (a trailing partial number, which an atomic pipe write
    never leaves, is ignored)."""
    out = array.array("I")
    out.frombytes(data[: len(data) - len(data) % SLOT_NUMBER])
    return out


# -- control messages ------------------------------------------------------------------------

CONTROL_MAX = 65536               # bytes of one control message
MAX_CONTROL_FDS = 64              # fds with one message (memory regions: at most 32 today)
READY = {"op": "ready"}
STOP = {"op": "stop"}


def memory_message(generation: int, regions: list[list[int]], disk: int = 0) -> dict:
    """Disk ``disk``'s new memory table: ``regions`` are [gpa, size, uva, mmap_offset], one fd
    each."""
    return {"op": "memory", "disk": disk, "generation": generation, "regions": regions}


def disk_add_message(disk: int, desc: dict) -> dict:
    """Disk ``disk`` was added: ``desc`` is its ``Backing.handoff()`` description, sent with
    the handoff's fds."""
    return {"op": "disk-add", "disk": disk, "backing": desc}


def disk_remove_message(disk: int) -> dict:
    """Disk ``disk`` was removed: close its backing, forget its memory table."""
    return {"op": "disk-remove", "disk": disk}


def received_backing(msg: dict, fds: list[int]) -> dict:
    """The description to attach from a disk-add message and the fds that came with it: the
    supervisor's fd number replaced by the receiver's (ValueError unless exactly one fd came,
    as a file or block device hands off)."""
    if len(fds) != 1:
        raise ValueError(f"disk-add of disk {msg.get('disk')} came with {len(fds)} fds, not 1")
    return {**msg["backing"], "fd": fds[0]}


def send_control(sock: socket.socket, msg: dict, fds=()) -> None:
    data = msgpack.packb(msg)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_control(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """(message, fds); (None, fds) at EOF. The caller owns (and closes) the fds."""
    msg, fds, _flags, _ = socket.recv_fds(sock, CONTROL_MAX, MAX_CONTROL_FDS)
    if not msg:
        return None, fds
    return msgpack.unpackb(msg), fds


# -- the worker's command line ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerArgs:
    """Everything a worker is started with; the fds named here are inherited (pass_fds)."""
    index: int
    slots_fd: int
    slot_count: int
    submit_fd: int                # read end of this worker's submission pipe
    complete_fd: int              # write end of the shared completion pipe
    control_fd: int               # this worker's end of its control socket pair
    parent: int                   # the supervisor's pid (a worker outliving it exits)
    log_level: str
    disks: dict[int, dict]        # disk number -> Backing.handoff()'s description, fds included

    def argv(self) -> list[str]:
        return ["--index", str(self.index), "--slots-fd", str(self.slots_fd),
                "--slots", str(self.slot_count), "--submit-fd", str(self.submit_fd),
                "--complete-fd", str(self.complete_fd), "--control-fd", str(self.control_fd),
                "--parent", str(self.parent), "--log-level", self.log_level,
                "--disks", json.dumps({str(d): desc for d, desc in self.disks.items()},
                                      sort_keys=True)]

    def fds(self, backing_fds) -> tuple[int, ...]:
        """Every fd the worker inherits."""
        return (self.slots_fd, self.submit_fd, self.complete_fd, self.control_fd, *backing_fds)

    @classmethod
    def parse(cls, argv: list[str]) -> WorkerArgs:
        """The inverse of ``argv`` (ValueError for anything else: workers are started by the
        supervisor, not by hand)."""
        if len(argv) % 2:
            raise ValueError("worker arguments come in --name value pairs")
        pairs = dict(zip(argv[::2], argv[1::2]))
        try:
            return cls(index=int(pairs["--index"]), slots_fd=int(pairs["--slots-fd"]),
                       slot_count=int(pairs["--slots"]), submit_fd=int(pairs["--submit-fd"]),
                       complete_fd=int(pairs["--complete-fd"]),
                       control_fd=int(pairs["--control-fd"]), parent=int(pairs["--parent"]),
                       log_level=pairs["--log-level"],
                       disks={int(d): desc for d, desc in json.loads(pairs["--disks"]).items()})
        except KeyError as exc:
            raise ValueError(f"worker argument {exc.args[0]} missing") from None
