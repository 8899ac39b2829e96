"""``vblk bench`` run for real (``python -m vblk.cli bench``) against vblk and qemu-storage-daemon.

Short and bounded: every load is ``--ops N`` or a fraction of a second; every subprocess has
a timeout.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vblk.control import fetch_stats
from vblk.testing.cli import error_line
from vblk.testing.frontend import BlkClient
from vblk.virtio.constants import BlkStatus

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
IMAGE_SIZE = 16 * MiB
CHUNK = 128 * 1024


def bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vblk.cli", "bench", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ok_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(3).randbytes(IMAGE_SIZE))
    return path


def read_disk(sock: str) -> bytes:
    with BlkClient.connect(sock) as client:
        parts = [client.read(s, CHUNK) for s in range(0, IMAGE_SIZE // 512, CHUNK // 512)]
    assert {p.status for p in parts} == {BlkStatus.OK}
    return b"".join(p.data for p in parts)


@pytest.mark.parametrize("pattern", ["randread", "randrw"])
def test_json_numbers_are_sane(backend_server, image, pattern):
    sock = backend_server(image)
    d = ok_json(bench("--socket-path", sock, "--pattern", pattern, "--ops", 2000, "--qd", 8, "--json"))
    assert d["ops"] == 2000 and d["errors"] == 0
    assert d["bytes"] == d["ops"] * 4096 == d["ops"] * d["workload"]["bs"]
    assert d["reads"] + d["writes"] == 2000
    assert d["writes"] == 0 if pattern == "randread" else min(d["reads"], d["writes"]) > 500
    assert d["iops"] > 0 and d["mb_per_s"] > 0 and d["seconds"] > 0
    assert d["iops"] == pytest.approx(d["ops"] / d["seconds"], rel=1e-3)
    lat = d["lat_us"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert 0 < d["client_cpu_pct"] <= 200


def test_flush_every_n_writes_reaches_the_backend_as_flush_requests(vblk_server, image):
    """--flush-every 16 on a 70/30 mix: the FLUSHes the client counts are the ones vblk's
    stats count, one per 16 writes whatever the FLUSHes take: each stands for 16, the rest
    carry over, and a queue whose next FLUSH is due while the last is out waits for it (so at
    most 16 + QD writes are not yet covered at the end). Before, writes made while a FLUSH was
    out counted for none: under load 861 writes got 42 FLUSHes, a slow flusher fewer."""
    sock = vblk_server(image, "--cache", "writeback")
    d = ok_json(bench("--socket-path", sock, "--pattern", "randrw", "--rwmix", 70, "--qd", 8,
                      "--flush-every", 16, "--ops", 3000, "--json"))
    assert d["errors"] == 0 and d["ops"] == 3000
    assert d["reads"] + d["writes"] + d["flushes"] == 3000
    assert d["bytes"] == (d["reads"] + d["writes"]) * 4096
    assert d["writes"] // 16 - 2 <= d["flushes"] <= d["writes"] // 16
    assert d["workload"]["label"] == "4k randrw70 QD8 flush/16"
    served = fetch_stats(sock + ".ctl")["queues"][0]["types"]
    assert (served["flush"]["requests"], served["write"]["requests"]) == (d["flushes"], d["writes"])


def test_randwrite_changes_the_region_and_nothing_else(backend_server, image):
    sock = backend_server(image)
    before = image.read_bytes()
    d = ok_json(bench("--socket-path", sock, "--pattern", "randwrite", "--ops", 512, "--qd", 4,
                      "--offset", "1M", "--size", "1M", "--seed", 9, "--json"))
    assert (d["writes"], d["errors"], d["bytes"]) == (512, 0, 512 * 4096)
    after = read_disk(sock)
    assert after[:MiB] == before[:MiB]
    assert after[2 * MiB:] == before[2 * MiB:]
    changed = sum(after[o:o + 4096] != before[o:o + 4096] for o in range(MiB, 2 * MiB, 4096))
    assert changed > 150            # 512 random writes over 256 blocks touch ~221 of them


def test_text_output_and_a_read_only_sequential_run(vblk_server, image):
    sock = vblk_server(image, "--workers", "2")
    r = bench("--socket-path", sock, "--pattern", "read", "--bs", "64k", "--qd", 2, "--ops", 300)
    assert r.returncode == 0, r.stderr
    assert "64k read QD2" in r.stdout and "errors      0" in r.stdout
    for word in ("IOPS", "MB/s", "p50", "p99.9", "client CPU"):
        assert word in r.stdout
    assert r.stderr == ""                     # no progress without a terminal or --progress


def test_more_queues_than_offered_is_refused(vblk_server, image):
    sock = vblk_server(image, "--workers", "1")
    line = error_line(bench("--socket-path", sock, "--queues", 2, "--ops", 10))
    assert "--queues 2" in line and "GET_QUEUE_NUM" in line


@pytest.mark.parametrize("args, words", [
    (["--socket-path", "/nonexistent.sock", "--qd", "0"], "--qd 0"),
    (["--socket-path", "/nonexistent.sock", "--bs", "1000"], "multiple of 512"),
    (["--socket-path", "/nonexistent.sock", "--pattern", "randomread"], "--pattern"),
    (["--socket-path", "/nonexistent.sock", "--duration", "1", "--ops", "5"], "not both"),
    (["--socket-path", "/nonexistent.sock", "--rounds", "2"], "--rounds goes with --compare"),
    (["--socket-path", "/nonexistent.sock"], "no such socket"),
    (["--socket-path", "/nonexistent.sock", "--flush-every", "8"], "writes nothing to flush"),
    (["--compare", "/nonexistent.img", "--guest", "--flush-every", "8"],
     "--flush-every does not go with --guest"),
    (["--ops", "5"], "exactly one of --socket"),
    (["--compare", "/nonexistent.img", "--workload", "randread:4k"], "PATTERN:BS:QD"),
    (["--socket-path", "/nonexistent.sock", "--guest"], "--guest goes with --compare"),
    (["--compare", "/nonexistent.img", "--ramp", "1"], "--ramp goes with --guest"),
    (["--compare", "/nonexistent.img", "--guest", "--ops", "5"], "--ops does not go with --guest"),
    (["--compare", "/nonexistent.img", "--guest", "--queues", "2"], "--queues does not go"),
    (["--compare", "/nonexistent.img", "--guest"], "not a regular file"),
    (["--socket-path", "/nonexistent.sock", "--cold"], "--cold goes with --compare"),
    (["--compare", "/nonexistent.img", "--guest", "--cold"], "--cold does not go with --guest"),
    (["--compare", "rbd:rbd/img", "--cold"], "--cold goes with an image file"),
])
def test_bad_arguments_exit_2_with_one_line(args, words):
    assert words in error_line(bench(*args))


@pytest.mark.parametrize("args, words", [
    (["--smp", "0"], "--smp 0"),
    (["--guest-memory", "100M"], "--guest-memory 100M"),
    (["--ramp", "-1"], "--ramp -1"),
    (["--vblk-args", "--writeback", "--cache", "writethrough"], "contradicts"),
])
def test_bad_guest_options_are_refused_before_anything_starts(image, tmp_path, args, words):
    assert words in error_line(bench("--compare", image, "--guest", "--workdir", tmp_path,
                                         *args))
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]      # no copies made


def test_compare_runs_both_backends_and_prints_the_ratio(image, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = bench("--compare", image, "--rounds", 1, "--duration", 0.3, "--workload", "randread:4k:4",
              "--workload", "randwrite:4k:2", "--vblk-args", "--workers 1", "--workdir", work,
              timeout=90)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert "writethrough" in out and "writethrough=on" in out and "--cache writethrough" in out
    assert "4k randread QD4" in out and "4k randwrite QD2" in out
    rows = [line.split() for line in out.splitlines()]
    assert sum(row[:1] == ["qsd"] for row in rows) == 2
    assert sum("vblk/qsd" in row for row in rows) == 2
    assert sum(row[3:4] == ["vblk"] for row in rows) == 2      # "4k randread QD4 vblk ..."
    assert list(work.iterdir()) == []                             # copies and logs removed


def test_compare_cold_drops_each_copy_before_each_run(image, tmp_path):
    d = ok_json(bench("--compare", image, "--rounds", 1, "--duration", 0.3, "--workload",
                      "randread:4k:4", "--cold", "--vblk-args", "--workers 1", "--workdir",
                      tmp_path, "--json", timeout=90))
    assert d["errors"] == 0 and any(n.startswith("cold: ") for n in d["notes"])
    [row] = d["workloads"]
    assert row["runs"]["vblk"][0]["ops"] > 0 and row["runs"]["qsd"][0]["ops"] > 0


def test_drop_cached_leaves_none_of_the_file_in_the_page_cache():
    """What --cold relies on: after ``drop_cached`` a read that must not wait for the disk
    (RWF_NOWAIT) is refused. (On /var/tmp: tmpfs pages cannot be dropped.)"""
    from vblk.lab.compare import drop_cached
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="vblk-cold-")
    try:
        path = os.path.join(d, "f.img")
        with open(path, "wb") as f:
            f.write(os.urandom(MiB))
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = bytearray(4096)
            assert os.preadv(fd, [buf], 65536, os.RWF_NOWAIT) == 4096     # written: cached
            drop_cached(path)
            with pytest.raises(BlockingIOError):
                os.preadv(fd, [buf], 65536, os.RWF_NOWAIT)
        finally:
            os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_compare_json_and_plot(image, tmp_path):
    import matplotlib  # noqa: F401  (the bench extra; CI installs it)
    png = tmp_path / "sweep.png"
    d = ok_json(bench("--compare", image, "--rounds", 1, "--ops", 200, "--pattern", "randread",
                      "--qd", 2, "--cache", "writeback", "--vblk-args", "--workers 1",
                      "--plot", png, "--workdir", tmp_path, "--json", timeout=120))
    assert d["cache"] == "writeback" and d["errors"] == 0
    assert d["vblk_source"]                    # the git commit served
    assert "writeback" in d["commands"]["vblk"]
    assert any("writethrough=off" in arg for arg in d["commands"]["qsd"])
    [row] = d["workloads"]
    assert row["workload"] == "4k randread QD2"
    assert row["ratio_vblk_qsd"]["iops"] > 0
    assert [s["qd"] for s in d["sweep"]] == [1, 2, 4, 8, 16, 32]
    for backend in ("vblk", "qsd"):
        assert row["runs"][backend][0]["ops"] == 200
        assert row["median"][backend]["server_cpu_pct"] is not None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the pure parts, in process ------------------------------------------------------------------
def test_sizes_workloads_and_percentiles():
    from vblk.lab.compare import split_cache_mode
    from vblk.lab.workload import BenchError, Workload, latency_summary, size_option
    from vblk.units import spell_size
    assert [size_option(s, "--bs") for s in ("4k", "128K", "1M", "1GiB", "512")] == \
        [4096, 131072, MiB, 1 << 30, 512]
    with pytest.raises(BenchError, match="--bs: '4x' is not a size"):
        size_option("4x", "--bs")
    assert [spell_size(n) for n in (4096, 131072, MiB, 1536)] == ["4k", "128k", "1M", "1536"]
    w = Workload.parse("randwrite:128k:8", duration=1.0)
    assert (w.pattern, w.bs, w.qd, w.label) == ("randwrite", 131072, 8, "128k randwrite QD8")
    for bad in ("randread:4k", "randread:4x:1", "randread:4k:0", "scan:4k:1"):
        with pytest.raises(BenchError):
            Workload.parse(bad, duration=1.0)
    lat = latency_summary(list(range(1000, 0, -1)))
    assert (lat["min"], lat["p50"], lat["p99"], lat["p99_9"], lat["max"]) == (0.001, 0.5, 0.99,
                                                                                0.999, 1.0)
    assert latency_summary([7000])["p99_9"] == latency_summary([7000])["p50"] == 7.0
    assert split_cache_mode("--workers 2", None) == (True, ["--workers", "2"])
    assert split_cache_mode("--writeback --workers 2", None) == (False, ["--workers", "2"])
    assert split_cache_mode("", "writeback") == (False, [])
    assert split_cache_mode("--cache writeback --workers 2", None) == (False, ["--workers", "2"])
    assert split_cache_mode("--cache=writethrough", "writethrough") == (True, [])
    with pytest.raises(BenchError, match="contradicts --cache writeback"):
        split_cache_mode("--cache writeback", "writethrough")
    with pytest.raises(BenchError, match="--cache wb: writethrough or writeback"):
        split_cache_mode("--cache wb", None)
    with pytest.raises(BenchError):
        split_cache_mode("--writethru", "writeback")
    with pytest.raises(BenchError):
        split_cache_mode("--socket-path /x", None)
