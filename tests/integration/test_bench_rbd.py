"""``vblk bench --compare rbd:...`` run for real against the session's Ceph cluster
(``ceph_cluster``).

Short and bounded: one round of fractions of a second on a 16 MiB image, every subprocess with
a timeout. What they check: both backends served their copy with no failed request, rbd bench
ran beside them, the copies were made in the source's pool and removed (or kept with --keep),
and a bad spec or an unknown image is refused in one line before anything is made.
"""
from __future__ import annotations

import json
import random

import pytest

from vblk.testing.cli import error_line, run_vblk

MiB = 1 << 20


@pytest.fixture
def source(ceph_cluster, rbd_image) -> str:
    """A 16 MiB image of random data (every object allocated, as a used disk's), its name."""
    name = rbd_image(16 * MiB)
    ceph_cluster.remove_image(name)
    ceph_cluster.import_image(name, random.Random(5).randbytes(16 * MiB))
    return name


def images(cluster) -> set[str]:
    return set(cluster.rbd("ls").split())


def test_compare_on_rbd_runs_both_backends_and_rbd_bench_and_removes_the_copies(
        ceph_cluster, source, tmp_path):
    before = images(ceph_cluster)
    spec = f"rbd:rbd/{source}:conf={ceph_cluster.conf}"
    r = run_vblk("bench", "--compare", spec, "--rounds", 1, "--duration", 0.4,
             "--workload", "randread:4k:4", "--workload", "randwrite:4k:2", "--workdir", tmp_path)
    assert r.returncode == 0, (r.stdout, r.stderr)
    out = r.stdout
    assert f"serve rbd:rbd/{source}.bench-" in out and "-vblk:conf=" in out
    assert "driver=rbd,pool=rbd,image=" in out and "cache.direct=on" in out
    assert "writethrough=on" in out and "--cache writethrough" in out
    rows = [line.split() for line in out.splitlines()]
    for label in ("4k randread QD4", "4k randwrite QD2"):
        [vblk_row] = [row for row in rows if row[:4] == [*label.split(), "vblk"]]
        assert vblk_row[9] == "0"                                  # errors
    qsd_rows = [row for row in rows if row[:1] == ["qsd"]]
    assert len(qsd_rows) == 2 and all(row[6] == "0" for row in qsd_rows)
    assert sum(row[:1] == ["vblk/qsd"] for row in rows) == 2
    ceiling = [row for row in rows if row[:2] == ["rbd", "bench"]]
    assert len(ceiling) == 2 and all(float(row[2].replace(",", "")) > 0 for row in ceiling)
    assert sum(row[:2] == ["vblk/rbd", "bench"] and row[2].endswith("x") for row in rows) == 2
    assert images(ceph_cluster) == before                          # the copies are gone
    assert list(tmp_path.iterdir()) == []                          # and the logs


def test_compare_on_rbd_json_writeback_and_keep(ceph_cluster, source, tmp_path):
    before = images(ceph_cluster)
    r = run_vblk("bench", "--compare", f"rbd:rbd/{source}:conf={ceph_cluster.conf}:id=admin",
             "--rounds", 1, "--ops", 300, "--pattern", "randrw", "--qd", 4,
             "--cache", "writeback", "--keep", "--workdir", tmp_path, "--json")
    kept = images(ceph_cluster) - before
    for name in kept:
        ceph_cluster.remove_image(name)
    assert r.returncode == 0, (r.stdout, r.stderr)
    d = json.loads(r.stdout)
    assert len(kept) == 2 and all(n.startswith(f"{source}.bench-") for n in kept)
    assert {n.rsplit("-", 1)[1] for n in kept} == {"vblk", "qsd"}
    assert d["cache"] == "writeback" and d["errors"] == 0 and d["ceiling"] == "rbd bench"
    assert d["ceiling_failures"] == []
    assert "writeback" in d["commands"]["vblk"]
    assert any("writethrough=off" in a for a in d["commands"]["qsd"])
    assert any(",user=admin," in a for a in d["commands"]["qsd"])
    [row] = d["workloads"]
    assert row["workload"] == "4k randrw50 QD4"
    for backend in ("vblk", "qsd"):
        assert row["runs"][backend][0]["ops"] == 300 and row["median"][backend]["errors"] == 0
    [run] = row["ceiling"]["runs"]
    assert run["error"] is None and run["ops"] == 300 and run["iops"] > 0
    assert run["command"][-1] == f"rbd/{source}.bench-" + run["command"][-1].split("-")[-2] \
        + "-qsd"
    for option in ("--io-type readwrite", "--rw-mix-read 50", "--io-threads 4",
                   "--io-pattern rand", "--io-size 4096", f"--io-total {300 * 4096}"):
        assert option in " ".join(run["command"])
    assert row["ceiling"]["median"]["ratio"]["vblk"] > 0
    assert len(list(tmp_path.iterdir())) == 1                    # --keep: the logs too


@pytest.mark.parametrize("suffix, words", [
    ("nope", "rbd/nope: rbd: error opening image nope"),
    ("{source}:rados_osd_op_timeout=5", "put it in the conf file"),
    ("{source},writeback", "--vblk-args"),
])
def test_compare_refuses_a_bad_rbd_source_before_making_anything(ceph_cluster, source, suffix,
                                                                 words, tmp_path):
    before = images(ceph_cluster)
    where = suffix.format(source=source)
    spec = f"rbd:rbd/{where.split(':')[0]}:conf={ceph_cluster.conf}" + \
        "".join(f":{p}" for p in where.split(":")[1:])
    line = error_line(run_vblk("bench", "--compare", spec, "--rounds", 1, "--duration", 0.2,
                               "--workdir", tmp_path, timeout=60))
    assert words in line
    assert images(ceph_cluster) == before and list(tmp_path.iterdir()) == []


def test_rbd_bench_option_goes_with_an_rbd_compare(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    line = error_line(run_vblk("bench", "--compare", image, "--rbd-bench", "--workdir", tmp_path))
    assert "--rbd-bench goes with --compare rbd:" in line
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]
    assert "not --guest" in error_line(run_vblk("bench", "--compare", "rbd:rbd/x", "--guest",
                                                "--rbd-bench"))
    assert "not --socket-path" in error_line(run_vblk("bench", "--socket-path", tmp_path / "s.sock",
                                                 "--no-rbd-bench"))
