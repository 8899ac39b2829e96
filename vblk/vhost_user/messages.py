"""vhost-user wire format: request ids, flags, feature bits and payload layouts.

Declared once and used by both sides: the backend's session and the test frontend.
All integers are little-endian (the protocol uses host order; vblk runs on x86/arm LE).
Nothing here touches a socket.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vblk.errors import FrontendProtocolError

HEADER = struct.Struct("<III")             # request, flags, size
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")         # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")      # index, flags, desc, used, avail, log
MEM_REGION = struct.Struct("<QQQQ")        # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HEAD = struct.Struct("<II")      # nregions, padding
SINGLE_REGION_PAD = struct.Struct("<Q")    # padding before one region (ADD/REM_MEM_REG)
CONFIG_HEAD = struct.Struct("<III")        # offset, size, flags
INFLIGHT = struct.Struct("<QQHH4x")        # mmap_size, mmap_offset, num_queues, queue_size (24 bytes)
LOG = struct.Struct("<QQ")                 # SET_LOG_BASE: mmap_size, mmap_offset
VRING_F_LOG = 0x1                          # SET_VRING_ADDR flags: log_guest_addr is valid

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
REPLY_FLAGS = VERSION | FLAG_REPLY        # QEMU insists on exactly 0x5

MAX_PAYLOAD = 4096                         # large enough for a full memory table or config
MAX_FDS = 8                                # VHOST_MEMORY_BASELINE_NREGIONS
MAX_MEM_REGIONS = 8                        # SET_MEM_TABLE carries at most 8 regions
MAX_MEM_SLOTS = 32                         # what GET_MAX_MEM_SLOTS answers
VRING_FILE_INDEX_MASK = 0xFF
VRING_FILE_NOFD = 0x100
CONFIG_SPACE_MAX = 256


class FrontendReq(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendReq(enum.IntEnum):
    """Backend-to-frontend requests, sent on the channel SET_BACKEND_REQ_FD hands over."""
    CONFIG_CHANGE_MSG = 2


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    REPLY_ACK = 3
    BACKEND_REQ = 5
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16

    @property
    def mask(self) -> int:
        return 1 << self.value


def request_name(code: int) -> str:
    try:
        return FrontendReq(code).name
    except ValueError:
        return f"UNKNOWN({code})"


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        return cls(*HEADER.unpack(buf))

    def validate(self) -> None:
        if self.flags & FLAG_VERSION_MASK != VERSION:
            raise FrontendProtocolError(f"header version {self.flags & FLAG_VERSION_MASK}, want 1")
        if self.size > MAX_PAYLOAD:
            raise FrontendProtocolError(f"payload of {self.size} bytes exceeds {MAX_PAYLOAD}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int

    @classmethod
    def unpack(cls, buf: bytes) -> VringState:
        _expect_size("vring state", buf, VRING_STATE.size)
        return cls(*VRING_STATE.unpack(buf))

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @classmethod
    def unpack(cls, buf: bytes) -> VringAddr:
        _expect_size("vring addr", buf, VRING_ADDR.size)
        return cls(*VRING_ADDR.unpack(buf))

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)

    def validate(self) -> None:
        if self.desc % 16 or self.avail % 2 or self.used % 4:
            raise FrontendProtocolError(f"misaligned ring addresses desc={self.desc:#x} "
                                        f"avail={self.avail:#x} used={self.used:#x}")


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @classmethod
    def unpack_from(cls, buf: bytes, offset: int = 0) -> MemRegion:
        return cls(*MEM_REGION.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                               self.mmap_offset)

    def validate(self) -> None:
        if self.memory_size == 0:
            raise FrontendProtocolError("memory region of size 0")
        for name, base in (("guest", self.guest_phys_addr), ("user", self.userspace_addr)):
            if base + self.memory_size > 1 << 64:
                raise FrontendProtocolError(f"memory region wraps the {name} address space")
        if self.mmap_offset + self.memory_size > 1 << 63:
            raise FrontendProtocolError("memory region mmap_offset + size overflows")


def unpack_mem_table(buf: bytes) -> list[MemRegion]:
    if len(buf) < MEM_TABLE_HEAD.size:
        raise FrontendProtocolError(f"memory table payload of {len(buf)} bytes is too short")
    nregions, _ = MEM_TABLE_HEAD.unpack_from(buf)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise FrontendProtocolError(f"memory table with {nregions} regions (1..{MAX_MEM_REGIONS})")
    need = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
    if len(buf) < need:
        raise FrontendProtocolError(f"memory table of {nregions} regions needs {need} bytes, got {len(buf)}")
    return [MemRegion.unpack_from(buf, MEM_TABLE_HEAD.size + i * MEM_REGION.size)
            for i in range(nregions)]


def pack_mem_table(regions: list[MemRegion]) -> bytes:
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def unpack_single_region(buf: bytes) -> MemRegion:
    _expect_size("single memory region", buf, SINGLE_REGION_PAD.size + MEM_REGION.size)
    return MemRegion.unpack_from(buf, SINGLE_REGION_PAD.size)


def pack_single_region(region: MemRegion) -> bytes:
    return SINGLE_REGION_PAD.pack(0) + region.pack()


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def unpack(cls, buf: bytes) -> ConfigMsg:
        if len(buf) < CONFIG_HEAD.size:
            raise FrontendProtocolError(f"config payload of {len(buf)} bytes is too short")
        offset, size, flags = CONFIG_HEAD.unpack_from(buf)
        if size > CONFIG_SPACE_MAX or offset > CONFIG_SPACE_MAX:
            raise FrontendProtocolError(f"config access offset={offset} size={size} exceeds "
                                        f"{CONFIG_SPACE_MAX}")
        data = bytes(buf[CONFIG_HEAD.size:])
        if len(data) != size:
            raise FrontendProtocolError(f"config payload carries {len(data)} bytes, header says {size}")
        return cls(offset, size, flags, data)

    def pack(self) -> bytes:
        return CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True, slots=True)
class Inflight:
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def unpack(cls, buf: bytes) -> Inflight:
        _expect_size("inflight", buf, INFLIGHT.size)
        return cls(*INFLIGHT.unpack(buf))

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


def unpack_log(buf: bytes) -> tuple[int, int]:
    """SET_LOG_BASE's (mmap_size, mmap_offset)."""
    _expect_size("log base", buf, LOG.size)
    return LOG.unpack(buf)


def unpack_u64(buf: bytes, what: str) -> int:
    _expect_size(what, buf, U64.size)
    return U64.unpack(buf)[0]


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """One whole message: header plus payload."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, REPLY_FLAGS)


def encode_config_change() -> bytes:
    """CONFIG_CHANGE_MSG on the backend channel: a bare 12-byte header (request 2, flags 0x1:
    version 1, no NEED_REPLY, so the frontend sends nothing back; size 0), as libvhost-user's
    ``vu_config_change_msg`` sends it. The frontend answers it with GET_CONFIG on the main
    channel."""
    return encode(BackendReq.CONFIG_CHANGE_MSG)


def _expect_size(what: str, buf: bytes, size: int) -> None:
    if len(buf) != size:
        raise FrontendProtocolError(f"{what} payload is {len(buf)} bytes, want {size}")
