"""Rate limits against real processes: ``vblk serve --iops-limit/--bps-limit``, ``vblk limit``,
and qemu-storage-daemon's throttle group under the same load (same request, same result).

Limits are low (a few hundred requests or a few MiB a second) so that a loaded machine still
reaches them; the assertions are "held within 5 % (+ the burst)" and "not far below it".
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vblk.control import default_control_path, fetch_stats
from vblk.lab.client import run_workload
from vblk.lab.workload import Workload
from vblk.testing.cli import run_vblk
from vblk.testing.frontend import BlkClient
from vblk.virtio.constants import BlkStatus

MiB = 1 << 20
IMAGE_SIZE = 64 * MiB
WINDOW_S = 5.0
BURST_S = 0.1                  # vblk's default burst and QEMU's: 0.1 s of the rate


def vblk_cli(*args: str) -> subprocess.CompletedProcess:
    return run_vblk(*args, timeout=30)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return path


def qsd_throttled(image: Path, sock: str, *, iops: int = 0, bps: int = 0) -> list[str]:
    """qemu-storage-daemon exporting IMAGE through a throttle node in throttle group t0."""
    limits = ",".join(f"{k}={v}" for k, v in (("x-iops-total", iops), ("x-bps-total", bps)) if v)
    return ["qemu-storage-daemon",
            "--object", f"throttle-group,id=t0,{limits}",
            "--blockdev", f"driver=file,node-name=file0,filename={image}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--blockdev", "driver=throttle,node-name=thr0,throttle-group=t0,file=disk0",
            "--export", "type=vhost-user-blk,id=exp0,node-name=thr0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=1"]


def limited_server(kind: str, request, image: Path, *, iops: int = 0, bps: int = 0) -> str:
    if kind == "vblk":
        args = []
        if iops:
            args += ["--iops-limit", str(iops)]
        if bps:
            args += ["--bps-limit", str(bps)]
        return request.getfixturevalue("vblk_server")(image, *args)
    launch = request.getfixturevalue("launch")
    return launch("qsd", lambda sock: qsd_throttled(image, sock, iops=iops, bps=bps))


def assert_held(achieved: float, seconds: float, rate: float, one_request: float, what: str) -> None:
    """``achieved`` units in ``seconds`` are at most rate × 1.05 (+ the burst and the request
    that overdrew it) and at least 80 % of the rate."""
    ceiling = rate * seconds * 1.05 + rate * BURST_S + one_request
    floor = rate * seconds * 0.8
    assert floor <= achieved <= ceiling, (
        f"{what}: {achieved:,.0f} in {seconds:.2f} s = {achieved / seconds:,.1f}/s against a "
        f"limit of {rate:,}/s (allowed {floor:,.0f}..{ceiling:,.0f})")


@pytest.mark.parametrize("kind", ["vblk", "qsd"])
def test_iops_limit_is_held(kind, request, image):
    rate = 400
    sock = limited_server(kind, request, image, iops=rate)
    r = run_workload(sock, Workload(pattern="randread", bs=4096, qd=16, duration=WINDOW_S).checked())
    assert r.errors == 0
    assert_held(r.ops, r.seconds, rate, 16, f"{kind} IOPS")


@pytest.mark.parametrize("kind", ["vblk", "qsd"])
def test_bps_limit_is_held(kind, request, image):
    rate = 2 * MiB
    sock = limited_server(kind, request, image, bps=rate)
    r = run_workload(sock, Workload(pattern="randwrite", bs=16384, qd=8, duration=WINDOW_S).checked())
    assert r.errors == 0
    assert_held(r.bytes, r.seconds, rate, 8 * 16384, f"{kind} bytes/s")


def test_a_request_larger_than_the_burst_completes(vblk_server, image):
    sock = vblk_server(image, "--bps-limit", "256K", "--bps-burst", "4K")
    with BlkClient.connect(sock, ram_mib=8) as client:
        started = time.monotonic()
        first = client.read(0, 512 * 1024)        # 128 bursts, admitted at once (debt)
        second = client.read(0, 4096)             # waits for the debt: ~2 s
        took = time.monotonic() - started
    assert first.status == second.status == BlkStatus.OK
    assert 1.5 <= took <= 20, took


def test_limits_change_at_run_time_through_the_cli(vblk_server, image):
    sock = vblk_server(image, "--iops-limit", "200")
    shown = vblk_cli("limit", "--socket-path", sock)
    assert shown.returncode == 0, shown.stderr
    assert "iops limit: 200/s (burst 20)" in shown.stdout
    assert "bps limit: unlimited" in shown.stdout

    changed = vblk_cli("limit", "--socket-path", sock, "--iops-limit", "800", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["iops"] == 800
    w = Workload(pattern="randread", bs=4096, qd=16, duration=WINDOW_S).checked()
    r = run_workload(sock, w)
    assert_held(r.ops, r.seconds, 800, 16, "IOPS after vblk limit --iops 800")

    off = vblk_cli("limit", "--socket-path", sock, "--iops-limit", "0")
    assert off.returncode == 0 and "iops limit: unlimited" in off.stdout, off
    r = run_workload(sock, Workload(pattern="randread", bs=4096, qd=16, duration=1.0).checked())
    assert r.iops > 1.5 * 800, f"unlimited again, yet {r.iops:.0f} IOPS"

    snap = fetch_stats(default_control_path(sock))
    assert snap["limits"]["iops"] == 0
    assert snap["limits"]["throttle_events"] >= 1
    assert snap["limits"]["throttled_s"] > 1.0          # most of the 5 s run waited for tokens
    text = vblk_cli("stats", "--socket-path", sock).stdout
    assert "iops limit: unlimited" in text and "throttled" in text


@pytest.mark.parametrize("args, words", [
    (("--iops-limit", "-5"), "--iops-limit -5"),
    (("--iops-limit", "fast"), "is not a whole number"),
    (("--bps-limit", "1X"), "--bps-limit 1X"),
    (("--iops-burst", "10"), "--iops-burst needs --iops-limit"),
    (("--bps-limit", "1M", "--bps-burst", "0"), "--bps-burst 0 must be at least 1"),
])
def test_bad_limits_are_refused_before_anything_is_touched(tmp_path, image, args, words):
    sock = Path("/tmp") / f"vblk-rl-{os.getpid()}.sock"
    before = os.stat(image).st_mtime_ns
    r = vblk_cli("serve", image, "--socket-path", sock, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vblk: error: ") and words in lines[0], r.stderr
    assert not sock.exists()
    assert os.stat(image).st_mtime_ns == before


def test_vblk_limit_refuses_bad_values(vblk_server, image):
    sock = vblk_server(image)
    r = vblk_cli("limit", "--socket-path", sock, "--iops-limit", "many")
    assert r.returncode == 2 and "--iops-limit many" in r.stderr
    r = vblk_cli("limit", "--socket-path", sock, "--iops-burst", "5")      # no IOPS limit to burst
    lines = r.stderr.splitlines()          # refused input, like a refused resize: one line, 2
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("vblk: error: ")
    assert "iops-burst needs an IOPS limit" in lines[0] and r.stdout == "", r.stderr
    r = vblk_cli("limit", "--socket-path", sock + ".nothing")
    assert r.returncode == 1


# -- held requests and the ways a ring stops --------------------------------------------------

COUNT = 32


def _submit_writes(client: BlkClient, salt: int) -> dict[int, bytes]:
    rng = random.Random(salt)
    data = {}
    for i in range(COUNT):
        sector = i * 8
        data[sector] = rng.randbytes(4096)
        client.submit(1, sector, data=data[sector])
    return data


def _used_idx(client: BlkClient) -> int:
    return int.from_bytes(client.ram.read(client.layout.used + 2, 2), "little")


def _verify(sock: str, data: dict[int, bytes]) -> None:
    with BlkClient.connect(sock, ram_mib=8) as reader:
        for sector, want in data.items():
            got = reader.read(sector, len(want))
            assert got.status == BlkStatus.OK and got.data == want, f"sector {sector} differs"


def test_ring_stop_with_requests_waiting_for_tokens_loses_nothing(vblk_server, image):
    sock = vblk_server(image, "--iops-limit", "40", "--iops-burst", "4")
    with BlkClient.connect(sock, ram_mib=8) as client:
        data = _submit_writes(client, 1)
        time.sleep(0.3)                        # ~4 + 12 admitted, the rest wait in the ring
        base = client.frontend.stop_queue(0)   # SET_VRING_ENABLE 0 + GET_VRING_BASE
        assert 0 < base < COUNT, base
        assert _used_idx(client) == base       # everything taken was finished, nothing more
        client._harvest()
        done = client.wait(0)
        assert len(done) == base
        # QEMU restarts the ring at the base it got; the waiting requests are still there
        client.fds = client.frontend.start_queue(0, client.layout, base=base)
        client._watch_fds()
        done += client.wait(COUNT - base, timeout=30)
    assert len(done) == COUNT and {c.status for c in done} == {BlkStatus.OK}
    _verify(sock, data)


def test_disconnect_and_reconnect_with_requests_waiting_for_tokens(vblk_server, image):
    sock = vblk_server(image, "--iops-limit", "40", "--iops-burst", "4")
    with BlkClient.connect(sock, ram_mib=8, inflight=True) as client:
        data = _submit_writes(client, 2)
        time.sleep(0.3)
        client.reconnect(sock)                 # the connection drops; QEMU's reconnect
        done = client.wait(COUNT, timeout=30)
    assert {c.status for c in done} == {BlkStatus.OK}
    _verify(sock, data)
    snap = fetch_stats(default_control_path(sock))
    # each write was taken once: none lost, none run twice across the reconnect
    assert sum(q["types"]["write"]["requests"] for q in snap["queues"]) == COUNT


def test_sigterm_while_requests_wait_for_tokens(vblk_server, image):
    sock = vblk_server(image, "--iops-limit", "40", "--iops-burst", "4")
    client = BlkClient.connect(sock, ram_mib=8)
    try:
        _submit_writes(client, 3)
        time.sleep(0.3)
        started = time.monotonic()
        sock.proc.send_signal(signal.SIGTERM)  # finish what was taken, then exit
        status = sock.proc.wait(timeout=30)
        assert status == 0, sock.log()
        assert time.monotonic() - started < 4, "a throttled vblk was slow to stop"
        taken = _used_idx(client)
        assert 0 < taken < COUNT
        client._harvest()
        done = client.wait(0)
        assert len(done) == taken and {c.status for c in done} == {BlkStatus.OK}
    finally:
        client.broken = True
        client.close()
