"""A Ceph RBD image as the disk, through librbd's asynchronous C API (vblk.backing.librbd).

Theory of operation
-------------------
Opening (``open_rbd``; ``check_rbd`` does the same read-only and touches nothing): create a
librados handle as the spec's user, read its ceph.conf, set vblk's client options, connect,
open the pool's I/O context and the image (read-only for ``ro`` and for a snapshot). Every
step that talks to the cluster is bounded: connecting by ``client_mount_timeout``, monitor
requests by ``rados_mon_op_timeout`` (both ``CONNECT_TIMEOUT``), so an unreachable cluster is
refused in seconds, not after librados's default of waiting for ever.

Client options vblk sets (the spec's own ``KEY=VALUE`` options override them):

* ``rbd_cache = false``: a write completes when the OSDs have it, so write-through needs no
  extra flush round trip and FLUSH has nothing to push (``writes_durable``). librbd's cache
  would sit between the guest's page cache and the OSDs, double the memory, and make every
  write-through write pay a flush; QEMU does the same for ``cache.direct=on``.
* ``rados_osd_op_timeout = IO_TIMEOUT`` (30 s): while the cluster is merely slow or an OSD
  restarts, requests wait and complete; a cluster gone for longer fails them with an error
  (IOERR to the guest) instead of hanging them for ever, and vblk keeps serving.

One writer: an image with the exclusive-lock feature (Ceph's default) is locked with
``rbd_lock_acquire`` when opened writable, so vblk never bounces the lock (its one process
does every request) and a second writer -- another vblk, qemu-storage-daemon -- gets EROFS on
its writes while the lock is held; another vblk is refused at start, as for a file. The lock
holder writes who it is (host, boot, pid, start time) into the image metadata ``vblk.owner``.
A vblk that was killed leaves its lock to a dead client, which Ceph gives away only after the
watch timeout (30 s by default): a vblk started on the same host that finds the lock held by a
provably dead local vblk breaks it at once (blocklisting the dead client) and takes over.

I/O: one eventfd is the image's notification fd (``rbd_set_image_notification``); every
operation is started with ``rbd_aio_*`` on iovecs pointing straight into guest memory, with a
completion whose argument is the caller's tag; ``reap`` takes finished completions with
``rbd_poll_io_events``. No callback runs on librbd's threads. The blocking calls of the
interface submit one operation and wait for it (keeping other completions for ``reap``).

Discard: librbd's discard of less than an object does not zero (and need not: virtio-blk's
DISCARD promises nothing about the data); WRITE_ZEROES uses ``rbd_aio_write_zeroes``, which
always reads back as zeroes.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import select
import socket
from ctypes import byref, c_int, c_uint64, c_void_p

from vblk.backing.base import Backing, BackingInfo
from vblk.backing.librbd import (
    EVENT_TYPE_EVENTFD,
    RBD_FEATURE_EXCLUSIVE_LOCK,
    RBD_LOCK_MODE_EXCLUSIVE,
    RbdError,
    check,
    iovec,
    lib,
    lockers,
    metadata_get,
)
from vblk.backing.local import compute_window, derive_physical, pad_serial
from vblk.backing.rbd_spec import RbdSpec, parse_rbd
from vblk.errors import ConfigError
from vblk.ipc import Op
from vblk.logs import quote
from vblk.options import DiskOptions
from vblk.virtio.constants import BLK_ID_BYTES

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10             # seconds: connecting, and each monitor request
IO_TIMEOUT = 30                  # seconds an OSD request may take before it fails
OWNER_KEY = "vblk.owner"
POLL_BATCH = 64

CLIENT_OPTIONS = (("client_mount_timeout", str(CONNECT_TIMEOUT)),
                  ("rados_mon_op_timeout", str(CONNECT_TIMEOUT)),
                  ("rados_osd_op_timeout", str(IO_TIMEOUT)),
                  ("rbd_cache", "false"))


# -- who holds the lock --------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity(client: str) -> str:
    """This process, holding the lock as Ceph client ``client``, as ``vblk.owner`` records it."""
    pid = os.getpid()
    return (f"client={client} host={socket.gethostname()} boot={_boot_id()} pid={pid} "
            f"start={_start_time(pid)}")


def dead_local_owner(recorded: str | None, holders: list[str]) -> bool:
    """Does ``recorded`` (a ``vblk.owner`` value) name one of the lock's ``holders`` that was a
    vblk of this host and boot and is no longer running? Anything else -- another client, host
    or boot, an unreadable record -- is not provably dead."""
    if not recorded:
        return False
    fields = dict(part.partition("=")[::2] for part in recorded.split())
    if fields.get("client") not in holders:
        return False                     # the record is stale: someone else holds it now
    if fields.get("host") != socket.gethostname() or fields.get("boot") != _boot_id():
        return False
    try:
        pid = int(fields.get("pid", ""))
    except ValueError:
        return False
    return _start_time(pid) != fields.get("start")


# -- connecting ---------------------------------------------------------------------------------

class Connection:
    """A librados handle and the pool's I/O context, shut down by ``close``."""

    def __init__(self, spec: RbdSpec) -> None:
        L = lib()
        self.spec = spec
        self.cluster = c_void_p()
        self.ioctx = c_void_p()
        user = (spec.user or "admin").encode()
        check(L.rados_create(byref(self.cluster), user), "rados_create")
        try:
            self._configure()
            self._connect()
            ret = L.rados_ioctx_create(self.cluster, spec.pool.encode(), byref(self.ioctx))
            if ret == -errno.ENOENT:
                raise ConfigError(f"rbd:{spec.name}: pool {spec.pool!r} does not exist")
            check(ret, f"opening pool {spec.pool}")
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        L, spec = lib(), self.spec
        if spec.conf is not None:
            try:
                with open(spec.conf, "rb"):
                    pass
            except OSError as exc:
                raise ConfigError(f"rbd:{spec.name}: cannot read {spec.conf}: "
                                  f"{exc.strerror}") from None
        ret = L.rados_conf_read_file(self.cluster, spec.conf.encode() if spec.conf else None)
        if ret < 0 and spec.conf is not None:
            raise ConfigError(f"rbd:{spec.name}: {spec.conf} is not a usable ceph.conf "
                              f"({os.strerror(-ret)})")
        for key, value in (*CLIENT_OPTIONS, *spec.options):
            ret = L.rados_conf_set(self.cluster, key.encode(), value.encode())
            if ret < 0:
                raise ConfigError(f"rbd:{spec.name}: Ceph option {key}={value}: "
                                  f"{os.strerror(-ret)}")

    def _connect(self) -> None:
        spec = self.spec
        ret = lib().rados_connect(self.cluster)
        if ret == 0:
            return
        user = f"client.{spec.user or 'admin'}"
        conf = spec.conf or "Ceph's default ceph.conf"
        if ret in (-errno.ETIMEDOUT, -errno.EAGAIN, -errno.ECONNREFUSED):
            raise ConfigError(f"rbd:{spec.name}: cannot reach the Ceph cluster of {conf} "
                              f"within {CONNECT_TIMEOUT} s (is mon_host right and up?)")
        if ret in (-errno.EACCES, -errno.EPERM, -errno.ENOENT, -errno.EINVAL):
            raise ConfigError(f"rbd:{spec.name}: the cluster refused {user} "
                              f"({os.strerror(-ret)}: check the user and its keyring)")
        raise ConfigError(f"rbd:{spec.name}: connecting as {user}: {os.strerror(-ret)}")

    def open_image(self, readonly: bool) -> c_void_p:
        L, spec = lib(), self.spec
        image = c_void_p()
        snap = spec.snap.encode() if spec.snap else None
        fn = L.rbd_open_read_only if readonly else L.rbd_open
        ret = fn(self.ioctx, spec.image.encode(), byref(image), snap)
        if ret == -errno.ENOENT:
            what = (f"snapshot {spec.snap!r} of image {spec.pool}/{spec.image}" if spec.snap
                    else f"image {spec.image!r} in pool {spec.pool!r}")
            raise ConfigError(f"rbd:{spec.name}: {what} does not exist")
        _refuse_if_not_permitted(spec, ret, "open" if readonly else "open for writing")
        check(ret, f"opening rbd:{spec.name}")
        return image

    def close(self) -> None:
        L = lib()
        if self.ioctx:
            L.rados_ioctx_destroy(self.ioctx)
            self.ioctx = c_void_p()
        if self.cluster:
            L.rados_shutdown(self.cluster)
            self.cluster = c_void_p()


def _spec_of(opts: DiskOptions) -> RbdSpec:
    spec = parse_rbd(opts.path)
    if spec.snap is not None and not opts.readonly:
        raise ConfigError(f"rbd:{spec.name} is a snapshot, which is read-only: pass ro")
    if opts.nocache:
        raise ConfigError(f"rbd:{spec.name}: nocache is for files (librbd's cache is off "
                          f"already)")
    return spec


def _inspect(opts: DiskOptions, spec: RbdSpec, image: c_void_p) -> BackingInfo:
    size = c_uint64()
    check(lib().rbd_get_size(image, byref(size)), "rbd_get_size")
    lbs = opts.logical_block_size
    start, window = compute_window(opts.path, size.value, lbs, opts.range_start, opts.range_size)
    if opts.serial is not None:
        serial = pad_serial(opts.serial)
    else:                  # the same on every host that opens the image: it moves with the VM
        ident = repr(("rbd", spec.pool, spec.image, spec.snap, opts.range_start, opts.range_size))
        serial = ("VBLK-" + hashlib.sha256(ident.encode()).hexdigest()[:BLK_ID_BYTES - 5]).encode()
    return BackingInfo(path=opts.path, kind="rbd image", readonly=opts.readonly,
                       writeback=opts.writeback, nocache=False, logical_block_size=lbs,
                       physical_block_size=opts.physical_block_size or derive_physical(lbs, 4096),
                       start=start, size=window, image_size=size.value, serial=serial,
                       ranged=opts.range_size is not None)


def _features(image: c_void_p) -> int:
    features = c_uint64()
    check(lib().rbd_get_features(image, byref(features)), "rbd_get_features")
    return features.value


def _refuse_if_held(spec: RbdSpec, image: c_void_p) -> bool:
    """True if a dead local vblk holds the image's lock (it is to be broken), False if nobody
    does; ConfigError if a live client does (or may)."""
    holders = lockers(image)
    if not holders:
        return False
    recorded = metadata_get(image, OWNER_KEY)
    if dead_local_owner(recorded, holders):
        return True
    who = f"; it says: vblk {recorded}" if recorded else ""
    raise ConfigError(f"rbd:{spec.name} is in use by another client ({', '.join(holders)}{who})")


def _take_over(spec: RbdSpec, image: c_void_p, readonly: bool) -> None:
    """Break the lock a dead local vblk left (see the module doc); Ceph blocklists the dead
    client, so nothing it had queued can land after us."""
    if readonly:
        raise ConfigError(f"rbd:{spec.name} is still locked by a vblk that died; open it "
                          f"writable once to take it over")
    for owner in _exclusive_owners(image):
        log.warning("event=rbd_lock_taken_over image=%s owner=%s", quote(spec.name), quote(owner))
        check(lib().rbd_lock_break(image, RBD_LOCK_MODE_EXCLUSIVE, owner.encode()),
              "rbd_lock_break")


def _lock(spec: RbdSpec, conn: Connection, image: c_void_p, readonly: bool) -> bool:
    """One writer: refuse a live holder, take a dead local vblk's lock over, and (writable)
    take the lock; whether we hold it now."""
    if _refuse_if_held(spec, image):
        _take_over(spec, image, readonly=readonly)
    return False if readonly else _acquire(spec, conn, image)


def _acquire(spec: RbdSpec, conn: Connection, image: c_void_p) -> bool:
    """Take the exclusive lock and record who holds it; False if the image has no lock to
    take (the exclusive-lock feature is off)."""
    if not _features(image) & RBD_FEATURE_EXCLUSIVE_LOCK:
        return False
    ret = lib().rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE)
    if ret in (-errno.EROFS, -errno.EBUSY):
        raise ConfigError(f"rbd:{spec.name} is in use by another client")
    _refuse_if_not_permitted(spec, ret, "lock for writing")
    check(ret, "rbd_lock_acquire")
    me = identity(f"client.{lib().rados_get_instance_id(conn.cluster)}")
    ret = lib().rbd_metadata_set(image, OWNER_KEY.encode(), me.encode())
    _refuse_if_not_permitted(spec, ret, "write metadata of")
    check(ret, "recording the lock's owner")
    return True


def _refuse_if_not_permitted(spec: RbdSpec, ret: int, doing: str) -> None:
    """A user the cluster knows whose caps do not allow ``doing`` ("open", "open for
    writing", ...) the image: the operator's to fix, so a ConfigError (one line, exit 2), not
    an I/O error."""
    if ret in (-errno.EPERM, -errno.EACCES):
        hint = "" if doing == "open" else " (a user with read-only caps serves it with ro)"
        raise ConfigError(f"rbd:{spec.name}: client.{spec.user or 'admin'} may not {doing} "
                          f"image {spec.pool}/{spec.image}: {os.strerror(-ret)}; check the "
                          f"user's caps{hint}")


def _exclusive_owners(image: c_void_p) -> list[str]:
    L = lib()
    mode = c_int()
    cap = ctypes.c_size_t(8)
    while True:
        owners = (ctypes.c_char_p * cap.value)()
        ret = L.rbd_lock_get_owners(image, byref(mode), owners, byref(cap))
        if ret == -errno.ERANGE:
            continue
        if ret == -errno.ENOENT:
            return []
        check(ret, "rbd_lock_get_owners")
        found = [owners[i].decode() for i in range(cap.value)]
        L.rbd_lock_get_owners_cleanup(owners, cap)
        return found


def check_rbd(opts: DiskOptions, lock: bool = True) -> BackingInfo:
    """Every check ``open_rbd`` makes, with the image opened read-only and closed again
    (``lock=False``: whether another client holds the image is not asked)."""
    spec = _spec_of(opts)
    conn = Connection(spec)
    try:
        image = conn.open_image(readonly=True)
        try:
            info = _inspect(opts, spec, image)
            if spec.snap is None and lock:
                _refuse_if_held(spec, image)
        finally:
            lib().rbd_close(image)
    finally:
        conn.close()
    return info


def open_rbd(opts: DiskOptions, lock: bool = True) -> RbdBacking:
    """Open the image for serving (and take its lock when writable, unless ``lock=False``: a
    migration's destination takes it with ``take_window``); the caller closes it."""
    spec = _spec_of(opts)
    conn = Connection(spec)
    image = c_void_p()
    try:
        image = conn.open_image(readonly=opts.readonly)
        info = _inspect(opts, spec, image)
        locked = False
        if spec.snap is None and lock:
            locked = _lock(spec, conn, image, readonly=opts.readonly)
        return RbdBacking(info, spec, conn, image, locked)
    except BaseException:
        if image:
            lib().rbd_close(image)
        conn.close()
        raise


# -- the backing ---------------------------------------------------------------------------------

class RbdBacking(Backing):
    blocking = False                 # served by the in-process engine: librbd's threads do the I/O
    writes_durable = True            # rbd_cache is off: a completed write is on the OSDs
    takes_pieces = True              # iovecs straight from the guest memory table

    def __init__(self, info: BackingInfo, spec: RbdSpec, conn: Connection, image: c_void_p,
                 locked: bool) -> None:
        super().__init__(info)
        self.spec = spec
        self.conn = conn
        self.image = image
        self.locked = locked
        self.start = info.start
        self._running: dict[int, tuple[int, object]] = {}     # completion -> (tag, keep-alive)
        self._kept: list[tuple[int, int]] = []                # reaped while a blocking call waited
        self._private = 0                                     # tags of blocking calls: -1, -2, ...
        self._comps = (c_void_p * POLL_BATCH)()
        check(lib().rbd_set_image_notification(image, self.completion_fd, EVENT_TYPE_EVENTFD),
              "rbd_set_image_notification")

    # -- submitted operations ------------------------------------------------------------------
    def submit(self, tag: int, op: Op, offset: int = 0, bufs: list[memoryview] = (),
               length: int = 0, unmap: bool = False) -> None:
        L = lib()
        comp = c_void_p()
        keep: object = None
        try:
            if op == Op.READ or op == Op.WRITE:
                total = sum(map(len, bufs))
                self.check_window(offset, total, op == Op.WRITE)
                anchors = [ctypes.c_char.from_buffer(b) for b in bufs]
                iov = (iovec * len(bufs))(*((ctypes.addressof(a), len(b))
                                            for a, b in zip(anchors, bufs)))
                keep = (anchors, iov, total if op == Op.READ else 0)
            elif op in (Op.DISCARD, Op.WRITE_ZEROES):
                self.check_window(offset, length, True)
            elif op != Op.FLUSH:
                raise OSError(errno.EINVAL, f"unknown operation {op}")
            check(L.rbd_aio_create_completion(None, None, byref(comp)),
                  "rbd_aio_create_completion")
            at = self.start + offset
            if op == Op.READ:
                ret = L.rbd_aio_readv(self.image, keep[1], len(bufs), at, comp)
            elif op == Op.WRITE:
                ret = L.rbd_aio_writev(self.image, keep[1], len(bufs), at, comp)
            elif op == Op.FLUSH:
                ret = L.rbd_aio_flush(self.image, comp)
            elif op == Op.DISCARD:
                ret = L.rbd_aio_discard(self.image, at, length, comp)
            else:
                ret = L.rbd_aio_write_zeroes(self.image, at, length, comp, 0, 0)
            check(ret, f"rbd_aio op {op}")
            self._running[comp.value] = (tag, keep)
        except OSError as exc:
            if comp:
                L.rbd_aio_release(comp)
            self._kept.append((tag, exc.errno or errno.EIO))
            os.eventfd_write(self.completion_fd, 1)

    def submit_pieces(self, tag: int, op: Op, offset: int, pieces, memory) -> None:
        """READ / WRITE straight from the memory table's addresses (the table outlives every
        request in flight: the data path changes it only when none is). One buffer goes
        without an iovec (``rbd_aio_read`` / ``_write``)."""
        L = lib()
        comp = c_void_p()
        write = op == Op.WRITE
        try:
            total = 0
            for _, _, n in pieces:
                total += n
            self.check_window(offset, total, write)
            check(L.rbd_aio_create_completion(None, None, byref(comp)), "rbd_aio_create_completion")
            at = self.start + offset
            if len(pieces) == 1:
                ((addr, n),) = memory.addresses(pieces)
                iov = None
                aio = L.rbd_aio_write if write else L.rbd_aio_read
                ret = aio(self.image, at, n, addr, comp)
            else:
                n = len(pieces)
                iov = (iovec * n)(*memory.addresses(pieces))
                aio = L.rbd_aio_writev if write else L.rbd_aio_readv
                ret = aio(self.image, iov, n, at, comp)
            check(ret, aio.__name__)
            self._running[comp.value] = (tag, (None, iov, 0 if write else total))
        except OSError as exc:
            if comp:
                L.rbd_aio_release(comp)
            self._kept.append((tag, exc.errno or errno.EIO))
            os.eventfd_write(self.completion_fd, 1)

    def reap(self) -> list[tuple[int, int]]:
        try:
            os.eventfd_read(self.completion_fd)
        except BlockingIOError:
            pass
        L = lib()
        done, self._kept = self._kept, []
        while True:
            n = L.rbd_poll_io_events(self.image, self._comps, POLL_BATCH)
            for k in range(max(n, 0)):
                comp = self._comps[k]
                ret = L.rbd_aio_get_return_value(comp)
                L.rbd_aio_release(comp)
                tag, keep = self._running.pop(comp, (None, None))
                if tag is None:
                    continue
                want = keep[2] if keep is not None else 0
                err = -ret if ret < 0 else (errno.EIO if want and ret != want else 0)
                done.append((tag, err))
            if n < POLL_BATCH:
                return done

    # -- blocking operations: one submitted operation, waited for -----------------------------
    def _wait(self, op: Op, offset: int = 0, bufs=(), length: int = 0,
              unmap: bool = False) -> None:
        self._private -= 1
        tag = self._private
        self.submit(tag, op, offset, list(bufs), length, unmap)
        while True:
            select.select([self.completion_fd], [], [])
            others = []
            for t, err in self.reap():
                if t != tag:
                    others.append((t, err))
                    continue
                self._kept.extend(others)
                if self._kept:
                    os.eventfd_write(self.completion_fd, 1)
                if err:
                    raise OSError(err, f"rbd:{self.spec.name}: {os.strerror(err)}")
                return
            self._kept.extend(others)

    def _readv(self, offset: int, bufs: list[memoryview]) -> None:
        self._wait(Op.READ, offset, bufs)

    def _writev(self, offset: int, bufs: list[memoryview]) -> None:
        self._wait(Op.WRITE, offset, bufs)

    def _flush(self) -> None:
        self._wait(Op.FLUSH)

    def _discard(self, offset: int, length: int) -> None:
        self._wait(Op.DISCARD, offset, length=length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._wait(Op.WRITE_ZEROES, offset, length=length, unmap=unmap)

    # -- size ----------------------------------------------------------------------------------
    def resize_limit(self) -> tuple[int, str]:
        info = self.info
        if info.ranged:
            return info.size, f"the range's size ({info.size} bytes)"
        size = c_uint64()
        check(lib().rbd_get_size(self.image, byref(size)), "rbd_get_size")
        lbs = info.logical_block_size
        limit = max(0, size.value - info.start) // lbs * lbs
        where = f" after byte {info.start}" if info.start else ""
        return limit, f"what the image rbd:{self.spec.name} holds{where} now ({limit} bytes)"

    def release_window(self) -> None:
        if self.locked:
            check(lib().rbd_metadata_remove(self.image, OWNER_KEY.encode()),
                  "removing the lock's owner record")
            check(lib().rbd_lock_release(self.image), "rbd_lock_release")
            self.locked = False

    def take_window(self) -> None:
        if not self.locked and not self.info.readonly and self.spec.snap is None:
            # as at open (a restarted --incoming vblk takes its killed predecessor's lock over)
            self.locked = _lock(self.spec, self.conn, self.image, readonly=False)

    def owns_lock(self) -> bool:
        owner = c_int()
        check(lib().rbd_is_exclusive_lock_owner(self.image, byref(owner)),
              "rbd_is_exclusive_lock_owner")
        return bool(owner.value)

    def close(self) -> None:
        if self.image:
            L = lib()
            if self._running:
                log.warning("event=rbd_close_with_io_running count=%d", len(self._running))
            if self.locked:
                try:
                    check(L.rbd_metadata_remove(self.image, OWNER_KEY.encode()),
                          "removing the lock's owner record")
                    check(L.rbd_lock_release(self.image), "rbd_lock_release")
                except RbdError as exc:
                    log.warning("event=rbd_lock_release_failed error=%s", quote(repr(exc)))
            L.rbd_close(self.image)
            self.image = c_void_p()
            self.conn.close()
        super().close()
