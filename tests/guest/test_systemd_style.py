"""A real guest on a vblk started the way systemd's vblk@.socket + vblk@.service start it.

The manager's two halves, done by hand with real sockets: a listening socket created before vblk
runs and handed over as fd 3 (LISTEN_FDS/LISTEN_PID), and a NOTIFY_SOCKET datagram socket that
must receive READY=1, STATUS= lines and STOPPING=1. (The units themselves run under a real
systemd as PID 1 in tests/integration/test_ops.py::test_units_under_systemd.)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vblk.lab.guest import make_image

pytestmark = pytest.mark.guest
REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())          # exec keeps the pid
os.execv(sys.executable, [sys.executable, "-m", "vblk.cli", "serve", *sys.argv[2:]])
"""

SCRIPT = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo hello from a socket-activated vblk > /mnt/hello
sync
umount /mnt
mount -t ext4 /dev/vda /mnt
echo HELLO=$(cat /mnt/hello | tr ' ' _)
umount /mnt
"""


def notifications(sock: socket.socket, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            break
        if until in got:
            return got
    raise AssertionError(f"no {until} within {timeout} s; got {got}")


def test_guest_on_a_socket_activated_notify_instance(tmp_path, boot):
    image = make_image(tmp_path / "disk.img", 128 * MiB)
    run = Path(tempfile.mkdtemp(prefix="vblk-sd-", dir="/tmp"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run / "disk.sock"))             # what vblk@.socket does
    listener.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(run / "notify"))
    env = dict(os.environ, NOTIFY_SOCKET=str(run / "notify"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(listener.fileno()), str(image),
                             "--workers", "2"], pass_fds=(listener.fileno(),), cwd=REPO, env=env,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    listener.close()                                   # vblk holds it now, as with systemd
    try:
        ready = notifications(notify, "READY=1", 20)
        res = boot(str(run / "disk.sock"), SCRIPT).check()
        assert res.values["HELLO"] == "hello_from_a_socket-activated_vblk"
        statuses = notifications(notify, "STATUS=waiting for a frontend", 10)
        assert "STATUS=frontend connected" in ready + statuses
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in notifications(notify, "STOPPING=1", 10)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert os.path.exists(run / "disk.sock"), "vblk removed a socket it did not create"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
