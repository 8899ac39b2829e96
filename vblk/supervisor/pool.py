"""The worker processes, seen from the supervisor: the I/O engine for backings that block.

Theory of operation
-------------------
Each worker is ``python -I -m vblk.workers`` (vblk.interpreter) with the arguments of
``vblk.ipc.WorkerArgs``: the slot memfd, the read end of its own submission pipe, the write
end of the shared completion pipe, one end of a SOCK_SEQPACKET control socket and every
disk's backing hand-off (its fd), by disk number. Guest memory fds travel over the control
socket whenever a disk's memory table changes, and again (every disk's) to a restarted
worker. A disk added at run time (``add_disk``) goes to every live worker over the control
socket, and is in the argv of every worker started after; ``remove_disk`` tells them all to
drop one. One pool serves every disk of the supervisor (vblk.supervisor.disks): the pool knows
slots and disk numbers, not which disk a slot belongs to beyond the number it carries.

Starting: a worker says READY on its control socket once it can take slots. ``start`` waits
for every worker to be ready; one that exits first is started again after a backoff (50 ms,
doubling up to 2 s), and one that fails ``START_ATTEMPTS`` times in a row makes ``start``
raise WorkerStartError -- ``vblk serve`` then says so in one line and exits non-zero instead
of listening over a dead pool. A worker SIGKILLed before it was ready (an operator, the OOM
killer) is not a worker that cannot start: it is replaced at once and counts no failure.

Feeding: ``post`` puts a slot in the batch of the least busy ready worker -- except durable
writes (write-through), which all go to one worker per batch so that one fdatasync covers
them (see vblk.workers), and buffered writes (write-back), which go to an idle worker only
while fewer than WRITE_SPREAD (the CPUs) workers have requests -- and ``flush`` writes each
batch to its worker's pipe at once. ``reap`` reads finished slot numbers from the completion
pipe.

The quiet worker (fairness between disks): a worker runs its slots in the order they came,
so a request of a disk at QD1 posted beside a disk that keeps every worker a few requests
deep waits behind those requests (seen: 194 -> 1330 µs p50 beside an O_DIRECT read flood).
So while the pool serves more than one disk, the last worker is kept for disks that have
nothing at the workers: it takes one request of such a disk when it has none, and the least
busy rule never picks it. A flooding disk runs on the other workers (one fewer: an O_DIRECT
read flood went 22.0k -> 21.6k IOPS) and a quiet disk's request never queues behind it;
the quiet worker mostly sleeps, so the scheduler also runs it soon after it is woken.
One disk alone has every worker.

Dying: EOF on a worker's control socket means it died. What it had finished but not reported
is reported; the rest is re-issued at once to the least busy live worker (or, with none
alive, to the first one that becomes ready), whichever disks they belong to, so requests in
flight still complete while the dead worker's replacement starts -- at once if it had been
running, after the backoff if it died before it was ready. At run time a worker that keeps
failing is retried forever, with the backoff, and logged each time.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from vblk import ipc
from vblk.backing import Backing
from vblk.interpreter import python_command
from vblk.ipc import FLAG_SYNC, Op, SlotArea, SlotState
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.stats import Stats

log = logging.getLogger("vblk.supervisor")

_WRITE = int(Op.WRITE)

# Buffered writes are copies into the page cache, CPU-bound: workers at them beyond the CPUs
# this process may run on only add wake-ups (A/B, 2 CPUs, 8 workers, write-back: 4k randwrite
# QD32 47.0k -> 53.3k IOPS, 128k write QD8 18.1k -> 24.1k; at 1: 40.3k and 21.3k).
WRITE_SPREAD = len(os.sched_getaffinity(0))
# The supervisor polls through the workers' time while no more than this many requests are at
# them (vblk.supervisor.loop, Waiting polls): beyond it the workers need the CPUs.
AWAIT_AT_MOST = max(1, WRITE_SPREAD // 2)
START_ATTEMPTS = 5             # consecutive deaths before READY that end a start
START_TIMEOUT = 60.0           # the longest ``start`` waits for every worker to be ready
BACKOFF_FIRST = 0.05
BACKOFF_MAX = 2.0


def awaited(in_flight: int) -> bool:
    """Whether the loop polls through the wait of ``in_flight`` requests (see AWAIT_AT_MOST)."""
    return 0 < in_flight <= AWAIT_AT_MOST


def _load(w: WorkerHandle) -> int:
    return len(w.outstanding)


class WorkerStartError(Exception):
    """The workers cannot be started: ``vblk serve`` exits with this message."""


@dataclass
class WorkerHandle:
    index: int
    proc: subprocess.Popen
    submit_w: int
    control: socket.socket
    outstanding: set[int] = field(default_factory=set)
    ready: bool = False

    def send_control(self, msg: dict, fds=()) -> None:
        try:
            ipc.send_control(self.control, msg, fds)
        except OSError as exc:           # a dead worker is noticed through its control socket
            log.warning("event=worker_control_failed worker=%d error=%s", self.index, quote(repr(exc)))

    def submit(self, slots: list[int]) -> None:
        """Hand slots to the worker. If it has just died they stay outstanding: the death is
        noticed on its control socket and they are re-issued."""
        try:
            os.write(self.submit_w, ipc.pack_slots(slots))
        except BrokenPipeError:
            log.warning("event=worker_gone worker=%d slots=%d", self.index, len(slots))

    def close(self) -> None:
        os.close(self.submit_w)
        self.control.close()


class WorkerPool:
    def __init__(self, count: int, disks: dict[int, Backing] | Backing, slots: SlotArea,
                 stats: Stats, log_level: str = "WARNING") -> None:
        """``disks``: disk number -> its (blocking) backing; a lone backing is disk 0.
        ``stats``: whatever counts worker restarts (``worker_restarted()``)."""
        self.count = count
        self.disks = disks if isinstance(disks, dict) else {0: disks}
        self.slots = slots
        self.stats = stats
        self.log_level = log_level
        self.complete_r, self.complete_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.complete_r, False)
        self.completion_fd = self.complete_r
        self.workers: list[WorkerHandle | None] = [None] * count
        self._candidates: list[WorkerHandle] | None = None    # who takes slots (see _least_busy)
        self.failures = [0] * count            # consecutive deaths before READY, per worker
        self.owner: list[int] = [-1] * slots.count
        self.orphans: list[int] = []           # re-issued slots waiting for a live worker
        self.batches: dict[int, list[int]] = {}
        self._sync_worker: WorkerHandle | None = None
        self.memory_msgs: dict[int, tuple[dict, list[int]]] = {}   # disk -> its latest table
        self.disk_of = [-1] * slots.count      # slot -> its disk while posted, else -1
        self.in_pool: dict[int, int] = {}      # disk -> its slots posted and not yet reaped
        self.posted = 0                        # every disk's
        self.loop = None                       # set by attach
        self.stopping = False

    # -- starting --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until each is ready (WorkerStartError if one cannot)."""
        for i in range(self.count):
            self.workers[i] = self._spawn(i)
            self._candidates = None
        deadline = time.monotonic() + START_TIMEOUT
        while not all(w is not None and w.ready for w in self.workers):
            left = deadline - time.monotonic()
            if left <= 0:
                slow = [w.index for w in self.workers if w is None or not w.ready]
                raise WorkerStartError(f"workers {slow} were not ready within {START_TIMEOUT:g} s")
            live = {w.control.fileno(): w for w in self.workers if w is not None}
            ready, _, _ = select.select(list(live), [], [], min(left, 1.0))
            for fd in ready:
                w = live[fd]
                if not self._read_control(w):
                    self._start_failed(w)

    def _start_failed(self, w: WorkerHandle) -> None:
        code = self._reap_process(w)
        self.workers[w.index] = None
        self._candidates = None
        if code != -signal.SIGKILL:
            self.failures[w.index] += 1
        if self.failures[w.index] >= START_ATTEMPTS:
            self.stop()
            raise WorkerStartError(f"worker {w.index} exited with status {code} before it was "
                                   f"ready, {START_ATTEMPTS} times in a row")
        time.sleep(self._backoff(w.index))
        self.workers[w.index] = self._spawn(w.index)
        self._candidates = None

    def _backoff(self, index: int) -> float:
        n = self.failures[index]
        return 0.0 if n == 0 else min(BACKOFF_FIRST * 2 ** (n - 1), BACKOFF_MAX)

    def _spawn(self, index: int) -> WorkerHandle:
        submit_r, submit_w = os.pipe2(os.O_CLOEXEC)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        descs, backing_fds = {}, []
        for disk, backing in self.disks.items():
            descs[disk], fds = backing.handoff()
            backing_fds += fds
        args = ipc.WorkerArgs(index=index, slots_fd=self.slots.fd, slot_count=self.slots.count,
                              submit_fd=submit_r, complete_fd=self.complete_w,
                              control_fd=child_end.fileno(), parent=os.getpid(),
                              log_level=self.log_level, disks=descs)
        try:
            proc = subprocess.Popen(python_command("vblk.workers", *args.argv()),
                                    pass_fds=args.fds(backing_fds), stdin=subprocess.DEVNULL)
        finally:
            os.close(submit_r)
            child_end.close()
        handle = WorkerHandle(index, proc, submit_w, parent_end)
        for msg, fds in self.memory_msgs.values():
            if msg["regions"]:
                handle.send_control(msg, fds)
        log.info("event=worker_started worker=%d pid=%d", index, proc.pid)
        return handle

    def _read_control(self, w: WorkerHandle) -> bool:
        """Take one message from ``w``; False at EOF (the worker died)."""
        try:
            msg, fds = ipc.recv_control(w.control)
        except OSError:
            return False
        for fd in fds:
            os.close(fd)
        if msg is None:
            return False
        if msg == ipc.READY:
            w.ready = True
            self._candidates = None
            self.failures[w.index] = 0
        return True

    def _reap_process(self, w: WorkerHandle) -> int | None:
        try:
            code = w.proc.wait(5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            code = w.proc.wait()
        log.warning("event=worker_died worker=%d pid=%d status=%s ready=%s", w.index,
                    w.proc.pid, code, w.ready)
        w.close()
        return code

    # -- the event loop ----------------------------------------------------------------------------
    def attach(self, loop) -> None:
        """Watch every worker's control socket on ``loop`` (group "engine")."""
        self.loop = loop
        for w in self.workers:
            if w is not None:
                self._watch(w)

    def _watch(self, w: WorkerHandle) -> None:
        self.loop.watch(w.control.fileno(), lambda w=w: self._on_control(w), "engine")

    def _on_control(self, w: WorkerHandle) -> None:
        fd = w.control.fileno()
        if self._read_control(w):
            if w.ready and self.orphans:
                orphans, self.orphans = self.orphans, []
                self._reissue(orphans)
            return
        self.loop.unwatch(fd)
        self._died(w)

    def _died(self, w: WorkerHandle) -> None:
        was_ready = w.ready
        code = self._reap_process(w)
        self.workers[w.index] = None
        self._candidates = None
        if self._sync_worker is w:
            self._sync_worker = None
        self.batches.pop(w.index, None)
        if self.stopping:
            return
        self.stats.worker_restarted()
        redo = []
        for slot in sorted(w.outstanding):
            state, _, _ = self.slots.result(slot)
            if state == SlotState.DONE:   # DONE but not reported: report it ourselves
                os.write(self.complete_w, ipc.pack_slots([slot]))
            else:
                self.slots.set_state(slot, SlotState.PENDING)
                redo.append(slot)
        if redo:
            self._reissue(redo)
        if not was_ready and code != -signal.SIGKILL:
            self.failures[w.index] += 1
            if self.failures[w.index] >= START_ATTEMPTS:
                log.error("event=worker_failing worker=%d failures=%d", w.index,
                          self.failures[w.index])
        self.loop.call_later(self._backoff(w.index), lambda i=w.index: self._respawn(i))

    def _respawn(self, index: int) -> None:
        if self.stopping or self.workers[index] is not None:
            return
        new = self._spawn(index)
        self.workers[index] = new
        self._candidates = None
        self._watch(new)

    def _reissue(self, slots: list[int]) -> None:
        target = self._least_busy()
        if target is None:
            self.orphans.extend(slots)
            log.warning("event=requests_waiting_for_a_worker count=%d", len(slots))
            return
        for slot in slots:
            self.owner[slot] = target.index
            target.outstanding.add(slot)
        target.submit(slots)
        log.warning("event=requests_reissued worker=%d count=%d", target.index, len(slots))

    # -- the engine --------------------------------------------------------------------------------
    def _least_busy(self) -> WorkerHandle | None:
        """The ready worker with the fewest slots (any live one while none is ready), the
        quiet worker left out while it is kept (see The quiet worker)."""
        candidates = self._candidates
        if candidates is None:
            live = [w for w in self.workers if w is not None]
            candidates = [w for w in live if w.ready] or live
            quiet = self._quiet()
            if quiet is not None and len(candidates) > 1:
                candidates = [w for w in candidates if w is not quiet]
            self._candidates = candidates
        return min(candidates, key=_load) if candidates else None

    def _quiet(self) -> WorkerHandle | None:
        """The worker kept for disks with nothing at the workers, if one is kept now."""
        if len(self.disks) < 2 or self.count < 2:
            return None
        w = self.workers[-1]
        return w if w is not None and w.ready else None

    def _for_buffered_write(self) -> WorkerHandle | None:
        """Buffered writes are copies into the page cache: more workers at work than CPUs
        only adds wake-ups. Once WRITE_SPREAD workers have requests, the least busy of them."""
        least = self._least_busy()
        if least is None or least.outstanding:
            return least
        busy = [w for w in self._candidates if w.outstanding]
        return min(busy, key=_load) if len(busy) >= WRITE_SPREAD else least

    def post(self, slot: int, op: int, flags: int, offset: int, length: int, pieces,
             generation: int, disk: int = 0) -> None:
        self.slots.post(slot, op, flags, offset, length, generation, pieces, disk)
        quiet = self._quiet() if not self.in_pool.get(disk) else None
        self.disk_of[slot] = disk
        self.in_pool[disk] = self.in_pool.get(disk, 0) + 1
        self.posted += 1
        if quiet is not None and not quiet.outstanding:
            worker = quiet
        elif op == _WRITE and flags & FLAG_SYNC:
            # Durable writes taken together go to one worker: its batch shares one fdatasync.
            if self._sync_worker is None:
                self._sync_worker = self._least_busy()
            worker = self._sync_worker
        elif op == _WRITE:
            worker = self._for_buffered_write()
        else:
            worker = self._least_busy()
        if worker is None:
            self.slots.set_state(slot, SlotState.PENDING)
            self.orphans.append(slot)
            return
        self.owner[slot] = worker.index
        worker.outstanding.add(slot)
        batch = self.batches.get(worker.index)
        if batch is None:
            self.batches[worker.index] = [slot]
        else:
            batch.append(slot)

    def flush(self) -> None:
        if self.batches:
            for index, slots in self.batches.items():
                self.workers[index].submit(slots)
            self.batches.clear()
        self._sync_worker = None

    def reap(self) -> list[tuple[int, int, int]]:
        try:
            data = os.read(self.complete_r, 4 * 4096)
        except BlockingIOError:
            return []
        out = []
        workers, result = self.workers, self.slots.result
        disk_of, in_pool = self.disk_of, self.in_pool
        for slot in ipc.unpack_slots(data):
            w = workers[self.owner[slot]]
            if w is not None:
                w.outstanding.discard(slot)
            disk = disk_of[slot]
            if disk >= 0:               # (a slot a dying worker reported twice counts once)
                in_pool[disk] -= 1
                disk_of[slot] = -1
                self.posted -= 1
            _, status, err = result(slot)
            out.append((slot, status, err))
        return out

    def awaiting(self) -> bool:
        """A few requests are at the workers (vblk.supervisor.loop, Waiting polls)."""
        return awaited(self.posted)

    def set_memory(self, memory: GuestMemory, regions: list[list[int]], fds: list[int],
                   disk: int = 0) -> None:
        """Tell every worker disk ``disk``'s new table (the fds stay owned by the caller)."""
        msg = self.memory_msgs[disk] = (ipc.memory_message(memory.generation, regions, disk),
                                        list(fds))
        for w in self.workers:
            if w is not None:
                w.send_control(*msg)

    # -- disks added and removed at run time ------------------------------------------------------
    def add_disk(self, disk: int, backing: Backing) -> None:
        """Serve disk ``disk`` too: every live worker gets its backing now (before any of its
        slots, see vblk.ipc), every worker started later gets it in its argv."""
        self.disks[disk] = backing
        self._candidates = None                 # a second disk keeps the quiet worker
        desc, fds = backing.handoff()
        msg = ipc.disk_add_message(disk, desc)
        for w in self.workers:
            if w is not None:
                w.send_control(msg, fds)

    def remove_disk(self, disk: int) -> None:
        """Stop serving disk ``disk`` (none of its slots is in flight): every worker closes
        its backing and memory table, and no worker started later hears of it."""
        self.disks.pop(disk, None)
        self._candidates = None
        self.memory_msgs.pop(disk, None)        # its fds are closed with its frontend's table
        for w in self.workers:
            if w is not None:
                w.send_control(ipc.disk_remove_message(disk))

    @property
    def alive(self) -> int:
        return sum(w is not None for w in self.workers)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        live = [w for w in self.workers if w is not None]
        for w in live:
            if self.loop is not None:
                self.loop.unwatch(w.control.fileno())
            w.send_control(ipc.STOP)
            w.close()
        for w in live:
            try:
                w.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.workers = [None] * self.count
        self._candidates = None

    def close(self) -> None:
        os.close(self.complete_r)
        os.close(self.complete_w)
        self.slots.close()
