"""vblk as QEMU's vhost-user conventions and systemd expect to find it: the backend program
``vblk-vhost-user-blk`` (``--print-capabilities``, ``--socket-path``/``--fd``, ``--blk-file``,
``--read-only``), the descriptor ``vblk install vhost-user`` writes, and the units ``vblk
install systemd`` writes for this install (checked by ``systemd-analyze`` and run under a real
systemd in a container)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.test_ops import (
    NSPAWN,
    SYSTEMD_ANALYZE,
    accepts,
    analyze,
    block,
    make_image,
    wait_for,
)
from vblk import install
from vblk.testing.frontend import BlkClient
from vblk.testing.processes import stop_group
from vblk.virtio.constants import BlkStatus, Feature

REPO = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items()
       if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
BACKEND = install.find_script(install.BACKEND_SCRIPT)

# QEMU docs/interop/vhost-user.json (5.0 and later): a descriptor is a VhostUserBackend
# (description, type and binary required, tags optional); its type a VHostUserBackendType;
# a block backend's --print-capabilities a VHostUserBackendCapabilitiesBlock, whose features
# are VHostUserBackendBlockFeature values.
DESCRIPTOR_REQUIRED = {"description": str, "type": str, "binary": str}
DESCRIPTOR_OPTIONAL = {"tags": list}
BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}
BLOCK_FEATURES = {"read-only": "--read-only", "blk-file": "--blk-file"}


def vblk(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vblk.cli", *map(str, args)], cwd="/",
                          env=ENV, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, **kw)


def check_descriptor(text: str) -> dict:
    descriptor = json.loads(text)
    assert isinstance(descriptor, dict)
    for key, kind in DESCRIPTOR_REQUIRED.items():
        assert isinstance(descriptor.get(key), kind), key
    assert set(descriptor) <= set(DESCRIPTOR_REQUIRED) | set(DESCRIPTOR_OPTIONAL)
    assert all(isinstance(t, str) for t in descriptor.get("tags", []))
    assert descriptor["type"] in BACKEND_TYPES and descriptor["type"] == "block"
    assert os.path.isabs(descriptor["binary"])
    return descriptor


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="vblk-inst-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_the_shipped_descriptor_is_a_vhost_user_backend():
    shipped = check_descriptor(install.shipped("vhost-user", install.DESCRIPTOR))
    assert shipped["binary"] == "/usr/local/bin/vblk-vhost-user-blk"      # a root pip install


def test_install_vhost_user_names_this_installs_backend_program(tmp_path):
    assert BACKEND is not None, "vblk-vhost-user-blk is not installed: pip install -e ."
    r = vblk("install", "vhost-user", "--dir", tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    written = tmp_path / "50-vblk.json"
    assert r.stdout.startswith(f"wrote {written}")
    descriptor = check_descriptor(written.read_text())
    assert descriptor["binary"] == str(BACKEND) and os.access(BACKEND, os.X_OK)
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    # the program it names answers --print-capabilities, even among options it would refuse
    for args in (["--print-capabilities"], ["--socket-path=/nonexistent/x", "--bogus",
                                            "--print-capabilities", "spec", "extra"]):
        caps = subprocess.run([descriptor["binary"], *args], capture_output=True, text=True,
                              timeout=60, env=ENV)
        assert (caps.returncode, caps.stderr) == (0, ""), caps.stderr
        answer = json.loads(caps.stdout)
        assert answer["type"] == descriptor["type"]
        assert answer["features"] and set(answer["features"]) <= set(BLOCK_FEATURES)
    # and takes every option each feature announces
    usage = subprocess.run([descriptor["binary"], "--help"], capture_output=True, text=True,
                           timeout=60, env=ENV).stdout
    for feature in answer["features"]:
        assert BLOCK_FEATURES[feature] in usage
    for option in ("--socket-path", "--fd", "--print-capabilities"):
        assert option in usage


def test_install_refusals_are_one_line(tmp_path):
    for args, words in ((["vhost-user", "--dir", tmp_path / "missing"], "is not a directory"),
                        (["vhost-user", "--dir", tmp_path, "--binary", "bin/x"], "not an absolute"),
                        (["systemd", "--dir", tmp_path, "--vblk", "vblk"], "absolute path")):
        r = vblk("install", *args)
        assert r.returncode == 2 and r.stdout == "", r
        assert r.stderr.startswith("vblk: error: ") and words in r.stderr and \
            len(r.stderr.splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def serve_backend(args, *, pass_fds=()) -> subprocess.Popen:
    return subprocess.Popen([str(BACKEND), *map(str, args)], env=ENV, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, pass_fds=pass_fds)


def test_the_conventional_options_serve_a_disk(tmp_path, sockdir):
    """QEMU's conventions, spelled as management software spells them (--opt=VALUE)."""
    assert BACKEND is not None, "vblk-vhost-user-blk is not installed: pip install -e ."
    image = make_image(tmp_path / "disk.img")
    sock = sockdir / "ro.sock"
    proc = serve_backend([f"--socket-path={sock}", f"--blk-file={image}", "--read-only",
                          "--workers=1"])
    try:
        wait_for(lambda: accepts(sock), "the socket", proc)
        with BlkClient.connect(sock) as client:
            assert client.frontend.features & Feature.BLK_RO.mask
            assert client.read(8, 4096).data == block(1)
            assert client.write(0, b"x" * 512).status == BlkStatus.IOERR
    finally:
        assert stop_group(proc) == 0, proc.stderr.read()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)      # --fd: an inherited one
    listener.bind(str(sockdir / "fd.sock"))
    listener.listen()
    proc = serve_backend([f"--fd={listener.fileno()}", f"--blk-file={image}", "--workers=1"],
                         pass_fds=(listener.fileno(),))
    listener.close()
    try:
        with BlkClient.connect(sockdir / "fd.sock", timeout=30) as client:
            assert not client.frontend.features & Feature.BLK_RO.mask
            assert client.write(16, block(99)).status == BlkStatus.OK
            assert client.read(16, 4096).data == block(99)
    finally:
        assert stop_group(proc) == 0, proc.stderr.read()


# -- the systemd units ----------------------------------------------------------------------

def test_render_units_points_at_the_install_and_binds_only_what_protect_home_would_hide():
    units = install.render_units(["/home/op/venv/bin/vblk"], ["/home/op/venv", "/root/py"])
    assert list(units.files) == ["vblk@.service", "vblk@.socket", "vblk-host.service"]
    for service, args in ((units.service, "${VBLK_DISK} $VBLK_ARGS"),
                          (units.host, "--config /etc/vblk/host.toml")):
        assert re.findall(r"^ExecStart=.*$", service, re.M) == \
            [f"ExecStart=/home/op/venv/bin/vblk serve {args}"]
        assert re.findall(r"^(ProtectHome=.*|BindReadOnlyPaths=.*)$", service, re.M) == \
            ["ProtectHome=tmpfs", "BindReadOnlyPaths=/home/op/venv", "BindReadOnlyPaths=/root/py"]
    plain = install.render_units(["/opt/vblk/bin/python", "-I", "-m", "vblk.cli"], [])
    assert "ExecStart=/opt/vblk/bin/python -I -m vblk.cli serve ${VBLK_DISK} $VBLK_ARGS" \
        in plain.service and "\nProtectHome=yes\n" in plain.service
    assert "ExecStart=/opt/vblk/bin/python -I -m vblk.cli serve --config /etc/vblk/host.toml" \
        in plain.host and "\nProtectHome=yes\n" in plain.host
    assert "BindReadOnlyPaths" not in plain.service + plain.host
    assert plain.socket == install.shipped("systemd", "vblk@.socket")
    odd = install.render_units(["/srv/my tools/vblk 100%"], [])
    assert 'ExecStart="/srv/my tools/vblk 100%%" serve' in odd.service
    assert 'ExecStart="/srv/my tools/vblk 100%%" serve --config' in odd.host
    assert install.hidden_by_protect_home(["/home/a", "/root", "/run/user/0/x", "/usr", "/homes",
                                           "/opt/root"]) == ["/home/a", "/root", "/run/user/0/x"]


def generated_units(tmp_path: Path) -> tuple[Path, str, list[str]]:
    """``vblk install systemd`` into tmp_path/units; (dir, its stdout, the dirs it binds)."""
    units = tmp_path / "units"
    units.mkdir()
    r = vblk("install", "systemd", "--dir", units)
    assert r.returncode == 0, r.stderr
    service = (units / "vblk@.service").read_text()
    bound = re.findall(r"^BindReadOnlyPaths=(.*)$", service, re.M)
    return units, r.stdout + r.stderr, bound


SERVICE_ARGS = {"vblk@.service": "${VBLK_DISK} $VBLK_ARGS",
                "vblk-host.service": "--config /etc/vblk/host.toml"}


def test_install_systemd_writes_units_that_run_this_vblk(tmp_path):
    units, out, bound = generated_units(tmp_path)
    assert sorted(p.name for p in units.iterdir()) == sorted(install.UNITS)
    command = install.vblk_command()
    assert os.access(command[0], os.X_OK)
    hidden = install.hidden_by_protect_home(install.runtime_dirs(command))
    assert bound == hidden                     # exactly what ProtectHome=yes would hide
    assert ("ProtectHome=tmpfs" in out) == bool(hidden)
    for name, args in SERVICE_ARGS.items():    # both services, rewritten the same way
        service = (units / name).read_text()
        assert re.findall(r"^ExecStart=(.*)$", service, re.M) == \
            [" ".join(command) + " serve " + args], name
        assert re.findall(r"^BindReadOnlyPaths=(.*)$", service, re.M) == hidden, name
        protect = re.findall(r"^ProtectHome=(.*)$", service, re.M)
        assert protect == (["tmpfs"] if hidden else ["yes"]), name
        # everything else is the shipped unit, line for line
        shipped = install.shipped("systemd", name).splitlines()
        kept = [line for line in service.splitlines() if not line.startswith(
            ("ExecStart=", "ProtectHome=", "BindReadOnlyPaths=", "# vblk lives", "# empty for"))]
        assert kept == [line for line in shipped
                        if not line.startswith(("ExecStart=", "ProtectHome="))], name
    assert (units / "vblk@.socket").read_text() == install.shipped("systemd", "vblk@.socket")
    # what systemd itself says of the files written
    assert SYSTEMD_ANALYZE, "systemd-analyze is missing: apt-get install systemd"
    for name in ("vblk@.service", "vblk@.socket"):
        shutil.copy(units / name, units / name.replace("@.", "@t."))
    r = analyze("verify", "--man=no", units / "vblk@t.service", units / "vblk@t.socket",
                units / "vblk-host.service", unit_dir=units)
    assert r.returncode == 0 and [li for li in r.stderr.splitlines() if "vblk" in li] == [], \
        r.stderr
    for name in ("vblk@t.service", "vblk-host.service"):
        r = analyze("security", "--offline=true", "--threshold=20", units / name, unit_dir=units)
        level = re.search(rf"Overall exposure level for {re.escape(name)}: ([0-9.]+)", r.stdout)
        assert level and float(level.group(1)) <= 2.0, r.stdout + r.stderr


def test_the_units_have_one_copy_in_the_package_and_the_source_tree_points_at_it():
    """vblk/data/systemd is where the units live (shipped, and rewritten by vblk install);
    the top-level systemd/ folder holds only the README that explains them, naming each."""
    shipped = sorted(p.name for p in (REPO / "vblk" / "data" / "systemd").iterdir())
    assert shipped == sorted(install.UNITS)
    assert [p.name for p in (REPO / "systemd").iterdir()] == ["README.md"]
    readme = (REPO / "systemd" / "README.md").read_text()
    assert "vblk/data/systemd/" in readme
    for name in install.UNITS:
        assert f"`{name}`" in readme, name
    host = install.shipped("systemd", "vblk-host.service")
    for line in ("Type=notify", "RestartPreventExitStatus=2", "KillMode=mixed",
                 "RuntimeDirectory=vblk", "ReadWritePaths=-/var/lib/vblk", "ProtectHome=yes",
                 "ExecStart=/usr/local/bin/vblk serve --config /etc/vblk/host.toml"):
        assert re.search(rf"^{re.escape(line)}$", host, re.M), line


RUNNER = r'''
import json, os, subprocess, sys, time, traceback
from vblk.testing.frontend import BlkClient

def sh(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=90)

def show(unit, *props):
    out = sh("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

results = {}
try:
    os.makedirs("/root/private", exist_ok=True)
    open("/root/private/secret", "w").close()
    results["socket_start"] = sh("systemctl", "start", "vblk@disk.socket").returncode
    with BlkClient.connect("/run/vblk/disk.sock", timeout=60) as c:
        results["read"] = c.read(8, 4096).data == (1).to_bytes(4, "little") * 1024
        results["write"] = c.write(16, b"\x07" * 4096).status
        results["unit"] = show("vblk@disk.service", "ActiveState", "SubState", "MainPID",
                               "ExecMainPID")
        pid = results["unit"]["MainPID"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            results["cmdline"] = f.read().split(b"\0")[:4]
        results["cmdline"] = [a.decode() for a in results["cmdline"]]
        view = f"/proc/{pid}/root"
        results["sees_bound"] = [os.path.isdir(view + d) for d in json.loads(sys.argv[1])]
        results["sees_secret"] = os.path.exists(view + "/root/private/secret")
    results["stop"] = sh("systemctl", "stop", "vblk@disk.service").returncode
    results["journal"] = sh("journalctl", "-u", "vblk@disk.service", "-o", "cat").stdout[-3000:]
    # the host-wide unit: every disk of /etc/vblk/host.toml from one vblk (Type=notify: start
    # returns once it serves them all)
    results["host_start"] = sh("systemctl", "start", "vblk-host.service").returncode
    results["host"] = show("vblk-host.service", "ActiveState", "SubState", "MainPID")
    with open(f"/proc/{results['host']['MainPID']}/cmdline", "rb") as f:
        results["host_cmdline"] = [a.decode() for a in f.read().split(b"\0")[:4]]
    for i, name in enumerate(("h1", "h2"), 1):
        with BlkClient.connect(f"/run/vblk/{name}.sock", timeout=60) as c:
            results[f"{name}_read"] = c.read(8, 4096).data == (1).to_bytes(4, "little") * 1024
            results[f"{name}_write"] = c.write(16, bytes([i]) * 4096).status
    results["host_stop"] = sh("systemctl", "stop", "vblk-host.service").returncode
    results["host_journal"] = sh("journalctl", "-u", "vblk-host.service", "-o", "cat").stdout[-3000:]
    # the control: the same unit with the shipped ProtectHome=yes (a drop-in for one instance)
    os.makedirs("/etc/systemd/system/vblk@plain.service.d")
    with open("/etc/systemd/system/vblk@plain.service.d/home.conf", "w") as f:
        f.write("[Service]\nProtectHome=yes\nBindReadOnlyPaths=\n")
    sh("systemctl", "daemon-reload")
    results["plain_start"] = sh("systemctl", "start", "vblk@plain.service").returncode
    results["plain"] = show("vblk@plain.service", "Result", "ExecMainStatus")
except Exception:
    results["error"] = traceback.format_exc()
with open("/srv/out/result.json", "w") as f:
    json.dump(results, f, indent=1)
'''


def test_generated_units_run_this_install_under_systemd(tmp_path):
    """The units ``vblk install systemd`` wrote, for this install wherever it lives (here: a
    venv over a pyenv interpreter under /root), started by systemd 252 as PID 1 of a
    container: socket activation, a read and a write, and the sandbox's view of /root; then
    vblk-host.service serving the two disks of a host.toml, a read and a write on each."""
    assert NSPAWN, "systemd-nspawn is missing: apt-get install systemd-container"
    units, _, bound = generated_units(tmp_path)
    d = {name: tmp_path / name for name in ("conf", "state", "out")}
    for p in d.values():
        p.mkdir()
    make_image(d["state"] / "disk.img")
    for name in ("disk", "plain"):
        (d["conf"] / f"{name}.conf").write_text("VBLK_DISK=/var/lib/vblk/disk.img\n"
                                                "VBLK_ARGS=--workers 1\n")
    for name in ("h1", "h2"):
        make_image(d["state"] / f"{name}.img")
    (d["conf"] / "host.toml").write_text(
        'workers = 1\n[[disk]]\nspec = "/var/lib/vblk/h1.img"\nsocket-path = "/run/vblk/h1.sock"\n'
        'cache = "writeback"\n[[disk]]\nspec = "/var/lib/vblk/h2.img"\n'
        'socket-path = "/run/vblk/h2.sock"\nnum-queues = 2\n')
    (d["out"] / "runner.py").write_text(RUNNER)
    python = os.path.realpath(sys.executable)
    (units / "vblk-test.target").write_text("[Unit]\nWants=vblk-test-runner.service\n")
    (units / "vblk-test-runner.service").write_text(
        "[Unit]\nAfter=systemd-journald.service\n"
        "SuccessAction=poweroff-force\nFailureAction=poweroff-force\n"
        f"[Service]\nType=oneshot\nTimeoutStartSec=200\n"
        f"ExecStart={sys.executable} /srv/out/runner.py '{json.dumps(bound)}'\n")
    needed = install.runtime_dirs(install.vblk_command()) + [os.path.dirname(python)]
    binds = [f"--bind-ro={p}" for p in install._outermost(needed) if not p.startswith("/usr/")]
    machine = f"vblk-i{os.getpid()}"
    cmd = [NSPAWN, "--quiet", "--directory=/", "--volatile=yes", "--register=no", "--keep-unit",
           "--console=pipe", f"--machine={machine}", f"--bind={units}:/etc/systemd/system",
           f"--bind-ro={d['conf']}:/etc/vblk", f"--bind={d['state']}:/var/lib/vblk",
           f"--bind={d['out']}:/srv/out", *binds,
           "--boot", "--", "systemd.unit=vblk-test.target", "systemd.firstboot=off"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                              stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{machine}", ignore_errors=True)
    result = d["out"] / "result.json"
    assert result.exists(), (done.returncode, done.stdout[-5000:])
    res = json.loads(result.read_text())
    assert "error" not in res, res["error"]
    assert res["socket_start"] == 0 and res["read"] is True and res["write"] == 0, res
    assert (res["unit"]["ActiveState"], res["unit"]["SubState"]) == ("active", "running"), res
    command = install.vblk_command()
    # the daemon vblk serve became, started from the ExecStart= written for this install
    assert res["cmdline"][1:4] == ["-I", "-m", "vblk.daemon"], res["cmdline"]
    assert res["sees_bound"] == [True] * len(bound) and res["sees_secret"] is False, res
    assert res["stop"] == 0 and "event=serving" in res["journal"], res["journal"]
    if bound:      # ProtectHome=yes, as shipped, hides what this install needs: it cannot start
        assert res["plain_start"] != 0 and res["plain"]["Result"] == "exit-code", res
        assert res["plain"]["ExecMainStatus"] not in ("0", "2"), res      # not vblk's refusal
    else:
        assert res["plain_start"] == 0, res
    assert command[0] in (units / "vblk@.service").read_text()
    with open(d["state"] / "disk.img", "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\x07" * 4096
    # vblk-host.service, as written for this install, served both disks of host.toml
    assert res["host_start"] == 0 and (res["host"]["ActiveState"], res["host"]["SubState"]) == \
        ("active", "running"), res
    assert res["host_cmdline"][1:4] == ["-I", "-m", "vblk.daemon"], res["host_cmdline"]
    for i, name in enumerate(("h1", "h2"), 1):
        assert (res[f"{name}_read"], res[f"{name}_write"]) == (True, 0), res
        with open(d["state"] / f"{name}.img", "rb") as f:
            f.seek(16 * 512)
            assert f.read(4096) == bytes([i]) * 4096, name
        assert f"disk={name} event=frontend_connected" in res["host_journal"], res["host_journal"]
    assert res["host_stop"] == 0, res["host_journal"]
