"""``vblk serve`` becomes ``python -m vblk.daemon``: same PID, the CLI's heavy imports gone,
the command line still naming the disk, and the config (passed in a memfd) closed."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from vblk.testing.frontend import BlkClient
from vblk.testing.processes import stop_group
from vblk.virtio.constants import BlkStatus

REPO = Path(__file__).resolve().parents[2]


def test_serve_execs_into_the_lean_daemon(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    sock = tmp_path / "d.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vblk.cli", "serve", str(image), "--socket-path",
                             str(sock), "--workers", "1"], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.05)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"vblk.daemon" in argv and str(image).encode() in argv   # ps still names the disk
        with open(f"/proc/{proc.pid}/environ", "rb") as f:
            assert len(f.read()) < 64 * 1024          # the config did not travel in it
        fds = [os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")]
        assert not any("vblk-serve-config" in t for t in fds), fds
        with open(f"/proc/{proc.pid}/maps") as f:
            maps = f.read()
        assert "pydantic_core" not in maps                                # typer's baggage gone
        with BlkClient.connect(str(sock)) as c:
            assert c.write(0, b"x" * 512).status == BlkStatus.OK
    finally:
        stop_group(proc)
    assert proc.returncode == 0
