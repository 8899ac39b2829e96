"""DISCARD and WRITE_ZEROES: config space, planning every validation case, the slot encoding,
and the worker's store operations on real sparse files (and a loop device when one can be made)."""
from __future__ import annotations

import array
import errno
import os
import stat

import pytest

from vblk.backing import BackingInfo, syscalls
from vblk.backing.file import BlockDeviceBacking, FileBacking
from vblk.device import (
    WRITE_ZEROES_MAX_SECTORS,
    WRITE_ZEROES_MAX_SEG,
    BlkDevice,
    Completion,
    DiscardLimits,
    Geometry,
    IoPlan,
)
from vblk.ipc import (
    FLAG_SYNC,
    FLAG_UNMAP,
    RANGE_REGION,
    Op,
    SlotArea,
    SlotState,
    decode_ranges,
    encode_ranges,
)
from vblk.testing.loopdev import loop_device as attach_loop
from vblk.virtio.blk import DISCARD_SEGMENT, BlkConfig, BlkRequest
from vblk.virtio.constants import BlkStatus, BlkType, Feature
from vblk.workers.execute import execute
from vblk.workers.loop import Worker

MiB = 1 << 20
SERIAL = b"VBLK-0123456789abcde"
UNMAP = 1


def device(size=MiB, lbs=512, ro=False, discard=DiscardLimits(2048, 4, 0)):
    return BlkDevice(Geometry(size, lbs, 4096, ro, SERIAL), writeback=False, discard=discard)


def segs(*triples) -> bytes:
    return b"".join(DISCARD_SEGMENT.pack(*t) for t in triples)


def request(t, payload: bytes, inn=()):
    return BlkRequest(t, 0, [(0x1000, len(payload))] if payload else [], list(inn), 0x2000)


def plan(d: BlkDevice, t, *triples, payload=None, inn=()):
    data = segs(*triples) if payload is None else payload
    r = request(t, data, inn)
    wanted = d.segment_bytes_wanted(r)
    return d.plan(r, data[:wanted])


# -- features and config -----------------------------------------------------------------

def test_config_fields_sit_where_the_spec_puts_them():
    raw = device(size=64 * MiB, discard=DiscardLimits(1000, 3, 8)).read_config(0, 60)
    u32 = lambda off: int.from_bytes(raw[off:off + 4], "little")
    assert (u32(36), u32(40), u32(44)) == (1000, 3, 8)
    assert (u32(48), u32(52), raw[56]) == (WRITE_ZEROES_MAX_SECTORS, WRITE_ZEROES_MAX_SEG, 1)
    assert BlkConfig.unpack(raw) == device(size=64 * MiB, discard=DiscardLimits(1000, 3, 8)).config()


def test_write_zeroes_is_offered_on_every_writable_disk_and_may_unmap_only_with_discard():
    on, off, ro = device(), device(discard=None), device(ro=True)
    assert on.features & Feature.BLK_DISCARD.mask and on.features & Feature.BLK_WRITE_ZEROES.mask
    assert not off.features & Feature.BLK_DISCARD.mask
    assert off.features & Feature.BLK_WRITE_ZEROES.mask
    assert off.config().write_zeroes_may_unmap == 0 and off.config().max_discard_sectors == 0
    assert not ro.features & (Feature.BLK_DISCARD.mask | Feature.BLK_WRITE_ZEROES.mask)
    assert ro.read_config(36, 21) == bytes(21)


# -- planning ------------------------------------------------------------------------------

def test_discard_segments_become_byte_ranges_of_the_disk():
    d = device()
    p = plan(d, BlkType.DISCARD, (0, 8, 0), (100, 16, 0), (2040, 8, 0))
    assert p == IoPlan(Op.DISCARD, 0, 32 * 512, ((0, 4096), (51200, 8192), (2040 * 512, 4096)))
    assert not p.unmap


def test_write_zeroes_unmap_is_honoured_only_when_discard_is_on():
    assert plan(device(), BlkType.WRITE_ZEROES, (8, 8, UNMAP)).unmap
    assert not plan(device(), BlkType.WRITE_ZEROES, (8, 8, 0)).unmap
    p = plan(device(discard=None), BlkType.WRITE_ZEROES, (8, 8, UNMAP))
    assert p == IoPlan(Op.WRITE_ZEROES, 4096, 4096, ((4096, 4096),), unmap=False)


@pytest.mark.parametrize("t, triples, payload, status", [
    # data length: none, not whole segments
    (BlkType.DISCARD, (), b"", BlkStatus.IOERR),
    (BlkType.DISCARD, (), b"\0" * 15, BlkStatus.IOERR),
    (BlkType.DISCARD, (), b"\0" * 17, BlkStatus.IOERR),
    (BlkType.WRITE_ZEROES, (), b"\0" * 24, BlkStatus.IOERR),
    # too many segments (4 for discard, 1 for write-zeroes)
    (BlkType.DISCARD, [(i * 8, 8, 0) for i in range(5)], None, BlkStatus.IOERR),
    (BlkType.WRITE_ZEROES, [(0, 8, 0), (8, 8, 0)], None, BlkStatus.IOERR),
    # zero sectors, too many sectors
    (BlkType.DISCARD, [(0, 0, 0)], None, BlkStatus.IOERR),
    (BlkType.WRITE_ZEROES, [(0, 0, 0)], None, BlkStatus.IOERR),
    (BlkType.DISCARD, [(0, 2049, 0)], None, BlkStatus.IOERR),
    # outside the disk (2048 sectors), with and without overflow
    (BlkType.DISCARD, [(2048, 1, 0)], None, BlkStatus.IOERR),
    (BlkType.DISCARD, [(2047, 2, 0)], None, BlkStatus.IOERR),
    (BlkType.WRITE_ZEROES, [(2 ** 64 - 1, 8, 0)], None, BlkStatus.IOERR),
    (BlkType.DISCARD, [(8, 8, 0), (2 ** 63, 2048, 0)], None, BlkStatus.IOERR),
    # flags: UNMAP on DISCARD, unknown bits on either
    (BlkType.DISCARD, [(0, 8, UNMAP)], None, BlkStatus.UNSUPP),
    (BlkType.DISCARD, [(0, 8, 2)], None, BlkStatus.UNSUPP),
    (BlkType.WRITE_ZEROES, [(0, 8, 2)], None, BlkStatus.UNSUPP),
    (BlkType.WRITE_ZEROES, [(0, 8, 0x8000_0001)], None, BlkStatus.UNSUPP),
])
def test_every_bad_segment_list_is_refused(t, triples, payload, status):
    p = plan(device(), t, *triples, payload=payload)
    assert isinstance(p, Completion) and p.status == status, p


def test_one_bad_segment_refuses_the_whole_request():
    p = plan(device(), BlkType.DISCARD, (0, 8, 0), (16, 8, 0), (4096, 8, 0))
    assert isinstance(p, Completion) and p.status == BlkStatus.IOERR


def test_4k_disk_needs_whole_logical_blocks():
    d = device(lbs=4096)
    assert isinstance(plan(d, BlkType.DISCARD, (8, 16, 0)), IoPlan)
    for triple in ((1, 8, 0), (8, 1, 0), (8, 12, 0)):
        for t in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
            assert plan(d, t, triple).status == BlkStatus.IOERR, (t, triple)


def test_discard_alignment_is_checked_on_the_start_sector_as_acrn_does():
    d = device(discard=DiscardLimits(2048, 1, 16))
    assert isinstance(plan(d, BlkType.DISCARD, (32, 8, 0)), IoPlan)
    assert plan(d, BlkType.DISCARD, (8, 8, 0)).status == BlkStatus.IOERR
    # write-zeroes has no alignment rule
    assert isinstance(plan(d, BlkType.WRITE_ZEROES, (8, 8, 0)), IoPlan)


def test_read_only_disk_gets_ioerr_and_discard_off_gets_unsupp():
    for t in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
        assert plan(device(ro=True), t, (0, 8, 0)).status == BlkStatus.IOERR
    assert plan(device(discard=None), BlkType.DISCARD, (0, 8, 0)).status == BlkStatus.UNSUPP
    assert isinstance(plan(device(discard=None), BlkType.WRITE_ZEROES, (0, 8, 0)), IoPlan)


def test_device_writable_data_gets_ioerr():
    p = plan(device(), BlkType.DISCARD, (0, 8, 0), inn=[(0x3000, 16)])
    assert p.status == BlkStatus.IOERR


def test_segment_bytes_are_asked_for_only_when_the_length_can_be_valid():
    d = device()
    assert d.segment_bytes_wanted(request(BlkType.DISCARD, segs((0, 8, 0)) * 4)) == 64
    assert d.segment_bytes_wanted(request(BlkType.DISCARD, segs((0, 8, 0)) * 5)) == 0
    assert d.segment_bytes_wanted(request(BlkType.IN, b"", inn=[(0, 512)])) == 0
    assert device(discard=None).segment_bytes_wanted(request(BlkType.DISCARD, segs((0, 8, 0)))) == 0
    # a plan given fewer bytes than the request holds refuses it (nothing guessed)
    r = request(BlkType.DISCARD, segs((0, 8, 0), (8, 8, 0)))
    assert d.plan(r, segs((0, 8, 0))).status == BlkStatus.IOERR


# -- slot encoding -------------------------------------------------------------------------

def test_ranges_round_trip_through_a_slot():
    area = SlotArea.create(2)
    try:
        ranges = ((4096, 512), (1 << 40, (2 ** 32 - 1) * 512), (8192, 4096))
        area.post(1, Op.DISCARD, FLAG_SYNC | FLAG_UNMAP, 4096, sum(n for _, n in ranges), 7,
                  encode_ranges(ranges))
        op, flags, offset, length, gen, iovs = area.take(1, 3)
        assert (op, flags, gen) == (Op.DISCARD, FLAG_SYNC | FLAG_UNMAP, 7)
        assert decode_ranges(offset, length, iovs) == list(ranges)
        assert area.result(1)[0] == SlotState.BUSY
    finally:
        area.close()


@pytest.mark.parametrize("offset, length, iovs", [
    (0, 512, []),                                         # no record
    (0, 512, [(0, 0, 1)]),                                # a guest-memory record, not a range
    (0, 0, [(RANGE_REGION, 0, 0)]),                       # empty range
    (100, 512, [(RANGE_REGION, 100, 1)]),                 # not sector-aligned
    (0, 1024, [(RANGE_REGION, 0, 1)]),                    # length does not add up
    (512, 512, [(RANGE_REGION, 0, 1)]),                   # offset is not the first range's
])
def test_decode_refuses_records_that_break_the_encoding(offset, length, iovs):
    with pytest.raises(ValueError):
        decode_ranges(offset, length, iovs)


def test_encode_refuses_what_it_cannot_carry():
    for bad in ([(100, 512)], [(0, 0)], [(0, 2 ** 32 * 512)], [(-512, 512)]):
        with pytest.raises(ValueError):
            encode_ranges(bad)


# -- the store -------------------------------------------------------------------------------

def sparse_file(tmp_path, size=8 * MiB, data_mib=4):
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(data_mib * MiB))
    os.sync()
    return path


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


def file_backing(path, *, start=0, size=None, ranged=False, block=False):
    """The backing a worker would hold for ``path`` (no lock: the supervisor's job)."""
    fd = os.open(path, os.O_RDWR)
    whole = os.fstat(fd).st_size if not block else 16 * MiB
    info = BackingInfo(path=str(path), kind="block device" if block else "regular file",
                       readonly=False, writeback=False, nocache=False, logical_block_size=512,
                       physical_block_size=512, start=start,
                       size=whole - start if size is None else size, image_size=whole,
                       serial=bytes(20), ranged=ranged)
    return (BlockDeviceBacking if block else FileBacking)(info, fd)


def test_punch_hole_frees_blocks_and_reads_back_zeroes(tmp_path):
    path = sparse_file(tmp_path)
    before = allocated(path)
    with file_backing(path) as b:
        b.discard(MiB, 2 * MiB)
        b.flush()
        assert os.pread(b.fd, 2 * MiB, MiB) == bytes(2 * MiB)
        assert os.fstat(b.fd).st_size == 8 * MiB          # KEEP_SIZE
    assert before - allocated(path) >= 2 * MiB - 64 * 1024


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_zeroes_and_unmaps_only_when_asked(tmp_path, unmap):
    path = sparse_file(tmp_path)
    before = allocated(path)
    with file_backing(path) as b:
        edge = os.pread(b.fd, 512, MiB - 512)
        b.write_zeroes(MiB, 2 * MiB, unmap)
        b.flush()
        assert os.pread(b.fd, 2 * MiB, MiB) == bytes(2 * MiB)
        assert os.pread(b.fd, 512, MiB - 512) == edge       # nothing outside the range
    if unmap:
        assert before - allocated(path) >= 2 * MiB - 64 * 1024
    else:
        assert allocated(path) >= before - 64 * 1024


def test_write_zeroes_falls_back_to_writing_when_the_filesystem_cannot(tmp_path, monkeypatch):
    path = sparse_file(tmp_path, size=4 * MiB, data_mib=4)
    calls = []

    def no_zero_range(fd, mode, offset, length):
        calls.append(mode)
        if mode & syscalls.FALLOC_FL_ZERO_RANGE:
            raise OSError(errno.EOPNOTSUPP, "no ZERO_RANGE here (like tmpfs)")
        raise AssertionError("only ZERO_RANGE expected")

    monkeypatch.setattr(syscalls, "fallocate", no_zero_range)
    monkeypatch.setattr(syscalls, "ZERO_CHUNK", 64 * 1024)    # several writes
    with file_backing(path) as b:
        b.write_zeroes(512, 300 * 1024, unmap=False)
        assert os.pread(b.fd, 300 * 1024, 512) == bytes(300 * 1024)
        assert os.pread(b.fd, 512, 0) != bytes(512)
    assert calls == [syscalls.FALLOC_FL_ZERO_RANGE | syscalls.FALLOC_FL_KEEP_SIZE]


def test_tmpfs_write_zeroes_works_whatever_it_supports(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    path = os.path.join(shm, f"vblk-zero-{os.getpid()}")
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
    try:
        with file_backing(path) as b:
            b.write_zeroes(4096, 8192, unmap=False)
            b.discard(65536, 65536)
            assert os.pread(b.fd, 8192, 4096) == bytes(8192)
            assert os.pread(b.fd, 65536, 65536) == bytes(65536)
            assert os.fstat(b.fd).st_size == MiB
    finally:
        os.unlink(path)


# -- the worker's checks ------------------------------------------------------------------------

def run_slot(backing, op, flags, ranges, offset=None, length=None):
    """Execute one discard / write-zeroes slot as a worker does; (status, errno)."""
    area = SlotArea.create(1)
    try:
        area.post(0, op, flags, ranges[0][0] if offset is None else offset,
                  sum(n for _, n in ranges) if length is None else length, 0, encode_ranges(ranges))
        status, err, _ = execute(area, 0, 0, lambda disk: backing, lambda disk, gen: None)
        return status, err
    finally:
        area.close()


def test_worker_refuses_ranges_outside_its_window_and_touches_nothing(tmp_path):
    path = sparse_file(tmp_path, size=4 * MiB, data_mib=4)
    before = open(path, "rb").read()
    with file_backing(path, start=MiB, size=MiB, ranged=True) as b:
        for ranges in ([(MiB, 4096)], [(MiB - 512, 1024)], [(0, 4096), (2 * MiB, 512)]):
            assert run_slot(b, Op.DISCARD, 0, ranges) == (BlkStatus.IOERR, errno.EINVAL)
        assert open(path, "rb").read() == before
        assert run_slot(b, Op.WRITE_ZEROES, FLAG_SYNC, [(0, 4096)]) == (BlkStatus.OK, 0)
    after = open(path, "rb").read()
    assert after[MiB:MiB + 4096] == bytes(4096)
    assert after[:MiB] == before[:MiB] and after[MiB + 4096:] == before[MiB + 4096:]


def test_worker_refuses_records_that_break_the_encoding(tmp_path):
    path = sparse_file(tmp_path, size=MiB, data_mib=1)
    before = open(path, "rb").read()
    with file_backing(path) as b:
        assert run_slot(b, Op.DISCARD, 0, [(0, 4096)], length=8192) == (BlkStatus.IOERR, errno.EINVAL)
    assert open(path, "rb").read() == before


def test_worker_answers_unsupp_when_the_store_cannot_discard(tmp_path, monkeypatch):
    path = sparse_file(tmp_path, size=MiB, data_mib=1)

    def refuse(*_):
        raise OSError(errno.EOPNOTSUPP, "no punch")

    monkeypatch.setattr(syscalls, "punch_hole", refuse)
    with file_backing(path) as b:
        assert run_slot(b, Op.DISCARD, 0, [(0, 512)]) == (BlkStatus.UNSUPP, errno.EOPNOTSUPP)
        # write-zeroes has no UNSUPP: a store that cannot zero fails the request
        monkeypatch.setattr(syscalls, "zero_range", refuse)
        monkeypatch.setattr(syscalls, "write_zeroes_slowly", refuse)
        assert run_slot(b, Op.WRITE_ZEROES, 0, [(0, 512)])[0] == BlkStatus.IOERR


# -- a real block device (loop) -------------------------------------------------------------------

@pytest.fixture
def loop_device(tmp_path):
    image = sparse_file(tmp_path, size=16 * MiB, data_mib=8)
    with attach_loop(image) as dev:
        yield dev, image


def test_block_device_discard_and_zeroout(loop_device):
    dev, image = loop_device
    with file_backing(dev, block=True) as b:
        assert stat.S_ISBLK(os.fstat(b.fd).st_mode)
        before = allocated(image)
        b.discard(MiB, 2 * MiB)
        b.write_zeroes(4 * MiB, MiB, unmap=False)
        b.write_zeroes(6 * MiB, MiB, unmap=True)
        os.fsync(b.fd)
        assert os.pread(b.fd, MiB, 4 * MiB) == bytes(MiB)
        assert os.pread(b.fd, MiB, 6 * MiB) == bytes(MiB)
        assert os.pread(b.fd, 4096, 5 * MiB) != bytes(4096)     # untouched
    # a loop device discards by punching its backing file
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == bytes(2 * MiB)
    assert allocated(image) < before


@pytest.mark.parametrize("flags, syncs", [(FLAG_SYNC, 1), (0, 0), (FLAG_SYNC | FLAG_UNMAP, 1)])
def test_writethrough_syncs_after_discard_and_write_zeroes(tmp_path, monkeypatch, flags, syncs):
    """Write-through: the batch's one fdatasync covers discards and write-zeroes, and the
    slots are marked DONE only after it (group commit, as for writes)."""
    path = sparse_file(tmp_path, size=MiB, data_mib=1)
    calls = []
    real = os.fdatasync
    area = SlotArea.create(2)
    backing = file_backing(path)
    w = Worker(0, backing, area, -1, -1, None)

    def fdatasync(fd):
        calls.append([area.result(i)[0] for i in (0, 1)])    # nothing DONE before the sync
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        for i, op in enumerate((Op.DISCARD, Op.WRITE_ZEROES)):
            area.post(i, op, flags, 0, 4096, 0, encode_ranges([(0, 4096)]))
        w.run_batch(array.array("I", [0, 1]))
        assert len(calls) == syncs
        assert all(SlotState.DONE not in states for states in calls)
        assert [area.result(i)[:2] for i in (0, 1)] == [(SlotState.DONE, BlkStatus.OK)] * 2
    finally:
        backing.close()
        area.close()
