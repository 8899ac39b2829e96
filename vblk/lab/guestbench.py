"""``vblk bench --compare IMAGE --guest``: fio inside the test guest, vblk against qsd.

Theory of operation
-------------------
``compare.serve_pair`` serves two copies of IMAGE (a file, or an RBD image copied in its
pool), one with ``vblk serve`` and one with qemu-storage-daemon, in the same cache mode
(write-through by default). Each round boots the test guest (``vblk.lab.guest``: Debian's
kernel under QEMU, TCG unless real KVM is there) once per backend, with the fio add-on archive
(``vblk.lab.guestaddon``) appended to its initramfs; the order of the two boots alternates
from round to round (vblk first in odd rounds, qsd first in even ones) so that a drift of the
shared machine hits both alike.

In the guest one scenario runs every workload in turn on ``/dev/vda`` with
``fio --ioengine=libaio --direct=1 --time_based --ramp_time --output-format=json`` (the
workload's pattern, block size and queue depth; the round's seed, identical for both
backends) and prints, per workload, a begin and an end marker and then fio's JSON between two
more markers on the serial console. The host parses the JSON (``parse_fio_json``) into the
same ``workload.Result`` the frontend benchmark produces, so ``compare.Comparison`` gives
the medians and the vblk/qsd ratios and ``report.format_comparison`` prints the table:

* IOPS and MB/s are fio's I/O count and bytes over its measured runtime (the ramp excluded);
* latency percentiles are fio's completion latency (clat: submit to reap, in the guest);
* "guest CPU" is fio's own user + system share (a TCG guest is CPU bound: expect ~100 %);
* "server CPU" is the backend's process group, sampled on the host every 0.2 s and
  interpolated at the host arrival times of the workload's begin and end markers (so it
  includes fio's ramp);
* errors: 1 per workload whose fio reported an error or exited non-zero; the guest's kernel
  log is also searched for block-layer ``error, dev vda`` lines after the last workload.

Under TCG every guest instruction is emulated, so the numbers say how the backends compare
behind a slow guest, not what either can do behind KVM.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from vblk.lab.compare import Comparison, serve_pair, split_cache_mode
from vblk.lab.guest import GuestBuildError, GuestResult, build_guest, default_accel, run_guest
from vblk.lab.guestaddon import build_fio_addon, fio_version
from vblk.lab.rbdimage import RbdSource, is_rbd_image
from vblk.lab.servers import BACKENDS, Server
from vblk.lab.workload import BenchError, Result, Workload, size_option
from vblk.testing.frontend import BackendError
from vblk.units import MiB

DEFAULT_RAMP = 1.0
DEFAULT_MEMORY = "512M"
GUEST_DEVICE = "/dev/vda"
BOOT_ALLOWANCE = 120.0           # seconds a boot plus fio's start-ups may take on a busy host
PER_WORKLOAD_ALLOWANCE = 30.0    # beyond runtime + ramp: fio start, JSON over the serial line

BEGIN, END, JSON_BEGIN, JSON_END = ("VBLK-FIO-BEGIN", "VBLK-FIO-END", "VBLK-FIO-JSON",
                                    "VBLK-FIO-JSON-END")
IO_ERRORS = "GUEST_IO_ERRORS"


class GuestBenchError(BackendError):
    """The guest did not boot, fio did not run, or its output could not be read."""


# -- fio in the guest ---------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def fio_args(w: Workload, *, name: str, output: str, ramp: float = DEFAULT_RAMP,
             filename: str = GUEST_DEVICE) -> list[str]:
    """The fio command line for one time-based workload on ``filename``."""
    if w.duration is None:
        raise BenchError("the guest mode runs for a time (--duration), not a count (--ops)")
    args = ["fio", f"--name={name}", f"--filename={filename}", "--ioengine=libaio",
            "--direct=1", f"--rw={w.pattern}", f"--bs={w.bs}", f"--iodepth={w.qd}",
            "--numjobs=1", "--time_based=1", f"--runtime={_ms(w.duration)}",
            f"--ramp_time={_ms(ramp)}", "--norandommap=1", f"--randseed={w.seed}",
            "--unified_rw_reporting=both", "--eta=never", "--output-format=json",
            f"--output={output}"]
    if w.pattern == "randrw":
        args.append(f"--rwmixread={w.rwmix}")
    if w.offset:
        args.append(f"--offset={w.offset}")
    if w.size is not None:
        args.append(f"--size={w.size}")
    return args


def guest_script(workloads: Sequence[Workload], *, ramp: float = DEFAULT_RAMP) -> str:
    """The scenario: every workload in turn, each framed by markers, then the I/O errors the
    guest kernel logged. A failing fio does not stop the rest (its exit status is printed)."""
    lines = ["echo FIO_VERSION=$(fio --version)"]
    for i, w in enumerate(workloads):
        out = f"/tmp/fio-{i}.json"
        lines += [f"echo {BEGIN} {i}",
                  f"rc=0; {shlex.join(fio_args(w, name=f'w{i}', output=out, ramp=ramp))} || rc=$?",
                  f"echo {END} {i} rc=$rc",
                  f"echo {JSON_BEGIN} {i}",
                  f"cat {out} 2>/dev/null || true",
                  "echo",
                  f"echo {JSON_END} {i}"]
    lines.append(f"echo {IO_ERRORS}=$(dmesg | grep -c 'error, dev vda' || true)")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class FioJob:
    """One fio job's numbers, from its JSON (times in µs, CPU in percent of one CPU)."""
    name: str
    error: int
    ops: int
    reads: int
    writes: int
    bytes: int
    seconds: float
    lat_us: dict[str, float]
    cpu_pct: float


_PERCENTILES = {"p50": "50.000000", "p99": "99.000000", "p99_9": "99.900000"}


def _latency_us(clat_ns: dict) -> dict[str, float]:
    pct = clat_ns.get("percentile") or {}
    out = {"min": clat_ns.get("min", 0) / 1e3, "mean": clat_ns.get("mean", 0.0) / 1e3,
           "max": clat_ns.get("max", 0) / 1e3}
    out.update({k: pct.get(key, 0) / 1e3 for k, key in _PERCENTILES.items()})
    return out


def parse_fio_json(data: str | dict) -> list[FioJob]:
    """Every job of one fio ``--output-format=json`` report.

    The totals and latencies come from the ``mixed`` section that
    ``--unified_rw_reporting=both`` adds; without it, from the read and write sections (the
    latencies from the direction that did more I/O). ValueError if it is not fio's JSON."""
    doc = json.loads(data) if isinstance(data, str) else data
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise ValueError("not a fio JSON report (no jobs)")
    jobs = []
    for job in doc["jobs"]:
        try:
            read, write = job["read"], job["write"]
            mixed = job.get("mixed")
            if mixed is None:
                main = read if read["total_ios"] >= write["total_ios"] else write
                ops = read["total_ios"] + write["total_ios"]
                nbytes = read["io_bytes"] + write["io_bytes"]
                runtime_ms = max(read["runtime"], write["runtime"])
            else:
                main, ops, nbytes, runtime_ms = (mixed, mixed["total_ios"], mixed["io_bytes"],
                                                 mixed["runtime"])
            jobs.append(FioJob(name=job["jobname"], error=int(job.get("error", 0)), ops=ops,
                               reads=read["total_ios"], writes=write["total_ios"],
                               bytes=nbytes, seconds=runtime_ms / 1e3,
                               lat_us=_latency_us(main["clat_ns"]),
                               cpu_pct=float(job.get("usr_cpu", 0)) + float(job.get("sys_cpu", 0))))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"fio job without {exc}") from None
    return jobs


def fio_reports(output: str) -> dict[int, str]:
    """The JSON text the scenario printed for each workload index."""
    reports: dict[int, str] = {}
    current: int | None = None
    lines: list[str] = []
    for line in output.splitlines():
        s = line.strip()
        if current is None and s.startswith(JSON_BEGIN + " ") and s.split()[-1].isdigit():
            current, lines = int(s.split()[-1]), []
        elif current is not None and s == f"{JSON_END} {current}":
            reports[current] = "\n".join(lines)
            current = None
        elif current is not None:
            lines.append(line)
    return reports


def _fio_exit_statuses(output: str) -> dict[int, int]:
    found = {}
    for line in output.splitlines():
        parts = line.strip().split()
        if len(parts) == 3 and parts[0] == END and parts[2].startswith("rc="):
            found[int(parts[1])] = int(parts[2][3:])
    return found


# -- server CPU while the guest runs ------------------------------------------------------
class CpuSampler:
    """Samples ``probe()`` (CPU seconds) every ``interval`` s in a thread; ``share(t0, t1)``
    is the CPU share in percent between two ``time.time()`` values, interpolated."""

    def __init__(self, probe: Callable[[], float], interval: float = 0.2) -> None:
        self.probe, self.interval = probe, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self.samples.append((time.time(), self.probe()))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), self.probe()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.time(), self.probe()))

    def at(self, t: float) -> float | None:
        s = self.samples
        if not s or t < s[0][0] or t > s[-1][0]:
            return None
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 if t1 == t0 else c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        return s[-1][1]

    def share(self, t0: float | None, t1: float | None) -> float | None:
        if t0 is None or t1 is None or t1 <= t0:
            return None
        c0, c1 = self.at(t0), self.at(t1)
        return None if c0 is None or c1 is None else 100.0 * (c1 - c0) / (t1 - t0)


# -- one boot -------------------------------------------------------------------------------
@dataclass
class GuestRun:
    """One boot of the guest against one backend: its fio results and how the boot went."""
    backend: str
    results: list[Result]
    boot_seconds: float | None
    seconds: float
    io_errors: int


def run_in_guest(server: Server, workloads: Sequence[Workload], *, addon: Path,
                 ramp: float = DEFAULT_RAMP, smp: int = 1, memory: str = DEFAULT_MEMORY,
                 log_path: Path | None = None) -> GuestRun:
    """Boot the guest against ``server``, run every workload with fio, parse the results.
    GuestBenchError (with the end of the serial output) if the guest or fio did not deliver."""
    server.check_alive()
    budget = BOOT_ALLOWANCE + sum(w.duration + ramp + PER_WORKLOAD_ALLOWANCE for w in workloads)
    with CpuSampler(server.cpu_seconds) as cpu:
        res = run_guest(server.sock, guest_script(workloads, ramp=ramp), archives=[addon],
                        memory=memory, smp=smp, timeout=budget, log_path=log_path,
                        alive=lambda: server.proc.poll() is None)
    return _collect(server, workloads, res, cpu)


def _collect(server: Server, workloads: Sequence[Workload], res: GuestResult,
             cpu: CpuSampler) -> GuestRun:
    def fail(why: str) -> GuestBenchError:
        return GuestBenchError(f"{server.name}: {why}\n{res.describe(40)}\n"
                               f"--- {server.name} log ---\n{server.log_tail(1500)}")

    if res.exit_status is None:
        raise fail("the guest did not finish its scenario")
    reports = fio_reports(res.scenario_output)
    statuses = _fio_exit_statuses(res.scenario_output)
    results = []
    for i, w in enumerate(workloads):
        try:
            job = parse_fio_json(reports[i])[0]
        except KeyError:
            raise fail(f"no fio output for {w.label}") from None
        except ValueError as exc:
            raise fail(f"fio's output for {w.label} is unreadable: {exc}") from None
        failed = job.error != 0 or statuses.get(i, 1) != 0
        share = cpu.share(res.wall_time(f"{BEGIN} {i}", exact=True),
                          res.wall_time(f"{END} {i} "))
        results.append(Result(workload=w, ops=job.ops, reads=job.reads, writes=job.writes,
                              errors=int(failed), bytes=job.bytes, seconds=job.seconds,
                              lat_us=job.lat_us, client_cpu=job.cpu_pct, server_cpu=share,
                              backend=server.name))
    try:
        io_errors = int(res.values.get(IO_ERRORS, ""))
    except ValueError:
        raise fail("the guest did not report its kernel's I/O errors") from None
    if res.exit_status != 0:
        raise fail(f"the scenario exited with status {res.exit_status}")
    return GuestRun(server.name, results, res.boot_seconds, res.seconds, io_errors)


# -- the comparison -------------------------------------------------------------------------
@dataclass
class GuestComparison(Comparison):
    """A Comparison whose load was fio in the guest; ``guest`` says how it ran."""
    guest: dict = field(default_factory=dict)
    boots: list[GuestRun] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return super().errors + sum(run.io_errors for run in self.boots)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["guest"] = {**self.guest, "boots": [
            {"backend": run.backend, "boot_seconds": run.boot_seconds,
             "seconds": round(run.seconds, 3), "io_errors": run.io_errors}
            for run in self.boots]}
        return data


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def guest_compare(image: str | os.PathLike, workloads: Sequence[Workload], *, rounds: int = 3,
                  ramp: float = DEFAULT_RAMP, smp: int = 1, memory: str = DEFAULT_MEMORY,
                  vblk_args: str = "", cache: str | None = None, workdir: str | None = None,
                  keep: bool = False, log: TextIO | None = None) -> GuestComparison:
    """Run every workload with fio in the guest against vblk and qsd, one boot per backend per
    round, the boots' order alternating; round r uses seed + r on both backends."""
    if is_rbd_image(image):
        RbdSource.check(image)            # its refusal before the guest is built
    elif not Path(image).is_file():
        raise BenchError(f"--compare {image}: not a regular file")
    if not 1 <= rounds <= 100:
        raise BenchError(f"--rounds {rounds}: 1..100")
    if not 1 <= smp <= 64:
        raise BenchError(f"--smp {smp}: 1..64")
    if not 0 <= ramp <= 3600:
        raise BenchError(f"--ramp {ramp:g}: 0..3600 seconds")
    mem_bytes = size_option(memory, "--guest-memory")
    if not 256 * MiB <= mem_bytes <= 64 * 1024 * MiB or mem_bytes % MiB:
        raise BenchError(f"--guest-memory {memory}: whole MiB, 256M..64G")
    memory = f"{mem_bytes // MiB}M"
    if not workloads:
        raise BenchError("--guest: no workload given")
    for w in workloads:
        if w.duration is None:
            raise BenchError("--guest runs each workload for --duration seconds, not --ops")
        if w.queues != 1:
            raise BenchError(f"--queues {w.queues}: the guest mode uses one queue")
    split_cache_mode(vblk_args, cache)        # its BenchError before the guest is built
    say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
    try:
        version = fio_version()
        say("preparing the guest and its fio add-on ...")
        image_info = build_guest()
        addon = build_fio_addon()
    except GuestBuildError as exc:
        raise BenchError(f"--guest: {exc}") from None
    accel = default_accel()
    with serve_pair(image, vblk_args=vblk_args, cache=cache, workdir=workdir, keep=keep,
                    log=log) as pair:
        result = GuestComparison(str(pair.image), pair.writethrough, rounds, pair.commands,
                                 source=pair.source, load="guest")
        result.loadavg.append(os.getloadavg())
        for r in range(rounds):
            order = BACKENDS if r % 2 == 0 else tuple(reversed(BACKENDS))
            round_workloads = [replace(w, seed=w.seed + r) for w in workloads]
            for b in order:
                say(f"[{r + 1}/{rounds}] {b:<4} booting the guest for {len(workloads)} fio "
                    f"workload{'s' * (len(workloads) > 1)}")
                run = run_in_guest(pair.servers[b], round_workloads, addon=addon, ramp=ramp,
                                   smp=smp, memory=memory,
                                   log_path=pair.workdir / f"guest-{b}-{r + 1}.log")
                result.boots.append(run)
                say(f"[{r + 1}/{rounds}] {b:<4} boot {run.boot_seconds or 0:.1f} s, total "
                    f"{run.seconds:.1f} s: " + ", ".join(
                        f"{res.workload.label} {res.iops:,.0f} IOPS" for res in run.results))
                for w, res in zip(workloads, run.results):
                    result.runs.setdefault(w.label, {x: [] for x in BACKENDS})[b].append(res)
        result.loadavg.append(os.getloadavg())
    boot = {b: _median([run.boot_seconds for run in result.boots if run.backend == b])
            for b in BACKENDS}
    io_errors = sum(run.io_errors for run in result.boots)
    runtime = workloads[0].duration if workloads else None
    result.guest = {"fio": version, "accel": accel, "smp": smp, "memory": memory,
                    "kernel": image_info.kernel_version, "runtime_s": runtime, "ramp_s": ramp,
                    "addon": str(addon), "addon_bytes": addon.stat().st_size,
                    "median_boot_seconds": boot, "guest_io_errors": io_errors}
    result.notes = [
        f"guest: {accel.upper()}, {smp} vCPU, {memory}, kernel {image_info.kernel_version}, "
        f"{version} libaio direct=1 on {GUEST_DEVICE}, {runtime:g} s per workload after a "
        f"{ramp:g} s ramp; latency is fio's clat",
        "boot to scenario (median): " + ", ".join(
            f"{b} {boot[b]:.1f} s" if boot[b] is not None else f"{b} -" for b in BACKENDS)
        + f"; add-on {addon.stat().st_size / MiB:.0f} MiB"
        + (f"; {io_errors} block-layer errors in the guest kernel log" if io_errors else ""),
    ]
    return result


__all__ = ["CpuSampler", "DEFAULT_MEMORY", "DEFAULT_RAMP", "FioJob", "GuestBenchError",
           "GuestComparison", "GuestRun", "fio_args", "fio_reports", "guest_compare",
           "guest_script", "parse_fio_json", "run_in_guest"]
