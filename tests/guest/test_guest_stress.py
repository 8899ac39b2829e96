"""Real guests in parallel under faults: each case boots the test guest (Debian's kernel under
QEMU, TCG, ``reconnect=1``) on its own vblk and image, runs a checksummed ext4 workload, and
meanwhile injects faults at random: a worker SIGKILLed (the pool starts another and re-runs
its slots) or vblk SIGKILLed with its workers frozen, so requests are in flight, and started
again (QEMU redials and hands over the inflight region). At the end the guest checks its
file system and every file's checksum from the disk, and the host checks the image.

CI runs a short version (``VBLK_GUEST_STRESS_CASES`` cases of ``VBLK_GUEST_STRESS_SECONDS``
each) as part of the suite. The stress run::

    VBLK_GUEST_STRESS_CASES=4 VBLK_GUEST_STRESS_SECONDS=120 \\
        python3 -m pytest -m stress -n 4 -s tests/guest/test_guest_stress.py
"""
from __future__ import annotations

import os
import random
import re
import signal
import tempfile
import threading
import time

import pytest

from vblk.lab.guest import VERIFY_FILES_SCRIPT, host_fsck, make_image
from vblk.testing.restart import RestartingVblk

pytestmark = [pytest.mark.guest, pytest.mark.stress]

MiB = 1 << 20
CASES = int(os.environ.get("VBLK_GUEST_STRESS_CASES", 2))
SECONDS = int(os.environ.get("VBLK_GUEST_STRESS_SECONDS", 15))

# Two writers rewrite files of 64 KiB..1 MiB (write-back: each with fsync, i.e. FLUSHes) and
# keep each one's sha256 until the time is up; then e2fsck and every checksum from the disk.
WORKLOAD = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /root/sums
echo MOUNTED=1
end=$(( $(cut -d. -f1 /proc/uptime) + @SECONDS@ ))
writer() {
    i=0
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        i=$((i + 1))
        f=w$1-$((i % 32))
        dd if=/dev/urandom of=/mnt/$f bs=64k count=$((1 + i % 16)) conv=fsync 2>/tmp/dd$1.err \
            || { cat /tmp/dd$1.err; echo WRITER_FAILED=$1; return 1; }
        sha256sum /mnt/$f > /root/sums/$f
    done
    echo WRITES_$1=$i
}
writer 1 & p1=$!
writer 2 & p2=$!
rc=0; wait $p1 || rc=1; wait $p2 || rc=1
echo WRITERS_RC=$rc
echo FILES=$(ls /root/sums | wc -l)
cat /root/sums/* > /root/all.sums
sync
""" + VERIFY_FILES_SCRIPT + r"""
dmesg | grep -ciE 'i/o error|blk_update_request|ext4-fs (error|warning)' > /tmp/n || true
echo KERNEL_IO_ERRORS=$(cat /tmp/n)
"""


def kill_a_worker(vblk: RestartingVblk, rnd: random.Random) -> bool:
    """Stop one of the running vblk's worker processes for a moment (so requests pile up on
    it), then SIGKILL it; False if vblk has no worker right now."""
    pid = vblk.proc.pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            workers = [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return False
    if not workers:
        return False
    victim = rnd.choice(workers)
    try:
        os.kill(victim, signal.SIGSTOP)
        time.sleep(rnd.uniform(0.05, 0.3))
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("case", range(CASES))
def test_a_guest_writing_files_through_random_worker_and_backend_kills(case, tmp_path, boot):
    rnd = random.Random(1500 + case)
    image = make_image(tmp_path / "disk.img", 256 * MiB)
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-gs-", dir="/tmp"), "vblk.sock")
    vblk = RestartingVblk(image, sock, tmp_path, "--workers", "3", "--cache", "writeback")
    faults = {"worker_kill": 0, "backend_kill": 0}
    stop = threading.Event()

    def injector() -> None:
        while not stop.is_set():
            if not vblk.serving():
                time.sleep(0.05)
                continue
            if stop.wait(rnd.uniform(0.3, 1.2)):
                return
            if rnd.random() < 0.6:
                faults["worker_kill"] += kill_a_worker(vblk, rnd)
            else:
                vblk.kill_and_restart(freeze=rnd.uniform(0.05, 0.3))
                faults["backend_kill"] += 1

    thread = threading.Thread(target=injector, daemon=True)
    try:
        thread.start()
        res = boot(sock, WORKLOAD.replace("@SECONDS@", str(SECONDS)), reconnect=1,
                   timeout=SECONDS + 240)
        stop.set()
        thread.join()
    finally:
        stop.set()
        vblk.stop()
    v = res.values
    assert res.exit_status == 0, res.describe() + vblk.logs()[-4000:]
    assert v.get("WRITERS_RC") == "0" and v.get("KERNEL_IO_ERRORS") == "0", res.describe()
    assert v.get("FSCK") == "0", res.describe()
    assert v.get("CHECK") == "0" and v.get("CHECKED") == v.get("FILES"), res.describe()
    fsck = host_fsck(image)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    logs = vblk.logs()
    died = logs.count("event=worker_died")
    reissued = sum(int(m) for m in re.findall(r"event=requests_reissued worker=\d+ count=(\d+)",
                                              logs))
    print(f"case {case}: {SECONDS} s, files written {int(v['WRITES_1']) + int(v['WRITES_2'])}, "
          f"checked {v['CHECKED']}/{v['FILES']}, faults {faults}; re-run: {vblk.resubmitted()} "
          f"requests after restarts, {reissued} of {died} dead workers; 0 mismatches")
    assert sum(faults.values()) >= 3, f"only {faults} faults in {SECONDS} s: proves little"
