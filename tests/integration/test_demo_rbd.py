"""``vblk demo --rbd`` run for real: it starts its own throwaway Ceph cluster, boots the test
guest on an RBD image (``-m guest``: QEMU) and takes the cluster down; without Ceph it refuses
in one line."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from vblk.testing.cli import error_line, run_vblk


def test_demo_rbd_without_ceph_is_one_line():
    line = error_line(run_vblk("demo", "--rbd", env=dict(os.environ, PATH="/nonexistent")))
    assert "needs Ceph" in line and "apt-get install" in line


def test_demo_rbd_refuses_an_image_path(tmp_path):
    line = error_line(run_vblk("demo", "--rbd", "--image", tmp_path / "x.img"))
    assert "--image goes with the file demo" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.guest
def test_demo_rbd_boots_the_guest_on_an_rbd_image_and_tears_the_cluster_down():
    r = run_vblk("demo", "--rbd", timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert "rbd:rbd/vblk-demo:conf=" in out and "1 OSD (memstore)" in out
    assert "checksum ok" in out and "e2fsck     clean" in out and "result     OK" in out
    [cluster_dir] = re.findall(r"memstore\) in (\S+/ceph),", out)
    assert not Path(cluster_dir).exists()                        # killed and removed
    assert "kept" not in out
