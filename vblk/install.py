"""What ``vblk install`` writes: the systemd units and QEMU's vhost-user backend descriptor,
each pointing at this installation of vblk by absolute path.

The units -- ``vblk@.service`` + ``vblk@.socket`` (one vblk per disk) and ``vblk-host.service``
(one vblk for every disk of ``/etc/vblk/host.toml``) -- and the descriptor ship inside the
package (``vblk/data``, the only copy) with the paths of a root ``pip install`` into Debian's
Python (``/usr/local/bin``). ``vblk install`` rewrites them for the vblk that runs it -- a
venv, ``pipx``, an editable checkout, a pyenv interpreter -- each service the same way:

* its ``ExecStart=`` runs this vblk's console script (the one beside the running
  ``vblk``, or in this interpreter's scripts directory), or, with no script,
  ``PYTHON -I -m vblk.cli`` with this interpreter;
* it keeps ``ProtectHome=yes`` unless something this vblk needs lives under ``/home``,
  ``/root`` or ``/run/user`` (the interpreter, the venv, the source of an editable install):
  then ``ProtectHome=tmpfs`` (those trees are empty in the service's view) plus one
  ``BindReadOnlyPaths=`` per directory needed, so the service still sees nothing else there;
* the descriptor's ``binary`` is the absolute path of the ``vblk-vhost-user-blk`` script.

Sans I/O where it can be: ``render_*`` take the paths and return text; only the ``find_*`` and
``runtime_dirs`` helpers look at this process and the file system.
"""
from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import vblk
from vblk.errors import ConfigError

SERVICE, SOCKET, HOST_SERVICE = "vblk@.service", "vblk@.socket", "vblk-host.service"
UNITS = (SERVICE, SOCKET, HOST_SERVICE)     # vblk/data/systemd: one disk each, or every disk
DESCRIPTOR = "50-vblk.json"
BACKEND_SCRIPT = "vblk-vhost-user-blk"
SHIPPED_VBLK = "/usr/local/bin/vblk"
# What ProtectHome=yes hides (systemd.exec(5)).
HIDDEN_BY_PROTECT_HOME = ("/home", "/root", "/run/user")


def shipped(*parts: str) -> str:
    """A file of ``vblk/data`` as text."""
    return resources.files(vblk).joinpath("data", *parts).read_text()


def find_script(name: str) -> Path | None:
    """This installation's console script ``name``: beside the running ``vblk`` script, else in
    this interpreter's scripts directory; None if neither has it."""
    dirs = []
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name.startswith("vblk") and argv0.is_file():
        dirs.append(argv0.absolute().parent)
    dirs.append(Path(sysconfig.get_path("scripts")))
    for d in dirs:
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def vblk_command() -> list[str]:
    """The absolute command that runs this vblk: its console script, or this interpreter."""
    script = find_script("vblk")
    if script is not None:
        return [str(script)]
    return [os.path.realpath(sys.executable), "-I", "-m", "vblk.cli"]


def runtime_dirs(command: list[str]) -> list[str]:
    """The directories the service must be able to read to run ``command``: the script and
    the interpreter in its shebang, this interpreter's prefixes and site-packages, and where
    vblk's packages are (an editable install's source tree)."""
    import vblk.cli
    import vblk.workers
    paths = [os.path.dirname(os.path.realpath(command[0])), os.path.dirname(command[0])]
    shebang = _shebang(command[0])
    if shebang:
        paths += [os.path.dirname(shebang), os.path.dirname(os.path.realpath(shebang))]
    paths += [sys.prefix, sys.base_prefix, sysconfig.get_path("purelib"),
              sysconfig.get_path("platlib")]
    paths += [os.path.dirname(os.path.dirname(os.path.realpath(p.__file__)))
              for p in (vblk, vblk.cli, vblk.workers)]
    return _outermost(os.path.realpath(p) for p in paths)


def _shebang(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    match = re.match(rb"#!\s*(\S+)", first)
    return match.group(1).decode(errors="replace") if match else None


def _outermost(paths) -> list[str]:
    """The paths, without duplicates and without those inside another one, sorted."""
    out: list[str] = []
    for p in sorted(set(paths), key=len):
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return sorted(out)


def hidden_by_protect_home(dirs: list[str]) -> list[str]:
    """Those of ``dirs`` that ProtectHome=yes would hide from the service."""
    return [d for d in dirs
            if any(d == h or d.startswith(h + "/") for h in HIDDEN_BY_PROTECT_HOME)]


def _unit_word(word: str) -> str:
    """One ExecStart= word: quoted when it has to be; a literal % is %% in a unit file."""
    word = word.replace("%", "%%")
    if re.search(r'[\s"\'\\;$]', word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


@dataclass(frozen=True)
class Units:
    """The unit files as text (file name -> text), and the directories bound into the
    sandbox (if any)."""
    files: dict[str, str]
    bound: tuple[str, ...]

    @property
    def service(self) -> str:
        return self.files[SERVICE]

    @property
    def socket(self) -> str:
        return self.files[SOCKET]

    @property
    def host(self) -> str:
        return self.files[HOST_SERVICE]


def render_units(command: list[str], bind: list[str]) -> Units:
    """The shipped units, each service's ExecStart= running ``command`` and, if ``bind`` is not
    empty, ProtectHome=tmpfs with those directories bound read-only."""
    files = {name: shipped("systemd", name) for name in UNITS}
    for name in (SERVICE, HOST_SERVICE):
        files[name] = render_service(name, files[name], command, bind)
    return Units(files, tuple(bind))


def render_service(name: str, text: str, command: list[str], bind: list[str]) -> str:
    """One shipped service (``name`` its file name, for errors) rewritten as ``render_units``
    says."""
    exec_start = " ".join(_unit_word(w) for w in command)
    text, n = re.subn(rf"^ExecStart={re.escape(SHIPPED_VBLK)} ", lambda _: f"ExecStart={exec_start} ",
                      text, flags=re.M)
    if n != 1:
        raise ConfigError(f"the shipped {name} has no ExecStart= to rewrite")
    if bind:
        lines = ["# vblk lives under a directory ProtectHome=yes would hide: those trees are",
                 "# empty for the service except what vblk needs, bound read-only.",
                 "ProtectHome=tmpfs"] + [f"BindReadOnlyPaths={_unit_word(d)}" for d in bind]
        text, n = re.subn(r"^ProtectHome=yes$", lambda _: "\n".join(lines), text, flags=re.M)
        if n != 1:
            raise ConfigError(f"the shipped {name} has no ProtectHome=yes to widen")
    return text


def render_descriptor(binary: str) -> str:
    """QEMU's vhost-user backend descriptor (docs/interop/vhost-user.json, VhostUserBackend)
    naming ``binary``, which must be absolute."""
    if not os.path.isabs(binary):
        raise ConfigError(f"the backend binary {binary} is not an absolute path")
    descriptor = json.loads(shipped("vhost-user", DESCRIPTOR))
    descriptor["binary"] = binary
    return json.dumps(descriptor, indent=2) + "\n"


def write_files(directory: str, files: dict[str, str]) -> list[str]:
    """Write ``files`` (name -> text, mode 0644) into ``directory``, which must exist; the
    paths written. ConfigError, before writing anything, if it cannot."""
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} is not a directory (create it first)")
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{directory} is not writable (run as root?)")
    written = []
    for name, text in files.items():
        path = os.path.join(directory, name)
        tmp = f"{path}.vblk-new"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written
