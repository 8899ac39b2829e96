"""Framing of vhost-user messages on a Unix stream socket, with SCM_RIGHTS file descriptors.

The only vhost-user module that touches a socket. Used by the supervisor and by the test frontend.
"""
from __future__ import annotations

import array
import os
import socket

from vblk.errors import FrontendProtocolError
from vblk.vhost_user import messages as m


class PeerClosed(Exception):
    """The other side closed the connection."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PeerClosed()
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> tuple[m.Header, bytes, list[int]]:
    """Read one message; fds arrive with the header bytes. Raises PeerClosed on EOF.

    On a malformed header every received fd is closed before FrontendProtocolError is raised.
    """
    fds = array.array("i")
    data, ancdata, msg_flags, _ = sock.recvmsg(m.HEADER.size, socket.CMSG_SPACE(m.MAX_FDS * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    fd_list = list(fds)
    try:
        if not data:
            raise PeerClosed()
        if msg_flags & socket.MSG_CTRUNC:
            raise FrontendProtocolError("more file descriptors than a message may carry")
        if len(data) < m.HEADER.size:
            data += _recv_exact(sock, m.HEADER.size - len(data))
        header = m.Header.unpack(data)
        header.validate()
        payload = _recv_exact(sock, header.size) if header.size else b""
    except BaseException:
        for fd in fd_list:
            os.close(fd)
        raise
    return header, payload, fd_list


def send_message(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(data):
            sock.sendall(data[sent:])
    else:
        sock.sendall(data)
