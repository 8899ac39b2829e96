"""Opening a local image -- a regular file or a block device -- and working out what the
guest will see.

Two entry points share every rule:

* ``check_local(opts) -> BackingInfo`` looks without touching: it opens the image read-only,
  asks whether it could be written (``access``), asks whether the lock could be taken
  (``F_OFD_GETLK``) and closes again. ``vblk info`` and ``vblk serve`` call it before anything
  is created, so bad input is refused while the image is untouched.
* ``open_local(opts) -> FileBacking`` opens for real (``O_RDWR`` unless read-only,
  ``O_DIRECT`` for nocache, always ``O_CLOEXEC``, never ``O_CREAT``) and locks the window
  (vblk.backing.locks): shared if read-only, exclusive otherwise.

Geometry, after ACRN's ``blockif_open``: a regular file's size comes from ``fstat``, a block
device's from ``BLKGETSIZE64``. The physical block size, unless given, is ``st_blksize`` for
a file and ``BLKPBSZGET`` for a device, never below the logical size (and, unlike ACRN, never
above 4096 or anything but a power of two). The window is ``[range_start, range_start +
range_size)``, or the whole image rounded down to whole logical blocks.

Discard on a block device needs a device that discards: ACRN probes ``BLKDISCARD {0, 0}`` and
quietly drops the feature; vblk reads the device's ``queue/discard_max_bytes`` in sysfs (no
write access needed, so ``check_local`` sees it too) and refuses the option when it is 0.

Where ACRN is lenient and vblk is not: an image that cannot be opened for writing is an error
that says to pass ``ro`` (ACRN silently serves it read-only); a range past the end of the
image is an error (ACRN does not check); a lock held elsewhere is an error (ACRN exits).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct

from vblk.backing import locks
from vblk.backing.base import BackingInfo
from vblk.backing.file import BlockDeviceBacking, FileBacking
from vblk.errors import ConfigError
from vblk.options import DiskOptions
from vblk.virtio.constants import BLK_ID_BYTES

# <linux/fs.h> ioctls
BLKROGET = 0x125E                  # _IO(0x12, 94): read-only flag, int
BLKSSZGET = 0x1268                 # _IO(0x12, 104): logical sector size, int
BLKPBSZGET = 0x127B                # _IO(0x12, 123): physical sector size, unsigned int
BLKGETSIZE64 = 0x80081272          # _IOR(0x12, 114, size_t): size in bytes, u64

MAX_DERIVED_PHYSICAL = 4096


# -- pure helpers ---------------------------------------------------------------------------

def compute_window(path: str, image_size: int, logical_block_size: int, range_start: int,
                   range_size: int | None) -> tuple[int, int]:
    """(start, size) of the guest's view of an ``image_size``-byte image, or ConfigError."""
    lbs = logical_block_size
    if range_size is not None:
        end = range_start + range_size
        if end > image_size:
            raise ConfigError(f"range {range_start}/{range_size} (bytes) ends at byte {end} "
                              f"past the end of {path} ({image_size} bytes)")
        return range_start, range_size
    if range_start > image_size:
        raise ConfigError(f"range starts at byte {range_start}, past the end of {path} "
                          f"({image_size} bytes)")
    size = (image_size - range_start) // lbs * lbs
    if size == 0:
        where = f" after byte {range_start}" if range_start else ""
        raise ConfigError(f"{path} has {image_size - range_start} bytes{where}, less than one "
                          f"{lbs}-byte logical block: nothing to serve")
    return range_start, size


def derive_physical(logical: int, native: int) -> int:
    """The physical block size to report when none was given (ACRN: max(L, native))."""
    if native <= 0 or native & (native - 1):
        return logical
    return max(logical, min(native, MAX_DERIVED_PHYSICAL))


def derive_serial(realpath: str, st: os.stat_result, range_start: int,
                  range_size: int | None) -> bytes:
    """A stable 20-byte id for this image (and window): ``VBLK-`` + 15 hex digits."""
    ident = (realpath, st.st_dev, st.st_ino, st.st_rdev, range_start, range_size)
    digest = hashlib.sha256(repr(ident).encode()).hexdigest()
    return ("VBLK-" + digest[:BLK_ID_BYTES - 5]).encode("ascii")


def pad_serial(serial: str) -> bytes:
    return serial.encode("ascii").ljust(BLK_ID_BYTES, b"\0")


# -- looking at the image -------------------------------------------------------------------

def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"image {path} does not exist (vblk never creates images)") from None
    except PermissionError:
        raise ConfigError(f"cannot reach image {path}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"cannot look at image {path}: {e.strerror}") from None
    _check_kind(path, st)
    return st


def _check_kind(path: str, st: os.stat_result) -> None:
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ConfigError(f"image {path} is {_kind(st.st_mode)}; vblk serves a regular file "
                          f"or a block device")


def _open(path: str, opts: DiskOptions, writable: bool) -> int:
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if opts.nocache:
        flags |= os.O_DIRECT
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"image {path} does not exist (vblk never creates images)") from None
    except PermissionError as e:       # EACCES, or EPERM for an immutable file
        reason = e.strerror.lower()
        if writable:
            raise ConfigError(f"cannot open {path} for writing: {reason} "
                              f"(pass ro to serve it read-only)") from None
        raise ConfigError(f"cannot open {path} for reading: {reason}") from None
    except OSError as e:
        if e.errno == errno.EROFS:
            raise ConfigError(f"{path} is on a read-only filesystem "
                              f"(pass ro to serve it read-only)") from None
        if e.errno == errno.EINVAL and opts.nocache:
            raise ConfigError(f"{path}: its filesystem does not support O_DIRECT "
                              f"(drop nocache)") from None
        mode = "writing" if writable else "reading"
        raise ConfigError(f"cannot open {path} for {mode}: {e.strerror}") from None
    # O_NONBLOCK only kept a FIFO swapped in after the stat from hanging the open.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _check_writable(path: str, fd: int, is_block_device: bool) -> None:
    """Without opening for writing: could ``open(O_RDWR)`` succeed?"""
    if is_block_device and _ioctl(fd, BLKROGET, "i"):
        raise ConfigError(f"{path} is a read-only block device (pass ro to serve it read-only)")
    if os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    try:
        readonly_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        readonly_fs = False
    if readonly_fs:
        raise ConfigError(f"{path} is on a read-only filesystem (pass ro to serve it read-only)")
    raise ConfigError(f"cannot open {path} for writing: permission denied or immutable "
                      f"(pass ro to serve it read-only)")


def _inspect(opts: DiskOptions, fd: int) -> BackingInfo:
    st = os.fstat(fd)
    _check_kind(opts.path, st)
    is_blk = stat.S_ISBLK(st.st_mode)
    lbs = opts.logical_block_size
    if is_blk:
        image_size = _ioctl(fd, BLKGETSIZE64, "Q")
        device_lbs = _ioctl(fd, BLKSSZGET, "i")
        if lbs < device_lbs:
            raise ConfigError(f"sector size {lbs} is smaller than {opts.path}'s logical block "
                              f"size {device_lbs}")
        native_physical = _ioctl(fd, BLKPBSZGET, "I")
        if opts.discard is not None and not opts.readonly and not device_discards(st.st_rdev):
            raise ConfigError(f"{opts.path} is a block device that cannot discard "
                              f"(drop the discard option)")
    else:
        image_size = st.st_size
        native_physical = st.st_blksize
    physical = opts.physical_block_size or derive_physical(lbs, native_physical)
    start, size = compute_window(opts.path, image_size, lbs, opts.range_start, opts.range_size)
    if opts.serial is not None:
        serial = pad_serial(opts.serial)
    else:
        serial = derive_serial(os.path.realpath(opts.path), st, opts.range_start, opts.range_size)
    return BackingInfo(path=opts.path, kind="block device" if is_blk else "regular file",
                       readonly=opts.readonly, writeback=opts.writeback, nocache=opts.nocache,
                       logical_block_size=lbs, physical_block_size=physical, start=start,
                       size=size, image_size=image_size, serial=serial,
                       ranged=opts.range_size is not None)


def device_discards(rdev: int) -> bool:
    """Does the block device ``rdev`` discard? (sysfs ``queue/discard_max_bytes`` > 0; a
    partition's queue is its disk's). True when sysfs cannot tell: the worker then answers
    UNSUPP for each discard the device refuses."""
    base = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"
    for queue in (f"{base}/queue", f"{base}/../queue"):
        try:
            with open(f"{queue}/discard_max_bytes") as f:
                return int(f.read().strip() or 0) > 0
        except (OSError, ValueError):
            continue
    return True


def _ioctl(fd: int, request: int, fmt: str) -> int:
    buf = fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt)))
    return struct.unpack(fmt, buf)[0]


# -- entry points ---------------------------------------------------------------------------

def check_local(opts: DiskOptions, lock: bool = True) -> BackingInfo:
    """Every check ``open_local`` makes, with the image opened read-only and closed again
    (``lock=False``: whether the window is free is not asked)."""
    _stat(opts.path)
    fd = _open(opts.path, opts, writable=False)
    try:
        info = _inspect(opts, fd)
        if not opts.readonly:
            _check_writable(opts.path, fd, info.is_block_device)
        if lock:
            locks.test_lock(fd, info.path, info.start, info.size, info.readonly)
    finally:
        os.close(fd)
    return info


def open_local(opts: DiskOptions, lock: bool = True) -> FileBacking:
    """Open the image for serving and lock the window (``lock=False``: not yet, for a
    migration's destination: ``take_window`` later); the caller closes the result."""
    _stat(opts.path)
    fd = _open(opts.path, opts, writable=not opts.readonly)
    try:
        info = _inspect(opts, fd)
        if lock:
            locks.take_lock(fd, info.path, info.start, info.size, info.readonly)
    except BaseException:
        os.close(fd)
        raise
    return (BlockDeviceBacking if info.is_block_device else FileBacking)(info, fd, lock)
