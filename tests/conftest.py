"""Backends to test the Python frontend against: qemu-storage-daemon (the reference) and vblk.

``qsd_server(image)`` and ``vblk_server(image, *args)`` start a server on a fresh Unix socket,
wait until it accepts a connection (qsd: until it listens, without connecting; see
``vblk.testing.processes.unix_listening``), failing with its log if it dies first, and stop it
at teardown. ``backend_server`` is the same thing parametrized over ``BACKENDS``, so a test that
uses it runs once per backend (select with ``-k qsd`` / ``-k vblk``). When a test fails, the
log of every server it started is attached to the report.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

from vblk.lab.servers import qsd_command
from vblk.testing.processes import stop_group, unix_listening

# No wall-clock deadline for property tests: they assert behaviour, and a 2-CPU machine
# running the suite under xdist stretches an example past Hypothesis' 200 ms default
# (test_slot_budget took 302 ms once and failed as flaky). Speed lives in the benchmarks.
settings.register_profile("vblk", deadline=None)
settings.load_profile("vblk")

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("qsd", "vblk")
START_TIMEOUT = 20.0
_SERVERS = pytest.StashKey[list]()


class Server(str):
    """A running server: its socket path (this str), process and log."""

    proc: subprocess.Popen
    log_path: Path
    what: str

    def log(self, limit: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"

    def stop(self) -> int:
        """SIGTERM the server's process group, SIGKILL after 5 s; returns its exit status."""
        return stop_group(self.proc)


def _wait_until_listening(server: Server, timeout: float = START_TIMEOUT, *,
                          connect: bool = True) -> None:
    """Until ``server`` accepts a connection, or with ``connect`` False until it listens (seen
    in /proc/net/unix, no connection made: what qsd needs, see ``unix_listening``)."""
    deadline = time.monotonic() + timeout
    last = "socket not created"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"{server.what} exited with status {server.proc.returncode} before "
                        f"listening on {server}:\n{server.log()}", pytrace=False)
        if not connect:
            if unix_listening(server):
                return
            last = "not listening"
        elif os.path.exists(server):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(server))
                    return
                except OSError as exc:
                    last = str(exc)
        time.sleep(0.05)
    pytest.fail(f"{server.what} did not accept a connection on {server} within {timeout} s "
                f"({last}):\n{server.log()}", pytrace=False)


class _Launcher:
    """Starts servers for one test and stops them (and removes their sockets) at teardown."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[Server] = request.node.stash.setdefault(_SERVERS, [])
        self.dirs: list[str] = []

    def start(self, what: str, make_cmd: Callable[[str], Sequence[str]], *,
              cwd: Path | None = None, env: dict | None = None, connect: bool = True) -> Server:
        d = tempfile.mkdtemp(prefix="vblk-t-", dir="/tmp")     # sun_path holds 107 bytes
        self.dirs.append(d)
        sock = os.path.join(d, f"{what}.sock")
        log_path = self.tmp_path / f"{what}-{len(self.servers) + 1}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(list(make_cmd(sock)), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True)
        server = Server(sock)
        server.proc, server.log_path, server.what = proc, log_path, what
        self.servers.append(server)
        _wait_until_listening(server, connect=connect)
        return server

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


def vblk_command(image: str | os.PathLike, sock: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "vblk.cli", "serve", os.fspath(image), "--socket-path", sock,
            *map(str, args)]


def qmp_args(monitor_path: str | os.PathLike) -> list[str]:
    """qsd arguments for a QMP monitor on a Unix socket (for block_resize and friends)."""
    return ["--chardev", f"socket,id=qmp0,path={os.fspath(monitor_path)},server=on,wait=off",
            "--monitor", "chardev=qmp0"]


@pytest.fixture
def qsd_server(request: pytest.FixtureRequest, tmp_path: Path):
    """qsd_server(image, *extra, num_queues=1, discard=False) -> socket path of a
    qemu-storage-daemon export of the raw image (node ``disk0``); ``extra`` goes on qsd's
    command line (e.g. ``qmp_args(path)``); ``discard=True`` passes the guest's discards to
    the file (without it qsd still offers DISCARD but completes it without touching the file).
    Ready once the socket listens: no probe connection (``unix_listening`` says why)."""
    launcher = _Launcher(request, tmp_path)
    yield lambda image, *extra, num_queues=1, discard=False: launcher.start(
        "qsd", lambda sock: qsd_command(image, sock, *extra, queues=num_queues, discard=discard),
        connect=False)
    launcher.stop_all()


@pytest.fixture
def vblk_server(request: pytest.FixtureRequest, tmp_path: Path):
    """vblk_server(image, *args) -> socket path of ``python -m vblk.cli serve IMAGE ... ARGS``,
    started with the environment of the moment (a test's monkeypatch.setenv("VBLK_...") counts)."""
    launcher = _Launcher(request, tmp_path)

    def start(image, *args):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return launcher.start("vblk", lambda sock: vblk_command(image, sock, *args), cwd=REPO,
                              env=env)
    yield start
    launcher.stop_all()


@pytest.fixture
def launch(request: pytest.FixtureRequest, tmp_path: Path):
    """launch(what, make_cmd) -> socket path of any server, ``make_cmd(sock)`` its argv."""
    launcher = _Launcher(request, tmp_path)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(params=BACKENDS)
def backend_server(request: pytest.FixtureRequest) -> Callable[[str | os.PathLike], Server]:
    """backend_server(image) -> socket path, once per backend in BACKENDS."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in item.stash.get(_SERVERS, []):
            status = server.proc.poll()
            state = "running" if status is None else f"exited with {status}"
            report.sections.append((f"{server.what} log ({state}, {server.log_path})", server.log()))


# --- Ceph: a throwaway single-node cluster for the RBD tests (vblk/testing/ceph.py) -----------
# ceph_cluster: one per test process (each xdist worker its own), started by the first test that
# asks for it, killed at the end of the session; tests share it and use an image of their own
# (rbd_image). ceph_cluster_private: a cluster for one test, for tests that kill or freeze
# daemons. Missing Ceph binaries FAIL these fixtures (a skipped RBD test would hide that RBD
# is untested). VBLK_CEPH_KEEP=1 keeps the clusters' directories (logs) after the tests.

def _start_ceph_cluster(store: str, what: str, auth: str = "none"):
    from vblk.testing.ceph import INSTALL_HINT, CephCluster, CephError, missing_binaries
    missing = missing_binaries()
    if missing:
        pytest.fail(f"{what}: Ceph is not installed (missing {', '.join(missing)}); "
                    f"install it: {INSTALL_HINT}", pytrace=False)
    try:
        return CephCluster.start(store=store, auth=auth)
    except CephError as exc:
        pytest.fail(f"{what}: the Ceph test cluster did not start: {exc}", pytrace=False)


def _stop_ceph_cluster(cluster) -> None:
    cluster.kill_all(keep=os.environ.get("VBLK_CEPH_KEEP", "") not in ("", "0"))


@pytest.fixture(scope="session")
def ceph_cluster():
    """The session's memstore cluster (pool ``rbd``): share it, never kill its daemons, write
    little (memstore keeps every object in RAM); see vblk.testing.ceph."""
    cluster = _start_ceph_cluster("memstore", "ceph_cluster")
    print(f"\nceph_cluster: {cluster.directory} up in {cluster.startup_seconds:.2f} s")
    yield cluster
    _stop_ceph_cluster(cluster)


@pytest.fixture
def rbd_image(ceph_cluster, request: pytest.FixtureRequest):
    """rbd_image(size, *, features=None) -> the name of a new image in pool ``rbd`` of
    ``ceph_cluster``, unique to this test (size: bytes, or an rbd size string like "1G");
    removed after the test. An image a client still watches (e.g. one killed less than the
    watch timeout ago) cannot be removed: it is left in the throwaway cluster with a warning."""
    import re
    import uuid
    import warnings

    from vblk.testing.ceph import CephError
    made: list[str] = []
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:40]

    def make(size, *, features=None) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        ceph_cluster.create_image(name, size, features=features)
        made.append(name)
        return name

    yield make
    for name in made:
        try:
            ceph_cluster.remove_image(name, timeout=30)
        except CephError as exc:
            if "No such file" in str(exc):         # the test removed it itself
                continue
            if "watchers" not in str(exc):
                raise
            warnings.warn(f"rbd_image: {name} still has watchers, left in the cluster: {exc}",
                          stacklevel=2)


@pytest.fixture
def ceph_cluster_private(request: pytest.FixtureRequest):
    """A cluster of this test's own, killed after it. bluestore by default: its data survives
    kill_osd() + start_osd(); for memstore (faster, lost on SIGKILL):
    ``@pytest.mark.parametrize("ceph_cluster_private", ["memstore"], indirect=True)``."""
    cluster = _start_ceph_cluster(getattr(request, "param", "bluestore"), "ceph_cluster_private")
    yield cluster
    _stop_ceph_cluster(cluster)


@pytest.fixture
def ceph_cluster_cephx():
    """A memstore cluster of this test's own with cephx on (``cluster.add_user`` makes users
    and their keyrings); killed after it."""
    cluster = _start_ceph_cluster("memstore", "ceph_cluster_cephx", auth="cephx")
    yield cluster
    _stop_ceph_cluster(cluster)
