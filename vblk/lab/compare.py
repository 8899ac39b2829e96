"""vblk against qemu-storage-daemon on two copies of one image (``vblk bench --compare``).

``serve_pair`` serves two fresh copies of one image (vblk takes an exclusive lock) with
vblk and qsd in the same cache mode: copies of a file in a work directory, or of an RBD image
in its pool (``rbdimage``); ``compare`` runs each workload against both, alternately, for
several rounds, and ``Comparison`` keeps every run and gives the medians and the ratio
vblk/qsd. On RBD each pair of runs is followed by ``rbd bench`` with the same pattern
(``rbdbench``): librbd's own ceiling, kept beside the backends' runs. Knows the pair and the
rounds; the load itself is ``client``'s.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

from vblk.lab.client import run_workload
from vblk.lab.rbdbench import NAME as RBD_BENCH
from vblk.lab.rbdbench import CeilingRun, RbdBench, ceiling_note
from vblk.lab.rbdimage import RbdSource, image_copies, is_rbd_image
from vblk.lab.report import ProgressLine
from vblk.lab.servers import (
    BACKENDS,
    Server,
    copy_image,
    qsd_blockdev_command,
    qsd_command,
    source_version,
    vblk_command,
)
from vblk.lab.workload import BenchError, Result, Workload
from vblk.testing.frontend import BackendError
from vblk.units import MiB, spell_size

SWEEP_QDS = (1, 2, 4, 8, 16, 32)


def split_cache_mode(vblk_args: str, cache: str | None) -> tuple[bool, list[str]]:
    """(writethrough?, vblk's extra args without the cache flag) from --vblk-args/--cache."""
    try:
        args = shlex.split(vblk_args)
    except ValueError as exc:
        raise BenchError(f"--vblk-args {vblk_args!r}: {exc}") from None
    rest, implied, said = [], None, ""
    words = iter(args)
    for a in words:                    # vblk's --cache MODE, or the old --writeback/--writethru
        if a in ("--writeback", "--writethru"):
            implied, said = ("writeback" if a == "--writeback" else "writethrough"), a
        elif a == "--cache" or a.startswith("--cache="):
            implied = a.partition("=")[2] if "=" in a else next(words, "")
            said = f"--cache {implied}"
            if implied not in ("writethrough", "writeback"):
                raise BenchError(f"--vblk-args: {said}: writethrough or writeback")
        else:
            rest.append(a)
    if cache is not None and cache not in ("writethrough", "writeback"):
        raise BenchError(f"--cache {cache!r}: writethrough or writeback")
    if cache is not None and implied is not None and cache != implied:
        raise BenchError(f"--cache {cache} contradicts {said} in --vblk-args")
    mode = cache or implied or "writethrough"
    for bad in ("--socket-path", "--fd", "--log-level"):
        if any(a == bad or a.startswith(bad + "=") for a in rest):
            raise BenchError(f"--vblk-args: {bad} is set by vblk bench")
    return mode == "writethrough", rest


@dataclass
class Comparison:
    """Everything ``compare`` measured: per workload, every run of both backends."""
    image: str
    writethrough: bool
    rounds: int
    commands: dict[str, list[str]]
    runs: dict[str, dict[str, list[Result]]] = field(default_factory=dict)   # label -> backend
    sweep: dict[int, dict[str, list[Result]]] = field(default_factory=dict)  # qd -> backend
    sweep_label: str = ""
    loadavg: list[tuple[float, float, float]] = field(default_factory=list)   # start, end
    source: str | None = None            # the vblk code that was served (git)
    load: str = "frontend"               # what made the load: "frontend" or "guest" (fio)
    notes: list[str] = field(default_factory=list)   # more header lines for the table
    ceiling_name: str = ""               # "rbd bench": the store's own ceiling, when measured
    ceiling: dict[str, list[CeilingRun]] = field(default_factory=dict)        # label -> runs
    sweep_ceiling: dict[int, list[CeilingRun]] = field(default_factory=dict)  # qd -> runs

    @staticmethod
    def medians(results: list[Result]) -> dict:
        def med(values: list[float | None]) -> float | None:
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None
        return {"iops": med([r.iops for r in results]),
                "mb_per_s": med([r.mb_per_s for r in results]),
                "p50_us": med([r.lat_us["p50"] for r in results]),
                "p99_us": med([r.lat_us["p99"] for r in results]),
                "p99_9_us": med([r.lat_us["p99_9"] for r in results]),
                "client_cpu_pct": med([r.client_cpu for r in results]),
                "server_cpu_pct": med([r.server_cpu for r in results]),
                "errors": sum(r.errors for r in results),
                "iops_range": [min(r.iops for r in results), max(r.iops for r in results)]}

    @staticmethod
    def ratios(a: dict, b: dict) -> dict:
        def ratio(x: float | None, y: float | None) -> float | None:
            return None if not x or not y else x / y
        return {k: ratio(a[k], b[k]) for k in ("iops", "mb_per_s", "p50_us")}

    @staticmethod
    def ceiling_medians(runs: list[CeilingRun], backends: dict) -> dict:
        """The ceiling's medians over its runs that worked, and each backend's IOPS over it
        (``backends``: backend -> its ``medians``)."""
        good = [r for r in runs if r.error is None]
        iops = statistics.median([r.iops for r in good]) if good else None
        cpu = [r.cpu_pct for r in good if r.cpu_pct is not None]
        return {"iops": iops,
                "mb_per_s": statistics.median([r.mb_per_s for r in good]) if good else None,
                "cpu_pct": statistics.median(cpu) if cpu else None,
                "failed": len(runs) - len(good),
                "ratio": {b: (m["iops"] / iops if iops and m["iops"] else None)
                          for b, m in backends.items()}}

    @property
    def errors(self) -> int:
        return sum(r.errors for group in (*self.runs.values(), *self.sweep.values())
                   for results in group.values() for r in results)

    @property
    def ceiling_failures(self) -> list[str]:
        """Why ceiling runs failed, one line each (empty when all worked)."""
        return [f"{self.ceiling_name} {r.workload.label}: {r.error}"
                for runs in (*self.ceiling.values(), *self.sweep_ceiling.values())
                for r in runs if r.error is not None]

    def to_dict(self) -> dict:
        def rows(groups: dict, ceilings: dict) -> list[dict]:
            out = []
            for key, by_backend in groups.items():
                med = {b: self.medians(rs) for b, rs in by_backend.items()}
                first = next(iter(by_backend.values()))[0].workload
                row = {"workload": first.label, "qd": first.qd, "median": med,
                       "ratio_vblk_qsd": self.ratios(med["vblk"], med["qsd"]),
                       "runs": {b: [r.to_dict() for r in rs] for b, rs in by_backend.items()}}
                if key in ceilings:
                    row["ceiling"] = {"name": self.ceiling_name,
                                      "median": self.ceiling_medians(ceilings[key], med),
                                      "runs": [r.to_dict() for r in ceilings[key]]}
                out.append(row)
            return out
        return {"image": self.image, "cache": "writethrough" if self.writethrough else "writeback",
                "rounds": self.rounds, "commands": self.commands, "errors": self.errors,
                "workloads": rows(self.runs, self.ceiling),
                "sweep": rows(self.sweep, self.sweep_ceiling),
                "sweep_workload": self.sweep_label or None, "loadavg": self.loadavg,
                "vblk_source": self.source, "load": self.load, "notes": self.notes,
                "ceiling": self.ceiling_name or None,
                "ceiling_failures": self.ceiling_failures}


@dataclass
class ServedPair:
    """vblk and qsd serving two fresh copies of one image (``serve_pair``)."""
    image: Path | str                    # the source: a file, or an rbd: token
    writethrough: bool
    commands: dict[str, list[str]]
    servers: dict[str, Server]
    source: str | None                   # the vblk code that is served (git)
    workdir: Path                        # logs (and a file's copies)
    rbd: RbdSource | None = None         # an RBD source, as the cluster described it
    copies: dict[str, str] = field(default_factory=dict)   # backend -> its copy


@contextlib.contextmanager
def serve_pair(image: str | os.PathLike, *, vblk_args: str = "", cache: str | None = None,
               queues: int = 1, workdir: str | None = None, keep: bool = False,
               log: TextIO | None = None) -> Iterator[ServedPair]:
    """Copy ``image`` (a file, or ``rbd:POOL/IMAGE...``: into its pool) twice, serve one copy
    with ``vblk serve`` and the other with qemu-storage-daemon in the same cache mode, wait
    until both listen; on exit stop both and remove the copies (unless ``keep``). BenchError
    for a bad option or an unknown image, before anything is created."""
    rbd = RbdSource.check(os.fspath(image)) if is_rbd_image(image) else None
    if rbd is None and not Path(image).is_file():
        raise BenchError(f"--compare {image}: not a regular file")
    if shutil.which("qemu-storage-daemon") is None:
        raise BenchError("--compare needs qemu-storage-daemon on PATH (Debian: qemu-system-common)")
    writethrough, extra = split_cache_mode(vblk_args, cache)
    if rbd is None and workdir is not None and "," in os.path.abspath(workdir):
        raise BenchError(f"--workdir {workdir}: a path with a comma cannot be an image spec")
    work = Path(tempfile.mkdtemp(prefix="vblk-bench-", dir=workdir))
    sockdir = tempfile.mkdtemp(prefix="vblk-bench-", dir="/tmp")    # sun_path is short
    servers: dict[str, Server] = {}
    say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
    try:
        copies = (image_copies(rbd, BACKENDS, keep=keep, say=say) if rbd is not None
                  else _file_copies(Path(image), work, say))
        with copies as disks:
            socks = {b: os.path.join(sockdir, f"{b}.sock") for b in BACKENDS}
            if rbd is None:
                qsd = qsd_command(disks["qsd"], socks["qsd"], writethrough=writethrough,
                                  queues=queues)
            else:
                qsd = qsd_blockdev_command(rbd.qsd_blockdev(disks["qsd"]), socks["qsd"],
                                           writethrough=writethrough, queues=queues)
            vblk_disk = disks["vblk"] if rbd is None else rbd.vblk_token(disks["vblk"])
            commands = {"vblk": vblk_command(vblk_disk, socks["vblk"],
                                             writethrough=writethrough, extra=extra), "qsd": qsd}
            try:
                for b in BACKENDS:
                    servers[b] = Server(b, commands[b], socks[b], work / f"{b}.log")
                for server in servers.values():
                    server.wait_listening()
                yield ServedPair(image if rbd else Path(image), writethrough, commands, servers,
                                 source_version(), work, rbd, {b: str(d) for b, d in disks.items()})
            finally:
                for server in servers.values():      # RBD clients go before their images
                    server.stop()
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
        if keep:
            say(f"kept {work} ({'server logs' if rbd else 'image copies and server logs'})")
        else:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _file_copies(src: Path, work: Path, say: Callable[[str], None]) -> Iterator[dict[str, Path]]:
    """Two copies of an image file in ``work`` (removed with it)."""
    if "," in str(work):
        raise BenchError(f"--workdir {work}: a path with a comma cannot be an image spec")
    images = {b: work / f"{b}.img" for b in BACKENDS}
    say(f"copying {src} ({src.stat().st_size / MiB:,.0f} MiB) twice into {work}")
    for path in images.values():
        copy_image(src, path)
    yield images


def compare(image: str | os.PathLike, workloads: Sequence[Workload], *, rounds: int = 3,
            vblk_args: str = "", cache: str | None = None, workdir: str | None = None,
            keep: bool = False, sweep: Workload | None = None, timeout: float = 10.0,
            busy_poll: bool = False, rbd_bench: bool | None = None, cold: bool = False,
            progress: TextIO | None = None, log: TextIO | None = None) -> Comparison:
    """Serve two copies of ``image`` with vblk and qsd and run every workload against both,
    A B A B, ``rounds`` times (round r uses seed + r for both). ``sweep`` adds the same runs
    at each queue depth of SWEEP_QDS. Writes go to the copies, identically on both. For an
    RBD image ``rbd_bench`` (default: on) runs ``rbd bench`` with the same pattern on qsd's
    copy after the two backends, each time: librbd's own ceiling on this cluster. ``cold``
    (image files only) drops a backend's copy from the page cache before each of its runs."""
    if not 1 <= rounds <= 100:
        raise BenchError(f"--rounds {rounds}: 1..100")
    if rbd_bench and not is_rbd_image(image):
        raise BenchError("--rbd-bench goes with --compare rbd:POOL/IMAGE")
    if cold and is_rbd_image(image):
        raise BenchError("--cold goes with an image file (an RBD image's cache is the OSDs')")
    queues = max(w.queues for w in [*workloads, *([sweep] if sweep else [])])
    with serve_pair(image, vblk_args=vblk_args, cache=cache, queues=queues, workdir=workdir,
                    keep=keep, log=log) as pair:
        servers = pair.servers
        result = Comparison(str(pair.image), pair.writethrough, rounds, pair.commands,
                            source=pair.source)
        ceiling = None
        if pair.rbd is not None and (sparse := pair.rbd.sparse_note()):
            result.notes.append(sparse)
        if pair.rbd is not None and rbd_bench is not False:
            say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
            ceiling = RbdBench(pair.rbd, pair.copies["qsd"], say)
            result.ceiling_name = RBD_BENCH
            result.notes.append(ceiling_note(pair.rbd, pair.copies["qsd"], workloads))
        if cold:
            result.notes.append("cold: each copy dropped from the page cache (fsync, "
                                "POSIX_FADV_DONTNEED) before each of its runs")
        result.loadavg.append(os.getloadavg())

        def one(tag: str, w: Workload, b: str) -> Result:
            server = servers[b]
            server.check_alive()
            if cold:
                drop_cached(pair.copies[b])
            line = ProgressLine(progress, f"{tag} {b:<4} {w.label:<18}", w) if progress else None
            try:
                return run_workload(server.sock, w, timeout=timeout, busy_poll=busy_poll,
                                    progress=line, cpu_probe=server.cpu_seconds, backend=b)
            except BackendError as exc:
                raise BackendError(f"{b}, {w.label}: {exc}; log: {server.log_tail(600)}") from exc
            finally:
                if line:
                    line.finish()

        def both(tag: str, w: Workload, groups: dict, key: object, ceilings: dict) -> None:
            group = groups.setdefault(key, {b: [] for b in BACKENDS})
            for b in BACKENDS:
                group[b].append(one(tag, w, b))
            if ceiling is not None:
                hint = max(group[b][-1].iops for b in BACKENDS)
                ceilings.setdefault(key, []).append(ceiling.run(w, hint_iops=hint, tag=tag))

        for r in range(rounds):
            for w in workloads:
                both(f"[{r + 1}/{rounds}]", replace(w, seed=w.seed + r), result.runs, w.label,
                     result.ceiling)
        if sweep is not None:
            result.sweep_label = f"{spell_size(sweep.bs)} {sweep.pattern}, QD {SWEEP_QDS}"
            for r in range(rounds):
                for qd in SWEEP_QDS:
                    both(f"[sweep {r + 1}/{rounds}]", replace(sweep, qd=qd, seed=sweep.seed + r),
                         result.sweep, qd, result.sweep_ceiling)
        result.loadavg.append(os.getloadavg())
        return result


def drop_cached(path: str | os.PathLike) -> None:
    """Write the file's dirty pages and drop all its pages from the page cache (the server
    keeps it open: the cache is the file's, not the descriptor's)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
