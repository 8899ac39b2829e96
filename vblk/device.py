"""The virtio-blk device after ACRN: features, config space, and what each request becomes.

No I/O here. ``BlkDevice.plan`` turns a parsed request into either an immediate completion
(GET_ID, errors, unsupported types) or an ``IoPlan`` for a worker (read, write, flush).
ACRN's rules: sector offsets are always in 512-byte units; a read or write must be a whole
number of logical blocks, start on a logical block and end inside the disk, else IOERR;
writes on a read-only disk get IOERR; unknown types get UNSUPP. Unlike ACRN, every request is
completed, and a chain without a status byte is still returned to the used ring.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from vblk.virtio.blk import CONFIG_WRITEBACK_OFFSET, BlkConfig, BlkRequest
from vblk.virtio.constants import BLK_ID_BYTES, SECTOR_SIZE, BlkStatus, BlkType, Feature

SEG_MAX = 256                           # ACRN's BLOCKIF_IOV_MAX

OP_READ, OP_WRITE, OP_FLUSH = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Geometry:
    size_bytes: int                     # visible to the guest
    logical_block_size: int = 512
    physical_block_size: int = 512
    readonly: bool = False
    serial: bytes = b"\0" * BLK_ID_BYTES
    file_offset: int = 0                # where the guest's byte 0 lies in the backing store

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
    op: int
    offset: int                         # absolute byte offset in the backing store
    length: int


class BlkDevice:
    def __init__(self, geometry: Geometry, writeback: bool, num_queues: int = 1) -> None:
        self.geometry = geometry
        self.writeback = writeback
        self.num_queues = num_queues

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
                Feature.BLK_CONFIG_WCE, Feature.VERSION_1, Feature.VHOST_USER_PROTOCOL_FEATURES]
        if self.geometry.readonly:
            bits.append(Feature.BLK_RO)
        if self.num_queues > 1:
            bits.append(Feature.BLK_MQ)
        return sum(1 << b for b in bits)

    def config(self) -> BlkConfig:
        g = self.geometry
        exp = (g.physical_block_size // g.logical_block_size).bit_length() - 1
        return BlkConfig(capacity=g.capacity, seg_max=SEG_MAX, blk_size=g.logical_block_size,
                         physical_block_exp=exp, writeback=int(self.writeback),
                         num_queues=self.num_queues)

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
    def plan(self, req: BlkRequest) -> Completion | IoPlan:
        if req.bad:
            return Completion(BlkStatus.IOERR, reason=req.bad)
        t = req.type
        if t == BlkType.IN or t == BlkType.OUT:
            return self._plan_rw(req, t == BlkType.OUT)
        if t == BlkType.FLUSH or t == BlkType.FLUSH_OUT:
            if self.geometry.readonly:
                return Completion(BlkStatus.OK)
            return IoPlan(OP_FLUSH, 0, 0)
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
                              reason=f"sector {req.sector} length {length} past the end ({g.size_bytes} bytes)")
        return IoPlan(OP_WRITE if write else OP_READ, g.file_offset + start, length)
