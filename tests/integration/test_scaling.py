"""``python -m vblk.lab.scaling``: IOPS against --workers and queue depth, and PSS, from a real vblk."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def test_scaling_measures_every_point_and_the_memory(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    out = subprocess.run([sys.executable, "-m", "vblk.lab.scaling", str(image), "--workers", "1,2",
                          "--qds", "1,4", "--duration", "1", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for w in ("1", "2"):
        assert set(data["iops"][w]) == {"1", "4"}
        assert all(v > 0 for v in data["iops"][w].values())
        assert data["processes"][w] == int(w) + 1          # the supervisor and its workers
        pss = data["pss_bytes"][w]
        assert 0 < pss["without_guest_ram"] <= pss["total"]
    # a second worker costs memory: the figure is per process group, not a constant
    assert data["pss_bytes"]["2"]["total"] > data["pss_bytes"]["1"]["total"]


def test_scaling_refuses_a_missing_image(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vblk.lab.scaling", str(tmp_path / "nope.img")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "not a regular file" in out.stderr
