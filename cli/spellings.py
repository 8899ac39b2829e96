"""One spelling per option across vblk's commands, and the old spellings that still work.

The one spellings: the vhost-user socket is ``--socket-path`` (serve, stats, limit, resize,
bench), the rate limits ``--iops-limit``/``--bps-limit`` with ``--iops-burst``/``--bps-burst``
(serve, limit, bench), the cache mode ``--cache writethrough|writeback`` (serve, info, bench;
``vblk info`` and the logs print the same two words), and vblk's request slots ``--slots``
(not ``--queue-size``: QEMU's ``queue-size`` is the ring size).

The old spellings (``--socket``, ``limit --iops/--bps``, ``bench --limit-iops/--limit-bps``,
``--writeback/--writethru``, ``--queue-size``, ``resize INSTANCE SIZE``) are hidden from
``--help`` and still work; each use prints one ``vblk: warning:`` line on stderr naming the
new spelling. Giving both spellings of one option is an error. A ``vblk serve --config`` file
keeps the same rule for its one old key, ``writeback = true|false`` (now ``cache = "MODE"``;
``vblk.hostconfig``).
"""
from __future__ import annotations

import sys
from typing import TypeVar

from vblk.cli.errors import fail
from vblk.options import CACHE_MODES

T = TypeVar("T")


def warn_old(old: str, new: str) -> None:
    """The one line an old spelling costs."""
    warn(f"{old} is deprecated (it still works): use {new}")


def warn(text: str) -> None:
    """One ``vblk: warning:`` line on stderr (a config file's old spellings come as text)."""
    print(f"vblk: warning: {text}", file=sys.stderr, flush=True)


def either(new_name: str, new: T | None, old_name: str, old: T | None) -> T | None:
    """The value of ``new_name``, given as itself or as its old spelling ``old_name``."""
    if old is None:
        return new
    if new is not None:
        raise fail(f"give {new_name} (or its old spelling {old_name}), not both")
    warn_old(old_name, new_name)
    return old


def cache_writeback(cache: str | None, old_flag: bool | None) -> bool | None:
    """``--cache MODE`` (or the old ``--writeback``/``--writethru``) as writeback True/False,
    None if neither was given."""
    if old_flag is not None:
        old_name, old_cache = ("--writeback", "writeback") if old_flag else ("--writethru",
                                                                             "writethrough")
        if cache is not None:
            raise fail(f"give --cache (or its old spelling {old_name}), not both")
        warn_old(old_name, f"--cache {old_cache}")
        cache = old_cache
    if cache is None:
        return None
    if cache not in CACHE_MODES:
        raise fail(f"--cache {cache}: give writethrough or writeback")
    return cache == "writeback"
