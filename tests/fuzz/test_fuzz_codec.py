"""Fuzz vhost-user framing: random byte streams and SCM_RIGHTS fds into ``recv_message``.

A stream is a list of pieces -- well-formed messages, messages with a bad version, a size
above MAX_PAYLOAD, a size larger than what follows, cut-off headers, plain garbage -- cut
into chunks at random points, each chunk one ``sendmsg`` that may carry 0-10 memfds. The
writer then closes (EOF) or stays silent (the reader's socket timeout must fire).

Invariants:

* only ``PeerClosed``, ``FrontendProtocolError``, ``TimeoutError`` or ``OSError`` escape;
* every message returned has version 1, ``size == len(payload) <= MAX_PAYLOAD`` and at most
  MAX_FDS fds, all open;
* no fd is leaked: after the stream the process has exactly the fds it had before (fds
  that came with a refused or cut-off message were closed by ``recv_message``);
* a well-formed stream (whole messages, fds on each message's first chunk) decodes to
  exactly what was sent, fds included (identified by their memfd sizes);
* a header whose size is above MAX_PAYLOAD is refused at once, without reading or
  allocating the payload.

Knobs (environment): VBLK_FUZZ_EXAMPLES streams per round (default 300), VBLK_FUZZ_ROUNDS,
VBLK_FUZZ_STATS (see test_fuzz_ring.py).
"""
from __future__ import annotations

import array
import os
import random
import socket
import time
import tracemalloc
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblk.errors import FrontendProtocolError
from vblk.testing import fuzzstats
from vblk.testing.fuzzstats import record
from vblk.testing.processes import open_fds
from vblk.vhost_user import messages as m
from vblk.vhost_user.transport import PeerClosed, recv_message

EXAMPLES = fuzzstats.examples(300)
ROUNDS = fuzzstats.rounds()
SETTINGS = fuzzstats.hypothesis_settings(EXAMPLES)
ALLOWED = (PeerClosed, FrontendProtocolError, TimeoutError, OSError)
SILENT_TIMEOUT = 0.02            # the reader's timeout when the writer goes quiet
U32_MAX = (1 << 32) - 1


def tagged_fd(tag: int) -> int:
    """A memfd whose size names it, so the receiver can tell which fd it got."""
    fd = os.memfd_create("fuzz-codec", os.MFD_CLOEXEC)
    os.ftruncate(fd, tag)
    return fd


# -- streams ----------------------------------------------------------------------------

PIECES = ["valid", "valid", "valid", "valid", "bad_version", "too_big", "short_payload",
          "short_header", "garbage", "empty_payload", "max_payload"]

streams = st.tuples(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=8),
    st.sampled_from(["eof", "eof", "eof", "silent"]),
    st.sampled_from(["clean_cuts", "any_cuts"]),
    st.sampled_from([0.0, 0.3, 0.8]),             # chance of fds on a chunk
    st.integers(0, U32_MAX),
)


def make_piece(kind: str, rng: random.Random) -> tuple[bytes, tuple | None]:
    """(bytes, (request, flags, payload) if it is a whole well-formed message)."""
    req = rng.choice([rng.choice(list(m.FrontendReq)), rng.randrange(1 << 32)])
    flags = m.VERSION | rng.choice([0, m.FLAG_REPLY, m.FLAG_NEED_REPLY, rng.randrange(1 << 32) & ~3])
    if kind in ("valid", "empty_payload", "max_payload"):
        n = {"valid": rng.choice([1, 8, 8, 12, 24, 40, 100, 300]), "empty_payload": 0,
             "max_payload": m.MAX_PAYLOAD}[kind]
        payload = rng.randbytes(n)
        return m.HEADER.pack(req, flags, n) + payload, (req, flags, payload)
    if kind == "bad_version":
        n = rng.choice([0, 8])
        return m.HEADER.pack(req, (flags & ~3) | rng.choice([0, 2, 3]), n) + rng.randbytes(n), None
    if kind == "too_big":
        n = rng.choice([m.MAX_PAYLOAD + 1, 1 << 20, U32_MAX])
        return m.HEADER.pack(req, flags, n) + rng.randbytes(rng.choice([0, 16])), None
    if kind == "short_payload":
        n = rng.choice([8, 100, m.MAX_PAYLOAD])
        return m.HEADER.pack(req, flags, n) + rng.randbytes(rng.randrange(n)), None
    if kind == "short_header":
        return m.HEADER.pack(req, flags, 0)[:rng.randrange(1, 12)], None
    return rng.randbytes(rng.choice([1, 5, 12, 13, 64, 500])), None


class Sent:
    """One generated stream: the chunks to send and, when well formed, what must arrive."""

    def __init__(self, spec) -> None:
        kinds, self.ending, cuts, fd_chance, seed = spec
        rng = random.Random(seed)
        pieces = [make_piece(k, rng) for k in kinds]
        self.clean = all(p[1] is not None for p in pieces) and cuts == "clean_cuts"
        data = b"".join(p[0] for p in pieces)
        starts, pos = [], 0
        for raw, _ in pieces:
            starts.append(pos)
            pos += len(raw)
        points = {rng.randrange(1, len(data)) for _ in range(rng.randrange(4))} if len(data) > 1 else set()
        if self.clean:
            points |= set(starts[1:])
        bounds = [0, *sorted(p for p in points if 0 < p < len(data)), len(data)]
        self.chunks: list[tuple[bytes, list[int]]] = []       # (bytes, fd tags)
        self.expected: list[tuple] = []
        tag = 4096
        for lo, hi in zip(bounds, bounds[1:]):
            at_start = lo in starts
            tags = []
            if rng.random() < fd_chance and (at_start or not self.clean):
                count = rng.choice([1, 1, 2, 3, 8, 9, 10])
                if self.clean:
                    count = min(count, m.MAX_FDS)
                tags = [tag + 4096 * i for i in range(count)]
                tag += 4096 * count
            self.chunks.append((data[lo:hi], tags))
        if self.clean:
            for (_raw, msg), start in zip(pieces, starts):
                tags = next(t for (c, t), lo in zip(self.chunks, bounds) if lo == start)
                self.expected.append((*msg, sorted(tags)))


def send_stream(sock: socket.socket, sent: Sent, stats: Counter) -> bool:
    """Send the chunks (non-blocking); False if the socket buffer filled up first."""
    sock.setblocking(False)
    for data, tags in sent.chunks:
        fds = [tagged_fd(t) for t in tags]
        try:
            if fds:
                sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                stats["fds_sent"] += len(fds)
            else:
                sock.send(data)
        except BlockingIOError:
            stats["stream_buffer_full"] += 1
            return False
        finally:
            for fd in fds:          # in flight the kernel holds its own references
                os.close(fd)
    return True


def read_all(sock: socket.socket, stats: Counter) -> tuple[list[tuple], BaseException]:
    got = []
    while True:
        try:
            header, payload, fds = recv_message(sock)
        except ALLOWED as exc:
            return got, exc
        try:
            assert header.flags & m.FLAG_VERSION_MASK == m.VERSION
            assert header.size == len(payload) <= m.MAX_PAYLOAD
            assert len(fds) <= m.MAX_FDS
            tags = sorted(os.fstat(fd).st_size for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)
        got.append((header.request, header.flags, payload, tags))
        stats["frames"] += 1
        stats["fds_received"] += len(fds)


def run_stream(spec, stats: Counter) -> None:
    baseline = open_fds()
    sent = Sent(spec)
    stats["streams"] += 1
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        complete = send_stream(writer, sent, stats)
        if sent.ending == "eof" or not complete:
            writer.close()
        reader.settimeout(SILENT_TIMEOUT if sent.ending == "silent" and complete else 5.0)
        t0 = time.monotonic()
        got, end = read_all(reader, stats)
        assert time.monotonic() - t0 < 4.0, "the reader hung"
        stats[f"end_{type(end).__name__}"] += 1
        if sent.clean and complete:
            assert got == sent.expected
            if sent.ending == "eof":
                assert isinstance(end, PeerClosed), end
            else:
                assert isinstance(end, TimeoutError), end
            stats["clean_streams_matched"] += 1
    finally:
        writer.close()
        reader.close()
    leaked = open_fds() - baseline
    assert not leaked, f"fds leaked: {sorted(leaked)}"


def test_random_streams_are_framed_or_refused_and_leak_nothing():
    stats: Counter = Counter()

    @SETTINGS
    @given(spec=streams)
    def one(spec):
        run_stream(spec, stats)

    t0, c0 = time.monotonic(), time.process_time()
    for _ in range(ROUNDS):
        one()
    record("codec", stats, time.monotonic() - t0, time.process_time() - c0)
    if EXAMPLES * ROUNDS >= 200:
        for key in ("frames", "clean_streams_matched", "end_PeerClosed", "end_TimeoutError",
                    "end_FrontendProtocolError", "fds_received"):
            assert stats[key], (key, dict(stats))


# -- targeted cases ---------------------------------------------------------------------

@pytest.mark.parametrize("size", [m.MAX_PAYLOAD + 1, 1 << 20, 1 << 31, U32_MAX])
def test_oversized_header_is_refused_without_reading_the_payload(size):
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [tagged_fd(4096), tagged_fd(8192)]
    baseline = open_fds() - set(fds)
    try:
        tail = b"NEXT-BYTES" * 10
        writer.sendmsg([m.HEADER.pack(m.FrontendReq.SET_MEM_TABLE, m.VERSION, size) + tail],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
        reader.settimeout(5.0)              # the writer stays open: reading on would hang
        tracemalloc.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(FrontendProtocolError):
                recv_message(reader)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert time.monotonic() - t0 < 1.0
        assert peak < 64 << 10, peak
        assert open_fds() - baseline == set(), "the message's fds were not closed"
        reader.settimeout(1.0)
        assert reader.recv(1000) == tail     # nothing past the header was consumed
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize("case", ["bad_version", "eof_in_payload", "eof_in_header",
                                  "timeout_in_payload", "too_many_fds"])
def test_fds_of_a_message_that_fails_are_closed(case):
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    baseline = open_fds()
    nfds = 12 if case == "too_many_fds" else 3
    fds = [tagged_fd(4096 * (i + 1)) for i in range(nfds)]
    header = m.HEADER.pack(m.FrontendReq.SET_VRING_KICK,
                           0 if case == "bad_version" else m.VERSION, 8)
    data = {"bad_version": header + bytes(8), "eof_in_payload": header + b"abc",
            "eof_in_header": header[:7], "timeout_in_payload": header + b"abc",
            "too_many_fds": header + bytes(8)}[case]
    try:
        writer.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        for fd in fds:
            os.close(fd)
        if case != "timeout_in_payload":
            writer.close()
        reader.settimeout(0.2)
        expected = {"bad_version": FrontendProtocolError, "eof_in_payload": PeerClosed,
                    "eof_in_header": PeerClosed, "timeout_in_payload": TimeoutError,
                    "too_many_fds": FrontendProtocolError}[case]
        with pytest.raises(expected):
            recv_message(reader)
        assert open_fds() - baseline == set()
    finally:
        writer.close()
        reader.close()


def test_a_header_split_over_many_sends_is_reassembled_with_its_fds():
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = tagged_fd(12345)
    try:
        raw = m.encode(m.FrontendReq.SET_VRING_CALL, m.U64.pack(0))
        writer.sendmsg([raw[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        for i in range(1, len(raw)):
            writer.send(raw[i:i + 1])
        reader.settimeout(2.0)
        header, payload, fds = recv_message(reader)
        assert (header.request, payload) == (m.FrontendReq.SET_VRING_CALL, m.U64.pack(0))
        assert [os.fstat(x).st_size for x in fds] == [12345]
        for x in fds:
            os.close(x)
    finally:
        os.close(fd)
        writer.close()
        reader.close()
