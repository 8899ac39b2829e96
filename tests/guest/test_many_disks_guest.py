"""Two real guests on two disks of one vblk (``vblk serve --config``), booted at the same time.

One host.toml, two images: disk 1 writeback with two queues (its guest has two vCPUs, so both
rings carry requests), disk 2 writethrough with one. Two QEMUs start together, each makes an
ext4 on its disk, writes files of random bytes, syncs, runs e2fsck -fn and re-reads every
file from the disk (``files_script``). The test checks that the two guests' I/O really ran at
the same time (their I/O windows, read off the serial consoles, overlap), then, from the host,
that each image is a clean ext4 holding exactly its own guest's files with the sums that
guest printed: the file names differ between the guests (they are the sizes), so a request
served on the wrong disk shows up as a file in the wrong image or a sum that differs.

Both QEMUs start at once (``boot.start``); each guest, booted, waits for the host's word,
which comes when both wait, so their I/O starts together (they boot ~1 s apart here).
"""
from __future__ import annotations

import hashlib
import subprocess
import time
from pathlib import Path

import pytest

from vblk.control import fetch_stats
from vblk.lab.guest import (
    LISTEN_FOR_HOST_SCRIPT,
    assert_geometry,
    debugfs_cat,
    default_pbs,
    files_script,
    host_fsck,
    make_image,
)

pytestmark = pytest.mark.guest

MiB = 1 << 20
SIZE = 64 * MiB
# Each guest writes one file per size, named f<size>, and one of BIG_MIB MiB: the two guests
# have no name in common, so each image's directory says whose files it holds.
SIZES = {1: (0, 1, 4095, MiB + 3), 2: (2, 4097, 3 * MiB + 5)}
BIG_MIB = {1: 16, 2: 12}


def root_names(image: Path) -> set[str]:
    """What the root directory of an ext4 image holds (debugfs), but for mkfs's lost+found."""
    r = subprocess.run(["debugfs", "-R", "ls -p /", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # ls -p: /inode/mode/uid/gid/name/size/ per entry
    fields = [line.strip().split("/") for line in r.stdout.splitlines() if line.startswith("/")]
    return {f[5] for f in fields if len(f) > 6} - {".", "..", "lost+found"}


# Each guest, once booted, says so and waits for the host's word (LISTEN_FOR_HOST_SCRIPT); the
# host gives it to both once both wait, so their I/O starts together however far apart they
# booted.
WAITING = "WAITING-FOR-HOST"
START_TOGETHER = LISTEN_FOR_HOST_SCRIPT + f"""
echo {WAITING}
while [ ! -e /tmp/host-said ]; do sleep 0.1; done
"""


def window(res) -> tuple[float, float]:
    """When the guest's I/O ran (host wall clock): its first line after the host's word (the
    geometry, then mkfs) to its last line (the re-read)."""
    start, end = res.wall_time("SIZE="), res.wall_time("REREAD_OK=")
    assert start is not None and end is not None, res.describe()
    return start, end


def test_two_guests_on_two_disks_of_one_vblk_at_once(tmp_path, serve_vblk_config, boot):
    images = {n: make_image(tmp_path / f"disk{n}.img", SIZE) for n in (1, 2)}
    socks = serve_vblk_config([
        {"name": "one", "spec": str(images[1]), "cache": "writeback", "num-queues": 2},
        {"name": "two", "spec": str(images[2]), "cache": "writethrough"},
    ], workers=2)
    socks = dict(zip((1, 2), socks))
    guest_kw = {1: {"num_queues": 2, "smp": 2}, 2: {}}
    began, began_wall = time.monotonic(), time.time()
    guests = {n: boot.start(socks[n], START_TOGETHER + files_script(SIZES[n], BIG_MIB[n]),
                            **guest_kw[n]) for n in (1, 2)}              # both QEMUs run now
    try:
        for n, guest in guests.items():
            assert guest.wait_for(WAITING, 180), boot.wait(guest, socks[n], timeout=1).describe()
        for guest in guests.values():
            guest.send("go\n")
        results = {n: boot.wait(guest, socks[n]).check() for n, guest in guests.items()}
    finally:
        for guest in guests.values():
            guest.kill()
    print(f"two guests at once: {time.monotonic() - began:.1f} s")

    # each guest saw its own disk as its table describes it
    for n, writeback in ((1, True), (2, False)):
        assert_geometry(results[n], size_bytes=SIZE, pbs=default_pbs(images[n]),
                        writeback=writeback)
    # they ran at the same time: the I/O windows (geometry and mkfs to the last re-read) overlap
    (s1, e1), (s2, e2) = window(results[1]), window(results[2])
    overlap = min(e1, e2) - max(s1, s2)
    when = (f"scenarios: guest 1 {s1 - began_wall:.1f}..{e1 - began_wall:.1f} s, guest 2 "
            f"{s2 - began_wall:.1f}..{e2 - began_wall:.1f} s: overlapping {overlap:.1f} s")
    print(when)
    assert overlap > 0, "the guests ran one after the other: " + when
    # in each guest: files written, e2fsck -fn clean, every sum read back from the disk
    for n, res in results.items():
        v = res.values
        names = [f"f{size}" for size in SIZES[n]] + [f"f{BIG_MIB[n] * MiB}"]
        for name in names:
            assert v[f"LEN_{name}"] == name[1:], res.describe()
        assert (v["FSCK"], v["REREAD"], v["REREAD_OK"]) == ("0", "0", str(len(names))), \
            res.describe()
    # vblk served both rings of disk 1 and the one of disk 2, each through its own stats
    queues = {n: fetch_stats(socks[n] + ".ctl")["queues"] for n in (1, 2)}
    writes = {n: [q["types"]["write"]["requests"] for q in qs] for n, qs in queues.items()}
    assert len(writes[1]) == 2 and len(writes[2]) == 1 and all(writes[1] + writes[2]), writes
    assert socks[1].proc.poll() is None, "vblk serve --config exited\n" + socks[1].log()
    socks[1].stop()

    # from the host: two clean ext4s, each with its own guest's files and bytes, nothing else
    for n, image in images.items():
        fsck = host_fsck(image)
        assert fsck.returncode == 0, f"disk {n}: " + fsck.stdout + fsck.stderr
        v = results[n].values
        names = {f"f{size}" for size in SIZES[n]} | {f"f{BIG_MIB[n] * MiB}"}
        assert root_names(image) == names, f"disk {n} holds {root_names(image)}"
        for name in names:
            data = debugfs_cat(image, f"/{name}")
            assert hashlib.sha256(data).hexdigest() == v[f"SHA_{name}"], f"disk {n}: {name}"
