"""A real guest under an IOPS limit: its direct-I/O dd takes at least the time the limit
implies (less the burst) and moves the right bytes; qemu-storage-daemon's throttle group with
the same limit gives the same result."""
from __future__ import annotations

import hashlib

import pytest

from vblk.lab.guest import make_image

pytestmark = pytest.mark.guest

MiB = 1 << 20
IOPS = 200
BLOCKS = 500                   # per dd: 2.5 s at 200 IOPS
BS = 4096
BURST = IOPS // 10             # vblk's default burst, and QEMU's: 0.1 s of the rate

DD_SCRIPT = r"""
dd if=/dev/urandom of=/tmp/src bs=@BS@ count=@N@ 2>/dev/null
echo T0=$(cut -d' ' -f1 /proc/uptime)
dd if=/tmp/src of=/dev/vda bs=@BS@ count=@N@ oflag=direct 2>/dev/null
echo T1=$(cut -d' ' -f1 /proc/uptime)
dd if=/dev/vda of=/tmp/back bs=@BS@ count=@N@ iflag=direct 2>/dev/null
echo T2=$(cut -d' ' -f1 /proc/uptime)
echo SRC=$(sha256sum /tmp/src | cut -d' ' -f1)
echo BACK=$(sha256sum /tmp/back | cut -d' ' -f1)
""".replace("@BS@", str(BS)).replace("@N@", str(BLOCKS))


def check_limited_dd(res, image) -> tuple[float, float]:
    res.check()
    v = res.values
    write_s = float(v["T1"]) - float(v["T0"])
    read_s = float(v["T2"]) - float(v["T1"])
    # BLOCKS requests at IOPS a second, less what the burst lets through at once (the
    # bucket may be full before each dd; boot I/O may have left it anything from full to empty)
    floor = (BLOCKS - BURST - 1) / IOPS
    assert write_s >= floor, f"{BLOCKS} direct writes took {write_s:.2f} s < {floor:.2f} s"
    assert read_s >= floor, f"{BLOCKS} direct reads took {read_s:.2f} s < {floor:.2f} s"
    assert v["SRC"] == v["BACK"], res.describe()
    with open(image, "rb") as f:
        assert hashlib.sha256(f.read(BLOCKS * BS)).hexdigest() == v["SRC"], "the image differs"
    return write_s, read_s


def test_guest_dd_under_an_iops_limit(tmp_path, serve_vblk, boot):
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_vblk(image, "--iops-limit", str(IOPS))
    res = boot(sock, DD_SCRIPT)
    write_s, read_s = check_limited_dd(res, image)
    # and not far slower than the limit: the guest's requests were really served at ~IOPS
    assert write_s < BLOCKS / IOPS * 3 and read_s < BLOCKS / IOPS * 3, (write_s, read_s)
    print(f"vblk --iops-limit {IOPS}: {BLOCKS} writes in {write_s:.2f} s "
          f"({BLOCKS / write_s:.0f} IOPS), reads in {read_s:.2f} s ({BLOCKS / read_s:.0f} IOPS)")


def test_guest_dd_under_qsd_throttle_group(tmp_path, serve_qsd, boot):
    image = make_image(tmp_path / "disk.img", 64 * MiB)
    sock = serve_qsd(image, throttle=f"x-iops-total={IOPS}")
    write_s, read_s = check_limited_dd(boot(sock, DD_SCRIPT), image)
    print(f"qsd x-iops-total={IOPS}: {BLOCKS} writes in {write_s:.2f} s "
          f"({BLOCKS / write_s:.0f} IOPS), reads in {read_s:.2f} s ({BLOCKS / read_s:.0f} IOPS)")
