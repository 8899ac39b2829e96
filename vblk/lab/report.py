"""What a person reads of a benchmark: the result and comparison tables and the progress line.

Knows only the shapes of ``Result`` and ``Comparison``; runs nothing.
"""
from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, TextIO

from vblk.lab.servers import BACKENDS
from vblk.lab.workload import Result, Workload
from vblk.units import spell_size

if TYPE_CHECKING:
    from vblk.lab.compare import Comparison


class ProgressLine:
    """A progress bar on a terminal (one line, rewritten), or a line a second elsewhere."""

    def __init__(self, stream: TextIO, label: str, workload: Workload) -> None:
        self.stream, self.label, self.w = stream, label, workload
        self.tty = stream.isatty()
        self.last = (0, 0)                  # (elapsed ns, completed) at the previous call
        self.state: tuple[int, int, int] | None = None
        self.printed_at = time.monotonic()

    def __call__(self, elapsed_ns: int, completed: int, errors: int) -> None:
        t0, c0 = self.last
        self.last = (elapsed_ns, completed)
        self.rate = (completed - c0) / ((elapsed_ns - t0) / 1e9) if elapsed_ns > t0 else 0.0
        self.state = (elapsed_ns, completed, errors)
        now = time.monotonic()
        if self.tty or now - self.printed_at >= 1.0:
            self.printed_at = now
            self._show()
            self.state = None

    def _show(self) -> None:
        elapsed_ns, completed, errors = self.last[0], self.last[1], self.state[2]
        done = (elapsed_ns / 1e9 / self.w.duration if self.w.duration
                else completed / self.w.ops)
        bar = "#" * int(min(1.0, done) * 20)
        err = f"  {errors} errors" if errors else ""
        line = (f"{self.label} [{bar:<20}] {elapsed_ns / 1e9:6.1f} s {completed:>10,} ops "
                f"{self.rate / 1e3:8.1f}k IOPS{err}")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """Clear the terminal line; elsewhere print the last state if it was not printed."""
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        elif self.state is not None:
            self._show()


def format_result(r: Result) -> str:
    w, lat = r.workload, r.lat_us
    span = (f"{w.duration:g} s" if w.duration is not None else f"{w.ops:,} ops")
    lines = [
        f"{r.backend}: {w.label}, {w.queues} queue{'s' * (w.queues > 1)}, region "
        f"{spell_size(w.offset)}+{spell_size(w.size) if w.size else 'end'}, {span}, seed {w.seed}",
        f"  ops         {r.ops:,} (reads {r.reads:,}, writes {r.writes:,}) in {r.seconds:.3f} s",
        f"  errors      {r.errors}" + ("   <-- requests failed" if r.errors else ""),
        f"  IOPS        {r.iops:,.0f}",
        f"  MB/s        {r.mb_per_s:,.1f}   (10^6 bytes)",
        f"  latency µs  p50 {lat['p50']:.1f}   p99 {lat['p99']:.1f}   p99.9 {lat['p99_9']:.1f}"
        f"   (min {lat['min']:.1f}, mean {lat['mean']:.1f}, max {lat['max']:.1f})",
        f"  client CPU  {r.client_cpu:.0f} % of one core",
    ]
    if r.server_cpu is not None:
        lines.append(f"  server CPU  {r.server_cpu:.0f} % of one core")
    source = f" ({r.limit_source})" if r.limit_source else ""
    if r.limit_iops:
        lines.append(f"  IOPS limit  {r.limit_iops:,}{source}: achieved {r.iops:,.1f} = "
                     f"{r.iops_ratio:.3f} of the limit")
    if r.limit_bps:
        lines.append(f"  bps limit   {r.limit_bps:,} bytes/s{source}: achieved "
                     f"{r.bytes / r.seconds:,.0f} = {r.bps_ratio:.3f} of the limit")
    return "\n".join(lines)


def provenance_lines(source: str | None, loadavg: list[tuple[float, float, float]]) -> list[str]:
    """The header lines saying which vblk code ran and how loaded the machine was."""
    out = []
    if source:
        out.append(f"  vblk source: {source}")
    if loadavg:
        out.append("  load average (1/5/15 min) at start " + "/".join(f"{v:.2f}" for v in loadavg[0])
                   + ", at end " + "/".join(f"{v:.2f}" for v in loadavg[-1]))
    return out


def format_comparison(c: Comparison) -> str:
    cache = "writethrough" if c.writethrough else "writeback"
    by = ", fio in the test guest" if c.load == "guest" else ""
    out = [f"vblk vs qemu-storage-daemon{by}, {cache}, medians of {c.rounds} round"
           f"{'s' * (c.rounds > 1)} (alternating)",
           f"  vblk: {shlex.join(c.commands['vblk'])}",
           f"  qsd:  {shlex.join(c.commands['qsd'])}"]
    out += [f"  {note}" for note in c.notes]
    out += provenance_lines(c.source, c.loadavg)
    out.append("")
    bw = max(9, len(f"vblk/{c.ceiling_name}"))                # the backend column
    head = (f"{'workload':<20} {'backend':<{bw}} {'IOPS':>10} {'MB/s':>9} {'p50 µs':>9} "
            f"{'p99 µs':>9} {'p99.9 µs':>9} {'errors':>6} "
            f"{'guest CPU' if c.load == 'guest' else 'client CPU':>10} {'server CPU':>10}")
    out += [head, "-" * len(head)]
    for groups, ceilings in ((c.runs, c.ceiling), (c.sweep, c.sweep_ceiling)):
        for key, by_backend in groups.items():
            label = next(iter(by_backend.values()))[0].workload.label
            med = {b: c.medians(rs) for b, rs in by_backend.items()}
            for i, b in enumerate(BACKENDS):
                m = med[b]
                out.append(f"{label if i == 0 else '':<20} {b:<{bw}} {m['iops']:>10,.0f} "
                           f"{m['mb_per_s']:>9,.1f} {m['p50_us']:>9.1f} {m['p99_us']:>9.1f} "
                           f"{m['p99_9_us']:>9.1f} {m['errors']:>6} "
                           f"{_pct(m['client_cpu_pct']):>10} {_pct(m['server_cpu_pct']):>10}")
            r = c.ratios(med["vblk"], med["qsd"])
            out.append(f"{'':<20} {'vblk/qsd':<{bw}} {_x(r['iops']):>10} {_x(r['mb_per_s']):>9} "
                       f"{_x(r['p50_us']):>9}")
            if key in ceilings:
                out += _ceiling_rows(c, c.ceiling_medians(ceilings[key], med), bw)
        if groups is c.runs and c.sweep:
            out.append(f"-- queue-depth sweep: {c.sweep_label} --")
    if c.errors:
        out.append(f"{c.errors} requests failed")
    out += c.ceiling_failures
    return "\n".join(out)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} %"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ceiling_rows(c: Comparison, m: dict, bw: int) -> list[str]:
    """The ceiling's row (IOPS, MB/s, its process's CPU) and vblk's share of it."""
    name, failed = c.ceiling_name, m["failed"]
    if m["iops"] is None:
        return [f"{'':<20} {name:<{bw}} {'failed':>10}"]
    note = f"   ({failed} of its runs failed)" if failed else ""
    vblk = m["ratio"].get("vblk")
    return [f"{'':<20} {name:<{bw}} {m['iops']:>10,.0f} {m['mb_per_s']:>9,.1f} {'-':>9} {'-':>9} "
            f"{'-':>9} {'-':>6} {_pct(m['cpu_pct']):>10} {'-':>10}{note}",
            f"{'':<20} {'vblk/' + name:<{bw}} {_x(vblk):>10} {_x(vblk):>9}"]
