"""Operator commands and helpers: ``vblk stats``, ``vblk resize``, ``vblk limit``,
``serve --print-capabilities``,
activation.

``vblk stats`` shows what a running vblk is doing, read from its control socket; ``vblk limit``
shows or changes its rate limits there.

The control socket is ``--control-socket PATH``, or ``--socket-path PATH`` (the vhost-user
socket) plus ``.ctl``, which is where ``vblk serve`` puts it by default. One snapshot is printed as a
table (or ``--json``); ``--watch [SECONDS]`` redraws every SECONDS (default 2) and adds
rates, until Ctrl-C. Exit status: 0, 1 if vblk cannot be reached, 2 for bad usage.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import typer

from vblk.cli.errors import fail
from vblk.cli.spellings import either, warn_old
from vblk.control import SUFFIX, ControlError, default_control_path, fetch_stats, request
from vblk.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from vblk.stats import KINDS
from vblk.units import format_size

DEFAULT_WATCH_SECONDS = 2.0

ControlSocket = typer.Option(None, "--control-socket", metavar="PATH",
                             help="The vblk's control socket.")
SocketPath = typer.Option(None, "--socket-path", metavar="PATH",
                          help="The vblk's vhost-user socket (its control socket is PATH.ctl).")
OldSocket = typer.Option(None, "--socket", hidden=True)

# vhost-user.rst "Backend program conventions", vhost-user.json VHostUserBackendCapabilities:
# vblk serve takes --blk-file PATH and --read-only, so it announces both block features.
CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}


def capabilities_first(args: list[str]) -> None:
    """--print-capabilities anywhere in ``args``: print and exit 0 before click parses the rest
    (the convention: "Other options and arguments should be ignored", unknown ones too)."""
    if "--print-capabilities" in args:
        print(json.dumps(CAPABILITIES), flush=True)
        sys.exit(EXIT_OK)


def print_capabilities(value: bool) -> None:
    """Eager callback of ``serve --print-capabilities``: print the JSON and exit 0 before any
    other option or argument is looked at."""
    if value:
        typer.echo(json.dumps(CAPABILITIES))
        raise typer.Exit(EXIT_OK)


def check_ops_flags(control_socket: Optional[str], metrics_listen: Optional[str],
                    socket_path: Optional[str] = None) -> None:
    """Refuse a bad ``--control-socket`` or ``--metrics-listen`` (ConfigError) before
    ``serve`` creates anything."""
    from vblk.control import check_control_path, parse_listen_address
    from vblk.errors import ConfigError
    if control_socket is not None:
        if not control_socket:
            raise ConfigError("--control-socket is empty")
        if socket_path is not None and os.path.abspath(control_socket) == os.path.abspath(socket_path):
            raise ConfigError("--control-socket must differ from --socket-path")
        check_control_path(control_socket)
    if metrics_listen is not None:
        parse_listen_address(metrics_listen)


def activated_socket() -> Optional[int]:
    """The listening socket systemd passed (LISTEN_FDS / LISTEN_PID), or None."""
    from vblk.errors import ConfigError
    from vblk.sdnotify import listen_fds
    fds = listen_fds()
    if len(fds) > 1:
        raise ConfigError(f"systemd passed {len(fds)} sockets (LISTEN_FDS); vblk listens on one")
    return fds[0] if fds else None


def stats(
    seconds: Optional[float] = typer.Argument(
        None, metavar="SECONDS", show_default=False,
        help=f"With --watch: seconds between refreshes (default {DEFAULT_WATCH_SECONDS:g})."),
    control_socket: Optional[str] = ControlSocket,
    socket_path: Optional[str] = SocketPath,
    old_socket: Optional[str] = OldSocket,
    watch: bool = typer.Option(False, "--watch", help="Refresh until Ctrl-C (--watch [SECONDS])."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per refresh)."),
    timeout: float = typer.Option(5.0, "--timeout", metavar="SECONDS",
                                  help="How long to wait for an answer."),
) -> None:
    """Show a running vblk's requests, bytes, latency, frontend, workers and rate limits."""
    socket_path = either("--socket-path", socket_path, "--socket", old_socket)
    _control_path(control_socket, socket_path)
    if seconds is not None and not watch:
        raise fail(f"{seconds:g} seconds means nothing without --watch", EXIT_USAGE)
    interval = DEFAULT_WATCH_SECONDS if seconds is None else seconds
    if not 0 < interval <= 3600:
        raise fail(f"--watch {seconds:g} must be more than 0 and at most 3600 seconds", EXIT_USAGE)
    if not 0 < timeout <= 600:
        raise fail(f"--timeout {timeout:g} must be more than 0 and at most 600 seconds", EXIT_USAGE)
    path = control_socket if control_socket is not None else default_control_path(socket_path)
    if not watch:
        try:
            snap = fetch_stats(path, timeout=timeout)
        except ControlError as exc:
            raise fail(str(exc), EXIT_FAILED) from None
        typer.echo(json.dumps(snap, sort_keys=True) if as_json else render(snap))
        return
    try:
        _watch(path, interval, timeout, as_json)
    except KeyboardInterrupt:
        pass


def resize(
    first: str = typer.Argument(..., metavar="SIZE", show_default=False,
                                help="The new size the guest sees: bytes or K/M/G/T (powers of "
                                     "1024), whole logical blocks, at most what the image (or "
                                     "the range) holds."),
    second: Optional[str] = typer.Argument(None, hidden=True, show_default=False),
    control_socket: Optional[str] = ControlSocket,
    socket_path: Optional[str] = SocketPath,
    timeout: float = typer.Option(5.0, "--timeout", metavar="SECONDS",
                                  help="How long to wait for an answer."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Grow or shrink the disk a running vblk serves, and tell the guest.

    Exit status: 0 resized (notified or not: the line says), 1 vblk cannot be reached,
    2 bad SIZE or refused by vblk (nothing changed)."""
    from vblk.errors import ResizeRefused
    from vblk.resize import describe, parse_new_size
    new_size = first
    if second is not None:                         # the old spelling: resize INSTANCE SIZE
        if control_socket is not None or socket_path is not None:
            raise fail("give the socket as --socket-path or --control-socket, or as the old "
                       "positional INSTANCE, not both", EXIT_USAGE)
        warn_old("vblk resize INSTANCE SIZE", "vblk resize SIZE --socket-path INSTANCE")
        path, new_size = control_path(first), second
    else:
        path = _control_path(control_socket, socket_path)
    try:
        size_bytes = parse_new_size(new_size)
    except ResizeRefused as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    answer = ask(path, {"op": "resize", "size": size_bytes}, timeout,
                 refused=lambda error: f"resize refused: {error}")
    if as_json:
        typer.echo(json.dumps({k: answer.get(k) for k in ("old_bytes", "new_bytes", "notified",
                                                           "reason")}, sort_keys=True))
        return
    typer.echo(describe(answer["old_bytes"], answer["new_bytes"], answer["notified"],
                        answer.get("reason", "")))


def ask(path: str, message: dict, timeout: float, *, refused=lambda error: error) -> dict:
    """vblk's answer to ``message`` on control socket ``path``: fails with status 1 if vblk
    cannot be reached, 2 (``refused(its error)``) if it said no, 2 for a --timeout out of
    range."""
    if not 0 < timeout <= 600:
        raise fail(f"--timeout {timeout:g} must be more than 0 and at most 600 seconds", EXIT_USAGE)
    try:
        answer = request(path, message, timeout=timeout)
    except ControlError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    if not answer.get("ok"):
        raise fail(refused(answer.get("error", "no reason given")), EXIT_USAGE)
    return answer


def control_path(instance: str) -> str:
    """The old ``resize INSTANCE``: INSTANCE.ctl when that exists (INSTANCE is the vhost-user
    socket), else INSTANCE itself (the control socket)."""
    if not instance.endswith(SUFFIX) and os.path.exists(default_control_path(instance)):
        return default_control_path(instance)
    return instance


def _watch(path: str, interval: float, timeout: float, as_json: bool) -> None:
    clear = sys.stdout.isatty() and not as_json
    previous = None
    while True:
        started = time.monotonic()
        try:
            snap = fetch_stats(path, timeout=min(timeout, max(interval, 0.5)))
        except ControlError as exc:
            text = json.dumps({"error": str(exc)}) if as_json else f"vblk: {exc} (retrying)"
            previous = None
        else:
            text = json.dumps(snap, sort_keys=True) if as_json else render(snap, previous)
            previous = snap
        if clear:
            sys.stdout.write("\033[H\033[2J")
        sys.stdout.write(text + ("\n" if as_json else "\n\n"))
        sys.stdout.flush()
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def _control_path(control_socket: Optional[str], socket_path: Optional[str]) -> str:
    if (control_socket is None) == (socket_path is None):
        raise fail("give exactly one of --control-socket and --socket-path", EXIT_USAGE)
    return control_socket if control_socket is not None else default_control_path(socket_path)


def limit(
    control_socket: Optional[str] = ControlSocket,
    socket_path: Optional[str] = SocketPath,
    old_socket: Optional[str] = OldSocket,
    iops: Optional[str] = typer.Option(None, "--iops-limit", metavar="N",
                                       help="Requests per second over all queues (k/M "
                                            "suffixes = 1000s); 0 = unlimited."),
    bps: Optional[str] = typer.Option(None, "--bps-limit", metavar="SIZE",
                                      help="Bytes per second (K/M/G suffixes = 1024s); "
                                           "0 = unlimited."),
    old_iops: Optional[str] = typer.Option(None, "--iops", hidden=True),
    old_bps: Optional[str] = typer.Option(None, "--bps", hidden=True),
    iops_burst: Optional[str] = typer.Option(None, "--iops-burst", metavar="N",
                                             help="Burst in requests (default: 0.1 s of the "
                                                  "rate)."),
    bps_burst: Optional[str] = typer.Option(None, "--bps-burst", metavar="SIZE",
                                            help="Burst in bytes (default: 0.1 s of the rate)."),
    as_json: bool = typer.Option(False, "--json", help="Print the limits in effect as JSON."),
    timeout: float = typer.Option(5.0, "--timeout", metavar="SECONDS",
                                  help="How long to wait for an answer."),
) -> None:
    """Show or change a running vblk's I/O rate limits; prints the limits in effect.

    A rate given without its burst gets the default burst (0.1 s of the rate); a burst alone
    keeps the rate. Exit status: 0, 1 if vblk cannot be reached, 2 bad usage or refused by vblk
    (nothing changed)."""
    from vblk.errors import ConfigError
    from vblk.options import parse_limits
    socket_path = either("--socket-path", socket_path, "--socket", old_socket)
    iops = either("--iops-limit", iops, "--iops", old_iops)
    bps = either("--bps-limit", bps, "--bps", old_bps)
    path = _control_path(control_socket, socket_path)
    try:
        changes = parse_limits(iops=iops, bps=bps, iops_burst=iops_burst, bps_burst=bps_burst,
                               burst_needs_rate=False)
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    answer = ask(path, {"op": "limit", **changes}, timeout,
                 refused=lambda error: f"{path}: {error}")
    limits = answer["limits"]
    typer.echo(json.dumps(limits, sort_keys=True) if as_json else render_limits(limits))


def render_host(snap: dict, previous: dict | None = None) -> str:
    """Every disk of one vblk: a line for the host, then each disk's table under its name."""
    workers = snap["workers"]
    disks = snap["disks"]
    connected = sum(1 for d in disks.values() if d["frontend"]["connected"])
    lines = [f"vblk pid {snap['pid']} | up {duration(snap['uptime_s'])} | {len(disks)} disks, "
             f"{connected} with a frontend | workers: {workers['count']} "
             f"({workers['alive']} alive)"]
    slots = snap.get("slots")
    if slots:                          # room for vblk disk add
        lines[0] += f" | slots: {slots['free']} of {slots['capacity']} free"
    before = (previous or {}).get("disks", {})
    for name, disk in disks.items():
        lines += ["", f"== disk {name} ==", render(disk, before.get(name))]
    return "\n".join(lines)


def render_limits(limits: dict | None) -> str:
    """``iops limit: 2000/s (burst 200) | bps limit: unlimited | throttled 3 times, 1.2 s``."""
    if limits is None:
        return "limits: unknown"
    iops = (f"iops limit: {limits['iops']}/s (burst {limits['iops_burst']:g})" if limits["iops"]
            else "iops limit: unlimited")
    bps = (f"bps limit: {format_size(limits['bps'])}/s "
           f"(burst {format_size(limits['bps_burst'])})"
           if limits["bps"] else "bps limit: unlimited")
    state = " (now)" if limits.get("throttled_now") else ""
    return (f"{iops} | {bps} | throttled {limits['throttle_events']} times, "
            f"{limits['throttled_s']:.3f} s{state}")


# -- the table -------------------------------------------------------------------------------

def render(snap: dict, previous: dict | None = None) -> str:
    """A snapshot as the operator reads it; with ``previous``, per-second rates too. A
    host-wide snapshot (``vblk serve --config``'s control-socket) is one table per disk."""
    if "disks" in snap:
        return render_host(snap, previous)
    info = snap.get("info", {})
    head = [f"vblk pid {snap['pid']}", f"up {duration(snap['uptime_s'])}"]
    head += [f"{k} {info[k]}" for k in ("image", "socket", "control", "metrics") if info.get(k)]
    fe = snap["frontend"]
    if fe["connected"]:
        since = max(0.0, snap["time"] - fe["since"])
        frontend = f"connected for {duration(since)}"
    else:
        frontend = "not connected"
    workers = snap["workers"]
    lines = [" | ".join(head),
             f"frontend: {frontend}, {fe['connections']} connections since start | "
             f"workers: {workers['count']}, {workers['restarts']} restarts"]
    disk = snap.get("disk") or {}
    if disk.get("capacity_bytes") is not None:
        n = disk["capacity_bytes"]
        lines.append(f"disk: {n} bytes ({format_size(n)}, {n // 512} sectors), "
                     f"{disk['resizes']} resizes since start")
    if "limits" in snap:
        lines.append(render_limits(snap["limits"]))
    dt = None
    if previous is not None and previous.get("pid") == snap["pid"]:
        dt = snap["time"] - previous["time"]
        if dt <= 0:
            dt = None
    columns = ["type", "requests", "bytes", "p50", "p99", "p99.9"]
    if dt is not None:
        columns += ["req/s", "bytes/s"]
    for q in snap["queues"]:
        lines.append(f"queue {q['queue']}: {q['in_flight']} in flight, {q['ioerr']} ioerr, "
                     f"{q['unsupp']} unsupp, {q['refused']} refused chains")
        old = _queue(previous, q["queue"]) if dt is not None else None
        rows = []
        for kind in KINDS:
            t = q["types"].get(kind)
            if t is None:                  # a vblk from before this kind was counted
                continue
            rows.append(_row(kind, t["requests"], t["bytes"], t["latency_us"],
                             old["types"].get(kind) if old else None, dt))
        rows.append(_row("all", q["requests"], q["bytes"], q["latency_us"], old, dt))
        lines.extend("  " + line for line in _table(columns, rows))
    return "\n".join(lines)


def _queue(snap: dict | None, index: int) -> dict | None:
    if snap is None:
        return None
    for q in snap["queues"]:
        if q["queue"] == index:
            return q
    return None


def _row(name: str, requests: int, nbytes: int, latency: dict, old: dict | None,
         dt: float | None) -> list[str]:
    row = [name, str(requests), format_size(nbytes)]
    row += [micros(latency[k]) for k in ("p50", "p99", "p99_9")]
    if dt is not None:
        if old is None:
            row += ["-", "-"]
        else:
            row += [f"{(requests - old['requests']) / dt:.1f}",
                    format_size((nbytes - old["bytes"]) / dt)]
    return row


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    out = []
    for r in [columns, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells).rstrip())
    return out


def micros(us: float | None) -> str:
    """A latency in µs, shown in µs, ms or s; '-' when there were no requests."""
    if us is None:
        return "-"
    if us < 1000:
        return f"{us:.0f}µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1_000_000:.2f}s"


def duration(seconds: float) -> str:
    """1h02m03s, 4m05s, 6s."""
    s = int(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
