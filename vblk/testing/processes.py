"""Stopping a server started in its own process group (vblk and its workers, or qsd), and
the open fds of this process (for leak checks)."""
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
