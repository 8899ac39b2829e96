"""``vblk demo`` run for real, as a new user runs it: it says how far the boot got while the
guest boots (progress), then what the guest saw."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.guest


def test_demo_shows_progress_while_the_guest_boots_then_reports(guest_image, tmp_path):
    image = tmp_path / "demo.img"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "vblk.cli", "demo", "--image", image], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=400,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert "\r" not in r.stdout and "\x1b" not in r.stdout        # a pipe gets plain lines
    assert lines[0] == "vblk demo"
    guest = [i for i, line in enumerate(lines) if line.startswith("  guest      Linux ")]
    from vblk.lab.guest import default_accel
    start = lines.index(f"  boot       starting QEMU ({default_accel()}) on vblk's socket ...")
    end = next(i for i, line in enumerate(lines) if line.startswith("  boot       booted, ran the "
                                                                      "scenario and powered off"))
    assert guest and guest[0] < start < end
    notes = lines[start + 1:end]
    seen = [re.fullmatch(r" {13}(.+) \((\d+\.\d) s\)", line) for line in notes]
    assert all(seen), notes
    what = [m.group(1) for m in seen]
    assert what == ["init runs; waiting for /dev/vda",
                    "/dev/vda is there (vblk's disk); reading its geometry",
                    "mkfs.ext4 /dev/vda", "mounting", "writing a 8 MiB file",
                    "dropping the page cache, reading it back", "e2fsck"], notes
    times = [float(m.group(2)) for m in seen]
    assert times == sorted(times) and times[-1] < float(lines[end].split(" in ")[-1][:-2])
    assert "  file       8 MiB written, synced, read back: checksum ok" in lines
    assert lines[-1] == "  result     OK" and image.exists()
