"""``vblk bench --compare IMAGE --guest`` for real: fio in the test guest, vblk and qsd.

One round, two short workloads: this checks that the guest mode works end to end (the fio
add-on boots, fio runs on both backends, its JSON comes back and the table is filled), not
how fast anything is.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

ROW = re.compile(r"^(?P<label>.*?)\s+(?P<backend>vblk|qsd)\s+(?P<iops>[\d,]+)\s+(?P<mbs>[\d,.]+)"
                 r"\s+(?P<p50>[\d.]+)\s+(?P<p99>[\d.]+)\s+(?P<p999>[\d.]+)\s+(?P<errors>\d+)\s")


def nonzero_blocks(path: Path, block: int = 4096) -> int:
    data = path.read_bytes()
    zero = bytes(block)
    return sum(data[i:i + block] != zero for i in range(0, len(data), block))


def test_guest_mode_runs_fio_against_both_backends(tmp_path, guest_image):
    if shutil.which("fio") is None:
        pytest.fail("the guest mode needs fio: apt-get install fio", pytrace=False)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(32 * MiB))
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "vblk.cli", "bench", "--compare", str(image), "--guest", "--rounds", "1",
         "--duration", "1", "--ramp", "0", "--workload", "randread:4k:32",
         "--workload", "randwrite:4k:32", "--vblk-args", "--workers 2", "--workdir", str(work),
         "--keep"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    out = proc.stdout
    assert "fio in the test guest" in out and "writethrough" in out
    assert "fio-" in out and "libaio direct=1" in out and "boot to scenario" in out
    rows = [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]
    assert len(rows) == 4, out
    for row in rows:
        iops, mbs = float(row["iops"].replace(",", "")), float(row["mbs"].replace(",", ""))
        p50, p99 = float(row["p50"]), float(row["p99"])
        assert iops > 10 and mbs > 0, out
        assert mbs == pytest.approx(iops * 4096 / 1e6, rel=0.02, abs=0.1), out   # 4 KiB each
        assert 0 < p50 <= p99, out
        assert row["errors"] == "0", out
    assert [r["label"].strip() for r in rows[::2]] == ["4k randread QD32", "4k randwrite QD32"]
    assert len(re.findall(r"vblk/qsd\s+\d+\.\d\dx", out)) == 2, out
    assert "block-layer errors" not in out
    # the writes reached both copies of the (all-zero) image
    [kept] = list(work.iterdir())
    for backend in ("vblk", "qsd"):
        assert nonzero_blocks(kept / f"{backend}.img") > 50, backend
        assert (kept / f"guest-{backend}-1.log").read_text().count("VBLK-FIO-END") == 2
