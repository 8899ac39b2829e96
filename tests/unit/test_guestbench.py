"""The host side of ``vblk bench --guest``: fio's JSON, the scenario, the CPU sampler.

The two fixtures in ``data/`` are real fio 3.33 reports made on the host against a 16 MiB file
(``fio --ioengine=libaio --direct=1 --time_based --runtime=1 --ramp_time=0.2 --norandommap
--output-format=json``): ``fio-randread-4k-qd4.json`` without and ``fio-randrw70-4k-qd8.json``
with ``--unified_rw_reporting=both`` (the flag the guest mode passes). One test also runs the
host's fio with exactly the arguments the guest gets.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from vblk.lab.guestbench import (
    BEGIN,
    END,
    IO_ERRORS,
    JSON_BEGIN,
    JSON_END,
    CpuSampler,
    GuestComparison,
    GuestRun,
    fio_args,
    fio_reports,
    guest_script,
    parse_fio_json,
)
from vblk.lab.report import format_comparison
from vblk.lab.servers import BACKENDS
from vblk.lab.workload import Result, Workload

DATA = Path(__file__).parent / "data"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def test_a_read_only_report_without_mixed_section_is_read_from_the_read_side():
    doc = load("fio-randread-4k-qd4.json")
    raw = doc["jobs"][0]
    [job] = parse_fio_json(json.dumps(doc))
    assert job.name == "randread_4k_qd4" and job.error == 0
    assert job.ops == job.reads == raw["read"]["total_ios"] > 0
    assert job.writes == 0
    assert job.bytes == raw["read"]["io_bytes"] == job.ops * 4096
    assert job.seconds == pytest.approx(raw["read"]["runtime"] / 1000)
    # our IOPS (ops over fio's runtime) is fio's own figure
    assert job.ops / job.seconds == pytest.approx(raw["read"]["iops"], rel=0.01)
    pct = raw["read"]["clat_ns"]["percentile"]
    assert job.lat_us["p50"] == pct["50.000000"] / 1e3
    assert job.lat_us["p99_9"] == pct["99.900000"] / 1e3
    lat = job.lat_us
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    assert job.cpu_pct == pytest.approx(raw["usr_cpu"] + raw["sys_cpu"])


def test_a_mixed_report_counts_both_directions_and_uses_the_mixed_latencies():
    doc = load("fio-randrw70-4k-qd8.json")
    raw = doc["jobs"][0]
    [job] = parse_fio_json(doc)
    assert job.reads == raw["read"]["total_ios"] > 0
    assert job.writes == raw["write"]["total_ios"] > 0
    assert job.ops == job.reads + job.writes == raw["mixed"]["total_ios"]
    assert job.bytes == raw["read"]["io_bytes"] + raw["write"]["io_bytes"]
    assert 0.6 < job.reads / job.ops < 0.8               # rwmixread=70
    assert job.ops / job.seconds == pytest.approx(raw["mixed"]["iops"], rel=0.01)
    assert job.lat_us["p99"] == raw["mixed"]["clat_ns"]["percentile"]["99.000000"] / 1e3


@pytest.mark.parametrize("text", ["{}", '{"jobs": []}', '{"jobs": [{"jobname": "x"}]}', "[1]"])
def test_what_is_not_a_fio_report_is_a_value_error(text):
    with pytest.raises(ValueError):
        parse_fio_json(text)


def test_reports_are_cut_out_of_the_serial_output_by_index():
    doc = (DATA / "fio-randread-4k-qd4.json").read_text()
    output = "\n".join([
        "FIO_VERSION=fio-3.33", f"{BEGIN} 0", f"{END} 0 rc=0", f"{JSON_BEGIN} 0", doc, "",
        f"{JSON_END} 0", f"{BEGIN} 1", "fio: some complaint", f"{END} 1 rc=1",
        f"{JSON_BEGIN} 1", "", f"{JSON_END} 1", f"{IO_ERRORS}=0"])
    reports = fio_reports(output)
    assert sorted(reports) == [0, 1]
    assert parse_fio_json(reports[0])[0].ops > 0
    with pytest.raises(ValueError):
        parse_fio_json(reports[1])


def test_fio_arguments_follow_the_workload():
    w = Workload.parse("randrw:128k:8", duration=2.5, rwmix=70, seed=7, offset=1 << 20,
                       size=8 << 20)
    args = fio_args(w, name="w0", output="/tmp/o.json", ramp=0.5)
    for want in ("--rw=randrw", "--bs=131072", "--iodepth=8", "--runtime=2500ms",
                 "--ramp_time=500ms", "--randseed=7", "--rwmixread=70", "--offset=1048576",
                 "--size=8388608", "--ioengine=libaio", "--direct=1", "--filename=/dev/vda",
                 "--output-format=json", "--output=/tmp/o.json", "--unified_rw_reporting=both"):
        assert want in args
    script = guest_script([w, Workload.parse("read:4k:1", duration=1)], ramp=0)
    assert script.count("fio --name=") == 2 and f"{JSON_END} 1" in script
    with pytest.raises(Exception, match="--ops"):
        fio_args(Workload.parse("read:4k:1", duration=None, ops=5), name="x", output="y")


def test_the_guest_fio_arguments_run_with_the_hosts_fio(tmp_path):
    """The exact command line the guest runs, on a file here: fio accepts it and its report
    parses to a plausible result."""
    fio = shutil.which("fio")
    if fio is None:
        pytest.fail("fio not found: apt-get install fio", pytrace=False)
    target = tmp_path / "disk.img"
    target.write_bytes(b"\0" * (4 << 20))
    out = tmp_path / "out.json"
    w = Workload.parse("randrw:4k:4", duration=0.3, rwmix=50, seed=3)
    args = fio_args(w, name="w0", output=str(out), ramp=0.1, filename=str(target))
    args[args.index("--direct=1")] = "--direct=0"    # tmp_path may not take O_DIRECT
    proc = subprocess.run([fio, *args[1:]], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    [job] = parse_fio_json(out.read_text())
    assert job.error == 0 and job.reads > 0 and job.writes > 0
    assert 0.2 < job.seconds < 2
    assert 0 < job.lat_us["p50"] <= job.lat_us["p99"]


def test_cpu_share_is_interpolated_between_samples():
    s = CpuSampler(lambda: 0.0)
    s.samples = [(100.0, 10.0), (101.0, 10.5), (103.0, 10.5), (104.0, 11.5)]
    assert s.share(100.0, 101.0) == pytest.approx(50.0)
    assert s.share(100.5, 103.5) == pytest.approx(100.0 * (11.0 - 10.25) / 3.0)   # 25 %
    assert s.share(99.0, 101.0) is None               # before the first sample
    assert s.share(101.0, 101.0) is None
    assert s.share(None, 101.0) is None


def test_a_guest_comparison_prints_the_same_table_and_counts_kernel_errors():
    w = Workload.parse("randread:4k:32", duration=1)
    c = GuestComparison("disk.img", True, 1, {"vblk": ["vblk"], "qsd": ["qsd"]}, load="guest",
                        notes=["guest: TCG"])
    for b, ops in zip(BACKENDS, (900, 1000)):
        r = Result(w, ops, ops, 0, 0, ops * 4096, 1.0,
                   {"min": 1, "mean": 2, "p50": 2, "p99": 3, "p99_9": 4, "max": 5}, 99.0, 5.0, b)
        c.runs.setdefault(w.label, {x: [] for x in BACKENDS})[b].append(r)
        c.boots.append(GuestRun(b, [r], 3.0, 9.0, io_errors=0))
    text = format_comparison(c)
    assert "fio in the test guest" in text and "guest CPU" in text and "guest: TCG" in text
    assert "0.90x" in text
    d = c.to_dict()
    assert d["load"] == "guest" and d["errors"] == 0
    assert [b["backend"] for b in d["guest"]["boots"]] == list(BACKENDS)
    c.boots[0].io_errors = 2
    assert c.errors == 2 and c.to_dict()["errors"] == 2


class _FakeServer:
    """What _collect reads of a bench.Server: its name and log."""
    name = "vblk"

    def log_tail(self, limit: int = 2000) -> str:
        return "(server log)"


def _guest_output(reports: list[str], statuses: list[int], io_errors: str = "0") -> str:
    lines = ["VBLK-GUEST-SCENARIO-START"]
    for i, (doc, rc) in enumerate(zip(reports, statuses)):
        lines += [f"{BEGIN} {i}", f"{END} {i} rc={rc}", f"{JSON_BEGIN} {i}", doc, "",
                  f"{JSON_END} {i}"]
    return "\n".join(lines + [f"{IO_ERRORS}={io_errors}", "VBLK-GUEST-EXIT=0"])


def _collect(output: str, n: int, exit_status: int | None = 0):
    from vblk.lab.guest import GuestResult
    from vblk.lab.guestbench import _collect as collect
    res = GuestResult(exit_status=exit_status, output=output, seconds=9.0,
                      timed_lines=[(0.1 * i, line) for i, line in enumerate(output.splitlines())],
                      started_at=1000.0)
    cpu = CpuSampler(lambda: 0.0)
    cpu.samples = [(999.0, 1.0), (2000.0, 101.1)]      # 0.1 CPU seconds per second
    workloads = [Workload.parse("randread:4k:4", duration=1) for _ in range(n)]
    return collect(_FakeServer(), workloads, res, cpu)


def test_collect_turns_reports_into_results_and_counts_failed_fio_runs():
    good = (DATA / "fio-randread-4k-qd4.json").read_text()
    bad = json.loads(good)
    bad["jobs"][0]["error"] = 5                          # EIO
    run = _collect(_guest_output([good, json.dumps(bad), good], [0, 1, 1]), 3)
    assert [r.errors for r in run.results] == [0, 1, 1]
    assert run.results[0].ops == load("fio-randread-4k-qd4.json")["jobs"][0]["read"]["total_ios"]
    assert run.results[0].server_cpu == pytest.approx(10.0)
    assert run.io_errors == 0 and run.backend == "vblk"


def test_collect_fails_loudly_when_the_guest_did_not_deliver():
    from vblk.lab.guestbench import GuestBenchError
    good = (DATA / "fio-randread-4k-qd4.json").read_text()
    with pytest.raises(GuestBenchError, match="no fio output for 4k randread QD4"):
        _collect(_guest_output([good], [0]), 2)
    with pytest.raises(GuestBenchError, match="unreadable"):
        _collect(_guest_output([good[:200]], [0]), 1)
    with pytest.raises(GuestBenchError, match="did not finish"):
        _collect(_guest_output([good], [0]), 1, exit_status=None)
    with pytest.raises(GuestBenchError, match="kernel's I/O errors"):
        _collect(_guest_output([good], [0], io_errors=""), 1)
    assert _collect(_guest_output([good], [0], io_errors="3"), 1).io_errors == 3
