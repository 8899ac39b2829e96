"""``vblk install systemd`` and ``vblk install vhost-user``: write the units and QEMU's
backend descriptor for this installation of vblk (``vblk.install`` says what is rewritten)."""
from __future__ import annotations

import sys
from typing import Optional

import typer

from vblk.cli.errors import fail
from vblk.errors import ConfigError

install_app = typer.Typer(name="install", no_args_is_help=True, rich_markup_mode=None,
                          help="Install the systemd units or QEMU's vhost-user backend "
                               "descriptor for this vblk (absolute paths of this install).")

SYSTEMD_DIR = "/etc/systemd/system"
# vhost-user.json: /usr/share/qemu/vhost-user is the distributions' packages', and
# /etc/qemu/vhost-user "exclusively for sysadmins' local additions" -- a pip install is one.
VHOST_USER_DIR = "/etc/qemu/vhost-user"


@install_app.command("systemd")
def install_systemd(
    directory: str = typer.Option(SYSTEMD_DIR, "--dir", metavar="DIR",
                                  help="Where to write vblk@.service, vblk@.socket and "
                                       "vblk-host.service."),
    vblk_path: Optional[str] = typer.Option(None, "--vblk", metavar="PATH",
                                            help="The vblk the units run (default: this one, "
                                                 "by absolute path)."),
) -> None:
    """Write vblk@.service + vblk@.socket (one vblk per disk) and vblk-host.service (one vblk
    for every disk of /etc/vblk/host.toml), ExecStart= pointing at this vblk; if it lives
    under /home, /root or /run/user the sandbox binds exactly what it needs read-only."""
    from vblk import install
    try:
        command = [vblk_path] if vblk_path is not None else install.vblk_command()
        if not command[0].startswith("/"):
            raise ConfigError(f"--vblk {vblk_path}: give an absolute path")
        bind = install.hidden_by_protect_home(install.runtime_dirs(command))
        units = install.render_units(command, bind)
        written = install.write_files(directory, units.files)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if units.bound:
        print(f"vblk: warning: this vblk needs {', '.join(units.bound)}, which ProtectHome=yes "
              f"hides: the units use ProtectHome=tmpfs and bind only that, read-only (install "
              f"vblk outside /home and /root to keep ProtectHome=yes)", file=sys.stderr)
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"ExecStart= runs {' '.join(command)} serve ...\n"
               f"next: mkdir -p /etc/vblk /var/lib/vblk; then either, one vblk per disk: put "
               f"VBLK_DISK=<spec> in /etc/vblk/NAME.conf; systemctl daemon-reload; "
               f"systemctl enable --now vblk@NAME.socket vblk@NAME.service\n"
               f"or, one vblk for every disk: list them in /etc/vblk/host.toml ([[disk]] "
               f"tables); systemctl daemon-reload; systemctl enable --now vblk-host.service")


@install_app.command("vhost-user")
def install_vhost_user(
    directory: str = typer.Option(VHOST_USER_DIR, "--dir", metavar="DIR",
                                  help="Where to write 50-vblk.json (/usr/share/qemu/vhost-user "
                                       "for a distribution's package)."),
    binary: Optional[str] = typer.Option(None, "--binary", metavar="PATH",
                                         help="The backend program it names (default: this "
                                              "install's vblk-vhost-user-blk)."),
) -> None:
    """Write QEMU's vhost-user backend descriptor (type block) naming vblk-vhost-user-blk."""
    from vblk import install
    try:
        if binary is None:
            found = install.find_script(install.BACKEND_SCRIPT)
            if found is None:
                raise ConfigError(f"no {install.BACKEND_SCRIPT} script beside this vblk or in "
                                  f"this interpreter's scripts directory: give --binary PATH")
            binary = str(found)
        written = install.write_files(directory, {install.DESCRIPTOR:
                                                  install.render_descriptor(binary)})
    except ConfigError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {written[0]} (binary {binary})")
