"""vblk killed and restarted under the Python frontend's verified random workload.

The frontend behaves as QEMU does (GET_INFLIGHT_FD once, then after each backend death:
reconnect, SET_INFLIGHT_FD with the same region, the queue restarted at the device's used
index); the requests it had in flight must all complete, and every read must match the model.
"""
from __future__ import annotations

import os
import tempfile

import pytest

from vblk.testing.model import DiskModel, Workload, write_initial_image
from vblk.testing.restart import RestartingVblk, restart_storm
from vblk.virtio.constants import SECTOR_SIZE

MiB = 1 << 20
SECTORS = 32 * MiB // SECTOR_SIZE


@pytest.mark.stress
@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
def test_twenty_backend_kills_under_the_test_frontend(tmp_path, mode):
    kills_wanted = int(os.environ.get("VBLK_RESTART_KILLS", 20))
    salt = 4242
    image = tmp_path / "disk.img"
    write_initial_image(str(image), SECTORS, salt)
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-rf-", dir="/tmp"), "vblk.sock")
    args = ["--workers", "2"] + (["--cache", "writeback"] if mode == "writeback" else [])
    vblk = RestartingVblk(image, sock, tmp_path, *args)
    try:
        result = restart_storm(vblk, DiskModel(SECTORS, salt), Workload(99, SECTORS, max_segments=2),
                               kills_wanted)
    finally:
        vblk.stop()
    resubmitted = vblk.resubmitted()
    print(f"{result.kills} backend kills, {result.reconnects} reconnects, {result.ops} verified "
          f"ops, {resubmitted} requests re-run, {len(result.problems)} problems")
    assert result.kills == kills_wanted
    assert not result.problems, result.problems[:10]
    assert resubmitted > 0, "no kill caught a request in flight"
