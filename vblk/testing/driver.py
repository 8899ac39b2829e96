"""The driver (guest) side of a split virtqueue, over any writable buffer. Sans-I/O.

Theory of operation
-------------------
``SplitDriver`` plays the guest's virtio driver on a buffer whose byte 0 is guest-physical
address ``base``: a ``bytearray`` in unit tests, a ``GuestRam`` mmap shared with a real backend
in integration tests. It owns the descriptor table and the avail ring and only reads the used
ring, exactly as a guest does:

* ``add_chain`` takes free descriptors (or one descriptor pointing at an indirect table taken
  from an ``Allocator``), fills them and appends the head to the avail ring -- invisibly;
* ``publish`` makes every added head visible with **one 16-bit store** of ``avail.idx`` (never
  ``struct.pack_into``, which zeroes the field before writing it: a device polling at that
  moment would see a bogus index) and says whether the device wants a kick;
* ``used_since_last`` reads ``used.idx`` once, returns the new ``(id, len)`` elements and frees
  their chains. An id that is not in flight, or a used index that ran ahead by more than the
  queue size, is the device's fault: ``DeviceError``.

Notification suppression follows the spec. Without EVENT_IDX the device's ``used.flags``
NO_NOTIFY bit decides the kick and ``avail.flags`` NO_INTERRUPT asks for no interrupts. With
EVENT_IDX the driver kicks when ``avail_event`` was crossed, and ``arm_interrupts`` writes
``used_event`` then re-reads ``used.idx`` (an element published in between would otherwise be
missed: the device compared against the old ``used_event``).

The raw methods (``alloc_descriptors``, ``write_descriptor``, ``write_table``, ``push_head``,
``set_avail_idx``) bypass every check so tests can hand a device malformed chains.

Layout and structs come from ``vblk.virtio.ring``: the spec's formats are declared once.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from vblk.errors import VblkError
from vblk.virtio.constants import AVAIL_F_NO_INTERRUPT, MAX_QUEUE_SIZE, USED_F_NO_NOTIFY, DescFlag
from vblk.virtio.ring import DESC, U16, USED_ELEM, avail_ring_bytes, desc_table_bytes, used_ring_bytes

Buffer = tuple[int, int, bool]              # guest-physical address, length, device-writable
RawDesc = tuple[int, int, int, int]         # addr, len, flags, next: written as given

_NEXT = int(DescFlag.NEXT)
_WRITE = int(DescFlag.WRITE)
_INDIRECT = int(DescFlag.INDIRECT)


class DeviceError(VblkError):
    """The device broke the split-ring protocol, as seen from the driver."""


class RingFull(Exception):
    """Not enough free descriptors: wait for completions, then add the chain again."""


class OutOfGuestMemory(Exception):
    """The allocator has no free extent large enough."""


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def need_event(event: int, new: int, old: int) -> bool:
    """The spec's ``vring_need_event``: did moving an index from old to new cross event?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Guest-physical addresses of one split virtqueue of ``size`` entries."""
    size: int
    desc: int
    avail: int
    used: int

    @classmethod
    def at(cls, gpa: int, size: int) -> RingLayout:
        """Desc table, avail and used rings packed one after the other from ``gpa``."""
        if size <= 0 or size & (size - 1) or size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}")
        desc = _align(gpa, 16)
        avail = desc + desc_table_bytes(size)
        used = _align(avail + avail_ring_bytes(size), 4)
        return cls(size, desc, avail, used)

    @property
    def end(self) -> int:
        """First guest-physical address after the used ring."""
        return self.used + used_ring_bytes(self.size)


class Allocator:
    """First-fit allocator of guest-physical extents in [start, start + size)."""

    def __init__(self, start: int, size: int, *, align: int = 64) -> None:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocator size {size} or alignment {align}")
        self.align = align
        first = _align(start, align)
        self._free: list[tuple[int, int]] = [(first, start + size - first)]   # sorted (gpa, len)
        self._used: dict[int, int] = {}

    @property
    def free_bytes(self) -> int:
        return sum(n for _, n in self._free)

    def alloc(self, length: int) -> int:
        """Reserve ``length`` bytes (rounded up to the alignment); returns their gpa."""
        length = _align(max(length, 1), self.align)
        for i, (gpa, n) in enumerate(self._free):
            if n >= length:
                if n == length:
                    del self._free[i]
                else:
                    self._free[i] = (gpa + length, n - length)
                self._used[gpa] = length
                return gpa
        raise OutOfGuestMemory(f"no free extent of {length} bytes ({self.free_bytes} free)")

    def reserve(self, gpa: int, length: int) -> int:
        """Reserve a chosen range (it must be free and aligned); returns ``gpa``."""
        length = _align(max(length, 1), self.align)
        if gpa % self.align:
            raise ValueError(f"gpa {gpa:#x} is not {self.align}-aligned")
        i = bisect.bisect_right(self._free, (gpa, 1 << 64)) - 1
        if i < 0 or gpa + length > self._free[i][0] + self._free[i][1]:
            raise OutOfGuestMemory(f"range {gpa:#x}+{length} is not free")
        start, n = self._free.pop(i)
        pieces = [(start, gpa - start), (gpa + length, start + n - gpa - length)]
        self._free[i:i] = [p for p in pieces if p[1]]
        self._used[gpa] = length
        return gpa

    def free(self, gpa: int) -> None:
        length = self._used.pop(gpa)
        i = bisect.bisect_left(self._free, (gpa, 0))
        if i < len(self._free) and gpa + length == self._free[i][0]:       # merge right
            length += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == gpa:   # merge left
            gpa, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            del self._free[i]
        self._free.insert(i, (gpa, length))


@dataclass(slots=True)
class _Chain:
    descriptors: list[int]          # ring descriptor indices, head first
    table: int | None = None        # gpa of the indirect table, freed with the chain


class SplitDriver:
    """Driver side of one split virtqueue laid out at ``layout`` inside ``mem``."""

    def __init__(self, mem: memoryview | bytearray, layout: RingLayout, *, base: int = 0,
                 allocator: Allocator | None = None, event_idx: bool = False) -> None:
        self.layout = layout
        self.size = layout.size
        self.base = base
        self.allocator = allocator
        self.event_idx = event_idx
        self._mem = memoryview(mem)
        for start, n in ((layout.desc, desc_table_bytes(self.size)),
                         (layout.avail, avail_ring_bytes(self.size)),
                         (layout.used, used_ring_bytes(self.size))):
            off = self._offset(start, n)
            self._mem[off:off + n] = bytes(n)            # a fresh ring
        self._desc_off = self._offset(layout.desc, 0)
        self._avail_off = self._offset(layout.avail, 0)
        self._used_off = self._offset(layout.used, 0)
        q = self.size
        a, u = self._avail_off, self._used_off
        # One 16-bit view per index or flags word the other side polls: single stores/loads.
        self._avail_flags16 = self._mem[a:a + 2].cast("H")
        self._avail_idx16 = self._mem[a + 2:a + 4].cast("H")
        self._used_event16 = self._mem[a + 4 + 2 * q:a + 6 + 2 * q].cast("H")
        self._used_flags16 = self._mem[u:u + 2].cast("H")
        self._used_idx16 = self._mem[u + 2:u + 4].cast("H")
        self._avail_event16 = self._mem[u + 4 + 8 * q:u + 6 + 8 * q].cast("H")
        self._free = list(range(q - 1, -1, -1))      # a stack: pop() gives 0 first
        self._chains: dict[int, _Chain] = {}
        self.avail_idx = 0           # next avail index to fill (not yet visible past published)
        self.published_idx = 0       # what the device can see
        self.last_used_idx = 0       # used elements consumed so far

    # -- helpers -------------------------------------------------------------------------
    def _offset(self, gpa: int, length: int) -> int:
        off = gpa - self.base
        if off < 0 or off + length > len(self._mem):
            raise ValueError(f"gpa range {gpa:#x}+{length} is outside the driver's memory")
        return off

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added (published or not) that the device has not returned yet."""
        return len(self._chains)

    def close(self) -> None:
        """Release every view on the memory (an mmap cannot close while one is alive)."""
        for v in (self._avail_flags16, self._avail_idx16, self._used_event16,
                  self._used_flags16, self._used_idx16, self._avail_event16, self._mem):
            v.release()

    # -- adding requests -----------------------------------------------------------------
    def add_chain(self, buffers: Sequence[Buffer], indirect: bool = False) -> int:
        """Describe ``buffers`` (readable ones first) as one chain; returns its head index.

        With ``indirect`` the buffers go into a table from the allocator and the chain uses
        one ring descriptor. Raises RingFull when the descriptors are not there.
        """
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        descs = [(gpa, n, _WRITE if w else 0) for gpa, n, w in buffers]
        if indirect:
            if self.allocator is None:
                raise ValueError("indirect chains need an allocator for their tables")
            if not self._free:
                raise RingFull("no free descriptor for an indirect chain")
            table = self.allocator.alloc(16 * len(descs))
            self.write_table(table, [(a, n, f | (_NEXT if i + 1 < len(descs) else 0), i + 1)
                                     for i, (a, n, f) in enumerate(descs)])
            head = self._free.pop()
            self.write_descriptor(head, table, 16 * len(descs), _INDIRECT)
            chain = _Chain([head], table)
        else:
            if len(descs) > len(self._free):
                raise RingFull(f"chain of {len(descs)} descriptors, {len(self._free)} free")
            indices = [self._free.pop() for _ in descs]
            for i, (a, n, f) in enumerate(descs):
                last = i + 1 == len(descs)
                self.write_descriptor(indices[i], a, n, f | (0 if last else _NEXT),
                                      0 if last else indices[i + 1])
            head = indices[0]
            chain = _Chain(indices)
        self._chains[head] = chain
        self._push(head)
        return head

    def _push(self, head: int) -> None:
        U16.pack_into(self._mem, self._avail_off + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> bool:
        """Make every added head visible; returns whether the device asked for a kick."""
        old, new = self.published_idx, self.avail_idx
        if old == new:
            return False
        self._avail_idx16[0] = new                 # the single 16-bit store
        self.published_idx = new
        if self.event_idx:
            return need_event(self._avail_event16[0], new, old)
        return not self._used_flags16[0] & USED_F_NO_NOTIFY

    # -- completions ---------------------------------------------------------------------
    def used_pending(self) -> int:
        """How many used elements the device has published that were not consumed yet."""
        n = (self._used_idx16[0] - self.last_used_idx) & 0xFFFF
        if n > self.size:
            raise DeviceError(f"used.idx ran {n} entries ahead of the driver (queue size {self.size})")
        return n

    def used_since_last(self) -> list[tuple[int, int]]:
        """The ``(id, len)`` elements published since the last call; frees their chains."""
        n = self.used_pending()
        out = []
        for _ in range(n):
            slot = self._used_off + 4 + 8 * (self.last_used_idx % self.size)
            head, length = USED_ELEM.unpack_from(self._mem, slot)
            chain = self._chains.pop(head, None)
            if chain is None:
                raise DeviceError(f"device returned id {head}, which is not in flight")
            self._free.extend(reversed(chain.descriptors))
            if chain.table is not None and self.allocator is not None:
                self.allocator.free(chain.table)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            out.append((head, length))
        if self.event_idx:
            self._used_event16[0] = self.last_used_idx
        return out

    def arm_interrupts(self) -> bool:
        """Ask for an interrupt at the next used element; True if one is already there."""
        if self.event_idx:
            self._used_event16[0] = self.last_used_idx
        else:
            self._avail_flags16[0] = 0
        return self.used_pending() > 0

    def suppress_interrupts(self) -> None:
        """Ask the device not to interrupt (a hint it may ignore)."""
        if self.event_idx:
            self._used_event16[0] = (self.last_used_idx - 1) & 0xFFFF
        else:
            self._avail_flags16[0] = AVAIL_F_NO_INTERRUPT

    # -- raw access, for malformed chains --------------------------------------------------
    def alloc_descriptors(self, count: int) -> list[int]:
        """Take ``count`` free descriptor indices for a hand-built chain (see push_head)."""
        if count > len(self._free):
            raise RingFull(f"{count} descriptors wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def write_descriptor(self, index: int, addr: int, length: int, flags: int = 0,
                         next: int = 0) -> None:
        """Write ring descriptor ``index`` as given (any flags, any next)."""
        if not 0 <= index < self.size:
            raise ValueError(f"descriptor index {index} outside a queue of {self.size}")
        DESC.pack_into(self._mem, self._desc_off + 16 * index, addr, length, flags, next)

    def write_table(self, gpa: int, descs: Sequence[RawDesc]) -> None:
        """Write an indirect table of descriptors at ``gpa`` as given."""
        off = self._offset(gpa, 16 * len(descs))
        for i, (a, n, f, nxt) in enumerate(descs):
            DESC.pack_into(self._mem, off + 16 * i, a, n, f, nxt)

    def push_head(self, head: int, descriptors: Sequence[int] = (), table: int | None = None) -> None:
        """Append any head value to the avail ring (visible at the next publish).

        ``descriptors`` (from alloc_descriptors) and ``table`` (from the allocator) are freed
        when the device returns ``head``; pass nothing for a head the device must not return.
        """
        if descriptors:
            self._chains[head] = _Chain(list(descriptors), table)
        self._push(head)

    def release(self, descriptors: Sequence[int], head: int | None = None) -> None:
        """Give back a hand-built chain the device will never return (and forget ``head``)."""
        if head is not None:
            self._chains.pop(head, None)
        self._free.extend(descriptors)

    def set_avail_idx(self, value: int) -> None:
        """Store any value in ``avail.idx`` (one 16-bit store), e.g. one running far ahead."""
        self._avail_idx16[0] = value & 0xFFFF
        self.avail_idx = self.published_idx = value & 0xFFFF
