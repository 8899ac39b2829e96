"""Fuzz the vhost-user session: random message sequences into ``Session.handle``.

A sequence is a list of messages, often after a valid set-up prelude (features, memory table,
one ring started) so the later messages hit a running device. Each message has a request id
(known or not), flags (valid, NEED_REPLY, random bits), a payload (valid-looking with
random fields, random bytes, empty, truncated or extended) and 0-9 real fds (eventfds,
memfds big enough to map, memfds too small).

The host is a fake that does what the supervisor does with memory: it maps every table
with the real ``GuestMemory.from_fds`` (closing the previous one), builds a ``SplitRing``
for every started queue (so ring addresses are translated) and re-resolves them on a new
table.

Invariants:

* only ``DropConnection`` escapes ``handle``; when the frontend asked for an ack of a
  message without a reply body it carries a well-formed nack (and otherwise none);
* every reply is one well-formed message: flags exactly 0x5, the request id echoed, the
  size field equal to the body, an ack body of 8 bytes holding 0 or 1, and the body size
  each GET_* request must have;
* after every message the process holds exactly the fds the session says it keeps (ring
  eventfds, memory-slot fds, the backend channel) plus one per live mapping, all open;
* after ``session.close()`` not one fd passed in is left open;
* allocation stays bounded: a few big-looking inputs under tracemalloc peak below 4 MiB.

Knobs (environment): VBLK_FUZZ_EXAMPLES sequences per round (default 250), VBLK_FUZZ_ROUNDS,
VBLK_FUZZ_STATS (see test_fuzz_ring.py).
"""
from __future__ import annotations

import logging
import mmap
import os
import random
import time
import tracemalloc
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vblk.device import BlkDevice, Geometry
from vblk.dirtylog import DirtyLog
from vblk.errors import FrontendProtocolError, GuestError
from vblk.memory import GuestMemory
from vblk.testing import fuzzstats
from vblk.testing.fuzzstats import record
from vblk.testing.processes import open_fds
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import FrontendReq as R
from vblk.vhost_user.session import _HAS_REPLY_BODY, DropConnection, Session
from vblk.virtio.ring import SplitRing

EXAMPLES = fuzzstats.examples(250)
ROUNDS = fuzzstats.rounds()

SETTINGS = fuzzstats.hypothesis_settings(EXAMPLES)

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
REGION = 64 << 10                    # each valid region: 64 KiB
MEMFD_SIZE = 1 << 20                 # a memfd big enough for any valid region below
UVAS = [0x7F00_0000_0000, 0x7F10_0000_0000, 0x7F20_0000_0000]
VALID_REGIONS = [m.MemRegion(i * REGION, REGION, UVAS[i], i * 4096) for i in range(3)]
REPLY_BODY_SIZE = {R.GET_FEATURES: 8, R.GET_PROTOCOL_FEATURES: 8, R.GET_QUEUE_NUM: 8,
                   R.GET_MAX_MEM_SLOTS: 8, R.GET_VRING_BASE: 8, R.GET_INFLIGHT_FD: 24}
UNKNOWN_IDS = [0, 26, 31, 33, 35, 40, 41, 99, 1 << 16, U32_MAX]
REQUESTS = [int(r) for r in R] + UNKNOWN_IDS


# -- the fake host ---------------------------------------------------------------------------

class MappingHost:
    """QueueHost that maps memory for real and resolves rings in it, like the supervisor."""

    def __init__(self, stats: Counter) -> None:
        self.stats = stats
        self.memory = GuestMemory.empty()
        self.rings: dict[int, SplitRing] = {}
        self.specs: dict[int, tuple] = {}
        self.calls: dict[int, int | None] = {}
        self.inflight: mmap.mmap | None = None
        self.log: DirtyLog | None = None

    def set_memory(self, slots) -> None:
        """Map the new table, re-resolve the running rings in it (memory hot-plug); a table
        that drops a running ring is refused with everything left as it was."""
        for s in slots:
            os.fstat(s.fd)                      # the session hands over open fds only
        new = GuestMemory.from_fds([s.region for s in slots], [s.fd for s in slots])
        rebuilt = {}
        try:
            for q, (size, desc, avail, used, indirect) in self.specs.items():
                rebuilt[q] = SplitRing(new, size, desc, avail, used,
                                       last_avail_idx=self.rings[q].last_avail_idx,
                                       indirect=indirect)
        except GuestError as exc:
            for ring in rebuilt.values():
                ring.detach()
            new.close()
            self.stats["remap_refused"] += 1
            raise FrontendProtocolError(f"the new table drops a running ring: {exc}") from exc
        for ring in self.rings.values():
            ring.detach()
        self.rings = rebuilt
        old, self.memory = self.memory, new
        old.close()
        self.stats["mappings"] += 1

    def set_log(self, fd, size, offset) -> None:
        """Map the dirty log for real, as the supervisor does (a bad one is refused)."""
        if self.log is not None:
            self.log.close()
            self.log = None
        if fd is not None:
            self.log = DirtyLog(fd, size, offset)
            self.stats["logs_mapped"] += 1

    def set_logging(self, on: bool) -> None:
        self.stats["logging_" + ("on" if on else "off")] += 1

    def start_queue(self, vring, features: int) -> None:
        assert vring.kick_fd is not None and vring.addr is not None and vring.num
        os.fstat(vring.kick_fd)
        a = vring.addr
        indirect = bool(features & (1 << 28))
        ring = SplitRing(self.memory, vring.num, a.desc, a.avail, a.used,
                         last_avail_idx=vring.base, indirect=indirect)
        self.rings[vring.index] = ring
        self.specs[vring.index] = (vring.num, a.desc, a.avail, a.used, indirect)
        self.stats["rings_started"] += 1

    def stop_queue(self, index: int) -> int:
        self.specs.pop(index, None)
        ring = self.rings.pop(index, None)
        if ring is None:
            return 0
        ring.detach()
        self.stats["rings_stopped"] += 1
        return ring.last_avail_idx

    def set_call(self, index: int, fd: int | None) -> None:
        if fd is not None:
            os.fstat(fd)
        self.calls[index] = fd

    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        assert 1 <= num_queues and 0 < queue_size <= 32768
        size = num_queues * 16 * (queue_size + 1)
        fd = os.memfd_create("fuzz-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        self.stats["inflight_created"] += 1
        return fd, size

    def set_inflight(self, fd: int | None, size: int, offset: int, num_queues: int,
                     queue_size: int) -> None:
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        if fd is None:
            return
        os.fstat(fd)
        assert 0 < size <= 64 << 20 and 0 <= offset <= 64 << 20, (size, offset)
        try:
            self.inflight = mmap.mmap(fd, offset + size, mmap.MAP_SHARED)
        except (OSError, ValueError) as exc:
            raise FrontendProtocolError(f"cannot map the inflight region: {exc}") from exc
        self.stats["inflight_mapped"] += 1

    def live_mappings(self) -> int:
        """Mappings alive, each holding the duplicate fd CPython's mmap keeps."""
        return len(self.memory.regions) + (self.inflight is not None)


# -- messages -----------------------------------------------------------------------------

def make_fds(kind: str, count: int, rng: random.Random) -> list[int]:
    fds = []
    for _ in range(count):
        k = kind if kind != "mixed" else rng.choice(["eventfd", "memfd", "memfd_small"])
        if k == "eventfd":
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        else:
            fd = os.memfd_create("fuzz-session", os.MFD_CLOEXEC)
            os.ftruncate(fd, MEMFD_SIZE if k == "memfd" else rng.choice([0, 1, 4096]))
            fds.append(fd)
    return fds


def pick(rng: random.Random, *choices):
    return rng.choice(choices)


def a_region(rng: random.Random) -> m.MemRegion:
    if rng.random() < 0.6:
        return rng.choice(VALID_REGIONS)
    return m.MemRegion(
        pick(rng, 0, REGION, 4096, U64_MAX - 4095, rng.randrange(1 << 64)),
        pick(rng, 0, 1, 4096, REGION, MEMFD_SIZE, MEMFD_SIZE + 1, 1 << 62, U64_MAX, rng.randrange(1 << 64)),
        pick(rng, UVAS[0], UVAS[1], 0, U64_MAX, rng.randrange(1 << 64)),
        pick(rng, 0, 1, 4095, MEMFD_SIZE, 1 << 62, U64_MAX, rng.randrange(1 << 64)))


def ring_addr(rng: random.Random, region: int, offset: int) -> int:
    if rng.random() < 0.8:
        return UVAS[region] + offset
    return pick(rng, 0, U64_MAX - 7, UVAS[region] + REGION - 8, UVAS[region] + offset + 1,
                rng.randrange(1 << 64))


def a_queue_index(rng: random.Random) -> int:
    return pick(rng, 0, 0, 0, 1, 2, 255, U32_MAX, rng.randrange(1 << 32))


def smart_payload(req: int, rng: random.Random, device: BlkDevice, offered_protocol: int) -> bytes:
    """A payload with the right shape for ``req`` and fields anywhere from sane to absurd."""
    if req == R.SET_FEATURES:
        return m.U64.pack(pick(rng, device.features, device.features & rng.randrange(1 << 64),
                               0, device.features | 1 << 63, rng.randrange(1 << 64)))
    if req == R.SET_PROTOCOL_FEATURES:
        return m.U64.pack(pick(rng, offered_protocol, offered_protocol & rng.randrange(1 << 64),
                               0, U64_MAX))
    if req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE):
        num = pick(rng, 0, 1, 2, 3, 64, 128, 256, 1024, 32768, 65535, 65536, U32_MAX,
                   rng.randrange(1 << 32))
        return m.VringState(a_queue_index(rng), num).pack()
    if req == R.SET_VRING_ADDR:
        region = rng.randrange(2)
        return m.VringAddr(a_queue_index(rng), pick(rng, 0, 1, U32_MAX),
                           ring_addr(rng, region, 0), ring_addr(rng, region, 0x4000),
                           ring_addr(rng, region, 0x2000), pick(rng, 0, U64_MAX)).pack()
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        value = a_queue_index(rng) & 0xFF if rng.random() < 0.8 else rng.randrange(1 << 64)
        if rng.random() < 0.2:
            value |= m.VRING_FILE_NOFD
        return m.U64.pack(value)
    if req == R.SET_MEM_TABLE:
        n = pick(rng, 1, 1, 2, 3, 8, 0, 9, U32_MAX)
        regions = [a_region(rng) for _ in range(min(n, 9))]
        body = m.MEM_TABLE_HEAD.pack(n, rng.choice([0, U32_MAX])) + b"".join(r.pack() for r in regions)
        return body if rng.random() < 0.9 else body[:rng.randrange(len(body) + 1)]
    if req in (R.ADD_MEM_REG, R.REM_MEM_REG):
        return m.pack_single_region(a_region(rng))
    if req in (R.GET_CONFIG, R.SET_CONFIG):
        offset = pick(rng, 0, 0, 32, 57, 255, 256, 257, U32_MAX)
        size = pick(rng, 0, 1, 8, 57, 60, 256, 257, U32_MAX)
        if req == R.SET_CONFIG and rng.random() < 0.5:
            offset, size = 32, 1
        data = bytes(size) if size <= 512 else b""
        if rng.random() < 0.2:
            data = data[:-1] if data else b"\0"
        return m.CONFIG_HEAD.pack(offset, size, pick(rng, 0, 1, U32_MAX)) + data
    if req in (R.GET_INFLIGHT_FD, R.SET_INFLIGHT_FD):
        return m.Inflight(pick(rng, 0, 4096, 16 * 129, 64 << 20, (64 << 20) + 1, U64_MAX),
                          pick(rng, 0, 0, 64, 4097, 64 << 20, U64_MAX),
                          pick(rng, 1, 1, 0, 2, 0xFFFF), pick(rng, 1, 64, 128, 100, 32768, 0, 0xFFFF)).pack()
    return rng.randbytes(pick(rng, 0, 0, 8, 16))


def valid_prelude(rng: random.Random, device: BlkDevice, offered: int):
    """(request, payload, fd kind, fd count) of a set-up that starts queue 0."""
    regions = VALID_REGIONS[:rng.choice([1, 2])]
    out = [(R.GET_FEATURES, b"", None, 0),
           (R.SET_FEATURES, m.U64.pack(device.features), None, 0),
           (R.GET_PROTOCOL_FEATURES, b"", None, 0),
           (R.SET_PROTOCOL_FEATURES, m.U64.pack(offered), None, 0),
           (R.SET_OWNER, b"", None, 0)]
    if rng.random() < 0.5:
        out.append((R.SET_MEM_TABLE, m.pack_mem_table(regions), "memfd", len(regions)))
    else:
        out += [(R.ADD_MEM_REG, m.pack_single_region(r), "memfd", 1) for r in regions]
    size = rng.choice([1, 8, 64, 256])
    if rng.random() < 0.3:
        out.append((R.GET_INFLIGHT_FD, m.Inflight(0, 0, 1, size).pack(), None, 0))
        out.append((R.SET_INFLIGHT_FD, m.Inflight(16 * (size + 1), rng.choice([0, 64]), 1, size).pack(),
                    "memfd", 1))
    u = UVAS[0]
    out += [(R.SET_VRING_NUM, m.VringState(0, size).pack(), None, 0),
            (R.SET_VRING_BASE, m.VringState(0, rng.randrange(1 << 16)).pack(), None, 0),
            (R.SET_VRING_ADDR, m.VringAddr(0, 0, u, u + 0x8000, u + 0x6000, 0).pack(), None, 0),
            (R.SET_VRING_CALL, m.U64.pack(0), "eventfd", 1),
            (R.SET_VRING_ERR, m.U64.pack(0), "eventfd", 1),
            (R.SET_VRING_KICK, m.U64.pack(0), "eventfd", 1),
            (R.SET_VRING_ENABLE, m.VringState(0, 1).pack(), None, 0)]
    return out


message_skeletons = st.tuples(
    st.sampled_from(REQUESTS),
    st.sampled_from(["plain", "plain", "need_reply", "need_reply", "random"]),
    st.sampled_from(["smart", "smart", "smart", "random", "empty", "truncated", "extended", "big"]),
    st.sampled_from([0, 0, 0, 1, 1, 1, 2, 3, 8, 9]),
    st.sampled_from(["eventfd", "memfd", "memfd_small", "mixed"]),
    st.integers(0, U32_MAX),
)
sequences = st.tuples(st.booleans(), st.integers(1, 2), st.integers(0, U32_MAX),
                      st.lists(message_skeletons, max_size=24))


def build_message(skel, device: BlkDevice, offered: int):
    req, flags_kind, payload_kind, nfds, fd_kind, seed = skel
    rng = random.Random(seed)
    flags = {"plain": m.VERSION, "need_reply": m.VERSION | m.FLAG_NEED_REPLY,
             "random": rng.randrange(1 << 32)}[flags_kind]
    if payload_kind == "smart":
        payload = smart_payload(req, rng, device, offered)
    elif payload_kind == "random":
        payload = rng.randbytes(rng.choice([1, 7, 8, 9, 12, 24, 40, 41, 100]))
    elif payload_kind == "empty":
        payload = b""
    elif payload_kind == "truncated":
        payload = smart_payload(req, rng, device, offered)
        payload = payload[:rng.randrange(len(payload) + 1)]
    elif payload_kind == "extended":
        payload = smart_payload(req, rng, device, offered) + rng.randbytes(rng.choice([1, 8, 100]))
    else:
        payload = rng.randbytes(m.MAX_PAYLOAD)
    return req, flags, payload, fd_kind, nfds, rng


# -- invariants ---------------------------------------------------------------------------

def check_reply(header: m.Header, reply: bytes | None, stats: Counter) -> None:
    if reply is None:
        assert not header.need_reply or header.request in _HAS_REPLY_BODY
        stats["no_reply"] += 1
        return
    assert len(reply) >= m.HEADER.size
    rh = m.Header.unpack(reply[:m.HEADER.size])
    body = reply[m.HEADER.size:]
    assert rh.flags == m.REPLY_FLAGS, rh
    assert rh.request == header.request, (rh, header)
    assert rh.size == len(body) <= m.MAX_PAYLOAD
    if header.request in _HAS_REPLY_BODY:
        if header.request in REPLY_BODY_SIZE:
            assert len(body) == REPLY_BODY_SIZE[header.request]
        if header.request == R.GET_CONFIG:
            msg = m.ConfigMsg.unpack(body)
            assert len(msg.data) == msg.size
        stats["replies"] += 1
    else:
        assert header.need_reply
        assert len(body) == 8 and m.U64.unpack(body)[0] in (0, 1)
        stats["acks_ok" if body == m.U64.pack(0) else "refused"] += 1


def check_drop(header: m.Header, exc: DropConnection, session: Session, stats: Counter) -> None:
    """A dropped connection: a frontend that asked for an ack of a message without a reply
    body gets a nack first (it would wait for it), and nothing else goes out."""
    nack = getattr(exc, "reply", None)
    acked = header.need_reply and header.request not in _HAS_REPLY_BODY
    if nack is None:
        assert not acked, f"{m.request_name(header.request)} asked for an ack and got none"
    else:
        assert acked, f"{m.request_name(header.request)}: a nack nobody asked for"
        rh = m.Header.unpack(nack[:m.HEADER.size])
        assert rh.flags == m.REPLY_FLAGS and rh.request == header.request
        assert rh.size == len(nack) - m.HEADER.size == 8
        assert nack[m.HEADER.size:] == m.U64.pack(1)
        stats["nacks"] += 1
    assert not getattr(session, "reply_fds", [])
    stats["drops"] += 1
    stats["refused"] += 1


def held_fds(session: Session) -> set[int]:
    fds = {s.fd for s in session.memory}
    for v in session.vrings:
        fds |= {fd for fd in (v.kick_fd, v.call_fd, v.err_fd) if fd is not None}
    if session.backend_req_fd is not None:
        fds.add(session.backend_req_fd)
    return fds


def check_fds(session: Session, host: MappingHost, baseline: set[int]) -> None:
    held = held_fds(session)
    for fd in held:
        os.fstat(fd)                                   # open, not closed behind our back
    assert len(held) == len(set(held))
    extra = open_fds() - baseline
    # every fd the process holds beyond the baseline is one the session keeps, or the
    # duplicate the mmap module keeps for each live mapping
    assert held <= extra, (held, extra)
    assert len(extra) == len(held) + host.live_mappings(), (sorted(extra), sorted(held),
                                                            host.live_mappings())


def close_and_check(session: Session, host: MappingHost, baseline: set[int], why: str) -> None:
    """What the supervisor does when a connection ends; then nothing passed in may be open."""
    session.close()
    assert host.rings == {}
    host.set_inflight(None, 0, 0, 0, 0)       # (a session without inflight support never says)
    assert host.live_mappings() == 0
    leaked = open_fds() - baseline
    assert not leaked, f"fds left open after close ({why}): {sorted(leaked)}"


def run_sequence(seq, stats: Counter) -> None:
    """Feed one sequence. A DropConnection ends the connection: the rest of the sequence goes
    to a new Session on the same host, as the supervisor does for the next frontend, and
    (with a prelude) that frontend first sets the device up again -- so the random messages
    keep meeting a running ring, and every sequence exercises reconnects."""
    prelude, num_queues, seed, skeletons = seq
    baseline = open_fds()
    rng = random.Random(seed)
    device = BlkDevice(Geometry(1 << 30, serial=b"FUZZ-SESSION-0000000"), writeback=False)
    host = MappingHost(stats)
    session = Session(device, host, num_queues=num_queues)
    offered = session.protocol_features_offered
    setup = []
    if prelude:
        for req, payload, fd_kind, nfds in valid_prelude(rng, device, offered):
            need = m.FLAG_NEED_REPLY if req not in _HAS_REPLY_BODY else 0
            setup.append((req, m.VERSION | need, payload, fd_kind, nfds, rng))
    messages = deque(setup + [build_message(s, device, offered) for s in skeletons])
    stats["sequences"] += 1
    try:
        while messages:
            req, flags, payload, fd_kind, nfds, mrng = messages.popleft()
            fds = make_fds(fd_kind, nfds, mrng) if nfds else []
            header = m.Header(req, flags, len(payload))
            stats["messages"] += 1
            try:
                reply = session.handle(header, payload, fds)
            except DropConnection as exc:
                check_drop(header, exc, session, stats)
                close_and_check(session, host, baseline, f"dropped at {m.request_name(req)}")
                session = Session(device, host, num_queues=num_queues)
                stats["reconnects"] += 1
                if messages:
                    messages.extendleft(reversed(setup))
                continue
            check_reply(header, reply, stats)
            # what the supervisor does with fds that go out with a reply: send, then close
            for fd in session.take_reply_fds() if hasattr(session, "take_reply_fds") else ():
                assert reply is not None and req == R.GET_INFLIGHT_FD
                os.fstat(fd)
                os.close(fd)
                stats["reply_fds"] += 1
            if prelude and req == R.SET_VRING_ENABLE and payload == m.VringState(0, 1).pack():
                stats["prelude_running"] += int(0 in host.rings)
            check_fds(session, host, baseline)
    except BaseException:
        session.close()
        raise
    close_and_check(session, host, baseline, "end of sequence")


@pytest.fixture(autouse=True)
def quiet_session_log():
    """Refusals are the point here; logging thousands of them only slows the run."""
    logger = logging.getLogger("vblk")
    old = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(old)


def test_random_message_sequences_keep_the_session_sound():
    stats: Counter = Counter()

    @SETTINGS
    @given(seq=sequences)
    def one(seq):
        run_sequence(seq, stats)

    baseline = open_fds()
    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(ROUNDS):
        one()
    record("session", stats, time.monotonic() - t0, time.process_time() - c0)
    assert open_fds() == baseline
    if EXAMPLES * ROUNDS >= 200:
        for key in ("refused", "acks_ok", "replies", "rings_started",
                    "prelude_running", "mappings"):
            assert stats[key], (key, dict(stats))


# -- bounded allocation ---------------------------------------------------------------------

BIG_LOOKING = [
    (R.GET_CONFIG, m.CONFIG_HEAD.pack(0, U32_MAX, 0)),
    (R.GET_CONFIG, m.CONFIG_HEAD.pack(U32_MAX, U32_MAX, 0)),
    (R.GET_CONFIG, m.CONFIG_HEAD.pack(0, 256, 0) + bytes(256)),
    (R.SET_CONFIG, m.CONFIG_HEAD.pack(0, U32_MAX, 0) + bytes(m.MAX_PAYLOAD - 12)),
    (R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(U32_MAX, 0)),
    (R.SET_MEM_TABLE, m.MEM_TABLE_HEAD.pack(8, 0) + m.MemRegion(0, 1 << 62, 0, 0).pack() * 8),
    (R.ADD_MEM_REG, m.pack_single_region(m.MemRegion(0, U64_MAX, 0, U64_MAX))),
    (R.SET_VRING_NUM, m.VringState(0, U32_MAX).pack()),
    (R.SET_VRING_NUM, m.VringState(0, 32768).pack()),
    (R.SET_VRING_BASE, m.VringState(U32_MAX, U32_MAX).pack()),
    (R.SET_VRING_ADDR, m.VringAddr(0, U32_MAX, U64_MAX - 15, U64_MAX - 3, U64_MAX - 1, U64_MAX).pack()),
    (R.GET_VRING_BASE, m.VringState(U32_MAX, 0).pack()),
    (R.SET_FEATURES, m.U64.pack(U64_MAX)),
    (U32_MAX, bytes(m.MAX_PAYLOAD)),
]


@pytest.mark.parametrize("req,payload", BIG_LOOKING,
                         ids=lambda x: m.request_name(x) if isinstance(x, int) else None)
@pytest.mark.parametrize("payload_size", [None, m.MAX_PAYLOAD, 1 << 20])
def test_big_looking_messages_allocate_little(req, payload, payload_size):
    if payload_size is not None:
        payload = (payload + bytes(payload_size))[:payload_size]
    stats: Counter = Counter()
    host = MappingHost(stats)
    session = Session(BlkDevice(Geometry(1 << 30), writeback=False), host)
    fds = make_fds("memfd", 8 if req == R.SET_MEM_TABLE else 1 if req == R.ADD_MEM_REG else 0,
                   random.Random(0))
    for fd in fds:
        os.ftruncate(fd, 1 << 40)            # sparse: a 1 TiB "guest" costs nothing
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for flags in (m.VERSION, m.VERSION | m.FLAG_NEED_REPLY):
            try:
                session.handle(m.Header(req, flags, len(payload)), payload, fds)
            except DropConnection:
                pass
            fds = []
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        session.close()
    assert peak < 4 << 20, f"{m.request_name(req)} with {len(payload)} payload bytes peaked at {peak} bytes"


def test_random_sequences_allocate_little():
    """A few whole random sequences under tracemalloc (slow, so only a few)."""

    @settings(max_examples=min(EXAMPLES, 20), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(seq=sequences)
    def one(seq):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            run_sequence(seq, Counter())
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20, peak

    one()
