"""``vblk disk add`` / ``vblk disk remove`` against a running ``vblk serve --config``: real
processes, sockets, images and locks.

A disk added at run time serves verified I/O and shows in ``vblk stats``; an add refused for
any reason changes nothing (no socket, no lock, no fd in any process, the same workers and
stats); a remove is refused while a frontend is connected, and a forced one completes every
request in flight before it lets go of socket, lock and slots; a disk added again gets the
same slot range back; the other disks keep serving throughout; a worker killed under an added
disk loses none of its writes.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.integration import test_many_disks
from tests.integration.test_many_disks import REPO, SECTORS, images, in_threads, verified, worker_pids
from vblk.backing import locks
from vblk.control import request
from vblk.testing.cli import error_line, run_vblk
from vblk.testing.frontend import BlkClient
from vblk.testing.model import DiskModel, Workload, run_stress
from vblk.testing.model import read_back as read_all
from vblk.testing.processes import unix_listening
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus, BlkType

F_OFD_GETLK = 36
serve_many = test_many_disks.serve_many          # the fixture: a vblk serve --config


# Every request through the workers (reads and writes alike), so that stopping or killing
# them holds or re-issues what is in flight.
THROUGH_WORKERS = {"VBLK_INLINE_READS": "0", "VBLK_URING": "0"}


def disk_file(path: Path, **keys) -> Path:
    """A ``vblk disk add`` file: one [[disk]] table with ``keys`` (``_`` spelled ``-``)."""
    lines = ["[[disk]]"]
    for key, value in keys.items():
        text = json.dumps(value) if not isinstance(value, Path) else json.dumps(str(value))
        lines.append(f"{key.replace('_', '-')} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


def add(ctl: str, path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_vblk("disk", "add", "--control-socket", ctl, path, *extra)


def remove(ctl: str, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_vblk("disk", "remove", "--control-socket", ctl, name, *extra)


def host_stats(ctl: str) -> dict:
    return request(ctl, {"op": "stats"}, timeout=10)["stats"]


def lock_on(path: Path) -> int | None:
    """The lock some process holds on any byte of ``path`` (F_RDLCK / F_WRLCK), or None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        answer = fcntl.fcntl(fd, F_OFD_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
    finally:
        os.close(fd)
    kind = struct.unpack("hhqqi4x", answer)[0]
    return None if kind == fcntl.F_UNLCK else kind


def holders(pids: list[int], path: Path) -> list[int]:
    """Which of ``pids`` have ``path`` open."""
    target = os.path.realpath(path)
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    out.append(pid)
                    break
            except OSError:
                pass
    return out


def wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def stress_and_model(sock: str, salt: int, seed: int, ops: int, *, qd: int,
                     stop: threading.Event) -> tuple[list[str], int, DiskModel]:
    """A verified random workload on ``sock`` (rounds of ``ops`` until ``stop``): its problems,
    its ops and the model of what the disk must hold now."""
    model = DiskModel(SECTORS, salt)
    workload = Workload(seed, SECTORS, indirect_share=0.25, max_segments=4)
    problems, done = [], 0
    with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
        while not done or not stop.is_set():
            report = run_stress(client, model, workload, ops, qd=qd, seed=seed)
            problems += report.bad_status + report.mismatches
            done += report.ops
    return problems, done, model


def read_back(sock: str, model: DiskModel) -> list[str]:
    """Every sector of the disk, read by a new frontend, against ``model``."""
    with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
        return read_all(client, model)


def zeroed_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(SECTORS * SECTOR_SIZE)
    return path


def forced_remove_of_requests_in_flight(ctl: str, server, client: BlkClient, name: str,
                                        writes: list[tuple[int, bytes]],
                                        while_waiting=lambda: None) -> dict:
    """Submit ``writes`` (sector, data) on ``client`` while every worker is stopped, so that
    vblk has taken them all and none is done; then ``vblk disk remove NAME --force``, and
    let the workers go on once it waits for them. Asserts that every write completed OK in
    the used ring; vblk's answer."""
    workers = worker_pids(server.proc.pid)
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        tags = [client.submit(BlkType.OUT, sector, data=data) for sector, data in writes]
        wait_until(lambda: host_stats(ctl)["disks"][name]["queues"][0]["in_flight"] == len(writes),
                   "every request taken by vblk")
        remover = subprocess.Popen([sys.executable, "-m", "vblk.cli", "disk", "remove",
                                    "--control-socket", ctl, name, "--force", "--json"],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(1.0)
        assert remover.poll() is None, "the remove did not wait for the requests in flight"
        while_waiting()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    out, err = remover.communicate(timeout=60)
    assert remover.returncode == 0, err
    done = client.wait(len(writes), timeout=10)       # in the used ring before the hang-up
    assert sorted(c.tag for c in done) == tags
    assert all(c.status == BlkStatus.OK for c in done)
    return json.loads(out)


# -- adding ----------------------------------------------------------------------------------

def test_an_added_disk_serves_verified_io_beside_the_others_and_shows_in_stats(tmp_path,
                                                                              serve_many):
    imgs = images(tmp_path, 2)
    socks, ctl, server = serve_many(imgs[:1], workers=2)
    sock = os.path.join(os.path.dirname(socks[0]), "vm1.sock")
    path = disk_file(tmp_path / "vm1.toml", name="vm1", spec=imgs[1], socket_path=sock,
                     num_queues=2, writeback=True)
    result = add(ctl, path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f'vblk: warning: {path}: disk 2 (vm1): writeback = true is deprecated '
                             f'(it still works): use cache = "writeback"\n')
    assert request(sock + ".ctl", {"op": "stats"})["stats"]["info"]["disk"] == "vm1"
    assert result.stdout == (f"added disk vm1 (disk 2): listening on {sock}, control "
                             f"{sock}.ctl, slots 64..127\n")
    assert unix_listening(sock) and lock_on(imgs[1]) == fcntl.F_WRLCK
    workers = worker_pids(server.proc.pid)
    assert len(workers) == 2 and holders(workers, imgs[1]) == workers   # each got its fd
    results = in_threads([lambda: verified(sock, 1001, 5, 400), lambda: verified(socks[0], 1000, 6, 400)])
    assert results == [([], 400), ([], 400)]
    snap = host_stats(ctl)
    assert sorted(snap["disks"]) == ["d0", "vm1"]
    assert len(snap["disks"]["vm1"]["queues"]) == 2
    assert snap["disks"]["vm1"]["queues"][0]["requests"] >= 400
    assert snap["slots"]["capacity"] - snap["slots"]["free"] == 128
    assert request(sock + ".ctl", {"op": "stats"})["stats"]["info"]["disk"] == "vm1"
    shown = run_vblk("stats", "--control-socket", ctl)
    assert shown.returncode == 0 and "== disk vm1 ==" in shown.stdout and "== disk d0 ==" in shown.stdout
    assert "2 disks" in shown.stdout
    assert server.stop() == 0                         # SIGTERM: the added disk goes too
    assert not os.path.exists(sock) and not os.path.exists(sock + ".ctl")
    assert lock_on(imgs[1]) is None
    assert "disk=vm1 event=disk_added" in server.log(100_000)


def test_an_add_refused_for_any_reason_changes_nothing(tmp_path, serve_many):
    imgs = images(tmp_path, 1)
    fresh = zeroed_image(tmp_path / "fresh.img")
    held = zeroed_image(tmp_path / "held.img")
    socks, ctl, server = serve_many(imgs, workers=2)
    new = os.path.join(os.path.dirname(socks[0]), "new.sock")
    tree = [server.proc.pid, *worker_pids(server.proc.pid)]
    before = host_stats(ctl)
    held_fd = os.open(held, os.O_RDWR)
    locks.take_lock(held_fd, str(held), 0, SECTORS * SECTOR_SIZE, False)     # another's lock
    ok = {"name": "x", "spec": fresh, "socket_path": new}
    cases = [
        ("a name served already", {**ok, "name": "d0"}, "name d0 is already disk 1 (d0)'s name"),
        ("a socket served already", {**ok, "socket_path": socks[0]},
         f"socket-path {socks[0]} is already disk 1 (d0)'s socket-path"),
        ("the host's control socket", {**ok, "control_socket": ctl},
         f"control-socket {ctl} is already the host's control-socket"),
        ("a served writer's bytes", {**ok, "spec": f"{imgs[0]},ro,range=8/8"},
         "overlaps disk 1 (d0)'s and one of them is writable"),
        ("a missing image", {**ok, "spec": str(tmp_path / "missing.img")}, "missing.img"),
        ("an unknown key", {**ok, "frob": 1}, "unknown key 'frob'"),
        ("a bad option", {**ok, "spec": f"{fresh},bogus"}, "unknown option 'bogus'"),
        ("a bad value", {**ok, "num_queues": "2"}, "num-queues = '2' is not an integer"),
        ("a relative path", {**ok, "spec": "fresh.img"}, "spec: fresh.img is a relative path"),
        ("an RBD image", {**ok, "spec": "rbd:rbd/img"}, "an RBD disk cannot be added at run time"),
        ("no room for its slots", {**ok, "slots": 8192}, "no room for its 8192 slots: 4096 of "
                                                        "the slot area's 4160 are free"),
        ("a lock another holds", {**ok, "spec": held}, f"{held} bytes 0..{SECTORS * SECTOR_SIZE} "
                                                       f"are in use by another process"),
    ]
    try:
        for what, table, message in cases:
            path = disk_file(tmp_path / "x.toml", **table)
            line = error_line(add(ctl, path))
            assert line.startswith(f"{path}: disk 2 ("), (what, line)
            assert message in line, (what, line)
            assert not os.path.exists(new) and not os.path.exists(new + ".ctl"), what
            assert lock_on(fresh) is None, what
            assert holders(tree, fresh) == [] and holders(tree, held) == [], what
            assert worker_pids(server.proc.pid) == tree[1:], what
            after = host_stats(ctl)
            assert list(after["disks"]) == ["d0"] and after["slots"] == before["slots"], what
        # refused before vblk is asked: the file is not one disk table
        two = tmp_path / "two.toml"
        two.write_text(f'[[disk]]\nspec = "{fresh}"\nsocket-path = "{new}"\n' * 2)
        assert "holds one [[disk]] table and nothing else" in error_line(add(ctl, two))
    finally:
        os.close(held_fd)
    assert verified(socks[0], 1000, 3, 200) == ([], 200)
    assert server.log(100_000).count("event=disk_add_refused") == len(cases)
    # the same disk, with nothing wrong, is served: what refused it was the one fault
    assert add(ctl, disk_file(tmp_path / "x.toml", **ok)).returncode == 0
    assert unix_listening(new) and lock_on(fresh) == fcntl.F_WRLCK


# -- removing --------------------------------------------------------------------------------

def test_remove_is_refused_while_a_frontend_is_connected_then_frees_socket_lock_and_fds(
        tmp_path, serve_many, vblk_server):
    imgs = images(tmp_path, 2)
    socks, ctl, server = serve_many(imgs, workers=2)
    tree = [server.proc.pid, *worker_pids(server.proc.pid)]
    with BlkClient.connect(socks[1], ram_mib=16) as client:
        line = error_line(remove(ctl, "d1"))
        assert line.startswith("disk d1 has a frontend connected") and "--force" in line, line
        assert client.write(0, b"\x5a" * 4096).status == BlkStatus.OK       # still served
    assert "no disk named 'nope' is served (disks: d0, d1)" in error_line(remove(ctl, "nope"))
    assert "is not the control socket of a vblk serve --config" in \
        error_line(remove(ctl.replace("host.ctl", "d1.sock.ctl"), "d1"))
    assert "no control socket at" in error_line(remove(ctl + ".gone", "d1"), status=1)
    wait_until(lambda: not host_stats(ctl)["disks"]["d1"]["frontend"]["connected"],
               "the frontend's hang-up seen")
    result = remove(ctl, "d1")
    assert (result.returncode, result.stdout) == (0, "removed disk d1 (no frontend was connected)\n")
    assert not os.path.exists(socks[1]) and not os.path.exists(socks[1] + ".ctl")
    assert lock_on(imgs[1]) is None
    snap = host_stats(ctl)
    assert list(snap["disks"]) == ["d0"] and snap["slots"]["free"] == snap["slots"]["capacity"] - 64
    wait_until(lambda: holders(tree, imgs[1]) == [], "every worker closed the image")
    assert "== disk d1 ==" not in run_vblk("stats", "--control-socket", ctl).stdout
    # the image is free: a plain vblk serves it, and what the client wrote is there
    plain = vblk_server(imgs[1])
    with BlkClient.connect(plain) as client:
        assert client.read(0, 4096).data == b"\x5a" * 4096
    assert verified(socks[0], 1000, 9, 200) == ([], 200)


def test_a_forced_remove_completes_every_request_in_flight_then_lets_go(tmp_path, serve_many,
                                                                       vblk_server):
    imgs = images(tmp_path, 2)
    socks, ctl, server = serve_many(imgs, workers=2, env=THROUGH_WORKERS)
    n = 40                                           # 3 descriptors each: 120 of 128

    def still_held():
        assert os.path.exists(socks[1]) and lock_on(imgs[1]) == fcntl.F_WRLCK
    with BlkClient.connect(socks[1], ram_mib=16, timeout=30) as client:
        client.broken = True                          # vblk hangs up: nothing to stop
        answer = forced_remove_of_requests_in_flight(
            ctl, server, client, "d1", [(i * 8, bytes([i + 1]) * 4096) for i in range(n)],
            still_held)
    assert answer == {"ok": True, "disk": "d1", "frontend_dropped": True, "completed": n,
                      "still_in_flight": 0}
    data = imgs[1].read_bytes()
    assert all(data[i * 8 * SECTOR_SIZE:][:4096] == bytes([i + 1]) * 4096 for i in range(n))
    assert not os.path.exists(socks[1]) and lock_on(imgs[1]) is None
    assert list(host_stats(ctl)["disks"]) == ["d0"]
    with BlkClient.connect(vblk_server(imgs[1])) as c:
        assert c.read(8 * (n - 1), 4096).data == bytes([n]) * 4096
    assert verified(socks[0], 1000, 4, 200) == ([], 200)


def test_a_disk_added_and_force_removed_again_and_again_beside_a_busy_one(tmp_path, serve_many):
    """Disk d0 runs a verified workload the whole time; disk a comes and goes with requests
    in flight (its and d0's), and gets the same slot range back every time."""
    imgs = images(tmp_path, 2)
    socks, ctl, server = serve_many(imgs[:1], workers=2, env=THROUGH_WORKERS)
    sock = os.path.join(os.path.dirname(socks[0]), "a.sock")
    path = disk_file(tmp_path / "a.toml", name="a", spec=imgs[1], socket_path=sock)
    stop = threading.Event()
    ranges, answers = [], []

    def churn():
        try:
            for cycle in range(4):
                result = add(ctl, path, "--json")
                assert result.returncode == 0, result.stderr
                ranges.append(json.loads(result.stdout)["slots"])
                with BlkClient.connect(sock, ram_mib=16, timeout=30) as client:
                    client.broken = True
                    writes = [(i * 16, bytes([cycle * 16 + i + 1]) * 8192) for i in range(16)]
                    answers.append(forced_remove_of_requests_in_flight(ctl, server, client, "a",
                                                                       writes))
                assert not os.path.exists(sock) and lock_on(imgs[1]) is None
        finally:
            stop.set()
    (problems, ops), _ = in_threads([lambda: verified(socks[0], 1000, 8, 150, qd=8, stop=stop),
                                     churn])
    assert problems == [] and ops >= 150
    assert ranges == [[64, 64]] * 4                  # the removed disk's range, reused
    assert [a["completed"] for a in answers] == [16] * 4
    data = imgs[1].read_bytes()
    assert all(data[i * 16 * SECTOR_SIZE:][:8192] == bytes([48 + i + 1]) * 8192 for i in range(16))
    snap = host_stats(ctl)
    d0 = snap["disks"]["d0"]
    assert list(snap["disks"]) == ["d0"] and snap["slots"]["free"] == snap["slots"]["capacity"] - 64
    assert d0["frontend"]["connections"] == 2, "d0's frontend was dropped"   # the probe + 1
    assert all(q["ioerr"] == 0 and q["refused"] == 0 for q in d0["queues"])


def test_worker_kills_lose_no_write_of_a_disk_added_at_run_time(tmp_path, serve_many):
    imgs = images(tmp_path, 2)
    socks, ctl, server = serve_many(imgs[:1], workers=3, env=THROUGH_WORKERS)
    sock = os.path.join(os.path.dirname(socks[0]), "a.sock")
    result = add(ctl, disk_file(tmp_path / "a.toml", name="a", spec=imgs[1], socket_path=sock))
    assert result.returncode == 0, result.stderr
    stop = threading.Event()
    killed: set[int] = set()        # a worker killed twice (not reaped yet) died once

    def killer():
        rng = random.Random(11)
        try:
            while not stop.wait(0.1) and len(killed) < 30:
                pids = worker_pids(server.proc.pid)
                if pids:
                    pid = rng.choice(pids)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                    except ProcessLookupError:
                        pass
        finally:
            stop.set()
    try:
        (problems, ops, model), _ = in_threads([lambda: stress_and_model(sock, 1001, 21, 300, qd=16,
                                                                         stop=stop), killer])
    finally:
        stop.set()
    assert problems == [], problems[:5]
    assert len(killed) >= 10, killed
    # every write acknowledged is in the image, read back by a new frontend
    assert read_back(sock, model) == []
    snap = host_stats(ctl)
    assert snap["disks"]["a"]["workers"]["restarts"] >= len(killed)
    assert all(q["ioerr"] == 0 for q in snap["disks"]["a"]["queues"])
    assert server.proc.poll() is None
    print(f"\n{len(killed)} workers killed under a disk added at run time, {ops} ops, 0 problems")
