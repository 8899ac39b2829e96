"""The backing store: open the image, work out what the guest will see, and lock our window.

Two entry points share every rule:

* ``check_backing(opts) -> BackingInfo`` looks without touching: it opens the image read-only,
  asks whether it could be written (``access``), asks whether the lock could be taken
  (``F_OFD_GETLK``) and closes again.  ``vblk info`` and ``vblk serve`` call it before anything
  is created, so bad input is refused while the image is untouched.
* ``open_backing(opts) -> Backing`` opens for real (``O_RDWR`` unless read-only, ``O_DIRECT``
  for nocache, always ``O_CLOEXEC``, never ``O_CREAT``) and takes an open-file-description
  lock on the window: shared if read-only, exclusive otherwise.  The lock lives as long as
  the open file description, i.e. until the supervisor and every worker have closed the fd.

Geometry, after ACRN's ``blockif_open``: a regular file's size comes from ``fstat``, a block
device's from ``BLKGETSIZE64``.  The physical block size, unless given, is ``st_blksize`` for
a file and ``BLKPBSZGET`` for a device, never below the logical size (and, unlike ACRN, never
above 4096 or anything but a power of two).  The window is ``[range_start, range_start +
range_size)``, or the whole image rounded down to whole logical blocks.

Discard on a block device needs a device that discards: ACRN probes ``BLKDISCARD {0, 0}`` and
quietly drops the feature; vblk reads the device's ``queue/discard_max_bytes`` in sysfs (no
write access needed, so ``check_backing`` sees it too) and refuses the option when it is 0.

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
import time
from dataclasses import dataclass, fields

from vblk.errors import ConfigError
from vblk.options import DiskOptions
from vblk.virtio.constants import BLK_ID_BYTES, SECTOR_SIZE

# <linux/fs.h> ioctls
BLKROGET = 0x125E                  # _IO(0x12, 94): read-only flag, int
BLKSSZGET = 0x1268                 # _IO(0x12, 104): logical sector size, int
BLKPBSZGET = 0x127B                # _IO(0x12, 123): physical sector size, unsigned int
BLKGETSIZE64 = 0x80081272          # _IOR(0x12, 114, size_t): size in bytes, u64

# <fcntl.h> open-file-description locks (Linux 3.15+); the stdlib has no names for them.
F_OFD_GETLK = 36
F_OFD_SETLK = 37
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid

MAX_DERIVED_PHYSICAL = 4096


@dataclass(frozen=True, slots=True)
class BackingInfo:
    """What the guest will see, and where it lies in the image."""
    path: str
    is_block_device: bool
    readonly: bool
    writeback: bool                # the initial cache mode; the guest may toggle it
    nocache: bool
    logical_block_size: int
    physical_block_size: int
    start: int                     # byte offset of the guest's byte 0 in the image
    size: int                      # bytes the guest sees, whole logical blocks
    image_size: int                # bytes in the whole image
    serial: bytes                  # exactly 20 bytes, NUL-padded
    ranged: bool                   # a range was given: its size is the most a resize may reach

    @property
    def capacity_sectors(self) -> int:
        """virtio-blk capacity: always in 512-byte sectors."""
        return self.size // SECTOR_SIZE

    @property
    def serial_text(self) -> str:
        return self.serial.rstrip(b"\0").decode("ascii")

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True, slots=True)
class Backing(BackingInfo):
    """An open image: ``BackingInfo`` plus the fd (``-1`` once closed) holding the lock."""
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            fd = self.fd
            object.__setattr__(self, "fd", -1)   # frozen, but the fd must not be closed twice
            os.close(fd)

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
    return BackingInfo(path=opts.path, is_block_device=is_blk, readonly=opts.readonly,
                       writeback=opts.writeback, nocache=opts.nocache, logical_block_size=lbs,
                       physical_block_size=physical, start=start, size=size,
                       image_size=image_size, serial=serial,
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


# -- the lock -------------------------------------------------------------------------------

def _lock_args(info: BackingInfo) -> bytes:
    kind = fcntl.F_RDLCK if info.readonly else fcntl.F_WRLCK
    return _FLOCK.pack(kind, os.SEEK_SET, info.start, info.size, 0)


def _in_use(info: BackingInfo) -> ConfigError:
    return ConfigError(f"{info.path} bytes {info.start}..{info.end} are in use by another process")


# A vblk that was just killed leaves its workers holding the lock for a moment (they die
# with it, by PDEATHSIG, but not at the same instant); its restart waits that long for them.
LOCK_WAIT_SECONDS = 1.0


def _test_lock(fd: int, info: BackingInfo) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        answer = fcntl.fcntl(fd, F_OFD_GETLK, _lock_args(info))
        if _FLOCK.unpack(answer)[0] == fcntl.F_UNLCK:
            return
        if time.monotonic() >= deadline:
            raise _in_use(info)
        time.sleep(0.05)


def _take_lock(fd: int, info: BackingInfo) -> None:
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, _lock_args(info))
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"cannot lock {info.path} bytes {info.start}..{info.end}: "
                                  f"{e.strerror}") from None
            if time.monotonic() >= deadline:
                raise _in_use(info) from None
            time.sleep(0.05)


# -- entry points ---------------------------------------------------------------------------

def check_backing(opts: DiskOptions) -> BackingInfo:
    """Every check ``open_backing`` makes, with the image opened read-only and closed again."""
    _stat(opts.path)
    fd = _open(opts.path, opts, writable=False)
    try:
        info = _inspect(opts, fd)
        if not opts.readonly:
            _check_writable(opts.path, fd, info.is_block_device)
        _test_lock(fd, info)
    finally:
        os.close(fd)
    return info


def open_backing(opts: DiskOptions) -> Backing:
    """Open the image for serving and lock the window; the caller closes the result."""
    _stat(opts.path)
    fd = _open(opts.path, opts, writable=not opts.readonly)
    try:
        info = _inspect(opts, fd)
        _take_lock(fd, info)
    except BaseException:
        os.close(fd)
        raise
    return Backing(fd=fd, **{f.name: getattr(info, f.name) for f in fields(BackingInfo)})


# -- live resize ----------------------------------------------------------------------------

def resize_limit(info: BackingInfo, fd: int) -> tuple[int, str]:
    """The most bytes a resize of this window may reach now, and what sets that bound.

    With a range: the range's size (the operator's window never widens). Otherwise the image
    as it is now -- a regular file is re-stat'ed (so ``truncate -s`` / ``qemu-img resize``
    then ``vblk resize`` works), a block device asked again -- less the window's start,
    rounded down to whole logical blocks. vblk never grows the image itself."""
    if info.ranged:
        return info.size, f"the range's size ({info.size} bytes)"
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        image_size, what = _ioctl(fd, BLKGETSIZE64, "Q"), "block device"
    else:
        image_size, what = st.st_size, "file"
    lbs = info.logical_block_size
    limit = max(0, image_size - info.start) // lbs * lbs
    where = f" after byte {info.start}" if info.start else ""
    return limit, f"what the {what} {info.path} holds{where} now ({limit} bytes)"


def relock_window(info: BackingInfo, fd: int, old_size: int, new_size: int) -> None:
    """Move the window's lock from ``old_size`` to ``new_size`` bytes (same start, same kind).

    Growing takes the lock on the new bytes first (ResizeRefused if another process holds
    them; nothing changes); shrinking releases the bytes no longer served."""
    from vblk.errors import ResizeRefused
    kind = fcntl.F_RDLCK if info.readonly else fcntl.F_WRLCK
    if new_size > old_size:
        grow = _FLOCK.pack(kind, os.SEEK_SET, info.start + old_size, new_size - old_size, 0)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, grow)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ResizeRefused(f"{info.path} bytes {info.start + old_size}.."
                                    f"{info.start + new_size} are in use by another process") from None
            raise ResizeRefused(f"cannot lock {info.path} bytes {info.start + old_size}.."
                                f"{info.start + new_size}: {e.strerror}") from None
    elif new_size < old_size:
        tail = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, info.start + new_size, old_size - new_size, 0)
        fcntl.fcntl(fd, F_OFD_SETLK, tail)
