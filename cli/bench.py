"""``vblk bench``: measure a vhost-user-blk backend, or compare vblk with qemu-storage-daemon.

``--socket PATH`` runs one workload against whatever listens there (vblk, qemu-storage-daemon,
any vhost-user-blk backend) with the package's own frontend and prints IOPS, MB/s, latency
percentiles and the client's CPU share (``--json`` for a machine). ``--compare IMAGE`` serves
two copies of IMAGE with both backends and runs a list of workloads against each, alternately.

Exit status: 0; 1 if a request failed or the backend misbehaved; 2 for a bad option (one line
``vblk: error: ...`` on stderr, as every vblk command does); 130 on Ctrl-C.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

HELP = """Measure a vhost-user-blk backend (--socket), or compare vblk with qemu-storage-daemon
on copies of one image (--compare).

Patterns: randread, randwrite, read, write, randrw (--rwmix: percent reads). --qd is the
number of requests in flight per queue. Latency runs from the publish of a request to the
reap that sees it done. MB/s are 10^6 bytes.

--compare starts `vblk serve` and qemu-storage-daemon in the same cache mode (--cache, or
--writeback/--writethru inside --vblk-args; default writethrough, vblk's default) and runs
each workload (--workload PATTERN:BS:QD, repeatable; default 4k randread QD1 and QD32, 128k
read and write QD8, 4k randwrite QD32) against both, alternately, for --rounds rounds, then
prints medians and the ratio vblk/qsd. --plot FILE.png adds a queue-depth sweep (QD 1..32 of
--plot-workload) and draws it (needs matplotlib).

--compare IMAGE --guest runs the same comparison with fio (libaio, O_DIRECT, JSON output) inside
vblk's test guest (QEMU, TCG without real KVM): one boot per backend per round, order
alternating, every workload for --duration seconds after a --ramp; --smp and --guest-memory size
the guest. Needs fio on the host (apt-get install fio): it is copied into a cached add-on."""


def _fail(message: str, status: int) -> typer.Exit:
    print(f"vblk: error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(status)


def bench_command(
    socket_path: Optional[str] = typer.Option(None, "--socket", metavar="PATH",
                                              help="The vhost-user-blk socket to load."),
    compare_image: Optional[str] = typer.Option(None, "--compare", metavar="IMAGE",
                                                help="Compare vblk with qemu-storage-daemon "
                                                     "on two copies of IMAGE."),
    pattern: Optional[str] = typer.Option(None, "--pattern", metavar="PATTERN",
                                          help="randread|randwrite|read|write|randrw "
                                               "(default randread)."),
    rwmix: int = typer.Option(50, "--rwmix", metavar="PCT", help="randrw: percent of reads."),
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
    workload: Optional[List[str]] = typer.Option(None, "--workload", metavar="PATTERN:BS:QD",
                                                 help="--compare: a workload, repeatable."),
    rounds: Optional[int] = typer.Option(None, "--rounds", metavar="N",
                                         help="--compare: rounds, A B A B (default 3)."),
    vblk_args: Optional[str] = typer.Option(None, "--vblk-args", metavar="ARGS",
                                            help="--compare: more `vblk serve` options, e.g. "
                                                 "'--workers 2 --writeback'."),
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
    limit_iops: Optional[str] = typer.Option(None, "--limit-iops", metavar="N",
                                             help="--socket: the IOPS limit the backend should "
                                                  "hold; prints achieved/limit (default: asked "
                                                  "of a vblk's control socket, SOCKET.ctl)."),
    limit_bps: Optional[str] = typer.Option(None, "--limit-bps", metavar="SIZE",
                                            help="--socket: the bytes/s limit, likewise."),
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
    from vblk.lab.client import backend_limits, run_workload
    from vblk.lab.compare import compare
    from vblk.lab.plot import check_plot_support, plot_sweep
    from vblk.lab.report import ProgressLine, format_comparison, format_result
    from vblk.lab.workload import (DEFAULT_DURATION, DEFAULT_WORKLOADS, BenchError, Workload,
                                   parse_size)
    from vblk.testing.frontend import BackendError

    show = progress if progress is not None else sys.stderr.isatty()
    compare_only = {"--workload": workload, "--rounds": rounds, "--vblk-args": vblk_args,
                    "--cache": cache, "--plot": plot, "--plot-workload": plot_workload,
                    "--workdir": workdir, "--keep": keep or None}
    guest_only = {"--ramp": ramp, "--smp": smp, "--guest-memory": guest_memory}
    try:
        if (socket_path is None) == (compare_image is None):
            raise BenchError("give exactly one of --socket PATH and --compare IMAGE")
        if guest and compare_image is None:
            raise BenchError("--guest goes with --compare IMAGE")
        if not guest:
            given = [name for name, value in guest_only.items() if value is not None]
            if given:
                raise BenchError(f"{given[0]} goes with --guest")
        else:
            frontend_only = {"--ops": ops, "--busy-poll": busy_poll or None, "--plot": plot,
                             "--plot-workload": plot_workload,
                             "--queues": queues if queues != 1 else None}
            given = [name for name, value in frontend_only.items() if value is not None]
            if given:
                raise BenchError(f"{given[0]} does not go with --guest (fio runs each "
                                   "workload for --duration seconds on one queue)")
        if socket_path is not None:
            given = [name for name, value in compare_only.items() if value is not None]
            if given:
                raise BenchError(f"{given[0]} goes with --compare, not --socket")
        elif limit_iops is not None or limit_bps is not None:
            raise BenchError("--limit-iops/--limit-bps go with --socket, not --compare")
        from vblk.errors import ConfigError
        from vblk.options import parse_limits
        try:
            expected = parse_limits(iops=limit_iops, bps=limit_bps, suffix="", prefix="--limit-")
        except ConfigError as exc:
            raise BenchError(str(exc)) from None
        if duration is not None and ops is not None:
            raise BenchError("give --duration or --ops, not both")
        common = dict(rwmix=rwmix, queues=queues,
                      duration=None if ops is not None else (duration or DEFAULT_DURATION),
                      ops=ops, offset=parse_size(offset, "--offset"), seed=seed,
                      size=None if size is None else parse_size(size, "--size"))
        if not 0 < timeout <= 3600:
            raise BenchError(f"--timeout {timeout:g}: more than 0, at most 3600 seconds")
        single = Workload(pattern=pattern or "randread",
                            bs=parse_size(bs, "--bs") if bs is not None else 4096,
                            qd=1 if qd is None else qd, **common).checked()
        if socket_path is not None:
            if not os.path.exists(socket_path):
                raise BenchError(f"--socket {socket_path}: no such socket")
        else:
            explicit = pattern is not None or bs is not None or qd is not None
            if explicit and workload:
                raise BenchError("give --workload, or --pattern/--bs/--qd, not both")
            specs = workload or ([] if explicit else list(DEFAULT_WORKLOADS))
            workloads = [Workload.parse(s, **common) for s in specs] or [single]
            sweep = None
            if plot is not None:
                check_plot_support()
                spec = (plot_workload or "randread:4k") + ":1"
                sweep = Workload.parse(spec, **common)
            elif plot_workload is not None:
                raise BenchError("--plot-workload goes with --plot")
    except BenchError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None

    try:
        if guest:
            from vblk.lab import guestbench
            comparison = guestbench.guest_compare(
                compare_image, workloads, rounds=3 if rounds is None else rounds,
                ramp=guestbench.DEFAULT_RAMP if ramp is None else ramp,
                smp=1 if smp is None else smp,
                memory=guest_memory or guestbench.DEFAULT_MEMORY, vblk_args=vblk_args or "",
                cache=cache, workdir=workdir, keep=keep, log=sys.stderr if show else None)
            if as_json:
                typer.echo(json.dumps(comparison.to_dict(), indent=2))
            else:
                typer.echo(format_comparison(comparison))
            errors = comparison.errors
        elif socket_path is not None:
            line = ProgressLine(sys.stderr, single.label, single) if show else None
            try:
                result = run_workload(socket_path, single, timeout=timeout, busy_poll=busy_poll,
                                        progress=line, backend=socket_path)
            finally:
                if line:
                    line.finish()
            if limit_iops is not None or limit_bps is not None:
                result.limit_iops, result.limit_bps = expected.iops, expected.bps
                result.limit_source = "--limit-iops/--limit-bps"
            else:
                known = backend_limits(socket_path)
                if known is not None and any(known):
                    result.limit_iops, result.limit_bps = known
                    result.limit_source = "vblk control socket"
            if as_json:
                typer.echo(json.dumps(result.to_dict(), indent=2))
            else:
                typer.echo(format_result(result))
            errors = result.errors
        else:
            comparison = compare(compare_image, workloads, rounds=3 if rounds is None else rounds,
                                   vblk_args=vblk_args or "", cache=cache, workdir=workdir,
                                   keep=keep, sweep=sweep, timeout=timeout, busy_poll=busy_poll,
                                   progress=sys.stderr if show else None,
                                   log=sys.stderr if show else None)
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
            errors = comparison.errors
    except BenchError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    except BackendError as exc:
        raise _fail(f"backend: {exc}", EXIT_FAILED) from None
    except OSError as exc:
        raise _fail(str(exc), EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", EXIT_INTERRUPTED) from None
    if errors:
        print(f"vblk: error: {errors} requests failed", file=sys.stderr, flush=True)
        raise typer.Exit(EXIT_FAILED)


bench_command.__doc__ = HELP
