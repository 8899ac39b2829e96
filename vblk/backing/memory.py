"""A disk in memory: the backing of fast in-process tests.

Stores are named and live in this process (``MemoryStore``); a ``MemoryBacking`` is one
window of one store, and windows lock the way file windows do (exclusive for a writer, shared
for readers, ConfigError on overlap), so the conformance suite holds this backing to the
same rules as a file. Its calls never block (``blocking = False``): vblk serves it with the
in-process engine, and its submitted operations complete at once (the default of
vblk.backing.base). Discard and write-zeroes both zero the bytes. ``flushes`` counts the
flushes that reached the store, so a test can see write-through at work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vblk.backing.base import Backing, BackingInfo
from vblk.errors import ConfigError, ResizeRefused
from vblk.virtio.constants import BLK_ID_BYTES


@dataclass
class MemoryStore:
    data: bytearray
    windows: list[tuple[int, int, bool, object]] = field(default_factory=list)  # start, end, ro, owner
    flushes: int = 0

    def _conflict(self, start: int, end: int, readonly: bool, owner: object) -> bool:
        return any(s < end and start < e and not (ro and readonly) and o is not owner
                   for s, e, ro, o in self.windows)

    def lock(self, start: int, end: int, readonly: bool, owner: object) -> bool:
        if self._conflict(start, end, readonly, owner):
            return False
        self.windows.append((start, end, readonly, owner))
        return True

    def unlock(self, owner: object) -> None:
        self.windows = [w for w in self.windows if w[3] is not owner]


_STORES: dict[str, MemoryStore] = {}


def memory_store(name: str, size: int | None = None) -> MemoryStore:
    """The store called ``name``, made with ``size`` zero bytes if it does not exist yet."""
    store = _STORES.get(name)
    if store is None:
        if size is None:
            raise ConfigError(f"memory store {name} does not exist")
        store = _STORES[name] = MemoryStore(bytearray(size))
    return store


def drop_store(name: str) -> None:
    _STORES.pop(name, None)


class MemoryBacking(Backing):
    blocking = False

    def __init__(self, info: BackingInfo, store: MemoryStore, caches: bool = False) -> None:
        super().__init__(info)
        self.store = store
        self.start = info.start
        self.caches = caches                 # let the data path serve reads inline
        if not store.lock(info.start, info.start + info.size, info.readonly, self):
            raise ConfigError(f"memory:{info.path} bytes {info.start}..{info.end} are in use")
        self._open = True

    @classmethod
    def open(cls, name: str, *, size: int | None = None, logical_block_size: int = 512,
             physical_block_size: int | None = None, start: int = 0,
             range_size: int | None = None, readonly: bool = False, writeback: bool = False,
             serial: bytes = b"VBLK-MEMORY".ljust(BLK_ID_BYTES, b"\0"),
             caches: bool = False) -> MemoryBacking:
        """A window of store ``name`` (made with ``size`` bytes if new): ``range_size``
        bytes from ``start``, or everything after it in whole logical blocks."""
        store = memory_store(name, size)
        lbs = logical_block_size
        if range_size is None:
            window = (len(store.data) - start) // lbs * lbs
        else:
            window = range_size
        if start < 0 or window <= 0 or start + window > len(store.data):
            raise ConfigError(f"memory:{name} has no window of {window} bytes at {start}")
        info = BackingInfo(path=name, kind="memory", readonly=readonly, writeback=writeback,
                           nocache=False, logical_block_size=lbs,
                           physical_block_size=physical_block_size or lbs, start=start,
                           size=window, image_size=len(store.data), serial=serial,
                           ranged=range_size is not None)
        return cls(info, store, caches)

    def _span(self, offset: int, length: int) -> slice:
        at = self.start + offset
        if at + length > len(self.store.data):
            raise OSError(5, "unexpected end of the memory store")   # EIO, as a short file
        return slice(at, at + length)

    def _readv(self, offset: int, bufs: list[memoryview]) -> None:
        data = self.store.data
        at = self._span(offset, sum(map(len, bufs))).start
        for b in bufs:
            b[:] = data[at:at + len(b)]
            at += len(b)

    def _writev(self, offset: int, bufs: list[memoryview]) -> None:
        data = self.store.data
        at = self._span(offset, sum(map(len, bufs))).start
        for b in bufs:
            data[at:at + len(b)] = b
            at += len(b)

    def _flush(self) -> None:
        self.store.flushes += 1

    def _discard(self, offset: int, length: int) -> None:
        self.store.data[self._span(offset, length)] = bytes(length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.store.data[self._span(offset, length)] = bytes(length)

    def read_cached(self, offset: int, bufs: list[memoryview]) -> bool:
        if not self.caches:
            return False
        try:
            self.readv(offset, bufs)
        except OSError:
            return False
        return True

    def resize_limit(self) -> tuple[int, str]:
        info = self.info
        if info.ranged:
            return info.size, f"the range's size ({info.size} bytes)"
        lbs = info.logical_block_size
        limit = max(0, len(self.store.data) - info.start) // lbs * lbs
        return limit, f"what the memory store {info.path} holds now ({limit} bytes)"

    def release_window(self) -> None:
        self.store.unlock(self)

    def take_window(self) -> None:
        if not self.store.lock(self.start, self.start + self.info.size, self.info.readonly, self):
            raise ConfigError(f"memory:{self.info.path} bytes {self.info.start}..{self.info.end} "
                              f"are in use")

    def resize_window(self, old_size: int, new_size: int) -> None:
        self.store.unlock(self)
        if not self.store.lock(self.start, self.start + new_size, self.info.readonly, self):
            self.store.lock(self.start, self.start + old_size, self.info.readonly, self)
            raise ResizeRefused(f"memory:{self.info.path} bytes {self.start + old_size}.."
                                f"{self.start + new_size} are in use")

    def close(self) -> None:
        super().close()
        if self._open:
            self._open = False
            self.store.unlock(self)
