"""DISCARD and WRITE_ZEROES through the Python frontend, against vblk and qemu-storage-daemon.

The same requests go to both backends (vblk with ``--discard``, qsd with ``discard=unmap``),
and the statuses, the image's bytes and its allocation (st_blocks) are compared. Where the two
answer differently by design (qsd takes one segment and zero-sector segments; vblk follows
ACRN), each backend's own documented answer is asserted, and the test says why.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from vblk.control import default_control_path, fetch_stats
from vblk.testing.frontend import DEFAULT_FEATURES, BlkClient
from vblk.testing.loopdev import loop_device as attach_loop
from vblk.virtio.blk import DISCARD_SEGMENT
from vblk.virtio.constants import BlkStatus, BlkType, Feature

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
DATA_SIZE = 16 * MiB              # allocated, random bytes at the start of the image
CAPACITY = IMAGE_SIZE // 512
UNMAP = 1
SLACK = 64 * 1024                 # filesystem metadata may move st_blocks by a little
FEATURES = DEFAULT_FEATURES | Feature.BLK_DISCARD.mask | Feature.BLK_WRITE_ZEROES.mask
OK, IOERR, UNSUPP = BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP


def segs(*triples) -> bytes:
    return b"".join(DISCARD_SEGMENT.pack(*t) for t in triples)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(os.urandom(DATA_SIZE))
        os.fsync(f.fileno())
    return path


@pytest.fixture(params=["qsd", "vblk"])
def backend(request, image):
    """(name, socket) of a backend serving ``image`` with discard on."""
    if request.param == "qsd":
        return "qsd", request.getfixturevalue("qsd_server")(image, discard=True)
    return "vblk", request.getfixturevalue("vblk_server")(image, "--discard", "--workers", "2")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def host_read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def send(client: BlkClient, rtype: int, data: bytes, **kw) -> int:
    return client._run(client.submit(rtype, 0, data=data, **kw)).status


def test_both_offer_discard_and_write_zeroes_with_usable_limits(backend):
    name, sock = backend
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert c.frontend.features & Feature.BLK_DISCARD.mask
        assert c.frontend.features & Feature.BLK_WRITE_ZEROES.mask
        cfg = c.config
        assert cfg.max_discard_sectors > 0 and cfg.max_discard_seg >= 1
        assert cfg.max_write_zeroes_sectors > 0 and cfg.max_write_zeroes_seg >= 1
        if name == "vblk":       # ACRN's defaults: the whole disk, one segment, no alignment
            assert (cfg.max_discard_sectors, cfg.max_discard_seg,
                    cfg.discard_sector_alignment) == (CAPACITY, 1, 0)
            assert (cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg,
                    cfg.write_zeroes_may_unmap) == (65536, 1, 1)
        else:                    # QEMU's VIRTIO_BLK_MAX_DISCARD_SECTORS, 1 segment, blk_size
            assert (cfg.max_discard_sectors, cfg.max_discard_seg,
                    cfg.discard_sector_alignment) == (32768, 1, 1)


def test_discard_frees_the_range_and_it_reads_back_zeroes(backend, image):
    _, sock = backend
    before_bytes = host_read(image, 0, DATA_SIZE)
    before = allocated(image)
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert send(c, BlkType.DISCARD, segs((2048, 2048, 0))) == OK      # 1 MiB at 1 MiB
        assert c.read(2048, MiB).data == bytes(MiB)
        edge = c.read(2040, 8192).data                                     # 4 KiB each side
        assert edge == before_bytes[2040 * 512:2048 * 512] + bytes(4096)
    assert host_read(image, MiB, MiB) == bytes(MiB)
    assert host_read(image, 0, MiB) == before_bytes[:MiB]
    assert host_read(image, 2 * MiB, MiB) == before_bytes[2 * MiB:3 * MiB]
    assert before - allocated(image) >= MiB - SLACK
    assert os.stat(image).st_size == IMAGE_SIZE


@pytest.mark.parametrize("flags", [0, UNMAP], ids=["keep", "unmap"])
def test_write_zeroes_zeroes_and_unmaps_only_when_allowed(backend, image, flags):
    _, sock = backend
    before_bytes = host_read(image, 0, DATA_SIZE)
    before = allocated(image)
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert send(c, BlkType.WRITE_ZEROES, segs((6144, 4096, flags))) == OK   # 2 MiB at 3 MiB
        assert c.read(6144, 2 * MiB).data == bytes(2 * MiB)
    assert host_read(image, 3 * MiB, 2 * MiB) == bytes(2 * MiB)
    assert host_read(image, 2 * MiB, MiB) == before_bytes[2 * MiB:3 * MiB]
    assert host_read(image, 5 * MiB, MiB) == before_bytes[5 * MiB:6 * MiB]
    dropped = before - allocated(image)
    if flags & UNMAP:
        assert dropped >= 2 * MiB - SLACK
    else:
        assert dropped <= SLACK


def test_bad_requests_get_the_same_status_and_change_nothing(backend, image):
    _, sock = backend
    before = digest(image)
    with BlkClient.connect(sock, features=FEATURES) as c:
        too_many_discard = c.config.max_discard_sectors + 1
        too_many_zeroes = c.config.max_write_zeroes_sectors + 1
        cases = [
            (BlkType.DISCARD, segs((CAPACITY, 8, 0)), IOERR),             # past the end
            (BlkType.DISCARD, segs((CAPACITY - 8, 16, 0)), IOERR),        # runs past the end
            (BlkType.WRITE_ZEROES, segs((2 ** 64 - 8, 16, 0)), IOERR),    # wraps around
            (BlkType.DISCARD, segs((0, too_many_discard, 0)), IOERR),
            (BlkType.WRITE_ZEROES, segs((0, too_many_zeroes, 0)), IOERR),
            (BlkType.DISCARD, segs((0, 8, UNMAP)), UNSUPP),              # UNMAP on DISCARD
            (BlkType.DISCARD, segs((0, 8, 2)), UNSUPP),                  # reserved flag bit
            (BlkType.WRITE_ZEROES, segs((0, 8, 2)), UNSUPP),
            (BlkType.WRITE_ZEROES, segs((0, 8, 0x8000_0001)), UNSUPP),
            (BlkType.DISCARD, segs((0, 8, 0))[:15], IOERR),              # a short segment
        ]
        got = [send(c, t, data) for t, data, _ in cases]
        assert got == [want for _, _, want in cases]
        assert c.read(0, 4096).status == OK                              # still serving
    assert digest(image) == before


def test_where_the_backends_differ_by_design(backend, image):
    """qsd (QEMU's virtio-blk handler) takes exactly one 16-byte segment and lets a
    zero-sector segment succeed; vblk takes up to max_discard_seg segments and refuses what
    ACRN refuses (a zero length, data that is not whole segments) with IOERR."""
    name, sock = backend
    before = digest(image)
    with BlkClient.connect(sock, features=FEATURES) as c:
        zero = send(c, BlkType.DISCARD, segs((0, 0, 0)))
        zero_wz = send(c, BlkType.WRITE_ZEROES, segs((0, 0, 0)))
        odd = send(c, BlkType.DISCARD, segs((0, 8, 0)) + b"\0")
        two = send(c, BlkType.DISCARD, segs((0, 8, 0), (16, 8, 0)))
    if name == "qsd":
        assert (zero, zero_wz, odd, two) == (OK, OK, UNSUPP, UNSUPP)
    else:                              # two segments > max_discard_seg 1: IOERR (ACRN: EINVAL)
        assert (zero, zero_wz, odd, two) == (IOERR, IOERR, IOERR, IOERR)
    assert digest(image) == before


# -- vblk only --------------------------------------------------------------------------------

def test_several_segments_split_over_descriptors_discard_every_range(tmp_path, image, vblk_server):
    """ACRN misreads segments that span descriptors; vblk gathers them wherever they lie."""
    before_bytes = host_read(image, 0, DATA_SIZE)
    before = allocated(image)
    ranges = [(0, 512), (4096, 1024), (8192, 2048), (16384, 8)]        # sectors
    data = segs(*((s, n, 0) for s, n in ranges))
    sock = vblk_server(image, "--discard-limits", "4096:4:0", "--workers", "2")
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert c.config.max_discard_seg == 4
        assert send(c, BlkType.DISCARD, data, segments=[7, 9, 30, 1, 17]) == OK
        assert send(c, BlkType.DISCARD, data + segs((20000, 8, 0))) == IOERR     # 5 > 4
    after = host_read(image, 0, DATA_SIZE)
    expect = bytearray(before_bytes)
    for s, n in ranges:
        expect[s * 512:(s + n) * 512] = bytes(n * 512)
    assert after == bytes(expect)
    assert before - allocated(image) >= (512 + 1024 + 2048) * 512 - SLACK


def test_discard_off_answers_unsupp_but_write_zeroes_works(image, vblk_server):
    before_bytes = host_read(image, 0, MiB)
    sock = vblk_server(image, "--workers", "2")
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert not c.frontend.features & Feature.BLK_DISCARD.mask
        assert c.frontend.features & Feature.BLK_WRITE_ZEROES.mask
        assert c.config.write_zeroes_may_unmap == 0
        assert send(c, BlkType.DISCARD, segs((0, 8, 0))) == UNSUPP
        before = allocated(image)
        assert send(c, BlkType.WRITE_ZEROES, segs((8, 2048, UNMAP))) == OK
    assert host_read(image, 0, 4096) == before_bytes[:4096]
    assert host_read(image, 4096, MiB) == bytes(MiB)
    assert before - allocated(image) <= SLACK          # UNMAP may not deallocate: discard is off


def test_read_only_disk_offers_neither_and_refuses_both(image, vblk_server):
    before = digest(image)
    sock = vblk_server(image, "--ro", "--discard", "--workers", "2")
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert not c.frontend.features & (Feature.BLK_DISCARD.mask | Feature.BLK_WRITE_ZEROES.mask)
        assert send(c, BlkType.DISCARD, segs((0, 8, 0))) == IOERR
        assert send(c, BlkType.WRITE_ZEROES, segs((0, 8, 0))) == IOERR
    assert digest(image) == before


def test_range_window_bounds_discard_and_write_zeroes(image, vblk_server):
    before = host_read(image, 0, IMAGE_SIZE)
    start, size = 4 * MiB, 4 * MiB
    sock = vblk_server(image, "--range", f"{start}/{size}", "--discard", "--workers", "2")
    sectors = size // 512
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert c.config.max_discard_sectors == sectors
        assert send(c, BlkType.DISCARD, segs((0, sectors, 0))) == OK            # the whole disk
        assert send(c, BlkType.DISCARD, segs((sectors - 8, 16, 0))) == IOERR
        assert send(c, BlkType.WRITE_ZEROES, segs((sectors, 8, 0))) == IOERR
    after = host_read(image, 0, IMAGE_SIZE)
    assert after[:start] == before[:start]
    assert after[start:start + size] == bytes(size)
    assert after[start + size:] == before[start + size:]


def test_4k_disk_refuses_partial_blocks(image, vblk_server):
    before = digest(image)
    sock = vblk_server(image, "--sectorsize", "4096", "--discard", "--workers", "2")
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert send(c, BlkType.DISCARD, segs((1, 8, 0))) == IOERR
        assert send(c, BlkType.WRITE_ZEROES, segs((8, 4, 0))) == IOERR
    assert digest(image) == before


def test_stats_count_discard_and_write_zeroes(image, vblk_server):
    sock = vblk_server(image, "--discard", "--workers", "2")
    with BlkClient.connect(sock, features=FEATURES) as c:
        assert send(c, BlkType.DISCARD, segs((0, 16, 0))) == OK
        assert send(c, BlkType.DISCARD, segs((0, 8, UNMAP))) == UNSUPP
        assert send(c, BlkType.WRITE_ZEROES, segs((64, 8, 0))) == OK
        assert send(c, BlkType.WRITE_ZEROES, segs((128, 8, UNMAP))) == OK
    snap = fetch_stats(default_control_path(str(sock)))
    q = snap["queues"][0]
    t = q["types"]
    assert (t["discard"]["requests"], t["discard"]["bytes"]) == (2, 16 * 512)
    assert (t["write_zeroes"]["requests"], t["write_zeroes"]["bytes"]) == (2, 16 * 512)
    assert (q["unsupp"], q["ioerr"], t["other"]["requests"]) == (1, 0, 0)


def test_a_block_device_gets_blkdiscard_and_blkzeroout(tmp_path, vblk_server):
    """vblk serving a loop device: DISCARD becomes BLKDISCARD, WRITE_ZEROES BLKZEROOUT (the loop
    driver passes both to its backing file as punched holes / zeroes)."""
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
        f.write(os.urandom(8 * MiB))
        os.fsync(f.fileno())
    with attach_loop(backing) as dev:
        before_bytes = host_read(backing, 0, 8 * MiB)
        before = allocated(backing)
        sock = vblk_server(dev, "--discard", "--workers", "2")
        with BlkClient.connect(sock, features=FEATURES) as c:
            assert c.frontend.features & Feature.BLK_DISCARD.mask
            assert send(c, BlkType.DISCARD, segs((2048, 4096, 0))) == OK          # 1..3 MiB
            assert send(c, BlkType.WRITE_ZEROES, segs((8192, 2048, 0))) == OK     # 4..5 MiB
            assert send(c, BlkType.WRITE_ZEROES, segs((12288, 2048, UNMAP))) == OK  # 6..7 MiB
            assert c.read(8192, MiB).data == bytes(MiB)
            assert c.read(12288, MiB).data == bytes(MiB)
            assert send(c, BlkType.DISCARD, segs((32768, 8, 0))) == IOERR          # past the end
        sock.stop()
        after = host_read(backing, 0, 8 * MiB)
        expect = bytearray(before_bytes)
        for lo, hi in ((MiB, 3 * MiB), (4 * MiB, 5 * MiB), (6 * MiB, 7 * MiB)):
            expect[lo:hi] = bytes(hi - lo)
        assert after == bytes(expect)
        assert before - allocated(backing) >= 2 * MiB - SLACK       # at least the discard
