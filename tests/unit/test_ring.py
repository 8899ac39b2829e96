"""The split-ring walker and the request parser against hand-built guest memory."""
import os
import struct

import pytest

from vblk.errors import GuestError, RingBroken
from vblk.memory import GuestMemory
from vblk.testing.driver import need_event
from vblk.vhost_user.messages import MemRegion
from vblk.virtio.blk import OUTHDR, parse_request
from vblk.virtio.constants import BLK_T_BARRIER, BlkType, DescFlag
from vblk.virtio.ring import DESC, SplitRing

Q = 8
RAM = 1 << 20
UVA = 0x7F00_0000_0000
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000
NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


class Guest:
    """Just enough of a driver to lay out rings and chains by hand."""

    def __init__(self, split_at=None):
        fd = os.memfd_create("ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, RAM)
        if split_at:      # two regions: [0, split) and [split, RAM), same fd, other offset
            regions = [MemRegion(0, split_at, UVA, 0),
                       MemRegion(split_at, RAM - split_at, UVA + split_at, split_at)]
            self.mem = GuestMemory.from_fds(regions, [fd, fd])
        else:
            self.mem = GuestMemory.from_fds([MemRegion(0, RAM, UVA, 0)], [fd])
        os.close(fd)
        self.avail_idx = 0

    def ring(self, indirect=True):
        return SplitRing(self.mem, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                         last_avail_idx=0, indirect=indirect)

    def desc(self, i, addr, length, flags=0, nxt=0, table=DESC_GPA):
        self.mem.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))

    def offer(self, head):
        self.mem.write(AVAIL_GPA + 4 + 2 * (self.avail_idx % Q), struct.pack("<H", head))
        self.avail_idx += 1
        self.mem.write(AVAIL_GPA + 2, struct.pack("<H", self.avail_idx & 0xFFFF))

    def used(self):
        idx = struct.unpack("<H", self.mem.read(USED_GPA + 2, 2))[0]
        return idx, [struct.unpack("<II", self.mem.read(USED_GPA + 4 + 8 * i, 8)) for i in range(idx)]


@pytest.fixture
def g():
    guest = Guest()
    yield guest


def standard_chain(g, t=BlkType.IN, sector=3, data_len=4096, data_flags=WRITE):
    g.mem.write(0x10000, OUTHDR.pack(t, 0, sector))
    g.desc(0, 0x10000, 16, NEXT, 1)
    g.desc(1, 0x20000, data_len, data_flags | NEXT, 2)
    g.desc(2, 0x30000, 1, WRITE)


def test_a_standard_read_chain_parses(g):
    standard_chain(g)
    g.offer(0)
    ring = g.ring()
    assert ring.pending() == 1
    segs = ring.walk(ring.pop())
    assert segs == [(0x10000, 16, False), (0x20000, 4096, True), (0x30000, 1, True)]
    req = parse_request(segs, g.mem)
    assert (req.type, req.sector, req.data_in, req.data_out, req.status_addr) == \
        (BlkType.IN, 3, [(0x20000, 4096)], [], 0x30000)


def test_used_ring_is_published_in_one_step(g):
    ring = g.ring()
    ring.put_used(5, 4097)
    ring.put_used(6, 1)
    assert g.used()[0] == 0
    ring.publish_used()
    assert g.used() == (2, [(5, 4097), (6, 1)])


def test_header_and_data_may_share_a_descriptor_and_barrier_is_stripped(g):
    g.mem.write(0x10000, OUTHDR.pack(BlkType.OUT | BLK_T_BARRIER, 0, 9) + b"x" * 512)
    g.desc(0, 0x10000, 16 + 512, NEXT, 1)
    g.desc(1, 0x30000, 1, WRITE)
    g.offer(0)
    ring = g.ring()
    req = parse_request(ring.walk(ring.pop()), g.mem)
    assert req.type == BlkType.OUT and req.data_out == [(0x10000 + 16, 512)] and req.data_in == []


def test_indirect_chain(g):
    table = 0x40000
    g.mem.write(0x10000, OUTHDR.pack(BlkType.IN, 0, 0))
    g.desc(0, 0x10000, 16, NEXT, 1, table=table)
    g.desc(1, 0x20000, 512, WRITE | NEXT, 2, table=table)
    g.desc(2, 0x30000, 1, WRITE, table=table)
    g.desc(4, table, 48, INDIRECT)
    g.offer(4)
    ring = g.ring()
    assert [s[1] for s in ring.walk(ring.pop())] == [16, 512, 1]
    with pytest.raises(GuestError, match="not negotiated"):
        g.ring(indirect=False).walk(4)


@pytest.mark.parametrize("build,reason", [
    (lambda g: (g.desc(0, 0x10000, 16, NEXT, 1), g.desc(1, 0x20000, 16, NEXT, 0)), "loops"),
    (lambda g: g.desc(0, 0x10000, 16, NEXT, 9), "outside"),
    (lambda g: (g.desc(0, 0x10000, 16, WRITE | NEXT, 1), g.desc(1, 0x20000, 16, 0)), "after"),
    (lambda g: g.desc(0, 0x40000, 20, INDIRECT), "indirect table"),
    (lambda g: g.desc(0, 0x40000, 0, INDIRECT), "indirect table"),
    (lambda g: g.desc(0, 0x40000, 32, INDIRECT | NEXT, 1), "both"),
    (lambda g: (g.desc(0, 0x40000, 16, INDIRECT), g.desc(0, 0x40000, 16, INDIRECT, table=0x40000)), "nested"),
    (lambda g: (g.desc(0, 0x40000, 32, INDIRECT), g.desc(0, 0, 1, NEXT, 7, table=0x40000)), "outside"),
])
def test_broken_chains_are_refused(g, build, reason):
    build(g)
    with pytest.raises(GuestError, match=reason):
        g.ring().walk(0)


def test_head_outside_the_queue_is_refused(g):
    with pytest.raises(GuestError):
        g.ring().walk(Q)


def test_avail_index_running_ahead_breaks_the_ring(g):
    g.mem.write(AVAIL_GPA + 2, struct.pack("<H", Q + 1))
    with pytest.raises(RingBroken):
        g.ring().pending()


def test_a_chain_without_status_byte_is_a_guest_error(g):
    g.mem.write(0x10000, OUTHDR.pack(BlkType.IN, 0, 0))
    g.desc(0, 0x10000, 16, NEXT, 1)
    g.desc(1, 0x20000, 512, 0)
    with pytest.raises(GuestError, match="status"):
        parse_request(g.ring().walk(0), g.mem)


def test_a_short_header_is_reported_with_a_status(g):
    g.desc(0, 0x10000, 8, NEXT, 1)
    g.desc(1, 0x30000, 1, WRITE)
    req = parse_request(g.ring().walk(0), g.mem)
    assert req.bad and req.status_addr == 0x30000


def test_addresses_outside_guest_memory_are_refused(g):
    with pytest.raises(GuestError):
        g.mem.translate(RAM - 16, 32)
    with pytest.raises(GuestError):
        g.mem.translate(1 << 63, 1)
    with pytest.raises(GuestError):
        SplitRing(g.mem, Q, UVA + RAM - 8, UVA + AVAIL_GPA, UVA + USED_GPA,
                  last_avail_idx=0, indirect=True)


def test_a_buffer_may_span_two_regions():
    g = Guest(split_at=0x80000)
    pieces = g.mem.translate(0x80000 - 100, 300)
    assert pieces == [(0, 0x80000 - 100, 100), (1, 0x80000, 200)]
    g.mem.write(0x80000 - 2, b"abcd")
    assert g.mem.read(0x80000 - 2, 4) == b"abcd"


def test_kick_suppression_flag_round_trip(g):
    ring = g.ring()
    ring.set_kicks_wanted(False)
    assert g.mem.read(USED_GPA, 2) == b"\x01\x00"
    ring.set_kicks_wanted(True)
    assert g.mem.read(USED_GPA, 2) == b"\x00\x00"
    assert ring.needs_notify()
    g.mem.write(AVAIL_GPA, b"\x01\x00")     # NO_INTERRUPT
    assert not ring.needs_notify()


def avail_event(g):
    return struct.unpack("<H", g.mem.read(USED_GPA + 4 + 8 * Q, 2))[0]


def set_used_event(g, value):
    g.mem.write(AVAIL_GPA + 4 + 2 * Q, struct.pack("<H", value))


def test_event_idx_asks_for_the_next_kick_after_a_drain(g):
    ring = SplitRing(g.mem, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True, event_idx=True)
    for head in (0, 1, 2):
        g.offer(head)
    ring.set_kicks_wanted(False)
    while ring.pending():
        ring.pop()
        assert avail_event(g) == ring.last_avail_idx      # each pop moves the event on
    g.offer(3)                                            # arrives while "not wanted"
    ring.set_kicks_wanted(True)
    assert avail_event(g) == 4                            # the driver kicks past entry 4
    assert ring.pending() == 1                            # and the re-check sees entry 3
    # used.flags stays untouched under EVENT_IDX
    assert struct.unpack("<H", g.mem.read(USED_GPA, 2))[0] == 0


def offer_asking(g, head) -> bool:
    """The driver adds ``head`` and asks, as Linux's virtio_ring does, whether to kick."""
    old = g.avail_idx & 0xFFFF
    g.offer(head)
    return need_event(avail_event(g), g.avail_idx & 0xFFFF, old)


def test_held_kicks_are_not_asked_for_under_event_idx_until_released(g):
    ring = SplitRing(g.mem, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True, event_idx=True)
    assert offer_asking(g, 0)                 # kicks wanted: the first request kicks
    ring.pop()
    ring.hold_kicks()                         # the loop polls this ring now
    assert not offer_asking(g, 1)
    ring.pop()                                # the poll found it
    ring.set_kicks_wanted(False)              # a drain inside the polling run
    ring.set_kicks_wanted(True)
    assert not offer_asking(g, 2) and not offer_asking(g, 3)
    assert avail_event(g) == ring.last_avail_idx - 1
    ring.release_kicks()                      # the run ends
    assert ring.pending() == 2                # added without a kick: the caller's re-check
    assert offer_asking(g, 4)                 # and the next request kicks again


def test_held_kicks_keep_no_notify_through_a_drain_without_event_idx(g):
    ring = g.ring()
    ring.set_kicks_wanted(True)
    ring.hold_kicks()
    g.offer(0)
    ring.pop()
    ring.set_kicks_wanted(True)               # a drain's end, while held
    assert g.mem.read(USED_GPA, 2) == b"\x01\x00"
    ring.release_kicks()
    assert g.mem.read(USED_GPA, 2) == b"\x00\x00"


def test_held_kicks_are_not_asked_for_across_the_u16_index_wrapping(g):
    """avail_event moves with each pop, one entry behind: the driver's index wraps past 65535
    and never crosses it."""
    ring = SplitRing(g.mem, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True, event_idx=True)
    ring.hold_kicks()
    kicks = 0
    for i in range(70000):
        kicks += offer_asking(g, i % Q)
        ring.pop()
    assert kicks == 0                         # each pop keeps the event one behind


def test_event_idx_interrupts_only_when_used_event_is_crossed(g):
    ring = SplitRing(g.mem, Q, UVA + DESC_GPA, UVA + AVAIL_GPA, UVA + USED_GPA,
                     last_avail_idx=0, indirect=True, event_idx=True)
    ring.put_used(0, 1)
    ring.publish_used()
    assert ring.needs_notify()                 # the first publication always signals
    set_used_event(g, 3)                       # "interrupt me once entry 3 is used"
    ring.put_used(1, 1)
    ring.publish_used()                        # used 1 -> 2: entry 3 not reached
    assert not ring.needs_notify()
    ring.put_used(2, 1)
    ring.put_used(3, 1)
    ring.publish_used()                        # 2 -> 4 crosses 3
    assert ring.needs_notify()
    # NO_INTERRUPT in avail.flags is ignored under EVENT_IDX
    g.mem.write(AVAIL_GPA, struct.pack("<H", 1))
    set_used_event(g, 4)
    ring.put_used(4, 1)
    ring.publish_used()
    assert ring.needs_notify()
