"""Nothing vblk runs or imports comes from the caller's directory, and vblk installs as one
package.

vblk runs as root; an operator may start it from /tmp or any directory others can write.
Here ``vblk serve`` (the console script, as a user types it) runs from a directory full of
decoy modules, each of which would leave a mark if Python ever imported it, and serves a
verified workload; no mark may appear.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
import zipfile
from pathlib import Path

import vblk
from vblk.testing.frontend import BlkClient
from vblk.testing.install import build_wheel
from vblk.testing.processes import stop_group
from vblk.virtio.constants import BlkStatus

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# Top-level names a child interpreter of vblk would import if the current directory were on
# its path: vblk's own packages, the old top-level names, its dependencies, the stdlib
# modules the daemon and the workers import.
DECOY_MODULES = ("workers", "cli", "msgpack", "typer", "select", "mmap", "socket", "struct",
                 "array", "signal", "fcntl", "errno", "pickle", "argparse", "logging",
                 "ctypes", "hashlib", "subprocess", "selectors", "prometheus_client")
DECOY_PACKAGES = ("vblk", "workers_pkg")


def vblk_script() -> str:
    """The ``vblk`` console script that pip installed for this interpreter."""
    found = os.path.join(sysconfig.get_path("scripts"), "vblk")
    if not os.path.exists(found):
        found = shutil.which("vblk") or found
    assert os.path.exists(found), "the vblk console script is not installed (pip install -e .)"
    return found


def plant_decoys(where: Path, marks: Path) -> None:
    body = ("import os as _os\n"
            f"open(_os.path.join({str(marks)!r}, __name__ + '.' + str(_os.getpid())), 'w').close()\n")
    for name in DECOY_MODULES:
        (where / f"{name}.py").write_text(body)
    for name in DECOY_PACKAGES:
        (where / name).mkdir()
        (where / name / "__init__.py").write_text(body)
        (where / name / "__main__.py").write_text(body)
    (where / "vblk" / "cli.py").write_text(body)
    (where / "vblk" / "daemon.py").write_text(body)


def worker_cmdlines(pid: int) -> list[list[str]]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    out = []
    for kid in kids:
        with open(f"/proc/{kid}/cmdline", "rb") as f:
            out.append([a.decode() for a in f.read().split(b"\0") if a])
    return out


def test_vblk_serve_from_a_directory_of_decoys_runs_none_of_them(tmp_path):
    decoys, marks = tmp_path / "cwd", tmp_path / "marks"
    decoys.mkdir()
    marks.mkdir()
    plant_decoys(decoys, marks)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(16 * MiB))
    sock = str(tmp_path / "vblk.sock")
    proc = subprocess.Popen([vblk_script(), "serve", str(image), "--socket-path", sock,
                             "--workers", "2"], cwd=decoys, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "vblk did not listen within 20 s"
            time.sleep(0.05)
        payload = os.urandom(64 * 1024)
        with BlkClient.connect(sock) as c:
            for i in range(16):
                assert c.write(i * 256, payload).status == BlkStatus.OK
            assert c.flush().status == BlkStatus.OK
            for i in range(16):
                got = c.read(i * 256, len(payload))
                assert got.status == BlkStatus.OK and got.data == payload
        # The daemon (same PID after its exec) and both workers run isolated.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[1:4] == [b"-I", b"-m", b"vblk.daemon"]
        kids = worker_cmdlines(proc.pid)
        assert len(kids) == 2 and all(k[1:4] == ["-I", "-m", "vblk.workers"] for k in kids)
    finally:
        status = stop_group(proc)
    assert status == 0, proc.stderr.read().decode()
    with open(image, "rb") as f:
        for i in range(16):
            f.seek(i * 256 * 512)
            assert f.read(len(payload)) == payload
    assert sorted(os.listdir(marks)) == [], "decoys from the current directory ran"


def test_the_wheel_installs_one_top_level_package_holding_every_module(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vblk"}
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).split() == [b"vblk"]
    # Every source module of the three folders is in it, under vblk/, and nothing else.
    expected = set()
    src = tmp_path / "src"
    for folder, prefix in (("vblk", "vblk"), ("workers", "vblk/workers"), ("cli", "vblk/cli")):
        for path in (src / folder).rglob("*.py"):
            expected.add(f"{prefix}/{path.relative_to(src / folder).as_posix()}")
    # and the data vblk install rewrites: the systemd units, QEMU's vhost-user descriptor
    expected |= {"vblk/data/systemd/vblk@.service", "vblk/data/systemd/vblk@.socket",
                 "vblk/data/systemd/vblk-host.service", "vblk/data/vhost-user/50-vblk.json"}
    assert expected - set(names) == set()
    assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == expected
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names
                                                    if n.endswith("/entry_points.txt")))
    assert b"vblk = vblk.cli.app:main" in entry_points
    assert b"vblk-vhost-user-blk = vblk.cli.backend:main" in entry_points
    # pyproject reads the version from vblk.__version__: one place to change it
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA")))
    assert re.search(rb"^Version: (.*)$", metadata, re.M).group(1).decode() == vblk.__version__
    # what PyPI and pip read: Linux only, CPython 3.11+, the licence, known-good lower bounds
    for line in (b"Classifier: Operating System :: POSIX :: Linux",
                 b"Classifier: Programming Language :: Python :: 3.11",
                 b"Classifier: License :: OSI Approved :: BSD License",
                 b"Requires-Python: >=3.11", b"License: BSD-3-Clause"):
        assert re.search(rb"^" + re.escape(line) + rb"$", metadata, re.M), line
    requires = re.findall(rb"^Requires-Dist: ([\w-]+)(.*)$", metadata, re.M)
    assert requires and all(rest.startswith(b">=") or b">=" in rest for _, rest in requires), \
        requires
    licence = next(n for n in names if re.search(r"\.dist-info/(licenses/)?LICENSE$", n))
    assert b"BSD 3-Clause License" in zipfile.ZipFile(wheel).read(licence)
    # PyPI's page opens with the checkout's commands: each says it is run from a checkout
    opening = metadata.split(b"\n\n", 1)[1].split(b"\n")[:4]
    assert [line for line in opening if line.startswith(b"./") and b"from a checkout" not in line] \
        == [] and any(line.startswith(b"./scripts/setup") for line in opening), opening
