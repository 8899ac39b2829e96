"""The data path: from a kick to the used ring.

Theory of operation
-------------------
A kick drains its ring (``drain``): while a slot is free and a head is available, the chain
is taken. The common read or write (header, data, status; see vblk.virtio.fastpath) is
recognised in one pass; any other chain goes the general way (vblk.admission: walk, parse,
plan) and the device decides. Requests that need no I/O (GET_ID, errors) complete at once,
and so do reads the backing's cache holds (``Backing.read_cached``: preadv with RWF_NOWAIT
straight into guest memory for a file), each published as soon as it is copied so that the
driver can reap it and queue the next while the loop copies the rest. The rest go into a
slot number and goes to the I/O engine (the worker pool, through the shared-memory slots of
vblk.ipc, or the in-process engine of a backing whose I/O completes on an eventfd); the engine
sends each drain's requests out in one go (``flush``).

Completions: when the engine's completion fd is readable, ``on_completions`` reaps the
finished requests, writes each status byte and used element, publishes used.idx once per ring
per batch and signals the guest once per ring per batch. Only this module writes the used
ring.

Budgets (multiqueue): while another ring waits, no ring holds more than an equal share of
the slots (``slot_budget``), and the ring drained first after completions rotates, so a
queue that floods the device cannot starve the others. Turns (see DRAIN_QUANTUM): a drain
serving reads from the page cache peeks at the loop between reads and ends its turn when
anything else waits, so no ring -- of this disk or another disk of the same supervisor --
holds the loop while the others wait, and one that nobody waits for is never held back.

Rate limits (``--iops-limit``/``--bps-limit``, ``vblk limit``): before a chain is popped the
drain asks the ``Limiter`` whether it may admit one more; once parsed, a request that does
I/O (read, write, flush; cache hits too) is charged one request and its data bytes. A request
may overdraw the buckets (see vblk.ratelimit), so nothing is ever popped and then held: when
the limiter says no, the rest stays in the avail ring, the ring is remembered as throttled,
and the loop's timeout (``timeout``/``tick``) drains it again when tokens are due. Every stop
path is therefore the unlimited one: the avail index never passed a request not admitted.

Requests left behind: a ring's stop waits for its requests in flight, but not forever
(vblk.supervisor.queues, STOP_TIMEOUT: a hung device). Those still out then are *orphaned*:
each keeps its slot until it finishes, and then nothing more is done -- no status byte, no
used element -- as a ring started again on that queue is another driver's, over what may be
another memory table. A table replaced while requests are in flight (``swap_memory``) stays
mapped until the last of them has finished: the kernel's io-wq or librbd may still copy into
it, and a mapping placed at the same address meanwhile would take those bytes.

``drain`` is the one long function here (~70 lines): it is the per-request hot path, and the
locals it binds once per drain (memory, geometry, limiter) are what make it fast.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vblk.admission import admit_chain
from vblk.backing import Backing
from vblk.device import BlkDevice, Completion
from vblk.dirtylog import DirtyLog
from vblk.errors import GuestError, RingBroken
from vblk.ipc import FLAG_SYNC, FLAG_UNMAP, Op, Pieces
from vblk.logs import RateLimitedLog, quote
from vblk.memory import GuestMemory
from vblk.ratelimit import Limiter
from vblk.stats import Stats
from vblk.virtio.constants import BlkStatus, BlkType
from vblk.virtio.fastpath import simple_rw
from vblk.virtio.ring import SplitRing

log = logging.getLogger("vblk.supervisor")

_READ = int(Op.READ)               # plain ints for the hot path (an enum member costs a lookup)
_WRITE = int(Op.WRITE)
_IN = int(BlkType.IN)
_OUT = int(BlkType.OUT)


class Engine(Protocol):
    """Where the requests' I/O runs: vblk.supervisor.pool (worker processes, through the
    shared-memory slots of vblk.ipc) or vblk.supervisor.inprocess (a backing's submitted
    operations). A request is known by its slot number from posting to reaping."""
    completion_fd: int

    def post(self, slot: int, op: int, flags: int, offset: int, length: int, pieces: Pieces,
             generation: int) -> None:
        """Take one request; it goes out at the next ``flush``."""

    def flush(self) -> None:
        """Send every request posted since the last flush."""

    def reap(self) -> list[tuple[int, int, int]]:
        """(slot, status, errno) of the requests finished since the last call."""

    def set_memory(self, memory: GuestMemory, regions: list[list[int]], fds: list[int]) -> None:
        """A new memory table (the fds stay the caller's)."""


@dataclass(slots=True)
class InFlight:
    queue: int
    head: int
    status_addr: int
    used_len: int
    rtype: int = 0
    t0: int = 0                  # time.monotonic_ns() at admission
    pieces: Pieces | None = None     # a read's buffers (for the dirty log)
    # the status byte in the memory table of ``generation``: (region, offset in its mapping)
    status_region: int = -1
    status_off: int = 0
    generation: int = -1


# Turns. Reads the page cache holds complete inside the drain and free no slot, so without a
# bound a driver that refills as fast as the loop copies keeps one drain going for as long as
# it likes, and every other ring and disk of the supervisor waits (seen: a QD1 disk beside a
# flooding one fell from 28.8k to 45 IOPS, p99 581 ms). So every ``every`` reads served from
# the cache the drain peeks at the loop's ready fds (``peek()``: epoll, level-triggered,
# nothing consumed, at most one event asked for: with 20 disks' kicks ready a full answer
# cost 3.1 µs a peek, one 0.6 µs): if anything waits -- another ring's kick, completions, a frontend
# message -- its turn is over: the ring is in ``backlog``, the loop does not sleep, serves
# what is ready, and drains it again (``tick``). ``every`` is 1 while the supervisor runs
# another ring (a neighbour's request waits behind at most one read: 0.3 µs a peek), and
# DRAIN_QUANTUM while this ring is the only one (its frontend's messages and the control
# socket are all that can wait). A turn lasts at least ``least`` seconds (TURN_MIN while
# another ring runs) before the first peek: ending a turn costs the drain's set-up and the
# loop's dispatch again, and with many rings a turn of one read each spent more on that
# than on the reads (20 disks at QD32 from one client, 6 alternated rounds: 103.8k ->
# 121.2k IOPS, 9.8 -> 8.4 µs of server CPU a request; at QD2 within the noise); a
# neighbour's request waits behind at most ~8 µs of reads more (B's QD1 p50 beside A's
# flood 1.55x -> 1.65x its p50 alone; 25 µs made it 2.14x). Requests for the workers need
# no turns: free slots bound them.
DRAIN_QUANTUM = 32
TURN_MIN = 8e-6


def _always() -> bool:
    """The peek of a DataPath without a loop: something always waits."""
    return True


def slot_budget(free: int, total: int, held: int, rings: int, others_waiting: bool) -> int:
    """How many more slots one ring may take now (multiqueue fairness, work-conserving).

    A ring alone, or one whose siblings have nothing waiting, may take every free slot. While
    another ring waits, no ring grows past an equal share of all slots (at least one), so a
    queue that floods the device cannot starve the others: the slots its completions free go
    to the waiting rings first."""
    if rings <= 1 or not others_waiting:
        return free
    share = max(1, total // rings)
    return max(0, min(free, share - held))


class DataPath:
    def __init__(self, device: BlkDevice, backing: Backing, slots: int, stats: Stats,
                 limiter: Limiter, inline_reads: bool) -> None:
        self.device = device
        self.backing = backing
        self.slots = slots                       # requests in flight at most
        self.live = stats
        self.limiter = limiter
        self.inline_reads = inline_reads       # try Backing.read_cached before a worker
        self.engine: Engine | None = None      # set by the composition root
        self.memory = GuestMemory.empty()
        self.rings: dict[int, SplitRing] = {}
        self.calls: dict[int, int | None] = {}   # queue -> call fd (owned by the session)
        self.broken: set[int] = set()            # rings stopped because the guest broke them
        self.stopping: set[int] = set()          # rings told to stop: taken no more from
        self.free: deque[int] = deque(range(slots))
        self.held = [0] * device.num_queues      # slots each queue's requests hold
        self.inflight: dict[int, InFlight] = {}
        self.orphans: dict[int, InFlight] = {}   # see Requests left behind
        self.retired: list[GuestMemory] = []     # tables requests in flight may still use
        self.throttled: set[int] = set()         # rings with requests left waiting for tokens
        self.backlog: set[int] = set()           # rings whose turn ended with requests left
        # turns() -> (peek, every, least): see Turns. The composition root's peeks at the
        # loop (vblk.supervisor.disks); this one, for a DataPath without a loop, ends a drain
        # after DRAIN_QUANTUM reads served from the cache.
        self.turns: Callable[[], tuple[Callable[[], object], int, float]] = \
            lambda: (_always, DRAIN_QUANTUM, 0.0)
        self.wake_at = 0.0                       # monotonic time tokens are due for them
        # Polling (vblk.supervisor.loop): ``hot`` is set by the first drain since the loop
        # last slept, which calls ``on_hot`` -- the loop polls only the rings of hot disks,
        # and clears the flag when its polling ends.
        self.hot = False
        self.on_hot: Callable[[], None] = lambda: None
        self._drain_from = 0                     # rotates which ring is drained first
        self.guest_log = RateLimitedLog(logger=log)
        self.on_broken: Callable[[int], None] = lambda q: None   # the queue lifecycle's
        # Migration (vblk.dirtylog): the log QEMU mapped, whether logging is on, and the one
        # the data path marks (both), or None.
        self.log_map: DirtyLog | None = None
        self.logging = False
        self.dirty: DirtyLog | None = None

    def set_dirty_log(self, log_map: DirtyLog | None, logging: bool) -> None:
        self.log_map, self.logging = log_map, logging
        self.dirty = log_map if logging else None

    # -- the loop's timer --------------------------------------------------------------------
    def timeout(self) -> float:
        """How long the loop may sleep: not at all while a ring has a backlog, until tokens
        are due for a throttled ring, else -1."""
        if self.backlog:
            return 0.0
        return max(0.0, self.wake_at - time.monotonic()) if self.throttled else -1

    def tick(self) -> None:
        if self.throttled and time.monotonic() >= self.wake_at:
            self._unthrottle()
        if self.backlog:
            for q in sorted(self.backlog):
                self.drain(q)               # stays in the backlog if its turn ends again

    def poll(self) -> bool:
        """One look at every running ring (adaptive polling); True if it found requests."""
        found = False
        for q, ring in list(self.rings.items()):
            if q in self.broken or q in self.throttled or q in self.stopping:
                continue
            try:
                pending = ring.pending()
            except RingBroken:
                pending = 1                   # drain reports and stops it
            if pending and self.free:
                self.drain(q)
                found = True
        return found

    # -- taking requests -----------------------------------------------------------------------
    def on_kick(self, q: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self.drain(q)

    def drain(self, q: int) -> None:
        """Take what the ring offers while slots are free, within this ring's fair share of
        them (multiqueue) and within the rate limit; what is left stays in the avail ring.
        A ring the limit stopped is remembered, and the loop comes back when tokens are due."""
        ring = self.rings.get(q)
        if ring is None or q in self.broken or q in self.stopping:
            self.backlog.discard(q)
            return
        published = False
        limiter = None if self.limiter.unlimited else self.limiter
        stalled = False
        memory, geometry, inline = self.memory, self.device.geometry, self.inline_reads
        regions = memory.regions
        read_cached = self.backing.read_cached
        dirty = self.dirty
        served = served_bytes = 0           # reads served from the cache in this drain
        peek, every, least = self.turns()     # see Turns
        countdown, yielded = every, False
        due = time.monotonic() + least if least else 0.0     # the turn's first peek
        if not self.hot:
            self.hot = True
            self.on_hot()
        try:
            while self.free:
                budget = self._slot_budget(q) if len(self.rings) > 1 else len(self.free)
                if budget <= 0:
                    break           # other rings wait: this one goes on as its slots return
                ring.set_kicks_wanted(False)
                for _ in range(min(ring.pending(), budget)):
                    if limiter is not None and not limiter.ready(time.monotonic()):
                        stalled = True
                        break
                    head = ring.pop()
                    simple = simple_rw(ring, memory, geometry, head)
                    if simple is None:          # anything unusual: the general path decides
                        published |= self._admit(q, ring, head)
                        continue
                    op, offset, length, pieces, status_addr, status_region, status_off = simple
                    if limiter is not None:
                        limiter.charge(time.monotonic(), 1, length)
                    if op == _READ and inline and _read_cached(memory, read_cached, offset, pieces):
                        regions[status_region].view[status_off] = 0
                        if dirty is not None:
                            dirty.mark_pieces(memory, pieces)
                            dirty.mark(status_addr, 1)
                        ring.put_used(head, length + 1)
                        served += 1
                        served_bytes += length
                        # Published at once: the driver can take it (and queue the next
                        # request) while this loop copies the rest of the batch.
                        self.publish(q, ring)
                        countdown -= 1
                        if not countdown:
                            if (not due or time.monotonic() >= due) and peek():
                                yielded = True      # its turn is over (``backlog``)
                                break
                            countdown = every
                    else:
                        rtype = _IN if op == _READ else _OUT
                        self.live.started(q, rtype, length)
                        self._post(q, head, op, 0, offset, length, pieces, status_addr, rtype,
                                   status_region, status_off)
                ring.set_kicks_wanted(True)
                if dirty is not None:           # avail_event lives in the used ring
                    dirty.mark(ring.used_gpa, ring.used_bytes)
                if stalled or yielded or ring.pending() == 0:
                    break
            if yielded and self.free and ring.pending():
                self.backlog.add(q)
            else:
                self.backlog.discard(q)
        except RingBroken as exc:
            self.guest_log.warning("ring", "event=ring_broken queue=%d reason=%s", q, quote(exc))
            self.broken.add(q)
            self.backlog.discard(q)
            self.on_broken(q)
            stalled = False
        self.engine.flush()
        if served:
            self.live.served(q, served, served_bytes)
        if published:
            self.publish(q, ring)
        if stalled:
            now = time.monotonic()
            self.throttled.add(q)
            limiter.throttled(now)
            self.wake_at = now + limiter.delay(now)
        elif self.throttled:
            self.not_throttled(q)

    def resubmit(self, q: int, ring: SplitRing, heads: list[int],
                 wait_for_slot: Callable[[], None]) -> None:
        """Run again what a previous backend process had taken but not completed (the
        inflight region's heads); ``wait_for_slot`` serves completions until one is free."""
        published = False
        for head in heads:
            while not self.free:        # more in flight than slots: let some finish first
                self.engine.flush()
                wait_for_slot()
            ring.inflight.begin(head)
            published |= self._admit(q, ring, head)
        self.engine.flush()
        if published:
            self.publish(q, ring)

    def _admit(self, q: int, ring: SplitRing, head: int) -> bool:
        """Take one chain the general way; True if it completed at once (used ring written)."""
        try:
            req, plan, pieces = admit_chain(ring, self.memory, self.device, head)
        except GuestError as exc:
            self.guest_log.warning("chain", "event=chain_refused queue=%d head=%d reason=%s",
                                   q, head, quote(exc))
            self.live.refused(q)
            ring.put_used(head, 0)
            return True
        if isinstance(plan, Completion):
            self._complete_now(q, ring, head, req, plan)
            return True
        self.live.started(q, req.type, plan.length)
        if not self.limiter.unlimited:
            self.limiter.charge(time.monotonic(), 1, plan.length)
        if plan.op == Op.READ and self.inline_reads and \
                _read_cached(self.memory, self.backing.read_cached, plan.offset, pieces):
            self.memory.write(req.status_addr, b"\x00")
            if self.dirty is not None:
                self.dirty.mark_pieces(self.memory, pieces)
                self.dirty.mark(req.status_addr, 1)
            ring.put_used(head, plan.length + 1)
            self.live.finished(q, req.type, BlkStatus.OK, 0)
            return True
        flags = FLAG_UNMAP if plan.unmap else 0
        where = self.memory.locate(req.status_addr, 1) or (-1, 0)
        self._post(q, head, plan.op, flags, plan.offset, plan.length, pieces, req.status_addr,
                   req.type, *where)
        return False

    def _complete_now(self, q: int, ring: SplitRing, head: int, req, plan: Completion) -> None:
        """A request that ends without I/O: its data (GET_ID), its status, its used element."""
        if plan.reason:
            self.guest_log.warning("request", "event=request_refused queue=%d head=%d status=%s "
                                   "reason=%s", q, head, BlkStatus(plan.status).name, quote(plan.reason))
        used = 1
        try:
            if plan.fill:
                _fill(self.memory, req.data_in, plan.fill)
                used += len(plan.fill)
            self.memory.write(req.status_addr, bytes((plan.status,)))
            if self.dirty is not None:
                for addr, n in req.data_in:
                    self.dirty.mark(addr, n)
                self.dirty.mark(req.status_addr, 1)
        except GuestError as exc:
            self.guest_log.warning("chain", "event=status_unwritable queue=%d head=%d reason=%s",
                                   q, head, quote(exc))
            used = 0
        ring.put_used(head, used)
        self.live.started(q, req.type, len(plan.fill))
        self.live.finished(q, req.type, plan.status, 0)

    def _post(self, q: int, head: int, op: int, flags: int, offset: int, length: int,
              pieces: Pieces, status_addr: int, rtype: int, status_region: int,
              status_off: int) -> None:
        """Hand a request to the engine under a free slot number (its status byte at
        ``status_region``/``status_off`` of the current memory table, region -1: unknown)."""
        slot = self.free.popleft()
        self.held[q] += 1
        if not self.device.writeback:
            flags |= FLAG_SYNC
        used = length + 1 if op == _READ else 1
        generation = self.memory.generation
        self.inflight[slot] = InFlight(q, head, status_addr, used, rtype, time.monotonic_ns(),
                                       pieces if op == _READ else None, status_region,
                                       status_off, generation)
        self.engine.post(slot, op, flags, offset, length, pieces, generation)

    # -- completions -----------------------------------------------------------------------------
    def on_completions(self) -> None:
        """The engine finished some slots: complete them, then give the freed slots out."""
        self.collect()
        self.refill()

    def refill(self) -> None:
        """Give free slots to the rings, taking turns at who goes first."""
        order = list(self.rings)
        if len(order) > 1:          # the ring drained first gets the freed slots: take turns
            k = self._drain_from % len(order)
            self._drain_from += 1
            order = order[k:] + order[:k]
        for q in order:
            self.drain(q)

    def collect(self) -> None:
        """Complete (and publish) what the engine finished, taking no new requests."""
        touched = set()
        for slot, status, err in self.engine.reap():
            q = self._complete(slot, status, err)
            if q is not None:
                touched.add(q)
        for q in touched:
            self.publish(q, self.rings[q])
        if self.retired and not self.inflight:
            self._forget_retired()

    def _complete(self, slot: int, status: int, err: int) -> int | None:
        info = self.inflight.pop(slot, None)
        if info is None:
            orphan = self.orphans.pop(slot, None)
            if orphan is not None:      # its ring is gone: only the slot is given back
                self.free.append(slot)
                self.live.finished(orphan.queue, orphan.rtype, status, 0)
                log.warning("event=orphan_finished queue=%d head=%d", orphan.queue, orphan.head)
                self._forget_retired()
            return None                 # (else a re-issued slot finished twice: already done)
        if status != BlkStatus.OK:
            log.warning("event=io_failed queue=%d head=%d errno=%s", info.queue, info.head,
                        errno.errorcode.get(err, err))
        self.free.append(slot)
        self.held[info.queue] -= 1
        self.live.finished(info.queue, info.rtype, status, time.monotonic_ns() - info.t0)
        ring = self.rings.get(info.queue)
        if ring is None:
            return None
        try:
            memory = self.memory
            if info.generation == memory.generation and info.status_region >= 0:
                memory.regions[info.status_region].view[info.status_off] = status
            else:                           # the table changed (a stop that timed out)
                memory.write(info.status_addr, bytes((status,)))
            used = info.used_len if status == BlkStatus.OK else 1
            dirty = self.dirty
            if dirty is not None:           # what the worker read in, and the status
                if info.pieces:
                    dirty.mark_pieces(self.memory, info.pieces)
                dirty.mark(info.status_addr, 1)
        except GuestError:
            used = 0
        ring.put_used(info.head, used)
        return info.queue

    # -- requests left behind (see the module doc) ----------------------------------------------
    def orphan(self, q: int) -> int:
        """Queue ``q``'s requests in flight are no longer its ring's; how many there were."""
        left = [slot for slot, info in self.inflight.items() if info.queue == q]
        for slot in left:
            self.orphans[slot] = self.inflight.pop(slot)
            self.held[q] -= 1
        return len(left)

    def swap_memory(self, new: GuestMemory) -> None:
        """Serve from table ``new``; the old one is unmapped once no request is in flight."""
        old, self.memory = self.memory, new
        self.retired.append(old)
        if self.inflight or self.orphans:
            log.warning("event=memory_table_kept requests=%d reason=requests_in_flight",
                        len(self.inflight) + len(self.orphans))
        self._forget_retired()

    def _forget_retired(self) -> None:
        if self.retired and not self.inflight and not self.orphans:
            for memory in self.retired:
                memory.close()
            self.retired = []

    def publish(self, q: int, ring: SplitRing) -> None:
        ring.publish_used()
        if self.dirty is not None:          # used elements and used.idx, before the notify
            self.dirty.mark(ring.used_gpa, ring.used_bytes)
        fd = self.calls.get(q)
        if fd is not None and ring.needs_notify():
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.warning("event=call_failed queue=%d error=%s", q, quote(repr(exc)))

    def busy(self, q: int | None = None) -> bool:
        """Requests in flight (of queue ``q``, or of any)."""
        if q is None:
            return bool(self.inflight)
        return self.held[q] > 0

    # -- budgets and throttling ------------------------------------------------------------------
    def _slot_budget(self, q: int) -> int:
        others_waiting = False
        for other, ring in self.rings.items():
            if other != q and other not in self.broken:
                try:
                    if ring.pending():
                        others_waiting = True
                        break
                except RingBroken:
                    pass            # found broken when that ring is drained
        return slot_budget(len(self.free), self.slots, self.held[q], len(self.rings),
                           others_waiting)

    def not_throttled(self, q: int) -> None:
        if q in self.throttled:
            self.throttled.discard(q)
            if not self.throttled:
                self.limiter.flowing(time.monotonic())

    def _unthrottle(self) -> None:
        """Tokens are due: drain the rings that were left waiting (they may stall again)."""
        waiting = sorted(self.throttled)
        self.throttled.clear()
        for q in waiting:
            self.drain(q)                # adds q back if it stalls again
        if not self.throttled:
            self.limiter.flowing(time.monotonic())


def _read_cached(memory: GuestMemory, read_cached, offset: int, pieces: Pieces) -> bool:
    """``Backing.read_cached`` into the request's buffers."""
    bufs = memory.iovecs(pieces)
    try:
        return read_cached(offset, bufs)
    finally:
        for b in bufs:
            b.release()


def _fill(memory: GuestMemory, data_in: list[tuple[int, int]], data: bytes) -> None:
    """Copy ``data`` into the guest's buffers ``data_in`` (as much as they hold)."""
    pos = 0
    for addr, n in data_in:
        if pos >= len(data):
            break
        chunk = data[pos:pos + n]
        memory.write(addr, chunk)
        pos += len(chunk)
