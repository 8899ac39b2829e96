"""Scaling data for vblk: IOPS against ``--workers`` and queue depth, and the memory it costs.

``scaling(image, ...)`` serves a copy of ``image`` with vblk once per worker count, runs one
workload (4 KiB random reads by default) at each queue depth against it with the package's
bench client (``vblk.lab.client.run_workload``), and reads the proportional set size (PSS, from
``/proc/PID/smaps_rollup``) of the supervisor and its workers while the deepest run is under
way -- once counting everything, once without the guest RAM they map from the frontend
(the frontend's memory, shared with it). ``format_scaling`` prints the table;
``python -m vblk.lab.scaling IMAGE`` runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from vblk.errors import EXIT_OK, EXIT_USAGE
from vblk.lab.client import run_workload
from vblk.lab.report import provenance_lines
from vblk.lab.servers import REPO, Server, copy_image, group_pids, source_version, vblk_command
from vblk.lab.workload import BenchError, Workload
from vblk.units import MiB

WORKERS = (1, 2, 4, 8)
QDS = (1, 2, 4, 8, 16, 32, 64)


def pss_bytes(pid: int, *, without_guest_ram: bool = False) -> int:
    """PSS of one process. ``without_guest_ram`` leaves out mappings of memfds that are not
    vblk's own (vblk names its memfds ``vblk-*``; the frontend's guest RAM is anything else)."""
    if not without_guest_ram:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        return 0
    total, guest = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):        # a mapping's first line
                guest = "/memfd:" in line and "/memfd:vblk-" not in line
            elif head == "Pss:" and not guest:
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class Scaling:
    image: str
    workload: Workload
    workers: tuple[int, ...]
    qds: tuple[int, ...]
    iops: dict[int, dict[int, float]] = field(default_factory=dict)     # workers -> qd -> IOPS
    p50_us: dict[int, dict[int, float]] = field(default_factory=dict)
    pss: dict[int, dict[str, int]] = field(default_factory=dict)        # workers -> kind -> bytes
    processes: dict[int, int] = field(default_factory=dict)
    source: str | None = None
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"image": self.image, "workload": self.workload.label.split(" QD")[0],
                "workers": list(self.workers), "qds": list(self.qds),
                "iops": {str(w): {str(q): v for q, v in d.items()} for w, d in self.iops.items()},
                "p50_us": {str(w): {str(q): v for q, v in d.items()} for w, d in self.p50_us.items()},
                "pss_bytes": {str(w): d for w, d in self.pss.items()},
                "processes": {str(w): n for w, n in self.processes.items()},
                "vblk_source": self.source, "loadavg": self.loadavg}


def scaling(image: str | os.PathLike, workload: Workload, *, workers=WORKERS, qds=QDS,
            extra: tuple[str, ...] = (), timeout: float = 10.0, log=None) -> Scaling:
    src = Path(image)
    if not src.is_file():
        raise BenchError(f"--scaling {image}: not a regular file")
    say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
    work = Path(tempfile.mkdtemp(prefix="vblk-scaling-"))
    sockdir = tempfile.mkdtemp(prefix="vblk-scaling-", dir="/tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = Scaling(str(src), workload, tuple(workers), tuple(qds), source=source_version())
    result.loadavg.append(os.getloadavg())
    try:
        copy = work / "vblk.img"
        copy_image(src, copy)
        for n in workers:
            sock = os.path.join(sockdir, f"w{n}.sock")
            cmd = vblk_command(copy, sock, writethrough=True,
                               extra=("--workers", str(n), "--slots", str(max(64, max(qds))),
                                      *extra))
            server = Server(f"vblk --workers {n}", cmd, sock, work / f"w{n}.log", env=env)
            try:
                server.wait_listening()
                for qd in qds:
                    w = replace(workload, qd=qd)
                    sampler = None
                    if qd == max(qds):          # PSS while the deepest run is under way
                        sampler = threading.Timer(max(0.2, (w.duration or 1) / 2),
                                                  lambda n=n, s=server: _sample(result, n, s))
                        sampler.start()
                    try:
                        r = run_workload(sock, w, timeout=timeout, cpu_probe=server.cpu_seconds,
                                         backend="vblk")
                    finally:
                        if sampler:
                            sampler.join()
                    result.iops.setdefault(n, {})[qd] = r.iops
                    result.p50_us.setdefault(n, {})[qd] = r.lat_us["p50"]
                    say(f"workers {n} QD {qd}: {r.iops:,.0f} IOPS, p50 {r.lat_us['p50']:.1f} µs")
            finally:
                server.stop()
        result.loadavg.append(os.getloadavg())
        return result
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _sample(result: Scaling, n: int, server: Server) -> None:
    pids = group_pids(server.proc.pid)
    total = without = 0
    for pid in pids:
        try:
            total += pss_bytes(pid)
            without += pss_bytes(pid, without_guest_ram=True)
        except OSError:
            pass
    result.pss[n] = {"total": total, "without_guest_ram": without}
    result.processes[n] = len(pids)


def format_scaling(s: Scaling) -> str:
    label = s.workload.label.split(" QD")[0]
    out = [f"vblk scaling: {label}, write-through, {s.workload.duration:g} s per point"]
    out += provenance_lines(s.source, s.loadavg)
    out.append("")
    head = f"{'workers':>7} " + " ".join(f"{'QD' + str(q):>8}" for q in s.qds)
    out += ["IOPS", head, "-" * len(head)]
    for n in s.workers:
        out.append(f"{n:>7} " + " ".join(f"{s.iops.get(n, {}).get(q, 0):>8,.0f}" for q in s.qds))
    out += ["", "p50 latency µs", head, "-" * len(head)]
    for n in s.workers:
        out.append(f"{n:>7} " + " ".join(f"{s.p50_us.get(n, {}).get(q, 0):>8.1f}" for q in s.qds))
    out += ["", f"memory (PSS of the supervisor and its workers, during the QD{max(s.qds)} run)",
            f"{'workers':>7} {'processes':>9} {'PSS MiB':>8} {'without guest RAM':>18}"]
    for n in s.workers:
        p = s.pss.get(n)
        if p:
            out.append(f"{n:>7} {s.processes[n]:>9} {p['total'] / MiB:>8.1f} "
                       f"{p['without_guest_ram'] / MiB:>18.1f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vblk.lab.scaling", description=__doc__.split("\n")[0])
    ap.add_argument("image")
    ap.add_argument("--workload", default="randread:4k", help="PATTERN:BS (default randread:4k)")
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--workers", default=",".join(map(str, WORKERS)))
    ap.add_argument("--qds", default=",".join(map(str, QDS)))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        w = Workload.parse(a.workload + ":1", duration=a.duration)
        workers = tuple(int(x) for x in a.workers.split(","))
        qds = tuple(int(x) for x in a.qds.split(","))
        s = scaling(a.image, w, workers=workers, qds=qds, log=sys.stderr)
    except (BenchError, ValueError) as exc:
        print(f"vblk scaling: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(s.to_dict(), indent=2) if a.json else format_scaling(s))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
