"""Durability, shutdown and hygiene of a real vblk process, observed from outside.

Durability is checked on the system calls the workers really make (strace), not on a mock:
in write-through mode no write completes before an fdatasync that follows it; in write-back
mode writes are not synced and a FLUSH completes only after an fdatasync.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vblk.testing.frontend import BlkClient
from vblk.virtio.constants import BlkStatus, BlkType

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def image(tmp_path, size=16 * MiB):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def serve(img, *args, prefix=(), log=None, env=None):
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-rel-", dir="/tmp"), "vblk.sock")
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "vblk.cli", "serve", str(img),
                             "--socket-path", sock, "--log-level", "info", *args],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                            stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vblk exited {proc.returncode}"
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return proc, sock
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("vblk did not listen")


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def stop(proc, sig=signal.SIGTERM, timeout=10, traced=False):
    """Signal vblk (under strace: the supervisor, strace's child) and wait for its status."""
    if proc.poll() is None:
        target = children(proc.pid)[0] if traced else proc.pid
        os.kill(target, sig)
    return proc.wait(timeout)


def test_socket_is_private_by_default_and_mode_can_be_given(tmp_path):
    img = image(tmp_path)
    proc, sock = serve(img)
    try:
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    finally:
        stop(proc)
    proc, sock = serve(img, "--socket-mode", "0660", "--socket-group", "root")
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660
    finally:
        stop(proc)


# -- durability, from the system calls ---------------------------------------------------

SYSCALL = re.compile(r"^(\d+) +(\w+)\((\d+)")


def worker_fds(trace: str) -> dict[int, tuple[int, int]]:
    """pid -> (backing fd, completion fd), from the workers' execve lines."""
    fds = {}
    for line in trace.splitlines():
        if "execve(" in line and '"vblk.workers"' in line:
            pid = int(line.split()[0])
            # --disks is JSON (vblk.ipc.WorkerArgs): disk number -> a description whose first
            # key is the fd; strace escapes its quotes
            backing = int(re.search(r'"--disks", "\{\\"0\\": \{\\"fd\\": (\d+)', line).group(1))
            complete = int(re.search(r'"--complete-fd", "(\d+)"', line).group(1))
            fds[pid] = (backing, complete)
    return fds


def worker_calls(trace: str):
    fds = worker_fds(trace)
    for line in trace.splitlines():
        m = SYSCALL.match(line)
        if m and int(m.group(1)) in fds and "= -1" not in line:
            pid, name, fd = int(m.group(1)), m.group(2), int(m.group(3))
            backing, complete = fds[pid]
            if fd == backing and name in ("pwritev", "pwritev2", "pwrite64", "fdatasync", "fsync"):
                yield pid, "sync" if "sync" in name else "write"
            elif fd == complete and name == "write":
                yield pid, "complete"


def traced_run(tmp_path, *args, work, env=None):
    trace = tmp_path / "strace.txt"
    proc, sock = serve(image(tmp_path), "--workers", "2", *args, env=env,
                       prefix=["strace", "-f", "-qq", "-s", "200", "-o", str(trace),
                               "-e", "trace=execve,pwritev,pwritev2,pwrite64,fdatasync,fsync,"
                                     "write,io_uring_enter"])
    try:
        with BlkClient.connect(sock) as c:
            work(c)
    finally:
        assert stop(proc, timeout=30, traced=True) == 0
    return trace.read_text()


def test_writethrough_completes_a_write_only_after_fdatasync(tmp_path):
    """With the write ring off (VBLK_URING=0): the workers' system calls show it. (The
    ring's io-wq threads cannot be traced: see the next test and tests/unit/test_ring_io.)"""
    def work(c):
        tags = [c.submit(BlkType.OUT, 8 * i, data=bytes([i]) * 4096, publish=False) for i in range(24)]
        c.publish()
        assert all(d.status == BlkStatus.OK for d in c.wait(len(tags), timeout=30))

    env = {**os.environ, "VBLK_URING": "0"}
    calls = list(worker_calls(traced_run(tmp_path, work=work, env=env)))
    assert sum(kind == "write" for _, kind in calls) == 24
    dirty: dict[int, bool] = {}
    for pid, kind in calls:
        if kind == "write":
            dirty[pid] = True
        elif kind == "sync":
            dirty[pid] = False
        else:
            assert not dirty.get(pid), f"worker {pid} completed a write before syncing it"
    # group commit: the 24 writes were published together, so they share fdatasyncs
    syncs = sum(kind == "sync" for _, kind in calls)
    assert 1 <= syncs < 24, f"{syncs} fdatasyncs for 24 writes taken together"


def test_writethrough_writes_on_the_ring_share_fdatasyncs(tmp_path):
    """Durable writes on the write ring: no worker writes them, and the SQEs submitted are the
    24 writes plus the fdatasyncs that end their chains -- fewer than one per write (group
    commit). Each chain's fdatasync is linked after its writes, and a write completes only
    after its chain's fdatasync returned 0 (tests/unit/test_ring_io)."""
    def work(c):
        tags = [c.submit(BlkType.OUT, 8 * i, data=bytes([i]) * 4096, publish=False)
                for i in range(24)]
        c.publish()
        assert all(d.status == BlkStatus.OK for d in c.wait(len(tags), timeout=30))

    trace = traced_run(tmp_path, work=work)
    kinds = [kind for _, kind in worker_calls(trace)]
    assert kinds.count("write") == 0 and kinds.count("sync") == 0
    sqes = sum(int(n) for n in re.findall(r"^\d+ +io_uring_enter\(\d+, (\d+), .*= \d+$",
                                          trace, re.M))
    fdatasyncs = sqes - 24
    assert 1 <= fdatasyncs < 24, f"{fdatasyncs} fdatasyncs for 24 writes taken together"
    with open(tmp_path / "disk.img", "rb") as f:
        assert [f.read(4096) for _ in range(24)] == [bytes([i]) * 4096 for i in range(24)]


@pytest.mark.parametrize("ring", [True, False], ids=["write-ring", "workers"])
def test_writeback_writes_are_not_synced_but_flush_is(tmp_path, ring):
    """Write-back writes go to the disk's io_uring (vblk.supervisor.ringio), or with
    VBLK_URING=0 to the workers; either way no write is synced, and the FLUSH is."""
    def work(c):
        for i in range(16):
            assert c.write(8 * i, bytes([i]) * 4096).status == BlkStatus.OK
        assert c.flush().status == BlkStatus.OK

    env = None if ring else {**os.environ, "VBLK_URING": "0"}
    trace = traced_run(tmp_path, "--cache", "writeback", work=work, env=env)
    calls = list(worker_calls(trace))
    kinds = [kind for _, kind in calls]
    submitted = len(re.findall(r"^\d+ +io_uring_enter\(\d+, 1, .*= 1$", trace, re.M))
    if ring:   # one io_uring_enter per write (each was alone in its drain), none by a worker
        assert (kinds.count("write"), submitted) == (0, 16)
    else:
        assert (kinds.count("write"), submitted) == (16, 0)
        first_sync = kinds.index("sync")
        assert kinds[:first_sync].count("complete") == 16
    assert kinds.count("sync") == 1, "a write was synced in write-back mode"
    # the flush: its worker syncs, then completes
    first_sync = kinds.index("sync")
    pid = calls[first_sync][0]
    after = [kind for p, kind in calls[first_sync:] if p == pid]
    assert after[:2] == ["sync", "complete"]
    with open(tmp_path / "disk.img", "rb") as f:
        assert [f.read(4096) for _ in range(16)] == [bytes([i]) * 4096 for i in range(16)]


# -- shutdown ------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_finishes_requests_in_flight_then_exits_zero(tmp_path, sig):
    proc, sock = serve(image(tmp_path), "--workers", "2")
    c = BlkClient.connect(sock)
    try:
        workers = children(proc.pid)
        for w in workers:
            os.kill(w, signal.SIGSTOP)                 # hold the requests in flight
        try:
            tags = [c.submit(BlkType.OUT, 8 * i, data=b"z" * 4096, publish=False) for i in range(8)]
            c.publish()
            time.sleep(0.3)
            proc.send_signal(sig)
            time.sleep(0.3)
            assert proc.poll() is None, "vblk exited with requests in flight"
        finally:
            for w in workers:
                os.kill(w, signal.SIGCONT)
        done = c.wait(len(tags), timeout=20)
        assert sorted(d.tag for d in done) == sorted(tags)
        assert all(d.status == BlkStatus.OK for d in done)
    finally:
        c.close(graceful=False)       # vblk has hung up after finishing
    assert proc.wait(20) == 0


# -- a frontend that dies leaves nothing behind ---------------------------------------------

FRONTEND = r"""
import sys, random
sys.path.insert(0, sys.argv[2])
from vblk.testing.frontend import BlkClient
from vblk.virtio.constants import BlkType
c = BlkClient.connect(sys.argv[1], ram_mib=16)
print("connected", flush=True)
r = random.Random()
while True:
    tags = [c.submit(r.choice([BlkType.IN, BlkType.OUT]), 8 * r.randrange(4096),
                     **({"nbytes": 4096} if r.random() < 0.5 else {"data": b"q" * 4096}),
                     publish=False) for _ in range(8)]
    c.publish()
    c.wait(len(tags), timeout=10)
"""


def vblk_shm():
    """POSIX shared memory objects vblk might have left (it uses memfds, so none)."""
    return sorted(n for n in os.listdir("/dev/shm") if "vblk" in n)


def fd_targets(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def resources(pid):
    """Open fds and guest-memory mappings of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        guest_maps = sum(1 for line in f if "memfd:" in line and "vblk-" not in line)
    return fds, guest_maps


def test_twenty_frontend_kills_leak_nothing(tmp_path):
    kills = int(os.environ.get("VBLK_FRONTEND_KILLS", 20))
    proc, sock = serve(image(tmp_path), "--workers", "3")
    try:
        time.sleep(0.5)
        workers = sorted(children(proc.pid))
        before = {p: resources(p) for p in [proc.pid, *workers]}
        fds_before = {p: fd_targets(p) for p in [proc.pid, *workers]}
        shm_before = vblk_shm()
        for i in range(kills):
            fe = subprocess.Popen([sys.executable, "-c", FRONTEND, sock, str(REPO)],
                                  stdout=subprocess.PIPE, text=True)
            assert fe.stdout.readline().strip() == "connected"
            time.sleep(0.05 + 0.02 * (i % 5))
            fe.kill()
            fe.wait()
        # vblk notices each disconnect; give it a moment to release the last one
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            now = {p: resources(p) for p in [proc.pid, *workers] if os.path.exists(f"/proc/{p}")}
            if now == before:
                break
            time.sleep(0.1)
        assert sorted(children(proc.pid)) == workers, "a worker died or was added"
        assert now == before, (f"fds/mappings before {before}, after {now}; fds before "
                               f"{fds_before}, after { {p: fd_targets(p) for p in now} }")
        assert vblk_shm() == shm_before
        with BlkClient.connect(sock) as c:             # and it still serves
            assert c.write(0, b"ok" * 256).status == BlkStatus.OK
            assert c.read(0, 512).data == b"ok" * 256
    finally:
        assert stop(proc) == 0
