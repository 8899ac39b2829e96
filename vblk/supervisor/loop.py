"""The supervisor's one event loop: epoll, signals, adaptive polling.

Theory of operation
-------------------
Every fd the supervisor waits on is watched here with a handler and a group: ``"frontend"``
(the listening socket, the frontend's socket, the control socket), ``"rings"`` (kick
eventfds) and ``"engine"`` (the completion fd of the I/O engine and, with worker processes,
each worker's control socket, whose EOF means the worker died). ``run`` sleeps in epoll and
calls the handler of each fd that is ready; a handler that raises costs the frontend its
connection (``on_error``), never the process.

``serve_until(done, "engine", owner)`` is the one nested loop: it runs until ``done()`` or a
timeout. The queue lifecycle uses it to wait for requests in flight while it is itself inside
a frontend message's handler (GET_VRING_BASE, a new memory table). It runs the engine's
handlers (completions, worker deaths) and every fd of the *other* disks (each fd is watched
with its owner, a disk's DiskLoop; see vblk.supervisor.disks), but none of the waiting disk's:
its frontend's socket is not read again until that message is answered, its kicks wait, and
its control socket waits (a resize would re-enter the session). A disk whose own message
nests a second wait inside the first joins ``waiting``: no waiting disk's fds are served
until its wait is over, so no handler is ever re-entered. Shared fds that are no disk's (the
signal pipe, the host-wide control socket, timers) wait too. So a disk whose image stalls
holds up its own frontend only; before, one disk's stop could freeze every disk of the
supervisor for as long as its I/O took (up to the stop's 60 s timeout).

Adaptive polling (QEMU's rule, ``adapt_poll_window``): after activity, ``poll`` -- the data
path's look at every ring -- runs in a loop, with epoll asked without sleeping, for up to the
polling window, so a request the guest adds meanwhile costs no wake-up; the window grows
while the sleeps it replaces are short and closes when they are long (a slow TCG guest).

Polling looks only at hot disks: ``hot`` lists the (disk loop, data path) of each disk that
drained since the loop last slept (the data path appends itself on its first drain, see
DataPath.hot); when a polling run ends, the loop is about to sleep and the list is cleared. A
ring that needs looking at after a sleep sends a kick, so nothing is missed, and a disk whose
driver is idle costs the polling nothing (before, each look went over every ring of every
connected disk: a QD1 disk beside 50 idle connected ones went from 19 to 51 µs p50).

Kicks while polling: for a polling run the hot disks' rings hold their kicks (Queues.hold_kicks,
vblk.virtio.ring): the driver need not signal a request the loop will find by looking, and
the loop need not read the kick it would have sent (at QD1, one eventfd write for the
driver and an epoll event, an eventfd read and an empty drain for the loop, per request).
When the run ends, or a handler inside it starts a nested wait (``serve_until``, which does not
poll), kicks are wanted again and a ring the driver added to in between is kicked by the loop
itself (Queues.release_kicks), so nothing waits for a kick that was never sent.

Waiting polls: while a few requests are at the workers or an in-process engine (RBD's) and
nothing else is running (``awaiting()``, the composition root's: at most half the CPUs'
worth, vblk.supervisor.pool.AWAIT_AT_MOST), the loop would sleep
through the device's time and pay a wake-up when the completion comes -- in a VM with idle
CPUs, 70 µs of a 4k O_DIRECT read's 250 (measured: server-side p50 192 -> 121 µs when the
loop polls through it). So a second window, ``wait_window``, adapted by the same rule from
the sleeps taken while awaiting, up to WAIT_POLL_US, covers that wait: a device that answers
within it costs no wake-up; a slow one (a disk at milliseconds) closes it. With more requests
at the workers the short window holds: completions come often, and the workers need the CPU
the polling would take (A/B with 4 requests: a write-back flood lost 8 %). And a waiting poll
that finds the CPU wanted -- it ran over PREEMPTED_AFTER and got less than half that wall
time on the CPU, so something else was made to wait, such as a TCG guest's vCPU threads --
closes the window: it opens again from the start only through short sleeps.

Polling gives way to the kernel's threads: while ``crowded()`` (the composition root's: more
than AWAIT_AT_MOST writes are on the io_uring rings of buffered disks, see
vblk.supervisor.ringio) the loop does not poll after activity but sleeps until an fd is
ready. Those writes are copies the kernel's io-wq threads make on the same CPUs, and a
polling loop takes one of them (reads, and an O_DIRECT disk's ring, need no thread and are
not counted):
A/B, 5 alternated rounds, write-back, 4k randwrite QD32 50.0k -> 62.0k IOPS, 128k write QD8
20.9k -> 24.2k.

Signals: SIGTERM and SIGINT only set ``stopping`` (through a wake-up pipe); the loop ends and
its owner shuts down in order.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager

from vblk.logs import quote

log = logging.getLogger("vblk.supervisor")

POLL_US = 50                   # the longest adaptive polling window (--poll-us; 0: off)
POLL_MIN = 4e-6                # a window that shrinks below this closes
WAIT_POLL_US = 400             # the longest waiting poll (VBLK_WAIT_POLL_US; 0: off)
PREEMPTED_AFTER = 100e-6       # a shorter poll is not judged: a wake-up's preemption is noise

Handler = Callable[[], None]


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


def run_guarded(handler: Callable[[], object], on_error: Callable[[], None]) -> object:
    """``handler()``'s answer; if it raises (a bug in vblk), log it and call ``on_error`` (drop
    the frontend), and answer None: the process carries on."""
    try:
        return handler()
    except Exception:
        log.exception("event=internal_error action=drop_frontend")
        try:
            on_error()
        except Exception:
            log.exception("event=internal_error action=disconnect")
        return None


class EventLoop:
    def __init__(self, on_error: Callable[[], None], poll_us: int | None = None) -> None:
        """``poll_us``: the longest polling window (``--poll-us``); None: VBLK_POLL_US from
        the environment, else POLL_US."""
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.groups: dict[int, str] = {}
        self.owners: dict[int, object] = {}      # fd -> the disk it is of (see serve_until)
        self.waiting: list[object] = []          # disks inside a nested wait, outermost first
        self.tick: Handler = lambda: None        # run's, also run by nested waits
        self.kicks = 0                           # kick fds watched: rings running, all disks
        self.on_error = on_error                 # after a handler raised: drop the frontend
        self.stopping = False
        if poll_us is None:
            poll_us = float(os.environ.get("VBLK_POLL_US", POLL_US))
        self.poll_max = poll_us / 1e6
        self.poll_window = 0.0
        self.wait_max = float(os.environ.get("VBLK_WAIT_POLL_US", WAIT_POLL_US)) / 1e6
        self.wait_window = 0.0
        self.awaiting: Callable[[], bool] = lambda: False    # see Waiting polls
        self.crowded: Callable[[], bool] = lambda: False     # see Polling gives way
        self.hot: list[tuple[object, object]] = []           # see Polling
        self.timers: list[tuple[float, int, Handler]] = []
        self._seq = itertools.count()

    def watch(self, fd: int, handler: Handler, group: str, owner: object = None) -> None:
        """Call ``handler`` when ``fd`` is readable; ``owner``: the disk it is of, if any."""
        self.epoll.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler
        self.groups[fd] = group
        if group == "rings":
            self.kicks += 1
        if owner is not None:
            self.owners[fd] = owner

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            if self.groups.pop(fd) == "rings":
                self.kicks -= 1
            self.owners.pop(fd, None)
            if not self.epoll.closed:
                self.epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self.handlers

    def call_later(self, delay: float, handler: Handler) -> None:
        """Run ``handler`` from the loop once ``delay`` seconds have passed."""
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), handler))

    def _sleep_for(self, timeout: float) -> float:
        if not self.timers:
            return timeout
        due = max(0.0, self.timers[0][0] - time.monotonic())
        return due if timeout < 0 else min(timeout, due)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            self.call(heapq.heappop(self.timers)[2])

    def close(self) -> None:
        self.epoll.close()

    # -- running -----------------------------------------------------------------------------
    def run(self, *, timeout: Callable[[], float], tick: Handler,
            poll: Callable[[], bool] | None) -> None:
        """Serve events until ``stopping``. ``timeout()``: how long epoll may sleep (-1: until
        an event); ``tick``: after every wake-up (the data path's timer); ``poll``: one look at the rings,
        True if it found work (the adaptive polling body; None: no polling)."""
        self.tick = tick
        while not self.stopping:
            awaiting = self.awaiting() and self.wait_max
            slept = time.monotonic()
            events = self.epoll.poll(self._sleep_for(timeout()))
            slept = time.monotonic() - slept
            self.dispatch(events)
            self.call(tick)
            if self.timers:
                self._run_timers()
            if poll is None:
                continue
            if awaiting:
                self.wait_window = adapt_poll_window(self.wait_window, slept, self.wait_max)
            elif self.poll_max:
                self.poll_window = adapt_poll_window(self.poll_window, slept, self.poll_max)
            if events and (self.poll_window or self.wait_window) and not self.crowded():
                self.call(lambda: self._poll(poll))

    def dispatch(self, events: list[tuple[int, int]]) -> None:
        """Run the handler of each fd epoll reported (an fd unwatched meanwhile is skipped)."""
        for fd, _ in events:
            handler = self.handlers.get(fd)
            if handler is not None:
                self.call(handler)

    def call(self, handler: Handler) -> None:
        """Run one handler; a bug in vblk costs the frontend its connection, not the process
        (the next frontend is served)."""
        run_guarded(handler, self.on_error)

    def _window(self) -> float:
        return self.wait_window if self.wait_window > self.poll_window and self.awaiting() \
            else self.poll_window

    def _poll(self, poll: Callable[[], bool]) -> None:
        """Look at the rings (and, without sleeping, at every fd) until nothing turned up for
        the window's seconds (``wait_window`` while awaiting, else ``poll_window``)."""
        start = time.monotonic()
        waiting = self.wait_window > self.poll_window and self.awaiting()
        cpu = time.thread_time() if waiting else 0.0
        deadline = start + (self.wait_window if waiting else self.poll_window)
        for dloop, _, queues in self.hot:
            dloop.call(queues.hold_kicks)
        try:
            while time.monotonic() < deadline and not self.stopping:
                found = poll()
                events = self.epoll.poll(0)
                if events:
                    self.dispatch(events)
                    found = True
                if found:
                    deadline = time.monotonic() + self._window()
        finally:
            self._release_kicks()
        for _, data, _ in self.hot:
            data.hot = False
        self.hot.clear()
        if waiting:
            ran = time.monotonic() - start
            if ran > PREEMPTED_AFTER and time.thread_time() - cpu < ran / 2:
                self.wait_window = 0.0      # the CPU was wanted: see Waiting polls

    def _release_kicks(self) -> None:
        """Polling ends: every hot disk's rings want kicks again (see Kicks while polling)."""
        for dloop, _, queues in self.hot:
            dloop.call(queues.release_kicks)

    def serve_until(self, done: Callable[[], bool], group: str, timeout: float,
                    owner: object = None) -> bool:
        """Run ``group``'s handlers, and those of every disk but ``owner`` and the disks
        already waiting, until ``done()`` (True) or ``timeout`` seconds pass (False). See the
        module doc for what waits."""
        deadline = time.monotonic() + timeout
        self._release_kicks()       # no polling in here: the rings must kick again
        if owner is not None:
            self.waiting.append(owner)
        try:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                waiting, owners = self.waiting, self.owners
                fds = [fd for fd, g in self.groups.items()
                       if g == group or (fd in owners and owners[fd] not in waiting)]
                poller = select.poll()        # select() cannot take fds past 1023
                for fd in fds:
                    poller.register(fd, select.POLLIN)
                ready = poller.poll(1000 * min(left, 0.01 if owner is not None else 1.0))
                for fd, _ in ready:
                    handler = self.handlers.get(fd)
                    if handler is not None:
                        self.call(handler)
                if owner is not None:
                    self.call(self.tick)     # the other disks' rate limits and backlogs
            return True
        finally:
            if owner is not None:
                self.waiting.remove(owner)

    # -- signals -----------------------------------------------------------------------------
    @contextmanager
    def signals(self):
        """SIGTERM and SIGINT set ``stopping`` while inside (previous handlers restored)."""
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        self.watch(wake_r, lambda: self._on_signal(wake_r), "frontend")
        try:
            yield
        finally:
            self.unwatch(wake_r)
            signal.set_wakeup_fd(old_wakeup)
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, wake_r: int) -> None:
        try:
            sigs = os.read(wake_r, 64)
        except BlockingIOError:
            return
        log.info("event=shutdown signals=%s", quote(list(sigs)))
        self.stopping = True
