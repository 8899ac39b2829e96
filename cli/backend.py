"""``vblk-vhost-user-blk``: vblk as the backend program QEMU's vhost-user conventions describe
(docs/interop/vhost-user.rst, "Backend program conventions").

Management software runs the ``binary`` of a descriptor (``vblk install vhost-user``) with
conventional options and no subcommand: ``--socket-path=PATH`` or ``--fd=FDNUM``,
``--print-capabilities``, and for block devices ``--blk-file=PATH`` and ``--read-only``. This
program is ``vblk serve`` with nothing before its options, so all of them are there (and
every other ``serve`` option too); ``vblk`` itself keeps its subcommands."""
from __future__ import annotations

import sys

import typer

from vblk.cli.errors import run
from vblk.cli.ops import capabilities_first
from vblk.cli.serve import serve

backend_app = typer.Typer(name="vblk-vhost-user-blk", add_completion=False,
                          rich_markup_mode=None, pretty_exceptions_enable=False)
backend_app.command()(serve)


def main() -> None:
    """Console-script entry point (``vblk-vhost-user-blk``)."""
    capabilities_first(sys.argv[1:])
    run(backend_app, "vblk-vhost-user-blk")
