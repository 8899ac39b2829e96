"""``vblk``: the command line (typer).  ``serve`` a disk or show its ``info`` (here); the
operator's ``stats``, ``resize`` and ``limit`` (``ops``); ``bench`` and ``demo`` (``lab``).

Every command validates everything first (the option string, the flags, the image, its range
and lock, the socket path) and only then creates or opens anything for writing.  A bad input
ends the command with one line, ``vblk: error: <message>``, on stderr and exit status 2, the
same status click gives a usage error.
"""
from __future__ import annotations

import grp
import json
from typing import Optional

import typer

import vblk
from vblk.cli import ops
from vblk.cli.errors import fail, run
from vblk.cli.lab import bench_command, demo_command
from vblk.control import check_unix_socket_path
from vblk.device import WRITE_ZEROES_MAX_SECTORS, WRITE_ZEROES_MAX_SEG
from vblk.errors import ConfigError
from vblk.listening import check_listen_fd
from vblk.options import (
    DiskOptions,
    ServeConfig,
    default_max_discard_sectors,
    merge_flags,
    parse_acrn,
    parse_limits,
    parse_socket_mode,
)

app = typer.Typer(name="vblk", add_completion=True, no_args_is_help=True,
                  rich_markup_mode=None, pretty_exceptions_enable=False)


def show_version(value: bool) -> None:
    """Eager callback of ``--version``/``-V``: print ``vblk VERSION`` and exit 0."""
    if value:
        typer.echo(f"vblk {vblk.__version__}")
        raise typer.Exit()


Version = typer.Option(False, "--version", "-V", is_eager=True, callback=show_version,
                       help="Print vblk's version and exit.")


@app.callback()
def vblk_options(version: bool = Version) -> None:
    """A virtio-blk device backend (after ACRN's Virtio-BLK) that speaks vhost-user on a Unix
    socket."""

SPEC_HELP = ("The image path, or an ACRN option string "
             "'[iothread,][mq=1,]PATH[,writeback|writethru][,ro][,nocache][,discard[=A:B:C]]"
             "[,sectorsize=L[/P]][,range=START/COUNT]' (range in logical sectors).")

# Options shared by serve and info.
Spec = typer.Argument(..., metavar="SPEC", help=SPEC_HELP, show_default=False)
ReadOnly = typer.Option(None, "--ro", "--read-only", help="Serve read-only (ACRN: ro).",
                        show_default=False)
Writeback = typer.Option(None, "--writeback/--writethru",
                         help="Initial cache mode (ACRN: writeback / writethru; default writethru).",
                         show_default=False)
NoCache = typer.Option(None, "--nocache", help="Open with O_DIRECT (ACRN: nocache).",
                       show_default=False)
SectorSize = typer.Option(None, "--sectorsize", metavar="L[/P]",
                          help="Logical[/physical] block size, 512..4096 (ACRN: sectorsize=).")
Range = typer.Option(None, "--range", metavar="START/SIZE",
                     help="Serve only these bytes of the image, K/M/G/T suffixes allowed, whole "
                          "logical sectors (ACRN: range=S/N counts sectors instead).")
NumQueues = typer.Option(None, "--num-queues", metavar="N",
                         help="Virtqueues offered, 1..64 (ACRN: mq=N; default 1).")
Discard = typer.Option(None, "--discard/--no-discard",
                       help="Offer DISCARD (ACRN: discard): max sectors per segment = the disk, "
                            "1 segment, no alignment unless --discard-limits says otherwise.",
                       show_default=False)
DiscardLimits = typer.Option(None, "--discard-limits", metavar="A:B:C",
                             help="DISCARD on with these limits (ACRN: discard=A:B:C): max "
                                  "sectors per segment, segments per request (at most 256), "
                                  "sector alignment (0: none).")
Serial = typer.Option(None, "--serial", metavar="S", help="Serial number the guest reads (≤ 20 ASCII chars; "
                                             "default derived from the image).")


def disk_options(spec: str, *, readonly: Optional[bool], writeback: Optional[bool],
                 nocache: Optional[bool], sectorsize: Optional[str], range_: Optional[str],
                 serial: Optional[str], num_queues: Optional[int] = None,
                 discard: Optional[bool] = None,
                 discard_limits: Optional[str] = None) -> DiskOptions:
    opts = parse_acrn(spec)
    return merge_flags(opts, readonly=readonly, writeback=writeback, nocache=nocache,
                       sectorsize=sectorsize, range_=range_, serial=serial,
                       num_queues=num_queues, discard=discard, discard_limits=discard_limits)


def check_group(name: str | None) -> str | None:
    if name is not None:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(f"--socket-group {name!r}: no such group") from None
    return name


@app.command()
def serve(
    spec: Optional[str] = typer.Argument(None, metavar="[SPEC]", show_default=False,
                                         help=SPEC_HELP + " Or give the image as --blk-file."),
    blk_file: Optional[str] = typer.Option(None, "--blk-file", metavar="PATH",
                                           help="The image path, instead of SPEC (vhost-user "
                                                "backend convention)."),
    socket_path: Optional[str] = typer.Option(None, "--socket-path", metavar="PATH",
                                              help="Listen on a new Unix socket here."),
    socket_mode: str = typer.Option("0600", "--socket-mode", metavar="MODE",
                                    help="Permissions of the socket vblk creates (octal)."),
    socket_group: Optional[str] = typer.Option(None, "--socket-group", metavar="GROUP",
                                               help="Group of the socket vblk creates "
                                                    "(e.g. the one QEMU runs as)."),
    fd: Optional[int] = typer.Option(None, "--fd", metavar="N",
                                     help="Listen on this inherited listening socket instead."),
    readonly: Optional[bool] = ReadOnly,
    writeback: Optional[bool] = Writeback,
    nocache: Optional[bool] = NoCache,
    sectorsize: Optional[str] = SectorSize,
    range_: Optional[str] = Range,
    serial: Optional[str] = Serial,
    num_queues: Optional[int] = NumQueues,
    discard: Optional[bool] = Discard,
    discard_limits: Optional[str] = DiscardLimits,
    workers: int = typer.Option(8, "--workers", metavar="N", help="I/O worker processes, 1..64."),
    queue_size: int = typer.Option(64, "--queue-size", metavar="N",
                                   help="Request slots (requests in flight), a power of two."),
    log_level: str = typer.Option("info", "--log-level", metavar="LEVEL",
                                  help="debug, info, warning or error."),
    control_socket: Optional[str] = typer.Option(None, "--control-socket", metavar="PATH",
                                                 help="Control socket for vblk stats (default: "
                                                      "the listening socket's path + .ctl)."),
    metrics_listen: Optional[str] = typer.Option(None, "--metrics-listen", metavar="HOST:PORT",
                                                 help="Serve Prometheus metrics over HTTP here."),
    iops_limit: Optional[str] = typer.Option(None, "--iops-limit", metavar="N",
                                             help="At most N requests (reads, writes, flushes) "
                                                  "per second over all queues; 0 = unlimited "
                                                  "(default). Changeable with vblk limit."),
    bps_limit: Optional[str] = typer.Option(None, "--bps-limit", metavar="SIZE",
                                            help="At most SIZE bytes read+written per second, "
                                                 "K/M/G suffixes (1024-based); 0 = unlimited."),
    iops_burst: Optional[str] = typer.Option(None, "--iops-burst", metavar="N",
                                             help="Requests an idle device may take at once "
                                                  "(default: 0.1 s of --iops-limit)."),
    bps_burst: Optional[str] = typer.Option(None, "--bps-burst", metavar="SIZE",
                                            help="Bytes an idle device may move at once "
                                                 "(default: 0.1 s of --bps-limit)."),
    incoming: bool = typer.Option(False, "--incoming",
                                  help="Serve the destination of a live migration: open the "
                                       "image while the source vblk still serves it, and take "
                                       "its lock only when the guest's rings start here (after "
                                       "the source gave it up)."),
    print_capabilities: bool = typer.Option(False, "--print-capabilities", is_eager=True,
                                            callback=ops.print_capabilities,
                                            help="Print the vhost-user backend capabilities "
                                                 "(JSON) and exit."),
) -> None:
    """Serve SPEC to one vhost-user frontend at a time until SIGTERM or SIGINT.

    Without --socket-path or --fd, listens on the socket systemd passes (LISTEN_FDS)."""
    from vblk.backing import check_backing
    try:
        if (spec is None) == (blk_file is None):
            raise ConfigError("give the image as SPEC or as --blk-file PATH (exactly one)")
        flags = dict(readonly=readonly, writeback=writeback, nocache=nocache,
                     sectorsize=sectorsize, range_=range_, serial=serial, num_queues=num_queues,
                     discard=discard, discard_limits=discard_limits)
        disk = (disk_options(spec, **flags) if blk_file is None
                else merge_flags(DiskOptions(path=blk_file), **flags))
        if socket_path is None and fd is None:
            fd = ops.activated_socket()
        config = ServeConfig(disk=disk, socket_path=socket_path, listen_fd=fd, workers=workers,
                             control_socket=control_socket, metrics_listen=metrics_listen,
                             queue_size=queue_size, log_level=log_level.upper(),
                             socket_mode=parse_socket_mode(socket_mode),
                             socket_group=check_group(socket_group),
                             limits=parse_limits(iops=iops_limit, bps=bps_limit,
                                                 iops_burst=iops_burst, bps_burst=bps_burst),
                             incoming=incoming)
        ops.check_ops_flags(control_socket, metrics_listen, socket_path)
        check_backing(disk, lock=not incoming)
        if config.socket_path is not None:
            check_unix_socket_path(config.socket_path)
        else:
            check_listen_fd(config.listen_fd)
    except ConfigError as e:
        raise fail(str(e)) from None
    from vblk.daemon import exec_serve
    exec_serve(config)                  # the same process, without the CLI's imports


@app.command()
def info(
    spec: str = Spec,
    readonly: Optional[bool] = ReadOnly,
    writeback: Optional[bool] = Writeback,
    nocache: Optional[bool] = NoCache,
    sectorsize: Optional[str] = SectorSize,
    range_: Optional[str] = Range,
    serial: Optional[str] = Serial,
    num_queues: Optional[int] = NumQueues,
    discard: Optional[bool] = Discard,
    discard_limits: Optional[str] = DiscardLimits,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the same fields, in bytes "
                                                       "and sectors)."),
) -> None:
    """Show the disk a guest would see for SPEC, without serving it or writing anything."""
    from vblk.backing import check_backing
    try:
        disk = disk_options(spec, readonly=readonly, writeback=writeback, nocache=nocache,
                            sectorsize=sectorsize, range_=range_, serial=serial,
                            num_queues=num_queues, discard=discard,
                            discard_limits=discard_limits)
        b = check_backing(disk)
    except ConfigError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(info_fields(disk, b), sort_keys=True))
        return
    rows = info_rows(disk, b)
    width = max(len(k) for k, _ in rows) + 1
    for key, value in rows:
        typer.echo(f"{key + ':':<{width}} {value}")


def info_rows(disk: DiskOptions, b) -> list[tuple[str, str]]:
    """``vblk info``'s table: what the guest would see, one row per property."""
    if disk.range_start or disk.range_size is not None:
        window = f"bytes {b.start}..{b.end} of the image"
    elif b.size < b.image_size:
        window = (f"whole image (its last {b.image_size - b.size} bytes are not a whole block "
                  f"and are not served)")
    else:
        window = "whole image"
    return [
        ("image", f"{b.path} ({b.kind}, {b.image_size} bytes)"),
        ("capacity", f"{b.capacity_sectors} sectors of 512 bytes ({b.size} bytes)"),
        ("logical block size", str(b.logical_block_size)),
        ("physical block size", str(b.physical_block_size)),
        ("read-only", "yes" if b.readonly else "no"),
        ("cache", disk.cache_mode + (", O_DIRECT (nocache)" if b.nocache else "")),
        ("range", window),
        ("queues", str(disk.num_queues)),
        ("serial", b.serial_text),
        ("discard", discard_text(disk, b)),
        ("write-zeroes", "no (read-only)" if b.readonly else
         f"yes, up to {WRITE_ZEROES_MAX_SECTORS} sectors x {WRITE_ZEROES_MAX_SEG} segment"
         + (", may unmap" if disk.discard is not None else "")),
    ]


def info_fields(disk: DiskOptions, b) -> dict:
    """``vblk info --json``: the table's facts as numbers and booleans (null: off)."""
    d = disk.discard
    discard = None
    if d is not None and not b.readonly:
        discard = {"max_sectors": d.max_sectors if d.max_sectors is not None
                   else default_max_discard_sectors(b.size),
                   "max_segments": d.max_segments, "alignment_sectors": d.alignment}
    return {
        "image": b.path, "kind": b.kind, "image_bytes": b.image_size,
        "capacity_bytes": b.size, "capacity_sectors": b.capacity_sectors,
        "logical_block_size": b.logical_block_size,
        "physical_block_size": b.physical_block_size,
        "read_only": bool(b.readonly), "cache": disk.cache_mode,
        "nocache": bool(b.nocache), "window": {"start": b.start, "end": b.end},
        "queues": disk.num_queues, "serial": b.serial_text, "discard": discard,
        "write_zeroes": None if b.readonly else {
            "max_sectors": WRITE_ZEROES_MAX_SECTORS, "max_segments": WRITE_ZEROES_MAX_SEG,
            "may_unmap": disk.discard is not None},
    }


def discard_text(disk: DiskOptions, b) -> str:
    d = disk.discard
    if d is None:
        return "off"
    if b.readonly:
        return "off (read-only)"
    max_sectors = d.max_sectors if d.max_sectors is not None else default_max_discard_sectors(b.size)
    return (f"on, up to {max_sectors} sectors x {d.max_segments} segments per request, "
            f"alignment {d.alignment or 'none'}")


app.command("demo")(demo_command)
app.command()(ops.stats)
app.command()(ops.resize)
app.command()(ops.limit)
app.command("bench")(bench_command)


def main() -> None:
    """Console-script entry point (``vblk``) and ``python -m vblk.cli``."""
    run(app, "vblk")
