"""Queue lifecycle: what the vhost-user session asks of the device (vblk's ``QueueHost``).

Theory of operation
-------------------
The session (vblk.vhost_user.session) decides *when* -- a memory table arrived, a ring has
everything it needs, the frontend said stop -- and calls this host to do it: map the new
table, start a ring (resolving its addresses, re-running what the inflight region says was
taken but not finished), stop a ring, remember a call fd, create or map the inflight region.

Stopping a ring (SET_VRING_ENABLE 0, GET_VRING_BASE, a disconnect) and changing the memory
table first wait for the requests in flight -- of that ring, or of all rings for a new table
-- so GET_VRING_BASE answers the true next avail index and no worker ever writes into memory
that is about to go. That wait (``_wait_idle``) happens *inside* the frontend message's
handler: the session is in the middle of ``handle`` and the frontend's socket must not be
read again until its answer is sent. So it runs the event loop's nested ``serve_until``:
the I/O engine's fds (completions and worker deaths) and the other disks' fds are served
(see vblk.supervisor.loop); this disk's frontend socket, kicks and control socket wait
until the message is answered.

The wait gives up after STOP_TIMEOUT (an image that stalls: a hung device or NFS server).
The ring's requests still in flight are then orphaned (``DataPath.orphan``): when they
finish, their slots are freed and nothing else is done, since a ring started again on that
queue is another driver's. A table replaced meanwhile stays mapped until they have finished
(``DataPath.swap_memory``): the kernel or librbd may still copy into it.

Migration (docs/interop/vhost-user.rst; vblk.dirtylog): SET_LOG_BASE maps the dirty log and
VHOST_F_LOG_ALL switches logging on and off (``set_log``, ``set_logging``); the data path marks
every page it writes. The image's write lock moves with the guest: when the last ring stops
while logging is on (QEMU's switch-over: GET_VRING_BASE), everything taken is finished and
logged, and the source releases the lock before it answers; a vblk started for the incoming
side (``vblk serve --incoming``) opened the image without the lock and takes it when its first
ring starts, which QEMU does only after the source's answer. A cancelled migration restarts
the source's rings, which take the lock back. At no moment do two running devices hold it.
"""
from __future__ import annotations

import logging
import mmap
import os

from vblk.dirtylog import DirtyLog
from vblk.errors import FrontendProtocolError, GuestError, RingBroken, VblkError
from vblk.logs import quote
from vblk.memory import GuestMemory
from vblk.stats import Stats
from vblk.supervisor.datapath import DataPath
from vblk.supervisor.loop import EventLoop
from vblk.vhost_user.session import MemSlot, Vring
from vblk.virtio.constants import Feature
from vblk.virtio.inflight import InflightQueue, queue_region_size
from vblk.virtio.ring import SplitRing

log = logging.getLogger("vblk.supervisor")

STOP_TIMEOUT = float(os.environ.get("VBLK_STOP_TIMEOUT", "60"))   # a ring stop's wait for I/O


class Queues:
    def __init__(self, loop: EventLoop, data: DataPath, stats: Stats, *,
                 holds_lock: bool = True) -> None:
        self.loop = loop
        self.data = data
        self.live = stats
        # The image's write lock (vblk.backing): held from the open, except by a vblk started
        # for an incoming migration, which takes it when its first ring starts; a migration's
        # source gives it up when its last ring stops (see the module doc).
        self.holds_lock = holds_lock
        self.kicks: dict[int, int] = {}          # queue -> kick fd (owned by the session)
        self.session = None                      # the frontend's Session while connected
        self.ring_addrs: dict[int, object] = {}
        self.inflight_map: mmap.mmap | None = None
        self.inflight_queues: dict[int, InflightQueue] = {}
        data.on_broken = self._ring_broken

    def _wait_idle(self, busy) -> bool:
        """Serve completions, worker deaths and the other disks until ``busy()`` is false;
        False if STOP_TIMEOUT passed first."""
        if not self.loop.serve_until(lambda: not busy(), "engine", STOP_TIMEOUT):
            log.error("event=stop_timeout inflight=%d", len(self.data.inflight))
            return False
        return True

    # -- QueueHost ------------------------------------------------------------------------------
    def set_memory(self, slots: list[MemSlot]) -> None:
        """Switch to a new memory table once nothing is in flight; running rings are
        re-resolved in it (memory hot-plug), and a table that no longer holds one of them is
        refused with everything left as it was."""
        data = self.data
        self._wait_idle(data.busy)
        new = GuestMemory.from_fds([s.region for s in slots], [s.fd for s in slots],
                                   data.memory.generation + 1)
        rebuilt: dict[int, SplitRing] = {}
        try:
            for q, old_ring in data.rings.items():
                addr = self.ring_addrs[q]
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
        for ring in data.rings.values():
            ring.detach()
        data.rings = rebuilt
        data.swap_memory(new)
        regions = [[s.region.guest_phys_addr, s.region.memory_size, s.region.userspace_addr,
                    s.region.mmap_offset] for s in slots]
        data.engine.set_memory(new, regions, [s.fd for s in slots])
        log.info("event=memory_table regions=%d generation=%d", len(slots), new.generation)

    def start_queue(self, vring: Vring, features: int) -> None:
        data = self.data
        q = vring.index
        if not self.holds_lock:
            try:
                data.backing.take_window()
            except VblkError as exc:
                log.error("event=lock_not_taken queue=%d reason=%s", q, quote(exc))
                raise FrontendProtocolError(f"queue {q} cannot start: {exc}") from exc
            self.holds_lock = True
            log.info("event=lock_taken reason=rings_start")
        ring = SplitRing(data.memory, vring.num, vring.addr.desc, vring.addr.avail,
                         vring.addr.used, last_avail_idx=vring.base,
                         indirect=bool(features & Feature.RING_INDIRECT_DESC.mask),
                         event_idx=bool(features & Feature.RING_EVENT_IDX.mask))
        resubmit = []
        tracker = self.inflight_queues.get(q)
        if tracker is not None and tracker.size == vring.num:
            resubmit = ring.attach_inflight(tracker)
        elif tracker is not None:
            log.warning("event=inflight_ignored queue=%d reason=queue_size inflight=%d ring=%d",
                        q, tracker.size, vring.num)
        self.ring_addrs[q] = vring.addr
        data.rings[q] = ring
        self.kicks[q] = vring.kick_fd
        self.loop.watch(vring.kick_fd, lambda q=q, fd=vring.kick_fd: data.on_kick(q, fd), "rings")
        log.info("event=queue_started queue=%d size=%d base=%d used=%d resubmitted=%d", q,
                 vring.num, vring.base, ring.used_idx, len(resubmit))
        if resubmit:
            data.resubmit(q, ring, resubmit, lambda: self._wait_idle(lambda: not data.free))
        data.drain(q)

    # -- kicks while the loop polls (vblk.virtio.ring, hold_kicks) --------------------------------
    def hold_kicks(self) -> None:
        """The loop polls these rings now: their driver need not kick."""
        data = self.data
        for q, ring in data.rings.items():
            if q not in data.broken:
                ring.hold_kicks()
                _mark_used(data, ring)

    def release_kicks(self) -> None:
        """The loop stops polling (it is about to sleep, or to wait on a nested loop): kicks
        are wanted again, and a ring the driver added to meanwhile -- after the loop's last
        look, with no kick -- is kicked here, so that the loop's kick handler drains it (a
        ring in ``backlog`` or ``throttled`` is the loop's tick's already). Every ring, not
        only those marked held: a new memory table rebuilds the ring objects, not the guest's
        view of them."""
        data = self.data
        owed = data.backlog | data.throttled | data.broken
        for q, ring in data.rings.items():
            ring.release_kicks()
            _mark_used(data, ring)
            kick = self.kicks.get(q)
            if kick is not None and q not in owed and _offers(ring):
                os.eventfd_write(kick, 1)

    def stop_queue(self, index: int) -> int:
        data = self.data
        kick = self.kicks.pop(index, None)
        if kick is not None:
            self.loop.unwatch(kick)
        data.not_throttled(index)
        ring = data.rings.get(index)
        if ring is None:
            return 0
        waited = data.held[index]               # taken and not finished: waited for here
        # A stopped ring is not processed any more (vhost-user: from GET_VRING_BASE on): the
        # wait only finishes what was taken; what the driver offered stays for the next owner.
        data.stopping.add(index)
        try:
            if not self._wait_idle(lambda: data.busy(index)):
                log.error("event=requests_orphaned queue=%d count=%d", index, data.orphan(index))
        finally:
            data.stopping.discard(index)
        del data.rings[index]
        data.broken.discard(index)
        last = ring.last_avail_idx
        left = (ring.avail_idx() - last) & 0xFFFF   # offered, never taken: the next owner's
        ring.detach()
        log.info("event=queue_stopped queue=%d last_avail=%d used=%d waited=%d left=%d", index,
                 last, ring.used_idx, waited, left)
        if data.logging and not data.rings and self.holds_lock:
            # A migration's switch-over: everything taken is done and logged; the destination
            # takes the image once its rings start, which is after this answer.
            data.backing.release_window()
            self.holds_lock = False
            log.info("event=lock_released reason=migration_switchover")
        return last

    # -- migration ------------------------------------------------------------------------------
    def set_log(self, fd: int | None, size: int, offset: int) -> None:
        """SET_LOG_BASE: map the new log (None: unmap); the old one goes."""
        data = self.data
        new = DirtyLog(fd, size, offset) if fd is not None else None
        old = data.log_map
        data.set_dirty_log(new, data.logging)
        if old is not None:
            if old.missed:
                log.warning("event=dirty_log_too_small writes=%d", old.missed)
            old.close()
        if new is not None:
            log.info("event=dirty_log bytes=%d pages=%d", size, new.pages)

    def set_logging(self, on: bool) -> None:
        """VHOST_F_LOG_ALL set or cleared: a migration starts, or ends, or is cancelled."""
        data = self.data
        if on != data.logging:
            data.set_dirty_log(data.log_map, on)
            log.info("event=logging %s", "on" if on else "off")

    def set_call(self, index: int, fd: int | None) -> None:
        self.data.calls[index] = fd

    def _ring_broken(self, q: int) -> None:
        """The guest broke ring ``q``: stop watching its kicks; tell the frontend if it
        listens (its err eventfd)."""
        kick = self.kicks.pop(q, None)
        if kick is not None:
            self.loop.unwatch(kick)
        vring = self.session.vrings[q] if self.session is not None else None
        err_fd = vring.err_fd if vring is not None else None
        if err_fd is not None:
            try:
                os.eventfd_write(err_fd, 1)
            except OSError:
                pass

    # -- the inflight region -----------------------------------------------------------------
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


def _mark_used(data: DataPath, ring: SplitRing) -> None:
    """A migration's dirty log learns of a write to the used ring (flags, avail_event)."""
    if data.dirty is not None:
        data.dirty.mark(ring.used_gpa, ring.used_bytes)


def _offers(ring: SplitRing) -> bool:
    """The ring has requests to take (a broken one is left to its next drain)."""
    try:
        return ring.pending() > 0
    except RingBroken:
        return True
