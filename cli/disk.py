"""``vblk disk add`` and ``vblk disk remove``: change the disks a running ``vblk serve --config``
serves, over its host control socket (``control-socket`` in the config).

``add FILE``: FILE holds one ``[[disk]]`` table with the keys a config's ``[[disk]]`` takes
(vblk.hostconfig). The running vblk checks it by the config's rules against the disks it
serves, then serves it; a refused disk changes nothing. ``remove NAME`` stops serving a disk
and gives back its socket, image lock and slots; while a frontend is connected it is refused
unless ``--force`` (the frontend's requests in flight complete, then it is disconnected).
Neither rewrites the config: a change lasts until vblk restarts (vblk.supervisor.host).

Exit status: 0 done, 1 vblk cannot be reached, 2 bad usage or refused by vblk (nothing
changed).
"""
from __future__ import annotations

import json

import typer

from vblk.cli.errors import fail
from vblk.cli.ops import ask
from vblk.cli.spellings import warn
from vblk.errors import ConfigError

disk_app = typer.Typer(name="disk", no_args_is_help=True, rich_markup_mode=None,
                       help="Add or remove a disk of a running 'vblk serve --config', over its "
                            "control-socket (the config file is not changed).")

HostControl = typer.Option(..., "--control-socket", metavar="PATH", show_default=False,
                           help="The host's control socket (control-socket in its config).")
# A forced remove waits up to 60 s for requests in flight (vblk.supervisor.queues).
Timeout = typer.Option(75.0, "--timeout", metavar="SECONDS",
                       help="How long to wait for vblk's answer.")
Json = typer.Option(False, "--json", help="Print vblk's answer as JSON.")


@disk_app.command("add")
def add(
    file: str = typer.Argument(..., metavar="FILE", show_default=False,
                               help="A TOML file holding one [[disk]] table, as in the config "
                                    "(absolute paths)."),
    control_socket: str = HostControl,
    timeout: float = Timeout,
    as_json: bool = Json,
) -> None:
    """Serve one more disk: checked against the served ones as the config is; a refused disk
    changes nothing."""
    from vblk.hostconfig import load_disk_file
    try:
        table = load_disk_file(file)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    answer = _ask(control_socket, {"op": "disk-add", "disk": table, "where": file}, timeout)
    for line in answer.get("warnings", ()):
        warn(line)
    if as_json:
        typer.echo(json.dumps(answer, sort_keys=True))
        return
    base, count = answer["slots"]
    typer.echo(f"added disk {answer['disk']} (disk {answer['number']}): listening on "
               f"{answer['socket']}, control {answer['control']}, slots {base}..{base + count - 1}")


@disk_app.command("remove")
def remove(
    name: str = typer.Argument(..., metavar="NAME", show_default=False,
                               help="The disk's name (as vblk stats shows it)."),
    control_socket: str = HostControl,
    force: bool = typer.Option(False, "--force",
                               help="Remove it even with a frontend connected: its requests in "
                                    "flight complete, then it is disconnected."),
    timeout: float = Timeout,
    as_json: bool = Json,
) -> None:
    """Stop serving a disk: its socket, image lock and slots are given back."""
    answer = _ask(control_socket, {"op": "disk-remove", "name": name, "force": force}, timeout)
    if as_json:
        typer.echo(json.dumps(answer, sort_keys=True))
        return
    frontend = (f"frontend disconnected after {answer['completed']} requests in flight "
                f"completed" if answer["frontend_dropped"] else "no frontend was connected")
    if answer["still_in_flight"]:
        frontend += f"; {answer['still_in_flight']} requests did not complete in time"
    typer.echo(f"removed disk {answer['disk']} ({frontend})")


def _ask(path: str, message: dict, timeout: float) -> dict:
    """vblk's answer (vblk.cli.ops.ask), a per-disk control socket's refusal said plainly."""
    def refused(error: str) -> str:
        if error.startswith("unknown op"):
            return f"{path} is not the control socket of a vblk serve --config ({error})"
        return error
    return ask(path, message, timeout, refused=refused)
