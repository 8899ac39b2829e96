"""The backing conformance suite: every kind of backing (vblk.backing) passes the same tests.

Each test runs once per kind -- a regular file, a block device (a loop device over a file),
memory, a Ceph RBD image on the throwaway test cluster -- through a ``Kind`` that opens a
window of a fresh store filled with known bytes and can read the whole store back (to see that
nothing outside the window changed) and grow it. A new kind joins by adding one ``Kind``.

Locks differ in one way, declared by ``window_locks``: files, block devices and memory lock
the window's bytes (disjoint windows of one store can have a writer each, readers share and
keep writers out); an RBD image has one exclusive lock for the whole image, held by its one
writer (any second writer is refused; read-only opens take no lock).

What a backing promises (vblk.backing.base): offsets count from the window's start; every
byte moves or OSError; nothing outside the window is ever touched, and a request reaching out
of it is refused whole; write-zeroes reads back as zeroes; discard either succeeds or says
EOPNOTSUPP; a read-only window refuses writes; read_cached fills everything or promises
nothing; submitted operations come back through the completion eventfd with their errno; a
second writer on an overlapping window is refused; close releases the window.
"""
from __future__ import annotations

import errno
import os
import random
import select
import subprocess
from contextlib import ExitStack

import pytest

from vblk.backing import Backing, open_backing
from vblk.backing.memory import MemoryBacking, drop_store, memory_store
from vblk.errors import ConfigError, ResizeRefused
from vblk.ipc import Op
from vblk.options import DiskOptions
from vblk.testing.loopdev import loop_device

MiB = 1 << 20
STORE = 4 * MiB


def pattern(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


class Kind:
    """One kind of backing under test: opens windows of one fresh store."""
    name = ""
    window_locks = True

    def __init__(self, request, tmp_path, stack: ExitStack) -> None:
        self.tmp_path, self.stack = tmp_path, stack

    def open(self, *, start: int = 0, size: int | None = None, readonly: bool = False,
             lbs: int = 512) -> Backing:
        raise NotImplementedError

    def raw(self) -> bytes:
        """Every byte of the store, window or not."""
        raise NotImplementedError

    def grow(self, size: int) -> None:
        raise NotImplementedError


class FileKind(Kind):
    name = "regular file"

    def __init__(self, request, tmp_path, stack) -> None:
        super().__init__(request, tmp_path, stack)
        self.path = tmp_path / "store.img"
        self.path.write_bytes(pattern(STORE))
        self.target = str(self.path)

    def open(self, *, start=0, size=None, readonly=False, lbs=512) -> Backing:
        return open_backing(DiskOptions(self.target, readonly=readonly, logical_block_size=lbs,
                                        range_start=start, range_size=size))

    def raw(self) -> bytes:
        return self.path.read_bytes()

    def grow(self, size: int) -> None:
        os.truncate(self.path, size)


class BlockDeviceKind(FileKind):
    name = "block device"

    def __init__(self, request, tmp_path, stack) -> None:
        super().__init__(request, tmp_path, stack)
        self.target = stack.enter_context(loop_device(self.path))

    def raw(self) -> bytes:
        with open(self.target, "rb") as f:          # through the device, as a guest sees it
            return f.read()

    def grow(self, size: int) -> None:
        os.truncate(self.path, size)
        subprocess.run(["losetup", "-c", self.target], check=True)


class MemoryKind(Kind):
    name = "memory"

    def __init__(self, request, tmp_path, stack) -> None:
        super().__init__(request, tmp_path, stack)
        self.store_name = f"conformance-{id(self)}"
        memory_store(self.store_name, STORE).data[:] = pattern(STORE)
        stack.callback(drop_store, self.store_name)

    def open(self, *, start=0, size=None, readonly=False, lbs=512) -> Backing:
        return MemoryBacking.open(self.store_name, start=start, range_size=size,
                                  readonly=readonly, logical_block_size=lbs)

    def raw(self) -> bytes:
        return bytes(memory_store(self.store_name).data)

    def grow(self, size: int) -> None:
        data = memory_store(self.store_name).data
        data.extend(bytes(size - len(data)))


class RbdKind(Kind):
    name = "rbd image"
    window_locks = False

    def __init__(self, request, tmp_path, stack) -> None:
        super().__init__(request, tmp_path, stack)
        self.cluster = request.getfixturevalue("ceph_cluster")
        self.image = request.getfixturevalue("rbd_image")(STORE)    # removed after the test
        self.cluster.remove_image(self.image)
        self.cluster.import_image(self.image, pattern(STORE))        # Ceph's default features

    def open(self, *, start=0, size=None, readonly=False, lbs=512) -> Backing:
        return open_backing(DiskOptions(f"rbd:rbd/{self.image}:conf={self.cluster.conf}",
                                        readonly=readonly, logical_block_size=lbs,
                                        range_start=start, range_size=size))

    def raw(self) -> bytes:
        return self.cluster.export(self.image)

    def grow(self, size: int) -> None:
        self.cluster.rbd("resize", "--size", f"{size}B", f"rbd/{self.image}")


KINDS = [FileKind, BlockDeviceKind, MemoryKind, RbdKind]


def _kind(request, tmp_path):
    with ExitStack() as stack:
        yield request.param(request, tmp_path, stack)


kind = pytest.fixture(params=KINDS, ids=[k.name.replace(" ", "-") for k in KINDS])(_kind)
windowed_kind = pytest.fixture(params=[k for k in KINDS if k.window_locks],
                               ids=[k.name.replace(" ", "-") for k in KINDS if k.window_locks])(_kind)


@pytest.fixture
def window(kind):
    """A writable window of 1 MiB starting 1 MiB into the store, and the kind."""
    with kind.open(start=MiB, size=MiB) as b:
        yield b, kind


def views(data: bytearray, *cuts: int) -> list[memoryview]:
    """``data`` as iovecs cut at ``cuts`` (uneven on purpose)."""
    mv = memoryview(data)
    edges = [0, *cuts, len(data)]
    return [mv[a:b] for a, b in zip(edges, edges[1:])]


# -- what the window shows ---------------------------------------------------------------------

def test_info_describes_the_window(window):
    b, kind = window
    assert b.info.kind == kind.name
    assert (b.info.start, b.info.size, b.info.ranged) == (MiB, MiB, True)
    assert b.info.image_size == STORE and len(b.info.serial) == 20
    assert b.reach == MiB


def test_reads_see_the_store_from_the_window_start(window):
    b, kind = window
    buf = bytearray(8192 + 1536)
    b.readv(4096, views(buf, 100, 4096, 4097))
    assert bytes(buf) == kind.raw()[MiB + 4096:MiB + 4096 + len(buf)]


def test_writes_land_at_the_window_offset_and_nowhere_else(window):
    b, kind = window
    before = kind.raw()
    data = bytearray(pattern(12288, seed=2))
    b.writev(MiB - 12288, views(data, 1, 512, 7000))        # up to the window's last byte
    b.flush()
    after = kind.raw()
    assert after[2 * MiB - 12288:2 * MiB] == data
    assert after[:2 * MiB - 12288] == before[:2 * MiB - 12288]
    assert after[2 * MiB:] == before[2 * MiB:]
    back = bytearray(12288)
    b.readv(MiB - 12288, [memoryview(back)])
    assert back == data


@pytest.mark.parametrize("offset, length", [(MiB - 512, 1024), (MiB, 512), (-512, 512),
                                            (2 * MiB, 4096)])
def test_anything_reaching_outside_the_window_is_refused_and_touches_nothing(window, offset,
                                                                             length):
    b, kind = window
    before = kind.raw()
    buf = bytearray(length)
    for call in (lambda: b.readv(offset, [memoryview(buf)]),
                 lambda: b.writev(offset, [memoryview(bytearray(length))]),
                 lambda: b.discard(offset, length),
                 lambda: b.write_zeroes(offset, length, False),
                 lambda: b.write_zeroes(offset, length, True)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EINVAL
    assert not b.read_cached(offset, [memoryview(buf)])
    assert kind.raw() == before


def test_write_zeroes_reads_back_as_zeroes_with_or_without_unmap(window):
    b, kind = window
    before = kind.raw()
    b.write_zeroes(8192, 65536, False)
    b.write_zeroes(131072, 65536 + 4096, True)
    b.flush()
    after = kind.raw()
    assert after[MiB + 8192:MiB + 8192 + 65536] == bytes(65536)
    assert after[MiB + 131072:MiB + 131072 + 69632] == bytes(69632)
    assert after[:MiB + 8192] == before[:MiB + 8192]
    assert after[MiB + 8192 + 65536:MiB + 131072] == before[MiB + 8192 + 65536:MiB + 131072]
    assert after[MiB + 131072 + 69632:] == before[MiB + 131072 + 69632:]


def test_discard_succeeds_or_says_unsupported_and_keeps_to_its_range(window):
    b, kind = window
    before = kind.raw()
    try:
        b.discard(65536, 131072)
    except OSError as exc:
        assert exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY)
    after = kind.raw()
    assert after[:MiB + 65536] == before[:MiB + 65536]
    assert after[MiB + 65536 + 131072:] == before[MiB + 65536 + 131072:]


def test_flush_succeeds_and_data_survives_reopening(kind):
    data = pattern(4096, seed=3)
    with kind.open(start=MiB, size=MiB) as b:
        b.writev(0, [memoryview(bytearray(data))])
        b.flush()
    with kind.open(start=MiB, size=MiB) as again:
        back = bytearray(4096)
        again.readv(0, [memoryview(back)])
    assert back == data


def test_read_cached_fills_everything_or_promises_nothing(window):
    b, kind = window
    want = kind.raw()[MiB:MiB + 8192]
    warm = bytearray(8192)
    b.readv(0, [memoryview(warm)])                       # the page cache holds it now
    for _ in range(3):
        buf = bytearray(b"\xee" * 8192)
        if b.read_cached(0, views(buf, 512, 4096)):
            assert buf == want
            break
    else:
        assert not b.caches, "a backing that caches never served a warm read"


# -- read-only windows ---------------------------------------------------------------------------

def test_a_read_only_window_reads_and_refuses_every_write(kind):
    before = kind.raw()
    with kind.open(start=MiB, size=MiB, readonly=True) as b:
        assert b.info.readonly
        buf = bytearray(4096)
        b.readv(0, [memoryview(buf)])
        assert buf == before[MiB:MiB + 4096]
        for call in (lambda: b.writev(0, [memoryview(bytearray(4096))]),
                     lambda: b.discard(0, 4096), lambda: b.write_zeroes(0, 4096, False)):
            with pytest.raises(OSError):
                call()
        b.flush()                                          # nothing to make durable: fine
    assert kind.raw() == before


# -- submitted operations --------------------------------------------------------------------------

def wait_readable(fd: int, timeout: float = 10.0) -> None:
    assert select.select([fd], [], [], timeout)[0], "the completion fd never became readable"


def test_submitted_operations_come_back_on_the_completion_fd(window):
    b, kind = window
    data = bytearray(pattern(8192, seed=4))
    back = bytearray(8192)
    b.submit(1, Op.WRITE, 4096, views(data, 3000))
    b.submit(2, Op.FLUSH)
    b.submit(3, Op.WRITE_ZEROES, 65536, length=4096)
    b.submit(4, Op.WRITE, 2 * MiB, [memoryview(bytearray(512))])   # outside: its errno
    done: dict[int, int] = {}
    while len(done) < 4:
        wait_readable(b.completion_fd)
        done.update(b.reap())
    assert done == {1: 0, 2: 0, 3: 0, 4: errno.EINVAL}
    b.submit(5, Op.READ, 4096, views(back, 100))
    got: list = []
    while not got:           # a wake-up may come with nothing (the fd was signalled for 1..4)
        wait_readable(b.completion_fd)
        got = b.reap()
    assert got == [(5, 0)] and back == data
    assert b.reap() == []
    raw = kind.raw()
    assert raw[MiB + 65536:MiB + 65536 + 4096] == bytes(4096)


# -- windows and locks -----------------------------------------------------------------------------

def test_a_second_writer_on_an_overlapping_window_is_refused(window):
    b, kind = window
    with pytest.raises(ConfigError):
        kind.open(start=MiB + 4096, size=MiB)
    with pytest.raises(ConfigError):
        kind.open(start=MiB, size=4096, readonly=True)
    if kind.window_locks:
        with kind.open(start=2 * MiB, size=MiB) as neighbour:  # disjoint: fine
            assert neighbour.info.start == 2 * MiB
    else:                                                  # one lock for the whole store
        with pytest.raises(ConfigError, match="in use"):
            kind.open(start=2 * MiB, size=MiB)


def test_closing_releases_the_window_and_is_idempotent(kind):
    b = kind.open(start=0, size=MiB)
    b.close()
    b.close()
    with kind.open(start=0, size=MiB) as again:
        assert again.info.size == MiB


def test_readers_share_a_window(kind):
    with kind.open(start=0, size=MiB, readonly=True), kind.open(start=0, size=MiB, readonly=True):
        if kind.window_locks:
            with pytest.raises(ConfigError):
                kind.open(start=0, size=MiB)


# -- size -----------------------------------------------------------------------------------------

def test_resize_limit_is_the_range_or_what_the_store_holds_now(kind):
    with kind.open(start=MiB, size=MiB) as ranged:
        assert ranged.resize_limit()[0] == MiB
    with kind.open(start=MiB, lbs=4096) as open_ended:
        assert open_ended.info.size == STORE - MiB and not open_ended.info.ranged
        assert open_ended.resize_limit()[0] == STORE - MiB
        kind.grow(STORE + 3 * MiB + 1000)
        limit, what = open_ended.resize_limit()
        assert limit == STORE + 2 * MiB and what
        open_ended.resize_window(STORE - MiB, STORE + 2 * MiB)
        # an open-ended window reaches whatever the store grows to
        open_ended.writev(STORE + MiB, [memoryview(bytearray(b"z" * 4096))])
        assert kind.raw()[STORE + 2 * MiB:STORE + 2 * MiB + 4096] == b"z" * 4096


def test_growing_a_window_over_another_writer_is_refused(windowed_kind):
    kind = windowed_kind
    with kind.open(start=0, size=MiB) as b, kind.open(start=2 * MiB, size=MiB):
        b.resize_window(MiB, 2 * MiB)                    # up to the neighbour: fine
        with pytest.raises(ResizeRefused):
            b.resize_window(2 * MiB, 3 * MiB)
