"""Numbers fixed by the virtio 1.x spec for split rings and virtio-blk.

Only constants live here; nothing in this module does I/O or keeps state.
"""
from __future__ import annotations

import enum


class DescFlag(enum.IntFlag):
    """``struct virtq_desc.flags``."""
    NEXT = 1
    WRITE = 2        # device-writable buffer
    INDIRECT = 4


AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


class Feature(enum.IntEnum):
    """Virtio feature bits a block backend may offer (bit numbers)."""
    BLK_SIZE_MAX = 1
    BLK_SEG_MAX = 2
    BLK_GEOMETRY = 4
    BLK_RO = 5
    BLK_BLK_SIZE = 6
    BLK_FLUSH = 9
    BLK_TOPOLOGY = 10
    BLK_CONFIG_WCE = 11
    BLK_MQ = 12
    BLK_DISCARD = 13
    BLK_WRITE_ZEROES = 14
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26                        # vhost's VHOST_F_LOG_ALL: log writes (migration)
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VHOST_USER_PROTOCOL_FEATURES = 30   # vhost-user's own bit, not a virtio one
    VERSION_1 = 32

    @property
    def mask(self) -> int:
        return 1 << self.value


class BlkType(enum.IntEnum):
    """``virtio_blk_outhdr.type``."""
    IN = 0
    OUT = 1
    FLUSH = 4
    FLUSH_OUT = 5          # legacy alias of FLUSH, accepted as ACRN does
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


BLK_T_BARRIER = 0x8000_0000    # legacy flag, stripped before dispatch
# virtio_blk_discard_write_zeroes.flags: "the device may deallocate" (WRITE_ZEROES only;
# the spec makes it UNSUPP on DISCARD); every other bit is reserved.
BLK_WRITE_ZEROES_FLAG_UNMAP = 1
BLK_ID_BYTES = 20
SECTOR_SIZE = 512              # virtio-blk sectors are always 512 bytes


class BlkStatus(enum.IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


MAX_QUEUE_SIZE = 32768          # virtio: a split virtqueue has at most 32768 entries
