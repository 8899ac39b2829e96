"""``vblk serve`` and the options it shares with ``vblk info`` (the disk's description).

The same ``serve`` is the whole of ``vblk-vhost-user-blk``, the backend program QEMU's
vhost-user conventions describe (``vblk.cli.backend``): ``--socket-path``/``--fd``,
``--blk-file``, ``--read-only`` and ``--print-capabilities`` are its options too.
"""
from __future__ import annotations

import grp
from typing import Optional

import typer

from vblk.cli import ops
from vblk.cli.errors import fail
from vblk.cli.spellings import cache_writeback, either, warn
from vblk.control import check_unix_socket_path
from vblk.errors import ConfigError
from vblk.listening import check_listen_fd
from vblk.options import (
    DEFAULT_SLOTS,
    DiskOptions,
    ServeConfig,
    merge_flags,
    parse_acrn,
    parse_limits,
    parse_socket_mode,
)

SPEC_HELP = ("The image path, or an ACRN option string "
             "'[iothread,][mq=1,]PATH[,writeback|writethru][,ro][,nocache][,discard[=A:B:C]]"
             "[,sectorsize=L[/P]][,range=START/COUNT]' (range in logical sectors).")

# -- the disk: options shared by serve and info ---------------------------------------------
Spec = typer.Argument(..., metavar="SPEC", help=SPEC_HELP, show_default=False)
ReadOnly = typer.Option(None, "--ro", "--read-only", help="Serve read-only (ACRN: ro).",
                        show_default=False)
Cache = typer.Option(None, "--cache", metavar="MODE",
                     help="Initial cache mode: writethrough (the default; ACRN: writethru) or "
                          "writeback (ACRN: writeback). The guest can switch it.",
                     show_default=False)
OldWriteback = typer.Option(None, "--writeback/--writethru", hidden=True, show_default=False)
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
Serial = typer.Option(None, "--serial", metavar="S",
                      help="Serial number the guest reads (≤ 20 ASCII chars; default derived "
                           "from the image).")

# -- serve's own ------------------------------------------------------------------------------
OptionalSpec = typer.Argument(None, metavar="[SPEC]", show_default=False,
                              help=SPEC_HELP + " Or give the image as --blk-file.")
BlkFile = typer.Option(None, "--blk-file", metavar="PATH",
                       help="The image path, instead of SPEC (vhost-user backend convention).")
SocketPath = typer.Option(None, "--socket-path", metavar="PATH",
                          help="Listen on a new Unix socket here.")
SocketMode = typer.Option("0600", "--socket-mode", metavar="MODE",
                          help="Permissions of the socket vblk creates (octal).")
SocketGroup = typer.Option(None, "--socket-group", metavar="GROUP",
                           help="Group of the socket vblk creates (e.g. the one QEMU runs as).")
Fd = typer.Option(None, "--fd", metavar="N",
                  help="Listen on this inherited listening socket instead.")
Workers = typer.Option(None, "--workers", metavar="N",
                       help="I/O worker processes, 1..64 (default 8).")
PollUs = typer.Option(None, "--poll-us", metavar="US",
                      help="The longest time the loop polls the rings after activity instead of "
                           "sleeping, 0..10000 microseconds (default 50; 0: never). Longer "
                           "catches a slow guest's next request without a wake-up, at the cost "
                           "of a CPU while it polls. With --config: every disk's.")
ConfigFile = typer.Option(None, "--config", metavar="FILE",
                          help="Serve every [[disk]] of this TOML file from one process tree "
                               "(see the README).")
Slots = typer.Option(None, "--slots", metavar="N", show_default=False,
                     help=f"Request slots: requests in flight over all queues, a power of two "
                          f"(default {DEFAULT_SLOTS}). Not QEMU's queue-size, the ring size.")
OldQueueSize = typer.Option(None, "--queue-size", hidden=True)
LogLevel = typer.Option("info", "--log-level", metavar="LEVEL",
                        help="debug, info, warning or error.")
ControlSocket = typer.Option(None, "--control-socket", metavar="PATH",
                             help="Control socket for vblk stats (default: the listening "
                                  "socket's path + .ctl).")
MetricsListen = typer.Option(None, "--metrics-listen", metavar="HOST:PORT",
                             help="Serve Prometheus metrics over HTTP here.")
IopsLimit = typer.Option(None, "--iops-limit", metavar="N",
                         help="At most N requests (reads, writes, flushes) per second over all "
                              "queues; 0 = unlimited (default). Changeable with vblk limit.")
BpsLimit = typer.Option(None, "--bps-limit", metavar="SIZE",
                        help="At most SIZE bytes read+written per second, K/M/G suffixes "
                             "(1024-based); 0 = unlimited.")
IopsBurst = typer.Option(None, "--iops-burst", metavar="N",
                         help="Requests an idle device may take at once (default: 0.1 s of "
                              "--iops-limit).")
BpsBurst = typer.Option(None, "--bps-burst", metavar="SIZE",
                        help="Bytes an idle device may move at once (default: 0.1 s of "
                             "--bps-limit).")
Incoming = typer.Option(False, "--incoming",
                        help="Serve the destination of a live migration: open the image while "
                             "the source vblk still serves it, and take its lock only when the "
                             "guest's rings start here (after the source gave it up).")
Check = typer.Option(False, "--check",
                     help="Check everything serving would (options, images and their locks, "
                          "socket paths; with --config every disk of FILE), say what would be "
                          "served, and exit without serving: 0 if it would start, 2 if not.")
PrintCapabilities = typer.Option(False, "--print-capabilities", is_eager=True,
                                 callback=ops.print_capabilities,
                                 help="Print the vhost-user backend capabilities (JSON) and exit.")


def disk_options(spec: str | None, *, blk_file: str | None = None, readonly: Optional[bool],
                 cache: Optional[str], old_writeback: Optional[bool], nocache: Optional[bool],
                 sectorsize: Optional[str], range_: Optional[str], serial: Optional[str],
                 num_queues: Optional[int] = None, discard: Optional[bool] = None,
                 discard_limits: Optional[str] = None) -> DiskOptions:
    """The disk from SPEC (an ACRN string) or --blk-file (a path), and the flags over it."""
    if (spec is None) == (blk_file is None):
        raise ConfigError("give the image as SPEC or as --blk-file PATH (exactly one)")
    opts = parse_acrn(spec) if blk_file is None else DiskOptions(path=blk_file)
    return merge_flags(opts, readonly=readonly, writeback=cache_writeback(cache, old_writeback),
                       nocache=nocache, sectorsize=sectorsize, range_=range_, serial=serial,
                       num_queues=num_queues, discard=discard, discard_limits=discard_limits)


def check_group(name: str | None) -> str | None:
    if name is not None:
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(f"--socket-group {name!r}: no such group") from None
    return name


def serve(
    spec: Optional[str] = OptionalSpec,
    config_file: Optional[str] = ConfigFile,
    blk_file: Optional[str] = BlkFile,
    socket_path: Optional[str] = SocketPath,
    socket_mode: str = SocketMode,
    socket_group: Optional[str] = SocketGroup,
    fd: Optional[int] = Fd,
    readonly: Optional[bool] = ReadOnly,
    cache: Optional[str] = Cache,
    old_writeback: Optional[bool] = OldWriteback,
    nocache: Optional[bool] = NoCache,
    sectorsize: Optional[str] = SectorSize,
    range_: Optional[str] = Range,
    serial: Optional[str] = Serial,
    num_queues: Optional[int] = NumQueues,
    discard: Optional[bool] = Discard,
    discard_limits: Optional[str] = DiscardLimits,
    workers: Optional[int] = Workers,
    poll_us: Optional[int] = PollUs,
    slots: Optional[int] = Slots,
    old_queue_size: Optional[int] = OldQueueSize,
    log_level: str = LogLevel,
    control_socket: Optional[str] = ControlSocket,
    metrics_listen: Optional[str] = MetricsListen,
    iops_limit: Optional[str] = IopsLimit,
    bps_limit: Optional[str] = BpsLimit,
    iops_burst: Optional[str] = IopsBurst,
    bps_burst: Optional[str] = BpsBurst,
    incoming: bool = Incoming,
    check: bool = Check,
    print_capabilities: bool = PrintCapabilities,
) -> None:
    """Serve SPEC to one vhost-user frontend at a time until SIGTERM or SIGINT.

    Without --socket-path or --fd, listens on the socket systemd passes (LISTEN_FDS)."""
    from vblk.backing import check_backing
    if config_file is not None:
        return serve_host(config_file, workers, log_level, check,
                          {k: v for k, v in locals().items() if k not in HOST_FLAGS},
                          poll_us=poll_us)
    workers = 8 if workers is None else workers
    slots = either("--slots", slots, "--queue-size", old_queue_size)
    try:
        disk = disk_options(spec, blk_file=blk_file, readonly=readonly, cache=cache,
                            old_writeback=old_writeback, nocache=nocache, sectorsize=sectorsize,
                            range_=range_, serial=serial, num_queues=num_queues, discard=discard,
                            discard_limits=discard_limits)
        if socket_path is None and fd is None:
            fd = ops.activated_socket()
        config = ServeConfig(disk=disk, socket_path=socket_path, listen_fd=fd, workers=workers,
                             control_socket=control_socket, metrics_listen=metrics_listen,
                             slots=DEFAULT_SLOTS if slots is None else slots,
                             log_level=log_level.upper(),
                             socket_mode=parse_socket_mode(socket_mode),
                             socket_group=check_group(socket_group),
                             limits=parse_limits(iops=iops_limit, bps=bps_limit,
                                                 iops_burst=iops_burst, bps_burst=bps_burst),
                             incoming=incoming, poll_us=poll_us)
        ops.check_ops_flags(control_socket, metrics_listen, socket_path)
        check_backing(disk, lock=not incoming)
        if config.socket_path is not None:
            check_unix_socket_path(config.socket_path)
        else:
            check_listen_fd(config.listen_fd)
    except ConfigError as e:
        raise fail(str(e)) from None
    if check:
        typer.echo(f"ok: would serve {disk.path} on "
                   f"{config.socket_path or f'fd {config.listen_fd}'} ({workers} workers)")
        return
    from vblk.daemon import exec_serve
    exec_serve(config)                  # the same process, without the CLI's imports


HOST_FLAGS = {"config_file", "workers", "log_level", "check", "check_backing",
              "print_capabilities", "poll_us"}
_FLAG_DEFAULTS = {"incoming": False, "socket_mode": "0600"}


def serve_host(path: str, workers: Optional[int], log_level: str, check: bool,
               others: dict, poll_us: Optional[int] = None) -> None:
    """``vblk serve --config FILE``: every disk of FILE checked, then served by one vblk.
    ``--workers``, ``--log-level`` and ``--poll-us`` override the file's; a disk's own flags
    belong in it."""
    from dataclasses import replace

    from vblk.hostconfig import check_host_config, check_host_values, load_host_config
    from vblk.options import check_poll_us
    try:
        given = [k for k, v in others.items() if v is not None and v != _FLAG_DEFAULTS.get(k)]
        if given:
            name = given[0].removeprefix("old_")
            flag = "SPEC" if name == "spec" else "--" + name.rstrip("_").replace("_", "-")
            raise ConfigError(f"{flag} cannot be combined with --config: each disk's settings "
                              f"go in its [[disk]] table")
        host = load_host_config(path)
        for line in host.warnings:
            warn(line)
        changes = {}
        if workers is not None:
            changes["workers"] = workers
        if log_level != "info":
            changes["log_level"] = log_level.upper()
        if poll_us is not None:
            check_poll_us(poll_us, "--poll-us")
            changes["poll_us"] = poll_us
        if changes:
            host = replace(host, **changes)
            check_host_values(host.workers, host.log_level, "")
        check_host_config(host, where=path)
    except ConfigError as e:
        raise fail(str(e)) from None
    if check:
        typer.echo(f"ok: {path}: would serve {len(host.disks)} disk"
                   f"{'s' * (len(host.disks) != 1)} with {host.workers} workers")
        for number, entry in enumerate(host.disks, 1):
            typer.echo(f"  disk {number} ({entry.name}): {entry.serve.disk.path} on "
                       f"{entry.serve.socket_path}")
        return
    from vblk.daemon import exec_serve
    exec_serve(host)
