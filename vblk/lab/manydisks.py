"""What a disk costs when one vblk serves many: PSS of the whole process tree with N idle
disks, against one qemu-storage-daemon exporting the same N images, in the same run.

``python -m vblk.lab.manydisks [--disks 1,10,50,100] [--workers 8]`` makes N sparse images,
serves them with ``vblk serve --config`` (one supervisor, one pool of workers) and waits until
every socket listens, then reads the proportional set size (``/proc/PID/smaps_rollup``) of
every process of the tree; the same for ``qemu-storage-daemon`` with N ``--export``s. The
table: disks, vblk processes, vblk PSS, vblk's cost per disk beyond the first (the PSS over
the one-disk figure, divided by N - 1), qsd PSS and qsd's per-disk cost. Idle means listening
with no frontend connected: what a host pays for disks whose VMs are not running, and the
floor under the per-disk cost of a running one (a frontend adds its rings and, in every
process that touches it, the page tables of its guest RAM; the RAM itself is the frontend's).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vblk.lab.scaling import pss_bytes
from vblk.lab.servers import group_cpu_seconds, group_pids
from vblk.testing.processes import unix_listening
from vblk.units import MiB

IMAGE_BYTES = 64 * MiB
SETTLE_SECONDS = 2.0          # after the last socket listens: let start-up garbage go


def write_images(directory: str, n: int, filled: bool = False) -> list[str]:
    """``n`` images of IMAGE_BYTES, sparse (or ``filled`` with random bytes: blocks on the
    device, for reads that reach it)."""
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"disk{i}.img")
        with open(path, "wb") as f:
            if filled:
                for _ in range(IMAGE_BYTES // MiB):
                    f.write(os.urandom(MiB))
            else:
                f.truncate(IMAGE_BYTES)
        paths.append(path)
    return paths


def vblk_config(directory: str, images: list[str], workers: int,
                slot_capacity: int | None = None, disk_keys: tuple[str, ...] = ()) -> str:
    """The config serving ``images``; with ``slot_capacity``, a host control socket (room for
    ``vblk disk add``) and a slot area of that many slots (0: the default room);
    ``disk_keys``: lines every ``[[disk]]`` table gets."""
    lines = [f"workers = {workers}", 'log-level = "warning"']
    if slot_capacity is not None:
        lines.append(f'control-socket = "{directory}/host.ctl"')
        if slot_capacity:
            lines.append(f"slot-capacity = {slot_capacity}")
    for i, image in enumerate(images):
        lines += ["[[disk]]", f'spec = "{image}"', f'socket-path = "{directory}/v{i}.sock"',
                  *disk_keys]
    path = os.path.join(directory, "host.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def qsd_args(directory: str, images: list[str], direct: bool = False) -> list[str]:
    args = ["qemu-storage-daemon"]
    cache = "on" if direct else "off"
    for i, image in enumerate(images):
        args += ["--blockdev", f"driver=file,node-name=f{i},filename={image},cache.direct={cache}",
                 "--blockdev", f"driver=raw,node-name=d{i},file=f{i}",
                 "--export", f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,"
                             f"addr.path={directory}/q{i}.sock,writable=on"]
    return args


@contextlib.contextmanager
def serving(cmds: list[list[str]], sockets: list[str], env: dict | None = None,
            timeout: float = 120.0):
    """Start each command in a process group of its own and wait until every socket listens
    (RuntimeError if a server exits first or ``timeout`` passes); the processes, stopped
    (SIGTERM, SIGKILL after 30 s) on the way out."""
    procs = []
    log = tempfile.TemporaryFile()            # the servers' stderr: a pipe could fill up
    try:
        for cmd in cmds:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=log, env=env, start_new_session=True))
        deadline = time.monotonic() + timeout
        for sock in sockets:
            while not unix_listening(sock):
                for proc in procs:
                    if proc.poll() is not None:
                        log.seek(0)
                        raise RuntimeError(f"{proc.args[0]} exited: "
                                           f"{log.read().decode(errors='replace')[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{sock} not listening within {timeout:g} s")
                time.sleep(0.05)
        yield procs
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def tree_pss(cmd: list[str], sockets: list[str], timeout: float = 120.0,
             connected: bool = False) -> tuple[int, int]:
    """Start ``cmd`` in a process group of its own, wait until every socket listens, then
    (PSS of the group in bytes, processes in it); the group is stopped afterwards. With
    ``connected``, a test frontend (32 MiB of guest RAM) is connected to every socket and has
    written and read 1 MiB through it when PSS is read, the guest RAM left out of the
    figure (it is the frontend's)."""
    with serving([cmd], sockets, timeout=timeout) as (proc,), contextlib.ExitStack() as clients:
        if connected:
            for sock in sockets:
                clients.enter_context(_exercised_client(sock))
        time.sleep(SETTLE_SECONDS)
        pids = group_pids(proc.pid)
        total = 0
        for pid in pids:
            try:
                total += pss_bytes(pid, without_guest_ram=connected)
            except OSError:
                pass
        return total, len(pids)


@contextlib.contextmanager
def _exercised_client(sock: str):
    from vblk.testing.frontend import BlkClient
    with BlkClient.connect(sock, ram_mib=32, timeout=30) as client:
        for i in range(16):
            client.write(i * 128, bytes([i]) * 65536)
            client.read(i * 128, 65536)
        yield client


def measure(counts: list[int], workers: int, qsd: bool, connected: bool = False,
            slot_capacity: int | None = None) -> list[dict]:
    rows = []
    for n in counts:
        directory = tempfile.mkdtemp(prefix="vblk-many-", dir="/tmp")
        try:
            images = write_images(directory, n)
            config = vblk_config(directory, images, workers, slot_capacity)
            vblk_cmd = [sys.executable, "-m", "vblk.cli", "serve", "--config", config]
            pss, procs = tree_pss(vblk_cmd, [f"{directory}/v{i}.sock" for i in range(n)],
                                  connected=connected)
            row = {"disks": n, "vblk_pss": pss, "vblk_processes": procs}
            if qsd and shutil.which("qemu-storage-daemon"):
                row["qsd_pss"], _ = tree_pss(qsd_args(directory, images),
                                             [f"{directory}/q{i}.sock" for i in range(n)],
                                             connected=connected)
            rows.append(row)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return rows


def per_disk(row: dict, first: dict, key: str) -> str:
    """What each disk beyond the first row's costs, from ``key``'s PSS."""
    if key not in row or key not in first or row["disks"] == first["disks"]:
        return "-"
    return f"{(row[key] - first[key]) / (row['disks'] - first['disks']) / MiB:.2f} MiB"


def format_table(rows: list[dict]) -> str:
    first = rows[0]
    lines = [f"{'disks':>5}  {'vblk procs':>10}  {'vblk PSS':>10}  {'per disk > 1st':>14}  "
             f"{'qsd PSS':>9}  {'per disk > 1st':>14}"]
    for r in rows:
        qsd = f"{r['qsd_pss'] / MiB:.1f} MiB" if "qsd_pss" in r else "-"
        lines.append(f"{r['disks']:>5}  {r['vblk_processes']:>10}  {r['vblk_pss'] / MiB:>6.1f} MiB  "
                     f"{per_disk(r, first, 'vblk_pss'):>14}  {qsd:>9}  "
                     f"{per_disk(r, first, 'qsd_pss'):>14}")
    return "\n".join(lines)


def bench(sock: str, qd: int, seconds: float, pattern: str = "randread") -> subprocess.Popen:
    """``vblk bench`` 4 KiB ``pattern`` at ``qd`` on ``sock``, in a process of its own (a
    flooding client in this interpreter would take the GIL from the measuring one)."""
    return subprocess.Popen([sys.executable, "-m", "vblk.cli", "bench", "--socket-path", sock,
                             "--pattern", pattern, "--qd", str(qd), "--duration",
                             str(seconds), "--json"], stdout=subprocess.PIPE, text=True)


def bench_together(socks: list[str], qd: int, seconds: float, pattern: str = "randread"):
    """4 KiB ``pattern`` at ``qd`` on every one of ``socks`` at once from this process, one
    loop for all (vblk.lab.client.run_together): a Result per disk."""
    from vblk.lab.client import Runner, run_together
    from vblk.lab.workload import Workload
    runners = []
    try:
        for i, sock in enumerate(socks):
            w = Workload(pattern=pattern, qd=qd, duration=seconds, seed=i + 1).checked()
            runners.append(Runner(sock, w))
        return run_together(runners)
    finally:
        for r in runners:
            r.close()


@dataclasses.dataclass(frozen=True)
class FairnessSetup:
    what: str                       # what serves the two disks, and how their I/O goes
    server: str = "vblk"            # "vblk" (one, both disks), "two-vblks" or "qsd"
    pattern: str = "randread"       # both disks' 4 KiB pattern
    cache: str = "page"             # "page": the page cache; "direct": O_DIRECT to the device;
    #                                 "writeback": writes to the page cache
    env: tuple[tuple[str, str], ...] = ()


_THROUGH_WORKERS = (("VBLK_INLINE_READS", "0"), ("VBLK_URING", "0"))
FAIRNESS_SETUPS = {
    "vblk": FairnessSetup("one vblk, both disks; reads served from the page cache in the loop"),
    "vblk-workers": FairnessSetup("one vblk, both disks; every read through a worker (from "
                                  "the page cache: CPU-bound)", env=_THROUGH_WORKERS),
    "vblk-two-trees": FairnessSetup("two vblks, one disk each; every read through a worker",
                                    server="two-vblks", env=_THROUGH_WORKERS),
    "qsd": FairnessSetup("one qemu-storage-daemon, both exports", server="qsd"),
    "vblk-direct": FairnessSetup("one vblk, both disks nocache: O_DIRECT reads of the device",
                                 cache="direct"),
    "qsd-direct": FairnessSetup("one qsd, both exports cache.direct=on", server="qsd",
                                cache="direct"),
    "vblk-writes": FairnessSetup("one vblk, both disks write-back: 4 KiB random writes",
                                 pattern="randwrite", cache="writeback"),
    "qsd-writes": FairnessSetup("one qsd, both exports write-back: 4 KiB random writes",
                                server="qsd", pattern="randwrite", cache="writeback"),
}


def _pair_setup(setup: FairnessSetup, directory: str, images: list[str], workers: int):
    """What serves the two images in ``setup``: (commands, the two sockets, environment)."""
    env = dict(os.environ, **dict(setup.env))
    if setup.server == "qsd":
        cmds = [qsd_args(directory, images, direct=setup.cache == "direct")]
        socks = [f"{directory}/q{i}.sock" for i in range(2)]
    elif setup.server == "two-vblks":
        cmds = [[sys.executable, "-m", "vblk.cli", "serve", image, "--socket-path",
                 f"{directory}/t{i}.sock", "--workers", str(workers)]
                for i, image in enumerate(images)]
        socks = [f"{directory}/t{i}.sock" for i in range(2)]
    else:
        keys = {"page": (), "direct": ("nocache = true",),
                "writeback": ('cache = "writeback"',)}[setup.cache]
        cmds = [[sys.executable, "-m", "vblk.cli", "serve", "--config",
                 vblk_config(directory, images, workers, disk_keys=keys)]]
        socks = [f"{directory}/v{i}.sock" for i in range(2)]
    return cmds, socks, env


def fairness_once(setup: FairnessSetup, directory: str, images: list[str], workers: int,
                  seconds: float) -> dict:
    """Disk B at QD1 alone, then while disk A floods at QD32 (both ``setup.pattern``)."""
    cmds, socks, env = _pair_setup(setup, directory, images, workers)
    with serving(cmds, socks, env):
        alone = json.loads(bench(socks[1], 1, seconds, setup.pattern).communicate()[0])
        flood = bench(socks[0], 32, seconds + 2, setup.pattern)
        time.sleep(1)
        shared = json.loads(bench(socks[1], 1, seconds, setup.pattern).communicate()[0])
        flooded = json.loads(flood.communicate()[0])
    return {"alone_p50": alone["lat_us"]["p50"], "alone_p99": alone["lat_us"]["p99"],
            "alone_iops": alone["iops"], "shared_p50": shared["lat_us"]["p50"],
            "shared_p99": shared["lat_us"]["p99"], "shared_iops": shared["iops"],
            "flood_iops": flooded["iops"]}


def fairness(workers: int, seconds: float = 4.0, rounds: int = 3,
             setups: tuple[str, ...] = tuple(FAIRNESS_SETUPS)) -> dict[str, dict]:
    """Every setup, alternated for ``rounds`` rounds on the same two images (64 MiB of random
    bytes, so that O_DIRECT reads reach the device; in the page cache for the others): the
    median of each figure, and the ratio of B's p50 with the flood to B's p50 alone."""
    directory = tempfile.mkdtemp(prefix="vblk-fair-", dir="/var/tmp")
    try:
        images = write_images(directory, 2, filled=True)
        runs: dict[str, list[dict]] = {s: [] for s in setups}
        for _ in range(rounds):
            for setup in setups:
                runs[setup].append(fairness_once(FAIRNESS_SETUPS[setup], directory, images,
                                                 workers, seconds))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    out = {}
    for setup, results in runs.items():
        row = {k: statistics.median(r[k] for r in results) for k in results[0]}
        row["ratio_p50"] = statistics.median(r["shared_p50"] / r["alone_p50"] for r in results)
        out[setup] = row
    return out


def device_floor(readers: int = 7, seconds: float = 3.0) -> dict:
    """The device's own share of the O_DIRECT rows, no server at all: a 4 KiB O_DIRECT
    ``preadv`` at random on image B alone, then beside ``readers`` threads doing the same on
    image A (the flood's requests at vblk's other workers); the p50s in µs and their ratio."""
    directory = tempfile.mkdtemp(prefix="vblk-floor-", dir="/var/tmp")
    stop = threading.Event()

    def reads(path: str, until: float | None, out: list) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            while not stop.is_set() and (until is None or time.monotonic() < until):
                offset = random.randrange(IMAGE_BYTES // 4096) * 4096
                t0 = time.perf_counter_ns()
                os.preadv(fd, [buf], offset)
                out.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            os.close(fd)
            buf.close()

    try:
        a, b = write_images(directory, 2, filled=True)
        alone: list[float] = []
        reads(b, time.monotonic() + seconds, alone)
        flood = [threading.Thread(target=reads, args=(a, None, [])) for _ in range(readers)]
        for t in flood:
            t.start()
        shared: list[float] = []
        try:
            time.sleep(0.5)
            reads(b, time.monotonic() + seconds, shared)
        finally:
            stop.set()
            for t in flood:
                t.join()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    p50 = statistics.median(alone), statistics.median(shared)
    return {"alone_p50": p50[0], "shared_p50": p50[1], "ratio_p50": p50[1] / p50[0],
            "readers": readers}


def beside_idle(counts: list[int], workers: int, seconds: float = 3.0) -> list[dict]:
    """One disk's 4 KiB cached random reads (QD32, then QD1) while ``n`` other disks of the
    same vblk have a frontend connected that does nothing: what an idle VM's disk costs a busy
    one (each connected disk first reads one block, as a booted guest has)."""
    from vblk.testing.frontend import BlkClient
    rows = []
    for n in counts:
        directory = tempfile.mkdtemp(prefix="vblk-idle-", dir="/var/tmp")
        try:
            images = write_images(directory, n + 1)
            socks = [f"{directory}/v{i}.sock" for i in range(n + 1)]
            cmd = [sys.executable, "-m", "vblk.cli", "serve", "--config",
                   vblk_config(directory, images, workers)]
            with serving([cmd], socks), contextlib.ExitStack() as clients:
                for sock in socks[1:]:
                    clients.enter_context(BlkClient.connect(sock, ram_mib=4, timeout=30)) \
                        .read(0, 4096)
                row = {"idle": n}
                for qd in (32, 1):
                    r = json.loads(bench(socks[0], qd, seconds).communicate()[0])
                    row[f"qd{qd}_iops"], row[f"qd{qd}_p50"] = r["iops"], r["lat_us"]["p50"]
                rows.append(row)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return rows


def format_fairness(rows: dict[str, dict]) -> str:
    lines = [f"{'setup':<15} {'B alone p50/p99 us':>19} {'B flooded p50/p99 us':>21} "
             f"{'ratio p50':>9} {'B IOPS alone->flooded':>22} {'A flood IOPS':>12}"]
    for setup, r in rows.items():
        lines.append(f"{setup:<15} {r['alone_p50']:>9.0f} / {r['alone_p99']:<7.0f} "
                     f"{r['shared_p50']:>10.0f} / {r['shared_p99']:<8.0f} {r['ratio_p50']:>9.2f} "
                     f"{r['alone_iops']:>10.0f} -> {r['shared_iops']:<8.0f} "
                     f"{r['flood_iops']:>12.0f}")
    lines += [f"  {name}: {s.what}" for name, s in FAIRNESS_SETUPS.items() if name in rows]
    return "\n".join(lines)


def aggregate(disks: int, qd: int, workers: int, seconds: float = 4.0,
              rounds: int = 3) -> dict[str, dict]:
    """4 KiB random reads on every one of ``disks`` disks of one vblk at once (one ``vblk
    bench`` process per disk at ``qd``, then one client process for all: ``bench_together``),
    against one disk of the same vblk alone at ``qd`` (the load of each of the N) and at
    ``disks`` x ``qd`` (the load of all of them), and the same for
    qemu-storage-daemon; alternated, the median total IOPS and
    the server's CPU per request (its process group's user + system time over the requests
    done: the clients share the CPUs, so it is the figure that says what sharing costs)."""
    directory = tempfile.mkdtemp(prefix="vblk-agg-", dir="/tmp")
    runs: dict[str, list[float]] = {}
    cpu_us: dict[str, list[float]] = {}       # the server's CPU per request
    try:
        images = write_images(directory, disks)
        vblk_socks = [f"{directory}/v{i}.sock" for i in range(disks)]
        qsd_socks = [f"{directory}/q{i}.sock" for i in range(disks)]
        servers = {"vblk": ([sys.executable, "-m", "vblk.cli", "serve", "--config",
                             vblk_config(directory, images, workers)], vblk_socks),
                   "qsd": (qsd_args(directory, images), qsd_socks)}
        for _ in range(rounds):
            for name, (cmd, socks) in servers.items():
                with serving([cmd], socks) as (proc,):
                    for depth in (qd, disks * qd):      # one disk: as each of the N, and all N
                        before = group_cpu_seconds(proc.pid)
                        one = json.loads(bench(socks[0], depth, seconds).communicate()[0])
                        between = group_cpu_seconds(proc.pid)
                        key = f"{name} 1 disk at QD{depth}"
                        runs.setdefault(key, []).append(one["iops"])
                        cpu_us.setdefault(key, []).append((between - before) / one["ops"] * 1e6)
                    clients = [bench(sock, qd, seconds) for sock in socks]
                    results = [json.loads(c.communicate()[0]) for c in clients]
                    used = group_cpu_seconds(proc.pid) - between
                    key = f"{name} {disks} disks at QD{qd} each"
                    runs.setdefault(key, []).append(sum(r["iops"] for r in results))
                    cpu_us.setdefault(key, []).append(used / sum(r["ops"] for r in results) * 1e6)
                    between = group_cpu_seconds(proc.pid)
                    together = bench_together(socks, qd, seconds)
                    used = group_cpu_seconds(proc.pid) - between
                    key = f"{name} {disks} disks at QD{qd} each, one client"
                    runs.setdefault(key, []).append(sum(r.ops / r.seconds for r in together))
                    cpu_us.setdefault(key, []).append(used / sum(r.ops for r in together) * 1e6)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {k: {"iops": statistics.median(v), "runs": v,
                "server_cpu_us_per_request": statistics.median(cpu_us[k])}
            for k, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vblk.lab.manydisks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--disks", default="1,10,50,100", help="disk counts, the first the base")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--no-qsd", action="store_true", help="leave qemu-storage-daemon out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--connected", action="store_true",
                        help="a frontend on every disk that has done some I/O (guest RAM "
                             "left out of the PSS)")
    parser.add_argument("--slot-capacity", type=int, default=None, metavar="N",
                        help="serve with a host control socket and a slot area of N slots, "
                             "0: the default room (what room for vblk disk add costs)")
    parser.add_argument("--fairness", action="store_true",
                        help="instead: disk B's QD1 latency alone and while disk A floods at "
                             "QD32, for each setup (alternated, medians)")
    parser.add_argument("--device-floor", action="store_true",
                        help="instead: B's O_DIRECT read p50 alone and beside 7 threads of "
                             "O_DIRECT reads on A, no server (the device's share)")
    parser.add_argument("--beside-idle", metavar="N,N..",
                        help="instead: one disk's QD32 and QD1 cached reads beside N connected "
                             "idle disks of the same vblk, for each N")
    parser.add_argument("--rounds", type=int, default=3, help="--fairness/--aggregate rounds")
    parser.add_argument("--aggregate", type=int, metavar="N",
                        help="instead: total 4k randread IOPS of N disks at once (--qd each) "
                             "against one disk alone at --qd and at N x --qd, vblk and qsd")
    parser.add_argument("--qd", type=int, default=2, help="--aggregate: queue depth per disk")
    parser.add_argument("--setups", default=",".join(FAIRNESS_SETUPS),
                        help="--fairness setups, of: " + ", ".join(FAIRNESS_SETUPS))
    a = parser.parse_args(argv)
    if a.aggregate:
        rows = aggregate(a.aggregate, a.qd, a.workers, rounds=a.rounds)
        print(json.dumps(rows, indent=1) if a.json else "\n".join(
            f"{k:<32} {v['iops']:>9.0f} IOPS  server CPU {v['server_cpu_us_per_request']:5.1f} us"
            f" a request  (rounds: {', '.join(f'{x:.0f}' for x in v['runs'])})"
            for k, v in rows.items()))
        return 0
    if a.beside_idle:
        rows = beside_idle([int(x) for x in a.beside_idle.split(",")], a.workers)
        print(json.dumps(rows, indent=1) if a.json else "\n".join(
            f"{r['idle']:>4} idle connected disks: QD32 {r['qd32_iops']:>8.0f} IOPS, "
            f"QD1 {r['qd1_iops']:>7.0f} IOPS p50 {r['qd1_p50']:.1f} us" for r in rows))
        return 0
    if a.device_floor:
        r = device_floor()
        print(json.dumps(r) if a.json else
              f"device, no server: B alone {r['alone_p50']:.0f} us p50, beside {r['readers']} "
              f"O_DIRECT readers {r['shared_p50']:.0f} us ({r['ratio_p50']:.2f}x)")
        return 0
    if a.fairness:
        rows = fairness(a.workers, rounds=a.rounds, setups=tuple(a.setups.split(",")))
        print(json.dumps(rows, indent=1) if a.json else format_fairness(rows))
        return 0
    counts = [int(x) for x in a.disks.split(",")]
    rows = measure(counts, a.workers, qsd=not a.no_qsd, connected=a.connected,
                   slot_capacity=a.slot_capacity)
    print(json.dumps(rows) if a.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
