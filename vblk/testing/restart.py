"""A vblk process that a test kills with SIGKILL and starts again, as systemd would, and the
storm of such kills under the Python frontend's verified random workload.

Before the kill the I/O is frozen for a moment so that requests pile up in flight: a kill that
finds nothing to recover proves nothing. For a file the workers are frozen (SIGSTOP); for an
RBD image (no workers) the test passes its own ``freezer``: the Ceph cluster's daemons.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vblk.testing.frontend import BackendError, BlkClient
from vblk.testing.model import DiskModel, StressReport, Workload, account_op, submit_op
from vblk.virtio.constants import BlkStatus

REPO = Path(__file__).resolve().parents[2]


class RestartingVblk:
    """Runs ``vblk serve``; kills it with SIGKILL on demand and starts it again at once."""

    def __init__(self, image: Path | str, sock: str, log_dir: Path, *args: str,
                 freezer: tuple[Callable[[], None], Callable[[], None]] | None = None) -> None:
        """Start ``vblk serve IMAGE --socket-path SOCK ARGS``; logs go to LOG_DIR/vblk-N.log.
        ``freezer``: (freeze, thaw) of whatever does the I/O, instead of the worker processes."""
        self.image, self.sock, self.log_dir, self.args = image, sock, log_dir, args
        self.freezer = freezer
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"vblk-{self.generation}.log"

    def start(self) -> None:
        self.generation += 1
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vblk.cli", "serve", str(self.image), "--socket-path",
                 self.sock, "--log-level", "info", *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.sock)
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"vblk did not listen: {self.log_path.read_text()}")

    def serving(self) -> bool:
        """The frontend is connected and a queue runs (so I/O can be in flight)."""
        return "event=queue_started" in self.log_path.read_text(errors="replace")

    def kill_and_restart(self, freeze: float) -> None:
        """Freeze the workers for ``freeze`` seconds (requests pile up in flight), then SIGKILL
        the supervisor (the workers die with it) and start a new vblk."""
        if self.freezer is not None:
            stop, cont = self.freezer
            stop()
            time.sleep(freeze)
            self.proc.kill()
            self.proc.wait()
            cont()
            self.start()
            return
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                workers = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            workers = []
        for w in workers:
            try:
                os.kill(w, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        time.sleep(freeze)
        self.proc.kill()
        self.proc.wait()
        for w in workers:       # a worker still starting up has no PDEATHSIG yet: let it go
            try:
                os.kill(w, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def logs(self) -> str:
        return "".join(f"--- generation {g}\n" + (self.log_dir / f"vblk-{g}.log").read_text(errors="replace")
                       for g in range(1, self.generation + 1))

    def resubmitted(self) -> int:
        """Requests the restarted processes ran again (from their queue_started lines)."""
        return sum(int(x.split()[0]) for x in self.logs().split("resubmitted=")[1:])


@dataclass
class StormResult:
    kills: int = 0
    reconnects: int = 0
    ops: int = 0
    report: StressReport = field(default_factory=lambda: StressReport(seed=0))

    @property
    def problems(self) -> list[str]:
        return self.report.bad_status + self.report.mismatches


def restart_storm(vblk: RestartingVblk, model: DiskModel, workload: Workload, kills_wanted: int,
                  *, seed: int = 5, qd: int = 16, deadline_s: float = 180) -> StormResult:
    """Run ``workload`` through a frontend that behaves as QEMU does (GET_INFLIGHT_FD once,
    then after each backend death: reconnect, SET_INFLIGHT_FD with the same region, the queue
    restarted at the device's used index) while ``vblk`` is killed and restarted
    ``kills_wanted`` times; every request must complete and every read match ``model``."""
    import random
    result = StormResult()
    stop = threading.Event()
    rnd = random.Random(seed)
    done = [0]                      # completions seen by the main loop

    def killer():
        while result.kills < kills_wanted and not stop.is_set():
            mark = done[0]
            # kill only once this vblk has served a good number of requests
            while done[0] < mark + 64 and not stop.is_set():
                time.sleep(0.01)
            if stop.wait(rnd.uniform(0.0, 0.2)):
                return
            vblk.kill_and_restart(freeze=rnd.uniform(0.05, 0.2))
            result.kills += 1

    inflight: dict[int, tuple] = {}
    client = BlkClient.connect(vblk.sock, ram_mib=32, inflight=True, timeout=20)
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + deadline_s
        while (result.kills < kills_wanted or inflight) and time.monotonic() < deadline:
            try:
                while result.kills < kills_wanted and len(inflight) < qd:
                    op = workload.next_op()
                    tag, token = submit_op(client, model, op)
                    inflight[tag] = (op, token)
                    result.ops += 1
                client.publish()
                for c in client.wait(1, timeout=20):
                    done[0] += 1
                    op, token = inflight.pop(c.tag)
                    account_op(result.report, model, op, token, c)
            except BackendError:
                result.reconnects += 1
                client.reconnect(vblk.sock)
        stop.set()
        thread.join()
        assert not inflight, f"{len(inflight)} requests never completed"
        assert client.flush().status == BlkStatus.OK
    finally:
        stop.set()
        client.close(graceful=False)
    return result
