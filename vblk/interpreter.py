"""How vblk starts Python: the one command line for every child interpreter it runs.

vblk runs as root, often from a directory it does not own (a unit's WorkingDirectory, an
operator's shell in /tmp). ``python -m X`` puts the current directory first on ``sys.path``:
a ``workers.py``, ``socket.py``, ``msgpack.py`` or ``vblk/`` lying there would run, as root,
instead of vblk's own code. So every child -- the daemon ``vblk serve`` execs into, the worker
processes, the servers ``vblk bench`` and ``vblk demo`` start -- runs

    sys.executable -I -m vblk.<module> ...

``-I`` (isolated mode) is ``-P -E -s``, and each part is wanted:

* ``-P``: nothing from the current directory (or the script's) is importable;
* ``-E``: ``PYTHONPATH``, ``PYTHONHOME``, ``PYTHONSTARTUP``, ``PYTHONINSPECT`` ... of the
  caller's environment are ignored: ``sudo -E vblk serve`` or an ``Environment=`` line must not
  choose the code a root daemon runs (vblk's own ``VBLK_*`` settings are read by vblk, not by
  the interpreter, and still apply);
* ``-s``: no user site-packages (``~/.local``).

A child therefore imports exactly what the interpreter's own site-packages hold, which is where
``pip install`` (and ``pip install -e``, through its import hook) puts vblk. ``vblk serve``
passes the directory its own ``vblk`` came from to the daemon, which refuses to serve when it
found a different one (``same_origin``): a vblk run from a source tree that is not installed
into this interpreter fails with one line instead of serving a mix of two versions.
"""
from __future__ import annotations

import os
import sys

import vblk

ISOLATED = ("-I",)


def python_command(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module args...`` in isolated mode with this interpreter."""
    return [sys.executable, *ISOLATED, "-m", module, *args]


def origin() -> str:
    """The directory this process's ``vblk`` package was imported from."""
    return os.path.dirname(os.path.realpath(vblk.__file__))


def same_origin(expected: str) -> str | None:
    """None if this process's vblk comes from ``expected``; else why not, in one line."""
    here = origin()
    if here == expected:
        return None
    return (f"the vblk command ran vblk from {expected}, but this interpreter's site-packages "
            f"hold {here}: install vblk into {sys.executable} (pip install .)")
