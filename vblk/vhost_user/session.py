"""One vhost-user connection's state machine (backend side).

Theory of operation
-------------------
``Session.handle(header, payload, fds)`` applies one frontend message and returns the reply
to send (bytes and fds) or None. It never touches the socket. What the message means for the
running device -- a new memory table, a ring to start or stop, a new call eventfd -- is passed
to a ``QueueHost`` (the supervisor; a recording fake in unit tests).

File descriptors: every fd that arrives is owned by the session from then on. A handler
takes the ones it keeps (kick/call/err eventfds, memory-region fds); whatever is left is
closed when the message is done, so a frontend cannot leak fds into vblk.

Errors: a malformed or refused message raises FrontendProtocolError inside its handler. It is
logged, the frontend gets a non-zero ack if it asked for one (NEED_REPLY), and the connection
is dropped (DropConnection): a frontend that sends what it should not cannot be trusted with
the rest of its state, and vblk goes back to serving the next one.

Rings: a ring runs once it has an address, a kick fd and a memory table, unless the frontend
last said SET_VRING_ENABLE 0. (QEMU 7.2 sends ENABLE 1 right after the kick; older frontends
never send it, so waiting for it would hang them.) ENABLE 0 and GET_VRING_BASE stop the ring;
the host completes what is in flight and returns the next avail index, which is the answer
to GET_VRING_BASE and the base for a later restart.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vblk.device import BlkDevice
from vblk.errors import FrontendProtocolError, GuestError
from vblk.logs import RateLimitedLog, quote
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import FrontendReq as R
from vblk.vhost_user.messages import ProtocolFeature as P
from vblk.virtio.constants import MAX_QUEUE_SIZE, Feature

log = logging.getLogger(__name__)
refusals = RateLimitedLog(logger=log)     # a hostile frontend cannot flood the log

DEFAULT_PROTOCOL_FEATURES = (P.MQ.mask | P.REPLY_ACK.mask | P.CONFIG.mask | P.BACKEND_REQ.mask
                             | P.CONFIGURE_MEM_SLOTS.mask | P.INFLIGHT_SHMFD.mask
                             | P.LOG_SHMFD.mask)
MAX_INFLIGHT_BYTES = 64 << 20


class DropConnection(Exception):
    """The frontend broke the protocol: send ``reply`` (a nack, if it asked for an ack),
    close the socket, serve the next frontend."""

    def __init__(self, reason: str, reply: bytes | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass
class Vring:
    index: int
    num: int = 0
    addr: m.VringAddr | None = None
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool | None = None         # None: the frontend never said
    running: bool = False

    def close_fds(self) -> None:
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


@dataclass
class MemSlot:
    region: m.MemRegion
    fd: int


class QueueHost(Protocol):
    def set_memory(self, slots: list[MemSlot]) -> None: ...
    def set_log(self, fd: int | None, size: int, offset: int) -> None: ...
    def set_logging(self, on: bool) -> None: ...
    def start_queue(self, vring: Vring, features: int) -> None: ...
    def stop_queue(self, index: int) -> int: ...
    def set_call(self, index: int, fd: int | None) -> None: ...
    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]: ...
    def set_inflight(self, fd: int | None, size: int, offset: int, num_queues: int,
                     queue_size: int) -> None: ...


@dataclass
class Session:
    device: BlkDevice
    host: QueueHost
    num_queues: int = 1
    protocol_features_offered: int = DEFAULT_PROTOCOL_FEATURES
    acked_features: int = 0
    acked_protocol: int = 0
    owner: bool = False
    memory: list[MemSlot] = field(default_factory=list)
    vrings: list[Vring] = field(default_factory=list)
    backend_req_fd: int | None = None
    reply_fds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self._handlers: dict[int, Callable[[bytes, list[int]], bytes | tuple[bytes, list[int]] | None]] = {
            R.GET_FEATURES: self.get_features,
            R.SET_FEATURES: self.set_features,
            R.SET_OWNER: self.set_owner,
            R.RESET_OWNER: self.reset_owner,
            R.SET_MEM_TABLE: self.set_mem_table,
            R.SET_LOG_BASE: self.set_log_base,
            R.SET_VRING_NUM: self.set_vring_num,
            R.SET_VRING_ADDR: self.set_vring_addr,
            R.SET_VRING_BASE: self.set_vring_base,
            R.GET_VRING_BASE: self.get_vring_base,
            R.SET_VRING_KICK: self.set_vring_kick,
            R.SET_VRING_CALL: self.set_vring_call,
            R.SET_VRING_ERR: self.set_vring_err,
            R.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            R.GET_QUEUE_NUM: self.get_queue_num,
            R.SET_VRING_ENABLE: self.set_vring_enable,
            R.SET_BACKEND_REQ_FD: self.set_backend_req_fd,
            R.GET_CONFIG: self.get_config,
            R.SET_CONFIG: self.set_config,
            R.RESET_DEVICE: self.reset_device,
            R.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            R.ADD_MEM_REG: self.add_mem_reg,
            R.REM_MEM_REG: self.rem_mem_reg,
            R.GET_INFLIGHT_FD: self.get_inflight_fd,
            R.SET_INFLIGHT_FD: self.set_inflight_fd,
        }

    # -- dispatch ------------------------------------------------------------------------
    def handle(self, header: m.Header, payload: bytes, fds: list[int]) -> bytes | None:
        """Apply one message; returns the whole reply message to send, or None.

        A reply that carries fds leaves them in ``reply_fds``: send them with the reply, then
        close them (``take_reply_fds``)."""
        name = m.request_name(header.request)
        pending = list(fds)
        handler = self._handlers.get(header.request)
        reply = None
        try:
            if handler is None:
                raise FrontendProtocolError(f"unsupported request {name}")
            reply = handler(payload, pending)
        except (FrontendProtocolError, GuestError) as exc:
            failed = str(exc)
            refusals.warning(name, "event=message_refused request=%s reason=%s", name,
                             quote(failed))
            nack = None
            if header.need_reply and header.request not in _HAS_REPLY_BODY:
                nack = m.encode_reply(header.request, m.U64.pack(1))
            raise DropConnection(f"{name}: {failed}", nack) from exc
        finally:
            for fd in pending:
                os.close(fd)
        if isinstance(reply, tuple):
            reply, self.reply_fds = reply
        if reply is not None:
            return m.encode_reply(header.request, reply)
        if header.need_reply:
            return m.encode_reply(header.request, m.U64.pack(0))
        return None

    def take_reply_fds(self) -> list[int]:
        fds, self.reply_fds = self.reply_fds, []
        return fds

    def close(self) -> None:
        """The connection is gone: stop every ring and release every fd."""
        self._stop_all()
        for v in self.vrings:
            v.close_fds()
        for fd in self.take_reply_fds():
            os.close(fd)
        self.host.set_inflight(None, 0, 0, 0, 0)
        self.host.set_logging(False)
        self.host.set_log(None, 0, 0)
        self._replace_memory([])
        self.drop_backend_channel()

    # -- helpers -------------------------------------------------------------------------
    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise FrontendProtocolError(f"queue index {index} (device has {len(self.vrings)})")
        return self.vrings[index]

    def _vring_file(self, payload: bytes, fds: list[int]) -> tuple[Vring, int | None]:
        value = m.unpack_u64(payload, "vring file")
        if value & ~(m.VRING_FILE_INDEX_MASK | m.VRING_FILE_NOFD):
            raise FrontendProtocolError(f"vring file value {value:#x} has unknown bits")
        vring = self._vring(value & m.VRING_FILE_INDEX_MASK)
        if value & m.VRING_FILE_NOFD:
            if fds:
                raise FrontendProtocolError("vring file message says NOFD but carries an fd")
            return vring, None
        if len(fds) != 1:
            raise FrontendProtocolError(f"vring file message carries {len(fds)} fds, want 1")
        return vring, fds.pop()

    def _maybe_start(self, vring: Vring) -> None:
        if (not vring.running and vring.kick_fd is not None and vring.addr is not None
                and vring.num and self.memory and vring.enabled is not False):
            self.host.start_queue(vring, self.acked_features)
            vring.running = True

    def _stop(self, vring: Vring) -> None:
        if vring.running:
            vring.base = self.host.stop_queue(vring.index)
            vring.running = False

    def _stop_all(self) -> None:
        for v in self.vrings:
            self._stop(v)

    def _replace_memory(self, new: list[MemSlot]) -> None:
        """Switch to a new memory table; the fds of regions no longer in it are closed."""
        self.host.set_memory(new)
        old, self.memory = self.memory, new
        for s in old:
            if s not in new:
                os.close(s.fd)

    # -- features ------------------------------------------------------------------------
    def get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return m.U64.pack(self.device.features)

    def set_features(self, payload: bytes, fds: list[int]) -> None:
        value = m.unpack_u64(payload, "features")
        extra = value & ~self.device.features
        if extra:
            raise FrontendProtocolError(f"features {extra:#x} were not offered")
        logging_changed = (value ^ self.acked_features) & Feature.LOG_ALL.mask
        self.acked_features = value
        if logging_changed:                 # migration starts (or ends, or is cancelled)
            self.host.set_logging(bool(value & Feature.LOG_ALL.mask))

    def set_log_base(self, payload: bytes, fds: list[int]) -> bytes:
        """The dirty log of a migration (LOG_SHMFD): map it; always answered (QEMU waits)."""
        if not self.acked_protocol & P.LOG_SHMFD.mask:
            raise FrontendProtocolError("SET_LOG_BASE without LOG_SHMFD")
        size, offset = m.unpack_log(payload)
        if len(fds) != 1:
            raise FrontendProtocolError(f"SET_LOG_BASE carries {len(fds)} fds, want 1")
        self.host.set_log(fds[0], size, offset)       # maps it; the fd is closed after
        return m.U64.pack(0)

    def get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return m.U64.pack(self.protocol_features_offered)

    def set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        value = m.unpack_u64(payload, "protocol features")
        extra = value & ~self.protocol_features_offered
        if extra:
            raise FrontendProtocolError(f"protocol features {extra:#x} were not offered")
        self.acked_protocol = value

    def get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return m.U64.pack(self.num_queues)

    def get_max_mem_slots(self, payload: bytes, fds: list[int]) -> bytes:
        return m.U64.pack(m.MAX_MEM_SLOTS)

    def set_owner(self, payload: bytes, fds: list[int]) -> None:
        self.owner = True

    def reset_owner(self, payload: bytes, fds: list[int]) -> None:
        self.reset_device(payload, fds)

    def reset_device(self, payload: bytes, fds: list[int]) -> None:
        self._stop_all()
        for v in self.vrings:
            v.close_fds()
        self.vrings = [Vring(i) for i in range(self.num_queues)]
        self.acked_features = 0

    def set_backend_req_fd(self, payload: bytes, fds: list[int]) -> None:
        if not self.acked_protocol & P.BACKEND_REQ.mask:
            raise FrontendProtocolError("SET_BACKEND_REQ_FD without protocol feature BACKEND_REQ")
        if len(fds) != 1:
            raise FrontendProtocolError(f"SET_BACKEND_REQ_FD carries {len(fds)} fds, want 1")
        if self.backend_req_fd is not None:
            os.close(self.backend_req_fd)
        self.backend_req_fd = fds.pop()

    def config_change(self) -> tuple[int, bytes] | None:
        """What to send to tell the frontend the config space changed: (the backend channel's
        fd, the CONFIG_CHANGE_MSG bytes), or None when there is no channel (BACKEND_REQ not
        negotiated, or no SET_BACKEND_REQ_FD yet). The fd stays the session's."""
        if self.backend_req_fd is None or not self.acked_protocol & P.BACKEND_REQ.mask:
            return None
        return self.backend_req_fd, m.encode_config_change()

    def drop_backend_channel(self) -> None:
        """The backend channel is dead (the frontend closed its end): forget it."""
        if self.backend_req_fd is not None:
            os.close(self.backend_req_fd)
            self.backend_req_fd = None

    # -- memory --------------------------------------------------------------------------
    def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        regions = m.unpack_mem_table(payload)
        if len(fds) != len(regions):
            raise FrontendProtocolError(f"memory table of {len(regions)} regions carries {len(fds)} fds")
        slots = [MemSlot(r, fd) for r, fd in zip(regions, fds)]
        fds.clear()
        try:
            self._replace_memory(slots)
        except (FrontendProtocolError, GuestError):
            for s in slots:
                os.close(s.fd)
            raise

    def add_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        region = m.unpack_single_region(payload)
        if len(fds) != 1:
            raise FrontendProtocolError(f"ADD_MEM_REG carries {len(fds)} fds, want 1")
        if len(self.memory) >= m.MAX_MEM_SLOTS:
            raise FrontendProtocolError(f"more than {m.MAX_MEM_SLOTS} memory regions")
        slot = MemSlot(region, fds.pop())
        try:
            self._replace_memory(self.memory + [slot])
        except (FrontendProtocolError, GuestError):
            os.close(slot.fd)
            raise

    def rem_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        region = m.unpack_single_region(payload)
        keep = [s for s in self.memory
                if (s.region.guest_phys_addr, s.region.memory_size)
                != (region.guest_phys_addr, region.memory_size)]
        if len(keep) == len(self.memory):
            raise FrontendProtocolError(f"REM_MEM_REG of a region not in the table: {region}")
        self._replace_memory(keep)

    # -- rings ---------------------------------------------------------------------------
    def set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        st = m.VringState.unpack(payload)
        vring = self._vring(st.index)
        if vring.running:
            raise FrontendProtocolError(f"SET_VRING_NUM on running queue {st.index}")
        if st.num == 0 or st.num & (st.num - 1) or st.num > MAX_QUEUE_SIZE:
            raise FrontendProtocolError(f"queue size {st.num} is not a power of two up to {MAX_QUEUE_SIZE}")
        vring.num = st.num

    def set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        addr = m.VringAddr.unpack(payload)
        addr.validate()
        vring = self._vring(addr.index)
        if vring.running:
            # At the start of a migration QEMU sends the running rings' addresses again with
            # VHOST_VRING_F_LOG: the rings stay where they are (the used ring is logged by its
            # own address); anything else moving under a running ring is refused.
            old = vring.addr
            if (addr.desc, addr.avail, addr.used) != (old.desc, old.avail, old.used):
                raise FrontendProtocolError(f"SET_VRING_ADDR moves running queue {addr.index}")
            vring.addr = addr
            return
        vring.addr = addr
        self._maybe_start(vring)

    def set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        st = m.VringState.unpack(payload)
        vring = self._vring(st.index)
        if vring.running:
            raise FrontendProtocolError(f"SET_VRING_BASE on running queue {st.index}")
        if st.num > 0xFFFF:
            raise FrontendProtocolError(f"vring base {st.num} does not fit 16 bits")
        vring.base = st.num

    def get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        st = m.VringState.unpack(payload)
        vring = self._vring(st.index)
        self._stop(vring)
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
            vring.kick_fd = None
        return m.VringState(st.index, vring.base).pack()

    def set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_file(payload, fds)
        if fd is None:
            raise FrontendProtocolError("polling mode (SET_VRING_KICK with NOFD) is not supported")
        self._stop(vring)
        if vring.kick_fd is not None:
            os.close(vring.kick_fd)
        vring.kick_fd = fd
        self._maybe_start(vring)

    def set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_file(payload, fds)
        if vring.call_fd is not None:
            os.close(vring.call_fd)
        vring.call_fd = fd
        self.host.set_call(vring.index, fd)

    def set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        vring, fd = self._vring_file(payload, fds)
        if vring.err_fd is not None:
            os.close(vring.err_fd)
        vring.err_fd = fd

    def set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        st = m.VringState.unpack(payload)
        vring = self._vring(st.index)
        if st.num not in (0, 1):
            raise FrontendProtocolError(f"SET_VRING_ENABLE num={st.num}")
        vring.enabled = bool(st.num)
        if vring.enabled:
            self._maybe_start(vring)
        else:
            self._stop(vring)

    # -- inflight tracking (backend restarts) -------------------------------------------
    def get_inflight_fd(self, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        req = m.Inflight.unpack(payload)
        self._check_inflight_shape(req.num_queues, req.queue_size)
        fd, size = self.host.get_inflight(req.num_queues, req.queue_size)
        return m.Inflight(size, 0, req.num_queues, req.queue_size).pack(), [fd]

    def set_inflight_fd(self, payload: bytes, fds: list[int]) -> None:
        req = m.Inflight.unpack(payload)
        if len(fds) != 1:
            raise FrontendProtocolError(f"SET_INFLIGHT_FD carries {len(fds)} fds, want 1")
        self._check_inflight_shape(req.num_queues, req.queue_size)
        if not 0 < req.mmap_size <= MAX_INFLIGHT_BYTES or req.mmap_offset > MAX_INFLIGHT_BYTES:
            raise FrontendProtocolError(f"inflight region size {req.mmap_size} offset {req.mmap_offset}")
        if any(v.running for v in self.vrings):
            raise FrontendProtocolError("SET_INFLIGHT_FD while a queue is running")
        self.host.set_inflight(fds[0], req.mmap_size, req.mmap_offset, req.num_queues,
                               req.queue_size)

    def _check_inflight_shape(self, num_queues: int, queue_size: int) -> None:
        if not 1 <= num_queues <= len(self.vrings):
            raise FrontendProtocolError(f"inflight for {num_queues} queues (device has {len(self.vrings)})")
        if queue_size == 0 or queue_size & (queue_size - 1) or queue_size > MAX_QUEUE_SIZE:
            raise FrontendProtocolError(f"inflight queue size {queue_size}")

    # -- config --------------------------------------------------------------------------
    def get_config(self, payload: bytes, fds: list[int]) -> bytes:
        msg = m.ConfigMsg.unpack(payload)
        if msg.offset + msg.size > m.CONFIG_SPACE_MAX:
            raise FrontendProtocolError(f"GET_CONFIG offset {msg.offset} size {msg.size}")
        data = self.device.read_config(msg.offset, msg.size)
        return m.ConfigMsg(msg.offset, msg.size, msg.flags, data).pack()

    def set_config(self, payload: bytes, fds: list[int]) -> None:
        msg = m.ConfigMsg.unpack(payload)
        if not self.device.features & Feature.BLK_CONFIG_WCE.mask:
            raise FrontendProtocolError("config space is read-only without CONFIG_WCE")
        refused = self.device.write_config(msg.offset, msg.data)
        if refused:
            raise FrontendProtocolError(refused)
        log.info("event=cache_mode mode=%s", "writeback" if self.device.writeback else "writethrough")


_HAS_REPLY_BODY = {R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_VRING_BASE,
                   R.SET_LOG_BASE,
                   R.GET_CONFIG, R.GET_MAX_MEM_SLOTS, R.GET_INFLIGHT_FD, R.GET_STATUS}
