"""The lab's commands: ``vblk bench`` (measure a vhost-user-blk backend, or compare vblk with
qemu-storage-daemon) and ``vblk demo`` (boot the test guest on vblk, serving a file or, with
``--rbd``, an RBD image in a throwaway Ceph cluster). Both drive ``vblk.lab``,
imported only when the command runs.

``bench --socket-path PATH`` runs one workload against whatever listens there (vblk,
qemu-storage-daemon, any vhost-user-blk backend) with the package's own frontend and prints
IOPS, MB/s, latency percentiles and the client's CPU share (``--json`` for a machine).
``bench --compare IMAGE`` serves two copies of IMAGE (a file, or an RBD image
``rbd:POOL/IMAGE``: copied in its pool) with both backends and runs a list of workloads
against each, alternately; on RBD, ``rbd bench`` gives librbd's own ceiling beside them.

Exit status: 0; 1 if a request failed or the backend misbehaved; 2 for a bad option (one line
``vblk: error: ...`` on stderr, as every vblk command does); 130 on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TextIO

import typer

from vblk.cli.errors import fail
from vblk.cli.spellings import either
from vblk.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from vblk.lab.workload import Workload
    from vblk.ratelimit import Limits


HELP = """Measure a vhost-user-blk backend (--socket-path), or compare vblk with qemu-storage-daemon
on copies of one image (--compare).

Patterns: randread, randwrite, read, write, randrw (--rwmix: percent reads). --qd is the
number of requests in flight per queue. Latency runs from the publish of a request to the
reap that sees it done. MB/s are 10^6 bytes.

--compare starts `vblk serve` and qemu-storage-daemon in the same cache mode (--cache, or
--cache inside --vblk-args; default writethrough, vblk's default) and runs
each workload (--workload PATTERN:BS:QD, repeatable; default 4k randread QD1 and QD32, 128k
read and write QD8, 4k randwrite QD1 and QD32) against both, alternately, for --rounds rounds, then
prints medians and the ratio vblk/qsd. --plot FILE.png adds a queue-depth sweep (QD 1..32 of
--plot-workload) and draws it (needs matplotlib).

--compare IMAGE --cold drops each copy from the page cache (fsync, POSIX_FADV_DONTNEED) before
every run, so that reads reach the disk: what a guest whose image the host does not cache sees.

--compare rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER] copies the image twice in its pool (rbd
cp; removed afterwards unless --keep) and serves one copy with `vblk serve rbd:...` and the
other with qemu-storage-daemon's rbd driver (cache.direct=on: librbd's cache off, as vblk's).
After each pair of runs `rbd bench` runs the same pattern on qsd's copy (--io-threads = QD,
--io-total paced to --duration) and the table adds its IOPS and the ratio vblk/rbd bench:
what librbd reaches with no vhost-user in between (--no-rbd-bench leaves it out).

--compare IMAGE --guest runs the same comparison with fio (libaio, O_DIRECT, JSON output) inside
vblk's test guest (QEMU, TCG without real KVM): one boot per backend per round, order
alternating, every workload for --duration seconds after a --ramp; --smp and --guest-memory size
the guest. Needs fio on the host (apt-get install fio): it is copied into a cached add-on."""


def bench_command(
    socket_path: Optional[str] = typer.Option(None, "--socket-path", metavar="PATH",
                                              help="The vhost-user-blk socket to load."),
    old_socket: Optional[str] = typer.Option(None, "--socket", hidden=True),
    compare_image: Optional[str] = typer.Option(None, "--compare", metavar="IMAGE",
                                                help="Compare vblk with qemu-storage-daemon "
                                                     "on two copies of IMAGE (a file or "
                                                     "rbd:POOL/IMAGE[:conf=PATH][:id=USER])."),
    pattern: Optional[str] = typer.Option(None, "--pattern", metavar="PATTERN",
                                          help="randread|randwrite|read|write|randrw "
                                               "(default randread)."),
    rwmix: int = typer.Option(50, "--rwmix", metavar="PCT", help="randrw: percent of reads."),
    flush_every: int = typer.Option(0, "--flush-every", metavar="N",
                                    help="A FLUSH after every N writes, per queue (with "
                                         "--compare: in every workload that writes)."),
    bs: Optional[str] = typer.Option(None, "--bs", metavar="SIZE",
                                     help="Block size, K/M suffixes (default 4k)."),
    qd: Optional[int] = typer.Option(None, "--qd", metavar="N",
                                     help="Requests in flight per queue (default 1)."),
    duration: Optional[float] = typer.Option(None, "--duration", metavar="SECONDS",
                                             help="Run this long (default 5) ..."),
    ops: Optional[int] = typer.Option(None, "--ops", metavar="N", help="... or this many requests."),
    queues: int = typer.Option(1, "--queues", metavar="N",
                               help="Virtqueues to use (no more than the backend offers)."),
    size: Optional[str] = typer.Option(None, "--size", metavar="SIZE",
                                       help="Bytes of the region tested (default: to the end "
                                            "of the disk)."),
    offset: str = typer.Option("0", "--offset", metavar="SIZE", help="Start of the region."),
    seed: int = typer.Option(1, "--seed", metavar="N", help="Seed of offsets and data."),
    timeout: float = typer.Option(10.0, "--timeout", metavar="SECONDS",
                                  help="Fail when nothing completes for this long."),
    busy_poll: bool = typer.Option(False, "--busy-poll",
                                   help="Spin on the used ring instead of sleeping on the "
                                        "call eventfd (burns a core)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="Progress on stderr (default: on a terminal)."),
    workload: Optional[list[str]] = typer.Option(None, "--workload", metavar="PATTERN:BS:QD",
                                                 help="--compare: a workload, repeatable."),
    rounds: Optional[int] = typer.Option(None, "--rounds", metavar="N",
                                         help="--compare: rounds, A B A B (default 3)."),
    vblk_args: Optional[str] = typer.Option(None, "--vblk-args", metavar="ARGS",
                                            help="--compare: more `vblk serve` options, e.g. "
                                                 "'--workers 2 --cache writeback'."),
    cache: Optional[str] = typer.Option(None, "--cache", metavar="MODE",
                                        help="--compare: writethrough or writeback, for both."),
    plot: Optional[str] = typer.Option(None, "--plot", metavar="FILE.png",
                                       help="--compare: add a QD sweep and draw it here."),
    plot_workload: Optional[str] = typer.Option(None, "--plot-workload", metavar="PATTERN:BS",
                                                help="--compare: the sweep's workload "
                                                     "(default randread:4k)."),
    workdir: Optional[str] = typer.Option(None, "--workdir", metavar="DIR",
                                          help="--compare: where the image copies go "
                                               "(default $TMPDIR)."),
    keep: bool = typer.Option(False, "--keep", help="--compare: keep the copies and logs."),
    cold: bool = typer.Option(False, "--cold",
                              help="--compare IMAGE-FILE: drop each copy from the page cache "
                                   "before every run, so that reads reach the disk."),
    rbd_bench: Optional[bool] = typer.Option(None, "--rbd-bench/--no-rbd-bench",
                                             help="--compare rbd:...: run rbd bench with each "
                                                  "workload beside the backends (default: "
                                                  "on)."),
    limit_iops: Optional[str] = typer.Option(None, "--iops-limit", metavar="N",
                                             help="--socket-path: the IOPS limit the backend "
                                                  "should hold; prints achieved/limit (default: "
                                                  "asked of a vblk's control socket, PATH.ctl)."),
    limit_bps: Optional[str] = typer.Option(None, "--bps-limit", metavar="SIZE",
                                            help="--socket-path: the bytes/s limit, likewise."),
    old_limit_iops: Optional[str] = typer.Option(None, "--limit-iops", hidden=True),
    old_limit_bps: Optional[str] = typer.Option(None, "--limit-bps", hidden=True),
    guest: bool = typer.Option(False, "--guest",
                               help="--compare: run fio inside the test guest (QEMU) against "
                                    "each backend instead of the Python frontend."),
    ramp: Optional[float] = typer.Option(None, "--ramp", metavar="SECONDS",
                                         help="--guest: fio's ramp before each workload "
                                              "(default 1)."),
    smp: Optional[int] = typer.Option(None, "--smp", metavar="N",
                                      help="--guest: the guest's vCPUs (default 1)."),
    guest_memory: Optional[str] = typer.Option(None, "--guest-memory", metavar="SIZE",
                                               help="--guest: the guest's RAM (default 512M)."),
) -> None:
    from vblk.lab.workload import BenchError
    from vblk.testing.frontend import BackendError

    socket_path = either("--socket-path", socket_path, "--socket", old_socket)
    limit_iops = either("--iops-limit", limit_iops, "--limit-iops", old_limit_iops)
    limit_bps = either("--bps-limit", limit_bps, "--limit-bps", old_limit_bps)
    show = progress if progress is not None else sys.stderr.isatty()
    limits_given = limit_iops is not None or limit_bps is not None
    try:
        _check_modes(socket_path, compare_image, guest, limits_given=limits_given,
                     rbd_bench=rbd_bench,
                     compare_only={"--workload": workload, "--rounds": rounds,
                                   "--vblk-args": vblk_args, "--cache": cache, "--plot": plot,
                                   "--plot-workload": plot_workload, "--workdir": workdir,
                                   "--keep": keep or None, "--rbd-bench": rbd_bench,
                                   "--cold": cold or None},
                     guest_only={"--ramp": ramp, "--smp": smp, "--guest-memory": guest_memory},
                     frontend_only={"--ops": ops, "--busy-poll": busy_poll or None,
                                    "--cold": cold or None,
                                    "--flush-every": flush_every or None,
                                    "--plot": plot, "--plot-workload": plot_workload,
                                    "--queues": queues if queues != 1 else None})
        plan = _plan(pattern=pattern, bs=bs, qd=qd, rwmix=rwmix, flush_every=flush_every,
                     queues=queues,
                     duration=duration, ops=ops, size=size, offset=offset, seed=seed,
                     timeout=timeout, specs=workload, plot=plot, plot_workload=plot_workload,
                     limit_iops=limit_iops, limit_bps=limit_bps,
                     listed=compare_image is not None)
        if socket_path is not None and not os.path.exists(socket_path):
            raise BenchError(f"--socket-path {socket_path}: no such socket")
    except BenchError as exc:
        raise fail(str(exc), EXIT_USAGE) from None

    log = sys.stderr if show else None
    rounds = 3 if rounds is None else rounds
    try:
        if guest:
            errors = _run_guest(compare_image, plan, rounds=rounds, ramp=ramp, smp=smp,
                                memory=guest_memory, vblk_args=vblk_args or "", cache=cache,
                                workdir=workdir, keep=keep, as_json=as_json, log=log)
        elif socket_path is not None:
            errors = _run_socket(socket_path, plan, timeout=timeout, busy_poll=busy_poll,
                                 limits_given=limits_given, as_json=as_json, log=log)
        else:
            errors = _run_compare(compare_image, plan, rounds=rounds, vblk_args=vblk_args or "",
                                  cache=cache, workdir=workdir, keep=keep, timeout=timeout,
                                  busy_poll=busy_poll, plot=plot, rbd_bench=rbd_bench,
                                  cold=cold, as_json=as_json, log=log)
    except BenchError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except BackendError as exc:
        raise fail(f"backend: {exc}", EXIT_FAILED) from None
    except OSError as exc:
        raise fail(str(exc), EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    if errors:
        raise fail(errors if isinstance(errors, str) else f"{errors} requests failed",
                   EXIT_FAILED)


bench_command.__doc__ = HELP


def _first_given(options: dict[str, object]) -> str | None:
    """The first option name whose value was given (is not None)."""
    return next((name for name, value in options.items() if value is not None), None)


def _check_modes(socket_path: str | None, compare_image: str | None, guest: bool, *,
                 limits_given: bool, rbd_bench: bool | None, compare_only: dict,
                 guest_only: dict, frontend_only: dict) -> None:
    """BenchError unless the options given belong to the mode chosen: --socket-path, --compare,
    or --compare --guest (--rbd-bench: --compare rbd:..., checked by ``compare``)."""
    from vblk.lab.workload import BenchError
    if (socket_path is None) == (compare_image is None):
        raise BenchError("give exactly one of --socket-path PATH and --compare IMAGE")
    if guest and compare_image is None:
        raise BenchError("--guest goes with --compare IMAGE")
    if not guest and (name := _first_given(guest_only)):
        raise BenchError(f"{name} goes with --guest")
    if guest and rbd_bench is not None:
        raise BenchError("--rbd-bench/--no-rbd-bench go with the frontend comparison, not --guest")
    if guest and (name := _first_given(frontend_only)):
        raise BenchError(f"{name} does not go with --guest (fio runs each "
                         "workload for --duration seconds on one queue)")
    if socket_path is not None and (name := _first_given(compare_only)):
        raise BenchError(f"{name} goes with --compare, not --socket-path")
    if socket_path is None and limits_given:
        raise BenchError("--iops-limit/--bps-limit go with --socket-path, not --compare")


@dataclass(frozen=True)
class _Plan:
    """What bench runs: the one workload (--socket-path), the list (--compare), the sweep
    (--plot) and the limits the backend should hold (--iops-limit/--bps-limit)."""
    single: Workload
    workloads: list[Workload]
    sweep: Workload | None
    expected: Limits


def _plan(*, pattern: str | None, bs: str | None, qd: int | None, rwmix: int,
          flush_every: int, queues: int,
          duration: float | None, ops: int | None, size: str | None, offset: str, seed: int,
          timeout: float, specs: list[str] | None, plot: str | None,
          plot_workload: str | None, limit_iops: str | None, limit_bps: str | None,
          listed: bool) -> _Plan:
    """The workloads from the options, every check that needs no backend done (BenchError);
    ``listed``: --compare's list and sweep too (--socket-path runs only the single workload)."""
    from vblk.errors import ConfigError
    from vblk.lab.plot import check_plot_support
    from vblk.lab.workload import DEFAULT_DURATION, DEFAULT_WORKLOADS, BenchError, Workload, size_option
    from vblk.options import parse_limits
    try:
        expected = parse_limits(iops=limit_iops, bps=limit_bps)
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    if duration is not None and ops is not None:
        raise BenchError("give --duration or --ops, not both")
    common = dict(rwmix=rwmix, queues=queues,
                  duration=None if ops is not None else (duration or DEFAULT_DURATION),
                  ops=ops, offset=size_option(offset, "--offset"), seed=seed,
                  size=None if size is None else size_option(size, "--size"))
    if not 0 < timeout <= 3600:
        raise BenchError(f"--timeout {timeout:g}: more than 0, at most 3600 seconds")
    single = Workload(pattern=pattern or "randread",
                      bs=size_option(bs, "--bs") if bs is not None else 4096,
                      qd=1 if qd is None else qd, **common).checked()
    if not listed:
        import dataclasses
        single = dataclasses.replace(single, flush_every=flush_every).checked()
        return _Plan(single, [single], None, expected)
    single = _flushing(single, flush_every)
    explicit = pattern is not None or bs is not None or qd is not None
    if explicit and specs:
        raise BenchError("give --workload, or --pattern/--bs/--qd, not both")
    chosen = specs or ([] if explicit else list(DEFAULT_WORKLOADS))
    workloads = [_flushing(Workload.parse(s, **common), flush_every) for s in chosen] or [single]
    sweep = None
    if plot is not None:
        check_plot_support()
        sweep = Workload.parse((plot_workload or "randread:4k") + ":1", **common)
    elif plot_workload is not None:
        raise BenchError("--plot-workload goes with --plot")
    return _Plan(single, workloads, sweep, expected)


def _flushing(w, flush_every: int):
    """``w`` with a FLUSH after every ``flush_every`` writes, if it writes."""
    import dataclasses
    return dataclasses.replace(w, flush_every=flush_every).checked() if w.writes else w


def _run_socket(socket_path: str, plan: _Plan, *, timeout: float, busy_poll: bool,
                limits_given: bool, as_json: bool, log: TextIO | None) -> int:
    """--socket-path: one run against whatever listens there; returns the failed requests."""
    from vblk.lab.client import backend_limits, run_workload
    from vblk.lab.report import ProgressLine, format_result
    single = plan.single
    line = ProgressLine(log, single.label, single) if log else None
    try:
        result = run_workload(socket_path, single, timeout=timeout, busy_poll=busy_poll,
                              progress=line, backend=socket_path)
    finally:
        if line:
            line.finish()
    if limits_given:
        result.limit_iops, result.limit_bps = plan.expected.iops, plan.expected.bps
        result.limit_source = "--iops-limit/--bps-limit"
    else:
        known = backend_limits(socket_path)
        if known is not None and any(known):
            result.limit_iops, result.limit_bps = known
            result.limit_source = "vblk control socket"
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
    return result.errors


def _run_compare(image: str, plan: _Plan, *, rounds: int, vblk_args: str, cache: str | None,
                 workdir: str | None, keep: bool, timeout: float, busy_poll: bool,
                 plot: str | None, rbd_bench: bool | None, cold: bool, as_json: bool,
                 log: TextIO | None) -> int | str:
    """--compare: vblk and qsd, alternately, with the Python frontend (and the sweep, and
    rbd bench on RBD); the failed requests, or why a ceiling run failed."""
    from vblk.lab.compare import compare
    from vblk.lab.plot import plot_sweep
    from vblk.lab.report import format_comparison
    comparison = compare(image, plan.workloads, rounds=rounds, vblk_args=vblk_args, cache=cache,
                         workdir=workdir, keep=keep, sweep=plan.sweep, timeout=timeout,
                         busy_poll=busy_poll, rbd_bench=rbd_bench, cold=cold, progress=log,
                         log=log)
    if plot is not None:
        plot_sweep(comparison, plot)
    if as_json:
        data = comparison.to_dict()
        data["plot"] = plot
        typer.echo(json.dumps(data, indent=2))
    else:
        typer.echo(format_comparison(comparison))
        if plot is not None:
            typer.echo(f"plot: {plot}")
    failures = comparison.ceiling_failures
    if failures and not comparison.errors:
        return f"{len(failures)} {comparison.ceiling_name} run(s) failed: {failures[0]}"
    return comparison.errors


def _run_guest(image: str, plan: _Plan, *, rounds: int, ramp: float | None, smp: int | None,
               memory: str | None, vblk_args: str, cache: str | None, workdir: str | None,
               keep: bool, as_json: bool, log: TextIO | None) -> int:
    """--compare --guest: vblk and qsd, alternately, with fio in the test guest."""
    from vblk.lab import guestbench
    from vblk.lab.report import format_comparison
    comparison = guestbench.guest_compare(
        image, plan.workloads, rounds=rounds,
        ramp=guestbench.DEFAULT_RAMP if ramp is None else ramp, smp=1 if smp is None else smp,
        memory=memory or guestbench.DEFAULT_MEMORY, vblk_args=vblk_args, cache=cache,
        workdir=workdir, keep=keep, log=log)
    typer.echo(json.dumps(comparison.to_dict(), indent=2) if as_json
               else format_comparison(comparison))
    return comparison.errors


def demo_command(
    image: Optional[str] = typer.Option(None, "--image", metavar="PATH",
                                        help="Create the demo's 1 GiB image here (a new path; "
                                             "default: a temporary directory)."),
    keep: bool = typer.Option(False, "--keep",
                              help="Keep the temporary directory (image and logs) afterwards "
                                   "(--rbd: and leave the cluster running)."),
    rbd: bool = typer.Option(False, "--rbd",
                             help="Serve a 1 GiB Ceph RBD image in a throwaway single-node "
                                  "cluster (started first, killed after) instead of a file."),
) -> None:
    """Boot a small Linux guest under QEMU against vblk and show it using the disk."""
    from vblk.errors import ConfigError
    from vblk.logs import configure_logging
    configure_logging("WARNING")
    if rbd and image is not None:
        raise fail("--image goes with the file demo; --rbd creates its image in a throwaway "
                   "Ceph cluster", EXIT_USAGE)
    try:
        from vblk.lab.demo import run_demo, run_rbd_demo
    except ImportError as e:
        raise fail(f"the demo is not available: {e}", EXIT_USAGE) from None
    try:
        if rbd:
            status = run_rbd_demo(keep)
        else:
            status = run_demo(Path(image) if image is not None else None, keep)
    except ConfigError as e:
        raise fail(str(e), EXIT_USAGE) from None
    raise typer.Exit(status or EXIT_OK)
