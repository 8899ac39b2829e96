"""Guest memory as the frontend hands it over: a table of shared-memory regions.

Each region arrives as (guest_phys_addr, memory_size, userspace_addr, mmap_offset) plus an fd.
It is mapped MAP_SHARED from offset 0 with length mmap_offset + memory_size (the offset need not
be page aligned), and the fd is closed. Two translations are needed:

* guest-physical -> (region, offset): for descriptor buffers and indirect tables;
* frontend-virtual (QVA) -> (region, offset): for the three vring addresses of SET_VRING_ADDR.

"offset" is always an offset into the region's mapping (so it already includes mmap_offset).
A buffer may span two adjacent regions: `translate` splits it into pieces. Anything that does
not translate raises GuestError: the guest is untrusted, no access leaves the table.

The same class is used by the supervisor and by the workers, which map the same fds.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass, field

from vblk.errors import FrontendProtocolError, GuestError
from vblk.vhost_user.messages import MemRegion

log = logging.getLogger(__name__)


@dataclass(slots=True)
class MappedRegion:
    desc: MemRegion
    mm: mmap.mmap
    view: memoryview = field(repr=False)
    address: int = 0               # where the mapping starts in this process (for C calls)

    @property
    def gpa(self) -> int:
        return self.desc.guest_phys_addr

    @property
    def size(self) -> int:
        return self.desc.memory_size

    @property
    def base(self) -> int:
        """Offset of the region's first byte within the mapping."""
        return self.desc.mmap_offset


def check_table(regions: list[MemRegion]) -> None:
    """Syntax and overlap checks on a memory table (raises FrontendProtocolError)."""
    for r in regions:
        r.validate()
    for key in ("guest_phys_addr", "userspace_addr"):
        spans = sorted((getattr(r, key), getattr(r, key) + r.memory_size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise FrontendProtocolError(f"memory regions overlap in {key}")


def map_region(desc: MemRegion, fd: int, readonly: bool = False) -> MappedRegion:
    """Map one region from its fd (the fd stays open; the caller closes it)."""
    length = desc.mmap_offset + desc.memory_size
    try:
        st = os.fstat(fd)
        if st.st_size and st.st_size < length:
            raise FrontendProtocolError(
                f"memory region fd holds {st.st_size} bytes, region needs {length}")
        prot = mmap.PROT_READ | (0 if readonly else mmap.PROT_WRITE)
        mm = mmap.mmap(fd, length, mmap.MAP_SHARED, prot)
    except (OSError, ValueError, OverflowError) as exc:
        raise FrontendProtocolError(f"cannot map memory region {desc}: {exc}") from exc
    address = 0
    if not readonly:            # the anchor is dropped at once: it must not pin the mapping
        anchor = ctypes.c_char.from_buffer(mm)
        address = ctypes.addressof(anchor)
        del anchor
    return MappedRegion(desc, mm, memoryview(mm), address)


class GuestMemory:
    """An immutable memory table; a new table is a new GuestMemory."""

    def __init__(self, regions: list[MappedRegion], generation: int = 0) -> None:
        self.regions = regions
        self.generation = generation
        self._last = 0                 # the region the last translation found
        # (first guest-physical address, end, mapping offset minus gpa) of each region: what
        # ``locate`` reads per buffer, without the attribute chains
        self._spans = [(r.desc.guest_phys_addr, r.desc.guest_phys_addr + r.desc.memory_size,
                        r.desc.mmap_offset - r.desc.guest_phys_addr) for r in regions]

    @classmethod
    def empty(cls) -> GuestMemory:
        return cls([], 0)

    @classmethod
    def from_fds(cls, descs: list[MemRegion], fds: list[int], generation: int = 0) -> GuestMemory:
        check_table(descs)
        mapped: list[MappedRegion] = []
        try:
            for desc, fd in zip(descs, fds, strict=True):
                mapped.append(map_region(desc, fd))
        except BaseException:
            for r in mapped:
                _unmap(r)
            raise
        return cls(mapped, generation)

    def close(self) -> None:
        for r in self.regions:
            _unmap(r)
        self.regions = []
        self._spans = []

    # -- translation ---------------------------------------------------------------------
    def _find_gpa(self, gpa: int) -> int:
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.gpa + r.size:
                return i
        raise GuestError(f"guest address {gpa:#x} is outside guest memory")

    def translate(self, gpa: int, length: int) -> list[tuple[int, int, int]]:
        """Split [gpa, gpa+length) into (region index, mapping offset, length) pieces."""
        where = self.locate(gpa, length)          # the common case: one region holds it
        if where is not None:
            return [(where[0], where[1], length)]
        pieces = []
        while length > 0:
            i = self._last = self._find_gpa(gpa)
            r = self.regions[i]
            n = min(length, r.gpa + r.size - gpa)
            pieces.append((i, r.base + gpa - r.gpa, n))
            gpa += n
            length -= n
        return pieces

    def locate(self, gpa: int, length: int) -> tuple[int, int] | None:
        """(region index, mapping offset) of [gpa, gpa+length) when one region holds all of
        it, else None (outside guest memory, across regions, or empty): the fast path's
        question; anything it refuses goes through ``translate``, which says why."""
        if length <= 0:
            return None
        spans, last = self._spans, self._last
        if last < len(spans):                     # the region the last lookup found
            lo, hi, shift = spans[last]
            if lo <= gpa and gpa + length <= hi:
                return last, gpa + shift
        for i, (lo, hi, shift) in enumerate(spans):
            if lo <= gpa and gpa + length <= hi:
                self._last = i
                return i, gpa + shift
        return None

    def translate_qva(self, qva: int, length: int) -> tuple[int, int]:
        """A frontend-virtual range that must lie inside one region -> (region, offset)."""
        for i, r in enumerate(self.regions):
            ua = r.desc.userspace_addr
            if ua <= qva and qva + length <= ua + r.size:
                return i, r.base + qva - ua
        raise GuestError(f"ring address {qva:#x}+{length} is not inside one memory region")

    def read(self, gpa: int, length: int) -> bytes:
        pieces = self.translate(gpa, length)
        if len(pieces) == 1:
            i, off, n = pieces[0]
            return self.regions[i].view[off:off + n].tobytes()
        return b"".join(self.regions[i].view[off:off + n].tobytes() for i, off, n in pieces)

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for i, off, n in self.translate(gpa, len(data)):
            self.regions[i].view[off:off + n] = data[pos:pos + n]
            pos += n

    def iovecs(self, pieces: list[tuple[int, int, int]]) -> list[memoryview]:
        return [self.regions[i].view[off:off + n] for i, off, n in pieces]

    def gpa_of(self, region: int, offset: int) -> int:
        """The guest-physical address of ``offset`` in region ``region``'s mapping."""
        d = self.regions[region].desc
        return d.guest_phys_addr + offset - d.mmap_offset

    def addresses(self, pieces: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
        """(address, length) of each piece in this process, for a C library's iovecs. Valid
        while this table is mapped -- which the data path keeps true for every request in
        flight (a table changes only when none is)."""
        regions = self.regions
        return [(regions[i].address + off, n) for i, off, n in pieces]


def _unmap(r: MappedRegion) -> None:
    try:
        r.view.release()
        r.mm.close()
    except BufferError:
        # A slice of the mapping is still alive somewhere; the mapping goes when it does.
        log.warning("event=unmap_deferred gpa=%#x reason=views_alive", r.gpa)
