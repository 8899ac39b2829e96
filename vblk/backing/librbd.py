"""Ceph's C client libraries (librados, librbd) through ctypes: the calls vblk makes, declared
once with their C types.

Why ctypes and not Debian's python3-rbd: the C API takes ``struct iovec`` arrays
(``rbd_aio_readv`` / ``rbd_aio_writev``), so reads land in guest memory and writes leave from
it with no copy; completions can be reaped without callbacks (``rbd_set_image_notification``
with an eventfd, then ``rbd_poll_io_events``), so no librbd thread ever takes the GIL; and it
loads into any CPython, where python3-rbd is built for Debian's. python3-rbd's ``aio_read``
returns a new bytes object and ``aio_write`` takes one (a copy each way) and completes through
callbacks on librbd's threads. Measured here (4k random, QD32, one process, memstore OSD):
both read ~27k IOPS, python3-rbd using 91 % of a core to ctypes' 81 %; python3-rbd's writes
resubmitted from its completion callback stalled (5 IOPS) where ctypes did 13k.

The libraries are loaded on first use (``lib()``); a machine without them can run vblk for
files, and an ``rbd:`` disk there is refused with a message that says what to install.
Every function returns a negative errno on failure; ``check`` turns that into ``RbdError``.
"""
from __future__ import annotations

import ctypes
import errno
import os
from ctypes import POINTER, Structure, byref, c_char_p, c_int, c_size_t, c_ssize_t, c_uint64, c_void_p

from vblk.errors import ConfigError

EVENT_TYPE_EVENTFD = 2           # librbd.h: the fd given to rbd_set_image_notification
RBD_LOCK_MODE_EXCLUSIVE = 0
RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2


class iovec(Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


class RbdError(OSError):
    """A librados / librbd call failed; ``errno`` is its (positive) error."""


def check(ret: int, what: str) -> int:
    if ret < 0:
        raise RbdError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


_DECLARATIONS = {
    # librados
    "rados_create": (c_int, [POINTER(c_void_p), c_char_p]),
    "rados_conf_read_file": (c_int, [c_void_p, c_char_p]),
    "rados_conf_set": (c_int, [c_void_p, c_char_p, c_char_p]),
    "rados_connect": (c_int, [c_void_p]),
    "rados_shutdown": (None, [c_void_p]),
    "rados_ioctx_create": (c_int, [c_void_p, c_char_p, POINTER(c_void_p)]),
    "rados_ioctx_destroy": (None, [c_void_p]),
    # librbd
    "rbd_open": (c_int, [c_void_p, c_char_p, POINTER(c_void_p), c_char_p]),
    "rbd_open_read_only": (c_int, [c_void_p, c_char_p, POINTER(c_void_p), c_char_p]),
    "rbd_close": (c_int, [c_void_p]),
    "rbd_get_size": (c_int, [c_void_p, POINTER(c_uint64)]),
    "rbd_get_features": (c_int, [c_void_p, POINTER(c_uint64)]),
    "rbd_set_image_notification": (c_int, [c_void_p, c_int, c_int]),
    "rbd_poll_io_events": (c_int, [c_void_p, POINTER(c_void_p), c_int]),
    "rbd_aio_create_completion": (c_int, [c_void_p, c_void_p, POINTER(c_void_p)]),
    "rbd_aio_get_return_value": (c_ssize_t, [c_void_p]),
    "rbd_aio_get_arg": (c_void_p, [c_void_p]),
    "rbd_aio_release": (None, [c_void_p]),
    "rbd_aio_wait_for_complete": (c_int, [c_void_p]),
    "rbd_aio_read": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
    "rbd_aio_write": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p]),
    "rbd_aio_readv": (c_int, [c_void_p, POINTER(iovec), c_int, c_uint64, c_void_p]),
    "rbd_aio_writev": (c_int, [c_void_p, POINTER(iovec), c_int, c_uint64, c_void_p]),
    "rbd_aio_flush": (c_int, [c_void_p, c_void_p]),
    "rbd_aio_discard": (c_int, [c_void_p, c_uint64, c_uint64, c_void_p]),
    "rbd_aio_write_zeroes": (c_int, [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int]),
    "rbd_lock_acquire": (c_int, [c_void_p, c_int]),
    "rbd_lock_release": (c_int, [c_void_p]),
    "rbd_lock_get_owners": (c_int, [c_void_p, POINTER(c_int), POINTER(c_char_p),
                                    POINTER(c_size_t)]),
    "rbd_lock_get_owners_cleanup": (None, [POINTER(c_char_p), c_size_t]),
    "rbd_lock_break": (c_int, [c_void_p, c_int, c_char_p]),
    "rbd_is_exclusive_lock_owner": (c_int, [c_void_p, POINTER(c_int)]),
    "rbd_list_lockers": (c_ssize_t, [c_void_p, POINTER(c_int), c_char_p, POINTER(c_size_t),
                                     c_char_p, POINTER(c_size_t), c_char_p, POINTER(c_size_t),
                                     c_char_p, POINTER(c_size_t)]),
    "rbd_metadata_get": (c_int, [c_void_p, c_char_p, c_char_p, POINTER(c_size_t)]),
    "rbd_metadata_set": (c_int, [c_void_p, c_char_p, c_char_p]),
    "rbd_metadata_remove": (c_int, [c_void_p, c_char_p]),
    "rados_get_instance_id": (c_uint64, [c_void_p]),
}


class _Lib:
    """The two libraries with every function above typed; attributes are the C functions."""

    def __init__(self) -> None:
        try:
            rados = ctypes.CDLL("librados.so.2")
            rbd = ctypes.CDLL("librbd.so.1")
        except OSError as exc:
            raise ConfigError(f"Ceph's client libraries are not installed ({exc}); "
                              f"apt-get install librbd1") from None
        for name, (restype, argtypes) in _DECLARATIONS.items():
            fn = getattr(rados if name.startswith("rados_") else rbd, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)


_lib: _Lib | None = None


def lib() -> _Lib:
    global _lib
    if _lib is None:
        _lib = _Lib()
    return _lib


def lockers(image: c_void_p) -> list[str]:
    """The clients (``client.N``) holding a lock on the image -- the exclusive lock's holder
    included -- through ``rbd_list_lockers``, which works on a read-only handle too."""
    L = lib()
    sizes = [c_size_t(256) for _ in range(4)]
    while True:
        bufs = [ctypes.create_string_buffer(max(s.value, 1)) for s in sizes]
        exclusive = c_int()
        ret = L.rbd_list_lockers(image, byref(exclusive), bufs[0], byref(sizes[0]), bufs[1],
                                 byref(sizes[1]), bufs[2], byref(sizes[2]), bufs[3],
                                 byref(sizes[3]))
        if ret == -errno.ERANGE:
            continue                       # the sizes now say what is needed
        check(ret, "rbd_list_lockers")
        clients = bufs[1].raw[:sizes[1].value].split(b"\0")
        return [c.decode() for c in clients if c][:ret]


def metadata_get(image: c_void_p, key: str) -> str | None:
    L = lib()
    size = c_size_t(256)
    while True:
        buf = ctypes.create_string_buffer(size.value)
        ret = L.rbd_metadata_get(image, key.encode(), buf, byref(size))
        if ret == -errno.ERANGE:
            continue
        if ret == -errno.ENOENT:
            return None
        check(ret, f"rbd_metadata_get {key}")
        return buf.value.decode()
