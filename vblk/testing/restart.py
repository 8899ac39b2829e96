"""A vblk process that a test kills with SIGKILL and starts again, as systemd would.

Before the kill the workers are frozen (SIGSTOP) for a moment so that requests pile up in
flight: a kill that finds nothing to recover proves nothing.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class RestartingVblk:
    """Runs ``vblk serve``; kills it with SIGKILL on demand and starts it again at once."""

    def __init__(self, image: Path, sock: str, log_dir: Path, *args: str) -> None:
        """Start ``vblk serve IMAGE --socket-path SOCK ARGS``; logs go to LOG_DIR/vblk-N.log."""
        self.image, self.sock, self.log_dir, self.args = image, sock, log_dir, args
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
