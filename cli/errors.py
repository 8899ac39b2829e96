"""How a vblk command ends with an error: one line on stderr, then its exit status."""
from __future__ import annotations

import sys

import typer

from vblk.errors import EXIT_USAGE


def fail(message: str, status: int = EXIT_USAGE) -> typer.Exit:
    """Print ``vblk: error: <message>`` on stderr and return the Exit to raise."""
    print(f"vblk: error: {message}", file=sys.stderr, flush=True)
    return typer.Exit(status)
