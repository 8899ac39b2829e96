"""The benchmark client: load one vhost-user-blk backend with the package's own frontend.

Knows the driver side of virtio-blk as a guest drives it; knows nothing of which backend it
talks to, of servers or of reports.

Theory of operation
-------------------
The load comes from the package's own frontend -- ``GuestRam`` and ``VhostUserFrontend``
(``vblk.testing.frontend``: memfd guest RAM, QEMU 7.2's handshake) and ``SplitDriver``
(``vblk.testing.driver``: the split ring, driver side) -- driven the way a guest's
virtio-blk driver with preallocated requests drives a device:

* Every in-flight position (a *slot*) owns, for the whole run, a request header with its
  status byte, a data buffer of ``bs`` bytes and a descriptor chain (or one indirect
  descriptor and its table), all written once at setup. A request rewrites only the header's
  type and sector, resets the status byte and appends the slot's head to the avail ring;
  ``randrw`` also flips the data descriptors' WRITE flag when a slot changes direction.
  Nothing is allocated or copied per request.
* Each pass of the loop fills every free slot, publishes the new heads with one 16-bit store
  of ``avail.idx`` and at most one kick per queue, then reaps the used rings. Only when
  nothing completed does it re-arm interrupts (``used_event``, or clearing NO_INTERRUPT) and
  sleep on the call eventfds, as Linux's virtio-blk does (``--busy-poll`` spins instead).
* ``perf_counter_ns`` is read once per publish and once per reaped batch: a request's latency
  runs from just before the publish that made it visible to just after the read of
  ``used.idx`` that showed it complete. (Taken
  after the kick instead, it can miss the whole request: on two CPUs the woken backend may
  run, and complete it, before ``eventfd_write`` returns.)
* Every status byte is checked; a non-OK (or never written) status counts as an error. A used
  id that is not in flight, a silent backend (``timeout``), a closed socket or a signalled
  error eventfd ends the run with a ``BackendError``.
* Client CPU is this process's user + system time (``time.process_time_ns``, the precise
  form of ``os.times()``) over the wall time of the load: a client that is the bottleneck
  shows ~100 %. Server CPU (``--compare``) is the same for the server's process group.
"""
from __future__ import annotations

import os
import random
import select
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from vblk.lab.workload import BenchError, Result, Workload, latency_summary
from vblk.testing.driver import RingLayout, SplitDriver
from vblk.testing.frontend import (
    BackendClosed,
    BackendTimeout,
    BadReply,
    GuestRam,
    VhostUserFrontend,
    VringError,
)
from vblk.units import MiB, spell_size
from vblk.virtio.blk import OUTHDR, BlkConfig
from vblk.virtio.constants import SECTOR_SIZE, DescFlag, Feature
from vblk.virtio.ring import DESC, MAX_INDIRECT, USED_ELEM

MAX_RING = 1024                 # libvhost-user's (so qsd's) VIRTQUEUE_MAX_SIZE
MAX_RAM = 4 << 30               # guest RAM the client may map for its buffers
PAGE = 4096
HEADER_BLOCK = 64               # 16-byte header + status byte, cache-line apart
STATUS_UNSET = 0xFF

_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_T_IN, _T_OUT, _T_FLUSH = 0, 1, 4

Progress = Callable[[int, int, int], None]      # (elapsed ns, completed, errors)


class _Slot:
    """One preallocated request: its head, where its header, status byte and data live."""
    __slots__ = ("head", "hdr", "status", "data_descs", "is_read", "is_flush", "t0")

    def __init__(self, head: int, hdr: int, data_descs: list[tuple[int, int, int, int, int]],
                 is_read: bool, is_flush: bool = False) -> None:
        self.head, self.hdr, self.status = head, hdr, hdr + OUTHDR.size
        self.data_descs = data_descs     # (ram offset, addr, len, flags without WRITE, next)
        self.is_read = is_read
        self.is_flush = is_flush         # the queue's one FLUSH chain (--flush-every)
        self.t0 = -1                     # publish time; -1 when not in flight


class _Queue:
    __slots__ = ("index", "driver", "kick", "used_off", "mask", "slots", "free", "by_head",
                 "flush", "flush_free", "writes")

    def __init__(self, index: int, driver: SplitDriver, used_off: int, size: int) -> None:
        self.index, self.driver, self.kick = index, driver, -1
        self.used_off, self.mask = used_off, size - 1
        self.slots: list[_Slot] = []
        self.free: list[_Slot] = []
        self.by_head: list[_Slot | None] = [None] * size
        self.flush: _Slot | None = None        # its FLUSH chain (--flush-every)
        self.flush_free = True
        self.writes = 0                         # writes submitted since its last FLUSH


@dataclass(frozen=True, slots=True)
class _Shape:
    """How the workload's requests fit this backend: the region, the chain of one request
    and the ring, from the backend's config space and features."""
    capacity: int               # bytes of the disk
    region_size: int            # bytes the workload covers
    piece: int                  # bytes per data descriptor
    pieces: int                 # data descriptors per request
    descs: int                  # descriptors per request: header, pieces, status
    indirect: bool              # each request is one indirect descriptor
    ring_size: int


@dataclass(frozen=True, slots=True)
class _Areas:
    """Where the rings, headers, indirect tables and data buffers lie in guest RAM."""
    layouts: list[RingLayout]
    headers: int
    tables: int
    data: int
    end: int


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


class Runner:
    """One connection to a backend, set up for one workload: ``run()`` it, then ``close()``.

    The constructor does the handshake and every check that needs the backend's answers
    (queues offered, capacity, block size, read-only, segment limits); BenchError says which
    option does not fit."""

    def __init__(self, socket_path: str | os.PathLike, workload: Workload, *,
                 timeout: float = 10.0, busy_poll: bool = False) -> None:
        self.w = workload.checked()
        self.timeout_ns = int(timeout * 1e9)
        self.busy_poll = busy_poll
        self.frontend: VhostUserFrontend | None = None
        self.ram: GuestRam | None = None
        self.queues: list[_Queue] = []
        self.broken = False
        self.flushes = 0                # FLUSH requests done (--flush-every)
        try:
            self._setup(socket_path, timeout)
        except BaseException:
            self.close(graceful=False)
            raise

    # -- setup ---------------------------------------------------------------------------
    def _setup(self, path: str | os.PathLike, timeout: float) -> None:
        w = self.w
        fe = self.frontend = VhostUserFrontend(path, timeout=timeout)
        cfg = fe.handshake()
        feats = fe.negotiate()
        shape = self._shape(fe, cfg, feats)
        self.capacity, self.region_size = shape.capacity, shape.region_size
        self.nblocks = shape.region_size // w.bs
        areas = self._areas(shape)
        self.ram = GuestRam(-(-areas.end // MiB))
        fe.set_memory(self.ram)
        rng = random.Random(w.seed ^ 0x5EED)
        event_idx = bool(feats & Feature.RING_EVENT_IDX.mask)
        for qi, layout in enumerate(areas.layouts):
            q = self._build_queue(qi, layout, shape, areas, rng, event_idx)
            self.queues.append(q)
            q.kick = fe.start_queue(qi, layout).kick
            q.driver.suppress_interrupts()
        # fd -> (this runner, what the fd is): what _sleep_on waits on (and run_together
        # merges with other runners')
        self._fds: dict[int, tuple[Runner, str]] = {fe.sock.fileno(): (self, "sock")}
        for q in self.queues:
            self._fds[fe.queues[q.index].call] = (self, "call")
            self._fds[fe.queues[q.index].err] = (self, "err")
        self._poll = select.poll()
        for fd in self._fds:
            self._poll.register(fd, select.POLLIN)

    def _shape(self, fe: VhostUserFrontend, cfg: BlkConfig, feats: int) -> _Shape:
        """The backend's answers checked against the workload; BenchError if it cannot run."""
        w = self.w
        if w.queues > fe.max_queues:
            raise BenchError(f"--queues {w.queues}: the backend offers {fe.max_queues} "
                             f"queue{'s' * (fe.max_queues != 1)} (GET_QUEUE_NUM)")
        if w.writes and feats & Feature.BLK_RO.mask:
            raise BenchError(f"--pattern {w.pattern} writes, and the backend's disk is read-only")
        lbs = cfg.blk_size if feats & Feature.BLK_BLK_SIZE.mask and cfg.blk_size else SECTOR_SIZE
        capacity = cfg.capacity * SECTOR_SIZE
        size = capacity - w.offset if w.size is None else w.size
        if w.bs % lbs or w.offset % lbs or size % lbs:
            raise BenchError(f"--bs/--offset/--size must be multiples of the disk's logical "
                             f"block size, {lbs} bytes")
        if w.offset + max(size, w.bs) > capacity:
            raise BenchError(f"region {w.offset}+{size} (--offset/--size) does not fit the "
                             f"disk's {capacity} bytes")
        piece = cfg.size_max if feats & Feature.BLK_SIZE_MAX.mask and cfg.size_max else w.bs
        pieces = -(-w.bs // piece)
        if feats & Feature.BLK_SEG_MAX.mask and cfg.seg_max and pieces > cfg.seg_max:
            raise BenchError(f"--bs {spell_size(w.bs)} needs {pieces} segments of at most "
                             f"{piece} bytes; the backend takes {cfg.seg_max}")
        descs = pieces + 2
        indirect = w.qd * descs > MAX_RING
        if indirect and not feats & Feature.RING_INDIRECT_DESC.mask:
            raise BenchError(f"--qd {w.qd} needs more than {MAX_RING} descriptors and the "
                             "backend has no indirect descriptors")
        if indirect and descs > MAX_INDIRECT:
            raise BenchError(f"--bs {spell_size(w.bs)}: {descs} descriptors per request")
        flush = 2 if w.flush_every else 0     # a FLUSH chain: header, status
        return _Shape(capacity, size, piece, pieces, descs, indirect,
                      _pow2((w.qd if indirect else w.qd * descs) + flush))

    def _areas(self, shape: _Shape) -> _Areas:
        """Guest RAM: the rings, then headers, indirect tables and page-aligned data buffers."""
        w = self.w
        layouts, cursor = [], 0
        for _ in range(w.queues):
            layouts.append(RingLayout.at(cursor, shape.ring_size))
            cursor = _align(layouts[-1].end, PAGE)
        nslots = w.qd * w.queues
        flush_headers = w.queues if w.flush_every else 0
        headers, cursor = cursor, _align(cursor + HEADER_BLOCK * (nslots + flush_headers), PAGE)
        tables_bytes = 16 * shape.descs * nslots if shape.indirect else 0
        tables, cursor = cursor, _align(cursor + tables_bytes, PAGE)
        data, cursor = cursor, cursor + _align(w.bs, PAGE) * nslots
        if cursor > MAX_RAM:
            raise BenchError(f"--qd {w.qd} x --queues {w.queues} x --bs {spell_size(w.bs)} "
                             f"needs {cursor // MiB} MiB of buffers; at most {MAX_RAM // MiB}")
        return _Areas(layouts, headers, tables, data, cursor)

    def _build_queue(self, qi: int, layout: RingLayout, shape: _Shape, areas: _Areas,
                     rng: random.Random, event_idx: bool) -> _Queue:
        """Queue ``qi``'s driver and its slots, every chain written once (the data buffers
        of a writing workload filled with ``rng``'s bytes)."""
        w, view = self.w, self.ram.view
        first_read = w.pattern != "write" and w.pattern != "randwrite"
        descs, piece = shape.descs, shape.piece
        driver = SplitDriver(view, layout, base=0, event_idx=event_idx)
        q = _Queue(qi, driver, layout.used + 4, shape.ring_size)
        for k in range(w.qd):
            n = qi * w.qd + k
            hdr, buf = areas.headers + HEADER_BLOCK * n, areas.data + _align(w.bs, PAGE) * n
            if w.writes:
                view[buf:buf + w.bs] = rng.randbytes(w.bs)
            bufs = [(hdr, OUTHDR.size, 0)]
            bufs += [(buf + i * piece, min(piece, w.bs - i * piece), _WRITE * first_read)
                     for i in range(shape.pieces)]
            bufs.append((hdr + OUTHDR.size, 1, _WRITE))
            if shape.indirect:
                table = areas.tables + 16 * descs * n
                entries = [(a, ln, f | (_NEXT if i + 1 < descs else 0), i + 1 if i + 1 < descs else 0)
                           for i, (a, ln, f) in enumerate(bufs)]
                driver.write_table(table, entries)
                head = driver.alloc_descriptors(1)[0]
                driver.write_descriptor(head, table, 16 * descs, _INDIRECT)
                where = [table + 16 * i for i in range(descs)]
                nexts = [e[3] for e in entries]
            else:
                idx = driver.alloc_descriptors(descs)
                for i, (a, ln, f) in enumerate(bufs):
                    last = i + 1 == descs
                    driver.write_descriptor(idx[i], a, ln, f | (0 if last else _NEXT),
                                            0 if last else idx[i + 1])
                head = idx[0]
                where = [layout.desc + 16 * i for i in idx]
                nexts = [0 if i + 1 == descs else idx[i + 1] for i in range(descs)]
            data_descs = [(where[i], a, ln, _NEXT, nexts[i])
                          for i, (a, ln, _f) in enumerate(bufs) if 0 < i < descs - 1]
            view[hdr + OUTHDR.size] = STATUS_UNSET
            slot = _Slot(head, hdr, data_descs, first_read)
            q.slots.append(slot)
            q.by_head[head] = slot
        q.free = list(reversed(q.slots))
        if w.flush_every:
            hdr = areas.headers + HEADER_BLOCK * (w.qd * w.queues + qi)
            OUTHDR.pack_into(view, hdr, _T_FLUSH, 0, 0)
            view[hdr + OUTHDR.size] = STATUS_UNSET
            idx = driver.alloc_descriptors(2)
            driver.write_descriptor(idx[0], hdr, OUTHDR.size, _NEXT, idx[1])
            driver.write_descriptor(idx[1], hdr + OUTHDR.size, 1, _WRITE, 0)
            q.flush = _Slot(idx[0], hdr, [], False, is_flush=True)
            q.by_head[idx[0]] = q.flush
        return q

    # -- the load loop ---------------------------------------------------------------------
    def run(self, progress: Progress | None = None,
            cpu_probe: Callable[[], float] | None = None) -> Result:
        """Run the workload once; ``cpu_probe()`` (seconds of CPU) is read around the load."""
        w = self.w
        pc = time.perf_counter_ns
        lat = array("q")
        submit, reap = self._submitter(), self._reaper(lat.append)
        limit = -1 if w.ops is None else w.ops
        submitted = completed = errors = reads = inflight = 0
        server0 = cpu_probe() if cpu_probe else None
        cpu0 = time.process_time_ns()
        t_start = pc()
        end = None if w.duration is None else t_start + int(w.duration * 1e9)
        last_done = t_start
        next_tick = t_start + 250_000_000
        submitting = True
        while True:
            if submitting:
                if (end is not None and pc() >= end) or submitted == limit:
                    submitting = False
                else:
                    n = submit(limit - submitted if limit >= 0 else -1)
                    submitted += n
                    inflight += n
            if not inflight:
                if not submitting:
                    break
                continue
            done, t, failed, read = reap()
            if done:
                completed += done
                inflight -= done
                errors += failed
                reads += read
                last_done = t
            else:
                self._sleep(last_done + self.timeout_ns, inflight)
                t = pc()
            if progress is not None and t >= next_tick:
                progress(t - t_start, completed, errors)
                next_tick = t + 250_000_000
        cpu1 = time.process_time_ns()
        server1 = cpu_probe() if cpu_probe else None
        seconds = (last_done - t_start) / 1e9
        wall = (pc() - t_start) / 1e9
        client = max(0, cpu1 - cpu0) / 1e9 / wall * 100 if wall else 0.0
        server = None if server0 is None else (server1 - server0) / wall * 100
        if progress is not None:
            progress(last_done - t_start, completed, errors)
        return self._result(completed, reads, errors, seconds, lat, client, server)

    def _result(self, completed: int, reads: int, errors: int, seconds: float, lat: array,
                client: float, server: float | None = None) -> Result:
        return Result(workload=self.w, ops=completed, reads=reads,
                      writes=completed - reads - self.flushes, flushes=self.flushes,
                      errors=errors, bytes=(completed - self.flushes) * self.w.bs,
                      seconds=seconds, lat_us=latency_summary(lat), client_cpu=client,
                      server_cpu=server)

    def _submitter(self) -> Callable[[int], int]:
        """``submit(budget)``: fill the free slots of every queue (at most ``budget``
        requests; -1: no bound), stamp them and publish each queue's new heads with one store
        of ``avail.idx`` and at most one kick; returns how many requests it submitted."""
        w = self.w
        view, queues = self.ram.view, self.queues
        pack_hdr, pack_desc, pc = OUTHDR.pack_into, DESC.pack_into, time.perf_counter_ns
        rnd = random.Random(w.seed).random
        nblocks, spb, first = self.nblocks, w.bs // SECTOR_SIZE, w.offset // SECTOR_SIZE
        rand, mixed, share = w.pattern.startswith("rand"), w.pattern == "randrw", w.rwmix / 100
        fixed_read = w.pattern in ("read", "randread")
        flush_every = w.flush_every
        batch: list[_Slot] = []
        cursor = 0

        def submit(budget: int) -> int:
            nonlocal cursor
            n = 0
            for q in queues:
                free = q.free
                push = q.driver.push_head
                if not free and not (flush_every and q.flush_free and q.writes >= flush_every):
                    continue
                while free and n != budget:
                    if flush_every and q.writes >= flush_every and not q.flush_free:
                        break       # a FLUSH is due and the last is still out: wait for it
                    s = free.pop()
                    if rand:
                        block = int(rnd() * nblocks)
                    else:
                        block = cursor
                        cursor = cursor + 1 if cursor + 1 < nblocks else 0
                    if mixed:
                        is_read = rnd() < share
                        if is_read != s.is_read:
                            s.is_read = is_read
                            for off, addr, ln, flags, nxt in s.data_descs:
                                pack_desc(view, off, addr, ln,
                                          flags | _WRITE if is_read else flags, nxt)
                    else:
                        is_read = fixed_read
                    pack_hdr(view, s.hdr, _T_IN if is_read else _T_OUT, 0, first + block * spb)
                    view[s.status] = STATUS_UNSET
                    push(s.head)
                    batch.append(s)
                    n += 1
                    if flush_every and not is_read:
                        q.writes += 1
                if flush_every and q.writes >= flush_every and q.flush_free and n != budget:
                    # After the writes submitted before it (a database's fsync cadence, not a
                    # barrier: writes still in flight need not be covered); one in flight per
                    # queue. It stands for ``flush_every`` writes and the rest carry over, and
                    # while the next is due and this one is out the queue waits: so every
                    # backend gets one FLUSH per ``flush_every`` writes, however long its
                    # FLUSHes take (resetting the count instead gave a slow flusher fewer).
                    f = q.flush
                    view[f.status] = STATUS_UNSET
                    push(f.head)
                    batch.append(f)
                    q.flush_free = False
                    q.writes -= flush_every
                    n += 1
                # Stamp before publishing: the kick can let the backend run (and finish)
                # before eventfd_write returns.
                t = pc()
                for s in batch:
                    s.t0 = t
                if q.driver.publish():
                    os.eventfd_write(q.kick, 1)
                batch.clear()
            return n

        return submit

    def _reaper(self, record: Callable[[int], None]) -> Callable[[], tuple[int, int, int, int]]:
        """``reap()``: take what every used ring holds, ``record`` each request's latency;
        returns (completed, the clock after the last used.idx read, errors, reads). The clock
        is read after used.idx, so nothing reaped can have completed after it."""
        view, queues, pc = self.ram.view, self.queues, time.perf_counter_ns
        unpack_used = USED_ELEM.unpack_from
        nothing = (0, 0, 0, 0)

        def reap() -> tuple[int, int, int, int]:
            done = errors = reads = t = 0
            flushes = 0
            for q in queues:
                driver = q.driver
                n = driver.used_pending()
                if not n:
                    continue
                t = pc()
                idx, mask, base, by_head, free = (driver.last_used_idx, q.mask, q.used_off,
                                                  q.by_head, q.free)
                for _ in range(n):
                    head, _len = unpack_used(view, base + ((idx & mask) << 3))
                    idx = (idx + 1) & 0xFFFF
                    s = by_head[head] if head <= mask else None
                    if s is None or s.t0 < 0:
                        self.broken = True
                        raise BadReply(f"queue {q.index}: the backend returned id {head}, "
                                       "which is not in flight")
                    record(t - s.t0)
                    s.t0 = -1
                    if view[s.status]:
                        errors += 1
                    if s.is_read:
                        reads += 1
                    if s.is_flush:
                        flushes += 1
                        q.flush_free = True
                    else:
                        free.append(s)
                driver.last_used_idx = idx
                done += n
            self.flushes += flushes
            return (done, t, errors, reads) if done else nothing

        return reap

    def _sleep(self, deadline_ns: int, inflight: int) -> None:
        """Wait for a completion: re-arm interrupts and sleep, or spin with ``busy_poll``."""
        _sleep_on([self], self._poll, self._fds, deadline_ns, inflight, self.timeout_ns,
                  self.busy_poll)

    def _check_socket(self, inflight: int) -> None:
        try:
            data = self.frontend.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.broken = True
            raise BackendClosed(f"connection failed: {exc}") from exc
        self.broken = True
        if not data:
            raise BackendClosed(f"the backend closed the connection with {inflight} requests "
                                "in flight")
        raise BadReply("the backend sent an unsolicited message on the frontend channel")

    # -- lifetime ------------------------------------------------------------------------
    def close(self, *, graceful: bool = True) -> None:
        """Stop the queues (unless broken), unmap the rings and guest RAM, close the socket."""
        fe, self.frontend = self.frontend, None
        try:
            if fe is not None and graceful and not self.broken:
                for q in self.queues:
                    if q.index in fe.queues:
                        fe.stop_queue(q.index)
        finally:
            for q in self.queues:
                q.driver.close()
            self.queues = []
            if fe is not None:
                fe.close()
            if self.ram is not None:
                self.ram.close()
                self.ram = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(graceful=exc_type is None)


def _drain(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def run_workload(socket_path: str | os.PathLike, workload: Workload, *, timeout: float = 10.0,
                 busy_poll: bool = False, progress: Progress | None = None,
                 cpu_probe: Callable[[], float] | None = None, backend: str = "") -> Result:
    """Connect, run ``workload`` once, disconnect; the Result's ``backend`` is the label."""
    with Runner(socket_path, workload, timeout=timeout, busy_poll=busy_poll) as runner:
        result = runner.run(progress, cpu_probe)
    result.backend = backend or os.fspath(socket_path)
    return result


def run_together(runners: list[Runner], timeout: float = 10.0) -> list[Result]:
    """Run every runner's workload at once from this one loop -- many disks loaded by one
    client process, each pass filling and reaping every backend's queues, one sleep on all of
    their call eventfds -- so that the load of N disks costs the client what one disk's does
    at the same total depth, and the figure is the server's (N client processes would share
    the CPUs with it, and make it theirs). Every workload must run for a duration; a Result
    per runner, in order."""
    if any(r.w.duration is None for r in runners):
        raise BenchError("run_together runs workloads for a duration, not a number of ops")
    pc = time.perf_counter_ns
    lats = [array("q") for _ in runners]
    submits = [r._submitter() for r in runners]
    reaps = [r._reaper(lat.append) for r, lat in zip(runners, lats)]
    count = len(runners)
    completed, errors, reads, inflight = [0] * count, [0] * count, [0] * count, [0] * count
    fds: dict[int, tuple[Runner, str]] = {}
    for r in runners:
        fds.update(r._fds)
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    timeout_ns = int(timeout * 1e9)
    cpu0 = time.process_time_ns()
    t_start = pc()
    ends = [t_start + int(r.w.duration * 1e9) for r in runners]
    last_done = [t_start] * count
    while True:
        now = pc()
        busy = moved = False
        for i in range(count):
            if now < ends[i]:
                inflight[i] += submits[i](-1)
            if not inflight[i]:
                continue
            done, t, failed, read = reaps[i]()
            if done:
                completed[i] += done
                inflight[i] -= done
                errors[i] += failed
                reads[i] += read
                last_done[i] = t
                moved = True
            busy = busy or inflight[i] > 0 or now < ends[i]
        if not busy:
            break
        if not moved:
            _sleep_on(runners, poller, fds, min(last_done) + timeout_ns, sum(inflight),
                      timeout_ns)
    wall = (pc() - t_start) / 1e9
    client = max(0, time.process_time_ns() - cpu0) / 1e9 / wall * 100 if wall else 0.0
    return [r._result(completed[i], reads[i], errors[i], (last_done[i] - t_start) / 1e9,
                      lats[i], client) for i, r in enumerate(runners)]


def _sleep_on(runners: list[Runner], poller: select.poll, fds: dict[int, tuple[Runner, str]],
              deadline_ns: int, inflight: int, timeout_ns: int, busy_poll: bool = False) -> None:
    """Wait for a completion of any of ``runners``: re-arm every queue's interrupts and sleep
    on ``fds`` (each runner's ``_fds``, registered with ``poller``), or spin with
    ``busy_poll``; a signalled error eventfd, a closed socket or ``deadline_ns`` passed raise."""
    now = time.perf_counter_ns()
    if now >= deadline_ns:
        for r in runners:
            r.broken = True
        raise BackendTimeout(f"{inflight} requests in flight and none completed for "
                             f"{timeout_ns / 1e9:g} s")
    if busy_poll:
        events = poller.poll(0)
    else:
        if any([q.driver.arm_interrupts() for r in runners for q in r.queues]):
            events = []
        else:
            events = poller.poll(min(250, max(1, (deadline_ns - now) // 1_000_000)))
        for r in runners:
            for q in r.queues:
                q.driver.suppress_interrupts()
    for fd, _ in events:
        runner, kind = fds[fd]
        if kind == "err":
            if _drain(fd):
                runner.broken = True
                raise VringError("the backend signalled an error on a queue's error eventfd")
        elif kind == "sock":
            runner._check_socket(inflight)
        else:
            _drain(fd)


def backend_limits(socket_path: str | os.PathLike, timeout: float = 2.0) -> tuple[int, int] | None:
    """(IOPS, bytes/s) limits of the vblk serving ``socket_path``, asked of its control socket
    (``socket_path`` + ``.ctl``); None if there is none or it does not say (qsd, an old vblk)."""
    from vblk.control import ControlError, default_control_path, fetch_stats
    path = default_control_path(os.fspath(socket_path))
    if not os.path.exists(path):
        return None
    try:
        limits = fetch_stats(path, timeout=timeout).get("limits")
    except ControlError:
        return None
    if not isinstance(limits, dict):
        return None
    return int(limits.get("iops") or 0), int(limits.get("bps") or 0)
