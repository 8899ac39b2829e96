"""The sizes the specs fix for every wire structure, pinned once."""
from vblk import ipc as slots
from vblk.vhost_user import messages as m
from vblk.virtio import blk, ring


def test_vhost_user_payload_sizes_match_the_protocol():
    assert m.HEADER.size == 12
    assert m.VRING_STATE.size == 8
    assert m.VRING_ADDR.size == 40
    assert m.MEM_REGION.size == 32
    assert m.SINGLE_REGION_PAD.size + m.MEM_REGION.size == 40
    assert m.CONFIG_HEAD.size == 12
    assert m.INFLIGHT.size == 24


def test_virtio_structure_sizes_match_the_spec():
    assert ring.DESC.size == 16
    assert ring.USED_ELEM.size == 8
    assert blk.OUTHDR.size == 16
    assert blk.CONFIG.size >= 57          # up to write_zeroes_may_unmap


def test_config_field_offsets():
    raw = blk.BlkConfig(capacity=0x0102030405060708, seg_max=0x11, blk_size=4096,
                        physical_block_exp=3, writeback=1, num_queues=2).pack()
    assert raw[0:8] == (0x0102030405060708).to_bytes(8, "little")
    assert raw[12:16] == (0x11).to_bytes(4, "little")
    assert raw[20:24] == (4096).to_bytes(4, "little")
    assert raw[24] == 3
    assert raw[blk.CONFIG_WRITEBACK_OFFSET] == 1
    assert raw[34:36] == (2).to_bytes(2, "little")


def test_slot_records_are_fixed_and_aligned():
    assert slots.HEAD.size == 56
    assert slots.IOV.size == 16
    assert slots.SLOT_SIZE % 64 == 0
    assert slots.SLOT_SIZE >= slots.HEAD.size + slots.MAX_IOV * slots.IOV.size
