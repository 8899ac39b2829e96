"""Fixtures for the real-guest tests: the test guest, vblk and qemu-storage-daemon servers.

Every test here boots Debian's kernel under QEMU against a real vhost-user-blk backend.
Prerequisites (qemu-system-x86, qemu-utils for qemu-storage-daemon, busybox-static,
e2fsprogs, strace, and apt lists for fetching the kernel) are checked up front, and a
missing one fails the test with a message naming the package: nothing is skipped.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vblk.lab.guest import (
    GuestBuildError,
    GuestImage,
    GuestProcess,
    GuestResult,
    build_guest,
    start_guest,
)
from vblk.testing.processes import stop_group, unix_listening

REPO = Path(__file__).resolve().parents[2]

# tool -> Debian package that provides it
PREREQUISITES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-storage-daemon": "qemu-system-common",
    "strace": "strace",
    "busybox": "busybox-static",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a real Linux guest under QEMU (slow)")


def _missing_prerequisites() -> list[str]:
    missing = []
    for tool, package in PREREQUISITES.items():
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            missing.append(f"{tool} (apt-get install {package})")
    return missing


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The cached test guest, built on first use (fails, never skips, when it can't be)."""
    missing = _missing_prerequisites()
    if missing:
        pytest.fail("real-guest tests need: " + ", ".join(missing), pytrace=False)
    try:
        return build_guest(verbose=True)
    except GuestBuildError as e:
        pytest.fail(f"cannot build the test guest: {e}", pytrace=False)


class Boot:
    """``boot(socket, script, **run_guest_kwargs) -> GuestResult`` (the serial log goes to
    tmp_path; with a ``Served`` socket, a dead server ends the boot early and its log is added
    to a failed result). Guests that must run at the same time: ``guest = boot.start(socket,
    script, **start_guest_kwargs)`` for each, then ``boot.wait(guest, socket)``."""

    def __init__(self, image: GuestImage, log_dir: Path) -> None:
        self.image, self.log_dir = image, log_dir
        self.numbers = itertools.count(1)

    def __call__(self, sock: str | os.PathLike, script: str, *, timeout: float = 240,
                 alive: Callable[[], bool] | None = None, **kw) -> GuestResult:
        return self.wait(self.start(sock, script, **kw), sock, timeout=timeout, alive=alive)

    def start(self, sock: str | os.PathLike, script: str, **kw) -> GuestProcess:
        kw.setdefault("log_path", self.log_dir / f"guest-{next(self.numbers)}.log")
        return start_guest(sock, script, image=self.image, **kw)

    def wait(self, guest: GuestProcess, sock: str | os.PathLike, *, timeout: float = 240,
             alive: Callable[[], bool] | None = None) -> GuestResult:
        if alive is None and isinstance(sock, Served):
            alive = sock.running
        result = guest.wait(timeout, alive=alive)
        if (result.aborted or not result.ok) and isinstance(sock, Served):
            result.stderr += f"\n--- server log ({sock.log_path}) ---\n{sock.log()[-6000:]}"
        return result


@pytest.fixture
def boot(guest_image: GuestImage, tmp_path: Path) -> Boot:
    """boot(socket, script, **run_guest_kwargs) -> GuestResult, and boot.start / boot.wait
    for guests side by side (``Boot``)."""
    return Boot(guest_image, tmp_path)


def _short_dir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="vblk-t-", dir="/tmp"))


def _wait_for_socket(path: str, proc: subprocess.Popen, log: Path, what: str,
                     timeout: float = 10.0, *, connect: bool = True) -> None:
    """Until ``path`` accepts a connection, or with ``connect`` False until it listens (no
    connection made: what qsd needs, see ``vblk.testing.processes.unix_listening``)."""
    deadline = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode} before listening on "
                        f"{path}:\n{_tail(log)}", pytrace=False)
        if not connect:
            if unix_listening(path):
                return
        elif os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(1.0)
                s.connect(path)
                return
            except OSError as e:
                last_err = e
            finally:
                s.close()
        time.sleep(0.05)
    pytest.fail(f"{what} did not accept connections on {path} within {timeout} s "
                f"(last error: {last_err}):\n{_tail(log)}", pytrace=False)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


class Served(str):
    """A running server's socket path (a str), with the process handle attached."""

    proc: subprocess.Popen
    log_path: Path
    strace_path: Path | None
    command: list[str]

    def log(self) -> str:
        return _tail(self.log_path, 20000)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM the server's process group, SIGKILL after 5 s; returns the exit status."""
        return stop_group(self.proc)


def _start(cmd: Sequence[str], sock: str, log: Path, what: str, *, cwd: Path | None = None,
           env: dict | None = None, strace_path: Path | None = None,
           connect: bool = True) -> Served:
    cmd = list(cmd)
    if strace_path is not None:
        cmd = ["strace", "-f", "-qq", "--seccomp-bpf", "-ttt", "-e", "trace=fdatasync,fsync",
               "-o", str(strace_path), "--"] + cmd
    logf = open(log, "ab")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)
    finally:
        logf.close()
    served = Served(sock)
    served.proc, served.log_path, served.strace_path, served.command = proc, log, strace_path, cmd
    try:
        _wait_for_socket(sock, proc, log, what, connect=connect)
    except BaseException:
        served.stop()
        raise
    return served


@dataclass
class _Servers:
    kind: str
    started: list[Served] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def stop_all(self) -> None:
        for s in reversed(self.started):
            s.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def serve_vblk(tmp_path: Path):
    """serve_vblk(spec, *args, strace=False, python=None) -> socket path (a ``Served`` str).

    Runs ``python -m vblk.cli serve SPEC --socket-path SOCK ARGS...`` (SPEC is an image path
    or an ACRN option string such as ``disk.img,writeback,range=256/32768``), waits until
    the socket accepts a connection, and stops it at teardown.  With ``strace=True`` the
    server runs under ``strace -f -ttt -e trace=fdatasync,fsync`` and ``served.strace_path``
    names the trace (read it after ``served.stop()``).  ``python``: another interpreter's
    vblk (``PYTHON -I -m vblk.cli``, e.g. a copy installed into a venv) instead of this
    checkout's.
    """
    servers = _Servers("vblk")

    def _serve(spec: str | os.PathLike, *args: str, strace: bool = False,
               python: str | os.PathLike | None = None) -> Served:
        d = _short_dir()
        servers.dirs.append(d)
        n = len(servers.started) + 1
        sock = str(d / "vblk.sock")
        log = tmp_path / f"vblk-serve-{n}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        interpreter = [sys.executable] if python is None else [os.fspath(python), "-I"]
        cmd = [*interpreter, "-m", "vblk.cli", "serve", os.fspath(spec), "--socket-path", sock,
               *map(str, args)]
        served = _start(cmd, sock, log, "vblk serve", cwd=REPO if python is None else d, env=env,
                        strace_path=(tmp_path / f"vblk-serve-{n}.strace") if strace else None)
        servers.started.append(served)
        return served

    yield _serve
    servers.stop_all()


@pytest.fixture
def serve_vblk_config(tmp_path: Path):
    """serve_vblk_config(disks, **host_keys) -> one socket path (a ``Served`` str) per disk.

    Writes a host.toml of one ``[[disk]]`` table per dict of ``disks`` (its keys as in the
    file: ``spec``, ``cache``, ``num-queues``, ...; ``socket-path`` is set here, ``d1.sock``,
    ``d2.sock``, ...) and the host keys (``workers=2``: ``workers``), runs one ``vblk serve
    --config`` on it and waits until every disk's socket accepts a connection. The sockets
    share the process (``proc``, ``log``, ``stop``); it is stopped at teardown."""
    servers = _Servers("vblk")

    def _serve(disks: Sequence[dict], **host_keys) -> list[Served]:
        d = _short_dir()
        servers.dirs.append(d)
        socks = [str(d / f"d{i}.sock") for i in range(1, len(disks) + 1)]
        lines = [f"{key} = {_toml(value)}" for key, value in host_keys.items()]
        for sock, table in zip(socks, disks):
            lines += ["[[disk]]", f"socket-path = {_toml(sock)}"]
            lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
        config = tmp_path / "host.toml"
        config.write_text("\n".join(lines) + "\n")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = tmp_path / "vblk-serve-config.log"
        first = _start([sys.executable, "-m", "vblk.cli", "serve", "--config", str(config)],
                       socks[0], log, "vblk serve --config", cwd=REPO, env=env)
        servers.started.append(first)
        served = [first]
        for sock in socks[1:]:
            _wait_for_socket(sock, first.proc, log, "vblk serve --config")
            other = Served(sock)
            other.proc, other.log_path, other.strace_path, other.command = \
                first.proc, log, None, first.command
            served.append(other)
        return served

    yield _serve
    servers.stop_all()


def _toml(value: object) -> str:
    """A str, bool or int as a TOML value (a JSON string is a TOML basic string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return json.dumps(value)
    raise TypeError(f"no TOML for {value!r}")


@pytest.fixture
def serve_qsd(tmp_path: Path):
    """serve_qsd(image, *, readonly=False, logical_block_size=None, num_queues=1, qmp=None,
    throttle=None, discard=False) -> socket path, a qemu-storage-daemon vhost-user-blk export
    of a raw image (node ``disk0``); ``qmp=PATH`` adds a QMP monitor on that Unix socket;
    ``throttle`` (e.g. ``"x-iops-total=200"``) puts a throttle node in a throttle group with
    those limits between the export and the image; ``discard=True``: the guest's discards
    reach the file."""
    servers = _Servers("qsd")

    def _serve(image: str | os.PathLike, *, readonly: bool = False,
               logical_block_size: int | None = None, num_queues: int = 1,
               qmp: str | os.PathLike | None = None, throttle: str | None = None,
               discard: bool = False) -> Served:
        d = _short_dir()
        servers.dirs.append(d)
        sock = str(d / "qsd.sock")
        log = tmp_path / f"qsd-{len(servers.started) + 1}.log"
        node = "thr0" if throttle else "disk0"
        export = (f"type=vhost-user-blk,id=exp0,node-name={node},addr.type=unix,addr.path={sock},"
                  f"writable={'off' if readonly else 'on'},num-queues={num_queues}")
        if logical_block_size:
            export += f",logical-block-size={logical_block_size}"
        # discard=unmap on both nodes passes the guest's discards to the file
        node_opts = (",read-only=on" if readonly else "") + (",discard=unmap" if discard else "")
        cmd = ["qemu-storage-daemon",
               "--blockdev", f"driver=file,node-name=file0,filename={os.fspath(image)}{node_opts}",
               "--blockdev", f"driver=raw,node-name=disk0,file=file0{node_opts}",
               "--export", export]
        if throttle:
            cmd[1:1] = ["--object", f"throttle-group,id=t0,{throttle}"]
            cmd[-2:-2] = ["--blockdev", "driver=throttle,node-name=thr0,throttle-group=t0,file=disk0"]
        if qmp is not None:
            cmd += ["--chardev", f"socket,id=qmp0,path={os.fspath(qmp)},server=on,wait=off",
                    "--monitor", "chardev=qmp0"]
        served = _start(cmd, sock, log, "qemu-storage-daemon", connect=False)
        servers.started.append(served)
        return served

    yield _serve
    servers.stop_all()
