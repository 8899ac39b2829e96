"""``vblk demo``: serve a fresh sparse image to a real Linux guest and show what it saw.

The demo creates a 1 GiB sparse image, starts ``vblk serve`` on it as a subprocess,
boots the test guest (see ``vblk.lab.guest``) against it, and in the guest makes
ext4, mounts it, writes a file, reads it back after dropping caches, and reports the
disk's size, block sizes and cache mode, the mkfs time, a df line and whether the
checksum matched.  It prints a short report and returns 0 on success.

``run_rbd_demo`` (``vblk demo --rbd``) does the same on a 1 GiB Ceph RBD image in a throwaway
single-node cluster (``vblk.testing.ceph``, memstore) that it starts first and kills after.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from vblk.errors import EXIT_FAILED, EXIT_OK, ConfigError
from vblk.interpreter import python_command
from vblk.lab.guest import (
    GuestBuildError,
    GuestImage,
    GuestResult,
    build_guest,
    default_accel,
    start_guest,
)
from vblk.lab.progress import Steps
from vblk.testing.processes import stop_group
from vblk.units import GiB, format_size

DEMO_FILE_MIB = 8
RBD_DEMO_IMAGE = "vblk-demo"

DEMO_SCRIPT = r"""
up() { cut -d' ' -f1 /proc/uptime; }
echo SIZE=$(blockdev --getsize64 /dev/vda)
echo LBS=$(cat /sys/block/vda/queue/logical_block_size)
echo PBS=$(cat /sys/block/vda/queue/physical_block_size)
echo RO=$(cat /sys/block/vda/ro)
echo CACHE=$(cat /sys/block/vda/queue/write_cache)
t0=$(up)
mkfs.ext4 -q -F /dev/vda
t1=$(up)
echo MKFS_SECONDS=$(awk "BEGIN { printf \"%.2f\", $t1 - $t0 }")
mount -t ext4 /dev/vda /mnt
echo MOUNTED=$(up)
dd if=/dev/urandom of=/mnt/demo.bin bs=1M count=@MIB@ 2>/dev/null
echo WROTE=$(sha256sum /mnt/demo.bin | cut -d' ' -f1)
sync
echo 3 > /proc/sys/vm/drop_caches
echo READ=$(sha256sum /mnt/demo.bin | cut -d' ' -f1)
echo DF=$(df -h /mnt | tail -n 1)
umount /mnt
rc=0; e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || rc=$?
echo FSCK=$rc
""".replace("@MIB@", str(DEMO_FILE_MIB))


def _wait_for_socket(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> str | None:
    """None once the socket accepts a connection, else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"vblk serve exited with status {proc.returncode}"
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return None
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    return f"vblk serve did not listen on {path} within {timeout:.0f} s"


def run_demo(image: Path | None = None, keep: bool = False, *,
             out: TextIO | None = None, timeout: float = 300,
             server_argv: Callable[[Path, str], list[str]] | None = None) -> int:
    """Run the demo; returns 0 on success, 1 on failure (with the evidence printed).
    ConfigError, before anything is created, if ``image`` exists.

    ``image``: where to create the 1 GiB sparse image (must not exist yet; default: a
    temporary directory).  ``keep``: keep the temporary directory (image, server and
    guest logs) instead of deleting it.  ``server_argv(image, socket)`` replaces the
    server command (for trying the demo against another backend).
    """
    if image is not None and os.path.lexists(image):
        raise ConfigError(f"--image {image} already exists; the demo formats its image, so "
                          f"give a new path")
    say = _printer(out)
    work = Path(tempfile.mkdtemp(prefix="vblk-demo-", dir="/tmp"))
    image = Path(image) if image is not None else work / "demo.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(GiB)
    ok = False
    try:
        say("vblk demo")
        say(f"  image      {image} ({format_size(GiB)} sparse)")
        cmd = (server_argv(image, str(work / "vblk.sock")) if server_argv else None)
        ok = _serve_and_boot(str(image), work, say, Steps(out or sys.stdout), timeout=timeout,
                             server_cmd=cmd)
        return EXIT_OK if ok else EXIT_FAILED
    finally:
        if keep or not ok:
            say(f"  kept       {work} (server and guest logs"
                f"{', image' if image.parent == work else ''})")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run_rbd_demo(keep: bool = False, *, out: TextIO | None = None, timeout: float = 300) -> int:
    """The demo on a Ceph RBD image: start a throwaway cluster (``vblk.testing.ceph``: one
    monitor, one memstore OSD, in a temporary directory), create a 1 GiB image in pool
    ``rbd``, serve it with ``vblk serve rbd:...`` and boot the guest on it as ``run_demo``
    does. Afterwards the cluster is killed and its directory removed; with ``keep`` it is
    left running (its image is in the OSD's RAM) with the commands to look and to take it
    down. ConfigError, before anything starts, if Ceph is not installed."""
    from vblk.testing.ceph import INSTALL_HINT, CephCluster, CephError, missing_binaries
    missing = missing_binaries()
    if missing:
        raise ConfigError(f"the RBD demo needs Ceph, which is not installed (missing "
                          f"{', '.join(missing)}); install it: {INSTALL_HINT}")
    say = _printer(out)
    work = Path(tempfile.mkdtemp(prefix="vblk-demo-rbd-", dir="/tmp"))
    cluster, ok = None, False
    try:
        say("vblk demo on Ceph RBD")
        try:
            cluster = CephCluster.start(work / "ceph", tie_to_parent=not keep)
            cluster.create_image(RBD_DEMO_IMAGE, GiB)
        except CephError as exc:
            say(f"  FAILED     the throwaway Ceph cluster: {exc}")
            return EXIT_FAILED
        say(f"  cluster    1 monitor, 1 OSD (memstore) in {cluster.directory}, up in "
            f"{cluster.startup_seconds:.1f} s")
        token = f"rbd:rbd/{RBD_DEMO_IMAGE}:conf={cluster.conf}"
        say(f"  image      {token} ({format_size(GiB)}, thin)")
        ok = _serve_and_boot(token, work, say, Steps(out or sys.stdout), timeout=timeout)
        return EXIT_OK if ok else EXIT_FAILED
    finally:
        if cluster is not None and keep:
            say(f"  kept       the cluster, running: export CEPH_CONF={cluster.conf}; "
                f"rbd info rbd/{RBD_DEMO_IMAGE}; take it down with "
                f"python -m vblk.testing.ceph down {cluster.directory}")
        elif cluster is not None:
            cluster.kill_all(keep=not ok)
        if keep or not ok:
            say(f"  kept       {work} (server and guest logs, the cluster's directory)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _printer(out: TextIO | None) -> Callable[[str], None]:
    out = out or sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)
    return say


def _serve_and_boot(disk: str, work: Path, say: Callable[[str], None], steps: Steps, *,
                    timeout: float, server_cmd: list[str] | None = None) -> bool:
    """Serve ``disk`` (vblk's positional: a path or an rbd: token; or ``server_cmd``), boot
    the guest on it, run DEMO_SCRIPT and report; True if everything checked out. The server
    is stopped before returning."""
    sock = str(work / "vblk.sock")
    server_log = work / "serve.log"
    cmd = server_cmd or python_command("vblk.cli", "serve", disk, "--socket-path", sock)
    with open(server_log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        why = _wait_for_socket(sock, proc)
        if why:
            say(f"  FAILED     {why}")
            say(_tail(server_log))
            return False
        say(f"  server     {'vblk serve' if not server_cmd else Path(cmd[0]).name} "
            f"(pid {proc.pid}) on {sock}")
        guest = _build(steps)
        if guest is None:
            return False
        res = _boot(steps, sock, guest, work / "guest.log", timeout)
        if res.exit_status != 0 or "READ" not in res.values:
            say("  FAILED     the guest scenario did not finish")
            say(res.describe(40))
            say("--- vblk serve log ---")
            say(_tail(server_log))
            return False
        return _report(res, say)
    finally:
        stop_group(proc)


# What the guest's console says, in order, and what the demo makes of it while it boots.
MILESTONES = (
    ("VBLK-GUEST-INIT", "init runs; waiting for /dev/vda"),
    ("VBLK-GUEST-DISK", "/dev/vda is there (vblk's disk); reading its geometry"),
    ("CACHE=", "mkfs.ext4 /dev/vda"),
    ("MKFS_SECONDS=", "mounting"),
    ("MOUNTED=", f"writing a {DEMO_FILE_MIB} MiB file"),
    ("WROTE=", "dropping the page cache, reading it back"),
    ("READ=", "e2fsck"),
)


def _build(steps: Steps) -> GuestImage | None:
    """The test guest, built (a first run downloads a kernel package) or from the cache."""
    with steps.step("guest", "building the test guest (the first run downloads a kernel "
                             "package)") as step:
        try:
            guest = build_guest(progress=step.note)
        except GuestBuildError as e:
            step.done(f"FAILED: cannot build the test guest: {e}")
            return None
        built = step.elapsed()
        step.done(f"Linux {guest.kernel_version} under QEMU ({default_accel()})"
                  + (f", guest built in {built:.0f} s" if built > 1 else ""))
    return guest


def _boot(steps: Steps, sock: str, guest: GuestImage, log_path: Path,
          timeout: float) -> GuestResult:
    """Boot the guest on ``sock`` and run DEMO_SCRIPT, saying how far it got."""
    with steps.step("boot", f"starting QEMU ({default_accel()}) on vblk's socket") as step:
        def on_line(line: str) -> None:
            for prefix, what in MILESTONES:
                if line.strip().startswith(prefix):
                    step.note(what)
        res = start_guest(sock, DEMO_SCRIPT, image=guest, log_path=log_path,
                          on_line=on_line).wait(timeout)
        step.done(f"booted, ran the scenario and powered off in {res.seconds:.1f} s"
                  if not res.timed_out else f"timed out after {timeout:.0f} s")
    return res


def _report(res: GuestResult, say: Callable[[str], None]) -> bool:
    """What the guest saw, said; True if the disk, the file and the filesystem are right."""
    v = res.values
    size = int(v.get("SIZE", "0"))
    say(f"  disk       /dev/vda {format_size(size)} ({size} bytes), logical {v.get('LBS')} B, "
        f"physical {v.get('PBS')} B, {v.get('CACHE')}, "
        f"{'read-only' if v.get('RO') == '1' else 'read-write'}")
    say(f"  mkfs.ext4  {v.get('MKFS_SECONDS')} s")
    mounted = res.line_time("MOUNTED=")
    boot = res.boot_seconds
    if mounted is not None:
        say(f"  mounted    {mounted:.1f} s after QEMU started (boot {boot:.1f} s, "
            f"guest uptime {v.get('MOUNTED')} s)")
    say(f"  df         {v.get('DF')}")
    match = v.get("WROTE") == v.get("READ") and bool(v.get("WROTE"))
    say(f"  file       {DEMO_FILE_MIB} MiB written, synced, read back: "
        f"checksum {'ok' if match else 'MISMATCH'}")
    fsck_ok = v.get("FSCK") == "0"
    say(f"  e2fsck     {'clean' if fsck_ok else 'status ' + str(v.get('FSCK'))}")
    ok = match and fsck_ok and size == GiB
    if size != GiB:
        say(f"  FAILED     the guest saw {size} bytes, not {GiB}")
    say(f"  result     {'OK' if ok else 'FAILED'}")
    return ok


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


if __name__ == "__main__":
    if "--rbd" in sys.argv[1:]:
        sys.exit(run_rbd_demo(keep="--keep" in sys.argv[1:]))
    sys.exit(run_demo(keep="--keep" in sys.argv[1:]))
