"""The vhost-user listening socket: a new one at a path, or one inherited (``--fd``, systemd).

``check_listen_fd`` is the one check of an inherited socket; ``vblk serve`` runs it before
anything is created and ``open_listener`` runs it again after the exec (the fd could have
been swapped in between).
"""
from __future__ import annotations

import grp
import os
import socket
import stat

from vblk.errors import ConfigError


def check_listen_fd(fd: int) -> None:
    """``--fd N`` must be an inherited, listening Unix stream socket (ConfigError if not)."""
    try:
        st = os.fstat(fd)
    except OSError:
        raise ConfigError(f"--fd {fd} is not an open file descriptor") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"--fd {fd} is not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"--fd {fd} is a socket that is not listening")
    finally:
        sock.detach()


def open_listener(socket_path: str | None, listen_fd: int | None, mode: int = 0o600,
                  group: str | None = None) -> tuple[socket.socket, str | None]:
    """The listening socket and the path vblk created (None for an inherited one): an
    inherited fd, or a new socket at ``socket_path`` created with ``mode`` (never wider, not
    even for a moment) and ``group``. A path that exists and is not a socket is refused."""
    if listen_fd is not None:
        check_listen_fd(listen_fd)
        return socket.socket(fileno=listen_fd), None
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{socket_path} exists and is not a socket; refusing to replace it")
        os.unlink(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(socket_path)
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(socket_path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(socket_path, mode)
        sock.listen(1)
    except BaseException:
        sock.close()
        os.unlink(socket_path)
        raise
    return sock, socket_path
