"""The device side of a split virtqueue, over guest memory.

Theory of operation
-------------------
The driver (guest) owns the descriptor table and the avail ring; the device (vblk's supervisor)
owns the used ring. The device keeps two free-running u16 counters: ``last_avail_idx`` (avail
entries consumed) and ``used_idx`` (used entries published). ``avail.idx - last_avail_idx`` is
the number of new requests; if it is larger than the queue size the driver is broken and the
ring is stopped (RingBroken).

A request is a chain of descriptors starting at a head index; ``walk`` follows it, through at
most one indirect table, and checks every step: head and next indices inside the table, no
loops (a chain longer than its table), indirect only when negotiated, never nested, never
combined with NEXT, table lengths a non-zero multiple of 16, and device-readable descriptors
before device-writable ones. Addresses in descriptors are guest-physical; they are *not*
translated here (the caller does it, so a buffer may span regions).

Completion writes the used element first and then ``used.idx`` with one 16-bit store (never
``struct.pack_into`` for an index another process polls: it zeroes before it writes).
x86 keeps stores in order, and CPython gives no other reordering, so this is the barrier.

While the supervisor drains a ring it sets ``used.flags = NO_NOTIFY`` so the guest does not
kick for requests the loop will see anyway, then clears it and re-checks ``avail.idx`` to
close the race with a request added in between (ACRN's and libvhost-user's loop).

While the supervisor's loop polls a ring (vblk.supervisor.loop, Polling) its kicks are *held*
(``hold_kicks``, QEMU's ``virtio_queue_set_notification(vq, 0)`` for the time it polls): the
driver is asked not to kick for what it adds, since the loop looks anyway. Without EVENT_IDX
that is NO_NOTIFY, kept set through drains; with it, ``avail_event`` is kept one entry behind
``last_avail_idx`` (each pop moves it along) -- an entry the driver has already published, so
it never crosses it. ``release_kicks`` asks for kicks again; the caller then looks at
``avail.idx`` once more, as after a drain.
"""
from __future__ import annotations

import struct

from vblk.errors import GuestError, RingBroken
from vblk.memory import GuestMemory
from vblk.virtio.constants import AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE, USED_F_NO_NOTIFY, DescFlag

DESC = struct.Struct("<QIHH")          # addr, len, flags, next
USED_ELEM = struct.Struct("<II")       # id, len
U16 = struct.Struct("<H")
MAX_INDIRECT = 1024                    # entries in one indirect table (libvhost-user's cap)

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)

Segment = tuple[int, int, bool]        # guest-physical address, length, device-writable


def desc_table_bytes(size: int) -> int:
    return 16 * size


def avail_ring_bytes(size: int) -> int:
    return 6 + 2 * size


def used_ring_bytes(size: int) -> int:
    return 6 + 8 * size


class SplitRing:
    """One started virtqueue. Build a new one whenever the memory table or addresses change."""

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, last_avail_idx: int, indirect: bool,
                 event_idx: bool = False) -> None:
        if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise GuestError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        self.size = size
        self.memory = memory
        self.indirect = indirect
        self.event_idx = event_idx
        di, doff = memory.translate_qva(desc_addr, desc_table_bytes(size))
        ai, aoff = memory.translate_qva(avail_addr, avail_ring_bytes(size))
        ui, uoff = memory.translate_qva(used_addr, used_ring_bytes(size))
        self._desc = memory.regions[di].view
        self._desc_off = doff
        self._avail = memory.regions[ai].view
        self._avail_off = aoff
        self._used = memory.regions[ui].view
        self._used_off = uoff
        used_region = memory.regions[ui].desc        # where the used ring is, guest-physical
        self.used_gpa = used_region.guest_phys_addr + uoff - used_region.mmap_offset
        self.used_bytes = used_ring_bytes(size)
        # 16-bit views for the fields the other side polls: one store each.
        self._used_flags16 = self._used[uoff:uoff + 2].cast("H")
        self._used_idx16 = self._used[uoff + 2:uoff + 4].cast("H")
        self._avail_event16 = self._used[uoff + 4 + 8 * size:uoff + 6 + 8 * size].cast("H")
        self.last_avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = self._used_idx16[0]
        self.signalled_used: int | None = None
        self.kicks_held = False              # see hold_kicks
        self.inflight = None                 # an InflightQueue when the frontend gave one
        self._unpublished: list[int] = []    # heads put in the used ring, not yet published

    def attach_inflight(self, inflight) -> list[int]:
        """Track requests in ``inflight`` (an InflightQueue); returns the heads a previous
        backend left in flight, oldest first, and moves last_avail_idx past them."""
        heads = inflight.recover(self.used_idx, self.used_id_at)
        self.inflight = inflight
        self.last_avail_idx = (self.used_idx + len(heads)) & 0xFFFF
        return heads

    def used_id_at(self, i: int) -> int:
        """The head id in used-ring entry ``i`` (free-running index)."""
        return USED_ELEM.unpack_from(self._used, self._used_off + 4 + 8 * (i % self.size))[0]

    def detach(self) -> None:
        """Release the views on guest memory (before that memory is unmapped)."""
        for v in (self._used_flags16, self._used_idx16, self._avail_event16):
            v.release()

    # -- driver -> device ----------------------------------------------------------------
    def avail_idx(self) -> int:
        return U16.unpack_from(self._avail, self._avail_off + 2)[0]

    def avail_flags(self) -> int:
        return U16.unpack_from(self._avail, self._avail_off)[0]

    def pending(self) -> int:
        """How many new heads the driver has made available (RingBroken if impossible)."""
        n = (self.avail_idx() - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise RingBroken(f"avail.idx is {n} entries ahead of the device, queue size {self.size}")
        return n

    def pop(self) -> int:
        """Take the next available head (the caller has checked pending())."""
        slot = self._avail_off + 4 + 2 * (self.last_avail_idx % self.size)
        head = U16.unpack_from(self._avail, slot)[0]
        if self.inflight is not None and head < self.size:
            self.inflight.begin(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._avail_event16[0] = (self.last_avail_idx - self.kicks_held) & 0xFFFF
        return head

    def desc_table(self) -> tuple[memoryview, int]:
        """The descriptor table: (view on its region's mapping, offset of entry 0)."""
        return self._desc, self._desc_off

    def walk(self, head: int) -> list[Segment]:
        """Follow the chain at ``head``; GuestError if it breaks any rule."""
        if head >= self.size:
            raise GuestError(f"head index {head} outside a queue of {self.size}")
        table, base, limit = self._desc, self._desc_off, self.size
        segments: list[Segment] = []
        index, count, seen_write, in_indirect = head, 0, False, False
        while True:
            count += 1
            if count > limit:
                raise GuestError(f"descriptor chain from head {head} loops or exceeds {limit} entries")
            addr, length, flags, nxt = DESC.unpack_from(table, base + 16 * index)
            if flags & _INDIRECT:
                if not self.indirect:
                    raise GuestError("indirect descriptor used but INDIRECT_DESC not negotiated")
                if in_indirect:
                    raise GuestError("nested indirect descriptor")
                if flags & _NEXT:
                    raise GuestError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                    raise GuestError(f"indirect table of {length} bytes")
                pieces = self.memory.translate(addr, length)
                if len(pieces) == 1:
                    region, base, _ = pieces[0]
                    table = self.memory.regions[region].view
                else:   # a table spanning regions is copied
                    table, base = self.memory.read(addr, length), 0
                limit, index, count, in_indirect = length // 16, 0, 0, True
                continue
            writable = bool(flags & _WRITE)
            if writable:
                seen_write = True
            elif seen_write:
                raise GuestError("device-readable descriptor after a device-writable one")
            segments.append((addr, length, writable))
            if not flags & _NEXT:
                return segments
            if nxt >= limit:
                raise GuestError(f"next index {nxt} outside a table of {limit}")
            index = nxt

    # -- device -> driver ----------------------------------------------------------------
    def put_used(self, head: int, length: int) -> None:
        """Write one used element; it becomes visible at the next publish_used()."""
        USED_ELEM.pack_into(self._used, self._used_off + 4 + 8 * (self.used_idx % self.size),
                            head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.inflight is not None:
            self._unpublished.append(head)

    def publish_used(self) -> None:
        self._used_idx16[0] = self.used_idx
        if self.inflight is not None:
            for head in self._unpublished:
                if head < self.size:
                    self.inflight.end(head)
            self._unpublished.clear()
            self.inflight.published(self.used_idx)

    def set_kicks_wanted(self, wanted: bool) -> None:
        """used.flags NO_NOTIFY (only meaningful without EVENT_IDX); nothing while the kicks
        are held."""
        if self.kicks_held:
            return
        if not self.event_idx:
            self._used_flags16[0] = 0 if wanted else USED_F_NO_NOTIFY
        else:
            self._avail_event16[0] = self.avail_idx() if wanted else self.last_avail_idx

    def hold_kicks(self) -> None:
        """Ask the driver not to kick for what it adds from now on (see the module doc)."""
        self.kicks_held = True
        if not self.event_idx:
            self._used_flags16[0] = USED_F_NO_NOTIFY
        else:
            self._avail_event16[0] = (self.last_avail_idx - 1) & 0xFFFF

    def release_kicks(self) -> None:
        """Ask for kicks again (the caller then re-checks ``pending``)."""
        self.kicks_held = False
        self.set_kicks_wanted(True)

    def needs_notify(self) -> bool:
        """Should the guest be interrupted for what was published since the last signal?"""
        if self.event_idx:
            used_event = U16.unpack_from(self._avail, self._avail_off + 4 + 2 * self.size)[0]
            old = self.signalled_used
            new = self.used_idx
            self.signalled_used = new
            if old is None:
                return True
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self.avail_flags() & AVAIL_F_NO_INTERRUPT
