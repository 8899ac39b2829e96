"""DISCARD and WRITE_ZEROES from a real Linux guest, against vblk and qemu-storage-daemon.

The guest's tools are util-linux's (called by full path: busybox's shell would otherwise run
its own blkdiscard applet, which has no -z):

* ``blkdiscard -o O -l L``    -> DISCARD
* ``blkdiscard -z -o O -l L`` -> BLKZEROOUT, which Linux sends as WRITE_ZEROES *without* UNMAP
* ``fallocate -p -o O -l L``  -> punch on the block device: WRITE_ZEROES *with* UNMAP
* ``mkfs.ext4`` discards the disk and zeroes its journal with WRITE_ZEROES; ``fstrim``
  sends DISCARD for the free blocks of a mounted ext4.

The host checks the image's bytes and its allocation (st_blocks) between boots. qsd runs with
``discard=unmap``, and the same scenario must give the same result on both.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from vblk.control import default_control_path, fetch_stats
from vblk.lab.guest import host_fsck, make_image

pytestmark = pytest.mark.guest

MiB = 1 << 20
SLACK = 256 * 1024                  # st_blocks may move by a little (filesystem metadata)
ZERO_SHA_16M = "080acf35a507ac9849cfcba47dc2ad83e01b75663a516279c8b9d243b719643e"


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def host_read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def counts(sock) -> dict[str, int]:
    """vblk's per-type request counts (and its error counts) from its control socket."""
    q = fetch_stats(default_control_path(str(sock)))["queues"][0]
    out = {k: v["requests"] for k, v in q["types"].items()}
    out.update(ioerr=q["ioerr"], unsupp=q["unsupp"])
    return out


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


@pytest.fixture(params=["vblk", "qsd"])
def serve_discarding(request):
    """serve(image) -> socket of a backend with discard on (vblk --discard, qsd discard=unmap)."""
    if request.param == "vblk":
        serve = request.getfixturevalue("serve_vblk")
        return "vblk", lambda image: serve(image, "--discard", "--workers", "2")
    serve = request.getfixturevalue("serve_qsd")
    return "qsd", lambda image: serve(image, discard=True)


WRITE_24M = r"""
dd if=/dev/urandom of=/dev/vda bs=1M count=24 conv=fsync 2>/dev/null
sync
echo WROTE=$(dd if=/dev/vda bs=1M count=24 2>/dev/null | sha256sum | cut -d' ' -f1)
"""

DISCARD_AND_ZERO = r"""
for f in discard_max_bytes discard_granularity write_zeroes_max_bytes; do
    echo "Q_$f=$(cat /sys/block/vda/queue/$f)"
done
/sbin/blkdiscard -o 4194304 -l 8388608 /dev/vda          # 4..12 MiB: DISCARD
/sbin/blkdiscard -z -o 12582912 -l 4194304 /dev/vda      # 12..16 MiB: WRITE_ZEROES
/usr/bin/fallocate -p -o 16777216 -l 4194304 /dev/vda    # 16..20 MiB: WRITE_ZEROES + UNMAP
echo 3 > /proc/sys/vm/drop_caches
echo ZEROED=$(dd if=/dev/vda bs=1M skip=4 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
echo ZERO16=$(dd if=/dev/zero bs=1M count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
echo HEAD=$(dd if=/dev/vda bs=1M count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
echo TAIL=$(dd if=/dev/vda bs=1M skip=20 count=4 2>/dev/null | sha256sum | cut -d' ' -f1)
"""


def test_blkdiscard_and_zeroout_free_and_zero_the_image(tmp_path, serve_discarding, boot):
    name, serve = serve_discarding
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve(image)
    assert allocated(image) == 0
    # boot 1: the guest writes 24 MiB; the host sees it allocated
    boot(sock, WRITE_24M).check()
    written = host_read(image, 0, 24 * MiB)
    a1 = allocated(image)
    assert a1 >= 24 * MiB
    before = counts(sock) if name == "vblk" else None
    # boot 2: discard 8 MiB, zero 4 MiB keeping it allocated, zero 4 MiB unmapping it
    res = boot(sock, DISCARD_AND_ZERO).check()
    v = res.values
    assert int(v["Q_discard_max_bytes"]) > 0, res.describe()
    assert v["ZEROED"] == v["ZERO16"] == ZERO_SHA_16M
    a2 = allocated(image)
    print(f"{name}: allocated after the guest wrote 24 MiB {a1}, after discard/zeroes {a2}")
    # 8 MiB discarded + 4 MiB punched by UNMAP; BLKZEROOUT's 4 MiB stay allocated
    assert 12 * MiB - SLACK <= a1 - a2 <= 12 * MiB + SLACK, (name, a1, a2)
    after = host_read(image, 0, 24 * MiB)
    assert after[4 * MiB:20 * MiB] == bytes(16 * MiB)
    assert after[:4 * MiB] == written[:4 * MiB] and after[20 * MiB:] == written[20 * MiB:]
    assert os.stat(image).st_size == 64 * MiB
    if name == "vblk":
        assert v["Q_write_zeroes_max_bytes"] == str(65536 * 512)
        d = delta(counts(sock), before)
        print(f"vblk: requests of boot 2: {d}")
        assert d["discard"] >= 1 and d["write_zeroes"] >= 2, d
        assert d["ioerr"] == d["unsupp"] == 0, d


def test_without_discard_zeroes_still_work_and_nothing_is_deallocated(tmp_path, serve_vblk, boot):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(24 * MiB))
        os.fsync(f.fileno())
    written = host_read(image, 0, 24 * MiB)
    sock = serve_vblk(image, "--workers", "2")
    a1 = allocated(image)
    res = boot(sock, r"""
echo Q_discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)
if /sbin/blkdiscard -o 0 -l 4194304 /dev/vda 2>/dev/null; then echo DISCARD=ok; else echo DISCARD=fail; fi
/sbin/blkdiscard -z -o 4194304 -l 8388608 /dev/vda
/usr/bin/fallocate -p -o 12582912 -l 8388608 /dev/vda
echo 3 > /proc/sys/vm/drop_caches
echo ZEROED=$(dd if=/dev/vda bs=1M skip=4 count=16 2>/dev/null | sha256sum | cut -d' ' -f1)
""").check()
    v = res.values
    assert v["Q_discard_max_bytes"] == "0"          # no DISCARD feature: the guest knows
    assert v["DISCARD"] == "fail"
    assert v["ZEROED"] == ZERO_SHA_16M
    after = host_read(image, 0, 24 * MiB)
    assert after[:4 * MiB] == written[:4 * MiB]
    assert after[4 * MiB:20 * MiB] == bytes(16 * MiB)
    assert after[20 * MiB:] == written[20 * MiB:]
    assert abs(allocated(image) - a1) <= SLACK       # UNMAP is not honoured without discard
    c = counts(sock)
    assert c["write_zeroes"] >= 2 and c["discard"] == 0 and c["ioerr"] == 0


MKFS = r"""
/sbin/mkfs.ext4 -q -F /dev/vda
echo MKFS=ok
"""

FILL_AND_DELETE = r"""
mount -t ext4 /dev/vda /mnt
dd if=/dev/urandom of=/mnt/big bs=1M count=48 2>/dev/null
echo keep > /mnt/keep.txt
sync
rm /mnt/big
sync
umount /mnt
"""

TRIM = r"""
mount -t ext4 /dev/vda /mnt
/sbin/fstrim -v /mnt
umount /mnt
rc=0; e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || rc=$?
echo FSCK=$rc
"""


def test_mkfs_uses_write_zeroes_and_fstrim_frees_deleted_files(tmp_path, serve_discarding, boot):
    name, serve = serve_discarding
    image = make_image(tmp_path / "disk.img", 128 * MiB)
    sock = serve(image)
    # boot 1: mkfs alone, so vblk's counters show what mkfs sent
    before = counts(sock) if name == "vblk" else None
    boot(sock, MKFS).check()
    if name == "vblk":
        d = delta(counts(sock), before)
        print(f"vblk: requests mkfs sent: {d}")
        assert d["write_zeroes"] >= 1, d            # the journal is zeroed with WRITE_ZEROES
        assert d["discard"] >= 1, d                 # mke2fs discards the disk first
        assert d["ioerr"] == d["unsupp"] == 0, d
    # boot 2: a 48 MiB file written and deleted (ext4 without -o discard keeps the blocks)
    boot(sock, FILL_AND_DELETE).check()
    a1 = allocated(image)
    assert a1 >= 48 * MiB
    # boot 3: fstrim gives the free blocks back
    res = boot(sock, TRIM).check()
    assert res.values["FSCK"] == "0", res.describe()
    assert "bytes" in res.output and "trimmed" in res.output, res.describe()
    a2 = allocated(image)
    print(f"{name}: allocated after rm {a1}, after fstrim {a2}")
    assert a1 - a2 >= 44 * MiB, (name, a1, a2)
    sock.stop()
    fsck = host_fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
