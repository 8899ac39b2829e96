"""vblk killed and restarted (as systemd would) under a real guest's file-system workload.

QEMU redials (``reconnect=1``) and hands the new vblk the inflight region the dead one kept
(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD); the new vblk runs again what was in flight. The guest
must not notice: its writes all land, e2fsck finds the file system clean and every file it
wrote reads back with the checksum it had.
"""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from vblk.lab.guest import (
    LISTEN_FOR_HOST_SCRIPT,
    VERIFY_FILES_SCRIPT,
    host_fsck,
    make_image,
    start_guest,
)
from vblk.testing.restart import RestartingVblk

pytestmark = pytest.mark.guest
MiB = 1 << 20

WORKLOAD = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /root/sums
echo MOUNTED=1
""" + LISTEN_FOR_HOST_SCRIPT + r"""
i=0
while [ ! -e /tmp/host-said ]; do                 # until the host has made its kills
    i=$((i + 1))
    n=$((i % 64))
    dd if=/dev/urandom of=/mnt/f$n bs=64k count=$((1 + i % 16)) 2>/tmp/dd.err || { cat /tmp/dd.err; exit 1; }
    sha256sum /mnt/f$n > /root/sums/f$n
    if [ $((i % 4)) = 0 ]; then sync; fi
done
echo WRITES=$i
echo FILES=$(ls /root/sums | wc -l)
cat /root/sums/* > /root/all.sums
sync
""" + VERIFY_FILES_SCRIPT


def test_twenty_backend_kills_during_a_file_system_workload(tmp_path, guest_image):
    kills_wanted = int(os.environ.get("VBLK_RESTART_KILLS", 20))
    image = make_image(tmp_path / "disk.img", 256 * MiB)
    sock = tempfile_sock()
    vblk = RestartingVblk(image, sock, tmp_path, "--workers", "4")
    kills = []
    stop = threading.Event()
    rnd = random.Random(20)

    def killer():
        while len(kills) < kills_wanted and not stop.is_set():
            if not vblk.serving():
                time.sleep(0.05)
                continue
            if stop.wait(rnd.uniform(0.2, 0.6)):       # let I/O get going, then pull the plug
                return
            vblk.kill_and_restart(freeze=rnd.uniform(0.05, 0.4))
            kills.append(time.monotonic())

    thread = threading.Thread(target=killer, daemon=True)
    guest = start_guest(sock, WORKLOAD, image=guest_image, reconnect=1,
                        log_path=tmp_path / "guest.serial")
    try:
        res = guest.run_beside(thread, stop, 900)         # the workload runs until the kills are made
        assert res.exit_status == 0, res.describe() + vblk.logs()[-4000:]
    finally:
        stop.set()
        guest.kill()
        vblk.stop()
    v = res.values
    resubmitted = vblk.resubmitted()
    assert resubmitted > 0, "no kill caught a request in flight: the test proves nothing"
    print(f"{len(kills)} kills, {v.get('WRITES')} file writes, {resubmitted} requests re-run after restarts")
    assert len(kills) == kills_wanted
    assert v["FSCK"] == "0", res.describe()
    assert v["CHECK"] == "0" and v["CHECKED"] == v["FILES"], res.describe()
    fsck = host_fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def tempfile_sock() -> str:
    import tempfile
    return os.path.join(tempfile.mkdtemp(prefix="vblk-r-", dir="/tmp"), "vblk.sock")
