"""Parallel guests under a random fault schedule, every read checked against a model.

``pytest -m stress -n 8`` runs the eight cases at once (eight frontends, eight vblks). Each
case runs a verified random workload for ``VBLK_FAULT_SECONDS`` (default short, for CI) while
a schedule drawn from its seed injects faults: a worker SIGKILLed, the frontend dropping its
connection abruptly and reconnecting (as QEMU does after a crash), or vblk itself SIGKILLed and
restarted. Requests in flight at a fault must all complete; nothing may be lost or wrong.
"""
from __future__ import annotations

import os
import random
import signal
import tempfile
import time

import pytest

from vblk.testing.frontend import BackendError, BlkClient
from vblk.testing.model import DiskModel, StressReport, Workload, account_op, submit_op, write_initial_image
from vblk.testing.restart import RestartingVblk
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus

MiB = 1 << 20
SECTORS = 16 * MiB // SECTOR_SIZE
FAULTS = ("worker_kill", "frontend_drop", "backend_kill")


def workers_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.stress
@pytest.mark.parametrize("seed", range(8))
def test_random_fault_schedule(tmp_path, seed):
    seconds = float(os.environ.get("VBLK_FAULT_SECONDS", 6))
    rnd = random.Random(seed)
    salt = 1000 + seed
    image = tmp_path / "disk.img"
    write_initial_image(str(image), SECTORS, salt)
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-fs-", dir="/tmp"), "vblk.sock")
    args = ["--workers", str(rnd.choice([1, 2, 4])), "--slots", str(rnd.choice([8, 64]))]
    if seed % 2:
        args += ["--cache", "writeback"]
    vblk = RestartingVblk(image, sock, tmp_path, *args)
    model = DiskModel(SECTORS, salt)
    workload = Workload(seed, SECTORS, indirect_share=0.2, max_segments=3)
    client = BlkClient.connect(sock, ram_mib=16, inflight=True, timeout=20)
    inflight: dict[int, tuple] = {}
    report = StressReport(seed=0)
    faults = dict.fromkeys(FAULTS, 0)
    ops = reconnects = 0
    next_fault = time.monotonic() + rnd.uniform(0.2, 0.8)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end or inflight:
            try:
                if time.monotonic() >= next_fault and time.monotonic() < end:
                    fault = rnd.choice(FAULTS)
                    faults[fault] += 1
                    next_fault = time.monotonic() + rnd.uniform(0.2, 0.8)
                    if fault == "worker_kill":
                        pids = workers_of(vblk.proc.pid)
                        if pids:
                            os.kill(rnd.choice(pids), signal.SIGKILL)
                    elif fault == "frontend_drop":
                        reconnects += 1
                        client.reconnect(sock)
                    else:
                        vblk.kill_and_restart(freeze=rnd.uniform(0.0, 0.1))
                while time.monotonic() < end and len(inflight) < 16:
                    op = workload.next_op()
                    tag, token = submit_op(client, model, op)
                    inflight[tag] = (op, token)
                    ops += 1
                client.publish()
                if not inflight:
                    continue
                for c in client.wait(1, timeout=20):
                    op, token = inflight.pop(c.tag)
                    account_op(report, model, op, token, c)
            except BackendError:
                reconnects += 1
                client.reconnect(sock)
        try:
            flushed = client.flush().status
        except BackendError:              # the last fault may have been a backend kill
            client.reconnect(sock)
            flushed = client.flush().status
        assert flushed == BlkStatus.OK
    finally:
        client.close(graceful=False)
        vblk.stop()
    print(f"seed {seed}: {ops} verified ops, faults {faults}, {reconnects} reconnects, "
          f"{vblk.resubmitted()} requests re-run, {len(report.bad_status) + len(report.mismatches)} problems")
    problems = report.bad_status + report.mismatches
    assert not problems, problems[:10]
    assert sum(faults.values()) > 0
