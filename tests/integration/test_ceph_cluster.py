"""The throwaway Ceph cluster (vblk/testing/ceph.py) is real: it starts fast, stores and returns
bytes, survives an OSD kill when it should, runs beside other clusters and leaves nothing behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vblk.testing.ceph import CephCluster, CephError

MiB = 1 << 20


def _processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that mention ``text`` (other clusters may run)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{pid}: {cmd}")
    return found


def test_cluster_starts_within_5_s(ceph_cluster: CephCluster, record_property) -> None:
    record_property("ceph_startup_seconds", round(ceph_cluster.startup_seconds, 3))
    print(f"\nceph start-up {ceph_cluster.startup_seconds:.2f} s: {ceph_cluster.timings}")
    assert ceph_cluster.startup_seconds < 5.0, ceph_cluster.timings
    assert ceph_cluster.ceph("health").strip() == "HEALTH_OK"
    assert "rbd" in ceph_cluster.ceph("osd", "pool", "ls").split()
    assert ceph_cluster.env["CEPH_CONF"] == str(ceph_cluster.conf)
    assert f"127.0.0.1:{ceph_cluster.port}" in ceph_cluster.conf.read_text()


def test_import_export_byte_identical(ceph_cluster: CephCluster, rbd_image) -> None:
    data = os.urandom(6 * MiB + 4096)           # two objects and a partial third
    name = rbd_image(MiB) + "-imported"         # a unique name; rbd import creates the image
    ceph_cluster.import_image(name, data)
    try:
        assert ceph_cluster.image_info(name)["size"] == len(data)
        assert ceph_cluster.export(name) == data
    finally:
        ceph_cluster.remove_image(name)


def test_rbd_image_and_bench_write(ceph_cluster: CephCluster, rbd_image, tmp_path: Path) -> None:
    name = rbd_image(4 * MiB, features=["layering"])
    assert name in ceph_cluster.rbd("ls").split()
    info = ceph_cluster.image_info(name)
    assert (info["size"], info["features"]) == (4 * MiB, ["layering"])
    assert ceph_cluster.export(name) == bytes(4 * MiB)   # new images read as zeroes
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-pattern", "seq", "--io-size", "64K",
                     "--io-total", "4M", name)
    out = ceph_cluster.export(name, tmp_path / "img.raw")
    data = out.read_bytes()
    # rbd bench fills its buffer with one random byte per run: the whole image holds it now
    assert len(data) == 4 * MiB and len(set(data)) == 1
    assert ceph_cluster.export(name) == data


@pytest.mark.parametrize("ceph_cluster_private", ["bluestore"], indirect=True)
def test_bluestore_data_survives_osd_kill(ceph_cluster_private: CephCluster) -> None:
    cluster = ceph_cluster_private
    data = os.urandom(4 * MiB)
    cluster.import_image("img", data)
    osd_pid = cluster.pids["osd.0"]
    cluster.kill_osd()
    assert "osd.0" not in cluster.pids and not _processes_naming(f"{cluster.conf} -i 0")
    took = cluster.start_osd()
    assert cluster.pids["osd.0"] != osd_pid
    print(f"\nbluestore osd restart: up in {took:.2f} s")
    assert cluster.export("img") == data


@pytest.mark.parametrize("ceph_cluster_private", ["memstore"], indirect=True)
def test_memstore_osd_restart(ceph_cluster_private: CephCluster) -> None:
    """memstore saves its objects on a clean stop and loads them on start; SIGKILL loses what
    was written since the last save, which start_osd refuses to hide."""
    cluster = ceph_cluster_private
    data = os.urandom(MiB)
    cluster.import_image("img", data)

    cluster.freeze()                             # no answers, no errors: clients time out
    with pytest.raises(CephError, match="did not finish"):
        cluster.rbd("ls", timeout=1)
    cluster.thaw()
    assert cluster.rbd("ls").split() == ["img"]

    cluster.stop_osd()                           # SIGTERM: memstore saves its objects to disk
    cluster.start_osd()
    assert cluster.export("img") == data

    cluster.import_image("later", data)
    cluster.kill_osd()                           # SIGKILL: back to what the stop saved
    with pytest.raises(CephError, match="bluestore"):
        cluster.start_osd()
    cluster._memstore_lost = False               # restart it anyway, to show why it refuses
    cluster.start_osd()
    assert cluster.rbd("ls").split() == ["img"]  # "later" is gone, silently


def test_two_clusters_side_by_side(ceph_cluster: CephCluster, tmp_path: Path) -> None:
    """One cluster in this process, one started and stopped by the command line, beside the
    session's: own ports and data; same image name, different bytes."""
    here = CephCluster.start()
    there_dir = tmp_path / "there"
    try:
        up = subprocess.run([sys.executable, "-m", "vblk.testing.ceph", "up", str(there_dir)],
                            capture_output=True, text=True, timeout=60, check=False)
        assert up.returncode == 0, up.stderr
        assert up.stdout.strip() == f"export CEPH_CONF={there_dir / 'ceph.conf'}"
        there = os.environ | {"CEPH_CONF": str(there_dir / "ceph.conf")}
        ports = {c.port for c in (ceph_cluster, here)}
        assert len(ports) == 2 and str(there_dir) not in str(here.conf)

        a, b = os.urandom(MiB), os.urandom(MiB)
        here.import_image("same", a)
        subprocess.run(["rbd", "import", "--no-progress", "-", "rbd/same"], input=b, env=there,
                       check=True, timeout=60)
        assert here.export("same") == a
        assert subprocess.run(["rbd", "export", "--no-progress", "rbd/same", "-"], env=there,
                              capture_output=True, check=True, timeout=60).stdout == b
        assert "same" not in ceph_cluster.rbd("ls").split()
    finally:
        here.kill_all()
        down = subprocess.run([sys.executable, "-m", "vblk.testing.ceph", "down",
                               str(there_dir)], capture_output=True, text=True, timeout=60,
                              check=False)
    assert down.returncode == 0, down.stderr
    assert not there_dir.exists() and not _processes_naming(str(there_dir))
    assert ceph_cluster.ceph("health").strip() == "HEALTH_OK"


def test_teardown_leaves_nothing(tmp_path: Path) -> None:
    # deep enough that the admin sockets cannot live in it: run/ goes to /tmp, and must go too
    directory = tmp_path / ("d" * 60)
    cluster = CephCluster.start(directory)
    run_dir = cluster.run_dir
    assert run_dir != directory / "run" and (directory / "run").resolve() == run_dir
    assert (run_dir / "osd.0.asok").is_socket()
    pids = list(cluster.pids.values())
    assert len(pids) == 2 and _processes_naming(str(directory))
    t0 = time.monotonic()
    cluster.stop()
    print(f"\nteardown {time.monotonic() - t0:.2f} s")
    assert not directory.exists() and not run_dir.exists()
    assert not _processes_naming(str(directory))
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)   # reaped, not zombies


def test_daemons_die_with_the_process_that_started_them() -> None:
    """A test process that crashes (a killed xdist worker) does not leave its cluster behind."""
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time; from vblk.testing.ceph import CephCluster; c = CephCluster.start(); "
        "print(c.directory, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        directory = proc.stdout.readline().strip()
        assert directory and len(_processes_naming(directory)) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _processes_naming(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_naming(directory)
    shutil.rmtree(directory)


def test_missing_binaries_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(CephError, match="apt-get install .*ceph-mon"):
        CephCluster.start(tmp_path / "c")
    assert not (tmp_path / "c").exists()
