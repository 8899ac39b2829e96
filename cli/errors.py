"""How a vblk command ends with an error: one line on stderr, then its exit status.

``fail`` is for the commands' own refusals; ``run`` runs a typer app so that click's usage
errors (an unknown option, a missing argument, a value of the wrong type) end the same way,
``vblk: error: <message> (see 'vblk serve --help')`` and status 2, instead of click's three
lines."""
from __future__ import annotations

import sys
from typing import NoReturn

import typer

from vblk.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE


def error_line(message: str) -> None:
    """Print ``vblk: error: <message>`` on stderr."""
    print(f"vblk: error: {message}", file=sys.stderr, flush=True)


def fail(message: str, status: int = EXIT_USAGE) -> typer.Exit:
    """Print ``vblk: error: <message>`` on stderr and return the Exit to raise."""
    error_line(message)
    return typer.Exit(status)


def usage_message(exc: typer.TyperException) -> str:
    """click's message for ``exc`` as one line, with where to read the usage."""
    text = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if getattr(exc, "exit_code", None) == EXIT_USAGE and ctx is not None:
        text = f"{text.rstrip('.')} (see '{ctx.command_path} --help')"
    return text


def run(app: typer.Typer, prog_name: str, args: list[str] | None = None) -> NoReturn:
    """Run ``app`` as a console script; exits with its status."""
    try:
        status = app(prog_name=prog_name, args=args, standalone_mode=False)
    except typer.TyperException as exc:     # typer's click: ClickException, UsageError and kin
        if type(exc).__name__ == "NoArgsIsHelpError":          # bare ``vblk``: the help
            print(exc.format_message(), file=sys.stderr)
            status = EXIT_USAGE
        else:
            error_line(usage_message(exc))
            status = getattr(exc, "exit_code", EXIT_FAILED) or EXIT_FAILED
    except typer.Abort:
        error_line("interrupted")
        status = EXIT_INTERRUPTED
    sys.exit(status if isinstance(status, int) else EXIT_OK)
