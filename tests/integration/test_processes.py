"""The supervisor and its worker processes as real processes: start, stop, no orphans."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vblk.testing.install import install_into


def children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


def start(image, sock, *args):
    proc = subprocess.Popen([sys.executable, "-m", "vblk.cli", "serve", str(image), "--socket-path",
                             str(sock), *args], stderr=subprocess.PIPE, text=True)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"vblk serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return True
        except OSError:
            return False
    assert wait_for(listening)
    return proc


def test_eight_workers_by_default_and_sigterm_exits_zero(image, tmp_path):
    sock = tmp_path / "s.sock"
    proc = start(image, sock)
    try:
        assert wait_for(lambda: len(children(proc.pid)) == 8)
        workers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not sock.exists()
        assert wait_for(lambda: not any(alive(w) for w in workers))
    finally:
        proc.kill()
        proc.wait()


def test_workers_die_with_the_supervisor(image, tmp_path):
    proc = start(image, tmp_path / "s.sock", "--workers", "3")
    try:
        assert wait_for(lambda: len(children(proc.pid)) == 3)
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert wait_for(lambda: not any(alive(w) for w in workers), 5), "orphaned workers"
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_worker_is_replaced(image, tmp_path):
    proc = start(image, tmp_path / "s.sock", "--workers", "2")
    try:
        assert wait_for(lambda: len(children(proc.pid)) == 2)
        victim = children(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(children(proc.pid)) == 2 and victim not in children(proc.pid))
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# -- a pool that cannot start ---------------------------------------------------------------------

def broken_install(tmp_path: Path) -> str:
    """A venv whose vblk (a wheel of this checkout) has workers that exit at once with status
    3, the way a broken install or a bad dependency makes them: the daemon itself is fine."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True, timeout=60)
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    install_into(site, tmp_path / "build")
    (site / "vblk" / "workers" / "loop.py").write_text("raise SystemExit(3)\n")
    return str(venv / "bin" / "python")


def test_workers_that_keep_dying_at_start_end_serve_with_one_line(image, tmp_path):
    python = broken_install(tmp_path)
    sock = tmp_path / "s.sock"
    started = time.monotonic()
    proc = subprocess.run([python, "-m", "vblk.cli", "serve", str(image), "--socket-path",
                           str(sock), "--workers", "2", "--log-level", "error"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    elapsed = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vblk: error:")]
    assert proc.returncode == 1, proc.stderr
    assert len(errors) == 1 and re.fullmatch(r"vblk: error: worker [01] exited with status 3 "
                                             r"before it was ready, 5 times in a row",
                                             errors[0]), proc.stderr
    assert proc.stderr.splitlines()[-1] == errors[0]
    assert not sock.exists() and not Path(f"{sock}.ctl").exists()   # never listened
    assert "event=listening" not in proc.stderr
    # 5 tries of one worker with backoffs of 50, 100, 200 and 400 ms, not a respawn loop
    assert 0.7 < elapsed < 30, elapsed
