"""The two halves of systemd's service protocol vblk speaks: sd_notify and socket activation.

``notify(*fields)`` sends one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket), as ``sd_notify(3)`` does; without ``$NOTIFY_SOCKET``
it does nothing, so vblk run by hand, by libvirt or by a test behaves the same. A failed send
is logged and otherwise ignored: telling the manager is never worth stopping the disk for.

``listen_fds()`` is ``sd_listen_fds(3)``: the sockets passed as fds 3, 4, ... when
``$LISTEN_PID`` names this process, taken once (the variables are removed, so the worker
processes never see them) and marked close-on-exec.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket

from vblk.errors import ConfigError
from vblk.logs import quote

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.warning("event=notify_failed reason=%s", quote(f"unsupported NOTIFY_SOCKET {address!r}"))
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("event=notify_failed reason=%s", quote(exc))
        return False
    return True


def ready(status: str) -> bool:
    """Startup is done: the socket accepts connections."""
    return notify("READY=1", f"STATUS={_one_line(status)}")


def status(text: str) -> bool:
    """What ``systemctl status`` shows on its Status: line."""
    return notify(f"STATUS={_one_line(text)}")


def stopping() -> bool:
    """Shutdown has begun (the manager shows "deactivating")."""
    return notify("STOPPING=1", "STATUS=stopping")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def listen_fds() -> list[int]:
    """The sockets systemd passed to this process (fd 3 onwards), once; [] if none.

    ``$LISTEN_PID`` must be this process's pid (a variable inherited from a parent that was
    itself activated is not ours). The variables are unset either way. Raises ConfigError
    when they are ours but make no sense (not numbers, or naming fds that are not open)."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in _ENV:
        os.environ.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise ConfigError(f"LISTEN_PID={pid} LISTEN_FDS={count} are not numbers") from None
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise ConfigError(f"LISTEN_FDS={n} but fd {fd} is not open") from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fds
