"""The virtio-blk device after ACRN: features, config space, and what each request becomes.

No I/O here. ``BlkDevice.plan`` turns a parsed request into either an immediate completion
(GET_ID, errors, unsupported types) or an ``IoPlan`` for the I/O engine (read, write, flush,
discard, write-zeroes; offsets in bytes from the disk's first byte). For DISCARD and
WRITE_ZEROES the caller first reads the segment bytes from guest memory
(``segment_bytes_wanted`` says how many) and passes them to ``plan``. ACRN's rules: sector
offsets are always in 512-byte units; a read or write must be a whole number of logical blocks,
start on a logical block and end inside the disk, else IOERR; writes on a read-only disk get
IOERR; unknown types get UNSUPP. Unlike ACRN, every request is completed, and a chain without a
status byte is still returned to the used ring."""
from __future__ import annotations

from dataclasses import dataclass, replace

from vblk.ipc import Op
from vblk.virtio.blk import CONFIG_WRITEBACK_OFFSET, DISCARD_SEGMENT, BlkConfig, BlkRequest, parse_segments
from vblk.virtio.constants import (
    BLK_ID_BYTES,
    BLK_WRITE_ZEROES_FLAG_UNMAP,
    SECTOR_SIZE,
    BlkStatus,
    BlkType,
    Feature,
)

SEG_MAX = 256                           # ACRN's BLOCKIF_IOV_MAX

U32_MAX = 0xFFFF_FFFF
# WRITE_ZEROES limits (not in ACRN): 32 MiB per request bounds how long a worker may have
# to write real zeroes when the filesystem cannot zero a range (tmpfs); one segment, as
# Linux never sends more and qemu-storage-daemon offers no more.
WRITE_ZEROES_MAX_SECTORS = 65536
WRITE_ZEROES_MAX_SEG = 1


@dataclass(frozen=True, slots=True)
class DiscardLimits:
    """ACRN's ``discard=A:B:C``: per-segment sectors, segments per request, and the sector
    alignment a segment must start on (0: none)."""
    max_sectors: int
    max_segments: int = 1
    alignment: int = 0


@dataclass(frozen=True, slots=True)
class Geometry:
    size_bytes: int                     # visible to the guest
    logical_block_size: int = 512
    physical_block_size: int = 512
    readonly: bool = False
    serial: bytes = b"\0" * BLK_ID_BYTES

    @property
    def capacity(self) -> int:
        return self.size_bytes // SECTOR_SIZE


@dataclass(frozen=True, slots=True)
class Completion:
    """Finish the request now: status, optional bytes to write before the status byte."""
    status: int
    fill: bytes = b""
    reason: str | None = None           # why an error status was given (for the log)


@dataclass(frozen=True, slots=True)
class IoPlan:
    op: Op
    offset: int                         # byte offset in the disk (the backing adds its window's start)
    length: int                         # bytes moved (discard / write-zeroes: bytes covered)
    ranges: tuple[tuple[int, int], ...] = ()   # discard / write-zeroes: (byte offset, bytes)
    unmap: bool = False                 # write-zeroes may deallocate (guest asked, discard on)


class BlkDevice:
    def __init__(self, geometry: Geometry, writeback: bool, num_queues: int = 1,
                 discard: DiscardLimits | None = None) -> None:
        self.geometry = geometry
        self.writeback = writeback
        self.num_queues = num_queues
        # Neither DISCARD nor WRITE_ZEROES is offered on a read-only disk.
        self.discard = None if geometry.readonly else discard
        self.write_zeroes = not geometry.readonly

    def resize(self, size_bytes: int) -> int:
        """Show the guest ``size_bytes`` from now on (checked by the caller, see
        vblk.resize); returns the old size. Requests planned before keep their plan; every
        later one is checked against the new end."""
        old = self.geometry.size_bytes
        self.geometry = replace(self.geometry, size_bytes=size_bytes)
        return old

    # -- negotiation ---------------------------------------------------------------------
    @property
    def features(self) -> int:
        bits = [Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_TOPOLOGY,
                Feature.RING_INDIRECT_DESC, Feature.RING_EVENT_IDX, Feature.BLK_FLUSH,
                Feature.BLK_CONFIG_WCE, Feature.VERSION_1, Feature.VHOST_USER_PROTOCOL_FEATURES,
                Feature.LOG_ALL]
        if self.geometry.readonly:
            bits.append(Feature.BLK_RO)
        if self.num_queues > 1:
            bits.append(Feature.BLK_MQ)
        if self.discard is not None:
            bits.append(Feature.BLK_DISCARD)
        if self.write_zeroes:
            bits.append(Feature.BLK_WRITE_ZEROES)
        return sum(1 << b for b in bits)

    def config(self) -> BlkConfig:
        g = self.geometry
        exp = (g.physical_block_size // g.logical_block_size).bit_length() - 1
        d = self.discard
        return BlkConfig(capacity=g.capacity, seg_max=SEG_MAX, blk_size=g.logical_block_size,
                         physical_block_exp=exp, writeback=int(self.writeback),
                         num_queues=self.num_queues,
                         max_discard_sectors=d.max_sectors if d else 0,
                         max_discard_seg=d.max_segments if d else 0,
                         discard_sector_alignment=d.alignment if d else 0,
                         max_write_zeroes_sectors=WRITE_ZEROES_MAX_SECTORS if self.write_zeroes else 0,
                         max_write_zeroes_seg=WRITE_ZEROES_MAX_SEG if self.write_zeroes else 0,
                         write_zeroes_may_unmap=int(self.write_zeroes and d is not None))

    def read_config(self, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes from ``offset``, zero-padded past the structure."""
        raw = self.config().pack()
        return raw[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> str | None:
        """Apply a guest config write; returns why it was refused, or None."""
        if offset == CONFIG_WRITEBACK_OFFSET and len(data) == 1:
            self.writeback = data[0] != 0
            return None
        return f"config write at offset {offset} size {len(data)}: only writeback (32, 1) is writable"

    # -- requests ------------------------------------------------------------------------
    def segment_bytes_wanted(self, req: BlkRequest) -> int:
        """How many device-readable data bytes ``plan`` needs to see for ``req`` (the
        segments of a DISCARD / WRITE_ZEROES whose length can be valid); 0 for the rest."""
        if req.bad or req.type not in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
            return 0
        limit = self._segment_limit(req.type)
        if limit is None or req.out_len > limit * DISCARD_SEGMENT.size:
            return 0
        return req.out_len

    def plan(self, req: BlkRequest, segments: bytes = b"") -> Completion | IoPlan:
        """What ``req`` becomes; ``segments`` holds its first ``segment_bytes_wanted(req)``
        device-readable data bytes."""
        if req.bad:
            return Completion(BlkStatus.IOERR, reason=req.bad)
        t = req.type
        if t == BlkType.IN or t == BlkType.OUT:
            return self._plan_rw(req, t == BlkType.OUT)
        if t == BlkType.DISCARD or t == BlkType.WRITE_ZEROES:
            return self._plan_discard(req, segments)
        if t == BlkType.FLUSH or t == BlkType.FLUSH_OUT:
            if self.geometry.readonly:
                return Completion(BlkStatus.OK)
            return IoPlan(Op.FLUSH, 0, 0)
        if t == BlkType.GET_ID:
            if req.data_out or not req.data_in:
                return Completion(BlkStatus.IOERR, reason="GET_ID without a writable buffer")
            return Completion(BlkStatus.OK, fill=self.geometry.serial[:min(req.in_len, BLK_ID_BYTES)])
        return Completion(BlkStatus.UNSUPP, reason=f"request type {t} not supported")

    def _plan_rw(self, req: BlkRequest, write: bool) -> Completion | IoPlan:
        g = self.geometry
        if write:
            if req.data_in:
                return Completion(BlkStatus.IOERR, reason="write request with device-writable data")
            if g.readonly:
                return Completion(BlkStatus.IOERR, reason="write to a read-only disk")
            length = req.out_len
        else:
            if req.data_out:
                return Completion(BlkStatus.IOERR, reason="read request with device-readable data")
            length = req.in_len
        start = req.sector * SECTOR_SIZE
        lbs = g.logical_block_size
        if length % lbs or start % lbs:
            return Completion(BlkStatus.IOERR,
                              reason=f"sector {req.sector} length {length} not whole {lbs}-byte blocks")
        if start + length > g.size_bytes:
            return Completion(BlkStatus.IOERR,
                              reason=f"sector {req.sector} length {length} past the end "
                                     f"({g.size_bytes} bytes)")
        return IoPlan(Op.WRITE if write else Op.READ, start, length)

    def _segment_limit(self, rtype: int) -> int | None:
        """Segments allowed per request of ``rtype``, None if the type is not offered."""
        if rtype == BlkType.DISCARD:
            return self.discard.max_segments if self.discard else None
        return WRITE_ZEROES_MAX_SEG if self.write_zeroes else None

    def _plan_discard(self, req: BlkRequest, payload: bytes) -> Completion | IoPlan:
        """DISCARD / WRITE_ZEROES: every segment checked before anything is done (virtio
        spec 5.2.6.2 and ACRN's blockif_discard). ro and "not offered" come first, as in ACRN;
        per segment, qemu-storage-daemon's order (sectors, range, then flags)."""
        g = self.geometry
        discard = req.type == BlkType.DISCARD
        name = "DISCARD" if discard else "WRITE_ZEROES"
        if g.readonly:                                       # ACRN: EROFS
            return Completion(BlkStatus.IOERR, reason=f"{name} on a read-only disk")
        max_segments = self._segment_limit(req.type)
        if max_segments is None:                             # ACRN: !candiscard, EOPNOTSUPP
            return Completion(BlkStatus.UNSUPP, reason=f"{name} is not enabled")
        if req.data_in:
            return Completion(BlkStatus.IOERR, reason=f"{name} with device-writable data")
        size = DISCARD_SEGMENT.size
        if req.out_len == 0 or req.out_len % size:
            return Completion(BlkStatus.IOERR,
                              reason=f"{name} data of {req.out_len} bytes is not whole {size}-byte segments")
        if req.out_len // size > max_segments:
            return Completion(BlkStatus.IOERR, reason=f"{name} with {req.out_len // size} segments, "
                                                      f"at most {max_segments}")
        if len(payload) != req.out_len:
            return Completion(BlkStatus.IOERR, reason=f"{name} segments unreadable")
        max_sectors = self.discard.max_sectors if discard else WRITE_ZEROES_MAX_SECTORS
        alignment = self.discard.alignment if discard else 0
        allowed_flags = 0 if discard else BLK_WRITE_ZEROES_FLAG_UNMAP
        lbs = g.logical_block_size
        ranges = []
        unmap = True            # deallocate only if every segment allows it (never required)
        for sector, count, flags in parse_segments(payload):
            where = f"{name} segment sector {sector} count {count}"
            if count == 0:
                return Completion(BlkStatus.IOERR, reason=f"{where}: no sectors")
            if count > max_sectors:
                return Completion(BlkStatus.IOERR, reason=f"{where}: more than {max_sectors} sectors")
            if sector > g.capacity or count > g.capacity - sector:
                return Completion(BlkStatus.IOERR,
                                  reason=f"{where}: past the end ({g.capacity} sectors)")
            if flags & ~allowed_flags:
                return Completion(BlkStatus.UNSUPP, reason=f"{where}: flags {flags:#x} not supported")
            start, length = sector * SECTOR_SIZE, count * SECTOR_SIZE
            if start % lbs or length % lbs:
                return Completion(BlkStatus.IOERR, reason=f"{where}: not whole {lbs}-byte blocks")
            if alignment and sector % alignment:
                return Completion(BlkStatus.IOERR,
                                  reason=f"{where}: not aligned to {alignment} sectors")
            unmap &= bool(flags & BLK_WRITE_ZEROES_FLAG_UNMAP)
            ranges.append((start, length))
        return IoPlan(Op.DISCARD if discard else Op.WRITE_ZEROES, ranges[0][0],
                      sum(n for _, n in ranges), tuple(ranges),
                      unmap=not discard and unmap and self.discard is not None)
