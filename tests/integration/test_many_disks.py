"""``vblk serve --config FILE``: several disks from one supervisor and one pool of workers.

Each disk gets its own image, socket and test frontend; the frontends run verified random
workloads at once (threads), each checked against its own model. Then the same with workers
SIGKILLed under all of them, and with a hostile frontend on one disk while another works.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vblk.control import request
from vblk.testing.cli import error_line, run_vblk
from vblk.testing.frontend import BackendError, BlkClient
from vblk.testing.model import DiskModel, Workload, read_back, run_stress, write_initial_image
from vblk.testing.processes import unix_listening
from vblk.virtio.blk import OUTHDR
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus, BlkType

MiB = 1 << 20
SECTORS = 16 * MiB // SECTOR_SIZE
REPO = Path(__file__).resolve().parents[2]
NEXT, WRITE = 1, 2


def worker_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def host_config(sock: str, images: list, *, workers: int, extra: dict | None = None) -> str:
    """A config file beside ``sock`` serving ``images``: disk i on d{i}.sock (disk 0 on
    ``sock`` itself, the one the launcher waits for), the host control socket host.ctl."""
    d = os.path.dirname(sock)
    lines = [f"workers = {workers}", f'control-socket = "{d}/host.ctl"']
    for i, image in enumerate(images):
        path = sock if i == 0 else f"{d}/d{i}.sock"
        lines += ["[[disk]]", f'name = "d{i}"', f'spec = "{image}"', f'socket-path = "{path}"']
        for key, value in (extra or {}).get(i, {}).items():
            lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true"))
    config = os.path.join(d, "host.toml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    return config


@pytest.fixture
def serve_many(launch, tmp_path):
    """serve_many(images, workers=N, extra={i: {key: value}}) -> (first socket, all sockets,
    host control socket, server)."""
    def start(images, *, workers=4, extra=None, env=None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))

        def cmd(sock):
            return [sys.executable, "-m", "vblk.cli", "serve", "--config",
                    host_config(sock, images, workers=workers, extra=extra)]
        server = launch("vblk", cmd, env=env, cwd=REPO)
        d = os.path.dirname(server)
        socks = [str(server)] + [f"{d}/d{i}.sock" for i in range(1, len(images))]
        # The launcher waited for the first disk's socket; the others come right after it.
        deadline = time.monotonic() + 20
        while not all(unix_listening(s) for s in socks + [f"{d}/host.ctl"]):
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        return socks, f"{d}/host.ctl", server
    return start


def images(tmp_path: Path, n: int) -> list[Path]:
    """``n`` images of SECTORS sectors; image i holds the initial writes of salt 1000 + i."""
    out = []
    for i in range(n):
        p = tmp_path / f"disk{i}.img"
        write_initial_image(str(p), SECTORS, salt=1000 + i)
        out.append(p)
    return out


def verified(sock: str, salt: int, seed: int, ops: int, *, qd: int = 8, rounds: int = 1,
             stop: threading.Event | None = None, model: DiskModel | None = None):
    """Run verified workloads on one disk; the problems seen and the ops done. ``model``: the
    caller's, to read the disk back against afterwards (``read_back``)."""
    model = DiskModel(SECTORS, salt) if model is None else model
    workload = Workload(seed, SECTORS, indirect_share=0.25, max_segments=4)
    problems, done = [], 0
    with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
        n = 0
        while n < rounds or (stop is not None and not stop.is_set()):
            report = run_stress(client, model, workload, ops, qd=qd, seed=seed)
            problems += report.bad_status + report.mismatches
            done += report.ops
            n += 1
        if client.flush().status != BlkStatus.OK:
            problems.append("final flush failed")
    return problems, done


def in_threads(jobs) -> list:
    results: list = [None] * len(jobs)
    errors: list = []

    def run(i, job):
        try:
            results[i] = job()
        except BaseException as exc:            # reported below, with the disk
            errors.append(f"job {i}: {exc!r}")
    threads = [threading.Thread(target=run, args=(i, j), daemon=True) for i, j in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_three_disks_served_at_once_from_one_process_tree(tmp_path, serve_many):
    imgs = images(tmp_path, 3)
    socks, host_ctl, server = serve_many(imgs, workers=3, extra={1: {"cache": "writeback"},
                                                                 2: {"num-queues": 2}})
    results = in_threads([lambda i=i, s=s: verified(s, 1000 + i, 10 + i, 600)
                          for i, s in enumerate(socks)])
    for i, (problems, ops) in enumerate(results):
        assert not problems, (i, problems[:5])
        assert ops == 600
    assert len(worker_pids(server.proc.pid)) == 3, "one pool of workers for all disks"
    answer = request(host_ctl, {"op": "stats"}, timeout=5)
    disks = answer["stats"]["disks"]
    assert sorted(disks) == ["d0", "d1", "d2"]
    for name, snap in disks.items():
        q = snap["queues"][0]
        assert q["requests"] > 0 and q["ioerr"] == 0 and q["refused"] == 0, (name, q)
    assert len(disks["d2"]["queues"]) == 2
    per_disk = request(socks[1] + ".ctl", {"op": "stats"}, timeout=5)["stats"]
    assert per_disk["info"]["disk"] == "d1" and per_disk["info"]["image"] == str(imgs[1])
    # the stats command shows every disk
    out = subprocess.run([sys.executable, "-m", "vblk.cli", "stats", "--control-socket", host_ctl],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert all(f"== disk d{i} ==" in out.stdout for i in range(3)), out.stdout


def test_twenty_disks_each_with_a_verified_workload_at_once(tmp_path, serve_many):
    imgs = images(tmp_path, 20)
    socks, host_ctl, server = serve_many(imgs, workers=8)
    results = in_threads([lambda i=i, s=s: verified(s, 1000 + i, 40 + i, 200, qd=4)
                          for i, s in enumerate(socks)])
    assert [problems for problems, _ in results] == [[]] * 20
    assert [ops for _, ops in results] == [200] * 20
    assert len(worker_pids(server.proc.pid)) == 8
    disks = request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]
    assert len(disks) == 20 and all(d["queues"][0]["ioerr"] == 0 for d in disks.values())


def test_an_rbd_disk_and_a_file_disk_in_one_config(tmp_path, ceph_cluster, rbd_image, serve_many):
    """The RBD disk runs on its own in-process engine, the file disk on the shared workers,
    both on the one loop."""
    name = rbd_image(SECTORS * SECTOR_SIZE)
    [initial] = images(tmp_path, 1)
    ceph_cluster.remove_image(name)
    ceph_cluster.import_image(name, initial)
    (tmp_path / "f").mkdir()
    [file_image] = images(tmp_path / "f", 1)             # the same initial writes (salt 1000)
    socks, host_ctl, server = serve_many([f"rbd:rbd/{name}:conf={ceph_cluster.conf}",
                                          file_image], workers=2)
    results = in_threads([lambda i=i, s=s: verified(s, 1000, 50 + i, 400, qd=8)
                          for i, s in enumerate(socks)])
    assert [problems for problems, _ in results] == [[], []]
    disks = request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]
    assert disks["d0"]["workers"]["count"] == 0 and disks["d1"]["workers"]["count"] == 2
    assert len(worker_pids(server.proc.pid)) == 2
    # an RBD disk is not removed at run time (vblk.supervisor.host), forced or not
    for force in ([], ["--force"]):
        line = error_line(run_vblk("disk", "remove", "--control-socket", host_ctl, "d0", *force))
        assert "disk d0 is an RBD disk, and an RBD disk cannot be removed at run time" in line
    assert sorted(request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]) == ["d0", "d1"]
    with BlkClient.connect(socks[0], ram_mib=8) as client:          # and it still serves
        assert client.write(0, b"\x77" * 4096).status == BlkStatus.OK
        assert client.read(0, 4096).data == b"\x77" * 4096


def test_worker_kills_reissue_the_slots_of_every_disk_and_lose_no_write(tmp_path, serve_many):
    imgs = images(tmp_path, 3)
    socks, host_ctl, server = serve_many(imgs, workers=3, extra={1: {"cache": "writeback"}},
                                         env={"VBLK_INLINE_READS": "0",
                                              "VBLK_URING": "0"})
    stop = threading.Event()
    kills = 0

    def killer():
        nonlocal kills
        rng = random.Random(5)
        try:
            while not stop.wait(0.1) and kills < 30:
                pids = worker_pids(server.proc.pid)
                if pids:
                    try:
                        os.kill(rng.choice(pids), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
        finally:
            stop.set()
    models = [DiskModel(SECTORS, 1000 + i) for i in range(len(socks))]
    try:
        results = in_threads([lambda i=i, s=s: verified(s, 1000 + i, 20 + i, 300, qd=16,
                                                        rounds=2, stop=stop, model=models[i])
                              for i, s in enumerate(socks)] + [killer])
    finally:
        stop.set()
    for i, (problems, _ops) in enumerate(results[:3]):
        assert not problems, (i, problems[:5])
    assert kills >= 10, kills
    # Every write acknowledged is in the image: every sector read back as the model says.
    for sock, model in zip(socks, models):
        with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
            assert read_back(client, model) == [], sock
    disks = request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]
    assert all(d["workers"]["restarts"] > 0 for d in disks.values())
    assert server.proc.poll() is None
    print(f"\n{kills} worker kills under 3 disks, 0 problems")


def hostile(sock: str, rounds: int) -> dict:
    """Malformed chains, garbage messages and abrupt disconnects on one disk."""
    seen = {"refused": 0, "dropped": 0}
    for r in range(rounds):
        try:
            with BlkClient.connect(sock, ram_mib=8, timeout=5) as c:
                hdr = c.allocator.alloc(64)
                c.ram.write(hdr, OUTHDR.pack(BlkType.OUT, 0, 8))
                c.submit_raw([(hdr, 16, NEXT, 1), (c.ram.end + 4096, 512, NEXT, 2),
                              (hdr + 16, 1, WRITE, 0)])          # data outside guest RAM
                c.submit_raw([(hdr, 16, NEXT, 0)])                # next points at itself
                c.submit_raw([(hdr, 16, NEXT, 200)])              # next outside the table
                done = c.wait(3, timeout=5)
                seen["refused"] += sum(1 for d in done if d.status != BlkStatus.OK)
                if r % 2:
                    c.broken = True                               # hang up, no goodbye
                    c.frontend.sock.close()
                    continue
                c.frontend.sock.sendall(b"\xff" * 64)             # not a vhost-user message
                c.broken = True
        except (BackendError, OSError):
            seen["dropped"] += 1
    with socket.socket(socket.AF_UNIX) as s:                      # connect, say nothing, go
        s.connect(sock)
    return seen


def test_a_hostile_frontend_on_one_disk_does_not_disturb_another(tmp_path, serve_many):
    imgs = images(tmp_path, 2)
    socks, host_ctl, server = serve_many(imgs, workers=2)
    stop = threading.Event()

    def victim():
        try:
            return verified(socks[1], 1001, 31, 300, qd=8, rounds=4)
        finally:
            stop.set()

    def attacker():
        n = 0
        while not stop.is_set():
            hostile(socks[0], 4)
            n += 1
        return n
    (problems, ops), attacks = in_threads([victim, attacker])
    assert not problems, problems[:5]
    assert attacks >= 1
    disks = request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]
    b = disks["d1"]
    assert b["frontend"]["connections"] == 1, "disk d1's frontend was never dropped"
    assert all(q["ioerr"] == 0 and q["refused"] == 0 for q in b["queues"])
    assert disks["d0"]["frontend"]["connections"] > 1
    assert server.proc.poll() is None
    # disk d0 still serves an honest frontend afterwards
    problems, _ = verified(socks[0], 1000, 32, 100)
    assert not problems


def test_a_config_with_one_bad_disk_is_refused_whole_and_touches_nothing(tmp_path):
    good = tmp_path / "good.img"
    good.write_bytes(bytes(MiB))
    before = good.stat().st_mtime_ns
    d = tmp_path / "s"
    d.mkdir()
    config = tmp_path / "host.toml"
    config.write_text(f'[[disk]]\nspec = "{good}"\nsocket-path = "{d}/a.sock"\n'
                      f'[[disk]]\nname = "broken"\nspec = "{tmp_path}/missing.img,writeback"\n'
                      f'socket-path = "{d}/b.sock"\n')
    out = subprocess.run([sys.executable, "-m", "vblk.cli", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vblk: error: "), out.stderr
    assert "disk 2 (broken)" in lines[0] and "missing.img" in lines[0], lines[0]
    assert os.listdir(d) == []
    assert good.stat().st_mtime_ns == before


def test_a_disk_whose_stop_waits_for_stalled_io_does_not_hold_up_another(tmp_path, serve_many):
    """Disk d0's frontend stops its ring (GET_VRING_BASE) while its write sits at a stopped
    worker: the stop waits for it, inside the message's handler. Meanwhile disk d1's reads
    (served from the page cache, in the loop) and its control socket are answered; d0's stop
    answers once its write is done, and the write is in the image. (Writes go to the workers
    here, not to the write ring, so that stopping the workers holds one.)"""
    imgs = images(tmp_path, 2)
    socks, host_ctl, server = serve_many(imgs, workers=2, env={"VBLK_URING": "0"})
    block = os.urandom(4096)
    with BlkClient.connect(socks[1], ram_mib=32, timeout=30) as b, \
            BlkClient.connect(socks[0], ram_mib=32, timeout=30) as a:
        expected = {s: os.urandom(4096) for s in range(0, 256, 8)}
        for sector, data in expected.items():            # through the workers, into the cache
            assert b.write(sector, data).status == BlkStatus.OK
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            tag = a.submit(BlkType.OUT, 800, data=block)
            stopped = {}
            stopper = threading.Thread(target=lambda: stopped.update(
                base=a.frontend.get_vring_base(0)), daemon=True)
            time.sleep(0.2)                              # the write is at a stopped worker
            stopper.start()
            time.sleep(0.3)                              # d0's stop is waiting for it
            started = time.monotonic()
            for sector, data in expected.items():
                r = b.read(sector, 4096)
                assert (r.status, r.data) == (BlkStatus.OK, data)
            stats = request(f"{socks[1]}.ctl", {"op": "stats"}, timeout=5)["stats"]
            took = time.monotonic() - started
            assert stopper.is_alive() and "base" not in stopped, "d0's stop did not wait"
            assert took < 5, f"d1 waited {took:.1f} s for d0's stop"
            assert stats["queues"][0]["types"]["read"]["requests"] >= len(expected)
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        stopper.join(30)
        assert stopped.get("base") == 1                   # d0's write was taken, and done
    with open(imgs[0], "rb") as f:
        f.seek(800 * SECTOR_SIZE)
        assert f.read(4096) == block
    assert tag and server.proc.poll() is None


def test_a_stop_that_gives_up_leaves_its_write_to_finish_without_touching_the_next_driver(
        tmp_path, serve_many):
    """A frontend stops its ring while its write sits at a stopped worker, and the stop gives
    up (VBLK_STOP_TIMEOUT=1): the write is orphaned. A new frontend connects (a new memory
    table: the old one stays mapped for the write) and starts the ring again before the write
    finishes; when it does, nothing reaches the new driver (its client fails on a used id it
    did not post), and its own I/O is served."""
    (img,) = images(tmp_path, 1)
    socks, _, server = serve_many([img], workers=2, env={"VBLK_URING": "0",
                                                         "VBLK_STOP_TIMEOUT": "1"})
    workers = worker_pids(server.proc.pid)
    with BlkClient.connect(socks[0], ram_mib=32, timeout=30) as a:
        assert a.write(0, bytes(4096)).status == BlkStatus.OK
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            a.submit(BlkType.OUT, 800, data=os.urandom(4096))
            time.sleep(0.2)                               # the write is at a stopped worker
            started = time.monotonic()
            assert a.frontend.get_vring_base(0) == 2      # taken, and given up on
            assert 0.9 < time.monotonic() - started < 10
        except BaseException:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            raise
    try:
        with BlkClient.connect(socks[0], ram_mib=32, timeout=30) as b:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 20
            while "event=orphan_finished" not in server.log(100_000):
                assert time.monotonic() < deadline, "the orphaned write never finished"
                time.sleep(0.05)
            block = os.urandom(4096)
            assert b.write(8, block).status == BlkStatus.OK
            r = b.read(8, 4096)
            assert (r.status, r.data) == (BlkStatus.OK, block)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    log_text = server.log(100_000)
    assert "event=requests_orphaned queue=0 count=1" in log_text
    assert "event=memory_table_kept requests=1" in log_text
    assert server.proc.poll() is None


def test_a_configs_old_writeback_key_costs_one_warning_line_naming_the_disk(tmp_path):
    image = tmp_path / "a.img"
    image.write_bytes(bytes(MiB))
    config = tmp_path / "host.toml"
    config.write_text(f'[[disk]]\nname = "old"\nspec = "{image}"\nwriteback = true\n'
                      f'socket-path = "{tmp_path}/no/such/dir/a.sock"\n')
    out = subprocess.run([sys.executable, "-m", "vblk.cli", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    # the warning comes when the file is read, before the (here refused) socket path is checked
    assert out.returncode == 2, out.stderr
    warning, error = out.stderr.splitlines()
    assert warning == (f'vblk: warning: {config}: disk 1 (old): writeback = true is deprecated '
                       f'(it still works): use cache = "writeback"')
    assert error.startswith(f"vblk: error: {config}: disk 1 (old): socket directory"), error


def test_a_disks_rate_limit_is_its_own(tmp_path, serve_many):
    """d0 is limited to 200 IOPS, d1 is not; both read at once: d0 keeps to its limit and d1
    runs far above it."""
    imgs = images(tmp_path, 2)
    socks, _, _ = serve_many(imgs, workers=2,
                             extra={0: {"iops-limit": "200", "iops-burst": "10"}})

    def reads(sock: str, n: int) -> float:
        with BlkClient.connect(sock, ram_mib=32, timeout=30) as c:
            started = time.monotonic()
            for i in range(n):
                assert c.read(i * 8 % SECTORS, 4096).status == BlkStatus.OK
            return time.monotonic() - started
    limited, free = in_threads([lambda: reads(socks[0], 130), lambda: reads(socks[1], 3000)])
    assert limited >= (130 - 20) / 200, f"d0: 130 reads in {limited:.2f} s"   # the burst, and a margin
    assert 3000 / free > 5 * 200, f"d1: 3000 reads in {free:.2f} s"
    print(f"\nd0 (200 IOPS limit) {130 / limited:.0f} IOPS, d1 {3000 / free:.0f} IOPS")


def test_one_client_process_loads_three_disks_at_once_each_counted_as_its_own(tmp_path,
                                                                              serve_many):
    """vblk.lab.client.run_together (the many-disk benchmark's client): one loop drives every
    disk; each Result is its own disk's -- the server's per-disk counters agree, and d1's rate
    limit shows in d1's figure only."""
    from vblk.lab.client import Runner, run_together
    from vblk.lab.workload import Workload as Load
    imgs = images(tmp_path, 3)
    socks, host_ctl, _ = serve_many(imgs, workers=2,
                                    extra={1: {"iops-limit": "200", "iops-burst": "10"}})
    runners = []
    try:
        for i, sock in enumerate(socks):
            load = Load(pattern="randrw", qd=4, duration=2.0, size=8 * MiB, seed=i + 1)
            runners.append(Runner(sock, load.checked()))
        results = run_together(runners)
    finally:
        for r in runners:
            r.close()
    disks = request(host_ctl, {"op": "stats"}, timeout=5)["stats"]["disks"]
    for i, r in enumerate(results):
        q = disks[f"d{i}"]["queues"][0]
        assert r.errors == 0 and q["ioerr"] == 0, (i, q)
        assert q["requests"] == r.ops and r.reads + r.writes == r.ops, (i, q, r.ops)
    limited, free = results[1], (results[0], results[2])
    assert limited.ops <= 200 * limited.seconds * 1.05 + 10 + 4, limited.ops
    assert all(r.ops > 4 * limited.ops for r in free), [r.ops for r in results]
    print(f"\nIOPS from one client: d0 {free[0].ops / free[0].seconds:.0f}, d1 (200 limit) "
          f"{limited.ops / limited.seconds:.0f}, d2 {free[1].ops / free[1].seconds:.0f}")


def test_a_disk_reading_from_the_cache_at_full_speed_leaves_the_loop_to_its_neighbour(
        tmp_path, serve_many):
    """d0 floods with cached 4k reads at QD32 (vblk bench, its own process), which the loop
    serves without a worker; d1's QD1 reads beside it still get turns. Without turns d1 got
    ~45 reads a second (one drain of d0 kept the loop as long as its driver refilled)."""
    imgs = images(tmp_path, 2)
    socks, _, _ = serve_many(imgs, workers=2)
    for sock in socks:                                   # the images into the page cache
        with BlkClient.connect(sock, ram_mib=32, timeout=30) as c:
            for s in range(0, SECTORS, 256):
                assert c.read(s, 128 * 1024).status == BlkStatus.OK
    flood = subprocess.Popen([sys.executable, "-m", "vblk.cli", "bench", "--socket-path", socks[0],
                              "--pattern", "randread", "--qd", "32", "--duration", "6", "--json"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        time.sleep(1.5)
        with BlkClient.connect(socks[1], ram_mib=32, timeout=30) as c:
            done, started = 0, time.monotonic()
            while time.monotonic() - started < 2:
                assert c.read(done * 8 % SECTORS, 4096).status == BlkStatus.OK
                done += 1
        assert flood.poll() is None, "the flood ended before d1 was measured"
    finally:
        flooded = json.loads(flood.communicate(timeout=30)[0])
    assert flooded["errors"] == 0 and flooded["iops"] > 1000, flooded
    assert done >= 1000, f"d1 did {done} reads in 2 s beside d0's {flooded['iops']:.0f} IOPS"
    print(f"\nd1 {done / 2:.0f} IOPS at QD1 beside d0's flood of {flooded['iops']:.0f} IOPS")


def logged(server, words: str, timeout: float = 10.0) -> str:
    """The first line of the server's log holding ``words`` (waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in server.log().splitlines():
            if words in line:
                return line
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_the_polling_window_is_set_by_the_host_config_and_by_poll_us(tmp_path, launch,
                                                                     vblk_server):
    """``poll-us`` in the config, ``--poll-us`` over it, and ``--poll-us`` of one disk: the
    window the loop runs with (its listening line says which), and a disk served with
    polling off still answers."""
    def cmd(sock, name, *extra):
        (tmp_path / name).mkdir()
        config = host_config(sock, images(tmp_path / name, 2), workers=2)
        text = open(config).read()
        with open(config, "w") as f:                    # a host key goes before the tables
            f.write("poll-us = 120\n" + text)
        return [sys.executable, "-m", "vblk.cli", "serve", "--config", config, *extra]
    from_file = launch("vblk", lambda sock: cmd(sock, "a"), cwd=REPO)
    assert "poll_us=120" in logged(from_file, "event=listening")
    overridden = launch("vblk", lambda sock: cmd(sock, "b", "--poll-us", "7"), cwd=REPO)
    assert "poll_us=7" in logged(overridden, "event=listening")
    off = vblk_server(images(tmp_path, 1)[0], "--poll-us", "0")
    assert "poll_us=0" in logged(off, "event=listening")
    with BlkClient.connect(off, ram_mib=32, timeout=30) as c:
        for i in range(200):
            assert c.read(i * 8 % SECTORS, 4096).status == BlkStatus.OK


def test_serve_check_says_what_would_be_served_and_serves_nothing(tmp_path, serve_many):
    """``--check`` runs every check serving would -- the config, the images, their locks -- and
    exits: 0 with what would be served, or the refusal serving would give, creating nothing."""
    imgs = images(tmp_path, 2)
    d = tmp_path / "check"
    d.mkdir()
    config = tmp_path / "check.toml"
    config.write_text("workers = 3\n" + "".join(
        f'[[disk]]\nname = "c{i}"\nspec = "{img}"\nsocket-path = "{d}/c{i}.sock"\n'
        for i, img in enumerate(imgs)))
    ok = run_vblk("serve", "--config", config, "--check")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == [
        f"ok: {config}: would serve 2 disks with 3 workers",
        f"  disk 1 (c0): {imgs[0]} on {d}/c0.sock", f"  disk 2 (c1): {imgs[1]} on {d}/c1.sock"]
    single = run_vblk("serve", imgs[0], "--socket-path", d / "one.sock", "--check")
    assert single.returncode == 0 and single.stdout.startswith(f"ok: would serve {imgs[0]}")
    assert os.listdir(d) == []
    # the same image while a vblk serves it: its lock refuses it, as serving would
    serve_many([imgs[1]], workers=1)
    line = error_line(run_vblk("serve", "--config", config, "--check"))
    assert "disk 2 (c1)" in line and "in use by another process" in line, line
    assert os.listdir(d) == []
