"""Live migration, the backend's part, with real vblk processes and the Python frontend playing
QEMU: the dirty log (every page vblk writes while logging is on is marked, through the workers
too) and the hand-over of the image between the source's vblk and a ``vblk serve --incoming``
destination (real QEMU migrations: tests/guest/test_migration.py)."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

from vblk.dirtylog import marked_pages
from vblk.testing.frontend import DEFAULT_PROTOCOL_FEATURES, BackendError, BlkClient
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import ProtocolFeature as P
from vblk.virtio.constants import BlkStatus, BlkType, Feature

MiB = 1 << 20
PAGE = 4096


def image(tmp_path, size=16 * MiB):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def start_logging(c: BlkClient) -> mmap.mmap:
    """What QEMU does when a migration starts: SET_LOG_BASE, then SET_FEATURES with LOG_ALL,
    then SET_VRING_ADDR of the running ring with VHOST_VRING_F_LOG."""
    size = c.ram.end // PAGE // 8
    fd = os.memfd_create("qemu-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    bits = mmap.mmap(fd, size)
    f = c.frontend
    try:
        f.set_log_base(fd, size, 0)
    finally:
        os.close(fd)
    f.set_features(f.features | Feature.LOG_ALL.mask)
    uva = c.ram.uva
    lay = c.layout
    f.set_vring_addr(c.queue_index, uva(lay.desc), uva(lay.used), uva(lay.avail),
                     flags=m.VRING_F_LOG)
    return bits


def pages(gpa: int, n: int) -> set[int]:
    return set(range(gpa // PAGE, (gpa + n - 1) // PAGE + 1))


def connect(sock, **kw) -> BlkClient:
    """A frontend that can migrate: LOG_SHMFD negotiated; LOG_ALL left off until a migration
    starts (``start_logging``), as QEMU does."""
    c = BlkClient.connect(sock, protocol_features=DEFAULT_PROTOCOL_FEATURES | P.LOG_SHMFD.mask,
                          **kw)
    assert not c.frontend.features & Feature.LOG_ALL.mask
    return c


def test_every_page_vblk_writes_while_logging_is_on_is_marked(tmp_path, vblk_server,
                                                              monkeypatch):
    monkeypatch.setenv("VBLK_INLINE_READS", "0")        # every read through a worker
    monkeypatch.setenv("VBLK_URING", "0")         # and every write
    img = image(tmp_path)
    with open(img, "r+b") as f:
        f.write(os.urandom(2 * MiB))
    with connect(vblk_server(img, "--workers", "2")) as c:
        assert c.frontend.offered_features & Feature.LOG_ALL.mask
        assert c.frontend.protocol_features & P.LOG_SHMFD.mask
        before = c.read(0, 8 * PAGE)
        assert before.status == BlkStatus.OK
        bits = start_logging(c)
        assert marked_pages(bits) == set()              # nothing written since it began
        used = pages(c.layout.used, 4 + 8 * c.layout.size + 2)
        bufs = []
        for i in range(16):                            # reads land in guest memory
            gpa = c.allocator.alloc(3 * PAGE)
            bufs.append(gpa)
            done = c._run(c.submit(BlkType.IN, 64 * i, nbytes=3 * PAGE, data_gpa=gpa))
            assert done.status == BlkStatus.OK
        got = marked_pages(bits)
        for gpa in bufs:
            assert pages(gpa, 3 * PAGE) <= got, hex(gpa)
        assert used <= got
        bits[:] = bytes(len(bits))                     # QEMU took them
        w = c.allocator.alloc(4 * PAGE)
        c.ram.write(w, os.urandom(4 * PAGE))
        assert c._run(c.submit(BlkType.OUT, 8, data=c.ram.read(w, 4 * PAGE),
                               data_gpa=w)).status == BlkStatus.OK
        got = marked_pages(bits)
        assert used <= got and not pages(w + PAGE, 2 * PAGE) & got    # a write is only read
        # logging off (a migration cancelled): nothing more is marked
        c.frontend.set_features(c.frontend.features & ~Feature.LOG_ALL.mask)
        bits[:] = bytes(len(bits))
        assert c.read(0, 4 * PAGE).status == BlkStatus.OK
        assert marked_pages(bits) == set()
        bits.close()


def vblk_serve(img, sock, *args):
    return subprocess.run([sys.executable, "-m", "vblk.cli", "serve", str(img), "--socket-path",
                           str(sock), *args], capture_output=True, text=True, timeout=30)


def test_the_image_moves_from_source_to_incoming_destination_and_never_has_two_writers(
        tmp_path, vblk_server):
    img = image(tmp_path)
    source = vblk_server(img, "--workers", "2")
    refused = vblk_serve(img, tmp_path / "mistake.sock")
    assert refused.returncode == 2 and "in use by another process" in refused.stderr
    destination = vblk_server(img, "--workers", "2", "--incoming")
    a = connect(source)
    try:
        assert a.write(0, b"s" * 8192).status == BlkStatus.OK
        start_logging(a).close()
        assert a.write(16, b"t" * 4096).status == BlkStatus.OK
        # the switch-over: GET_VRING_BASE (after ENABLE 0) -- the source gives up the image
        base = a.frontend.stop_queue(0)
        assert base == a.driver.avail_idx
        # the destination's rings start: it takes the image
        with connect(destination) as b:
            assert b.read(0, 8192).data == b"s" * 8192
            assert b.read(16, 4096).data == b"t" * 4096
            assert b.write(32, b"d" * 4096).status == BlkStatus.OK
            # a vblk started by mistake is refused again, and so is the source's restart
            again = vblk_serve(img, tmp_path / "mistake2.sock")
            assert again.returncode == 2 and "in use by another process" in again.stderr
            try:
                a.frontend.start_queue(0, a.layout, base=base)
                restarted = True
            except BackendError:
                restarted = False
            assert not restarted, "the source's ring started while the destination writes"
    finally:
        a.close(graceful=False)
    with open(img, "rb") as f:
        assert f.read(8192) == b"s" * 8192
        f.seek(32 * 512)
        assert f.read(4096) == b"d" * 4096


def test_a_cancelled_migration_leaves_the_source_serving(tmp_path, vblk_server):
    img = image(tmp_path)
    source = vblk_server(img, "--workers", "2")
    destination = vblk_server(img, "--workers", "2", "--incoming")
    with connect(source) as a:
        bits = start_logging(a)
        assert a.write(0, b"x" * 4096).status == BlkStatus.OK
        a.frontend.set_features(a.frontend.features & ~Feature.LOG_ALL.mask)   # cancelled
        bits.close()
        # the destination never got the image: its rings cannot start
        try:
            with connect(destination) as b:
                b.write(8, b"y" * 4096)
            started = True
        except BackendError:
            started = False
        assert not started
        assert a.write(8, b"z" * 4096).status == BlkStatus.OK
        assert a.read(0, 8192).data == b"x" * 4096 + b"z" * 4096


def test_a_replaced_log_gets_the_marks_from_then_on_and_the_old_one_none(tmp_path, vblk_server,
                                                                         monkeypatch):
    """QEMU sends SET_LOG_BASE again when guest memory changes during a migration: vblk marks
    the new log from then on -- also for a request in flight through a worker when the log
    was replaced -- and never touches the old one again."""
    monkeypatch.setenv("VBLK_INLINE_READS", "0")
    monkeypatch.setenv("VBLK_URING", "0")
    img = image(tmp_path)
    with open(img, "r+b") as f:
        f.write(os.urandom(MiB))
    server = vblk_server(img, "--workers", "1")
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
        workers = [int(p) for p in f.read().split()]
    assert workers
    with connect(server) as c:
        old = start_logging(c)
        gpa = c.allocator.alloc(2 * PAGE)
        assert c._run(c.submit(BlkType.IN, 0, nbytes=2 * PAGE, data_gpa=gpa)).status == BlkStatus.OK
        assert pages(gpa, 2 * PAGE) <= marked_pages(old)
        old[:] = bytes(len(old))
        size = len(old)
        fd = os.memfd_create("qemu-log-2", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        new = mmap.mmap(fd, size)
        # a read goes to the (stopped) worker, and the log is replaced while it is in flight
        later = c.allocator.alloc(2 * PAGE)
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        try:
            tag = c.submit(BlkType.IN, 64, nbytes=2 * PAGE, data_gpa=later)
            time.sleep(0.2)
            c.frontend.set_log_base(fd, size, 0)         # answered: the new log is in use
            old[:] = bytes(len(old))                      # (the take marked avail_event)
        finally:
            os.close(fd)
            for w in workers:
                os.kill(w, signal.SIGCONT)
        done = {d.tag: d for d in c.wait(1)}
        while tag not in done:
            done.update({d.tag: d for d in c.wait(1)})
        assert done[tag].status == BlkStatus.OK
        more = c.allocator.alloc(PAGE)
        assert c._run(c.submit(BlkType.IN, 128, nbytes=PAGE, data_gpa=more)).status == BlkStatus.OK
        got = marked_pages(new)
        assert pages(later, 2 * PAGE) <= got and pages(more, PAGE) <= got
        assert marked_pages(old) == set(), "the replaced log was written"
        old.close()
        new.close()
