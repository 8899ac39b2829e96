"""vblk serving a real Linux guest (Debian's kernel under QEMU, vhost-user-blk-pci).

Each test boots the guest once or twice (~2-4 s a boot under TCG); the scenario checks
inside the guest and prints KEY=VALUE lines, and the test checks them and the image file
from the host.  Option forms are mixed on purpose: some tests give ACRN option strings
(``disk.img,range=...``), others the equivalent flags (``--ro``).
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from vblk.lab.guest import (
    GEOMETRY_SCRIPT,
    UNMOUNT_AND_FSCK_SCRIPT,
    assert_geometry,
    debugfs_cat,
    default_pbs,
    files_script,
    host_fsck,
    make_image,
    sha256_file,
    sync_calls,
)

pytestmark = pytest.mark.guest

MiB = 1 << 20

FILE_SIZES = (0, 1, 4095, 4096, MiB + 3)
BIG = 64 * MiB


# --------------------------------------------------------------------------
# (a)+(b) default geometry; ext4 with files from 0 bytes to 64 MiB


FILES_SCRIPT = files_script(FILE_SIZES, BIG // MiB)


@pytest.mark.parametrize("cache", ["", ",nocache"], ids=["default", "nocache"])
def test_default_geometry_and_ext4_files(tmp_path, serve_vblk, boot, cache):
    """nocache: O_DIRECT, where reads and writes go through the disk's io_uring
    (vblk.supervisor.ringio) and a buffer O_DIRECT refuses through a worker."""
    image = make_image(tmp_path / "disk.img", 256 * MiB)
    sock = serve_vblk(f"{image}{cache}")
    res = boot(sock, FILES_SCRIPT).check()
    assert_geometry(res, size_bytes=256 * MiB, lbs=512, pbs=default_pbs(image))
    v = res.values
    for n in FILE_SIZES + (BIG,):
        assert v[f"LEN_f{n}"] == str(n), res.describe()
    assert v["FSCK"] == "0", res.describe()
    assert v["REREAD"] == "0", res.describe()
    # from the host: a clean ext4 with the guest's bytes in it
    sock.stop()
    fsck = host_fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for n in (1, 4095, MiB + 3, BIG):
        data = debugfs_cat(image, f"/f{n}")
        assert len(data) == n
        assert hashlib.sha256(data).hexdigest() == v[f"SHA_f{n}"], f"f{n} differs on the host"


# --------------------------------------------------------------------------
# (a) 4096-byte sectors, given as flags


def test_sectorsize_4096(tmp_path, serve_vblk, boot):
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_vblk(image, "--sectorsize", "4096/4096")
    block = 12345  # a 4096-byte LBA in the half mkfs leaves alone
    res = boot(sock, GEOMETRY_SCRIPT + r"""
printf 'VBLK4K-BLOCK-@BLOCK@' | dd of=/dev/vda bs=4096 seek=@BLOCK@ conv=sync,notrunc 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo BACK=$(dd if=/dev/vda bs=4096 skip=@BLOCK@ count=1 2>/dev/null | head -c 18)
mkfs.ext4 -q -F -b 4096 /dev/vda 32M
mount -t ext4 /dev/vda /mnt
head -c 1048579 /dev/urandom > /mnt/data
echo SHA=$(sha256sum /mnt/data | cut -d' ' -f1)
""".replace("@BLOCK@", str(block)) + UNMOUNT_AND_FSCK_SCRIPT).check()
    assert_geometry(res, size_bytes=64 * MiB, lbs=4096, pbs=4096)
    v = res.values
    assert v["BACK"] == f"VBLK4K-BLOCK-{block}", res.describe()
    assert v["FSCK"] == "0", res.describe()
    sock.stop()
    # the guest's 4096-byte LBA lands at LBA x 4096 in the image
    with open(image, "rb") as f:
        f.seek(block * 4096)
        got = f.read(4096)
    assert got == f"VBLK4K-BLOCK-{block}".encode().ljust(4096, b"\0")
    assert host_fsck(image).returncode == 0
    assert hashlib.sha256(debugfs_cat(image, "/data")).hexdigest() == v["SHA"]


# --------------------------------------------------------------------------
# (a)+(c) read-only: the guest sees ro, its writes fail, the image is unchanged


def _ext4_image(path: Path, size: int, files: dict[str, bytes]) -> Path:
    src = path.parent / (path.name + ".d")
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    make_image(path, size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(src), str(path)], check=True)
    return path


RO_SCRIPT = GEOMETRY_SCRIPT + r"""
rc=0; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=notrunc 2>/dev/null || rc=$?
echo DD_RAW=$rc
rc=0; blockdev --setrw /dev/vda 2>/dev/null || rc=$?
echo SETRW=$rc
rc=0; dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=100 oflag=direct 2>/dev/null || rc=$?
echo DD_AFTER_SETRW=$rc
blockdev --setro /dev/vda 2>/dev/null || true
rc=0; mount -t ext4 -o rw /dev/vda /mnt 2>/dev/null || rc=$?
echo MOUNT_RW=$rc
if [ $rc = 0 ]; then
    echo MOUNT_OPTS=$(grep ' /mnt ' /proc/mounts | cut -d' ' -f4 | cut -d, -f1)
    umount /mnt
fi
mount -t ext4 -o ro /dev/vda /mnt
echo HELLO=$(cat /mnt/hello.txt)
rc=0; touch /mnt/new 2>/dev/null || rc=$?
echo TOUCH=$rc
umount /mnt
"""


def test_readonly(tmp_path, serve_vblk, boot):
    image = _ext4_image(tmp_path / "disk.img", 32 * MiB, {"hello.txt": b"read me\n"})
    before = sha256_file(image)
    sock = serve_vblk(image, "--ro")
    res = boot(sock, RO_SCRIPT).check()
    assert_geometry(res, size_bytes=32 * MiB, pbs=default_pbs(image), ro=True)
    v = res.values
    assert v["DD_RAW"] != "0", res.describe()
    assert v["DD_AFTER_SETRW"] != "0", res.describe()
    # busybox mount falls back to a read-only mount on a write-protected disk
    assert v["MOUNT_RW"] != "0" or v.get("MOUNT_OPTS") == "ro", res.describe()
    assert v["HELLO"] == "read me"
    assert v["TOUCH"] != "0"
    sock.stop()
    assert sha256_file(image) == before, "a read-only disk's image changed"


# --------------------------------------------------------------------------
# (a)+(d) range: the guest sees only the window, and nothing outside it changes


def _pattern(size: int) -> bytes:
    # every 512-byte sector names itself, so a misplaced write is easy to see
    return b"".join((b"SECTOR%010d|" % i).ljust(512, b"#") for i in range(size // 512))


RANGE_SCRIPT = GEOMETRY_SCRIPT + r"""
n=$(blockdev --getsize64 /dev/vda)
head -c 16 /dev/vda > /tmp/first
echo FIRST=$(cat /tmp/first)
dd if=/dev/vda bs=512 skip=$(( n / 512 - 1 )) count=1 2>/dev/null | head -c 16 > /tmp/last
echo LAST=$(cat /tmp/last)
rc=0; dd if=/dev/urandom of=/dev/vda bs=1M count=$(( n / 1048576 )) 2>/dev/null || rc=$?
echo FILL=$rc
rc=0; dd if=/dev/zero of=/dev/vda bs=512 seek=$(( n / 512 )) count=1 2>/dev/null || rc=$?
echo BEYOND=$rc
sync
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
head -c 300000 /dev/urandom > /mnt/data
echo SHA=$(sha256sum /mnt/data | cut -d' ' -f1)
umount /mnt
"""


def test_range_window(tmp_path, serve_vblk, boot):
    size = 64 * MiB
    start_lba, count = 2048, 65536  # 512-byte logical sectors: bytes [1 MiB, 33 MiB)
    lo, hi = start_lba * 512, (start_lba + count) * 512
    image = tmp_path / "disk.img"
    pattern = _pattern(size)
    image.write_bytes(pattern)
    sock = serve_vblk(f"{image},range={start_lba}/{count}")
    res = boot(sock, RANGE_SCRIPT).check()
    assert_geometry(res, size_bytes=count * 512, pbs=default_pbs(image))
    v = res.values
    # the guest's first and last sectors are the window's
    assert v["FIRST"] == f"SECTOR{start_lba:010d}", res.describe()
    assert v["LAST"] == f"SECTOR{start_lba + count - 1:010d}", res.describe()
    assert v["FILL"] == "0"
    assert v["BEYOND"] != "0"
    sock.stop()
    data = image.read_bytes()
    assert len(data) == size, "the image changed size"
    assert data[:lo] == pattern[:lo], "bytes before the window changed"
    assert data[hi:] == pattern[hi:], "bytes after the window changed"
    assert data[lo:hi] != pattern[lo:hi], "the window was not written"
    assert data[lo + 1024 + 56: lo + 1024 + 58] == b"\x53\xef", "no ext4 superblock in the window"
    fsck = host_fsck(image, offset=lo, size=hi - lo)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# --------------------------------------------------------------------------
# (e) write cache: FLUSH requests reach the backend as fdatasync/fsync


def _phase_counts(res, trace: Path, phases: list[str]) -> dict[str, int]:
    """fsync/fdatasync calls per guest phase.

    The guest prints PHASE=<name> just before each phase and PHASE=end after the last,
    and sleeps 0.5 s at the end of each phase, once its I/O (and the backend's syncs for
    it) completed; a call belongs to the phase whose marker line arrived on the host
    before it, with each boundary moved 0.25 s back into that quiet gap.
    """
    marks = []
    for name in phases + ["end"]:
        t = res.wall_time(f"PHASE={name}", exact=True)
        assert t is not None, f"no PHASE={name} line\n" + res.describe()
        marks.append(t)
    calls = sync_calls(trace)
    counts = {}
    for i, name in enumerate(phases):
        start, end = marks[i] - 0.25, marks[i + 1] - 0.25
        counts[name] = sum(1 for t in calls if start <= t < end)
    return counts


WRITEBACK_SCRIPT = GEOMETRY_SCRIPT + r"""
echo PHASE=direct
dd if=/dev/urandom of=/dev/vda bs=64k count=16 oflag=direct 2>/dev/null
sleep 0.5
echo PHASE=fsync
dd if=/dev/urandom of=/dev/vda bs=4k count=4 seek=1000 conv=fsync 2>/dev/null
sleep 0.5
echo PHASE=ext4sync
mkfs.ext4 -q -F -E nodiscard /dev/vda
mount -t ext4 /dev/vda /mnt
head -c 200000 /dev/urandom > /mnt/data
sync
sleep 0.5
echo PHASE=end
umount /mnt
"""


def test_writeback_flushes_reach_backend(tmp_path, serve_vblk, boot):
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_vblk(image, "--cache", "writeback", strace=True)
    res = boot(sock, WRITEBACK_SCRIPT).check()
    assert_geometry(res, size_bytes=64 * MiB, pbs=default_pbs(image), writeback=True)
    sock.stop()
    counts = _phase_counts(res, sock.strace_path, ["direct", "fsync", "ext4sync"])
    detail = f"fsync/fdatasync per phase: {counts}\n" + res.describe(20)
    print(f"fsync/fdatasync calls per guest phase: {counts}")
    # writeback: plain writes are not synced; the guest's flushes are
    assert counts["direct"] == 0, detail
    assert counts["fsync"] >= 1, detail
    assert counts["ext4sync"] >= 1, detail


WRITETHRU_SWITCH_SCRIPT = GEOMETRY_SCRIPT + r"""
echo PHASE=writethru
dd if=/dev/urandom of=/dev/vda bs=64k count=16 oflag=direct 2>/dev/null
sleep 0.5
echo "write back" > /sys/block/vda/cache_type
echo SWITCHED=$(cat /sys/block/vda/queue/write_cache | tr ' ' _)
echo PHASE=direct
dd if=/dev/urandom of=/dev/vda bs=64k count=16 seek=32 oflag=direct 2>/dev/null
sleep 0.5
echo PHASE=fsync
dd if=/dev/urandom of=/dev/vda bs=4k count=4 seek=1000 conv=fsync 2>/dev/null
sleep 0.5
echo PHASE=end
"""


def test_writethru_then_guest_switches_to_writeback(tmp_path, serve_vblk, boot, monkeypatch):
    """Counted from the server's fdatasync/fsync calls: with the write ring off, since its
    fdatasyncs run on the kernel's io-wq threads, which strace cannot follow (the ring's
    group commit: tests/unit/test_ring_io.py, tests/integration/test_reliability.py)."""
    monkeypatch.setenv("VBLK_URING", "0")
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_vblk(image, strace=True)
    res = boot(sock, WRITETHRU_SWITCH_SCRIPT).check()
    assert_geometry(res, size_bytes=64 * MiB, pbs=default_pbs(image), writeback=False)
    assert res.values["SWITCHED"] == "write_back", res.describe()
    sock.stop()
    counts = _phase_counts(res, sock.strace_path, ["writethru", "direct", "fsync"])
    detail = f"fsync/fdatasync per phase: {counts}\n" + res.describe(20)
    print(f"fsync/fdatasync calls per guest phase: {counts}")
    assert counts["writethru"] >= 1, "writethru writes must be synced\n" + detail
    assert counts["direct"] == 0, "after the switch to writeback plain writes are not synced\n" \
        + detail
    assert counts["fsync"] >= 1, "the guest's flush must reach the backend\n" + detail


# --------------------------------------------------------------------------
# (f) two boots against one server process, with the combined ACRN option string


def test_two_boots_one_server(tmp_path, serve_vblk, boot):
    image = make_image(tmp_path / "disk.img", 256 * MiB)
    # 4096-byte sectors: range=256/32768 is bytes [1 MiB, 129 MiB)
    lo, size = 256 * 4096, 32768 * 4096
    sock = serve_vblk(f"{image},writeback,sectorsize=4096/4096,range=256/32768")
    first = boot(sock, GEOMETRY_SCRIPT + r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
head -c 777777 /dev/urandom > /mnt/carry
echo SHA=$(sha256sum /mnt/carry | cut -d' ' -f1)
umount /mnt
""").check()
    assert_geometry(first, size_bytes=size, lbs=4096, pbs=4096, writeback=True)
    assert sock.proc.poll() is None, "vblk serve exited after the first guest left\n" + sock.log()
    second = boot(sock, r"""
mount -t ext4 /dev/vda /mnt
echo SHA=$(sha256sum /mnt/carry | cut -d' ' -f1)
umount /mnt
rc=0; e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || rc=$?
echo FSCK=$rc
""").check()
    assert second.values["SHA"] == first.values["SHA"]
    assert second.values["FSCK"] == "0", second.describe()
    assert sock.proc.poll() is None
    sock.stop()
    with open(image, "rb") as f:
        assert f.read(lo) == bytes(lo), "bytes before the window changed"
        f.seek(lo + 1024 + 56)
        assert f.read(2) == b"\x53\xef", "no ext4 superblock at the window's start"
    fsck = host_fsck(image, offset=lo, size=size)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


# --------------------------------------------------------------------------
# A guest whose RAM QEMU splits in two: q35 puts 2 GiB below the 4 GiB hole and the rest
# above it, so the memory table has two regions and the driver's buffers (page cache and
# user memory come from the zone above 4 GiB first) and rings lie in both.


def test_guest_memory_in_two_regions(tmp_path, serve_vblk, boot):
    image = make_image(tmp_path / "disk.img", 128 * MiB)
    sock = serve_vblk(image, "--log-level", "info")
    res = boot(sock, r"""
echo MEMTOTAL_KB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)
dd if=/dev/urandom of=/tmp/data bs=1M count=48 2>/dev/null
echo SHA=$(sha256sum /tmp/data | cut -d' ' -f1)
dd if=/tmp/data of=/dev/vda bs=64k oflag=direct 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M seek=64 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
echo DIRECT_SHA=$(dd if=/dev/vda bs=128k count=384 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
echo CACHED_SHA=$(dd if=/dev/vda bs=1M skip=64 count=48 2>/dev/null | sha256sum | cut -d' ' -f1)
""", memory="3G").check()
    v = res.values
    assert int(v["MEMTOTAL_KB"]) > 2 * 1024 * 1024, res.describe()
    assert v["DIRECT_SHA"] == v["SHA"], res.describe()
    assert v["CACHED_SHA"] == v["SHA"], res.describe()
    sock.stop()
    assert "event=memory_table regions=2" in sock.log(), sock.log()[-3000:]
    with open(image, "rb") as f:
        first = hashlib.sha256(f.read(48 * MiB)).hexdigest()
        f.seek(64 * MiB)
        second = hashlib.sha256(f.read(48 * MiB)).hexdigest()
    assert first == second == v["SHA"]
