"""Progress of long steps for the lab's commands (``vblk demo``): say what is going on and for
how long, pleasantly on a terminal and plainly in a log.

``Steps(out)``; ``with steps.step("boot", "starting QEMU") as s: ... s.note("kernel up")``;
``s.done("booted in 9.1 s")`` sets the step's last line. On a terminal the step is one line,
rewritten twice a second with the latest note and the seconds so far, and replaced by the
final line. Elsewhere (a pipe, a log file) the step's first line is printed once it has taken
a second (a step that is over sooner prints only its final line), each note as a line of its
own with the time since the step began, then the final line.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

LABEL_WIDTH = 10
TICK_S = 0.5


class Step:
    """One long step: its label, what it is doing now, and how it ended."""

    def __init__(self, steps: Steps, label: str, text: str) -> None:
        self.steps, self.label, self.text = steps, label, text
        self.t0 = time.monotonic()
        self.final: str | None = None
        self.announced = False

    def note(self, text: str) -> None:
        """What the step is doing now (thread-safe: a reader thread may call it)."""
        with self.steps.lock:
            if self.steps.live:
                self.text = text
                self.steps.draw(self)
            else:
                self.steps.announce(self)
                self.text = text
                self.steps.line("", f"{text} ({self.elapsed():.1f} s)")

    def done(self, text: str) -> None:
        """The step's last line."""
        self.final = text

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Steps:
    """Long steps written to ``out`` (a terminal gets one live line per step)."""

    def __init__(self, out: TextIO, live: bool | None = None) -> None:
        self.out = out
        self.live = out.isatty() if live is None else live
        self.lock = threading.Lock()

    def line(self, label: str, text: str) -> None:
        self.out.write(f"  {label:<{LABEL_WIDTH}} {text}\n")
        self.out.flush()

    def draw(self, step: Step) -> None:
        self.out.write(f"\r\x1b[K  {step.label:<{LABEL_WIDTH}} {step.text} "
                       f"({step.elapsed():.0f} s)")
        self.out.flush()

    def announce(self, step: Step) -> None:
        if not step.announced:
            step.announced = True
            self.line(step.label, f"{step.text} ...")

    @contextmanager
    def step(self, label: str, text: str) -> Iterator[Step]:
        step = Step(self, label, text)
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(step, stop), daemon=True)
        ticker.start()
        try:
            yield step
        finally:
            stop.set()
            ticker.join()
            with self.lock:
                if self.live:
                    self.out.write("\r\x1b[K")
                if step.final is not None:
                    self.line(label, step.final)
                self.out.flush()

    def _tick(self, step: Step, stop: threading.Event) -> None:
        if not self.live:
            if not stop.wait(1.0):
                with self.lock:
                    self.announce(step)
            return
        while not stop.wait(TICK_S):
            with self.lock:
                self.draw(step)
