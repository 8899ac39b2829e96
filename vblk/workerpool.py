"""The worker processes, seen from the supervisor: start, feed, watch, restart, stop.

Each worker gets at start (by fd inheritance): the backing store fd, the slot memfd, the read
end of its own submission pipe, the write end of the shared completion pipe, and one end of a
SOCK_SEQPACKET control socket. Guest memory fds travel over the control socket (SCM_RIGHTS)
with a msgpack header whenever the memory table changes, and again to a restarted worker.
"""
from __future__ import annotations

import array
import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field

import msgpack

from vblk.interpreter import python_command

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    index: int
    proc: subprocess.Popen
    submit_w: int
    control: socket.socket
    outstanding: set[int] = field(default_factory=set)

    def send_control(self, msg: dict, fds: list[int] = ()) -> None:
        data = msgpack.packb(msg)
        try:
            if fds:
                socket.send_fds(self.control, [data], list(fds))
            else:
                self.control.send(data)
        except OSError as exc:           # a dead worker is noticed through its control socket
            log.warning("event=worker_control_failed worker=%d error=%r", self.index, exc)

    def submit(self, slots: list[int]) -> None:
        """Hand slots to the worker. If it has just died they stay outstanding: the death is
        noticed on its control socket and they are re-issued to its replacement."""
        try:
            os.write(self.submit_w, array.array("I", slots).tobytes())
        except BrokenPipeError:
            log.warning("event=worker_gone worker=%d slots=%d", self.index, len(slots))

    def close(self) -> None:
        os.close(self.submit_w)
        self.control.close()


class WorkerPool:
    def __init__(self, count: int, backing_fd: int, slots_fd: int, slot_count: int,
                 log_level: str = "WARNING", window: tuple[int, int] | None = None) -> None:
        self.count = count
        self.window = window          # [start, end) of the backing store the guest may reach
        self.backing_fd = backing_fd
        self.slots_fd = slots_fd
        self.slot_count = slot_count
        self.log_level = log_level
        self.complete_r, self.complete_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.complete_r, False)
        self.workers: list[WorkerHandle] = []
        self.memory_msg: tuple[dict, list[int]] = ({"op": "memory", "generation": 0, "regions": []}, [])
        self.restarts = 0

    def start(self) -> None:
        self.workers = [self._spawn(i) for i in range(self.count)]

    def _spawn(self, index: int) -> WorkerHandle:
        submit_r, submit_w = os.pipe2(os.O_CLOEXEC)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        args = python_command("vblk.workers", "--index", str(index),
                "--backing-fd", str(self.backing_fd), "--slots-fd", str(self.slots_fd),
                "--slots", str(self.slot_count), "--submit-fd", str(submit_r),
                "--complete-fd", str(self.complete_w), "--control-fd", str(child_end.fileno()),
                "--parent", str(os.getpid()), "--log-level", self.log_level)
        if self.window is not None:
            args += ["--window", f"{self.window[0]}:{self.window[1]}"]
        try:
            proc = subprocess.Popen(args, pass_fds=(self.backing_fd, self.slots_fd, submit_r,
                                                    self.complete_w, child_end.fileno()),
                                    stdin=subprocess.DEVNULL)
        finally:
            os.close(submit_r)
            child_end.close()
        handle = WorkerHandle(index, proc, submit_w, parent_end)
        msg, fds = self.memory_msg
        if msg["regions"]:
            handle.send_control(msg, fds)
        log.info("event=worker_started worker=%d pid=%d", index, proc.pid)
        return handle

    def set_memory(self, generation: int, regions: list[tuple[int, int, int, int]],
                   fds: list[int]) -> None:
        """Tell every worker the new table (the fds stay owned by the caller)."""
        self.memory_msg = ({"op": "memory", "generation": generation, "regions": regions}, list(fds))
        for w in self.workers:
            w.send_control(*self.memory_msg)

    def least_busy(self) -> WorkerHandle:
        return min(self.workers, key=lambda w: len(w.outstanding))

    def restart(self, handle: WorkerHandle) -> WorkerHandle:
        """Replace a dead worker; the caller re-issues what it had outstanding."""
        code = handle.proc.wait()
        log.warning("event=worker_died worker=%d pid=%d status=%s", handle.index, handle.proc.pid, code)
        handle.close()
        new = self._spawn(handle.index)
        new.outstanding = handle.outstanding
        self.workers[handle.index] = new
        self.restarts += 1
        return new

    def stop(self, timeout: float = 5.0) -> None:
        for w in self.workers:
            w.send_control({"op": "stop"})
            w.close()
        for w in self.workers:
            try:
                w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.workers = []
        os.close(self.complete_r)
        os.close(self.complete_w)
