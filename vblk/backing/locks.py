"""Open-file-description locks on a window of an image (Linux 3.15+).

The lock covers exactly the window's bytes: shared for a read-only window, exclusive
otherwise, so two vblks may serve disjoint ranges of one image but never overlap a writer. It
lives as long as the open file description -- until the supervisor and every worker have
closed the fd -- and is never bounced between vblk's own processes (they share one
description).
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
import time

from vblk.errors import ConfigError, ResizeRefused

# <fcntl.h>; the stdlib has no names for them.
F_OFD_GETLK = 36
F_OFD_SETLK = 37
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid

# A vblk that was just killed leaves its workers holding the lock for a moment (they die
# with it, by PDEATHSIG, but not at the same instant); its restart waits that long for them.
LOCK_WAIT_SECONDS = 1.0


def _args(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _in_use(path: str, start: int, end: int) -> str:
    return f"{path} bytes {start}..{end} are in use by another process"


def test_lock(fd: int, path: str, start: int, size: int, readonly: bool) -> None:
    """Could the window's lock be taken? ConfigError if not (after LOCK_WAIT_SECONDS)."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        answer = fcntl.fcntl(fd, F_OFD_GETLK, _args(kind, start, size))
        if _FLOCK.unpack(answer)[0] == fcntl.F_UNLCK:
            return
        if time.monotonic() >= deadline:
            raise ConfigError(_in_use(path, start, start + size))
        time.sleep(0.05)


def take_lock(fd: int, path: str, start: int, size: int, readonly: bool) -> None:
    """Take the window's lock (ConfigError if another process holds any of it)."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _args(kind, start, size))
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {path} bytes {start}..{start + size}: "
                                  f"{e.strerror}") from None
            if time.monotonic() >= deadline:
                raise ConfigError(_in_use(path, start, start + size)) from None
            time.sleep(0.05)


def release_lock(fd: int, start: int, size: int) -> None:
    """Give the window's bytes up (F_UNLCK)."""
    fcntl.fcntl(fd, F_OFD_SETLK, _args(fcntl.F_UNLCK, start, size))


def move_lock(fd: int, path: str, start: int, old_size: int, new_size: int,
              readonly: bool) -> None:
    """Move the window's lock from ``old_size`` to ``new_size`` bytes (same start, same kind).

    Growing takes the lock on the new bytes first (ResizeRefused if another process holds
    them; nothing changes); shrinking releases the bytes no longer served."""
    kind = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    if new_size > old_size:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _args(kind, start + old_size, new_size - old_size))
        except OSError as e:
            where = f"{path} bytes {start + old_size}..{start + new_size}"
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ResizeRefused(f"{where} are in use by another process") from None
            raise ResizeRefused(f"cannot lock {where}: {e.strerror}") from None
    elif new_size < old_size:
        fcntl.fcntl(fd, F_OFD_SETLK, _args(fcntl.F_UNLCK, start + new_size, old_size - new_size))
