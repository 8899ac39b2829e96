"""vblk serving a Ceph RBD image to a real Linux guest (Debian's kernel under QEMU).

The cluster is the session's throwaway memstore cluster (``ceph_cluster``, tests/conftest.py):
every object lives in the OSD's RAM, so the images are small and the guests write little.
What the guest did is checked twice: inside the guest (checksums, ``e2fsck -fn``), and on the
host from the cluster itself (``rbd export``, ``rbd diff``/``rbd du``, ``rbd info``), never
through vblk.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vblk.control import default_control_path, fetch_stats
from vblk.lab.guest import (
    GEOMETRY_SCRIPT,
    LISTEN_FOR_HOST_SCRIPT,
    UNMOUNT_AND_FSCK_SCRIPT,
    VERIFY_FILES_SCRIPT,
    assert_geometry,
    debugfs_cat,
    files_script,
    host_fsck,
    start_guest,
)
from vblk.testing.cli import run_vblk
from vblk.testing.restart import RestartingVblk

pytestmark = pytest.mark.guest

MiB = 1 << 20
RBD_PBS = 4096                      # vblk's physical block size for an RBD image (no st_blksize)


def spec(cluster, name: str, extra: str = "") -> str:
    return f"rbd:rbd/{name}:conf={cluster.conf}{extra}"


def requests(sock) -> dict[str, int]:
    """vblk's request counts by type, with its IOERR / UNSUPP counts (control socket)."""
    q = fetch_stats(default_control_path(str(sock)))["queues"][0]
    out = {k: v["requests"] for k, v in q["types"].items()}
    out.update(ioerr=q["ioerr"], unsupp=q["unsupp"])
    return out


def exported_fsck(cluster, name: str, path: Path) -> subprocess.CompletedProcess:
    """``rbd export`` the image to ``path`` and ``e2fsck -fn`` the copy."""
    cluster.export(name, path)
    return host_fsck(path)


def allocation(cluster, name: str) -> tuple[int, int]:
    """(bytes in ``rbd diff``'s extents, ``rbd du``'s used bytes): what the cluster holds for
    the image. ``rbd diff`` lists the extents each object holds (byte-exact enough: 1 MiB
    written into an empty 4 MiB object shows as 1 MiB). ``rbd du`` needs no ceph-mgr (it reads
    the image's object map, a default feature), but counts every object that exists as a
    whole 4 MiB: honest, at that granularity."""
    extents = json.loads(cluster.rbd("diff", "--format", "json", f"rbd/{name}"))
    diff = sum(e["length"] for e in extents if e["exists"] in ("true", True))
    du = json.loads(cluster.rbd("du", "--format", "json", f"rbd/{name}"))["images"][0]
    return diff, du["used_size"]


# --------------------------------------------------------------------------
# 1. ext4 on an RBD image, write-through and write-back

FILE_SIZES = (0, 1, 4095, 4096, MiB + 3, 8 * MiB)

FILES_SCRIPT = files_script(FILE_SIZES)


@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
def test_ext4_on_an_rbd_image(ceph_cluster, rbd_image, serve_vblk, boot, tmp_path, mode):
    name = rbd_image(64 * MiB)
    sock = serve_vblk(spec(ceph_cluster, name), *(["--cache", "writeback"] if mode == "writeback" else []))
    res = boot(sock, FILES_SCRIPT).check()
    assert_geometry(res, size_bytes=64 * MiB, pbs=RBD_PBS, writeback=mode == "writeback")
    v = res.values
    for n in FILE_SIZES:
        assert v[f"LEN_f{n}"] == str(n), res.describe()
    assert v["FSCK"] == "0", res.describe()
    assert v["REREAD"] == "0" and v["REREAD_OK"] == str(len(FILE_SIZES)), res.describe()
    seen = requests(sock)
    assert seen["ioerr"] == 0 and seen["unsupp"] == 0, seen
    if mode == "writeback":
        assert seen["flush"] >= 1, seen          # the guest's syncs arrive as FLUSH
    # From the cluster, with vblk still serving (it holds nothing back: librbd's cache is off).
    exported = tmp_path / "export.img"
    fsck = exported_fsck(ceph_cluster, name, exported)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for n in FILE_SIZES:
        data = debugfs_cat(exported, f"/f{n}")
        assert len(data) == n
        assert hashlib.sha256(data).hexdigest() == v[f"SHA_f{n}"], f"f{n} differs in the export"
    print(f"{mode}: guest ran {res.seconds:.1f} s (boot {res.boot_seconds:.1f} s); "
          f"{len(FILE_SIZES)} files, {sum(FILE_SIZES)} bytes; fsck clean in the guest and on "
          f"the export; requests {seen}")


# --------------------------------------------------------------------------
# 2. a snapshot, read-only

SNAP_SCRIPT = GEOMETRY_SCRIPT + r"""
echo DEV_SHA=$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
rc=0; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=notrunc 2>/dev/null || rc=$?
echo DD_RAW=$rc
rc=0; blockdev --setrw /dev/vda 2>/dev/null || rc=$?
echo SETRW=$rc
rc=0; dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=100 oflag=direct 2>/dev/null || rc=$?
echo DD_AFTER_SETRW=$rc
blockdev --setro /dev/vda 2>/dev/null || true
mount -t ext4 -o ro /dev/vda /mnt
echo HELLO=$(cat /mnt/hello.txt)
echo DATA_SHA=$(sha256sum /mnt/data | cut -d' ' -f1)
rc=0; touch /mnt/new 2>/dev/null || rc=$?
echo TOUCH=$rc
umount /mnt
"""


def ext4_image(path: Path, size: int, files: dict[str, bytes]) -> Path:
    src = path.parent / (path.name + ".d")
    src.mkdir()
    for fname, data in files.items():
        (src / fname).write_bytes(data)
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(path)], check=True)
    return path


def test_a_snapshot_served_read_only(ceph_cluster, rbd_image, serve_vblk, boot, tmp_path):
    size = 32 * MiB
    data = random.Random(2).randbytes(MiB + 5)
    local = ext4_image(tmp_path / "fs.img", size, {"hello.txt": b"from the snapshot\n",
                                                    "data": data})
    name = rbd_image(size)
    ceph_cluster.remove_image(name)              # rbd_image registered it for removal
    ceph_cluster.import_image(name, local)
    ceph_cluster.rbd("snap", "create", f"rbd/{name}@frozen")
    try:
        # the head moves on after the snapshot: the guest must see the snapshot, not the head
        ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "4K", "--io-total", "256K",
                         "--io-pattern", "rand", f"rbd/{name}")
        want = hashlib.sha256(ceph_cluster.export(f"{name}@frozen")).hexdigest()
        head = hashlib.sha256(ceph_cluster.export(name)).hexdigest()
        assert head != want
        sock = serve_vblk(spec(ceph_cluster, f"{name}@frozen", ",ro"))
        res = boot(sock, SNAP_SCRIPT).check()
        assert_geometry(res, size_bytes=size, pbs=RBD_PBS, ro=True)
        v = res.values
        assert v["DEV_SHA"] == want, res.describe()
        assert v["DD_RAW"] != "0" and v["DD_AFTER_SETRW"] != "0", res.describe()
        assert v["TOUCH"] != "0", res.describe()
        assert v["HELLO"] == "from the snapshot"
        assert v["DATA_SHA"] == hashlib.sha256(data).hexdigest()
        seen = requests(sock)
        sock.stop()
        after = hashlib.sha256(ceph_cluster.export(f"{name}@frozen")).hexdigest()
        assert after == want, "the snapshot changed"
        assert seen["write"] == 0 or seen["ioerr"] >= seen["write"], seen
        print(f"snapshot of {size} bytes: guest's sha256 of /dev/vda = rbd export's "
              f"({want[:16]}...); guest writes refused (dd {v['DD_RAW']}, after setrw "
              f"{v['DD_AFTER_SETRW']}, touch {v['TOUCH']}); requests {seen}")
    finally:
        ceph_cluster.rbd("snap", "purge", f"rbd/{name}")


# --------------------------------------------------------------------------
# 3. fstrim gives the space back to the cluster

FILL_AND_DELETE = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/big bs=1M count=@MB@ 2>/dev/null
echo keep > /mnt/keep.txt
sync
rm /mnt/big
sync
umount /mnt
"""

TRIM = r"""
mount -t ext4 /dev/vda /mnt
/sbin/fstrim -v /mnt
echo KEEP=$(cat /mnt/keep.txt)
""" + UNMOUNT_AND_FSCK_SCRIPT


def test_fstrim_frees_space_in_the_cluster(ceph_cluster, rbd_image, serve_vblk, boot, tmp_path):
    big = 32 * MiB
    name = rbd_image(96 * MiB)
    sock = serve_vblk(spec(ceph_cluster, name, ",discard"))
    boot(sock, FILL_AND_DELETE.replace("@MB@", str(big // MiB))).check()
    before = requests(sock)
    diff1, du1 = allocation(ceph_cluster, name)
    assert diff1 >= big, (diff1, du1)            # the deleted file's blocks are still there
    res = boot(sock, TRIM).check()
    assert "trimmed" in res.output, res.describe()
    assert res.values["KEEP"] == "keep" and res.values["FSCK"] == "0", res.describe()
    diff2, du2 = allocation(ceph_cluster, name)
    seen = {k: n - before.get(k, 0) for k, n in requests(sock).items()}
    print(f"{big // MiB} MiB written and deleted: rbd diff {diff1 / MiB:.1f} -> "
          f"{diff2 / MiB:.1f} MiB, rbd du {du1 / MiB:.0f} -> {du2 / MiB:.0f} MiB; fstrim sent "
          f"{seen['discard']} discards ({seen})")
    assert seen["discard"] >= 1 and seen["ioerr"] == 0 and seen["unsupp"] == 0, seen
    # rbd diff: the deleted file's extents are gone (mkfs's and the kept file's remain)
    assert diff1 - diff2 >= big - 2 * MiB, (diff1, diff2)
    # rbd du counts whole 4 MiB objects: one that keeps any ext4 metadata (a backup superblock
    # at the start of every odd block group, the journal, ...) stays; the ones fstrim emptied
    # whole are removed
    assert du2 < du1, (du1, du2)
    sock.stop()
    fsck = exported_fsck(ceph_cluster, name, tmp_path / "export.img")
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# --------------------------------------------------------------------------
# 4. rbd resize + vblk resize: the guest sees the new size without a reboot

RESIZE_SCRIPT = r"""
size() { cat /sys/block/vda/size; }
nap() { sleep 0.1 2>/dev/null || sleep 1; }
S0=$(size); echo SIZE0=$S0
echo VBLK-RESIZE-WANT=grow
t=0
while [ "$(size)" = "$S0" ] && [ $t -lt 600 ]; do nap; t=$((t + 1)); done
S1=$(size); echo SIZE1=$S1
# the new last 4 KiB: written, read back past the page cache
LAST=$((S1 / 8 - 1))
printf 'VBLK-RBD-TAIL' | dd of=/dev/vda bs=4096 seek=$LAST conv=sync,notrunc oflag=direct 2>/dev/null
echo TAIL=$(dd if=/dev/vda bs=4096 skip=$LAST count=1 iflag=direct 2>/dev/null | head -c 13)
N=$(dd if=/dev/vda bs=4096 skip=$((S1 / 8)) count=1 2>/dev/null | wc -c)
echo PAST_END_BYTES=$N
"""


def test_guest_sees_rbd_resize_without_reboot(ceph_cluster, rbd_image, serve_vblk, boot):
    old, new = 64 * MiB, 96 * MiB
    name = rbd_image(old)
    sock = serve_vblk(spec(ceph_cluster, name))
    done: dict[str, object] = {}

    def on_line(line: str) -> None:
        if line.strip() == "VBLK-RESIZE-WANT=grow":
            done["early"] = run_vblk("resize", str(new), "--socket-path", sock)  # not bigger yet
            ceph_cluster.rbd("resize", "--size", f"{new}B", f"rbd/{name}")
            done["at"] = time.time()
            done["resize"] = run_vblk("resize", str(new), "--socket-path", sock)

    res = boot(sock, RESIZE_SCRIPT, on_line=on_line).check()
    v = res.values
    early, r = done["early"], done["resize"]
    assert early.returncode == 2 and "never grows" in early.stderr, (early.stdout, early.stderr)
    assert r.returncode == 0 and "the frontend was notified" in r.stdout, (r.stdout, r.stderr)
    assert v["SIZE0"] == str(old // 512), res.describe()
    assert v["SIZE1"] == str(new // 512), res.describe()
    assert v["TAIL"] == "VBLK-RBD-TAIL", res.describe()
    assert v["PAST_END_BYTES"] == "0", res.describe()
    seen_after = res.wall_time("SIZE1=") - done["at"]
    assert ceph_cluster.image_info(name)["size"] == new
    tail = ceph_cluster.export(name)[new - 4096:]
    assert tail == b"VBLK-RBD-TAIL".ljust(4096, b"\0")
    assert "event=resized" in sock.log()
    print(f"{old // MiB} -> {new // MiB} MiB: the guest saw the new size {seen_after:.2f} s "
          f"after rbd resize + vblk resize ({r.stdout.strip()}); its write to the new last "
          f"4 KiB is in rbd export at {new - 4096}")


# --------------------------------------------------------------------------
# 5. vblk killed and restarted under the guest's ext4 workload (QEMU reconnect=1)

WORKLOAD = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /root/sums
cs() { cut -d' ' -f1 /proc/uptime | tr -d .; }     # centiseconds since boot
echo MOUNTED=1
""" + LISTEN_FOR_HOST_SCRIPT + r"""
i=0; worst=0
while [ ! -e /tmp/host-said ]; do                 # until the host has made its kills
    t0=$(cs)
    i=$((i + 1))
    n=$((i % 32))
    dd if=/dev/urandom of=/mnt/f$n bs=64k count=$((1 + i % 8)) 2>/tmp/dd.err || { cat /tmp/dd.err; exit 1; }
    sha256sum /mnt/f$n > /root/sums/f$n
    if [ $((i % 4)) = 0 ]; then sync; fi
    d=$(( $(cs) - t0 )); [ $d -gt $worst ] && worst=$d
done
echo WRITES=$i
echo WORST_ITER_CS=$worst
echo FILES=$(ls /root/sums | wc -l)
cat /root/sums/* > /root/all.sums
for f in /root/sums/*; do echo "SUM_$(basename $f)=$(cut -d' ' -f1 $f)"; done
sync
""" + VERIFY_FILES_SCRIPT


def test_backend_kills_during_ext4_workload_on_rbd(ceph_cluster, rbd_image, guest_image,
                                                   tmp_path):
    kills_wanted = int(os.environ.get("VBLK_RBD_GUEST_KILLS", 5))
    name = rbd_image(128 * MiB)
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-rg-", dir="/tmp"), "vblk.sock")
    # Before each kill the cluster is frozen (SIGSTOP) for a moment, so that the guest's
    # requests are in flight in librbd when vblk dies. freeze/thaw only signal the daemons:
    # safe from the killer thread (starting daemons is what must stay on the main thread).
    vblk = RestartingVblk(spec(ceph_cluster, name), sock, tmp_path,
                          freezer=(ceph_cluster.freeze, ceph_cluster.thaw))
    restarts: list[dict[str, float]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    rnd = random.Random(21)

    def kill_and_time() -> None:
        freeze = rnd.uniform(0.05, 0.3)
        t0 = time.monotonic()
        vblk.kill_and_restart(freeze=freeze)         # returns once the new vblk listens
        killed = t0 + freeze                          # SIGKILL right after the freeze
        listening = time.monotonic()
        while not vblk.serving():                     # QEMU redialled and started the queue
            assert time.monotonic() - listening < 30, "QEMU did not come back to the new vblk"
            time.sleep(0.01)
        restarts.append({"listening": listening - killed, "serving": time.monotonic() - killed})

    def killer():
        try:
            while len(restarts) < kills_wanted and not stop.is_set():
                if not vblk.serving():
                    time.sleep(0.02)
                elif not stop.wait(rnd.uniform(0.3, 0.8)):   # let I/O get going, then kill
                    kill_and_time()
        except BaseException as exc:                  # reported by the main thread
            failures.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    guest = start_guest(sock, WORKLOAD, image=guest_image, reconnect=1,
                        log_path=tmp_path / "guest.serial")
    try:
        # the workload runs until the kills are made
        res = guest.run_beside(thread, stop, 600, alive=lambda: not failures)
        assert not failures, f"{failures!r}\n{vblk.logs()[-4000:]}"
        assert res.exit_status == 0, res.describe() + vblk.logs()[-4000:]
    finally:
        stop.set()
        guest.kill()
        vblk.stop()
    v = res.values
    logs = vblk.logs()
    takeovers = logs.count("event=rbd_lock_taken_over")
    resubmitted = vblk.resubmitted()
    listen = [round(r["listening"], 2) for r in restarts]
    serve = [round(r["serving"], 2) for r in restarts]
    print(f"{len(restarts)} kills, {v.get('WRITES')} file writes, {takeovers} lock take-overs, "
          f"{resubmitted} requests re-run; seconds from SIGKILL to the new vblk listening "
          f"{listen} and to serving QEMU again {serve} (QEMU redials every 1 s); the guest's "
          f"slowest write + checksum iteration {int(v.get('WORST_ITER_CS', 0)) / 100:.2f} s")
    assert len(restarts) == kills_wanted, restarts
    assert takeovers == kills_wanted, logs[-4000:]    # each restart broke the dead one's lock
    assert resubmitted > 0, "no kill caught a request in flight: the test proves nothing"
    # never the watch timeout (10 s in this cluster, 30 s by default): not for vblk, and not
    # for the guest, whose slowest write + checksum iteration spans a restart
    assert max(serve) < 8, serve
    assert int(v["WORST_ITER_CS"]) < 1000, v["WORST_ITER_CS"]
    assert v["FSCK"] == "0", res.describe()
    assert v["CHECK"] == "0" and v["CHECKED"] == v["FILES"], res.describe()
    # the host: a clean ext4 in rbd export, every file with the checksum the guest took
    exported = tmp_path / "export.img"
    fsck = exported_fsck(ceph_cluster, name, exported)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sums = {k[len("SUM_"):]: sha for k, sha in v.items() if k.startswith("SUM_")}
    assert len(sums) == int(v["FILES"]), res.describe()
    for fname, sha in sums.items():
        assert hashlib.sha256(debugfs_cat(exported, f"/{fname}")).hexdigest() == sha, fname
