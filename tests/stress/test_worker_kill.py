"""Workers killed with SIGKILL in the middle of a verified workload: the guest sees nothing.

The supervisor notices a dead worker through its control socket, starts a new one and re-issues
the slots the dead one had taken (reads and writes are idempotent; a slot it had finished but
not reported is reported by the supervisor). Every read is checked against the model.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from vblk.testing.frontend import BlkClient
from vblk.testing.model import DiskModel, Workload, run_stress, write_initial_image
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus

MiB = 1 << 20
SECTORS = 32 * MiB // SECTOR_SIZE


def worker_pids(supervisor_pid: int) -> list[int]:
    try:
        with open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


class Killer(threading.Thread):
    """SIGKILLs a random worker every ``interval`` seconds until ``kills`` are done or stopped."""

    def __init__(self, supervisor_pid: int, kills: int, interval: float, seed: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.target, self.interval = supervisor_pid, kills, interval
        self.random = random.Random(seed)
        self.kills = 0
        self.done = threading.Event()

    def run(self) -> None:
        while self.kills < self.target and not self.done.wait(self.interval):
            pids = worker_pids(self.pid)
            if not pids:
                continue
            try:
                os.kill(self.random.choice(pids), signal.SIGKILL)
                self.kills += 1
            except ProcessLookupError:
                pass


@pytest.mark.stress
@pytest.mark.parametrize("mode", ["writethrough", "writeback", "writeback-ring"])
def test_hundred_worker_kills_lose_nothing(vblk_server, tmp_path, mode, monkeypatch):
    """writethrough / writeback: writes go to the workers (the write ring off), so killed
    workers hold writes; in writeback every read does too (page-cache hits are normally read
    by the supervisor itself). writeback-ring: the reads and writes run on the disk's
    io_uring while the killed workers hold the FLUSHes (and what the ring hands back)."""
    kills = int(os.environ.get("VBLK_WORKER_KILLS", 100))
    seed = 7100 + ("writeback" in mode) + 2 * (mode == "writeback-ring")
    salt = seed * 31
    image = tmp_path / "kill.img"
    write_initial_image(str(image), SECTORS, salt)
    monkeypatch.setenv("VBLK_INLINE_READS", "1" if mode == "writethrough" else "0")
    monkeypatch.setenv("VBLK_URING", "1" if mode == "writeback-ring" else "0")
    args = ["--workers", "4", "--log-level", os.environ.get("VBLK_LOG", "info")]
    args += ["--cache", "writeback"] if "writeback" in mode else []
    sock = vblk_server(image, *args)
    model = DiskModel(SECTORS, salt)
    workload = Workload(seed, SECTORS, indirect_share=0.25, max_segments=4)
    killer = Killer(sock.proc.pid, kills, 0.05, seed)
    with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
        killer.start()
        ops = 0
        deadline = time.monotonic() + 120
        reports = []
        while killer.kills < kills and time.monotonic() < deadline:
            reports.append(run_stress(client, model, workload, 500, qd=16, seed=seed))
            ops += reports[-1].ops
        killer.done.set()
        killer.join()
        reports.append(run_stress(client, model, workload, 500, qd=16, seed=seed))
        assert client.flush().status == BlkStatus.OK
    problems = [p for r in reports for p in r.bad_status + r.mismatches]
    print(f"{killer.kills} worker kills during {sum(r.ops for r in reports)} verified ops, "
          f"{len(problems)} problems")
    assert killer.kills == kills
    assert not problems, problems[:10]
    assert sock.proc.poll() is None
    # A worker killed before it was ready is started again after a backoff (up to 2 s).
    deadline = time.monotonic() + 15
    while len(worker_pids(sock.proc.pid)) != 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(worker_pids(sock.proc.pid)) == 4
