"""``vblk serve rbd:...`` end to end: the real command, a real Ceph cluster (vblk.testing.ceph),
the Python frontend. What a guest would notice: data, flushes, zeroes, size, refusals, one
writer, a restart that takes over, OSD and cluster faults."""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vblk.testing.cli import error_line, run_vblk
from vblk.testing.frontend import DEFAULT_PROTOCOL_FEATURES, BlkClient
from vblk.testing.model import DiskModel, Workload, run_stress, write_initial_image
from vblk.testing.restart import RestartingVblk, restart_storm
from vblk.vhost_user import messages as m
from vblk.vhost_user.messages import ProtocolFeature as P
from vblk.virtio.blk import DISCARD_SEGMENT
from vblk.virtio.constants import SECTOR_SIZE, BlkStatus, BlkType

MiB = 1 << 20
SECTORS = 16 * MiB // SECTOR_SIZE


def modelled_image(cluster, name: str, tmp_path: Path, salt: int) -> None:
    """Replace image ``name`` with SECTORS sectors holding the model's initial writes."""
    path = tmp_path / "initial.img"
    write_initial_image(str(path), SECTORS, salt)
    cluster.remove_image(name)
    cluster.import_image(name, path)


def spec(cluster, name: str, extra: str = "") -> str:
    return f"rbd:rbd/{name}:conf={cluster.conf}{extra}"


# -- serving ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["writethrough", "writeback"])
def test_a_verified_random_workload_on_an_rbd_image(ceph_cluster, rbd_image, vblk_server,
                                                    tmp_path, mode):
    name = rbd_image(16 * MiB)
    salt = 7300 + (mode == "writeback")
    modelled_image(ceph_cluster, name, tmp_path, salt)
    sock = vblk_server(spec(ceph_cluster, name), *(["--cache", "writeback"] if mode == "writeback" else []))
    model = DiskModel(SECTORS, salt)
    workload = Workload(salt, SECTORS, indirect_share=0.25, max_segments=4)
    with BlkClient.connect(sock, ram_mib=32) as client:
        report = run_stress(client, model, workload, 1500, qd=16, seed=salt)
        assert client.flush().status == BlkStatus.OK
        # everything the model says was written is in the image once flushed
        back = client.read(0, 4096)
    assert not report.bad_status and not report.mismatches, \
        (report.bad_status + report.mismatches)[:5]
    assert report.ops == 1500 and report.reads > 400 and report.writes > 400
    data = ceph_cluster.export(name)
    assert data[:4096] == back.data


def test_write_zeroes_zeroes_less_than_an_object_and_discard_is_accepted(ceph_cluster, rbd_image,
                                                                         vblk_server):
    name = rbd_image(16 * MiB)
    sock = vblk_server(spec(ceph_cluster, name, ",discard=2048:4:0"))
    with BlkClient.connect(sock) as c:
        payload = os.urandom(64 * 1024)
        for sector in (0, 8192, 16384):
            assert c.write(sector, payload).status == BlkStatus.OK
        zero = DISCARD_SEGMENT.pack(8 + 0, 16, 0)                 # 8 KiB inside object 0
        assert c._run(c.submit(BlkType.WRITE_ZEROES, 0, data=zero)).status == BlkStatus.OK
        unmap = DISCARD_SEGMENT.pack(8192 + 8, 16, 1)             # with UNMAP: still zeroes
        assert c._run(c.submit(BlkType.WRITE_ZEROES, 0, data=unmap)).status == BlkStatus.OK
        trim = DISCARD_SEGMENT.pack(16384, 128, 0)
        assert c._run(c.submit(BlkType.DISCARD, 0, data=trim)).status == BlkStatus.OK
        for sector in (0, 8192):
            got = c.read(sector, 64 * 1024).data
            assert got[:4096] == payload[:4096]
            assert got[4096:12288] == bytes(8192)
            assert got[12288:] == payload[12288:]


def test_a_snapshot_serves_read_only_and_byte_identical(ceph_cluster, rbd_image, vblk_server):
    name = rbd_image(4 * MiB)
    ceph_cluster.rbd("bench", "--io-type", "write", "--io-size", "64K", "--io-total", "4M",
                     "--io-pattern", "seq", f"rbd/{name}")
    ceph_cluster.rbd("snap", "create", f"rbd/{name}@frozen")
    want = ceph_cluster.export(f"{name}@frozen")
    line = error_line(run_vblk("serve", f"rbd:rbd/{name}@frozen:conf={ceph_cluster.conf}",
                        "--socket-path", "/tmp/never.sock"))
    assert "is a snapshot, which is read-only: pass ro" in line
    sock = vblk_server(f"rbd:rbd/{name}@frozen:conf={ceph_cluster.conf},ro")
    with BlkClient.connect(sock) as c:
        assert c.write(0, b"x" * 512).status == BlkStatus.IOERR
        got = b"".join(c.read(s, 256 * 1024).data for s in range(0, 8192, 512))
    assert got == want
    ceph_cluster.rbd("snap", "purge", f"rbd/{name}")


def test_info_and_every_refusal_is_one_line_before_anything_is_made(ceph_cluster, rbd_image,
                                                                    tmp_path):
    name = rbd_image(8 * MiB)
    r = run_vblk("info", spec(ceph_cluster, name))
    assert r.returncode == 0, r.stderr
    assert f"rbd:rbd/{name}:conf={ceph_cluster.conf} (rbd image, {8 * MiB} bytes)" in r.stdout
    sock = tmp_path / "never.sock"
    conf = ceph_cluster.conf
    for text, match in ((f"rbd:rbd/nope:conf={conf}", "image 'nope' in pool 'rbd' does not exist"),
                        (f"rbd:nopool/{name}:conf={conf}", "pool 'nopool' does not exist"),
                        (f"rbd:rbd/{name}:conf={tmp_path}/missing.conf", "cannot read"),
                        (f"rbd:rbd/{name}@nosnap:conf={conf},ro", "snapshot 'nosnap'"),
                        (f"rbd:rbd/{name}:conf={conf}:no_such_option=1", "Ceph option")):
        for cmd in (("info", text), ("serve", text, "--socket-path", str(sock))):
            assert match in error_line(run_vblk(*cmd)), cmd
    assert not sock.exists()


def test_an_unreachable_cluster_is_refused_within_the_stated_time(tmp_path):
    dead = tmp_path / "dead.conf"
    with socket_listening_nowhere() as port:
        dead.write_text(f"[global]\nmon host = 127.0.0.1:{port}\nauth client required = none\n")
        t0 = time.monotonic()
        line = error_line(run_vblk("info", f"rbd:rbd/x:conf={dead}"))
        elapsed = time.monotonic() - t0
    assert "cannot reach the Ceph cluster" in line and "within 10 s" in line
    assert elapsed < 20, elapsed


class socket_listening_nowhere:
    """A TCP port nothing answers on (bound, never listening: connections are refused)."""

    def __enter__(self) -> int:
        import socket
        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.s.close()


# -- one writer ---------------------------------------------------------------------------------

def test_a_second_vblk_is_refused_and_a_second_writer_cannot_write(ceph_cluster, rbd_image,
                                                                   vblk_server, qsd_rbd):
    name = rbd_image(8 * MiB)
    sock = vblk_server(spec(ceph_cluster, name))
    with BlkClient.connect(sock) as c:
        assert c.write(0, b"v" * 4096).status == BlkStatus.OK
        line = error_line(run_vblk("serve", spec(ceph_cluster, name), "--socket-path", "/tmp/x2.sock"))
        assert "is in use by another client" in line and "vblk client=" in line
        # qemu-storage-daemon takes no lock: it opens the image, but the one writer is vblk
        other = qsd_rbd(ceph_cluster, name)
        with BlkClient.connect(other) as q:
            assert q.write(0, b"q" * 4096).status == BlkStatus.IOERR
        assert c.write(8, b"w" * 4096).status == BlkStatus.OK
        assert c.read(0, 8192).data == b"v" * 4096 + b"w" * 4096
    assert ceph_cluster.export(name)[:8192] == b"v" * 4096 + b"w" * 4096


@pytest.fixture
def qsd_rbd(launch):
    def start(cluster, name):
        return launch("qsd", lambda sock: [
            "qemu-storage-daemon", "--blockdev",
            f"driver=rbd,pool=rbd,image={name},conf={cluster.conf},node-name=d0,cache.direct=on",
            "--export", f"type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,"
                        f"addr.path={sock},writable=on"])
    return start


@pytest.mark.stress
@pytest.mark.parametrize("incoming", [False, True], ids=["plain", "incoming"])
def test_killed_and_restarted_vblk_takes_over_and_reruns_what_was_in_flight(ceph_cluster,
                                                                            rbd_image, tmp_path,
                                                                            incoming):
    """``incoming``: every vblk is a migration's destination (``--incoming``: the lock is
    taken when the rings start), as systemd would restart one."""
    name = rbd_image(16 * MiB)
    salt = 7400
    modelled_image(ceph_cluster, name, tmp_path, salt)
    sock = os.path.join(tempfile.mkdtemp(prefix="vblk-rr-", dir="/tmp"), "vblk.sock")
    # The cluster's daemons are frozen for a moment before each kill: requests pile up in
    # librbd, in flight, when vblk dies.
    proc = RestartingVblk(spec(ceph_cluster, name), sock, tmp_path,
                          *(["--incoming"] if incoming else []),
                          freezer=(ceph_cluster.freeze, ceph_cluster.thaw))
    started = []
    try:
        t0 = time.monotonic()
        result = restart_storm(proc, DiskModel(SECTORS, salt),
                               Workload(salt, SECTORS, max_segments=2),
                               int(os.environ.get("VBLK_RESTART_KILLS", 3 if incoming else 6)))
        started.append(time.monotonic() - t0)
    finally:
        proc.stop()
    logs = proc.logs()
    print(f"{result.kills} kills, {result.reconnects} reconnects, {result.ops} verified ops, "
          f"{proc.resubmitted()} re-run, {len(result.problems)} problems, "
          f"{logs.count('event=rbd_lock_taken_over')} takeovers in {started[0]:.1f} s")
    assert not result.problems, result.problems[:10]
    assert proc.resubmitted() > 0, "no kill caught a request in flight"
    assert logs.count("event=rbd_lock_taken_over") == result.kills     # never the 30 s wait


# -- faults --------------------------------------------------------------------------------------

@pytest.mark.stress
def test_an_osd_killed_and_restarted_mid_io_costs_the_guest_nothing(ceph_cluster_private,
                                                                    vblk_server, tmp_path):
    cluster = ceph_cluster_private                 # bluestore: the data survives SIGKILL
    salt = 7500
    path = tmp_path / "initial.img"
    write_initial_image(str(path), SECTORS, salt)
    cluster.import_image("disk", path)
    sock = vblk_server(spec(cluster, "disk"))
    model = DiskModel(SECTORS, salt)
    workload = Workload(salt, SECTORS, max_segments=2)
    reports, failures = [], []
    restarted = threading.Event()

    def work():
        # Batches of 200 verified ops until the OSD has been back for two more batches.
        try:
            with BlkClient.connect(sock, ram_mib=32, timeout=60) as client:
                after = 0
                while after < 2:
                    after += restarted.is_set()
                    reports.append(run_stress(client, model, workload, 200, qd=16,
                                              seed=salt + len(reports)))
                assert client.flush().status == BlkStatus.OK
        except BaseException as exc:           # reported by the main thread
            failures.append(exc)

    # The daemons die with the thread that started them (PDEATHSIG): faults from this one.
    t = threading.Thread(target=work)
    t.start()
    deadline = time.monotonic() + 60
    while not reports and not failures:       # some I/O done before the fault
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cluster.kill_osd()
    time.sleep(2.0)
    back = cluster.start_osd()
    restarted.set()
    t.join(180)
    assert not t.is_alive() and not failures, failures
    ops = sum(r.ops for r in reports)
    errors = [e for r in reports for e in r.bad_status]
    mismatches = [m for r in reports for m in r.mismatches]
    print(f"{ops} verified ops across one OSD kill + restart (up again {back:.1f} s after its "
          f"start): {len(errors)} errors, {len(mismatches)} mismatches")
    assert ops >= 600 and not errors and not mismatches
    # requests were in flight through the outage: one batch waited for the OSD
    assert max(r.seconds for r in reports) > 1.5, [round(r.seconds, 2) for r in reports]


@pytest.mark.stress
@pytest.mark.parametrize("ceph_cluster_private", ["memstore"], indirect=True)
def test_a_cluster_gone_past_the_timeout_fails_requests_and_vblk_serves_again(
        ceph_cluster_private, vblk_server):
    cluster = ceph_cluster_private
    cluster.create_image("disk", 8 * MiB)
    sock = vblk_server(spec(cluster, "disk", ":rados_osd_op_timeout=3"))
    with BlkClient.connect(sock, timeout=60) as c:
        assert c.write(0, b"a" * 4096).status == BlkStatus.OK
        cluster.freeze()
        try:
            t0 = time.monotonic()
            tags = [c.submit(BlkType.OUT, 8 * i, data=b"b" * 4096) for i in range(1, 5)]
            tags.append(c.submit(BlkType.IN, 0, nbytes=4096))
            done = c.wait(len(tags), timeout=30)
            waited = time.monotonic() - t0
        finally:
            cluster.thaw()
        assert {d.status for d in done} == {BlkStatus.IOERR}
        assert 2.5 < waited < 15, waited
        deadline = time.monotonic() + 30          # the cluster is back: so is the disk
        while c.read(0, 4096).status != BlkStatus.OK:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert c.read(0, 4096).data == b"a" * 4096
        assert c.write(8, b"c" * 4096).status == BlkStatus.OK
    print(f"5 requests failed after {waited:.1f} s with the cluster frozen; served again after")


# -- size -----------------------------------------------------------------------------------------

def test_rbd_resize_then_vblk_resize_and_the_frontend_is_told(ceph_cluster, rbd_image,
                                                              vblk_server):
    name = rbd_image(8 * MiB)
    sock = vblk_server(spec(ceph_cluster, name))
    features = DEFAULT_PROTOCOL_FEATURES | P.BACKEND_REQ.mask
    with BlkClient.connect(sock, protocol_features=features) as c:
        r = run_vblk("resize", "12M", "--socket-path", sock)
        assert r.returncode == 2 and "never grows" in r.stderr
        ceph_cluster.rbd("resize", "--size", "12M", f"rbd/{name}")
        r = run_vblk("resize", "12M", "--socket-path", sock)
        assert r.returncode == 0 and "the frontend was notified" in r.stdout, r.stderr
        header, _ = c.frontend.recv_backend_request(10)
        assert header.request == m.BackendReq.CONFIG_CHANGE_MSG
        assert c.refresh_config().capacity == 12 * MiB // 512
        assert c.write(12 * MiB // 512 - 8, b"e" * 4096).status == BlkStatus.OK
        assert c.read(12 * MiB // 512, 512).status == BlkStatus.IOERR
    assert ceph_cluster.export(name)[12 * MiB - 4096:] == b"e" * 4096


def test_two_queues_and_an_iops_limit_on_an_rbd_image(ceph_cluster, rbd_image, vblk_server):
    """Multiqueue and the rate limit hold on RBD as on a file: writes in flight on both queues
    at once read back through the other queue and from the cluster; the stats saw each queue
    work; 160 requests against a 200/s limit (burst 20) take at least 0.65 s."""
    from vblk.control import default_control_path, fetch_stats
    name = rbd_image(16 * MiB)
    sock = vblk_server(spec(ceph_cluster, name), "--num-queues", "2", "--iops-limit", "200")
    first = BlkClient.connect(sock, ram_mib=64, area=(0, 8 * MiB), queue_size=64)
    queues = first.open_queues(2, queue_size=64)
    expect: dict[int, bytes] = {}
    try:
        assert first.config.num_queues == 2
        t0 = time.monotonic()
        for rnd in range(5):                                # 5 x 16 writes, then 80 reads
            tags: list[list[int]] = [[], []]
            for i in range(16):
                block = rnd * 16 + i
                expect[block] = os.urandom(4096)
                tags[i % 2].append(queues[i % 2].submit(BlkType.OUT, block * 8,
                                                        data=expect[block]))
            for q, want in zip(queues, tags):
                done = {}
                while len(done) < len(want):
                    done.update({c.tag: c for c in q.wait(1)})
                assert all(c.status == BlkStatus.OK for c in done.values())
        for block, data in expect.items():
            back = queues[(block + 1) % 2].read(block * 8, 4096)
            assert back.status == BlkStatus.OK and back.data == data, block
        seconds = time.monotonic() - t0
        assert seconds >= (160 - 20) / 200 * 0.95, f"160 requests in {seconds:.2f} s at 200/s"
        snap = fetch_stats(default_control_path(sock))
        assert [q["types"]["write"]["requests"] for q in snap["queues"]] == [40, 40]
        assert sum(q["types"]["read"]["requests"] for q in snap["queues"]) == 80
    finally:
        for c in reversed(queues):
            c.close()
    image = ceph_cluster.export(name)
    for block, data in expect.items():
        assert image[block * 4096:(block + 1) * 4096] == data, block


def test_cephx_users_a_wrong_key_and_missing_caps_are_refused_in_one_line(ceph_cluster_cephx,
                                                                          vblk_server, tmp_path):
    """With cephx on: a user with ``profile rbd`` on the pool serves; a user the cluster does
    not know, a wrong key, caps for another pool, and read-only caps without ``ro`` are each
    refused in one line, exit 2, within seconds; read-only caps serve with ``ro``."""
    c = ceph_cluster_cephx
    c.rbd("create", "--size", "16M", "rbd/disk")
    vms = c.add_user("vms", "mon", "profile rbd", "osd", "profile rbd pool=rbd")
    other = c.add_user("other", "mon", "profile rbd", "osd", "profile rbd pool=other")
    reader = c.add_user("reader", "mon", "profile rbd", "osd", "profile rbd-read-only pool=rbd")
    wrong = tmp_path / "wrong.keyring"
    key = subprocess.run(["ceph-authtool", "--gen-print-key"], capture_output=True, text=True,
                         check=True).stdout.strip()
    wrong.write_text(f"[client.vms]\n\tkey = {key}\n")
    base = f"rbd:rbd/disk:conf={c.conf}"
    refusals = {
        "unknown user": (f"{base}:id=nobody", "the cluster refused client.nobody"),
        "wrong key": (f"{base}:id=vms:keyring={wrong}", "the cluster refused client.vms"),
        "other pool's caps": (f"{base}:id=other:keyring={other}",
                              "client.other may not open image rbd/disk:"),
        "other pool's caps, ro": (f"{base}:id=other:keyring={other},ro",
                                  "client.other may not open image rbd/disk:"),
        "read-only caps, writable": (f"{base}:id=reader:keyring={reader}",
                                     "client.reader may not open for writing image rbd/disk"),
    }
    for what, (spec_, words) in refusals.items():
        t0 = time.monotonic()
        sock = tmp_path / "refused.sock"
        r = run_vblk("serve", spec_, "--socket-path", sock)
        assert words in error_line(r), (what, r.stderr)
        assert time.monotonic() - t0 < 20 and not sock.exists(), what
    # the right user writes; the read-only one reads what it wrote
    payload = os.urandom(8192)
    writer = vblk_server(f"{base}:id=vms:keyring={vms}")
    with BlkClient.connect(writer) as client:
        assert client.write(64, payload).status == BlkStatus.OK
        assert client.flush().status == BlkStatus.OK
    assert writer.stop() == 0
    with BlkClient.connect(vblk_server(f"{base}:id=reader:keyring={reader},ro")) as client:
        back = client.read(64, 8192)
        assert back.status == BlkStatus.OK and back.data == payload
