"""A vhost-user frontend in Python: guest RAM, QEMU 7.2's handshake, and a virtio-blk client.

This is the test guest used by the fast tests, the stress tests and ``vblk bench``. It plays
what QEMU plus a guest driver do, against any vhost-user-blk backend on a Unix socket:

* ``GuestRam`` -- a memfd mapped MAP_SHARED; guest-physical address ``gpa_base`` is offset 0.
  It can be cut into several memory regions (sharing the one memfd) so a buffer can span a
  region boundary. Ring addresses in SET_VRING_ADDR are *frontend virtual* addresses matched
  against each region's ``userspace_addr``; descriptor addresses are guest-physical. The fake
  virtual addresses put the regions far apart, so a backend that mixes the two is caught.
* ``VhostUserFrontend`` -- one method per request, named after it, and ``handshake``, which
  sends what QEMU 7.2 sends at realize. With REPLY_ACK every message without a reply body
  carries NEED_REPLY and its ack is checked. Replies must have flags 0x5, the same request id
  and the exact size.
* The backend channel: with protocol feature BACKEND_REQ (ask for it in
  ``protocol_features``) the handshake hands the backend one end of a socketpair
  (SET_BACKEND_REQ_FD, as QEMU does at realize); ``recv_backend_request`` reads what the
  backend sends on it (CONFIG_CHANGE_MSG on a resize) and acks it if asked to.
* ``BlkClient`` -- virtio-blk requests through a ``SplitDriver``: synchronous ``read``,
  ``write``, ``flush``, ``get_id``, and ``submit`` / ``wait`` to keep many requests in flight,
  with optional indirect tables, data split over several descriptors, and raw chains.

Nothing waits without a deadline: every socket operation and every ``wait`` raises a
``BackendError`` subclass when the backend is silent, closes the connection, or answers wrong.
Every fd opened here (memfd, eventfds, socket) is closed by a ``close()``; all three classes
are context managers.

Public API::

    with BlkClient.connect(sock, ram_mib=32, split_at=(), mem_slots=None, timeout=10.0,
                           features=DEFAULT_FEATURES, queue_size=128, indirect=False,
                           segments=1) as client:
        client.read(sector, nbytes) / write(sector, data) / flush() / get_id() -> Completion
        tag = client.submit(BlkType.IN, sector, nbytes=4096, indirect=None, segments=None,
                            data_gpa=None, publish=True)
        client.publish(); client.wait(min_completions=1, timeout=None) -> list[Completion]
        client.submit_raw([(addr, len, flags, next), ...]) -> tag
        client.refresh_config() -> BlkConfig (GET_CONFIG again, e.g. after CONFIG_CHANGE_MSG)
        client.frontend.recv_backend_request(timeout) -> (Header, payload)
        client.set_writeback(on); client.stop() -> next avail index; client.close(graceful=True)
        client.driver (SplitDriver), client.allocator, client.ram, client.frontend
"""
from __future__ import annotations

import itertools
import mmap
import os
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vblk.errors import FrontendProtocolError, VblkError
from vblk.testing.driver import Allocator, RawDesc, RingFull, RingLayout, SplitDriver
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import FrontendReq as R
from vblk.vhost_user.messages import ProtocolFeature as P
from vblk.vhost_user.transport import PeerClosed, recv_message, send_message
from vblk.virtio.blk import CONFIG_WRITEBACK_OFFSET, OUTHDR, BlkConfig
from vblk.virtio.constants import BLK_ID_BYTES, BlkType, Feature

MiB = 1 << 20
QEMU_CONFIG_SIZE = 57          # what QEMU 7.2 asks for: up to write_zeroes_may_unmap
UVA_BASE = 0x7F00_0000_0000    # fake frontend-virtual address of region 0
UVA_STRIDE = 1 << 36           # distance between the regions' fake virtual addresses
STATUS_UNSET = 0xFF            # a status byte the device never wrote reads as this

DEFAULT_FEATURES = sum(f.mask for f in (
    Feature.VERSION_1, Feature.VHOST_USER_PROTOCOL_FEATURES, Feature.BLK_SIZE_MAX,
    Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE, Feature.BLK_FLUSH, Feature.BLK_TOPOLOGY,
    Feature.BLK_CONFIG_WCE, Feature.BLK_MQ, Feature.BLK_RO, Feature.RING_INDIRECT_DESC,
    Feature.RING_EVENT_IDX))
DEFAULT_PROTOCOL_FEATURES = (P.MQ.mask | P.REPLY_ACK.mask | P.CONFIG.mask
                             | P.CONFIGURE_MEM_SLOTS.mask)


class BackendError(VblkError):
    """The backend under test misbehaved; the message says how."""


class BackendTimeout(BackendError, TimeoutError):
    """The backend did not answer or complete within the deadline."""


class BackendClosed(BackendError):
    """The backend closed the connection (or it broke)."""


class BadReply(BackendError):
    """A reply with the wrong flags, request id or size."""


class BackendRefused(BackendError):
    """The backend acked a message with a non-zero code."""


class VringError(BackendError):
    """The backend signalled the queue's error eventfd (it found the ring broken)."""


class GuestRam:
    """``size_mib`` MiB of shared guest memory, cut into regions at the ``split_at`` gpas."""

    def __init__(self, size_mib: int = 64, *, split_at: Sequence[int] = (), gpa_base: int = 0) -> None:
        self.size = size_mib * MiB
        self.gpa_base = gpa_base
        cuts = [0, *sorted(g - gpa_base for g in split_at), self.size]
        if any(b <= a for a, b in zip(cuts, cuts[1:])) or len(cuts) - 1 > m.MAX_MEM_REGIONS:
            raise ValueError(f"bad region split {list(split_at)} of {self.size} bytes")
        self.regions = [m.MemRegion(gpa_base + lo, hi - lo, UVA_BASE + i * UVA_STRIDE + lo, lo)
                        for i, (lo, hi) in enumerate(zip(cuts, cuts[1:]))]
        self.fd = os.memfd_create("vblk-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._mm = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._mm)

    @property
    def end(self) -> int:
        return self.gpa_base + self.size

    def uva(self, gpa: int) -> int:
        """The fake frontend-virtual address of ``gpa`` (for ring addresses)."""
        for r in self.regions:
            if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                return r.userspace_addr + gpa - r.guest_phys_addr
        raise ValueError(f"gpa {gpa:#x} is outside guest RAM")

    def read(self, gpa: int, length: int) -> bytes:
        off = gpa - self.gpa_base
        return self.view[off:off + length].tobytes()

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - self.gpa_base
        self.view[off:off + len(data)] = data

    def close(self) -> None:
        """Unmap and close the memfd (every view from ``view`` must be released first)."""
        if self.fd < 0:
            return
        self.view.release()
        self._mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class QueueFds:
    """The eventfds of one started queue (ours; the backend got duplicates)."""
    kick: int
    call: int
    err: int

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _drain(fd: int) -> bool:
    """Read an eventfd's counter; True if it was non-zero."""
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


class VhostUserFrontend:
    """One vhost-user connection, frontend side. ``timeout`` bounds every reply."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 10.0,
                 features: int = DEFAULT_FEATURES,
                 protocol_features: int = DEFAULT_PROTOCOL_FEATURES) -> None:
        self.timeout = timeout
        self.wanted_features = features | Feature.VHOST_USER_PROTOCOL_FEATURES.mask
        self.wanted_protocol_features = protocol_features
        self.offered_features = 0      # what GET_FEATURES said
        self.features = 0              # negotiated virtio features (after negotiate)
        self.protocol_features = 0     # negotiated protocol features
        self.max_queues = 1
        self.max_mem_slots: int | None = None
        self.config: BlkConfig | None = None
        self.ram: GuestRam | None = None
        self.queues: dict[int, QueueFds] = {}
        self.reply_fds: list[int] = []
        self.backend_channel: socket.socket | None = None     # our end, after SET_BACKEND_REQ_FD
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(os.fspath(path))
        except OSError as exc:
            self.sock.close()
            raise BackendClosed(f"cannot connect to {os.fspath(path)}: {exc}") from exc

    # -- framing -------------------------------------------------------------------------
    def _call(self, req: R, payload: bytes = b"", fds: Sequence[int] = (),
              reply_size: int | None = None) -> bytes:
        """Send one message; return its reply body, or b"" once the ack (if any) is checked."""
        ack = reply_size is None and bool(self.protocol_features & P.REPLY_ACK.mask)
        flags = m.VERSION | (m.FLAG_NEED_REPLY if ack else 0)
        try:
            send_message(self.sock, m.encode(req, payload, flags), list(fds))
        except TimeoutError as exc:
            raise BackendTimeout(f"{req.name}: backend did not read within {self.timeout} s") from exc
        except OSError as exc:
            raise BackendClosed(f"{req.name}: sending failed: {exc}") from exc
        if reply_size is None and not ack:
            return b""
        body = self._reply(req, m.U64.size if ack else reply_size)
        if ack and (code := m.U64.unpack(body)[0]):
            raise BackendRefused(f"{req.name}: backend acked with {code}")
        return body

    def _reply(self, req: R, size: int) -> bytes:
        try:
            header, body, fds = recv_message(self.sock)
        except PeerClosed as exc:
            raise BackendClosed(f"{req.name}: backend closed the connection before replying") from exc
        except TimeoutError as exc:
            raise BackendTimeout(f"{req.name}: no reply within {self.timeout} s") from exc
        except FrontendProtocolError as exc:
            raise BadReply(f"{req.name}: malformed reply: {exc}") from exc
        except OSError as exc:
            raise BackendClosed(f"{req.name}: receiving failed: {exc}") from exc
        if req == R.GET_INFLIGHT_FD:
            self.reply_fds = fds             # the caller takes them
        else:
            for fd in fds:
                os.close(fd)
        if header.flags != m.REPLY_FLAGS:
            raise BadReply(f"{req.name}: reply flags {header.flags:#x}, want {m.REPLY_FLAGS:#x}")
        if header.request != req:
            raise BadReply(f"{req.name}: reply is for request {m.request_name(header.request)}")
        if header.size != size:
            raise BadReply(f"{req.name}: reply of {header.size} bytes, want {size}")
        return body

    def _u64(self, req: R) -> int:
        return m.U64.unpack(self._call(req, reply_size=m.U64.size))[0]

    # -- one method per request ----------------------------------------------------------
    def get_features(self) -> int:
        return self._u64(R.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._call(R.SET_FEATURES, m.U64.pack(features))
        self.features = features

    def set_log_base(self, fd: int, size: int, offset: int = 0) -> None:
        """Hand over a migration's dirty log (LOG_SHMFD): always answered with a u64."""
        self._call(R.SET_LOG_BASE, m.LOG.pack(size, offset), [fd], reply_size=m.U64.size)

    def get_protocol_features(self) -> int:
        return self._u64(R.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._call(R.SET_PROTOCOL_FEATURES, m.U64.pack(features))
        self.protocol_features = features

    def get_queue_num(self) -> int:
        return self._u64(R.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        return self._u64(R.GET_MAX_MEM_SLOTS)

    def set_owner(self) -> None:
        self._call(R.SET_OWNER)

    def get_config(self, size: int = QEMU_CONFIG_SIZE, offset: int = 0) -> bytes:
        msg = m.ConfigMsg(offset, size, 0, bytes(size)).pack()
        reply = m.ConfigMsg.unpack(self._call(R.GET_CONFIG, msg, reply_size=len(msg)))
        if (reply.offset, reply.size) != (offset, size):
            raise BadReply(f"GET_CONFIG reply for offset {reply.offset} size {reply.size}")
        return reply.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self._call(R.SET_CONFIG, m.ConfigMsg(offset, len(data), flags, data).pack())

    def set_mem_table(self, regions: Sequence[m.MemRegion], fds: Sequence[int]) -> None:
        self._call(R.SET_MEM_TABLE, m.pack_mem_table(list(regions)), fds)

    def add_mem_reg(self, region: m.MemRegion, fd: int) -> None:
        self._call(R.ADD_MEM_REG, m.pack_single_region(region), [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        self._call(R.SET_VRING_NUM, m.VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self._call(R.SET_VRING_BASE, m.VringState(index, base).pack())

    def get_vring_base(self, index: int) -> int:
        reply = self._call(R.GET_VRING_BASE, m.VringState(index, 0).pack(),
                           reply_size=m.VRING_STATE.size)
        state = m.VringState.unpack(reply)
        if state.index != index:
            raise BadReply(f"GET_VRING_BASE reply for queue {state.index}, asked {index}")
        return state.num

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0) -> None:
        self._call(R.SET_VRING_ADDR, m.VringAddr(index, flags, desc, used, avail, 0).pack())

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_file(R.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_file(R.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._vring_file(R.SET_VRING_ERR, index, fd)

    def _vring_file(self, req: R, index: int, fd: int | None) -> None:
        value = index | (m.VRING_FILE_NOFD if fd is None else 0)
        self._call(req, m.U64.pack(value), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(R.SET_VRING_ENABLE, m.VringState(index, int(enable)).pack())

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, m.Inflight]:
        """The backend's new inflight region (fd, description); the caller keeps the fd."""
        msg = m.Inflight(0, 0, num_queues, queue_size).pack()
        reply = m.Inflight.unpack(self._call(R.GET_INFLIGHT_FD, msg, reply_size=len(msg)))
        if not self.reply_fds:
            raise BadReply("GET_INFLIGHT_FD reply carries no fd")
        fd, extra = self.reply_fds[0], self.reply_fds[1:]
        for x in extra:
            os.close(x)
        self.reply_fds = []
        return fd, reply

    def set_inflight_fd(self, fd: int, inflight: m.Inflight) -> None:
        self._call(R.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def set_backend_req_fd(self) -> None:
        """Open the backend channel: a socketpair whose other end goes to the backend."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._call(R.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if self.backend_channel is not None:
            self.backend_channel.close()
        self.backend_channel = ours

    def recv_backend_request(self, timeout: float | None = None) -> tuple[m.Header, bytes]:
        """The next message the backend sends on the backend channel (its fds are closed);
        answers it with a zero ack when it carries NEED_REPLY, as QEMU does.
        BackendTimeout if none arrives within ``timeout`` (default: the frontend's)."""
        if self.backend_channel is None:
            raise RuntimeError("no backend channel (BACKEND_REQ was not negotiated)")
        chan = self.backend_channel
        chan.settimeout(self.timeout if timeout is None else timeout)
        try:
            header, payload, fds = recv_message(chan)
        except TimeoutError as exc:
            raise BackendTimeout("nothing arrived on the backend channel") from exc
        except PeerClosed as exc:
            raise BackendClosed("the backend closed the backend channel") from exc
        except FrontendProtocolError as exc:
            raise BadReply(f"malformed backend request: {exc}") from exc
        for fd in fds:
            os.close(fd)
        if header.need_reply:
            send_message(chan, m.encode_reply(header.request, m.U64.pack(0)))
        return header, payload

    # -- sequences -----------------------------------------------------------------------
    def handshake(self) -> BlkConfig:
        """QEMU 7.2's realize: negotiate, take ownership, read the config space."""
        offered = self.get_features()
        need = Feature.VHOST_USER_PROTOCOL_FEATURES.mask | Feature.VERSION_1.mask
        if offered & need != need:
            raise BackendError(f"backend features {offered:#x} lack PROTOCOL_FEATURES or VERSION_1")
        self.offered_features = offered
        proto = self.get_protocol_features() & self.wanted_protocol_features
        if not proto & P.CONFIG.mask:
            raise BackendError("backend does not offer protocol feature CONFIG")
        self.set_protocol_features(proto)
        if proto & P.MQ.mask:
            self.max_queues = self.get_queue_num()
        if proto & P.CONFIGURE_MEM_SLOTS.mask:
            self.max_mem_slots = self.get_max_mem_slots()
        if proto & P.BACKEND_REQ.mask:
            self.set_backend_req_fd()
        self.set_owner()
        self.config = BlkConfig.unpack(self.get_config())
        return self.config

    def negotiate(self) -> int:
        """SET_FEATURES with what both sides want; returns the negotiated set."""
        self.set_features(self.offered_features & self.wanted_features)
        return self.features

    def set_memory(self, ram: GuestRam, *, mem_slots: bool | None = None) -> None:
        """Hand over guest RAM: ADD_MEM_REG per region when CONFIGURE_MEM_SLOTS is negotiated
        (as QEMU does) unless ``mem_slots`` is False, else one SET_MEM_TABLE."""
        if mem_slots is None:
            mem_slots = bool(self.protocol_features & P.CONFIGURE_MEM_SLOTS.mask)
        if mem_slots:
            for region in ram.regions:
                self.add_mem_reg(region, ram.fd)
        else:
            self.set_mem_table(ram.regions, [ram.fd] * len(ram.regions))
        self.ram = ram

    def start_queue(self, index: int, layout: RingLayout, *, base: int = 0) -> QueueFds:
        """SET_VRING_NUM/BASE/ADDR/KICK/CALL/ERR, then SET_VRING_ENABLE 1."""
        if self.ram is None:
            raise RuntimeError("set_memory() before start_queue()")
        if index in self.queues:
            raise RuntimeError(f"queue {index} is already started")
        uva = self.ram.uva
        self.set_vring_num(index, layout.size)
        self.set_vring_base(index, base)
        self.set_vring_addr(index, uva(layout.desc), uva(layout.used), uva(layout.avail))
        fds = QueueFds(_eventfd(), _eventfd(), _eventfd())
        try:
            self.set_vring_kick(index, fds.kick)
            self.set_vring_call(index, fds.call)
            self.set_vring_err(index, fds.err)
            self.set_vring_enable(index, True)
        except BaseException:
            fds.close()
            raise
        self.queues[index] = fds
        return fds

    def stop_queue(self, index: int) -> int:
        """SET_VRING_ENABLE 0 then GET_VRING_BASE; returns the backend's next avail index."""
        fds = self.queues.pop(index)
        try:
            self.set_vring_enable(index, False)
            return self.get_vring_base(index)
        finally:
            fds.close()

    def kick(self, index: int) -> None:
        os.eventfd_write(self.queues[index].kick, 1)

    def vring_error(self, index: int) -> bool:
        """Has the backend written the queue's error eventfd (since the last call)?"""
        return _drain(self.queues[index].err)

    def close(self) -> None:
        """Close the socket and every queue's eventfds (no message is sent)."""
        for fds in self.queues.values():
            fds.close()
        self.queues.clear()
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None
        self.sock.close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Completion:
    """One finished request. ``status`` is None for raw chains; ``data`` is set for reads."""
    tag: int
    type: int
    sector: int
    status: int | None
    data: bytes | None
    used_len: int


@dataclass(slots=True)
class _Request:
    tag: int
    type: int
    sector: int
    header: int | None                 # gpa of header (16 bytes) + status byte at +16
    data_gpa: int | None
    nbytes: int
    owns_data: bool
    device_writes_data: bool


HEADER_BLOCK = 64                      # header and status byte share one allocation


class BlkClient:
    """virtio-blk requests on one queue of a frontend that has negotiated and set memory.

    The ring sits at the start of guest RAM (or of ``area``, a (gpa, length) part of it); the
    rest is the data allocator's. Clients of several queues of one frontend share its RAM by
    taking disjoint areas (see ``open_queues``)."""

    def __init__(self, frontend: VhostUserFrontend, ram: GuestRam, *, queue_size: int = 128,
                 queue_index: int = 0, indirect: bool = False, segments: int = 1,
                 timeout: float | None = None, owns: bool = False, inflight: bool = False,
                 area: tuple[int, int] | None = None) -> None:
        self.frontend, self.ram, self.queue_index = frontend, ram, queue_index
        self.indirect, self.segments = indirect, segments
        self.timeout = frontend.timeout if timeout is None else timeout
        self._owns = owns
        self.config = frontend.config
        area_start, area_end = (ram.gpa_base, ram.end) if area is None else (area[0], area[0] + area[1])
        if area_start < ram.gpa_base or area_end > ram.end:
            raise ValueError(f"area {area} is outside the guest RAM")
        self.area_end = area_end
        layout = RingLayout.at(area_start, queue_size)
        data_start = -(-layout.end // 4096) * 4096
        self.allocator = Allocator(data_start, area_end - data_start, align=512)
        # One header block per request that can be in flight (each takes a descriptor).
        pool = self.allocator.alloc(HEADER_BLOCK * queue_size)
        self._headers = [pool + HEADER_BLOCK * i for i in range(queue_size)]
        event_idx = bool(frontend.features & Feature.RING_EVENT_IDX.mask)
        self.driver = SplitDriver(ram.view, layout, base=ram.gpa_base, allocator=self.allocator,
                                  event_idx=event_idx)
        self._pending: dict[int, _Request] = {}          # by head
        self._ready: list[Completion] = []               # collected, not yet returned
        self._tags = itertools.count(1)
        self._closed = False
        self.broken = False          # a BackendError was raised: close() sends nothing more
        self.layout = layout
        self.inflight_fd: int | None = None      # kept across backend restarts, as QEMU does
        self.inflight_desc: m.Inflight | None = None
        try:
            if inflight:
                if not frontend.protocol_features & P.INFLIGHT_SHMFD.mask:
                    raise BackendError("backend does not offer INFLIGHT_SHMFD")
                self.inflight_fd, self.inflight_desc = frontend.get_inflight_fd(1, queue_size)
                frontend.set_inflight_fd(self.inflight_fd, self.inflight_desc)
            self.fds = frontend.start_queue(queue_index, layout)
        except BaseException:
            self.driver.close()
            if self.inflight_fd is not None:
                os.close(self.inflight_fd)
            raise
        self._watch_fds()

    def _watch_fds(self) -> None:
        self._poll = select.poll()
        for fd in (self.fds.call, self.fds.err, self.frontend.sock.fileno()):
            self._poll.register(fd, select.POLLIN)

    def reconnect(self, path: str | os.PathLike, *, attempts: int = 100) -> None:
        """What QEMU does when a backend it was using dies and a new one listens: connect
        again, hand over the same RAM and inflight region, restart the queue at the device's
        used index. Requests in flight stay in flight; the new backend must finish them."""
        old = self.frontend
        for fds in old.queues.values():
            fds.close()
        old.queues.clear()
        if old.backend_channel is not None:
            old.backend_channel.close()
            old.backend_channel = None
        old.sock.close()
        for attempt in range(attempts):       # like QEMU's reconnect=N: try until it works
            try:
                new = VhostUserFrontend(path, timeout=old.timeout, features=old.wanted_features,
                                        protocol_features=old.wanted_protocol_features)
            except BackendClosed:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
                continue
            try:
                new.handshake()
                new.negotiate()
                if self.inflight_fd is not None:
                    new.set_inflight_fd(self.inflight_fd, self.inflight_desc)
                new.set_memory(self.ram)
                used_idx = int.from_bytes(self.ram.read(self.layout.used + 2, 2), "little")
                self.fds = new.start_queue(self.queue_index, self.layout, base=used_idx)
                break
            except BackendClosed:
                new.close()
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
            except BaseException:
                new.close()
                raise
        self.frontend = new
        self.broken = False
        self._watch_fds()

    @classmethod
    def connect(cls, path: str | os.PathLike, *, ram_mib: int = 32, split_at: Sequence[int] = (),
                mem_slots: bool | None = None, timeout: float = 10.0,
                features: int = DEFAULT_FEATURES,
                protocol_features: int = DEFAULT_PROTOCOL_FEATURES, **kw) -> BlkClient:
        """Connect, handshake, hand over a fresh GuestRam and start queue 0; owns them all."""
        if kw.get("inflight"):
            protocol_features |= P.INFLIGHT_SHMFD.mask
        ram = GuestRam(ram_mib, split_at=split_at)
        frontend = None
        try:
            frontend = VhostUserFrontend(path, timeout=timeout, features=features,
                                         protocol_features=protocol_features)
            frontend.handshake()
            frontend.negotiate()
            frontend.set_memory(ram, mem_slots=mem_slots)
            return cls(frontend, ram, owns=True, **kw)
        except BaseException:
            if frontend is not None:
                frontend.close()
            ram.close()
            raise

    def open_queues(self, count: int, **kw) -> list[BlkClient]:
        """Start queues 1..count-1 on this client's frontend; returns [self, q1, q2, ...].

        Needs a client made by ``connect(..., area=(gpa, n))`` leaving RAM free after it: the
        other queues get equal areas of the rest. The extra clients are closed by this one's
        close() only if the caller closes them first (close them in reverse order)."""
        start = self.area_end
        size = (self.ram.end - start) // max(count - 1, 1) // 4096 * 4096
        kw.setdefault("queue_size", self.layout.size)
        kw.setdefault("timeout", self.timeout)
        clients = [self]
        try:
            for i in range(1, count):
                clients.append(BlkClient(self.frontend, self.ram, queue_index=i,
                                         area=(start + (i - 1) * size, size), **kw))
        except BaseException:
            for c in reversed(clients[1:]):
                c.close()
            raise
        return clients

    # -- synchronous requests ------------------------------------------------------------
    def read(self, sector: int, nbytes: int, **kw) -> Completion:
        return self._run(self.submit(BlkType.IN, sector, nbytes=nbytes, **kw))

    def write(self, sector: int, data: bytes, **kw) -> Completion:
        return self._run(self.submit(BlkType.OUT, sector, data=data, **kw))

    def flush(self, **kw) -> Completion:
        return self._run(self.submit(BlkType.FLUSH, 0, **kw))

    def get_id(self, **kw) -> Completion:
        return self._run(self.submit(BlkType.GET_ID, 0, nbytes=BLK_ID_BYTES, **kw))

    def _run(self, tag: int) -> Completion:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, c in enumerate(self._ready):
                if c.tag == tag:
                    return self._ready.pop(i)
            self._collect(deadline)

    # -- asynchronous requests -----------------------------------------------------------
    def submit(self, req_type: int, sector: int = 0, *, data: bytes | None = None, nbytes: int = 0,
               indirect: bool | None = None, segments: int | Sequence[int] | None = None,
               data_gpa: int | None = None, publish: bool = True) -> int:
        """Queue one request; returns its tag. ``data`` is device-readable (a write), ``nbytes``
        a device-writable buffer (a read). ``segments`` splits the data over that many
        descriptors (or sizes); ``data_gpa`` places it (caller-owned memory). RingFull if the
        queue has no room."""
        writes_data = data is None
        length = nbytes if writes_data else len(data)
        if not self._headers:
            raise RingFull(f"{len(self._pending)} requests in flight fill the queue")
        header = self._headers.pop()
        owns = data_gpa is None and length > 0
        try:
            if owns:
                data_gpa = self.allocator.alloc(length)
            self.ram.write(header, OUTHDR.pack(int(req_type), 0, sector) + bytes([STATUS_UNSET]))
            if not writes_data:
                self.ram.write(data_gpa, data)
            pieces = _split(data_gpa, length, self.segments if segments is None else segments)
            buffers = [(header, OUTHDR.size, False), *((g, n, writes_data) for g, n in pieces),
                       (header + OUTHDR.size, 1, True)]
            head = self.driver.add_chain(buffers, self.indirect if indirect is None else indirect)
        except BaseException:
            self._headers.append(header)
            if owns and data_gpa is not None:
                self.allocator.free(data_gpa)
            raise
        tag = next(self._tags)
        self._pending[head] = _Request(tag, int(req_type), sector, header, data_gpa, length, owns,
                                       writes_data)
        if publish:
            self.publish()
        return tag

    def submit_raw(self, descs: Sequence[RawDesc], *, publish: bool = True) -> int:
        """Queue a hand-built chain of ring descriptors, written exactly as given except that a
        ``next`` below ``len(descs)`` is a position in ``descs`` (translated to the ring index).
        The device may return it (a Completion with status None) or reject the ring."""
        indices = self.driver.alloc_descriptors(len(descs))
        for i, (addr, length, flags, nxt) in enumerate(descs):
            self.driver.write_descriptor(indices[i], addr, length, flags,
                                         indices[nxt] if nxt < len(descs) else nxt)
        self.driver.push_head(indices[0], indices)
        tag = next(self._tags)
        self._pending[indices[0]] = _Request(tag, -1, 0, None, None, 0, False, False)
        if publish:
            self.publish()
        return tag

    def publish(self) -> None:
        """Make submitted requests visible and kick if the backend wants it."""
        if self.driver.publish():
            os.eventfd_write(self.fds.kick, 1)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def wait(self, min_completions: int = 1, timeout: float | None = None) -> list[Completion]:
        """Block until at least ``min_completions`` requests finished; returns all finished ones.

        Raises BackendTimeout after ``timeout`` (default: the client's), BackendClosed if the
        connection drops, VringError if the backend signals the error eventfd."""
        if min_completions > len(self._pending) + len(self._ready):
            raise ValueError(f"waiting for {min_completions} completions with "
                             f"{len(self._pending)} in flight")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self._ready) < min_completions:
            self._collect(deadline)
        done, self._ready = self._ready, []
        return done

    def _collect(self, deadline: float) -> None:
        try:
            self._collect_or_sleep(deadline)
        except BackendError:
            self.broken = True
            raise

    def _collect_or_sleep(self, deadline: float) -> None:
        """Move finished requests to ``_ready``, sleeping on the call eventfd if none are."""
        if self._harvest():
            return
        while not self.driver.arm_interrupts():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendTimeout(self._stuck_message())
            events = dict(self._poll.poll(remaining * 1000))
            if self.fds.err in events and _drain(self.fds.err):
                raise VringError(f"backend signalled an error on queue {self.queue_index}")
            if self.frontend.sock.fileno() in events:
                if self._harvest():       # a backend may finish its work, then hang up
                    return
                self._check_socket()
            if self.fds.call in events:
                _drain(self.fds.call)
        self._harvest()

    def _check_socket(self) -> None:
        try:
            data = self.frontend.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            raise BackendClosed(f"connection failed: {exc}") from exc
        if not data:
            raise BackendClosed(f"backend closed the connection with {len(self._pending)} "
                                "requests in flight")
        raise BadReply("backend sent an unsolicited message on the frontend channel")

    def _stuck_message(self) -> str:
        d = self.driver
        return (f"{len(self._pending)} requests still in flight at the deadline "
                f"(avail.idx {d.published_idx}, used elements consumed {d.last_used_idx})")

    def _harvest(self) -> int:
        used = self.driver.used_since_last()
        for head, used_len in used:
            self._ready.append(self._complete(self._pending.pop(head), used_len))
        return len(used)

    def _complete(self, req: _Request, used_len: int) -> Completion:
        status = data = None
        if req.header is not None:
            status = self.ram.view[req.header - self.ram.gpa_base + OUTHDR.size]
            self._headers.append(req.header)
        if req.data_gpa is not None:
            if req.device_writes_data:
                data = self.ram.read(req.data_gpa, req.nbytes)
            if req.owns_data:
                self.allocator.free(req.data_gpa)
        return Completion(req.tag, req.type, req.sector, status, data, used_len)

    # -- lifetime ------------------------------------------------------------------------
    def refresh_config(self) -> BlkConfig:
        """Read the config space again (what QEMU does on CONFIG_CHANGE_MSG)."""
        self.config = self.frontend.config = BlkConfig.unpack(self.frontend.get_config())
        return self.config

    def set_writeback(self, on: bool) -> None:
        """The guest's cache-mode write: SET_CONFIG of the writeback byte."""
        self.frontend.set_config(CONFIG_WRITEBACK_OFFSET, bytes([int(on)]))

    def stop(self) -> int:
        """Stop the queue (ENABLE 0 + GET_VRING_BASE); returns the backend's next avail index."""
        return self.frontend.stop_queue(self.queue_index)

    def close(self, *, graceful: bool = True) -> None:
        """Stop the queue (if ``graceful``, still started and the backend not found broken),
        release the ring's views and, if this client owns them, the frontend and the RAM."""
        if self._closed:
            return
        self._closed = True
        try:
            if graceful and not self.broken and self.queue_index in self.frontend.queues:
                self.stop()
        finally:
            fds = self.frontend.queues.pop(self.queue_index, None)
            if fds is not None:
                fds.close()
            self.driver.close()
            if self.inflight_fd is not None:
                os.close(self.inflight_fd)
                self.inflight_fd = None
            if self._owns:
                self.frontend.close()
                self.ram.close()

    def __enter__(self) -> BlkClient:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close(graceful=exc_type is None)
        except BackendError:
            if exc_type is None:
                raise


def _split(gpa: int | None, length: int, segments: int | Sequence[int]) -> list[tuple[int, int]]:
    """Cut [gpa, gpa+length) into pieces: ``segments`` equal-ish parts, or the given sizes."""
    if not length or gpa is None:
        return []
    if segments == 1:
        return [(gpa, length)]
    if isinstance(segments, int):
        count = max(1, min(segments, length))
        sizes = [length // count + (1 if i < length % count else 0) for i in range(count)]
    else:
        sizes = list(segments)
        if sum(sizes) != length or any(s <= 0 for s in sizes):
            raise ValueError(f"segment sizes {sizes} do not add up to {length}")
    out = []
    for n in sizes:
        out.append((gpa, n))
        gpa += n
    return out


__all__ = ["BackendClosed", "BackendError", "BackendRefused", "BackendTimeout", "BadReply",
           "BlkClient", "Completion", "GuestRam", "QueueFds", "VhostUserFrontend", "VringError",
           "STATUS_UNSET"]
