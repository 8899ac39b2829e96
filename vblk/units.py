"""Sizes in bytes as the operator writes and reads them: one grammar, one way to show one.

``parse_size`` is the only reader of a size vblk takes (``--range``, ``--bps-limit`` and
``--bps-burst``, ``vblk resize``, ``vblk limit --bps``, and ``vblk bench``'s ``--bs``,
``--size``, ``--offset``, ``--guest-memory``): a whole number of bytes, or one followed
directly by K, M, G or T (powers of 1024), in either case and optionally followed by ``i``,
``B`` or ``iB``; plain bytes may end in ``B``. So ``4096``, ``4096B``, ``64K``, ``64k``,
``64KB``, ``64Ki``, ``64KiB`` and ``64kib`` all read, and ``1.5M``, ``0x10``, ``-1``, ``1P``
and ``4 K`` do not. Whitespace around the whole is ignored.

``format_size`` shows a size for reading (``4.0 KiB``, ``1.5 GiB``, rounded); ``spell_size``
gives the shortest exact spelling ``parse_size`` reads back (``4k``, ``128k``, ``1M``), as
the benchmark's workload labels use it.
"""
from __future__ import annotations

import re

from vblk.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_FACTOR = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE = re.compile(r"([0-9]+)(?:([KMGT])(?:I?B|I)?|B)?", re.IGNORECASE)


def parse_size(text: str, what: str) -> int:
    """Bytes from ``4096``, ``64K``, ``64KiB``, ``1g`` ... (see the module docstring);
    ConfigError naming ``what`` (e.g. the flag and its value) otherwise."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (bytes, optionally with K/M/G/T)")
    return int(m.group(1)) * _FACTOR[(m.group(2) or "").upper()]


def format_size(n: float) -> str:
    """Bytes in binary units for reading: ``512 B``, ``4.0 KiB``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def spell_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes that ``parse_size`` reads back:
    ``4k``, ``128k``, ``1M``, ``2G``, else plain bytes (``1536``)."""
    for suffix, unit in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
