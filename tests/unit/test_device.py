"""BlkDevice: features, config space and what each request becomes (ACRN's rules)."""
import pytest

from vblk.device import BlkDevice, Completion, Geometry, IoPlan
from vblk.ipc import Op
from vblk.virtio.blk import BlkRequest
from vblk.virtio.constants import BlkStatus, BlkType, Feature

SERIAL = b"VBLK-0123456789abcde"


def device(size=1 << 20, lbs=512, pbs=4096, ro=False, wb=False):
    return BlkDevice(Geometry(size, lbs, pbs, ro, SERIAL), writeback=wb)


def req(t, sector=0, out=(), inn=((0x1000, 512),)):
    return BlkRequest(t, sector, list(out), list(inn), 0x2000)


def test_features_are_acrns_plus_version_1_and_event_idx():
    f = device().features
    for bit in (Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_TOPOLOGY,
                Feature.RING_INDIRECT_DESC, Feature.BLK_FLUSH, Feature.BLK_CONFIG_WCE,
                Feature.VERSION_1, Feature.VHOST_USER_PROTOCOL_FEATURES):
        assert f & bit.mask, bit
    assert not f & Feature.BLK_RO.mask
    assert f & Feature.RING_EVENT_IDX.mask      # beyond ACRN: fewer kicks and interrupts
    assert device(ro=True).features & Feature.BLK_RO.mask


def test_config_is_padded_to_the_size_asked():
    d = device(size=1 << 30, lbs=4096, pbs=4096, wb=True)
    raw = d.read_config(0, 57)
    assert len(raw) == 57
    assert int.from_bytes(raw[0:8], "little") == (1 << 30) // 512
    assert int.from_bytes(raw[20:24], "little") == 4096
    assert raw[24] == 0                      # physical_block_exp: 4096/4096
    assert raw[32] == 1
    assert raw[36:48] == bytes(12)           # discard is off by default
    assert raw[57:] == b""
    assert device(lbs=512, pbs=4096).read_config(24, 1) == b"\x03"
    assert d.read_config(250, 6) == bytes(6)


def test_guest_can_switch_the_cache_mode_and_nothing_else():
    d = device()
    assert d.write_config(32, b"\x01") is None and d.writeback
    assert d.write_config(32, b"\x00") is None and not d.writeback
    assert d.write_config(0, b"\x01" * 8) is not None
    assert d.write_config(32, b"\x01\x00") is not None


def test_read_and_write_become_io_plans_at_disk_offsets():
    d = device()
    p = d.plan(req(BlkType.IN, sector=2, inn=[(0x1000, 1024)]))
    assert p == IoPlan(Op.READ, 1024, 1024)
    p = d.plan(req(BlkType.OUT, sector=0, out=[(0x1000, 512)], inn=()))
    assert p == IoPlan(Op.WRITE, 0, 512)
    assert d.plan(req(BlkType.FLUSH, inn=())) == IoPlan(Op.FLUSH, 0, 0)


@pytest.mark.parametrize("sector,length", [
    (2048, 512),              # starts at the end
    (2047, 1024),             # runs past the end
    (0, 100),                 # not whole sectors
    ((1 << 64) // 512, 512),  # absurd sector: no overflow in Python, still refused
])
def test_out_of_range_or_partial_reads_get_ioerr(sector, length):
    p = device(size=1 << 20).plan(req(BlkType.IN, sector=sector, inn=[(0x1000, length)]))
    assert isinstance(p, Completion) and p.status == BlkStatus.IOERR


def test_logical_block_alignment_is_enforced_for_4k_disks():
    d = device(lbs=4096, pbs=4096)
    assert d.plan(req(BlkType.IN, sector=8, inn=[(0, 4096)])) == IoPlan(Op.READ, 4096, 4096)
    for sector, length in ((1, 4096), (8, 512)):
        p = d.plan(req(BlkType.IN, sector=sector, inn=[(0, length)]))
        assert p.status == BlkStatus.IOERR


def test_writes_to_a_read_only_disk_get_ioerr_and_flush_is_harmless():
    d = device(ro=True)
    assert d.plan(req(BlkType.OUT, out=[(0, 512)], inn=())).status == BlkStatus.IOERR
    assert d.plan(req(BlkType.FLUSH, inn=())).status == BlkStatus.OK
    assert isinstance(d.plan(req(BlkType.IN)), IoPlan)


def test_direction_mismatch_gets_ioerr():
    d = device()
    assert d.plan(req(BlkType.IN, out=[(0, 512)], inn=[(0, 512)])).status == BlkStatus.IOERR
    assert d.plan(req(BlkType.OUT, out=[(0, 512)], inn=[(0, 512)])).status == BlkStatus.IOERR


def test_get_id_returns_twenty_bytes_of_serial():
    p = device().plan(req(BlkType.GET_ID, inn=[(0, 20)]))
    assert p.status == BlkStatus.OK and p.fill == SERIAL
    assert device().plan(req(BlkType.GET_ID, inn=[(0, 8)])).fill == SERIAL[:8]


@pytest.mark.parametrize("t", [2, 3, 7, 14, 99, 0x7FFFFFFF])
def test_unknown_types_get_unsupp(t):
    assert device().plan(req(t)).status == BlkStatus.UNSUPP


def test_short_header_gets_ioerr():
    r = BlkRequest(-1, 0, [], [], 0x2000, bad="request header shorter than 16 bytes")
    assert device().plan(r).status == BlkStatus.IOERR


def test_mq_is_offered_only_with_more_than_one_queue():
    g = Geometry(size_bytes=1 << 20)
    assert not BlkDevice(g, writeback=False).features & Feature.BLK_MQ.mask
    d = BlkDevice(g, writeback=False, num_queues=4)
    assert d.features & Feature.BLK_MQ.mask
    assert d.config().num_queues == 4
