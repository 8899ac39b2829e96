"""The frontend's connection: accept, read messages, answer, drop; the backend channel.

Theory of operation
-------------------
One frontend at a time. While none is connected the listening socket is watched; ``accept``
makes a new vhost-user ``Session`` over the queue lifecycle (vblk.supervisor.queues) and
watches the connection instead. Each readable event is one whole message (transport reads it
with a deadline, ``MESSAGE_TIMEOUT``): the session handles it and the answer goes back with
its fds. A frontend that breaks the protocol gets its nack (if it asked for an ack) and is
dropped (``DropConnection``); a frontend that hangs up is dropped; either way the session
stops every ring (waiting for their requests) and releases every fd, and the listening socket
is watched again for the next frontend.

The backend channel (BACKEND_REQ): the only message vblk sends on it is CONFIG_CHANGE_MSG,
after a live resize, without waiting for an answer, and never blocking for longer than
``NOTIFY_TIMEOUT`` (QEMU answers it with GET_CONFIG on the main socket, which this loop serves
as soon as the control request that caused it returns, so nothing can deadlock).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import time

from vblk import sdnotify
from vblk.device import BlkDevice
from vblk.logs import RateLimitedLog, quote
from vblk.stats import Stats
from vblk.supervisor.loop import EventLoop
from vblk.supervisor.queues import Queues
from vblk.vhost_user import transport
from vblk.vhost_user.session import DropConnection, Session

log = logging.getLogger("vblk.supervisor")

MESSAGE_TIMEOUT = 10.0         # a frontend must send a whole message within this
NOTIFY_TIMEOUT = 0.25          # the longest a resize waits for room on the backend channel


class FrontendLink:
    def __init__(self, loop: EventLoop, device: BlkDevice, queues: Queues, stats: Stats,
                 listener: socket.socket) -> None:
        self.loop = loop
        self.device = device
        self.queues = queues
        self.live = stats
        self.listener = listener
        self.conn: socket.socket | None = None
        self.session: Session | None = None
        self.guest_log = RateLimitedLog(logger=log)
        self.closed = False                  # removed (vblk disk remove): never listen again
        listener.setblocking(False)

    def listen(self) -> None:
        self.loop.watch(self.listener.fileno(), self._on_accept, "frontend")

    def close(self) -> None:
        """Drop the frontend (if any) and stop listening for another (the caller closes the
        listening socket)."""
        self.closed = True
        self.disconnect()
        self.loop.unwatch(self.listener.fileno())

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.settimeout(MESSAGE_TIMEOUT)
        self.conn = conn
        self.session = Session(self.device, self.queues, num_queues=self.device.num_queues)
        self.queues.session = self.session
        self.loop.unwatch(self.listener.fileno())
        self.loop.watch(conn.fileno(), self._on_message, "frontend")
        log.info("event=frontend_connected")
        self.live.frontend_connected()
        sdnotify.status("frontend connected")

    def disconnect(self) -> None:
        """Drop the frontend (if any): stop its rings, release its fds, listen again."""
        if self.conn is None:
            return
        self.loop.unwatch(self.conn.fileno())
        try:
            self.session.close()
        finally:
            self.conn.close()
            self.conn = None
            self.session = None
            self.queues.session = None
            self.queues.data.calls.clear()
            log.info("event=frontend_disconnected")
            self.live.frontend_disconnected()
            sdnotify.status("stopping" if self.loop.stopping else "waiting for a frontend")
            if not self.loop.stopping and not self.closed:
                self.listen()

    def _on_message(self) -> None:
        try:
            header, payload, fds = transport.recv_message(self.conn)
        except transport.PeerClosed:
            self.disconnect()
            return
        except Exception as exc:       # OSError, TimeoutError, unreadable framing
            log.warning("event=frontend_dropped reason=%s", quote(repr(exc)))
            self.disconnect()
            return
        log.debug("event=message request=%s size=%d fds=%d", transport.m.request_name(header.request),
                  header.size, len(fds))
        try:
            reply = self.session.handle(header, payload, fds)
            if reply is not None:
                reply_fds = self.session.take_reply_fds()
                try:
                    transport.send_message(self.conn, reply, reply_fds)
                finally:
                    for fd in reply_fds:
                        os.close(fd)
        except DropConnection as exc:
            self.guest_log.warning("frontend", "event=frontend_dropped reason=%s", quote(exc))
            if exc.reply is not None:
                try:
                    self.conn.sendall(exc.reply)
                except OSError:
                    pass
            self.disconnect()
        except OSError as exc:
            log.warning("event=frontend_dropped reason=%s", quote(repr(exc)))
            self.disconnect()

    # -- the backend channel -------------------------------------------------------------------
    def notify_config_change(self) -> tuple[bool, str]:
        """Send CONFIG_CHANGE_MSG if the frontend gave us a backend channel: (sent, why not)."""
        if self.session is None:
            return False, "no frontend is connected; it reads the new size when it connects"
        change = self.session.config_change()
        if change is None:
            return False, ("the frontend did not negotiate BACKEND_REQ; it reads the new size "
                           "at its next GET_CONFIG")
        fd, message = change
        try:
            send_bounded(fd, message, NOTIFY_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.session.drop_backend_channel()
            log.warning("event=backend_channel_failed action=dropped reason=%s", quote(exc))
            return False, f"the backend channel failed ({exc}); it is closed now"
        return True, ""


def send_bounded(fd: int, data: bytes, timeout: float) -> None:
    """Write all of ``data`` to the stream socket ``fd`` without blocking for more than
    ``timeout`` seconds in all; TimeoutError if the peer does not make room in time."""
    sock = socket.socket(fileno=fd)
    try:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL):]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError(f"no room on the backend channel within {timeout:g} s "
                                   f"({len(view)} of {len(data)} bytes unsent)")
    finally:
        sock.detach()
