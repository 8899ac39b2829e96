"""Live resize end to end with real processes: ``vblk resize`` (the real CLI) against a running
``vblk serve`` with the Python frontend connected, and the same frontend scenario against
qemu-storage-daemon's ``block_resize`` (same request, same result)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qmp_args
from vblk.testing.frontend import DEFAULT_PROTOCOL_FEATURES, BackendTimeout, BlkClient
from vblk.testing.qmp import Qmp
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import ProtocolFeature as P
from vblk.virtio.constants import BlkStatus, BlkType

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
MiB = 1 << 20
WITH_CHANNEL = DEFAULT_PROTOCOL_FEATURES | P.BACKEND_REQ.mask
PATTERN = bytes(range(256)) * 16                   # 4 KiB


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, MiB):            # a tagged 4 KiB block at every MiB
            f.seek(off)
            f.write(off.to_bytes(8, "little") + PATTERN[8:])
    return path


def vblk(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vblk.cli", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def resize_ok(sock: str, size: str, *flags: str) -> str:
    r = vblk("resize", size, "--socket-path", sock, *flags)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout.strip()


def refused(sock: str, size: str, match: str) -> str:
    r = vblk("resize", "--socket-path", sock, "--", size)   # "--": a negative size is no option
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("vblk: error: ") and match in lines[0], lines
    return lines[0]


def capacity_in_stats(sock: str) -> int:
    r = vblk("stats", "--socket-path", sock, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["disk"]["capacity_bytes"]


def expect_config_change(client: BlkClient, timeout: float = 10.0) -> None:
    header, payload = client.frontend.recv_backend_request(timeout)
    assert header.request == m.BackendReq.CONFIG_CHANGE_MSG
    assert payload == b"" and header.size == 0
    assert header.flags & m.FLAG_VERSION_MASK == m.VERSION


def expect_no_message(client: BlkClient) -> None:
    with pytest.raises(BackendTimeout):
        client.frontend.recv_backend_request(0.3)


def check_disk_ends_at(client: BlkClient, size: int) -> None:
    """What the guest would see: capacity, a read just below the end works, past it IOERR."""
    assert client.refresh_config().capacity == size // 512
    below = client.read(size // 512 - 8, 4096)
    assert below.status == BlkStatus.OK
    past = client.read(size // 512, 4096)
    assert past.status == BlkStatus.IOERR
    straddling = client.read(size // 512 - 4, 4096)
    assert straddling.status == BlkStatus.IOERR


# -- vblk -------------------------------------------------------------------------------------

def metrics_capacity(sock: str) -> float:
    import urllib.request
    r = vblk("stats", "--socket-path", sock, "--json")
    address = json.loads(r.stdout)["info"]["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("vblk_capacity_bytes "):
                return float(line.split()[1])
    raise AssertionError("no vblk_capacity_bytes in /metrics")


def test_vblk_resize_shrinks_then_grows_and_the_frontend_is_told(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image, "--metrics-listen", "127.0.0.1:0")
    assert metrics_capacity(sock) == 16 * MiB
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        assert client.frontend.protocol_features & P.BACKEND_REQ.mask
        assert client.config.capacity == 16 * MiB // 512
        out = resize_ok(sock, "8M")
        assert out == ("resized from 16777216 to 8388608 bytes (32768 -> 16384 sectors); "
                       "the frontend was notified")
        expect_config_change(client)
        check_disk_ends_at(client, 8 * MiB)
        assert client.read(7 * MiB // 512, 4096).data[:8] == (7 * MiB).to_bytes(8, "little")
        assert capacity_in_stats(sock) == 8 * MiB
        assert metrics_capacity(sock) == 8 * MiB
        table = vblk("stats", "--socket-path", sock).stdout
        assert "disk: 8388608 bytes (8.0 MiB, 16384 sectors), 1 resizes since start" in table

        assert "from 8388608 to 16777216 bytes" in resize_ok(sock, str(16 * MiB))
        expect_config_change(client)
        check_disk_ends_at(client, 16 * MiB)
        back = client.read(15 * MiB // 512, 4096)            # the data was never touched
        assert back.data == (15 * MiB).to_bytes(8, "little") + PATTERN[8:]
        assert client.write(12 * MiB // 512, PATTERN).status == BlkStatus.OK
    assert os.path.getsize(image) == 16 * MiB


def test_vblk_resize_grows_after_the_image_was_truncated_bigger_and_never_grows_it(vblk_server,
                                                                                   tmp_path):
    image = make_image(tmp_path / "d.img", 8 * MiB)
    sock = vblk_server(image)
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        line = refused(sock, "12M", "never grows")
        assert "8388608 bytes" in line
        expect_no_message(client)
        os.truncate(image, 12 * MiB + 100)                    # the operator grows the file
        assert "from 8388608 to 12582912 bytes" in resize_ok(sock, "12M")
        expect_config_change(client)
        check_disk_ends_at(client, 12 * MiB)
        assert client.write(12 * MiB // 512 - 8, PATTERN).status == BlkStatus.OK
        refused(sock, str(12 * MiB + 512), "12582912 bytes")  # the 100-byte tail is no block
    assert os.path.getsize(image) == 12 * MiB + 100
    with open(image, "rb") as f:
        assert os.pread(f.fileno(), 4096, 12 * MiB - 4096) == PATTERN


@pytest.mark.parametrize("size,match,status", [
    ("32M", "never grows", 2),
    ("1000", "not a whole number of 512-byte logical blocks", 2),
    ("0", "at least one logical block", 2),
    ("12Q", "is not a size", 2),
    ("-1M", "is not a size", 2),
])
def test_vblk_resize_refusals_change_nothing(vblk_server, tmp_path, size, match, status):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image)
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        refused(sock, size, match)
        expect_no_message(client)
        check_disk_ends_at(client, 16 * MiB)
    assert capacity_in_stats(sock) == 16 * MiB
    assert os.path.getsize(image) == 16 * MiB


def test_vblk_resize_of_a_4k_disk_needs_whole_4k_blocks(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image, "--sectorsize", "4096")
    refused(sock, "8190K", "4096-byte logical blocks")
    assert "to 8384512 bytes" in resize_ok(sock, "8188K")


def test_vblk_resize_with_a_range_stays_inside_the_range(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image, "--range", "2M/4M")
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        refused(sock, "5M", "range's size (4194304 bytes)")
        resize_ok(sock, "1M")
        expect_config_change(client)
        check_disk_ends_at(client, MiB)
        assert client.read(0, 4096).data[:8] == (2 * MiB).to_bytes(8, "little")
        resize_ok(sock, "4M")
        expect_config_change(client)
        check_disk_ends_at(client, 4 * MiB)


def test_vblk_resize_of_a_read_only_disk(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image, "--ro")
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        resize_ok(sock, "4M")
        expect_config_change(client)
        check_disk_ends_at(client, 4 * MiB)
        assert client.write(0, PATTERN).status == BlkStatus.IOERR


def test_vblk_resize_without_a_frontend_applies_and_says_nobody_was_told(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image)
    out = resize_ok(sock, "6M")
    assert "the guest was not notified (no frontend is connected" in out
    assert capacity_in_stats(sock) == 6 * MiB
    answer = json.loads(resize_ok(sock, "7M", "--json"))
    assert answer["reason"].startswith("no frontend is connected")
    assert {k: answer[k] for k in ("old_bytes", "new_bytes", "notified")} == \
        {"old_bytes": 6 * MiB, "new_bytes": 7 * MiB, "notified": False}
    old = vblk("resize", sock, "6M")           # the old spelling, resize INSTANCE SIZE, works
    assert old.returncode == 0 and old.stdout.startswith("resized from 7340032 to 6291456 bytes")
    assert old.stderr == ("vblk: warning: vblk resize INSTANCE SIZE is deprecated (it still "
                          "works): use vblk resize SIZE --socket-path INSTANCE\n")
    assert vblk("resize", f"{sock}.ctl", "6M").returncode == 0     # INSTANCE: the control socket
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        assert client.config.capacity == 6 * MiB // 512        # the handshake's GET_CONFIG
        check_disk_ends_at(client, 6 * MiB)


def test_vblk_resize_with_a_frontend_without_backend_req(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image)
    with BlkClient.connect(sock) as client:                   # no BACKEND_REQ asked for
        assert not client.frontend.protocol_features & P.BACKEND_REQ.mask
        out = resize_ok(sock, "6M")
        assert "not notified (the frontend did not negotiate BACKEND_REQ" in out
        check_disk_ends_at(client, 6 * MiB)


def test_vblk_resize_survives_a_frontend_that_closed_its_backend_channel(vblk_server, tmp_path):
    image = make_image(tmp_path / "d.img", 16 * MiB)
    sock = vblk_server(image)
    with BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        client.frontend.backend_channel.close()
        client.frontend.backend_channel = None
        out = resize_ok(sock, "6M")
        assert "not notified (the backend channel failed" in out
        assert "not notified (the frontend did not" in resize_ok(sock, "7M")   # channel gone
        check_disk_ends_at(client, 7 * MiB)                  # the main channel still serves


def test_vblk_resize_of_an_unreachable_instance_is_status_1(tmp_path):
    r = vblk("resize", "1M", "--socket-path", str(tmp_path / "nothing.sock"))
    assert r.returncode == 1 and r.stderr.startswith("vblk: error: no control socket")


# -- the same frontend scenario against qemu-storage-daemon's block_resize --------------------

def test_qsd_7_2_block_resize_bounds_io_but_tells_no_frontend(qsd_server, tmp_path):
    """The reference, measured: qsd 7.2 offers BACKEND_REQ and takes the channel, but its
    vhost-user-blk export has no resize callback yet (``vu_blk_exp_resize`` came later), so
    block_resize sends no CONFIG_CHANGE_MSG and GET_CONFIG keeps the size from export
    creation. What it shares with vblk: new requests are checked against the new size
    (past the end: IOERR; below: OK). Unlike vblk, block_resize truncates the image itself."""
    image = make_image(tmp_path / "d.img", 16 * MiB)
    monitor = tmp_path / "qmp.sock"
    sock = qsd_server(image, *qmp_args(monitor))
    with Qmp(str(monitor)) as qmp, \
            BlkClient.connect(sock, protocol_features=WITH_CHANNEL) as client:
        assert client.frontend.protocol_features & P.BACKEND_REQ.mask
        qmp.execute("block_resize", {"node-name": "disk0", "size": 8 * MiB})
        expect_no_message(client)
        assert client.refresh_config().capacity == 16 * MiB // 512      # stale
        assert client.read(8 * MiB // 512 - 8, 4096).status == BlkStatus.OK
        assert client.read(8 * MiB // 512, 4096).status == BlkStatus.IOERR
        assert client.read(8 * MiB // 512 - 4, 4096).status == BlkStatus.IOERR
        assert os.path.getsize(image) == 8 * MiB
        qmp.execute("block_resize", {"node-name": "disk0", "size": 32 * MiB})
        expect_no_message(client)
        assert client.refresh_config().capacity == 16 * MiB // 512
        assert client.read(24 * MiB // 512, 4096).status == BlkStatus.OK  # past what it says
        assert os.path.getsize(image) == 32 * MiB


def test_vblk_resize_with_requests_in_flight_loses_nothing_and_writes_nothing_refused(
        vblk_server, tmp_path):
    """A frontend keeps 16 tagged 4 KiB writes and reads in flight over the whole 16 MiB
    while the disk is shrunk to 8 MiB and grown back, again and again. Every request
    completes (OK, or IOERR for one past the end in force when it was taken), vblk never
    stops serving, and a write that was refused never reached the image: every block above
    8 MiB holds its original tag or the data of a write that completed OK."""
    import random
    import threading

    size = 16 * MiB
    image = make_image(tmp_path / "d.img", size)
    original = image.read_bytes()
    sock = vblk_server(image)
    stop = threading.Event()
    outcome: dict = {"ok": set(), "ioerr_past": 0, "ok_past": 0, "requests": 0, "error": None}

    def load() -> None:
        rng = random.Random(7)
        serial = 0
        try:
            with BlkClient.connect(sock, timeout=20) as client:
                tags: dict[int, tuple[int, bytes | None]] = {}
                while not stop.is_set() or tags:
                    while not stop.is_set() and client.in_flight < 16:
                        sector = rng.randrange(size // 4096) * 8
                        if rng.random() < 0.6:
                            serial += 1
                            data = serial.to_bytes(8, "little") + b"W" * 4088
                            tags[client.submit(BlkType.OUT, sector, data=data)] = (sector, data)
                        else:
                            tags[client.submit(BlkType.IN, sector, nbytes=4096)] = (sector, None)
                    for c in client.wait(1):
                        sector, data = tags.pop(c.tag)
                        outcome["requests"] += 1
                        assert c.status in (BlkStatus.OK, BlkStatus.IOERR), c
                        past = sector * 512 >= 8 * MiB
                        if c.status == BlkStatus.IOERR:
                            assert past, f"IOERR below the smallest size: {c}"
                            outcome["ioerr_past"] += 1
                        elif past:
                            outcome["ok_past"] += 1
                        if c.status == BlkStatus.OK and data is not None:
                            outcome["ok"].add(data[:8])
        except BaseException as exc:          # reported by the main thread
            outcome["error"] = exc

    worker = threading.Thread(target=load)
    worker.start()
    try:
        for _ in range(5):
            resize_ok(sock, "8M")
            resize_ok(sock, "16M")
        resize_ok(sock, "8M")
    finally:
        stop.set()
        worker.join(60)
    assert not worker.is_alive(), "the load did not finish: requests hung"
    assert outcome["error"] is None, repr(outcome["error"])
    # both sides of the end were exercised while it moved
    assert outcome["requests"] > 200 and outcome["ioerr_past"] > 0 and outcome["ok_past"] > 0, outcome
    assert capacity_in_stats(sock) == 8 * MiB
    data = image.read_bytes()
    assert len(data) == size                                   # never grown or cut
    for off in range(8 * MiB, size, 4096):
        block = data[off:off + 4096]
        if block != original[off:off + 4096]:
            assert block[8:] == b"W" * 4088 and block[:8] in outcome["ok"], \
                f"block at {off} holds data of a write that was not completed OK"
