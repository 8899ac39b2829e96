"""Live resize: what a new size must be, and the answer the operator gets.

Pure: no file is looked at here. The supervisor asks ``vblk.backing.resize_limit`` what the
image holds now, checks the request with ``check_new_size``, moves the lock, swaps the
device's Geometry and tells the frontend (CONFIG_CHANGE_MSG on the backend channel, which
QEMU answers with GET_CONFIG and passes on to the guest as a config interrupt when the
capacity changed).

Rules, as a careful operator expects them:

* SIZE is bytes, or a number with a K/M/G/T suffix (powers of 1024), the same spelling as
  ``--range``; a control request may also carry an integer;
* it must be a positive whole number of logical blocks;
* it must be at most what the image gives (``resize_limit``): the range's size with a
  range, else the file's or block device's current size less the window's start;
* read-only disks resize too (only the capacity changes).
"""
from __future__ import annotations

from vblk.errors import ConfigError, ResizeRefused
from vblk.units import parse_size

MAX_SIZE_BYTES = (1 << 64) - 512       # the capacity field counts 512-byte sectors in a u64


def parse_new_size(value: object) -> int:
    """The requested size in bytes: an int, or text such as ``4096``, ``64M``, ``2G``."""
    if isinstance(value, bool):
        raise ResizeRefused(f"size {value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return parse_size(value.strip(), "size")
        except ConfigError as exc:
            raise ResizeRefused(str(exc)) from None
    raise ResizeRefused(f"size {value!r} is not a size (bytes, optionally with K/M/G/T)")


def check_new_size(size: int, logical_block_size: int, limit: int, limit_what: str) -> None:
    """Raise ResizeRefused unless ``size`` is a positive multiple of the logical block size
    no larger than ``limit`` (``limit_what`` says where that bound comes from)."""
    lbs = logical_block_size
    if size <= 0:
        raise ResizeRefused(f"size {size} must be at least one logical block ({lbs} bytes)")
    if size % lbs:
        raise ResizeRefused(f"size {size} bytes is not a whole number of {lbs}-byte logical blocks")
    if size > MAX_SIZE_BYTES:
        raise ResizeRefused(f"size {size} bytes does not fit the virtio-blk capacity field")
    if size > limit:
        raise ResizeRefused(f"size {size} bytes is more than {limit_what}; vblk never grows "
                            f"the image (grow it first, e.g. truncate -s or qemu-img resize)")


def describe(old: int, new: int, notified: bool, reason: str) -> str:
    """One line for the operator: old -> new and whether the guest was told."""
    told = "the frontend was notified" if notified else f"the guest was not notified ({reason})"
    return f"resized from {old} to {new} bytes ({old // 512} -> {new // 512} sectors); {told}"
