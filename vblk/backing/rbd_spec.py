"""``rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]...``: QEMU's rbd filename syntax.

The image token of the ACRN option string (or the positional SPEC) names a Ceph RBD image
this way; ``:`` separates the parts and ``\\:`` / ``\\@`` / ``\\\\`` stand for a literal one.
``conf`` is the ceph.conf to read (default: Ceph's own search, /etc/ceph/ceph.conf first),
``id`` the cephx user without ``client.`` (default ``admin``); any other ``KEY=VALUE`` is a
Ceph client option set before connecting, exactly as QEMU passes them
(``rados_osd_op_timeout=60``, ``keyring=/etc/ceph/vms.keyring``, ``mon_host=...``).

A snapshot (``@SNAP``) is read-only by nature: without ``ro`` it is refused, not quietly served
read-only (vblk never downgrades a disk behind the operator's back).
"""
from __future__ import annotations

from dataclasses import dataclass

from vblk.errors import ConfigError

PREFIX = "rbd:"
SYNTAX = "rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE]..."


@dataclass(frozen=True, slots=True)
class RbdSpec:
    pool: str
    image: str
    snap: str | None = None
    conf: str | None = None
    user: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        """pool/image[@snap], for messages."""
        return f"{self.pool}/{self.image}" + (f"@{self.snap}" if self.snap else "")


def is_rbd(path: str) -> bool:
    return path.startswith(PREFIX)


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped with a backslash; unescape the parts."""
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_rbd(path: str) -> RbdSpec:
    """The spec of an ``rbd:`` image token (ConfigError naming what is wrong)."""
    if not is_rbd(path):
        raise ConfigError(f"{path!r} is not an rbd: image ({SYNTAX})")
    fields = _split(path[len(PREFIX):], ":")
    where, opts = fields[0], fields[1:]
    name_snap = _split(where, "@")
    if len(name_snap) > 2:
        raise ConfigError(f"{path}: more than one @ ({SYNTAX})")
    pool_image = _split(name_snap[0], "/")
    if len(pool_image) != 2 or not all(pool_image):
        raise ConfigError(f"{path}: want POOL/IMAGE ({SYNTAX})")
    pool, image = (_unescape(p) for p in pool_image)
    snap = _unescape(name_snap[1]) if len(name_snap) == 2 else None
    if snap == "":
        raise ConfigError(f"{path}: empty snapshot name after @")
    conf = user = None
    options: list[tuple[str, str]] = []
    for opt in opts:
        key, eq, value = opt.partition("=")
        key, value = _unescape(key), _unescape(value)
        if not eq or not key or not value:
            raise ConfigError(f"{path}: option {opt!r} is not KEY=VALUE ({SYNTAX})")
        if key == "conf":
            conf = value
        elif key == "id":
            user = value.removeprefix("client.")
        else:
            options.append((key, value))
    for text in (pool, image, snap or "", conf or "", user or ""):
        if "\0" in text:
            raise ConfigError(f"{path!r} contains a NUL byte")
    return RbdSpec(pool, image, snap, conf, user, tuple(options))
