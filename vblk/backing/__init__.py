"""The disk behind the device: one interface (``Backing``, vblk.backing.base), its kinds and
the entry points that pick one.

==================  =============================  ============================================
kind                module                         opened from
==================  =============================  ============================================
regular file        vblk.backing.file + .local     a path (the ACRN option string's PATH)
block device        vblk.backing.file + .local     a path to a block device
rbd image           vblk.backing.rbd (+ librbd,    ``rbd:POOL/IMAGE[@SNAP][:conf=..][:id=..]``
                    rbd_spec)
memory              vblk.backing.memory            tests only (``MemoryBacking.open``)
==================  =============================  ============================================

Every kind passes one conformance suite (tests/unit/test_backing_conformance.py).
"""
from __future__ import annotations

from vblk.backing.base import Backing, BackingInfo, info_from_dict, info_to_dict, status_for  # noqa: F401
from vblk.backing.rbd_spec import is_rbd
from vblk.options import DiskOptions


def check_backing(opts: DiskOptions, lock: bool = True) -> BackingInfo:
    """Everything ``open_backing`` would check, touching nothing (ConfigError if refused).
    ``lock=False``: whether another holds the window is not asked (a migration's destination
    opens it while the source still serves it)."""
    if is_rbd(opts.path):
        from vblk.backing.rbd import check_rbd
        return check_rbd(opts, lock)
    from vblk.backing.local import check_local
    return check_local(opts, lock)


def open_backing(opts: DiskOptions, lock: bool = True) -> Backing:
    """Open and lock the disk's window for serving (ConfigError if refused); ``lock=False``:
    open it unlocked, to be taken with ``Backing.take_window`` (a migration's destination)."""
    if is_rbd(opts.path):
        from vblk.backing.rbd import open_rbd
        return open_rbd(opts, lock)
    from vblk.backing.local import open_local
    return open_local(opts, lock)


def attach(desc: dict) -> Backing:
    """In a worker: the backing the supervisor described with ``Backing.handoff``."""
    from vblk.backing.file import attach_fd
    if desc.get("kind") in ("regular file", "block device"):
        return attach_fd(desc)
    raise ValueError(f"a worker cannot attach a {desc.get('kind')!r} backing")
