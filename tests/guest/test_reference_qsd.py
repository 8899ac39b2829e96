"""The test guest itself, checked against QEMU's own backend (qemu-storage-daemon).

If this fails, the guest or the runner is broken, not vblk.
"""
from __future__ import annotations

import hashlib

import pytest

from vblk.lab.guest import (
    GEOMETRY_SCRIPT,
    UNMOUNT_AND_FSCK_SCRIPT,
    debugfs_cat,
    host_fsck,
    make_image,
)

pytestmark = pytest.mark.guest

MiB = 1 << 20

SCRIPT = GEOMETRY_SCRIPT + r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
head -c 1048579 /dev/urandom > /mnt/data
echo hello > /mnt/hello.txt
echo SHA_DATA=$(sha256sum /mnt/data | cut -d' ' -f1)
sync
""" + UNMOUNT_AND_FSCK_SCRIPT + r"""echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 -o ro /dev/vda /mnt
echo SHA_AGAIN=$(sha256sum /mnt/data | cut -d' ' -f1)
umount /mnt
"""


def test_guest_mkfs_mount_against_qsd(tmp_path, serve_qsd, boot):
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_qsd(image)
    res = boot(sock, SCRIPT).check()
    v = res.values
    assert v["SIZE"] == str(64 * MiB // 512), res.describe()
    assert v["BYTES"] == str(64 * MiB)
    assert v["LBS"] == "512"
    assert v["RO"] == "0"
    assert v["FSCK"] == "0", res.describe()
    assert v["SHA_DATA"] == v["SHA_AGAIN"]
    # from the host: the image is a clean ext4 holding what the guest wrote
    sock.stop()
    fsck = host_fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert hashlib.sha256(debugfs_cat(image, "/data")).hexdigest() == v["SHA_DATA"]
    assert debugfs_cat(image, "/hello.txt") == b"hello\n"
    assert res.boot_seconds is not None and res.boot_seconds < 60


def test_guest_sees_readonly_qsd_export(tmp_path, serve_qsd, boot):
    """The ro checks used against vblk, validated on a read-only qsd export."""
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    sock = serve_qsd(image, readonly=True)
    res = boot(sock, GEOMETRY_SCRIPT + r"""
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 2>/dev/null; then echo DD=ok; else echo DD=fail; fi
""").check()
    assert res.values["RO"] == "1"
    assert res.values["DD"] == "fail"
