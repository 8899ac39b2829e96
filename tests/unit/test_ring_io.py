"""Buffered writes through an io_uring (vblk.uring, vblk.supervisor.ringio), against a real
file and a real memfd as guest memory: what the ring writes lands in the file, what it cannot
finish goes to the workers whole, and only a write-back write is ever taken."""
from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import shutil
import tempfile

import pytest

from vblk.backing.local import open_local
from vblk.ipc import FLAG_SYNC, Op
from vblk.memory import GuestMemory
from vblk.options import parse_acrn
from vblk.supervisor.disks import SlotShare
from vblk.supervisor.ringio import RingIO, ring_for
from vblk.uring import Ring, available
from vblk.vhost_user.messages import MemRegion

RAM = 1 << 20
WRITE, READ, FLUSH = int(Op.WRITE), int(Op.READ), int(Op.FLUSH)


def test_this_machine_can_have_a_ring():
    """The tests here need io_uring (x86-64, a kernel that allows it): they fail, not skip,
    where it is missing -- vblk would quietly fall back to the workers there."""
    assert available() is None, available()
    Ring(2).close()                          # OSError if the kernel refuses io_uring


def test_the_ring_runs_its_task_work_cooperatively_where_the_kernel_can():
    """IORING_SETUP_COOP_TASKRUN (Linux 5.19) took a third of the supervisor's CPU per
    buffered write away (vblk.uring): a ring set up without it still works, so only this
    notices its loss. Every other test here runs on such a ring."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    ring = Ring(2)
    try:
        assert ring.cooperative == ((major, minor) >= (5, 19))
    finally:
        ring.close()


@pytest.fixture
def guest():
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    memory = GuestMemory.from_fds([MemRegion(0, RAM, 0x7000_0000, 0)], [fd], 1)
    ram = mmap.mmap(fd, RAM)
    yield memory, ram
    ram.close()
    memory.close()
    os.close(fd)


@pytest.fixture
def backing(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    with open_local(parse_acrn(f"{path},writeback,range=0/1024")) as b:
        assert b.reach == 512 * 1024
        yield b


@contextlib.contextmanager
def ring_over(backing, memory, slots):
    """``ring_for(backing, slots)`` over ``memory``, closed at the end."""
    rw = ring_for(backing, slots)
    assert isinstance(rw, RingIO)
    rw.set_memory(memory)
    try:
        yield rw
    finally:
        rw.close()


def wait(ring, timeout=5.0):
    """Every completion until one arrives (the eventfd says when)."""
    assert select.select([ring.completion_fd], [], [], timeout)[0], "no completion came"
    return ring.reap()


def collect(rw, n):
    """Reap until ``n`` requests are finished or handed back: (finished, handed back)."""
    done, redo = [], []
    while len(done) + len(redo) < n:
        finished, more = wait(rw)
        done += finished
        redo += more
    return done, redo


def test_ring_io_guest_buffers_to_the_file_and_signals_its_eventfd(tmp_path, guest):
    memory, ram = guest
    ram[4096:8192] = b"A" * 4096
    ram[65536:65536 + 512] = b"B" * 512
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    ring = Ring(8)
    try:
        base = memory.addresses([(0, 0, 1)])[0][0]
        ring.writev(7, fd, 1024, [(base + 4096, 4096), (base + 65536, 512)])
        ring.writev(8, 12345, 0, [(base, 512)])              # not an fd: -EBADF
        ring.submit()
        got = []
        while len(got) < 2:
            assert select.select([ring.event_fd], [], [], 5)[0]
            got += ring.completions()
        assert sorted(got) == [(7, 4608), (8, -errno.EBADF)]
        assert os.pread(fd, 4608, 1024) == b"A" * 4096 + b"B" * 512
        assert ring.space() == 8
    finally:
        ring.close()
        os.close(fd)


def test_a_full_ring_refuses_more():
    ring = Ring(2)
    try:
        r, w = os.pipe()
        ring.writev(1, w, 0, [])
        ring.writev(2, w, 0, [])
        assert ring.space() == 0
        with pytest.raises(OSError) as exc:
            ring.writev(3, w, 0, [])
        assert exc.value.errno == errno.EBUSY
    finally:
        ring.close()
        os.close(r)
        os.close(w)


def test_only_reads_and_writes_of_the_current_table_inside_the_window_are_taken(backing,
                                                                                 guest):
    memory, _ = guest
    with ring_over(backing, memory, 4) as rw:
        piece = [(0, 0, 4096)]
        assert not rw.take(0, FLUSH, 0, 0, 0, [], 1)
        assert not rw.take(0, WRITE, 0, 0, 4096, piece, 2)             # another table
        assert not rw.take(0, READ, 0, 0, 4096, piece, 2)
        assert not rw.take(0, WRITE, 0, backing.reach - 512, 4096, piece, 1)   # past the end
        assert rw.running == {}
        room = rw.ring.entries - 1                # one entry is kept for a chain's fdatasync
        for slot in range(room):
            assert rw.take(slot, WRITE, 0, 512 * slot, 512, [(0, 0, 512)], 1)
        assert not rw.take(room, WRITE, 0, 0, 4096, piece, 1)          # no room: workers
        rw.submit()
        done, redo = collect(rw, room)
        assert redo == [] and sorted(done) == [(s, 0, 0) for s in range(room)]


def test_a_write_the_ring_could_not_finish_goes_to_the_workers_whole(backing, guest):
    memory, _ = guest
    with ring_over(backing, memory, 2) as rw:
        rw.backing = type("Gone", (), {"fd": 999_999, "start": 0,
                                       "check_window": backing.check_window})()
        assert rw.take(1, WRITE, 0, 512, 1024, [(0, 0, 1024)], 1)
        rw.submit()
        finished, redo = wait(rw)
        assert finished == [] and redo == [(1, WRITE, 0, 512, 1024, [(0, 0, 1024)], 1)]


class Pool:
    def __init__(self):
        self.posted, self.flushes, self.memory = [], 0, None
        self.completion_fd = -1

    def post(self, *request):
        self.posted.append(request)

    def flush(self):
        self.flushes += 1

    def set_memory(self, memory, regions, fds, disk):
        self.memory = memory


def test_a_share_sends_writes_to_its_ring_and_the_rest_to_the_pool(backing, guest):
    memory, ram = guest
    ram[0:4096] = b"W" * 4096
    pool = Pool()
    share = SlotShare(pool, 3, 100, 8, ring_for(backing, 8))
    try:
        share.set_memory(memory, [], [])
        assert pool.memory is memory and share.ring.memory is memory
        share.post(0, WRITE, 0, 8192, 4096, [(0, 0, 4096)], 1)
        share.post(1, WRITE, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
        share.post(2, WRITE, 0, 4096, 4096, [(0, 0, 4096)], 1)
        share.post(3, READ, 0, 0, 4096, [(0, 65536, 4096)], 1)      # a read the cache missed
        share.post(4, FLUSH, 0, 0, 0, [], 1)
        share.flush()
        assert [p[0] for p in pool.posted] == [104]
        assert all(p[-1] == 3 for p in pool.posted)
        assert sorted(share.ring.running) == [0, 1, 2, 3]
        assert share.ring.writes == 3
        done = []
        while len(done) < 4:
            assert select.select([share.ring.completion_fd], [], [], 5)[0]
            done += share.reap()
        assert sorted(done) == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 0, 0)]
        assert share.ring.writes == 0
        assert os.pread(backing.fd, 4096, 8192) == os.pread(backing.fd, 4096, 0) == b"W" * 4096
        assert share.ring.running == {}
    finally:
        share.close()


class FakeRing:
    """Records what RingIO queues, and hands back the completions a test chooses."""

    def __init__(self) -> None:
        self.event_fd, self.entries, self.queued, self.cqes = -1, 64, [], []

    def space(self):
        return self.entries - len(self.queued)

    def writev(self, tag, fd, offset, iov, link=False):
        self.queued.append(("writev", tag, link))

    def readv(self, tag, fd, offset, iov):
        self.queued.append(("readv", tag, False))

    def fdatasync(self, tag, fd):
        self.queued.append(("fdatasync", tag))

    def submit(self):
        pass

    def completions(self):
        cqes, self.cqes = self.cqes, []
        return cqes


def test_durable_writes_are_one_chain_that_completes_only_when_its_fdatasync_returns_0(
        backing, guest):
    memory, _ = guest
    ring = FakeRing()
    rw = RingIO(backing, ring)
    rw.set_memory(memory)
    assert rw.take(4, WRITE, FLAG_SYNC, 4096 * 4, 4096, [(0, 0, 4096)], 1)
    assert rw.take(7, READ, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
    assert rw.take(5, WRITE, FLAG_SYNC, 4096 * 5, 4096, [(0, 0, 4096)], 1)
    assert rw.take(8, WRITE, 0, 0, 4096, [(0, 0, 4096)], 1)      # not durable: no chain
    assert rw.take(6, WRITE, FLAG_SYNC, 4096 * 6, 4096, [(0, 0, 4096)], 1)
    rw.submit()
    (_, sync_tag), = [q for q in ring.queued if q[0] == "fdatasync"]
    # the chain goes last and whole: nothing else falls inside it
    assert ring.queued == [("readv", 7, False), ("writev", 8, False),
                           ("writev", 4, True), ("writev", 5, True), ("writev", 6, True),
                           ("fdatasync", sync_tag)]
    ring.cqes = [(7, 4096), (8, 4096), (4, 4096), (5, 4096), (6, 4096)]
    assert rw.reap() == ([(7, 0, 0), (8, 0, 0)], [])   # 4-6 written, not yet durable
    assert rw.writes == 3
    ring.cqes = [(sync_tag, 0)]
    assert rw.reap() == ([(4, 0, 0), (5, 0, 0), (6, 0, 0)], [])
    assert rw.running == {} and rw.writes == 0


def test_a_chain_that_fell_short_or_whose_fdatasync_failed_goes_to_the_workers(backing,
                                                                              guest):
    memory, _ = guest
    ring = FakeRing()
    rw = RingIO(backing, ring)
    rw.set_memory(memory)
    requests = {}
    for slot in (1, 2):
        assert rw.take(slot, WRITE, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
        requests[slot] = (slot, WRITE, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
    rw.submit()
    first_sync = ring.queued[-1][1]
    for slot in (3, 4):                             # the next drain's chain
        assert rw.take(slot, WRITE, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
        requests[slot] = (slot, WRITE, FLAG_SYNC, 0, 4096, [(0, 0, 4096)], 1)
    rw.submit()
    second_sync = ring.queued[-1][1]
    assert first_sync != second_sync
    # chain 1: the first write fell short, the rest was cancelled
    ring.cqes = [(1, 512), (2, -errno.ECANCELED), (first_sync, -errno.ECANCELED)]
    assert rw.reap() == ([], [requests[1], requests[2]])
    # chain 2: every write went through, its fdatasync failed
    ring.cqes = [(3, 4096), (4, 4096), (second_sync, -errno.EIO)]
    assert rw.reap() == ([], [requests[3], requests[4]])
    assert rw.running == {} and rw.failed == set()


def test_a_real_chain_whose_fdatasync_fails_goes_to_the_workers(backing, guest):
    """On a real ring: writes into a pipe go through, the fdatasync of a pipe fails
    (EINVAL), so the chain's writes are handed back, not completed."""
    memory, _ = guest
    r, w = os.pipe()
    try:
        with ring_over(backing, memory, 4) as rw:
            rw.backing = type("Pipe", (), {"fd": w, "start": 0,
                                           "check_window": backing.check_window})()
            assert rw.take(1, WRITE, FLAG_SYNC, 0, 512, [(0, 0, 512)], 1)
            assert rw.take(2, WRITE, FLAG_SYNC, 512, 512, [(0, 0, 512)], 1)
            rw.submit()
            finished, redo = collect(rw, 2)
            assert finished == [] and [req[0] for req in redo] == [1, 2]
            assert len(os.read(r, 4096)) == 1024     # both writes ran before the fdatasync
    finally:
        os.close(r)
        os.close(w)


def test_a_read_only_disks_ring_reads_and_refuses_writes_and_none_when_turned_off(
        tmp_path, guest, monkeypatch):
    memory, ram = guest
    path = tmp_path / "disk.img"
    path.write_bytes(b"O" * 4096 + bytes((1 << 20) - 4096))
    with open_local(parse_acrn(f"{path},ro")) as ro, ring_over(ro, memory, 4) as rw:
        assert not rw.take(1, WRITE, 0, 0, 4096, [(0, 0, 4096)], 1)    # the workers refuse it
        assert rw.take(2, READ, 0, 0, 4096, [(0, 0, 4096)], 1)
        rw.submit()
        assert collect(rw, 1) == ([(2, 0, 0)], [])
        assert ram[0:4096] == b"O" * 4096
    assert path.read_bytes()[:4096] == b"O" * 4096
    with open_local(parse_acrn(f"{path},writeback")) as b:
        monkeypatch.setenv("VBLK_URING", "0")
        assert ring_for(b, 4) is None


def test_iovec_lists_of_one_short_and_longer_than_the_standing_area(tmp_path, guest):
    """One buffer goes without an iovec (IORING_OP_WRITE / _READ); each SQE's list has a
    standing place of IOVECS_KEPT; a longer one its own array."""
    from vblk.uring import IOVECS_KEPT
    memory, ram = guest
    n = IOVECS_KEPT + 6
    for k in range(n):
        ram[1024 * k:1024 * k + 512] = bytes([k % 251 + 1]) * 512     # every other 512 bytes
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    ring = Ring(4)
    try:
        base = memory.addresses([(0, 0, 1)])[0][0]
        long_list = [(base + 1024 * k, 512) for k in range(n)]
        for _ in range(3):                     # the same SQE places, used again
            ring.writev(1, fd, 0, long_list)
            ring.writev(2, fd, 512 * n, long_list[:3])
            ring.writev(3, fd, 512 * (n + 3), long_list[5:6])
            ring.submit()
            got = []
            while len(got) < 3:
                assert select.select([ring.event_fd], [], [], 5)[0]
                got += ring.completions()
            assert sorted(got) == [(1, 512 * n), (2, 1536), (3, 512)]
        want = b"".join(bytes([k % 251 + 1]) * 512 for k in range(n))
        assert os.pread(fd, 512 * (n + 4), 0) == want + want[:1536] + want[2560:3072]
        ram[0:512] = bytes(512)
        ring.readv(4, fd, 512 * (n + 3), long_list[:1])       # one buffer back in
        ring.submit()
        assert select.select([ring.event_fd], [], [], 5)[0]
        assert ring.completions() == [(4, 512)]
        assert bytes(ram[0:512]) == want[2560:3072]
    finally:
        ring.close()
        os.close(fd)


@pytest.fixture
def direct(tmp_path):
    """A nocache (O_DIRECT) disk of 1 MiB of known bytes (on /var/tmp: tmpfs has no
    O_DIRECT)."""
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="vblk-ringio-")
    path = os.path.join(d, "direct.img")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 4096)
    try:
        with open_local(parse_acrn(f"{path},nocache")) as b:
            yield b
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_o_direct_disk_reads_and_writes_on_its_ring(direct, guest):
    memory, ram = guest
    with ring_over(direct, memory, 8) as rw:
        assert rw.direct
        ram[8192:12288] = b"D" * 4096
        assert rw.take(1, READ, FLAG_SYNC, 4096, 4096, [(0, 0, 4096)], 1)    # (reads are
        assert rw.take(2, WRITE, 0, 65536, 4096, [(0, 8192, 4096)], 1)       # never chained)
        rw.submit()
        done, redo = collect(rw, 2)
        assert redo == [] and sorted(done) == [(1, 0, 0), (2, 0, 0)]
        assert ram[0:4096] == bytes(range(256)) * 16
        with open(direct.info.path, "rb") as f:           # (not through the O_DIRECT fd)
            assert os.pread(f.fileno(), 4096, 65536) == b"D" * 4096


def test_a_misaligned_o_direct_buffer_goes_to_the_workers(direct, guest):
    """O_DIRECT refuses a buffer that is not aligned (EINVAL): the worker bounces it."""
    memory, _ = guest
    with ring_over(direct, memory, 8) as rw:
        assert rw.take(3, READ, 0, 0, 4096, [(0, 100, 4096)], 1)
        rw.submit()
        finished, redo = wait(rw)
        assert finished == [] and redo == [(3, READ, 0, 0, 4096, [(0, 100, 4096)], 1)]


def test_a_read_the_page_cache_missed_comes_back_from_a_buffered_disks_ring(backing, guest):
    memory, ram = guest
    os.pwrite(backing.fd, b"R" * 4096 + b"S" * 4096, 8192)
    os.fsync(backing.fd)
    os.posix_fadvise(backing.fd, 0, 0, os.POSIX_FADV_DONTNEED)      # (a hint: may stay)
    with ring_over(backing, memory, 8) as rw:
        assert not rw.direct
        assert rw.take(1, READ, 0, 8192, 8192, [(0, 4096, 4096), (0, 0, 4096)], 1)
        assert rw.take(2, READ, 0, 12288, 4096, [(0, 16384, 4096)], 1)
        assert rw.writes == 0                  # (reads are not io-wq's copies: not crowded)
        rw.submit()
        done, redo = collect(rw, 2)
        assert redo == [] and sorted(done) == [(1, 0, 0), (2, 0, 0)]
        assert ram[4096:8192] == b"R" * 4096 and ram[0:4096] == b"S" * 4096
        assert ram[16384:20480] == b"S" * 4096
