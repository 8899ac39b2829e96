"""The operator's side door: a control socket (msgpack) and a Prometheus endpoint (HTTP).

Theory of operation
-------------------
``ControlServer`` owns up to two listening sockets -- a Unix stream socket for ``vblk stats``
and, optionally, a TCP socket serving Prometheus text -- and every connection accepted on
them. All of them sit in a private epoll whose own fd is ``fileno()``: the supervisor
registers that one fd in its event loop and calls ``on_readable()`` when it fires. Nothing
here blocks and nothing runs in a thread; each call handles what is ready and returns.

Both protocols are one request per connection:

* control: the client sends a 4-byte big-endian length and a msgpack map (``{"op": "stats"}``);
  the server answers the same way (``{"ok": true, "stats": {...}}`` or
  ``{"ok": false, "error": "..."}``) and closes.
* metrics: ``GET /metrics`` (HTTP/1.0 or 1.1) gets Prometheus text format 0.0.4 made by
  ``prometheus_client`` from the same snapshot, then the connection is closed.

A connection that has not finished within ``CONNECTION_TIMEOUT`` is dropped the next time the
server runs, and at most ``MAX_CONNECTIONS`` are kept (the oldest goes first), so a stuck
client costs a few fds at most. ``snapshot(histograms=...)`` is the stats source, normally
``vblk.stats.Stats.snapshot``.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack

from vblk.errors import ConfigError, VblkError
from vblk.logs import quote

log = logging.getLogger(__name__)

SUFFIX = ".ctl"                       # default control socket: the vhost-user socket + this
SUN_PATH_MAX = 107
MAX_MESSAGE = 1 << 20
MAX_HTTP_REQUEST = 16 << 10
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT = 5.0
_LEN = struct.Struct("!I")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

Snapshot = Callable[..., dict]


class ControlError(VblkError):
    """The control socket could not be reached or answered with an error."""


def default_control_path(socket_path: str) -> str:
    return socket_path + SUFFIX


def listener_path(sock: socket.socket) -> str | None:
    """The filesystem path a listening Unix socket is bound to (None if unnamed/abstract)."""
    try:
        name = sock.getsockname()
    except OSError:
        return None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not isinstance(name, str) or not name or name[0] == "\0":
        return None
    return name


def parse_listen_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); raises ConfigError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--metrics-listen {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--metrics-listen {text!r}: port {port!r} is not 0..65535")
    return host, int(port)


def check_unix_socket_path(path: str, what: str = "socket") -> None:
    """Refuse a path for a Unix socket vblk will create that ``bind`` would refuse (too long,
    no directory, a directory we cannot write), or that names something other than a socket
    (never replaced). ``what`` names the socket in the message."""
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{what} path {path} is longer than {SUN_PATH_MAX} bytes")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"{what} directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create the {what} in {parent}: permission denied")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")


def check_control_path(path: str) -> None:
    check_unix_socket_path(path, "control socket")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    http: bool
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None


class ControlServer:
    """The control socket at ``path`` and/or the metrics endpoint at ``metrics`` (host, port)."""

    def __init__(self, snapshot: Snapshot, *, path: str | None = None,
                 metrics: tuple[str, int] | None = None) -> None:
        self.snapshot = snapshot
        # op -> handler(request dict) -> answer dict; the supervisor registers what it
        # can change at run time (see ``register``).
        self.actions: dict[str, Callable[[dict], dict]] = {}
        self.path: str | None = None
        self.metrics_address: str | None = None
        self._epoll = select.epoll()
        self._listeners: dict[int, tuple[socket.socket, bool]] = {}
        self._conns: dict[int, _Conn] = {}
        self._registry = None
        try:
            if path is not None:
                self._listen(_bind_unix(path), http=False)
                self.path = path
            if metrics is not None:
                sock = _bind_tcp(*metrics)
                self._listen(sock, http=True)
                host, port = sock.getsockname()[:2]
                self.metrics_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except BaseException:
            self.close()
            raise
        log.info("event=control_listening control=%s metrics=%s", quote(self.path),
                 quote(self.metrics_address))

    def _listen(self, sock: socket.socket, http: bool) -> None:
        sock.setblocking(False)
        self._listeners[sock.fileno()] = (sock, http)
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    # -- what the supervisor calls -------------------------------------------------------
    def fileno(self) -> int:
        """An fd that is readable whenever something here wants attention (an epoll fd)."""
        return self._epoll.fileno()

    def on_readable(self) -> None:
        """Serve whatever is ready now; never blocks."""
        for fd, events in self._epoll.poll(0):
            if fd in self._listeners:
                self._accept(*self._listeners[fd])
                continue
            conn = self._conns.get(fd)
            if conn is None:
                continue
            try:
                if events & select.EPOLLOUT:
                    self._flush(conn)
                elif events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._receive(conn)
            except OSError as exc:
                log.debug("event=control_client_dropped reason=%s", quote(exc))
                self._drop(conn)
        self._expire(time.monotonic())

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        for sock, _ in self._listeners.values():
            sock.close()
        self._listeners.clear()
        if not self._epoll.closed:
            self._epoll.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ---------------------------------------------------------------------
    def _accept(self, listener: socket.socket, http: bool) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # EMFILE and friends: try again on the next event
                log.warning("event=control_accept_failed reason=%s", quote(exc))
                return
            sock.setblocking(False)
            if len(self._conns) >= MAX_CONNECTIONS:
                self._drop(min(self._conns.values(), key=lambda c: c.deadline))
            conn = _Conn(sock, http, time.monotonic() + CONNECTION_TIMEOUT)
            self._conns[sock.fileno()] = conn
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _receive(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        reply = self._http_reply(conn.inbuf) if conn.http else self._control_reply(conn.inbuf)
        if reply is not None:
            conn.out = memoryview(reply)
            self._epoll.modify(conn.sock.fileno(), select.EPOLLOUT)
            self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                return
            conn.out = conn.out[sent:]
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            self._epoll.unregister(fd)
        conn.sock.close()

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline < now]:
            log.debug("event=control_client_timeout")
            self._drop(conn)

    def register(self, op: str, handler: Callable[[dict], dict]) -> None:
        """Answer control requests ``{"op": op, ...}`` with ``handler(request)``; a handler
        returns ``{"ok": True, ...}`` or ``{"ok": False, "error": "..."}`` and must not block."""
        self.actions[op] = handler

    # -- the control protocol ------------------------------------------------------------
    def _control_reply(self, buf: bytearray) -> bytes | None:
        if len(buf) < _LEN.size:
            return None
        (size,) = _LEN.unpack_from(buf)
        if size > MAX_MESSAGE:
            return _frame({"ok": False, "error": f"request of {size} bytes is too large"})
        if len(buf) < _LEN.size + size:
            return None
        try:
            request = msgpack.unpackb(bytes(buf[_LEN.size:_LEN.size + size]))
        except Exception as exc:          # msgpack raises several unrelated types
            return _frame({"ok": False, "error": f"unreadable request: {exc}"})
        return _frame(self.handle(request))

    def handle(self, request: object) -> dict:
        """Answer one decoded control request."""
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a map with an 'op'"}
        op = request.get("op")
        if op == "stats":
            snap = self.snapshot(histograms=bool(request.get("histograms")))
            snap.setdefault("info", {})["metrics"] = self.metrics_address
            return {"ok": True, "stats": snap}
        if op == "ping":
            return {"ok": True}
        action = self.actions.get(op) if isinstance(op, str) else None
        if action is not None:
            try:
                return action(request)
            except VblkError as exc:
                return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # -- the metrics endpoint ------------------------------------------------------------
    def _http_reply(self, buf: bytearray) -> bytes | None:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HTTP_REQUEST:
                return _http(431, b"request header too large\n")
            return None
        parts = bytes(buf[:buf.find(b"\r\n")]).split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _http(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _http(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        if target == b"/metrics":
            body, ctype = self.metrics_text(), PROMETHEUS_TEXT
        elif target == b"/":
            body, ctype = b"vblk: metrics are at /metrics\n", "text/plain; charset=utf-8"
        else:
            return _http(404, b"not found\n")
        return _http(200, body, ctype=ctype, head=method == b"HEAD")

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of the current snapshot."""
        from prometheus_client import CollectorRegistry, generate_latest
        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self.snapshot))
        return generate_latest(self._registry)


def _frame(message: dict) -> bytes:
    body = msgpack.packb(message)
    return _LEN.pack(len(body)) + body


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


def _http(code: int, body: bytes, *, ctype: str = "text/plain; charset=utf-8",
          extra: bytes = b"", head: bool = False) -> bytes:
    header = (f"HTTP/1.0 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    return header + extra + b"\r\n" + (b"" if head else body)


class _Collector:
    """prometheus_client collector over a snapshot (taken once per scrape)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        from vblk.stats import BUCKETS, bucket_upper_us
        s = self.snapshot(histograms=True)
        info = {k: str(v) for k, v in s.get("info", {}).items() if v is not None}
        yield InfoMetricFamily("vblk", "vblk instance", value=info)
        yield GaugeMetricFamily("vblk_uptime_seconds", "Seconds since vblk started",
                                value=s["uptime_s"])
        yield GaugeMetricFamily("vblk_frontend_connected", "1 while a vhost-user frontend is connected",
                                value=int(s["frontend"]["connected"]))
        yield CounterMetricFamily("vblk_frontend_connections", "Frontend connections accepted",
                                  value=s["frontend"]["connections"])
        yield GaugeMetricFamily("vblk_workers", "I/O worker processes", value=s["workers"]["count"])
        yield CounterMetricFamily("vblk_worker_restarts", "I/O workers replaced after dying",
                                  value=s["workers"]["restarts"])
        disk = s.get("disk", {})
        if disk.get("capacity_bytes") is not None:
            yield GaugeMetricFamily("vblk_capacity_bytes", "Disk size the guest sees (follows vblk resize)",
                                    value=disk["capacity_bytes"])
            yield CounterMetricFamily("vblk_resizes", "Live resizes applied", value=disk["resizes"])
        requests = CounterMetricFamily("vblk_requests", "Requests admitted",
                                       labels=["queue", "type"])
        nbytes = CounterMetricFamily("vblk_request_bytes", "Data bytes of admitted requests",
                                     labels=["queue", "type"])
        in_flight = GaugeMetricFamily("vblk_requests_in_flight", "Requests admitted, not completed",
                                      labels=["queue"])
        errors = CounterMetricFamily("vblk_request_errors", "Requests completed with an error status",
                                     labels=["queue", "status"])
        refused = CounterMetricFamily("vblk_chains_refused",
                                      "Descriptor chains returned without a status", labels=["queue"])
        latency = HistogramMetricFamily("vblk_request_duration_seconds",
                                        "Time from admission to status written",
                                        labels=["queue", "type"])
        bounds = [_le(bucket_upper_us(b) / 1e6) for b in range(BUCKETS - 1)] + ["+Inf"]
        for q in s["queues"]:
            qi = str(q["queue"])
            in_flight.add_metric([qi], q["in_flight"])
            errors.add_metric([qi, "ioerr"], q["ioerr"])
            errors.add_metric([qi, "unsupp"], q["unsupp"])
            refused.add_metric([qi], q["refused"])
            for kind, t in q["types"].items():
                requests.add_metric([qi, kind], t["requests"])
                nbytes.add_metric([qi, kind], t["bytes"])
                cumulative, running = [], 0
                for le, count in zip(bounds, t["latency_buckets"]):
                    running += count
                    cumulative.append((le, running))
                latency.add_metric([qi, kind], cumulative, t["latency_sum_ns"] / 1e9)
        yield from (requests, nbytes, in_flight, errors, refused, latency)
        limits = s.get("limits")
        if limits is not None:
            yield GaugeMetricFamily("vblk_limit_iops", "IOPS limit in effect (0: unlimited)",
                                    value=limits["iops"])
            yield GaugeMetricFamily("vblk_limit_bytes_per_second",
                                    "Bytes/s limit in effect (0: unlimited)", value=limits["bps"])
            yield CounterMetricFamily("vblk_throttle_events",
                                      "Times admission stopped for want of rate-limit tokens",
                                      value=limits["throttle_events"])
            yield CounterMetricFamily("vblk_throttled_seconds",
                                      "Seconds requests waited in the ring for rate-limit tokens",
                                      value=limits["throttled_s"])


def _le(seconds: float) -> str:
    return repr(float(seconds))


# -- binding -------------------------------------------------------------------------------

def _bind_unix(path: str) -> socket.socket:
    check_control_path(path)
    try:
        os.lstat(path)
    except FileNotFoundError:
        pass
    else:                                 # a socket: stale, unless someone answers on it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)
            else:
                raise ConfigError(f"control socket {path} is in use by another process")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot create control socket {path}: {exc.strerror}") from None
    return sock


def _bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--metrics-listen {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = None
    try:            # socket() itself fails where RestrictAddressFamilies= forbids AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(16)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ConfigError(f"cannot listen for metrics on {host}:{port}: {exc.strerror}") from None
    return sock


# -- the client ------------------------------------------------------------------------------

def request(path: str, message: dict, *, timeout: float = 5.0) -> dict:
    """Send one control request to the vblk at ``path``; returns its answer (a dict)."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            _connect(sock, path, deadline)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(_frame(message))
            buf = bytearray()
            while True:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path} (is vblk serving there?)") from None
    except ConnectionRefusedError:
        raise ControlError(f"nothing is listening on {path} (vblk is not running)") from None
    except TimeoutError:
        raise ControlError(f"{path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    if len(buf) < _LEN.size or len(buf) != _LEN.size + _LEN.unpack_from(buf)[0]:
        raise ControlError(f"{path} sent a truncated answer ({len(buf)} bytes)")
    try:
        answer = msgpack.unpackb(bytes(buf[_LEN.size:]))
    except Exception as exc:
        raise ControlError(f"{path} sent an unreadable answer: {exc}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"{path} sent an answer that is not a map")
    return answer


def _connect(sock: socket.socket, path: str, deadline: float) -> None:
    """connect() with a deadline. A Unix socket whose backlog is full answers a non-blocking
    connect with EAGAIN (not EINPROGRESS), so that is retried until the deadline."""
    sock.setblocking(False)
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("connect timed out") from None
            time.sleep(0.01)


def fetch_stats(path: str, *, timeout: float = 5.0, histograms: bool = False) -> dict:
    """The snapshot of the vblk whose control socket is ``path``."""
    answer = request(path, {"op": "stats", "histograms": histograms}, timeout=timeout)
    if not answer.get("ok"):
        raise ControlError(f"{path}: {answer.get('error', 'request failed')}")
    return answer["stats"]
