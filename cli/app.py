"""``vblk``: the command line (typer).  ``serve`` a disk (``serve``) or show its ``info``
(here); the operator's ``stats``, ``resize`` and ``limit`` (``ops``); ``disk add`` and ``disk
remove`` (``disk``); ``bench`` and ``demo`` (``lab``).

Every command validates everything first (the option string, the flags, the image, its range
and lock, the socket path) and only then creates or opens anything for writing.  A bad input
ends the command with one line, ``vblk: error: <message>``, on stderr and exit status 2, the
same status click gives a usage error.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

import vblk
from vblk.cli import ops
from vblk.cli.disk import disk_app
from vblk.cli.errors import fail, run
from vblk.cli.install import install_app
from vblk.cli.lab import bench_command, demo_command
from vblk.cli.serve import (
    Cache,
    Discard,
    DiscardLimits,
    NoCache,
    NumQueues,
    OldWriteback,
    Range,
    ReadOnly,
    SectorSize,
    Serial,
    Spec,
    disk_options,
    serve,
)
from vblk.device import WRITE_ZEROES_MAX_SECTORS, WRITE_ZEROES_MAX_SEG
from vblk.errors import ConfigError
from vblk.options import DiskOptions, default_max_discard_sectors

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

app.command()(serve)


@app.command()
def info(
    spec: str = Spec,
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
    as_json: bool = typer.Option(False, "--json", help="Print JSON (the same fields, in bytes "
                                                       "and sectors)."),
) -> None:
    """Show the disk a guest would see for SPEC, without serving it or writing anything."""
    from vblk.backing import check_backing
    try:
        disk = disk_options(spec, readonly=readonly, cache=cache, old_writeback=old_writeback,
                            nocache=nocache, sectorsize=sectorsize, range_=range_,
                            serial=serial, num_queues=num_queues, discard=discard,
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
app.add_typer(install_app)
app.add_typer(disk_app)


def main() -> None:
    """Console-script entry point (``vblk``) and ``python -m vblk.cli``."""
    if sys.argv[1:2] == ["serve"]:
        ops.capabilities_first(sys.argv[2:])
    run(app, "vblk")
