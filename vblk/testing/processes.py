"""Stopping a server started in its own process group (vblk and its workers, or qsd), seeing
that a server listens without connecting to it, and the open fds of this process (for leak
checks)."""
from __future__ import annotations

import os
import signal
import subprocess


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM the process group led by ``proc``, SIGKILL whatever is left after ``timeout``
    seconds (a leader or a child that outlived it); returns the leader's exit status."""
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def open_fds() -> set[int]:
    """The fds open in this process (not counting the one listdir used for the listing)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        out.add(int(name))
    return out


_ACCEPTCON = 0x10000        # /proc/net/unix Flags: a listening socket (__SO_ACCEPTCON)


def unix_listening(path: str | os.PathLike) -> bool:
    """Is some process listening on the Unix socket bound at ``path``? Read from
    /proc/net/unix, so the server sees no connection.

    That matters for qemu-storage-daemon 7.2: when a vhost-user connection ends it closes the
    connection's fd twice (libvhost-user's vu_deinit closes it, then the QIOChannelSocket
    finalizer closes the same number again). An fd another qsd thread opened in between --
    the QMP monitor's I/O thread accepting a client -- is closed under it: the monitor drops
    the client, or qsd aborts in qemu_socket_set_nonblock (EBADF). A readiness probe that
    connects and hangs up, followed at once by a QMP client, hits that window now and then."""
    wanted = {os.fspath(path), os.path.abspath(path)}
    with open("/proc/net/unix") as f:
        next(f)                                     # the header
        for line in f:
            fields = line.split(maxsplit=7)
            if len(fields) == 8 and fields[7].rstrip("\n") in wanted \
                    and int(fields[3], 16) & _ACCEPTCON:
                return True
    return False
