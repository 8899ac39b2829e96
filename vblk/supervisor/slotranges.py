"""Which ranges of the shared slot area are free: one contiguous range per blocking disk.

Theory of operation
-------------------
The slot area (one memfd, vblk.ipc) is sized once, when the supervisor starts, for a
capacity: the slots of the config's disks, and -- with a host control socket, where ``vblk
disk add`` can bring more -- room for the disks added later (``slot-capacity``, see
vblk.hostconfig). Pages of the memfd that no slot has used are never touched, so the room
costs address space, not memory.

Each blocking disk takes ``slots`` contiguous slots (its SlotShare, vblk.supervisor.disks);
a removed disk gives its range back. ``SlotRanges`` keeps the free ranges sorted by base and
merged with their neighbours, and ``take`` picks the best fit -- the smallest free range that
holds the disk, the lowest one of equal size -- so a disk added after another of the same
size was removed gets exactly the range the removed one had, and one large hole is not cut up
while a small one would do. ``fits`` answers, without taking anything, whether ``take``
would: an add is checked whole before anything is touched.

Pure: no I/O, no slots, numbers only.
"""
from __future__ import annotations


class SlotRanges:
    """The free ranges of ``capacity`` slots, all free to begin with."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity {capacity} is negative")
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)] if capacity else []   # (base, count)

    @property
    def free_slots(self) -> int:
        return sum(count for _, count in self.free)

    @property
    def largest(self) -> int:
        """The most slots one disk can take now."""
        return max((count for _, count in self.free), default=0)

    def fits(self, count: int) -> bool:
        return 0 < count <= self.largest

    def take(self, count: int) -> int:
        """The base of ``count`` contiguous slots, now taken (ValueError if none are free)."""
        candidates = [(n, base) for base, n in self.free if n >= count]
        if count <= 0 or not candidates:
            raise ValueError(f"no {count} contiguous free slots (largest free range: "
                             f"{self.largest} of {self.free_slots} free)")
        n, base = min(candidates)
        i = self.free.index((base, n))
        if n == count:
            del self.free[i]
        else:
            self.free[i] = (base + count, n - count)
        return base

    def give_back(self, base: int, count: int) -> None:
        """Free ``count`` slots from ``base`` (ValueError if any of them is free already or
        outside the area: a range is given back once, as it was taken)."""
        end = base + count
        if count <= 0 or base < 0 or end > self.capacity:
            raise ValueError(f"slots {base}..{end} are not a range of the area "
                             f"(0..{self.capacity})")
        i = 0
        while i < len(self.free) and self.free[i][0] < base:
            i += 1
        before = self.free[i - 1] if i > 0 else None
        after = self.free[i] if i < len(self.free) else None
        if (before is not None and sum(before) > base) or (after is not None and after[0] < end):
            raise ValueError(f"slots {base}..{end} are free already")
        if after is not None and after[0] == end:          # merge with the range above
            end = sum(after)
            del self.free[i]
        if before is not None and sum(before) == base:      # and with the one below
            base = before[0]
            i -= 1
            del self.free[i]
        self.free.insert(i, (base, end - base))
