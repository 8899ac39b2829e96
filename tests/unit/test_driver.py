"""The driver side of the split ring (vblk.testing.driver), on plain memory, no sockets."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblk.memory import GuestMemory
from vblk.testing.driver import (
    Allocator,
    DeviceError,
    OutOfGuestMemory,
    RingFull,
    RingLayout,
    SplitDriver,
    need_event,
)
from vblk.testing.frontend import GuestRam
from vblk.virtio.constants import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY, DescFlag
from vblk.virtio.ring import DESC, USED_ELEM, SplitRing

U16 = struct.Struct("<H")
BASE = 0x10000                      # byte 0 of the buffer is this gpa


class FakeDevice:
    """The device side, read straight from the spec's layout (not from the driver's code)."""

    def __init__(self, mem: bytearray, layout: RingLayout, base: int = BASE) -> None:
        self.mem, self.layout, self.base = mem, layout, base
        self.last_avail = 0
        self.used_idx = 0

    def u16(self, gpa: int) -> int:
        return U16.unpack_from(self.mem, gpa - self.base)[0]

    def desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.mem, table - self.base + 16 * index)

    def pop_all(self) -> list[tuple[int, list[tuple[int, int, int]]]]:
        q = self.layout.size
        out = []
        while self.last_avail != self.u16(self.layout.avail + 2):
            head = self.u16(self.layout.avail + 4 + 2 * (self.last_avail % q))
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            out.append((head, self.walk(head)))
        return out

    def walk(self, head: int) -> list[tuple[int, int, int]]:
        table, index, chain = self.layout.desc, head, []
        while True:
            addr, length, flags, nxt = self.desc(table, index)
            if flags & DescFlag.INDIRECT:
                table, index = addr, 0
                continue
            chain.append((addr, length, flags & DescFlag.WRITE))
            if not flags & DescFlag.NEXT:
                return chain
            index = nxt

    def complete(self, head: int, length: int) -> None:
        q, used = self.layout.size, self.layout.used
        USED_ELEM.pack_into(self.mem, used - self.base + 4 + 8 * (self.used_idx % q), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.mem, used - self.base + 2, self.used_idx)


def make(size: int = 8, event_idx: bool = False):
    mem = bytearray(256 * 1024)
    layout = RingLayout.at(BASE, size)
    alloc = Allocator(layout.end, BASE + len(mem) - layout.end, align=16)
    driver = SplitDriver(mem, layout, base=BASE, allocator=alloc, event_idx=event_idx)
    return mem, driver, FakeDevice(mem, layout), alloc


def test_layout_packs_the_three_parts_with_their_alignment():
    layout = RingLayout.at(0x1001, 128)
    assert layout.desc == 0x1010
    assert layout.avail == layout.desc + 16 * 128
    assert layout.used % 4 == 0 and layout.used >= layout.avail + 6 + 2 * 128
    assert layout.end == layout.used + 6 + 8 * 128
    with pytest.raises(ValueError):
        RingLayout.at(0, 100)


def test_a_chain_is_linked_in_order_and_invisible_until_published():
    mem, driver, device, _ = make()
    buffers = [(0x20000, 16, False), (0x21000, 4096, True), (0x22000, 1, True)]
    head = driver.add_chain(buffers)
    assert device.pop_all() == []
    assert driver.publish() is True
    [(got_head, chain)] = device.pop_all()
    assert got_head == head
    assert chain == [(a, n, DescFlag.WRITE if w else 0) for a, n, w in buffers]
    assert driver.num_free == 8 - 3 and driver.in_flight == 1


def test_completions_return_id_and_length_and_free_the_descriptors():
    _, driver, device, _ = make()
    heads = [driver.add_chain([(0x20000, 16, False), (0x20010, 1, True)]) for _ in range(4)]
    driver.publish()
    device.pop_all()
    assert driver.num_free == 0
    with pytest.raises(RingFull):
        driver.add_chain([(0x20000, 16, False)])
    device.complete(heads[2], 1)
    device.complete(heads[0], 513)
    assert driver.used_since_last() == [(heads[2], 1), (heads[0], 513)]
    assert driver.used_since_last() == []
    assert driver.num_free == 4 and driver.in_flight == 2


def test_indices_wrap_around_sixteen_bits():
    _, driver, device, _ = make(size=4)
    for i in range(70_000):
        head = driver.add_chain([(0x20000 + i % 7, 8, i % 2 == 0)])
        driver.publish()
        [(got, _)] = device.pop_all()
        device.complete(got, i & 0xFF)
        assert driver.used_since_last() == [(head, i & 0xFF)]
    assert driver.avail_idx == 70_000 & 0xFFFF


def test_indirect_chain_uses_one_descriptor_and_frees_its_table():
    _, driver, device, alloc = make()
    free_before = alloc.free_bytes
    buffers = [(0x20000, 16, False), (0x21000, 512, False), (0x22000, 1, True)]
    head = driver.add_chain(buffers, indirect=True)
    assert driver.num_free == 7
    addr, length, flags, _ = device.desc(device.layout.desc, head)
    assert flags == DescFlag.INDIRECT and length == 16 * 3
    driver.publish()
    [(_, chain)] = device.pop_all()
    assert chain == [(a, n, DescFlag.WRITE if w else 0) for a, n, w in buffers]
    device.complete(head, 1)
    driver.used_since_last()
    assert alloc.free_bytes == free_before and driver.num_free == 8


def test_a_device_returning_an_unknown_id_or_running_ahead_is_caught():
    _, driver, device, _ = make()
    driver.add_chain([(0x20000, 16, False)])
    driver.publish()
    device.complete(5, 0)
    with pytest.raises(DeviceError, match="not in flight"):
        driver.used_since_last()
    _, driver, device, _ = make()
    device.used_idx = 100
    device.complete(0, 0)
    with pytest.raises(DeviceError, match="ahead"):
        driver.used_since_last()


def test_kicks_follow_no_notify_without_event_idx():
    mem, driver, device, _ = make()
    driver.add_chain([(0x20000, 1, True)])
    assert driver.publish() is True
    U16.pack_into(mem, device.layout.used - BASE, USED_F_NO_NOTIFY)
    driver.add_chain([(0x20000, 1, True)])
    assert driver.publish() is False
    assert driver.publish() is False          # nothing new: no kick either


def test_kicks_follow_avail_event_with_event_idx():
    mem, driver, device, _ = make(event_idx=True)
    avail_event = device.layout.used - BASE + 4 + 8 * 8
    U16.pack_into(mem, avail_event, 1)        # the device wants a kick once entry 1 is published
    driver.add_chain([(0x20000, 1, True)])
    assert driver.publish() is False          # 0 -> 1 does not cross 1
    driver.add_chain([(0x20000, 1, True)])
    assert driver.publish() is True           # 1 -> 2 does


def test_interrupt_requests_go_to_used_event_or_avail_flags():
    mem, driver, device, _ = make(event_idx=True)
    used_event = device.layout.avail - BASE + 4 + 2 * 8
    head = driver.add_chain([(0x20000, 1, True)])
    driver.publish()
    device.pop_all()
    assert driver.arm_interrupts() is False
    device.complete(head, 1)
    assert driver.arm_interrupts() is True    # an element arrived: do not sleep
    driver.used_since_last()
    assert U16.unpack_from(mem, used_event)[0] == 1
    mem, driver, device, _ = make()
    driver.suppress_interrupts()
    assert U16.unpack_from(mem, device.layout.avail - BASE)[0] == AVAIL_F_NO_INTERRUPT
    driver.arm_interrupts()
    assert U16.unpack_from(mem, device.layout.avail - BASE)[0] == 0


def test_need_event_matches_the_spec_formula_across_wraparound():
    assert need_event(0, 1, 0)
    assert not need_event(1, 1, 0)
    assert need_event(0xFFFF, 2, 0xFFFE)
    assert not need_event(5, 2, 0xFFFE)


def test_raw_descriptors_and_heads_reach_the_device_as_written():
    _, driver, device, _ = make()
    [a, b] = driver.alloc_descriptors(2)
    driver.write_descriptor(a, 0x20000, 16, DescFlag.NEXT, b)
    driver.write_descriptor(b, 0x20010, 1, DescFlag.WRITE | DescFlag.NEXT, a)   # a loop
    driver.push_head(a, [a, b])
    driver.push_head(200)                                                       # out of range
    driver.publish()
    assert device.u16(device.layout.avail + 2) == 2
    assert device.u16(device.layout.avail + 4) == a
    assert device.u16(device.layout.avail + 6) == 200
    assert device.desc(device.layout.desc, b) == (0x20010, 1, 3, a)
    device.last_avail = 2
    device.complete(a, 0)
    assert driver.used_since_last() == [(a, 0)] and driver.num_free == 8
    driver.set_avail_idx(1000)
    assert device.u16(device.layout.avail + 2) == 1000


def test_allocator_first_fit_reserve_and_merge():
    alloc = Allocator(0x1000, 0x4000, align=0x400)
    a = alloc.alloc(1)
    b = alloc.alloc(0x800)
    assert (a, b) == (0x1000, 0x1400)
    with pytest.raises(OutOfGuestMemory):
        alloc.reserve(0x1800, 0x400)
    c = alloc.reserve(0x4000, 0x800)
    assert c == 0x4000                        # free now: 0x1c00-0x4000 and 0x4800-0x5000
    with pytest.raises(OutOfGuestMemory):
        alloc.alloc(0x2800)
    assert alloc.alloc(0x2400) == 0x1C00
    alloc.free(0x1C00)
    for g in (b, a, c):
        alloc.free(g)
    assert alloc.free_bytes == 0x4000
    assert alloc.alloc(0x4000) == 0x1000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5000)), max_size=60))
def test_allocator_never_hands_out_overlapping_extents(steps):
    alloc = Allocator(0, 1 << 16, align=64)
    live: dict[int, int] = {}
    for do_alloc, n in steps:
        if do_alloc or not live:
            try:
                g = alloc.alloc(n)
            except OutOfGuestMemory:
                continue
            assert all(g + n <= s or s + m <= g for s, m in live.items())
            assert 0 <= g and g + n <= 1 << 16
            live[g] = n
        else:
            alloc.free(live.popitem()[0])
    for g in list(live):
        alloc.free(g)
    assert alloc.free_bytes == 1 << 16 and alloc.alloc(1 << 16) == 0


def test_vblk_ring_walker_reads_what_the_driver_wrote():
    """Both sides from this codebase over one memfd: driver chains in, used elements out."""
    with GuestRam(1, split_at=[0x80000]) as ram:
        layout = RingLayout.at(0, 16)
        alloc = Allocator(0x4000, ram.size - 0x4000, align=16)
        driver = SplitDriver(ram.view, layout, allocator=alloc)
        memory = GuestMemory.from_fds(ram.regions, [ram.fd] * len(ram.regions))
        ring = SplitRing(memory, 16, ram.uva(layout.desc), ram.uva(layout.avail),
                         ram.uva(layout.used), last_avail_idx=0, indirect=True)
        try:
            chains = [[(0x10000, 16, False), (0x7FF00, 512, True), (0x10010, 1, True)],
                      [(0x20000, 16, False), (0x20010, 4096, False), (0x20000, 1, True)]]
            heads = [driver.add_chain(chains[0]), driver.add_chain(chains[1], indirect=True)]
            driver.publish()
            assert ring.pending() == 2
            for head, chain in zip(heads, chains):
                got = ring.pop()
                assert got == head
                assert ring.walk(got) == chain
                ring.put_used(got, 7)
            ring.publish_used()
            assert driver.used_since_last() == [(heads[0], 7), (heads[1], 7)]
        finally:
            ring.detach()
            memory.close()
            driver.close()
