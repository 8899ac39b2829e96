"""vblk serving a Ceph RBD image to a real Linux guest (Debian's kernel under QEMU).

The cluster is the session's throwaway memstore cluster (``ceph_cluster``, tests/conftest.py):
every object lives in the OSD's RAM, so the images are small and the guests write little.
What the guest did is checked twice: inside the guest (checksums, ``e2fsck -fn``), and on the
host from the cluster itself (``rbd export``), never
through vblk.
"""
from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from vblk.control import default_control_path, fetch_stats
from vblk.lab.guest import GEOMETRY_SCRIPT, assert_geometry, debugfs_cat, host_fsck

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


# --------------------------------------------------------------------------
# 1. ext4 on an RBD image, write-through and write-back

FILE_SIZES = (0, 1, 4095, 4096, MiB + 3, 8 * MiB)

FILES_SCRIPT = GEOMETRY_SCRIPT + r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
for n in @SIZES@; do head -c $n /dev/urandom > /mnt/f$n; done
cd /mnt
for f in f*; do
    echo "SHA_$f=$(sha256sum $f | cut -d' ' -f1)"
    echo "LEN_$f=$(stat -c %s $f)"
done
sha256sum f* > /tmp/sums
cd /
sync
umount /mnt
rc=0; e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || rc=$?
echo FSCK=$rc
[ $rc = 0 ] || cat /tmp/fsck.log
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
cd /mnt
rc=0; sha256sum -c /tmp/sums > /tmp/check.log 2>&1 || rc=$?
echo REREAD=$rc
echo REREAD_OK=$(grep -c ': OK$' /tmp/check.log)
[ $rc = 0 ] || cat /tmp/check.log
cd /
umount /mnt
""".replace("@SIZES@", " ".join(map(str, FILE_SIZES)))


@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
def test_ext4_on_an_rbd_image(ceph_cluster, rbd_image, serve_vblk, boot, tmp_path, mode):
    name = rbd_image(64 * MiB)
    sock = serve_vblk(spec(ceph_cluster, name), *(["--writeback"] if mode == "writeback" else []))
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
