"""The supervisor: the one event loop that owns the socket, the memory map and the rings.

Theory of operation
-------------------
One epoll loop watches: the listening socket (only while no frontend is connected), the
frontend's socket, each running ring's kick eventfd, the completion pipe from the workers,
each worker's control socket (EOF = the worker died) and a signal wake-up pipe.

A kick drains the ring: while a slot is free and a head is available, the chain is taken.
The common read or write (header, data, status; see vblk.virtio.fastpath) is recognised in
one pass; any other chain is walked and parsed and the device decides. Requests that need no
I/O (GET_ID, errors) complete at once, and so do reads the page cache holds (preadv with
RWF_NOWAIT straight into guest memory), each published as soon as it is copied so that the
driver can reap it and queue the next while the loop copies the rest. The rest go into a
slot, and the slot numbers go to the least busy workers, one pipe write per worker per drain.
Workers return finished slot numbers through one pipe; the supervisor writes each status byte
and used element, publishes used.idx once per batch and signals the guest once per ring per
batch. Only the supervisor writes the used ring.

A resize (the control socket's "resize" op) is checked against what the image holds now,
swaps the device's Geometry and sends CONFIG_CHANGE_MSG on the backend channel without
waiting for anything: QEMU answers it with GET_CONFIG on the main socket, which this loop
serves as soon as the control request returns, so nothing can deadlock.

Stopping a ring (SET_VRING_ENABLE 0, GET_VRING_BASE, a new memory table, a disconnect) first
waits for that ring's requests in flight, so GET_VRING_BASE answers the true next avail index
and no worker ever writes into memory that is about to go.

Rate limits (``--iops-limit``/``--bps-limit``, ``vblk limit``): before a chain is popped the
drain asks the device's ``Limiter`` whether it may admit one more; once the chain is parsed,
a request that does I/O (read, write, flush; page-cache hits too) is charged one request and
its data bytes. A request may overdraw the buckets (see vblk.ratelimit), so nothing is ever
popped and then held: when the limiter says no, the rest simply stays in the avail ring, the
ring is remembered as throttled, and the event loop's poll timeout wakes the drain when tokens
are due. Every stop path is therefore the unlimited one: the avail index was never advanced
past a request that was not admitted.
"""
from __future__ import annotations

import array
import errno
import fcntl
import grp
import mmap
import logging
import os
import select
import signal
import socket
import stat
import time
from collections import deque
from dataclasses import dataclass

from vblk.admission import admit_chain
from vblk.backing import BackingInfo, relock_window, resize_limit
from vblk.device import OP_READ, OP_WRITE, U32_MAX, BlkDevice, Completion, DiscardLimits, Geometry
from vblk.errors import ConfigError, FrontendProtocolError, GuestError, RingBroken
from vblk.resize import check_new_size, parse_new_size
from vblk.control import listener_path
from vblk.logs import RateLimitedLog
from vblk.memory import GuestMemory
from vblk.ratelimit import Limiter, Limits
from vblk import sdnotify
from vblk.slots import FLAG_SYNC, FLAG_UNMAP, SlotArea, SlotState, slot_budget
from vblk.stats import Stats
from vblk.vhost_user import transport
from vblk.vhost_user.session import DropConnection, MemSlot, Session, Vring
from vblk.virtio.constants import BlkStatus, BlkType, Feature
from vblk.virtio.fastpath import simple_rw
from vblk.virtio.inflight import InflightQueue, queue_region_size
from vblk.virtio.ring import SplitRing
from vblk.workerpool import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

STOP_TIMEOUT = 60.0            # how long a ring stop waits for I/O in flight
MESSAGE_TIMEOUT = 10.0         # a frontend must send a whole message within this
POLL_US = 50                   # the longest adaptive polling window (VBLK_POLL_US; 0: off)
POLL_MIN = 4e-6                # a window that shrinks below this closes
NOTIFY_TIMEOUT = 0.25          # the longest a resize waits for room on the backend channel


@dataclass(slots=True)
class InFlight:
    queue: int
    head: int
    status_addr: int
    used_len: int
    worker: int
    rtype: int = 0
    t0: int = 0                  # time.monotonic_ns() at admission


class Supervisor:
    def __init__(self, device: BlkDevice, backing_fd: int, *, workers: int = 8,
                 slots: int = 64, log_level: str = "WARNING", stats: Stats | None = None,
                 control=None, backing: BackingInfo | None = None,
                 limits: Limits = Limits()) -> None:
        self.device = device
        self.backing_fd = backing_fd
        self.backing = backing                   # the window's description (for resizes)
        # Page-cache hits are served inline; with O_DIRECT there is no page cache to hit.
        self.inline_reads = (hasattr(os, "RWF_NOWAIT") and os.environ.get("VBLK_INLINE_READS", "1") != "0"
                             and not fcntl.fcntl(backing_fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.live = stats if stats is not None else Stats(device.num_queues, workers=workers)
        # How long the loop keeps looking for new requests after activity before it sleeps:
        # adapted between 0 and poll_max (see adapt_poll_window).
        self.poll_max = float(os.environ.get("VBLK_POLL_US", POLL_US)) / 1e6
        self.poll_window = 0.0
        self.control = control                   # a vblk.control.ControlServer, or None
        self.live.capacity_bytes = device.geometry.size_bytes
        if control is not None and backing is not None:
            control.register("resize", self.resize)
        self.slots = SlotArea.create(slots)
        self.free: deque[int] = deque(range(slots))
        self.held = [0] * device.num_queues      # slots each queue's requests hold
        self._drain_from = 0                     # rotates which ring is drained first
        self._sync_worker: WorkerHandle | None = None   # takes this drain's durable writes
        self.inflight: dict[int, InFlight] = {}
        g = device.geometry
        # The workers' own check on discard/write-zeroes ranges: the range window when there
        # is one (a resize never goes past it), else everything after its start (the image
        # may grow and be resized into).
        ranged = backing is None or backing.ranged
        end = g.file_offset + g.size_bytes if ranged else (1 << 63) - 1
        self.pool = WorkerPool(workers, backing_fd, self.slots.fd, slots, log_level,
                               window=(g.file_offset, end))
        self.memory = GuestMemory.empty()
        self.rings: dict[int, SplitRing] = {}
        self.kicks: dict[int, int] = {}          # queue -> kick fd (owned by the session)
        self.calls: dict[int, int | None] = {}   # queue -> call fd (owned by the session)
        self.session: Session | None = None
        self.conn: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self.guest_log = RateLimitedLog(logger=log)
        self.stopping = False
        self._ring_addrs: dict[int, object] = {}
        self.broken: set[int] = set()            # rings stopped because the guest broke them
        self.inflight_map: mmap.mmap | None = None
        self.inflight_queues: dict[int, InflightQueue] = {}
        self.limiter = Limiter(limits, now=time.monotonic())
        self.throttled: set[int] = set()         # rings with requests left waiting for tokens
        self.wake_at = 0.0                       # monotonic time tokens are due for them
        self.live.limiter = self.limiter
        if control is not None:
            control.register("limit", self._on_limit_request)

    # -- epoll bookkeeping ---------------------------------------------------------------
    def _watch(self, fd: int, handler) -> None:
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.epoll.unregister(fd)

    # -- lifecycle -----------------------------------------------------------------------
    def run(self, listener: socket.socket) -> int:
        self.listener = listener
        listener.setblocking(False)
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        self.pool.start()
        try:
            self._watch(self.pool.complete_r, self._on_completions)
            for w in self.pool.workers:
                self._watch_worker(w)
            self._watch(wake_r, lambda: self._on_signal(wake_r))
            self._watch(listener.fileno(), self._on_accept)
            if self.control is not None:
                self._watch(self.control.fileno(), self.control.on_readable)
            log.info("event=listening workers=%d slots=%d", self.pool.count, self.slots.count)
            sdnotify.ready("waiting for a frontend")
            while not self.stopping:
                timeout = max(0.0, self.wake_at - time.monotonic()) if self.throttled else -1
                slept = time.monotonic()
                events = self.epoll.poll(timeout)
                slept = time.monotonic() - slept
                self._dispatch(events)
                if self.throttled and time.monotonic() >= self.wake_at:
                    self._call(self._unthrottle)
                if self.poll_max:
                    self.poll_window = adapt_poll_window(self.poll_window, slept, self.poll_max)
                    if events and self.poll_window and self.rings:
                        self._call(self._poll_rings)
            return 0
        finally:
            self._disconnect()
            self.pool.stop()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)
            self.memory.close()
            self.slots.close()
            self.epoll.close()
            log.info("event=stopped")

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        """Run the handler of each fd epoll reported (an fd unwatched meanwhile is skipped)."""
        for fd, _ in events:
            handler = self.handlers.get(fd)
            if handler is not None:
                self._call(handler)

    def _call(self, handler) -> None:
        """Run one event handler; a bug in vblk costs the frontend its connection, not the
        process (the next frontend is served)."""
        try:
            handler()
        except Exception:
            log.exception("event=internal_error action=drop_frontend")
            try:
                self._disconnect()
            except Exception:
                log.exception("event=internal_error action=disconnect")

    def _poll_rings(self) -> None:
        """Adaptive polling: after activity, look at the rings (and, without sleeping, at the
        other fds) for up to ``poll_window`` seconds before going back to sleep in epoll. A
        request the guest adds meanwhile is taken without the cost of waking this process
        up; the window closes at the first quiet stretch of that length."""
        deadline = time.monotonic() + self.poll_window
        while time.monotonic() < deadline and not self.stopping:
            found = False
            for q, ring in list(self.rings.items()):
                if q in self.broken or q in self.throttled:
                    continue
                try:
                    pending = ring.pending()
                except RingBroken:
                    pending = 1                   # _drain reports and stops it
                if pending and self.free:
                    self._drain(q)
                    found = True
            events = self.epoll.poll(0)
            if events:
                self._dispatch(events)
                found = True
            if found:
                deadline = time.monotonic() + self.poll_window
            if not self.rings:
                return

    def _on_signal(self, wake_r: int) -> None:
        try:
            sigs = os.read(wake_r, 64)
        except BlockingIOError:
            return
        log.info("event=shutdown signals=%s", list(sigs))
        sdnotify.stopping()
        self.stopping = True

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.settimeout(MESSAGE_TIMEOUT)
        self.conn = conn
        self.session = Session(self.device, self, num_queues=self.device.num_queues)
        self._unwatch(self.listener.fileno())
        self._watch(conn.fileno(), self._on_message)
        log.info("event=frontend_connected")
        self.live.frontend_connected()
        sdnotify.status("frontend connected")

    def _disconnect(self) -> None:
        if self.conn is None:
            return
        self._unwatch(self.conn.fileno())
        try:
            self.session.close()
        finally:
            self.conn.close()
            self.conn = None
            self.session = None
            log.info("event=frontend_disconnected")
            self.live.frontend_disconnected()
            sdnotify.status("stopping" if self.stopping else "waiting for a frontend")
            if self.listener is not None and not self.stopping:
                self._watch(self.listener.fileno(), self._on_accept)

    def _on_message(self) -> None:
        try:
            header, payload, fds = transport.recv_message(self.conn)
        except transport.PeerClosed:
            self._disconnect()
            return
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning("event=frontend_dropped reason=%r", exc)
            self._disconnect()
            return
        except Exception as exc:       # FrontendProtocolError: unreadable framing
            log.warning("event=frontend_dropped reason=%r", exc)
            self._disconnect()
            return
        log.debug("event=message request=%s size=%d fds=%d", transport.m.request_name(header.request),
                  header.size, len(fds))
        try:
            reply = self.session.handle(header, payload, fds)
            if reply is not None:
                reply_fds = self.session.take_reply_fds()
                try:
                    transport.send_message(self.conn, reply, reply_fds)
                finally:
                    for fd in reply_fds:
                        os.close(fd)
        except DropConnection as exc:
            self.guest_log.warning("frontend", "event=frontend_dropped reason=%r", str(exc))
            if exc.reply is not None:
                try:
                    self.conn.sendall(exc.reply)
                except OSError:
                    pass
            self._disconnect()
        except OSError as exc:
            log.warning("event=frontend_dropped reason=%r", exc)
            self._disconnect()

    # -- live resize ---------------------------------------------------------------------
    def resize(self, request: dict) -> dict:
        """The control op ``{"op": "resize", "size": 4096 | "64M"}``: check, apply, notify.

        Raises ResizeRefused (the control server answers it as an error) with nothing
        changed; otherwise the new size is in force, whether or not the frontend could be
        told (``notified``; ``reason`` says why not)."""
        size = parse_new_size(request.get("size"))
        g = self.device.geometry
        limit, limit_what = resize_limit(self.backing, self.backing_fd)
        check_new_size(size, g.logical_block_size, limit, limit_what)
        relock_window(self.backing, self.backing_fd, g.size_bytes, size)
        old = self.device.resize(size)
        self.live.resized(size)
        notified, reason = self._notify_config_change()
        log.info("event=resized old_bytes=%d new_bytes=%d notified=%s reason=%r",
                 old, size, notified, reason)
        return {"ok": True, "old_bytes": old, "new_bytes": size, "notified": notified,
                "reason": reason}

    def _notify_config_change(self) -> tuple[bool, str]:
        """Send CONFIG_CHANGE_MSG if the frontend gave us a backend channel; never blocks
        longer than NOTIFY_TIMEOUT and never waits for an answer (none is asked for)."""
        if self.session is None:
            return False, "no frontend is connected; it reads the new size when it connects"
        change = self.session.config_change()
        if change is None:
            return False, ("the frontend did not negotiate BACKEND_REQ; it reads the new size "
                           "at its next GET_CONFIG")
        fd, message = change
        try:
            _send_bounded(fd, message, NOTIFY_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.session.drop_backend_channel()
            log.warning("event=backend_channel_failed action=dropped reason=%r", str(exc))
            return False, f"the backend channel failed ({exc}); it is closed now"
        return True, ""

    # -- QueueHost: what the session asks of the device --------------------------------
    def set_memory(self, slots: list[MemSlot]) -> None:
        """Switch to a new memory table once nothing is in flight; running rings are
        re-resolved in it (memory hot-plug), and a table that no longer holds one of them is
        refused with everything left as it was."""
        self._wait_idle(lambda: bool(self.inflight))
        new = GuestMemory.from_fds([s.region for s in slots], [s.fd for s in slots],
                                   self.memory.generation + 1)
        rebuilt: dict[int, SplitRing] = {}
        try:
            for q, old_ring in self.rings.items():
                addr = self._ring_addrs[q]
                ring = SplitRing(new, old_ring.size, addr.desc, addr.avail, addr.used,
                                 last_avail_idx=old_ring.last_avail_idx,
                                 indirect=old_ring.indirect, event_idx=old_ring.event_idx)
                ring.inflight = old_ring.inflight
                rebuilt[q] = ring
        except GuestError as exc:
            for ring in rebuilt.values():
                ring.detach()
            new.close()
            raise FrontendProtocolError(f"the new memory table drops a running queue: {exc}") from exc
        for ring in self.rings.values():
            ring.detach()
        self.rings = rebuilt
        old, self.memory = self.memory, new
        old.close()
        self.pool.set_memory(new.generation, [[s.region.guest_phys_addr, s.region.memory_size,
                                               s.region.userspace_addr, s.region.mmap_offset]
                                              for s in slots], [s.fd for s in slots])
        log.info("event=memory_table regions=%d generation=%d", len(slots), new.generation)

    def start_queue(self, vring: Vring, features: int) -> None:
        ring = self._make_ring(vring.num, vring.addr, vring.base,
                               indirect=bool(features & Feature.RING_INDIRECT_DESC.mask),
                               event_idx=bool(features & Feature.RING_EVENT_IDX.mask))
        resubmit = []
        tracker = self.inflight_queues.get(vring.index)
        if tracker is not None and tracker.size == vring.num:
            resubmit = ring.attach_inflight(tracker)
        elif tracker is not None:
            log.warning("event=inflight_ignored queue=%d reason=queue_size inflight=%d ring=%d",
                        vring.index, tracker.size, vring.num)
        self._ring_addrs[vring.index] = vring.addr
        self.rings[vring.index] = ring
        self.kicks[vring.index] = vring.kick_fd
        self._watch(vring.kick_fd, lambda q=vring.index: self._on_kick(q))
        log.info("event=queue_started queue=%d size=%d base=%d used=%d resubmitted=%d", vring.index,
                 vring.num, vring.base, ring.used_idx, len(resubmit))
        if resubmit:
            self._resubmit(vring.index, ring, resubmit)
        self._drain(vring.index)

    def _resubmit(self, q: int, ring: SplitRing, heads: list[int]) -> None:
        """Run again what a previous backend process had taken but not completed."""
        batches: dict[int, list[int]] = {}
        published = False
        for head in heads:
            while not self.free:        # more in flight than slots: let some finish first
                self._flush_batches(batches)
                self._wait_idle(lambda: not self.free)
            ring.inflight.begin(head)
            published |= self._admit(q, ring, head, batches)
        self._flush_batches(batches)
        if published:
            self._publish(q, ring)

    def _flush_batches(self, batches: dict[int, list[int]]) -> None:
        for w, slots in batches.items():
            self.pool.workers[w].submit(slots)
        batches.clear()
        self._sync_worker = None

    # -- inflight region -------------------------------------------------------------------
    def get_inflight(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("vblk-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd, size

    def set_inflight(self, fd: int | None, size: int, offset: int, num_queues: int,
                     queue_size: int) -> None:
        self.inflight_queues.clear()
        if self.inflight_map is not None:
            try:
                self.inflight_map.close()
            except BufferError:
                log.warning("event=unmap_deferred what=inflight")
            self.inflight_map = None
        if fd is None:
            return
        per_queue = queue_region_size(queue_size)
        if size < num_queues * per_queue:
            raise FrontendProtocolError(f"inflight region of {size} bytes for {num_queues} "
                                        f"queues of {queue_size}")
        try:
            self.inflight_map = mmap.mmap(fd, offset + size, mmap.MAP_SHARED)
        except (OSError, ValueError) as exc:
            raise FrontendProtocolError(f"cannot map the inflight region: {exc}") from exc
        view = memoryview(self.inflight_map)
        for q in range(num_queues):
            start = offset + q * per_queue
            self.inflight_queues[q] = InflightQueue(view[start:start + per_queue], queue_size)
        view.release()
        log.info("event=inflight_region queues=%d queue_size=%d bytes=%d", num_queues, queue_size, size)

    def _make_ring(self, size: int, addr, last_avail: int, *, indirect: bool,
                   event_idx: bool) -> SplitRing:
        return SplitRing(self.memory, size, addr.desc, addr.avail, addr.used,
                         last_avail_idx=last_avail, indirect=indirect, event_idx=event_idx)

    def stop_queue(self, index: int) -> int:
        kick = self.kicks.pop(index, None)
        if kick is not None:
            self._unwatch(kick)
        self._not_throttled(index)
        ring = self.rings.get(index)
        if ring is None:
            return 0
        self._wait_idle(lambda: any(f.queue == index for f in self.inflight.values()))
        del self.rings[index]
        self.broken.discard(index)
        last = ring.last_avail_idx
        ring.detach()
        log.info("event=queue_stopped queue=%d last_avail=%d used=%d", index, last, ring.used_idx)
        return last

    def set_call(self, index: int, fd: int | None) -> None:
        self.calls[index] = fd

    # -- the data path -------------------------------------------------------------------
    def _on_kick(self, q: int) -> None:
        fd = self.kicks.get(q)
        if fd is None:
            return
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            pass
        self._drain(q)

    def _drain(self, q: int) -> None:
        """Take what the ring offers while slots are free, within this ring's fair share of
        them (multiqueue) and within the rate limit; what is left stays in the avail ring.
        A ring the limit stopped is remembered, and the loop comes back when tokens are due."""
        ring = self.rings.get(q)
        if ring is None or q in self.broken:
            return
        batches: dict[int, list[int]] = {}
        published = False
        limiter = None if self.limiter.unlimited else self.limiter
        stalled = False
        memory, geometry, inline = self.memory, self.device.geometry, self.inline_reads
        regions = memory.regions
        served = served_bytes = 0           # reads served from the page cache in this drain
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
                        published |= self._admit(q, ring, head, batches)
                        continue
                    op, offset, length, pieces, status_addr, status_region, status_off = simple
                    if limiter is not None:
                        limiter.charge(time.monotonic(), 1, length)
                    if op == OP_READ and inline and self._read_cached(offset, length, pieces):
                        regions[status_region].view[status_off] = 0
                        ring.put_used(head, length + 1)
                        served += 1
                        served_bytes += length
                        # Published at once: the driver can take it (and queue the next
                        # request) while this loop copies the rest of the batch.
                        self._publish(q, ring)
                    else:
                        rtype = BlkType.IN if op == OP_READ else BlkType.OUT
                        self.live.started(q, rtype, length)
                        self._post(q, head, op, 0, offset, length, pieces, status_addr, rtype,
                                   batches)
                ring.set_kicks_wanted(True)
                if stalled or ring.pending() == 0:
                    break
        except RingBroken as exc:
            self.guest_log.warning("ring", "event=ring_broken queue=%d reason=%r", q, str(exc))
            self._break_ring(q)
            stalled = False
        self._flush_batches(batches)
        if served:
            self.live.served(q, served, served_bytes)
        if published:
            self._publish(q, ring)
        if stalled:
            now = time.monotonic()
            self.throttled.add(q)
            limiter.throttled(now)
            self.wake_at = now + limiter.delay(now)
        elif self.throttled:
            self._not_throttled(q)

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
        return slot_budget(len(self.free), self.slots.count, self.held[q], len(self.rings),
                           others_waiting)

    def _not_throttled(self, q: int) -> None:
        if q in self.throttled:
            self.throttled.discard(q)
            if not self.throttled:
                self.limiter.flowing(time.monotonic())

    def _unthrottle(self) -> None:
        """Tokens are due: drain the rings that were left waiting (they may stall again)."""
        waiting = sorted(self.throttled)
        self.throttled.clear()
        for q in waiting:
            self._drain(q)                # adds q back if it stalls again
        if not self.throttled:
            self.limiter.flowing(time.monotonic())

    def _on_limit_request(self, request: dict) -> dict:
        """Control op ``limit``: ``{"op": "limit", "iops": N, "bps": N, "iops_burst": N,
        "bps_burst": N}``, every key optional (0 = unlimited; a burst left out with its rate
        given goes back to the default). Answers the limits in effect."""
        now = time.monotonic()
        keys = ("iops", "bps", "iops_burst", "bps_burst")
        if any(k in request for k in keys):
            old = self.limiter.limits()
            values = {k: getattr(old, k) for k in keys}
            for kind in ("iops", "bps"):
                if kind in request:
                    values[kind] = request[kind] or 0
                    values[f"{kind}_burst"] = None
            for k in ("iops_burst", "bps_burst"):
                if k in request:
                    values[k] = request[k] or None
            try:
                limits = Limits(**values)
            except (TypeError, ValueError) as exc:
                return {"ok": False, "error": str(exc)}
            self.limiter.set(now, limits)
            log.info("event=limits_changed iops=%d bps=%d iops_burst=%s bps_burst=%s",
                     limits.iops, limits.bps, limits.iops_burst, limits.bps_burst)
            self.wake_at = now            # let the loop look at throttled rings again
        return {"ok": True, "limits": self.limiter.snapshot(now)}

    def _admit(self, q: int, ring: SplitRing, head: int, batches: dict[int, list[int]]) -> bool:
        """Take one chain; returns True if it completed at once (used ring written)."""
        try:
            req, plan, pieces = admit_chain(ring, self.memory, self.device, head)
        except GuestError as exc:
            self.guest_log.warning("chain", "event=chain_refused queue=%d head=%d reason=%r",
                                   q, head, str(exc))
            self.live.refused(q)
            ring.put_used(head, 0)
            return True
        if isinstance(plan, Completion):
            if plan.reason:
                self.guest_log.warning("request", "event=request_refused queue=%d head=%d status=%s reason=%r",
                                       q, head, BlkStatus(plan.status).name, plan.reason)
            used = 1
            try:
                if plan.fill:
                    self._fill(req.data_in, plan.fill)
                    used += len(plan.fill)
                self.memory.write(req.status_addr, bytes((plan.status,)))
            except GuestError as exc:
                self.guest_log.warning("chain", "event=status_unwritable queue=%d head=%d reason=%r",
                                       q, head, str(exc))
                used = 0
            ring.put_used(head, used)
            self.live.started(q, req.type, len(plan.fill))
            self.live.finished(q, req.type, plan.status, 0)
            return True
        self.live.started(q, req.type, plan.length)
        if not self.limiter.unlimited:
            self.limiter.charge(time.monotonic(), 1, plan.length)
        if plan.op == OP_READ and self.inline_reads and self._read_cached(plan.offset, plan.length, pieces):
            # Served from the page cache without a trip to a worker (RWF_NOWAIT never blocks).
            self.memory.write(req.status_addr, b"\x00")
            ring.put_used(head, plan.length + 1)
            self.live.finished(q, req.type, BlkStatus.OK, 0)
            return True
        flags = FLAG_UNMAP if plan.unmap else 0
        self._post(q, head, plan.op, flags, plan.offset, plan.length, pieces, req.status_addr,
                   req.type, batches)
        return False

    def _post(self, q: int, head: int, op: int, flags: int, offset: int, length: int,
              pieces: list[tuple[int, int, int]], status_addr: int, rtype: int,
              batches: dict[int, list[int]]) -> None:
        """Hand a request to a worker through a free slot (its number goes out with the
        drain's batch for that worker)."""
        slot = self.free.popleft()
        self.held[q] += 1
        if not self.device.writeback:
            flags |= FLAG_SYNC
        if flags & FLAG_SYNC and op == OP_WRITE:
            # Durable writes taken together go to one worker: its batch shares one fdatasync.
            if self._sync_worker is None:
                self._sync_worker = self.pool.least_busy()
            worker = self._sync_worker
        else:
            worker = self.pool.least_busy()
        self.slots.post(slot, op, flags, offset, length, self.memory.generation, pieces)
        used = length + 1 if op == OP_READ else 1
        self.inflight[slot] = InFlight(q, head, status_addr, used, worker.index, rtype,
                                       time.monotonic_ns())
        worker.outstanding.add(slot)
        batches.setdefault(worker.index, []).append(slot)

    def _read_cached(self, offset: int, length: int, pieces: list[tuple[int, int, int]]) -> bool:
        """Try the whole read with RWF_NOWAIT; False (nothing promised) on any miss."""
        bufs = self.memory.iovecs(pieces)
        try:
            return os.preadv(self.backing_fd, bufs, offset, os.RWF_NOWAIT) == length
        except OSError:            # BlockingIOError: not all cached; anything else: let a worker tell
            return False
        finally:
            for b in bufs:
                b.release()

    def _fill(self, data_in: list[tuple[int, int]], data: bytes) -> None:
        pos = 0
        for addr, n in data_in:
            if pos >= len(data):
                break
            chunk = data[pos:pos + n]
            self.memory.write(addr, chunk)
            pos += len(chunk)

    def _on_completions(self) -> None:
        touched = self._collect_completions()
        for q in touched:
            self._publish(q, self.rings[q])
        order = list(self.rings)
        if len(order) > 1:          # the ring drained first gets the freed slots: take turns
            k = self._drain_from % len(order)
            self._drain_from += 1
            order = order[k:] + order[:k]
        for q in order:
            self._drain(q)

    def _collect_completions(self) -> set[int]:
        try:
            data = os.read(self.pool.complete_r, 4 * 4096)
        except BlockingIOError:
            return set()
        done = array.array("I")
        done.frombytes(data[: len(data) - len(data) % 4])
        touched = set()
        for slot in done:
            q = self._complete(slot)
            if q is not None:
                touched.add(q)
        return touched

    def _complete(self, slot: int) -> int | None:
        info = self.inflight.pop(slot, None)
        if info is None:                # a re-issued slot finished twice: already done
            return None
        _, status, err = self.slots.result(slot)
        if status != BlkStatus.OK:
            log.warning("event=io_failed queue=%d head=%d errno=%s", info.queue, info.head,
                        errno.errorcode.get(err, err))
        self.pool.workers[info.worker].outstanding.discard(slot)
        self.free.append(slot)
        self.held[info.queue] -= 1
        self.live.finished(info.queue, info.rtype, status, time.monotonic_ns() - info.t0)
        ring = self.rings.get(info.queue)
        if ring is None:
            return None
        try:
            self.memory.write(info.status_addr, bytes((status,)))
            used = info.used_len if status == BlkStatus.OK else 1
        except GuestError:
            used = 0
        ring.put_used(info.head, used)
        return info.queue

    def _publish(self, q: int, ring: SplitRing) -> None:
        ring.publish_used()
        fd = self.calls.get(q)
        if fd is not None and ring.needs_notify():
            try:
                os.eventfd_write(fd, 1)
            except OSError as exc:
                log.warning("event=call_failed queue=%d error=%r", q, exc)

    def _break_ring(self, q: int) -> None:
        """Stop taking requests from a ring the guest broke; tell the frontend if it listens."""
        self.broken.add(q)
        kick = self.kicks.pop(q, None)
        if kick is not None:
            self._unwatch(kick)
        vring = self.session.vrings[q] if self.session else None
        if vring is not None and vring.err_fd is not None:
            try:
                os.eventfd_write(vring.err_fd, 1)
            except OSError:
                pass

    def _wait_idle(self, busy, timeout: float = STOP_TIMEOUT) -> None:
        """Serve completions (and worker deaths) until ``busy()`` is false."""
        deadline = time.monotonic() + timeout
        while busy():
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("event=stop_timeout inflight=%d", len(self.inflight))
                return
            watch = [self.pool.complete_r] + [w.control.fileno() for w in self.pool.workers
                                              if w.control.fileno() in self.handlers]
            ready, _, _ = select.select(watch, [], [], min(left, 1.0))
            for fd in ready:
                if fd == self.pool.complete_r:
                    for q in self._collect_completions():
                        self._publish(q, self.rings[q])
                else:
                    handler = self.handlers.get(fd)
                    if handler is not None:
                        handler()

    # -- workers -------------------------------------------------------------------------
    def _watch_worker(self, w: WorkerHandle) -> None:
        self._watch(w.control.fileno(), lambda w=w: self._on_worker_event(w))

    def _on_worker_event(self, w: WorkerHandle) -> None:
        try:
            data = w.control.recv(1)
        except OSError:
            data = b""
        if data:
            return
        self._unwatch(w.control.fileno())
        if self.stopping and not w.outstanding:
            return              # shutting down: a worker with nothing to finish is not missed
        # Completions the dead worker already sent are taken first.
        for q in self._collect_completions():
            self._publish(q, self.rings[q])
        new = self.pool.restart(w)
        self.live.worker_restarted()
        self._watch_worker(new)
        redo = []
        for slot in sorted(new.outstanding):
            state, _, _ = self.slots.result(slot)
            if state == SlotState.DONE:   # DONE but not reported: report it ourselves
                os.write(self.pool.complete_w, array.array("I", [slot]).tobytes())
            else:
                redo.append(slot)
        for slot in redo:
            self.slots.set_state(slot, SlotState.PENDING)
        if redo:
            new.submit(redo)
            log.warning("event=requests_reissued worker=%d count=%d", new.index, len(redo))


def _send_bounded(fd: int, data: bytes, timeout: float) -> None:
    """Write all of ``data`` to the stream socket ``fd`` without blocking for more than
    ``timeout`` seconds in all; TimeoutError if the peer does not make room in time."""
    sock = socket.socket(fileno=fd)
    try:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[sock.send(view, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL):]
                continue
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                raise TimeoutError(f"no room on the backend channel within {timeout:g} s "
                                   f"({len(view)} of {len(data)} bytes unsent)")
    finally:
        sock.detach()


def adapt_poll_window(window: float, slept: float, poll_max: float) -> float:
    """The next polling window after the loop slept ``slept`` seconds in epoll (QEMU's
    adaptive polling rule). A short sleep means a longer poll would have caught the event
    without sleeping: the window doubles (from POLL_MIN) up to ``poll_max``. A long sleep
    means polling would only have burnt CPU -- which a guest under TCG needs more than vblk
    does: the window halves, and closes below POLL_MIN. A guest that answers within the
    window keeps it open; a slow one closes it after a few sleeps."""
    if slept <= poll_max:
        return min(max(window * 2, POLL_MIN), poll_max)
    window /= 2
    return window if window >= POLL_MIN else 0.0


def open_listener(socket_path: str | None, listen_fd: int | None, mode: int = 0o600,
                  group: str | None = None) -> tuple[socket.socket, str | None]:
    """The listening socket: an inherited fd, or a new one at ``socket_path`` created with
    ``mode`` (never wider, not even for a moment) and ``group``."""
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"--fd {listen_fd} is not a Unix stream socket")
        return sock, None
    try:
        st = os.lstat(socket_path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{socket_path} exists and is not a socket; refusing to replace it")
        os.unlink(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(socket_path)
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(socket_path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(socket_path, mode)
        sock.listen(1)
    except BaseException:
        sock.close()
        os.unlink(socket_path)
        raise
    return sock, socket_path


def open_control(config, listener: socket.socket, stats: Stats):
    """The control socket (``--control-socket``, default: the listening socket's path +
    ``.ctl``) and the ``--metrics-listen`` endpoint; None if there is neither."""
    from vblk.control import (SUN_PATH_MAX, ControlServer, default_control_path,
                              parse_listen_address)
    path = config.control_socket
    if path is None:
        bound = listener_path(listener)
        if bound is not None and len(os.fsencode(default_control_path(bound))) <= SUN_PATH_MAX:
            path = default_control_path(bound)
        else:
            log.info("event=no_control_socket reason=%r",
                     "the listening socket has no path" if bound is None else "path too long")
    metrics = parse_listen_address(config.metrics_listen) if config.metrics_listen else None
    if path is None and metrics is None:
        return None
    stats.info["control"] = path
    return ControlServer(stats.snapshot, path=path, metrics=metrics)


def serve(config) -> int:
    """Run vblk for one disk until SIGTERM/SIGINT. ``config`` is a vblk.options.ServeConfig."""
    from vblk.backing import open_backing

    backing = open_backing(config.disk)
    geometry = Geometry(size_bytes=backing.size, logical_block_size=backing.logical_block_size,
                        physical_block_size=backing.physical_block_size,
                        readonly=backing.readonly, serial=backing.serial, file_offset=backing.start)
    discard = None
    if config.disk.discard is not None:
        d = config.disk.discard
        # ACRN's default max_discard_sectors: the whole disk, as far as the u32 field reaches.
        max_sectors = d.max_sectors if d.max_sectors is not None else min(backing.size // 512, U32_MAX)
        discard = DiscardLimits(max_sectors, d.max_segments, d.alignment)
    device = BlkDevice(geometry, writeback=backing.writeback, num_queues=config.disk.num_queues,
                       discard=discard)
    try:
        listener, created = open_listener(config.socket_path, config.listen_fd,
                                          config.socket_mode, config.socket_group)
    except BaseException:
        backing.close()
        raise
    log.info("event=serving image=%s size=%d lbs=%d pbs=%d ro=%s cache=%s discard=%s socket=%s "
             "iops_limit=%d bps_limit=%d",
             backing.path, backing.size, backing.logical_block_size, backing.physical_block_size,
             backing.readonly, "writeback" if backing.writeback else "writethrough",
             (f"{device.discard.max_sectors}:{device.discard.max_segments}:"
              f"{device.discard.alignment}" if device.discard else "off"),
             config.socket_path or f"fd:{config.listen_fd}", config.limits.iops, config.limits.bps)
    stats = Stats(device.num_queues, workers=config.workers,
                  info={"image": backing.path, "socket": listener_path(listener)})
    try:
        control = open_control(config, listener, stats)
    except BaseException:
        listener.close()
        backing.close()
        raise
    sup = Supervisor(device, backing.fd, workers=config.workers, slots=config.queue_size,
                     log_level=config.log_level, stats=stats, control=control,
                     backing=backing, limits=config.limits)
    try:
        return sup.run(listener)
    finally:
        if control is not None:
            control.close()
        listener.close()
        if created:
            try:
                os.unlink(created)
            except FileNotFoundError:
                pass
        backing.close()
