"""virtio-blk: config space layout and request parsing (pure; no I/O).

A request is a descriptor chain: a 16-byte header (type, ioprio, sector) in device-readable
bytes, then data, then one status byte, the last device-writable byte. With VERSION_1 the
framing is free (ANY_LAYOUT): the header is the first 16 readable bytes wherever they lie, the
status the last writable byte, as QEMU's handler takes them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vblk.errors import GuestError
from vblk.memory import GuestMemory
from vblk.virtio.constants import BLK_T_BARRIER
from vblk.virtio.ring import Segment

OUTHDR = struct.Struct("<IIQ")      # type, ioprio, sector

# struct virtio_blk_config up to write_zeroes_may_unmap (57 bytes), padded to 60.
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
CONFIG_WRITEBACK_OFFSET = 32

# DISCARD / WRITE_ZEROES data: n of these, device-readable, anywhere in the readable bytes.
DISCARD_SEGMENT = struct.Struct("<QII")    # sector (512-byte units), num_sectors, flags


@dataclass(frozen=True, slots=True)
class BlkConfig:
    capacity: int              # 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0      # in 512-byte sectors
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(self.capacity, self.size_max, self.seg_max, 0, 0, 0, self.blk_size,
                           self.physical_block_exp, self.alignment_offset, self.min_io_size,
                           self.opt_io_size, self.writeback, 0, self.num_queues,
                           self.max_discard_sectors, self.max_discard_seg,
                           self.discard_sector_alignment, self.max_write_zeroes_sectors,
                           self.max_write_zeroes_seg, self.write_zeroes_may_unmap)

    @classmethod
    def unpack(cls, buf: bytes) -> BlkConfig:
        buf = bytes(buf).ljust(CONFIG.size, b"\0")[:CONFIG.size]
        f = CONFIG.unpack(buf)
        return cls(capacity=f[0], size_max=f[1], seg_max=f[2], blk_size=f[6],
                   physical_block_exp=f[7], alignment_offset=f[8], min_io_size=f[9],
                   opt_io_size=f[10], writeback=f[11], num_queues=f[13],
                   max_discard_sectors=f[14], max_discard_seg=f[15],
                   discard_sector_alignment=f[16], max_write_zeroes_sectors=f[17],
                   max_write_zeroes_seg=f[18], write_zeroes_may_unmap=f[19])


@dataclass(slots=True)
class BlkRequest:
    """A chain split into its parts. ``bad`` names why the request cannot run, if it cannot."""
    type: int
    sector: int
    data_out: list[tuple[int, int]]      # device-readable data (after the header)
    data_in: list[tuple[int, int]]       # device-writable data (before the status byte)
    status_addr: int
    bad: str | None = None

    @property
    def in_len(self) -> int:
        return sum(n for _, n in self.data_in)

    @property
    def out_len(self) -> int:
        return sum(n for _, n in self.data_out)


def parse_request(segments: list[Segment], memory: GuestMemory) -> BlkRequest:
    """Split a walked chain into header, data and status.

    Raises GuestError when no status byte exists (nothing can be reported to the guest).
    A request with a status byte but a short header comes back with ``bad`` set.
    """
    # status: the last byte of the last non-empty writable segment
    last = len(segments) - 1
    while last >= 0 and segments[last][2] and segments[last][1] == 0:
        last -= 1
    if last < 0 or not segments[last][2]:
        raise GuestError("request has no device-writable status byte")
    addr, length, _ = segments[last]
    status_addr = addr + length - 1
    data_in = [(a, n) for a, n, w in segments[:last] if w and n]
    if length > 1:
        data_in.append((addr, length - 1))
    readable = [(a, n) for a, n, w in segments if not w and n]
    # header: the first 16 readable bytes
    need, header, data_out = OUTHDR.size, b"", []
    for a, n in readable:
        if need:
            take = min(n, need)
            header += memory.read(a, take)
            need -= take
            if take < n:
                data_out.append((a + take, n - take))
        else:
            data_out.append((a, n))
    if need:
        return BlkRequest(-1, 0, [], [], status_addr, bad="request header shorter than 16 bytes")
    rtype, _ioprio, sector = OUTHDR.unpack(header)
    return BlkRequest(rtype & ~BLK_T_BARRIER, sector, data_out, data_in, status_addr)


def parse_segments(payload: bytes) -> list[tuple[int, int, int]]:
    """DISCARD / WRITE_ZEROES data -> [(sector, num_sectors, flags), ...] (whole segments
    only; the caller checks that the length is a multiple of the segment size)."""
    n = len(payload) // DISCARD_SEGMENT.size
    return [DISCARD_SEGMENT.unpack_from(payload, i * DISCARD_SEGMENT.size) for i in range(n)]


def read_data_out(req: BlkRequest, memory: GuestMemory, limit: int) -> bytes:
    """The first ``limit`` device-readable data bytes of ``req`` (fewer if it has fewer),
    gathered across descriptors. Raises GuestError if guest memory does not hold them."""
    out = []
    for addr, n in req.data_out:
        if limit <= 0:
            break
        take = min(n, limit)
        out.append(memory.read(addr, take))
        limit -= take
    return b"".join(out)
