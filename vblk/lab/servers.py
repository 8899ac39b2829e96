"""The backends a benchmark starts: their command lines and the processes that run them.

Knows how vblk and qemu-storage-daemon are started on a raw image or an RBD image
(``vblk_command``, ``qsd_command``, ``qsd_blockdev_command``), a server in its own process
group (start, wait until it listens, its CPU time, stop), how an image file is copied for a
run, and which vblk code is served (``source_version``). Knows nothing of workloads or
results.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from vblk.interpreter import python_command
from vblk.testing.frontend import BackendClosed, BackendTimeout

BACKENDS = ("vblk", "qsd")
START_TIMEOUT = 30.0
REPO = Path(__file__).resolve().parents[2]      # the checkout vblk runs from (if it is one)


def qsd_command(image: str | os.PathLike, sock: str, *extra: str,
                writethrough: bool | None = None, queues: int = 1,
                discard: bool = False) -> list[str]:
    """A qemu-storage-daemon vhost-user-blk export of the raw ``image`` (node ``disk0``), the
    one the tests and ``--compare`` use: page cache on (cache.direct=off), and with
    ``writethrough`` given, a flush after every write (True) or none (False). ``extra`` goes
    on qsd's command line first (e.g. a QMP monitor). ``discard`` passes the guest's discards
    to the file (``discard=unmap`` on both nodes)."""
    path = os.fspath(image).replace(",", ",,")
    unmap = ",discard=unmap" if discard else ""
    return ["qemu-storage-daemon", *extra,
            "--blockdev", f"driver=file,node-name=file0,filename={path},cache.direct=off{unmap}",
            "--blockdev", f"driver=raw,node-name=disk0,file=file0{unmap}",
            "--export", qsd_export(sock, writethrough=writethrough, queues=queues)]


def qsd_export(sock: str, *, writethrough: bool | None = None, queues: int = 1) -> str:
    """qsd's vhost-user-blk ``--export`` of node ``disk0`` on ``sock``."""
    export = ("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
              f"addr.path={sock},writable=on,num-queues={queues}")
    if writethrough is not None:
        export += f",writethrough={'on' if writethrough else 'off'}"
    return export


def qsd_blockdev_command(blockdev: str, sock: str, *, writethrough: bool,
                         queues: int = 1) -> list[str]:
    """qemu-storage-daemon exporting one ``--blockdev`` that is node ``disk0`` itself (an RBD
    image: ``vblk.lab.rbdimage.RbdSource.qsd_blockdev``), with the export options of
    ``qsd_command``."""
    return ["qemu-storage-daemon", "--blockdev", blockdev,
            "--export", qsd_export(sock, writethrough=writethrough, queues=queues)]


def vblk_command(image: str | os.PathLike, sock: str, *, writethrough: bool,
                 extra: Sequence[str] = ()) -> list[str]:
    """``vblk serve IMAGE`` (a path or an ``rbd:`` token) on ``sock``."""
    return python_command("vblk.cli", "serve", os.fspath(image), "--socket-path", sock,
                          "--log-level", "warning",
                          "--cache", "writethrough" if writethrough else "writeback", *extra)


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _stat_fields(int(name))[2:3] == [str(pgid).encode()]:
            pids.append(int(name))
    return pids


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (state ppid pgrp ... utime(11) stime(12)), or []."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid``."""
    total = 0
    for pid in group_pids(pgid):
        fields = _stat_fields(pid)
        if len(fields) > 12:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Server:
    """A backend started for --compare in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], sock: str, log_path: Path,
                 env: dict | None = None) -> None:
        self.name, self.cmd, self.sock, self.log_path = name, cmd, sock, log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:].strip()
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BackendClosed(f"{self.name} exited with status {self.proc.returncode}: "
                                f"{self.log_tail() or '(empty log)'}")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if os.path.exists(self.sock):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    try:
                        probe.connect(self.sock)
                        return
                    except OSError:
                        pass
            time.sleep(0.05)
        raise BackendTimeout(f"{self.name} did not listen on {self.sock} within {timeout:g} s: "
                             f"{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # a worker left behind
        except (ProcessLookupError, PermissionError):
            pass


def copy_image(src: Path, dst: Path) -> None:
    """Copy keeping holes (SEEK_DATA/SEEK_HOLE + copy_file_range), then flush it to disk so
    write-back of the copy does not run during the first measurement."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:                      # ENXIO: only a hole is left
                break
            stop = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < stop:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), stop - off, off, off)
                if n <= 0:
                    raise OSError(f"copy_file_range stopped at {off} of {src}")
                off += n
            pos = stop
        os.ftruncate(fo.fileno(), size)
        os.fsync(fo.fileno())


def source_version(repo: str | os.PathLike = REPO) -> str | None:
    """The git commit of the vblk code in ``repo``, with the files changed since, and any
    VBLK_* environment variables (the served code, for a result to be reproducible)."""
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("VBLK_"))
    try:
        head = subprocess.run(["git", "-C", os.fspath(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", os.fspath(repo), "status", "--porcelain",
                                "--untracked-files=no", "--", "vblk", "workers", "cli"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return env or None
    if head.returncode != 0:
        return env or None
    changed = [line[3:] for line in dirty.stdout.splitlines()]
    text = head.stdout.strip() + (f" + uncommitted changes in {', '.join(changed)}" if changed else "")
    return f"{text}{' ' + env if env else ''}"
