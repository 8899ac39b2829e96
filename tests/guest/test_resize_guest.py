"""Live resize seen by a real Linux guest: the host runs ``vblk resize`` (grow, then shrink)
while the guest watches /sys/block/vda/size, without a reboot. The same scenario against
qemu-storage-daemon 7.2's ``block_resize`` shows what the reference does (it tells no one).

The guest prints ``VBLK-RESIZE-WANT=<step>`` and polls its disk size with a deadline; the
host acts on that line (``run_guest(on_line=...)``)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vblk.lab.guest import make_image
from vblk.testing.qmp import Qmp

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
TAIL_TAG = b"VBLKTAIL"

SCRIPT = r"""
size() { cat /sys/block/vda/size; }
nap() { sleep 0.1 2>/dev/null || sleep 1; }
wait_change() {   # wait until the size differs from $1, at most $2 seconds
    t=0
    while [ "$(size)" = "$1" ] && [ $t -lt $(($2 * 10)) ]; do nap; t=$((t + 1)); done
}
S0=$(size); echo SIZE0=$S0
echo VBLK-RESIZE-WANT=grow
wait_change $S0 @WAIT@
S1=$(size); echo SIZE1=$S1
echo TAIL1=$(dd if=/dev/vda bs=4096 skip=$((S1 / 8 - 1)) count=1 2>/dev/null | head -c 8)
echo VBLK-RESIZE-WANT=shrink
wait_change $S1 @WAIT@
S2=$(size); echo SIZE2=$S2
N=$(dd if=/dev/vda bs=4096 skip=$((S2 / 8)) count=1 2>/dev/null | wc -c)
echo PAST_END_BYTES=$N
"""


def script(wait_seconds: int) -> str:
    return SCRIPT.replace("@WAIT@", str(wait_seconds))


def tagged_image(path: Path, size: int, tag_at: int) -> Path:
    make_image(path, size)
    with open(path, "r+b") as f:
        f.seek(tag_at)
        f.write(TAIL_TAG)
    return path


def vblk_resize(sock: str, size: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vblk.cli", "resize", size, "--socket-path", sock], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)


def acting_on(steps: dict) -> tuple[callable, list]:
    """An on_line hook running steps[name]() when the guest asks for step ``name``."""
    done = []

    def on_line(line: str) -> None:
        line = line.strip()
        if line.startswith("VBLK-RESIZE-WANT="):
            name = line.split("=", 1)[1]
            done.append((name, steps[name]()))
    return on_line, done


def test_guest_sees_vblk_resize_grow_then_shrink_without_reboot(tmp_path, serve_vblk, boot):
    image = tagged_image(tmp_path / "disk.img", 64 * MiB, 48 * MiB - 4096)
    sock = serve_vblk(image)
    before = vblk_resize(sock, "32M")                 # no frontend yet: applies, nobody told
    assert before.returncode == 0 and "not notified (no frontend" in before.stdout
    on_line, done = acting_on({"grow": lambda: vblk_resize(sock, "48M"),
                               "shrink": lambda: vblk_resize(sock, "16M")})
    res = boot(sock, script(60), on_line=on_line).check()
    v = res.values
    assert [name for name, _ in done] == ["grow", "shrink"], res.describe()
    for _name, r in done:
        assert r.returncode == 0, r.stderr
        assert "the frontend was notified" in r.stdout, r.stdout
    assert v["SIZE0"] == str(32 * MiB // 512)
    assert v["SIZE1"] == str(48 * MiB // 512), res.describe()
    assert v["TAIL1"] == TAIL_TAG.decode()            # the guest reads the grown tail
    assert v["SIZE2"] == str(16 * MiB // 512), res.describe()
    assert v["PAST_END_BYTES"] == "0"
    assert os.path.getsize(image) == 64 * MiB          # vblk never touched the file's size
    assert "event=resized" in sock.log()


def test_guest_against_qsd_7_2_block_resize_is_not_told(tmp_path, serve_qsd, boot):
    """The reference, measured: qsd 7.2's export sends no CONFIG_CHANGE_MSG on block_resize,
    so the guest keeps the size it booted with (vblk's guest above sees both changes)."""
    image = tagged_image(tmp_path / "disk.img", 32 * MiB, 0)
    monitor = tmp_path / "qmp.sock"
    sock = serve_qsd(image, qmp=monitor)

    def block_resize(size: int):
        with Qmp(str(monitor)) as qmp:
            return qmp.execute("block_resize", {"node-name": "disk0", "size": size})

    on_line, done = acting_on({"grow": lambda: block_resize(48 * MiB),
                               "shrink": lambda: block_resize(16 * MiB)})
    res = boot(sock, script(10), on_line=on_line).check()
    v = res.values
    assert [name for name, _ in done] == ["grow", "shrink"], res.describe()
    assert v["SIZE0"] == v["SIZE1"] == v["SIZE2"] == str(32 * MiB // 512), res.describe()
    assert os.path.getsize(image) == 16 * MiB         # qsd truncated the image itself
