"""The common read or write, recognised in one pass (pure; no I/O).

Nearly every request a Linux guest or a benchmark sends has one shape: a 16-byte header
descriptor, one or more data descriptors all going one way, and a 1-byte status descriptor,
either chained in the ring or in one indirect table (Linux), every buffer inside one memory
region. For that shape ``simple_rw`` returns what the general path would decide
(``vblk.admission.admit_chain``: walk, parse, plan, translate) without building the segment
lists, the BlkRequest and the IoPlan in between: the supervisor spends most of a cached 4k
read on that Python.

It only ever *accepts*. Any other request type, any other layout, a buffer across regions, any
rule broken -- all return None, and the caller takes the general path for that chain, which
decides it, refuses it and logs it as before. A chain is not consumed by looking at it, so
the general path sees exactly what this function saw. ``tests/unit/test_fastpath.py`` checks,
on generated chains, that whatever is accepted here gets the same answer from the general
path.
"""
from __future__ import annotations

from vblk.device import SECTOR_SIZE, Geometry
from vblk.ipc import MAX_IOV, Op
from vblk.memory import GuestMemory
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import BlkType, DescFlag
from vblk.virtio.ring import DESC, MAX_INDIRECT, SplitRing

_DESC = DESC.unpack_from                       # addr, len, flags, next
_HDR = OUTHDR.unpack_from
_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)
_IN = int(BlkType.IN)
_OUT = int(BlkType.OUT)
_READ = int(Op.READ)                           # plain ints: an enum member costs a lookup
_WRITE_OP = int(Op.WRITE)

# (op, byte offset in the disk, length, pieces [(region, offset, length)],
#  status byte's guest address, its region, its offset in that region's mapping)
SimpleRequest = tuple[int, int, int, list[tuple[int, int, int]], int, int, int]


def simple_rw(ring: SplitRing, memory: GuestMemory, geometry: Geometry,
              head: int) -> SimpleRequest | None:
    """The read or write at ``head`` if it has the common shape and the device would run
    it as it stands; None for everything else (the caller takes the general path)."""
    limit = ring.size
    if head >= limit:
        return None
    table, base = ring.desc_table()
    addr, length, flags, nxt = _DESC(table, base + 16 * head)
    if flags & _INDIRECT:
        if (not ring.indirect or flags & _NEXT or length < 48 or length & 15
                or length > 16 * MAX_INDIRECT):
            return None
        where = memory.locate(addr, length)
        if where is None:
            return None
        table, base = memory.regions[where[0]].view, where[1]
        limit = length >> 4
        addr, length, flags, nxt = _DESC(table, base)
    # The header: exactly 16 device-readable bytes, then more.
    if length != 16 or flags & (_WRITE | _INDIRECT) or not flags & _NEXT or nxt >= limit:
        return None
    where = memory.locate(addr, 16)
    if where is None:
        return None
    rtype, _ioprio, sector = _HDR(memory.regions[where[0]].view, where[1])
    if rtype == _IN:
        data_flag = _WRITE
    elif rtype == _OUT:
        data_flag = 0
    else:
        return None
    # The data: every descriptor the same way, none empty; the last descriptor is the status.
    pieces = []
    total = 0
    count = 1
    index = nxt
    locate = memory.locate
    while True:
        count += 1
        if count > limit:
            return None
        addr, length, flags, nxt = _DESC(table, base + 16 * index)
        if not flags & _NEXT:
            break
        if flags & (_WRITE | _INDIRECT) != data_flag or not length or nxt >= limit:
            return None
        where = locate(addr, length)
        if where is None:
            return None
        pieces.append((where[0], where[1], length))
        total += length
        index = nxt
    if length != 1 or flags & (_WRITE | _INDIRECT) != _WRITE or not pieces or len(pieces) > MAX_IOV:
        return None
    status = locate(addr, 1)
    if status is None:
        return None
    # What BlkDevice._plan_rw checks.
    if data_flag == 0 and geometry.readonly:
        return None
    start = sector * SECTOR_SIZE
    lbs = geometry.logical_block_size
    if total % lbs or start % lbs or start + total > geometry.size_bytes:
        return None
    return (_WRITE_OP if data_flag == 0 else _READ, start, total, pieces,
            addr, status[0], status[1])
