"""The fast path (vblk.virtio.fastpath.simple_rw) against the general path.

simple_rw may only accept chains the general path (walk -> parse_request -> plan -> translate)
would run as they stand, and for those it must give the same operation, offset, length,
buffers and status byte; the general path here is the supervisor's own
(vblk.admission.admit_chain). Generated chains start from the common shapes and are then mutated
(flags, lengths, addresses across a region boundary or out of memory, next indices, request
type, sector, geometry), so both the accepted and the refused side are exercised; the test
counts both and fails if either is rare.
"""
import os
import random

import pytest

from vblk.admission import admit_chain
from vblk.device import BlkDevice, Completion, Geometry
from vblk.errors import GuestError
from vblk.ipc import MAX_IOV, Op
from vblk.memory import GuestMemory
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import BLK_T_BARRIER, BlkType, DescFlag
from vblk.virtio.fastpath import simple_rw
from vblk.virtio.ring import DESC, SplitRing

Q = 16
RAM = 1 << 20
SPLIT = RAM // 2                   # two regions: [0, SPLIT) and [SPLIT, RAM)
UVA = 0x7F00_0000_0000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
TABLE_GPA = 0x4000                 # an indirect table
HDR_GPA = 0x8000
DATA_GPA = 0x10000
STATUS_GPA = 0x9000
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
DISK = 1 << 20


@pytest.fixture(scope="module")
def memory():
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    mem = GuestMemory.from_fds([MemRegion(0, SPLIT, UVA, 0),
                                MemRegion(SPLIT, RAM - SPLIT, UVA + SPLIT, SPLIT)], [fd, fd])
    os.close(fd)
    yield mem
    mem.close()


def general(ring, mem, device, head):
    """What the supervisor's general path (vblk.admission.admit_chain) makes of the chain:
    None if it does not run as a plain read or write, else (op, offset, length, pieces,
    status_addr)."""
    try:
        req, plan, pieces = admit_chain(ring, mem, device, head)
    except GuestError:
        return None
    if isinstance(plan, Completion) or plan.op not in (Op.READ, Op.WRITE):
        return None
    return plan.op, plan.offset, plan.length, pieces, req.status_addr


# A chain: (header descriptor, data descriptors, status descriptor) as [addr, len, flags],
# laid out either in the ring's table or in an indirect table; then up to three mutations.
MUTATIONS = ("flags", "len", "addr", "next", "type", "sector", "indirect_len", "head_flags")


def random_chain(rng):
    indirect = rng.random() < 0.5
    write = rng.random() < 0.5
    data_len = rng.choice([512, 4096, 8192])
    descs = [[HDR_GPA, 16, NEXT]]
    for i in range(rng.randint(1, 4)):
        descs.append([DATA_GPA + i * 0x4000, data_len, NEXT | (0 if write else WRITE)])
    descs.append([STATUS_GPA, 1, WRITE])
    rtype = int(BlkType.OUT if write else BlkType.IN)
    sector = rng.randint(0, DISK // 512 - 32)
    lbs = rng.choice([512, 4096])
    ro = write and rng.random() < 0.2
    mutations = [(rng.choice(MUTATIONS), rng.randint(0, 1 << 16), rng.randint(0, 64))
                 for _ in range(rng.choice([0, 0, 1, 1, 2, 3]))]
    return indirect, descs, rtype, sector, lbs, ro, mutations


def lay_out(mem, indirect, descs, rtype, sector, mutations):
    """Write the chain into guest memory; returns the head and whether INDIRECT is offered."""
    nexts = list(range(1, len(descs) + 1))
    base_index = 0 if indirect else 3            # direct chains start at entry 3 of the ring
    table_len = 16 * len(descs)
    head_flags = INDIRECT
    indirect_offered = True
    for what, value, pick in mutations:
        i = pick % len(descs)
        if what == "flags":
            descs[i][2] ^= (NEXT, WRITE, INDIRECT)[value % 3]
        elif what == "len":
            descs[i][1] = (0, 1, 15, 17, 511, 4095, 4097, value)[pick % 8]
        elif what == "addr":     # near the region boundary, past the end, or anywhere
            descs[i][0] = (SPLIT - 1 - pick * 512, RAM - pick * 8, RAM + value, value * 16)[value % 4]
        elif what == "next":
            nexts[i] = value % (Q + 2)
        elif what == "type":
            rtype = (0, 1, 4, 8, 11, 13, 99, BLK_T_BARRIER, BLK_T_BARRIER | 1)[pick % 9]
        elif what == "sector":
            sector = (DISK // 512 - 1, DISK // 512, 1, (1 << 64) // 1024, 7)[pick % 5] + value % 3
        elif what == "indirect_len":
            table_len = (0, 16, 32, 40, 16 * 1025, table_len + 16, table_len - 16)[pick % 7]
        elif what == "head_flags":
            head_flags = (INDIRECT | NEXT, INDIRECT | WRITE, 0)[pick % 3]
            indirect_offered = value % 2 == 0
    mem.write(HDR_GPA, OUTHDR.pack(rtype & 0xFFFFFFFF, 0, sector & (2**64 - 1)))
    table = TABLE_GPA if indirect else DESC_GPA
    for i, (addr, n, flags) in enumerate(descs):
        nxt = nexts[i] + base_index if nexts[i] < len(descs) else nexts[i]
        mem.write(table + 16 * (base_index + i),
                  DESC.pack(addr % (1 << 64), n & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF))
    if indirect:
        mem.write(DESC_GPA, DESC.pack(TABLE_GPA, table_len & 0xFFFFFFFF, head_flags, 0))
        return 0, indirect_offered
    return base_index, True


def test_whatever_the_fast_path_accepts_the_general_path_runs_the_same(memory):
    rng = random.Random(20261128)
    accepted = refused = 0
    for case in range(6000):
        indirect, descs, rtype, sector, lbs, ro, mutations = chain = random_chain(rng)
        head, offered = lay_out(memory, indirect, descs, rtype, sector, mutations)
        ring = SplitRing(memory, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                         last_avail_idx=0, indirect=offered)
        device = BlkDevice(Geometry(DISK, lbs, 4096, ro), writeback=False)
        fast = simple_rw(ring, memory, device.geometry, head)
        expect = general(ring, memory, device, head)
        if fast is None:
            refused += 1
            continue
        accepted += 1
        assert expect is not None, f"case {case}: accepted what the general path refuses: {chain}"
        op, offset, length, pieces, status_addr, status_region, status_off = fast
        assert (op, offset, length, pieces, status_addr) == expect, f"case {case}: {chain}"
        assert memory.translate(status_addr, 1) == [(status_region, status_off, 1)]
    # neither side is rare, so both were really tested
    assert accepted > 1000 and refused > 1000, (accepted, refused)


def test_the_common_shapes_are_taken(memory):
    """Linux's layout (one indirect table), a benchmark's (three chained descriptors), a
    multi-segment read and a write: all accepted, with the right answer."""
    device = BlkDevice(Geometry(DISK, 512, 4096, False), writeback=False)
    ring = SplitRing(memory, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True)
    shapes = [
        (True, [[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT | WRITE], [STATUS_GPA, 1, WRITE]], 0),
        (False, [[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT | WRITE], [STATUS_GPA, 1, WRITE]], 0),
        (True, [[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT | WRITE],
                [DATA_GPA + 0x4000, 512, NEXT | WRITE], [STATUS_GPA, 1, WRITE]], 0),
        (False, [[HDR_GPA, 16, NEXT], [DATA_GPA, 8192, NEXT], [STATUS_GPA, 1, WRITE]], 1),
    ]
    for indirect, descs, rtype in shapes:
        head, _ = lay_out(memory, indirect, descs, rtype, 8, [])
        fast = simple_rw(ring, memory, device.geometry, head)
        assert fast is not None, descs
        length = sum(n for _, n, _ in descs[1:-1])
        assert fast[:3] == (Op.WRITE if rtype else Op.READ, 8 * 512, length)
        assert fast[4] == STATUS_GPA
        assert fast[:5] == general(ring, memory, device, head)


def test_what_it_leaves_to_the_general_path(memory):
    """Unusual but valid requests (header sharing a descriptor with data, a buffer across
    the region boundary, FLUSH) and broken ones all come back None."""
    device = BlkDevice(Geometry(DISK, 512, 4096, False), writeback=False)
    ring = SplitRing(memory, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True)
    cases = [
        ([[HDR_GPA, 16 + 4096, NEXT], [STATUS_GPA, 1, WRITE]], 1),          # header + data
        ([[HDR_GPA, 16, NEXT], [SPLIT - 512, 4096, NEXT | WRITE], [STATUS_GPA, 1, WRITE]], 0),
        ([[HDR_GPA, 16, NEXT], [STATUS_GPA, 1, WRITE]], 4),                  # FLUSH
        ([[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT], [STATUS_GPA, 1, WRITE]], 0),  # read, readable data
        ([[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT | WRITE], [STATUS_GPA, 2, WRITE]], 0),
    ]
    for descs, rtype in cases:
        head, _ = lay_out(memory, False, descs, rtype, 8, [])
        assert simple_rw(ring, memory, device.geometry, head) is None, descs
    # more buffers than a slot holds (MAX_IOV), in one indirect table
    many = [[HDR_GPA, 16, NEXT]] + [[DATA_GPA, 512, NEXT | WRITE]] * (MAX_IOV + 1) + [[STATUS_GPA, 1, WRITE]]
    head, _ = lay_out(memory, True, many, 0, 8, [])
    assert general(ring, memory, device, head) is None
    assert simple_rw(ring, memory, device.geometry, head) is None
    # a read past the end of the disk
    head, _ = lay_out(memory, False, [[HDR_GPA, 16, NEXT], [DATA_GPA, 4096, NEXT | WRITE],
                                      [STATUS_GPA, 1, WRITE]], 0, DISK // 512 - 1, [])
    assert simple_rw(ring, memory, device.geometry, head) is None
