"""vblk killed and restarted under the Python frontend's verified random workload.

The frontend behaves as QEMU does (GET_INFLIGHT_FD once, then after each backend death:
reconnect, SET_INFLIGHT_FD with the same region, the queue restarted at the device's used
index); the requests it had in flight must all complete, and every read must match the model.
"""
from __future__ import annotations

import os
import random
import tempfile
import threading
import time

import pytest

from vblk.testing.frontend import BackendError, BlkClient
from vblk.testing.model import DiskModel, StressReport, Workload, account_op, submit_op, write_initial_image
from vblk.testing.restart import RestartingVblk
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus

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
    args = ["--workers", "2"] + (["--writeback"] if mode == "writeback" else [])
    vblk = RestartingVblk(image, sock, tmp_path, *args)
    model = DiskModel(SECTORS, salt)
    workload = Workload(99, SECTORS, max_segments=2)
    kills = []
    stop = threading.Event()
    rnd = random.Random(5)

    done = [0]                      # completions seen by the main loop

    def killer():
        while len(kills) < kills_wanted and not stop.is_set():
            mark = done[0]
            # kill only once this vblk has served a good number of requests
            while done[0] < mark + 64 and not stop.is_set():
                time.sleep(0.01)
            if stop.wait(rnd.uniform(0.0, 0.2)):
                return
            vblk.kill_and_restart(freeze=rnd.uniform(0.05, 0.2))
            kills.append(1)

    inflight: dict[int, tuple] = {}
    report = StressReport(seed=0)
    reconnects = ops = 0
    client = BlkClient.connect(sock, ram_mib=32, inflight=True, timeout=20)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while (len(kills) < kills_wanted or inflight) and time.monotonic() < deadline:
            try:
                while len(kills) < kills_wanted and len(inflight) < 16:
                    op = workload.next_op()
                    tag, token = submit_op(client, model, op)
                    inflight[tag] = (op, token)
                    ops += 1
                client.publish()
                for c in client.wait(1, timeout=20):
                    done[0] += 1
                    op, token = inflight.pop(c.tag)
                    account_op(report, model, op, token, c)
            except BackendError:
                reconnects += 1
                client.reconnect(sock)
        stop.set()
        thread.join()
        assert not inflight, f"{len(inflight)} requests never completed"
        assert client.flush().status == BlkStatus.OK
    finally:
        stop.set()
        client.close(graceful=False)
        vblk.stop()
    resubmitted = vblk.resubmitted()
    print(f"{len(kills)} backend kills, {reconnects} reconnects, {ops} verified ops, "
          f"{resubmitted} requests re-run, {len(report.bad_status) + len(report.mismatches)} problems")
    assert len(kills) == kills_wanted
    problems = report.bad_status + report.mismatches
    assert not problems, problems[:10]
    assert resubmitted > 0, "no kill caught a request in flight"
