"""A throwaway single-node Ceph cluster for tests: one monitor, one OSD, a pool ``rbd``.

What runs
    ``ceph-mon`` (mon.a) and ``ceph-osd`` (osd.0), each in the foreground (``-f``) as a child
    of the process that called :meth:`CephCluster.start`, in its own session (a Ctrl-C at the
    terminal does not reach them) and with a parent-death signal (``setpriv --pdeathsig KILL``):
    if that process dies -- a crashed pytest-xdist worker -- the daemons die with it instead of
    holding hundreds of MiB. No ceph-mgr: RBD I/O, snapshots, ``rbd bench`` and qemu's rbd
    driver do not need one (without it ``ceph -s`` / ``ceph df`` show no pools and PG states
    are not reported). No systemd, containers or cephadm. Everything the cluster has -- config,
    mon store, OSD data, logs, pid files, admin sockets -- lives in the one directory given to
    ``start``; two clusters side by side differ only in directory and port and do not collide.

Why memstore, and when bluestore
    ``osd objectstore = memstore`` keeps every object in the OSD's RAM: a usable pool exists
    ~0.7 s after ``start`` (bluestore on a sparse file in the directory: ~1.05 s), and 4 KiB
    random writes run ~2x faster (rbd bench, 16 threads: ~15.9k vs ~7.5k IOPS; reads 22k vs
    17k). The price is durability. memstore writes its objects to the data directory only when
    it unmounts -- at mkfs and at a clean shutdown -- and loads them at start. Measured with
    ``kill_osd`` / ``stop_osd`` / ``start_osd``:

    * ``stop_osd()`` (SIGTERM; the cluster sets ``osd fast shutdown = false``, or the OSD
      would just exit) saves the objects, and ``start_osd()`` loads them: the data survives a
      clean restart.
    * ``kill_osd()`` (SIGKILL) loses everything written since the last save. An OSD that was
      never stopped cleanly restarts with its mkfs-time store: it boots and is marked ``up``
      but holds no placement groups, the monitor does not create them again, and every I/O on
      the pool blocks for good (``rbd ls`` still hung after 15 s). One stopped cleanly before
      restarts with that older state and serves it silently (an image made since is gone).
      So ``start_osd()`` after ``kill_osd()`` on memstore raises CephError instead.
    * ``store="bluestore"`` survives SIGKILL as a real disk does: acknowledged writes are
      there after ``start_osd()`` (back up in ~0.8 s).

    Use memstore (the default; the shared ``ceph_cluster`` fixture) for everything that does
    not SIGKILL the OSD, and write little there (RAM). Use bluestore (``ceph_cluster_private``'s
    default) for tests that SIGKILL the OSD and look at the data afterwards.

Settings that matter, and why (see ``_CONF``)
    * paxos timing: by default the monitor commits map changes at most once a second, and
      bring-up (osd new, boot, pool create, pool init) takes ~7 s; ``paxos propose interval =
      0.05`` and ``paxos min wait = 0.01`` bring it to ~1.2 s. The OSD's mkfs runs while the
      monitor starts (``--no-mon-config``), which makes ~0.7 s.
    * bluestore: ``bdev aio poll ms = 10`` (250 ms by default: each of the ~10 block-device
      closes in mkfs and boot waits for one poll, 3.6 s -> 1.05 s); its cache is capped at
      128 MiB (``osd memory target`` has a 896 MiB floor and does nothing for memstore).
    * memstore page set: by default memstore keeps each write's network buffers (~70 KiB pinned
      per 4 KiB write, 1.4 GB RSS after 64 MiB of random writes); ``memstore page set = true``
      with 4 KiB pages copies writes into pages instead (~300 MiB for the same).
    * PG log: ``osd min/max pg log entries = 100``: a single OSD has nobody to recover from, and
      the default log (thousands of entries per PG, each holding its op) doubles the OSD's RSS.
    * watch timeout: a client killed while holding an image's exclusive lock keeps it until its
      watch times out (30 s by default): the next writer's first write stalls that long.
      ``osd client watch timeout = 10`` makes it 10 s (``rbd lock rm`` clears it at once).
    * no auth (``auth * required = none``): no keys to hand to clients; ``auth allow insecure
      global id reclaim = false`` or health stays WARN.
    * one replica: pool size 1 / min size 1, ``mon allow pool size one``, crush chooseleaf type
      0 (the OSD is its own failure domain), no-redundancy warning off.
    * network: msgr2 only, the monitor on 127.0.0.1 and a port that was free when the cluster
      started (if another process takes it first, the monitor cannot bind and start tries a new
      port); the OSD binds its own free ports in 6800-7300. Nothing listens outside loopback.
    * clients: one shared ``log file`` (log/client.log) and no admin socket (``admin socket =``
      empty) in ``[client]``: otherwise every rbd/qemu/librbd client would try to create the
      same ``client.admin.asok``.

Every wait is bounded: each step has a deadline, a daemon that exits is noticed at once, and a
failure raises :class:`CephError` naming the step with the tail of the log that explains it.
The cluster is killed with SIGKILL (a throwaway cluster needs no clean shutdown, and memstore
would dump all its data to disk on SIGTERM); stop RBD clients (qemu-storage-daemon, librbd
users) before the cluster, or they hang closing their images.

Manual use::

    python -m vblk.testing.ceph up /tmp/c      # prints: export CEPH_CONF=/tmp/c/ceph.conf
    python -m vblk.testing.ceph down /tmp/c    # SIGKILL the daemons, remove /tmp/c (--keep)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Self

from vblk.errors import VblkError

PACKAGES = ("ceph-mon", "ceph-osd", "ceph-common", "librbd1", "python3-rbd", "python3-rados",
            "qemu-block-extra", "uuid-runtime")
BINARIES = ("ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool", "setpriv")
INSTALL_HINT = ("apt-get install -y --no-install-recommends " + " ".join(PACKAGES)
                + " util-linux  (scripts/setup and .ci/run install them)")
STORES = ("memstore", "bluestore")

START_TIMEOUT = 60.0        # the whole of start(); each step gets what is left
COMMAND_TIMEOUT = 60.0      # one rbd/ceph command
OSD_UP_TIMEOUT = 30.0
KILL_TIMEOUT = 10.0
_SUN_PATH_MAX = 107         # bytes in sockaddr_un.sun_path, without the NUL

AUTH_MODES = ("none", "cephx")
# keys made for a cephx cluster beside mon.'s: the admin (the CLIs) and the OSD
_CEPHX_KEYS = (
    ("client.admin", ("--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
                      "allow *")),
    ("osd.0", ("--cap", "mon", "allow profile osd", "--cap", "osd", "allow *", "--cap", "mgr",
               "allow profile osd")),
)

_CONF = """\
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{port}]
public network = 127.0.0.0/8
ms bind msgr1 = false
auth cluster required = {auth}
auth service required = {auth}
auth client required = {auth}
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
run dir = {run}
admin socket = {run}/$name.asok
pid file = {run}/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$name
osd data = {d}/osd/$name
crash dir = {d}/crash
keyring = {d}/keyring
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# no ceph-mgr here on purpose (RBD needs none); the monitor reports HEALTH_WARN "no active
# mgr" once a cluster with OSDs is older than mon_mgr_mkfs_grace (120 s) and has never had a
# mgr (MgrMonitor::should_warn_about_mgr_down): a year here
mon mgr mkfs grace = 31536000
mon data avail warn = 1
mon data avail crit = 0
mon osd full ratio = 0.99
mon osd backfillfull ratio = 0.99
mon osd nearfull ratio = 0.99
osd failsafe full ratio = 0.995
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = {store}
memstore device bytes = 4294967296
# copy writes into 4 KiB pages; the default (bufferlists) pins ~70 KiB of messenger buffer
# per 4 KiB write
memstore page set = true
memstore page size = 4096
bluestore block path = {d}/osd/block
bluestore block create = true
bluestore block size = 10737418240
bluestore fsck on mkfs = false
bluestore fsck on mount = false
# the aio thread polls every 250 ms by default and each of the ~10 bdev closes during mkfs and
# boot waits for it: 10 ms takes bluestore's start-up from ~3.6 s to ~1.3 s
bdev aio poll ms = 10
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
# one OSD, nobody to recover from: a short PG log halves the OSD's RSS under writes
osd min pg log entries = 100
osd max pg log entries = 100
osd pg log trim min = 10
# a client killed holding an image's exclusive lock keeps it until its watch times out
# (30 s by default); the next writer stalls that long
osd client watch timeout = 10
osd op num shards = 2
# SIGTERM (stop_osd) unmounts the store, so memstore saves its objects to disk; the default
# fast shutdown just exits and memstore loses them
osd fast shutdown = false
osd op num threads per shard = 1
# commit map changes every 50 ms instead of every second (osd new, boot, pool create, snaps)
paxos propose interval = 0.05
paxos min wait = 0.01
{extra}
[mon]
# a monitor whose port was taken fails at once (start picks another port) instead of
# retrying the bind for 15 s
ms bind retry count = 1
[client]
# one shared log and no per-client admin socket (they would collide on client.admin.asok)
log file = {d}/log/client.log
admin socket =
"""


class CephError(VblkError):
    """The test cluster failed: a step of start-up, a daemon, or an rbd/ceph command. The
    message names what failed and carries the tail of the log that says why."""


def missing_binaries() -> list[str]:
    """The Ceph (and util-linux) programs this module needs that are not on PATH."""
    return [b for b in BINARIES if shutil.which(b) is None]


def require_binaries() -> None:
    missing = missing_binaries()
    if missing:
        raise CephError(f"Ceph is not installed (missing {', '.join(missing)}); "
                        f"install it: {INSTALL_HINT}")


def _tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log; for a daemon that crashed, the lines before its dump
    of recent events (the assertion or signal and the backtrace), not the dump."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = text.split("--- begin dump of recent events ---", 1)[0]
    if not text.strip():
        return ""
    return f"--- {path} (last {lines} lines):\n" + "\n".join(text.splitlines()[-lines:])


def _excerpt(output: bytes | str | None, head: int = 12, tail: int = 8) -> str:
    """A command's output, its middle left out when long (an assert comes first, a
    backtrace after)."""
    if not output:
        return ""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    rows = text.rstrip().splitlines()
    if len(rows) > head + tail + 1:
        rows = rows[:head] + [f"[... {len(rows) - head - tail} lines ...]"] + rows[-tail:]
    return "\n".join(rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie awaiting its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class CephCluster:
    """One monitor (mon.a) and one OSD (osd.0) in ``directory``; see the module docstring.

    Start with :meth:`start`; ``conf`` / ``env`` point clients at it; :meth:`rbd` and
    :meth:`ceph` run the CLIs against it; :meth:`kill_osd` / :meth:`stop_osd` /
    :meth:`start_osd` / :meth:`freeze` / :meth:`thaw` inject faults; :meth:`stop` kills it all
    and removes the directory.
    """

    def __init__(self, directory: str | os.PathLike, *, store: str = "memstore",
                 tie_to_parent: bool = True, auth: str = "none") -> None:
        """A cluster not started yet: use :meth:`start`."""
        self.directory = Path(directory).absolute()
        self.store = store
        self.auth = auth
        self.tie_to_parent = tie_to_parent
        self.port = 0
        self.fsid = ""
        self.run_dir = self.directory / "run"
        self.osd_id = 0
        self.osd_uuid = ""
        #: (step, seconds since start began) at the end of each step of start-up, in order
        self.timings: list[tuple[str, float]] = []
        #: seconds from start() to pool rbd initialised
        self.startup_seconds = 0.0
        self._procs: dict[str, subprocess.Popen] = {}
        self._memstore_lost = False     # a memstore OSD was SIGKILLed: its objects are gone
        self._t0 = time.monotonic()

    # ---------------------------------------------------------------- start-up

    @classmethod
    def start(cls, directory: str | os.PathLike | None = None, *, store: str = "memstore",
              timeout: float = START_TIMEOUT, extra_conf: str = "",
              tie_to_parent: bool = True, auth: str = "none") -> CephCluster:
        """Start a cluster in ``directory`` (created if missing, must be empty; a fresh
        ``/tmp/vblk-ceph-*`` if None) and return it once pool ``rbd`` is initialised.

        ``store``: "memstore" (RAM, fast, lost on SIGKILL) or "bluestore" (file, survives).
        ``extra_conf``: lines appended to ``[global]``. ``tie_to_parent``: the daemons get
        SIGKILL when the thread that started them exits (False for ``up`` on the command line).
        ``auth``: "none", or "cephx" (client.admin's key in ``keyring``, which ceph.conf names;
        :meth:`add_user` makes more users).
        Raises CephError (daemons killed, directory kept for its logs) if a step fails or the
        whole takes longer than ``timeout`` seconds.
        """
        require_binaries()
        if store not in STORES:
            raise CephError(f"store must be one of {', '.join(STORES)}, not {store!r}")
        if auth not in AUTH_MODES:
            raise CephError(f"auth must be one of {', '.join(AUTH_MODES)}, not {auth!r}")
        if directory is None:
            directory = tempfile.mkdtemp(prefix="vblk-ceph-", dir="/tmp")
        cluster = cls(directory, store=store, tie_to_parent=tie_to_parent, auth=auth)
        d = cluster.directory
        d.mkdir(parents=True, exist_ok=True)
        if any(d.iterdir()):
            raise CephError(f"{d} is not empty; a cluster needs a directory of its own")
        if len(os.fsencode(cluster.run_dir / "osd.0.asok")) > _SUN_PATH_MAX:
            # admin sockets are Unix sockets: a deep directory (pytest's tmp_path) gets its
            # run/ under /tmp, removed with the cluster
            cluster.run_dir = Path(tempfile.mkdtemp(prefix="vblk-ceph-run-", dir="/tmp"))
            (d / "run").symlink_to(cluster.run_dir)
        cluster._t0 = time.monotonic()
        deadline = cluster._t0 + timeout
        for attempt in range(1, 4):  # noqa: B007 (named in the error after the loop)
            try:
                cluster._bring_up(deadline, extra_conf)
                return cluster
            except _PortTaken:
                # another process bound the port between _free_port and the monitor: again
                cluster._reset()
            except BaseException:
                cluster.kill_all(keep=True)
                raise
        raise CephError(f"the monitor could not bind its port in {attempt} attempts (each "
                        f"port was free a moment before); logs in {d}/log")

    def _reset(self) -> None:
        """Kill what a failed start left running and empty the directory (but run/)."""
        self.kill_all(keep=True)
        for child in self.directory.iterdir():
            if child.name == "run":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for child in self.run_dir.iterdir():
            child.unlink()
        self._procs.clear()
        self._mark(f"port {self.port} taken, again")

    def _bring_up(self, deadline: float, extra_conf: str) -> None:
        d = self.directory
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        for sub in ("mon", "osd", "log", "crash"):
            (d / sub).mkdir(exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        self.conf.write_text(_CONF.format(fsid=self.fsid, port=self.port, d=d, run=self.run_dir,
                                          store=self.store, auth=self.auth,
                                          extra=extra_conf))
        # The OSD's mkfs needs nothing from the monitor (--no-mon-config: all settings are in
        # ceph.conf): it runs while the monitor is made and started.
        self.osd_uuid = str(uuid.uuid4())
        osd = f"osd.{self.osd_id}"
        # memstore and bluestore both assert in mkfs unless the data directory exists
        (d / "osd" / osd).mkdir()
        mkfs = subprocess.Popen(["ceph-osd", "-c", str(self.conf), "-i", str(self.osd_id),
                                 "--mkfs", "--no-mon-config", "--osd-uuid", self.osd_uuid],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=self.env)
        try:
            # without auth the keyring only feeds ceph-mon --mkfs; with cephx it also holds
            # the admin's and the OSD's keys, which the monitor's mkfs imports with their caps
            # (ceph.conf names it for every daemon and client). monmaptool bakes in the port.
            keyring = str(d / "keyring")
            self._run_step("keyring", ["ceph-authtool", "--create-keyring", keyring,
                                       "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"],
                           deadline, logs=())
            if self.auth == "cephx":
                for name, caps in _CEPHX_KEYS:
                    self._run_step(f"key {name}", ["ceph-authtool", keyring, "--gen-key", "-n",
                                                   name, *caps], deadline, logs=())
            self._run_step("monmap", ["monmaptool", "--create", "--fsid", self.fsid, "--addv",
                                      "a", f"[v2:127.0.0.1:{self.port}]", str(d / "monmap")],
                           deadline, logs=())
            self._run_step("mon mkfs", ["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs",
                                        "--monmap", str(d / "monmap"), "--keyring",
                                        str(d / "keyring")], deadline,
                           logs=[d / "log/mon.a.log"])
            self._spawn("mon.a", ["ceph-mon", "-c", str(self.conf), "-i", "a", "-f"])
            # the first command waits for the monitor; a monitor that could not bind exits
            out = self._client_step("mon up, osd new",
                                    ["ceph", "osd", "new", self.osd_uuid, str(self.osd_id)],
                                    deadline, daemons=("mon.a",))
            if out.strip() != str(self.osd_id):
                raise CephError(f"`ceph osd new` printed {out!r}, not {self.osd_id}")
            try:
                mkfs_out, _ = mkfs.communicate(timeout=self._left(deadline, "osd mkfs"))
            except subprocess.TimeoutExpired:
                raise CephError(self._explain("osd mkfs: `ceph-osd --mkfs` timed out", b"",
                                              [d / f"log/{osd}.log"])) from None
            if mkfs.returncode != 0:
                raise CephError(self._explain(f"osd mkfs: `ceph-osd --mkfs` exited with status "
                                              f"{mkfs.returncode}", mkfs_out,
                                              [d / f"log/{osd}.log"]))
            self._mark("osd mkfs")
        finally:
            if mkfs.poll() is None:
                mkfs.kill()
                mkfs.wait()
        self._spawn(osd, self._osd_argv())
        # created while the OSD boots; size 1 comes from 'osd pool default size'
        self._client_step("pool create", ["ceph", "osd", "pool", "create", "rbd", "8", "8"],
                          deadline, daemons=("mon.a", osd))
        self._wait_osd_up(deadline, after_epoch=0)
        self._mark("osd up")
        self._client_step("pool init", ["rbd", "pool", "init", "rbd"], deadline,
                          daemons=("mon.a", osd))
        self.startup_seconds = time.monotonic() - self._t0

    def _osd_argv(self) -> list[str]:
        return ["ceph-osd", "-c", str(self.conf), "-i", str(self.osd_id), "-f"]

    def _mark(self, step: str) -> None:
        self.timings.append((step, round(time.monotonic() - self._t0, 3)))

    def _left(self, deadline: float, step: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CephError(f"ceph start-up ran out of time before {step!r} "
                            f"(steps so far: {self.timings}); logs in {self.directory}/log")
        return left

    def _run_step(self, step: str, argv: Sequence[str], deadline: float, *,
                  logs: Iterable[Path]) -> None:
        try:
            proc = subprocess.run(list(argv), check=False, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  timeout=self._left(deadline, step), env=self.env)
        except subprocess.TimeoutExpired as exc:
            raise CephError(self._explain(f"{step}: `{' '.join(argv)}` timed out", exc.stdout,
                                          logs)) from None
        if proc.returncode != 0:
            raise CephError(self._explain(f"{step}: `{' '.join(argv)}` exited with status "
                                          f"{proc.returncode}", proc.stdout, logs))
        self._mark(step)

    def _client_step(self, step: str, argv: Sequence[str], deadline: float, *,
                     daemons: Sequence[str]) -> str:
        """Run a client command that needs ``daemons``; fail early if one of them exits."""
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env)
        try:
            while True:
                try:
                    out, err = proc.communicate(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    pass
                self._check_alive(step, daemons)
                if time.monotonic() > deadline:
                    proc.kill()
                    out, err = proc.communicate()
                    raise CephError(self._explain(f"{step}: `{' '.join(argv)}` did not finish "
                                                  "in time", err, self._logs(daemons)))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            if "mon.a" in daemons and self._port_taken():
                raise _PortTaken()
            raise CephError(self._explain(f"{step}: `{' '.join(argv)}` exited with status "
                                          f"{proc.returncode}", err, self._logs(daemons)))
        self._mark(step)
        return out.decode(errors="replace")

    def _check_alive(self, step: str, daemons: Sequence[str]) -> None:
        for name in daemons:
            proc = self._procs.get(name)
            if proc is not None and proc.poll() is not None:
                if name == "mon.a" and self._port_taken():
                    raise _PortTaken()
                raise CephError(self._explain(f"{step}: {name} exited with status "
                                              f"{proc.returncode}", b"", self._logs([name])))

    def _port_taken(self) -> bool:
        return "Address already in use" in _tail(self.directory / "log/mon.a.log", 50)

    def _logs(self, daemons: Iterable[str]) -> list[Path]:
        log = self.directory / "log"
        return [p for name in daemons for p in (log / f"{name}.out", log / f"{name}.log")] \
            + [log / "client.log"]

    def _explain(self, what: str, stderr: bytes | None, logs: Iterable[Path]) -> str:
        parts = [what]
        if stderr:
            parts.append("output:\n" + _excerpt(stderr))
        parts += filter(None, (_tail(p) for p in logs))
        parts.append(f"(cluster directory: {self.directory})")
        return "\n".join(parts)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        if self.tie_to_parent:
            # the daemon dies with the thread that started it (setpriv execs, same pid)
            argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self._procs[name] = proc
        (self.run_dir / f"{name}.fgpid").write_text(f"{proc.pid}\n")
        return proc

    def _wait_osd_up(self, deadline: float, *, after_epoch: int) -> dict:
        """Wait until the monitor's map has our OSD up since an epoch after ``after_epoch``."""
        osd = f"osd.{self.osd_id}"
        t0 = time.monotonic()
        while True:
            self._check_alive(f"wait for {osd} up", ("mon.a", osd))
            left = deadline - time.monotonic()
            if left <= 0:
                raise CephError(self._explain(
                    f"{osd} was not up in the monitor's map after {time.monotonic() - t0:.1f} s",
                    b"", self._logs(["mon.a", osd])))
            info = self._osd_dump_entry(min(left, 10.0))
            if info and info["up"] and info["up_from"] > after_epoch:
                return info
            time.sleep(0.05)

    def _osd_dump_entry(self, timeout: float) -> dict | None:
        try:
            proc = subprocess.run(["ceph", "--connect-timeout", str(max(1, int(timeout))),
                                   "osd", "dump", "--format", "json"], check=False,
                                  stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0:
            return None
        for entry in json.loads(proc.stdout)["osds"]:
            if entry["osd"] == self.osd_id:
                return entry
        return None

    # ------------------------------------------------------------- clients

    @property
    def conf(self) -> Path:
        """The cluster's ceph.conf (``-c``/``CEPH_CONF`` for clients, ``conf=`` for qemu)."""
        return self.directory / "ceph.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with CEPH_CONF pointing at the cluster, for Popen."""
        return dict(os.environ, CEPH_CONF=str(self.conf))

    def _command(self, argv: list[str], timeout: float, input: bytes | None = None) -> bytes:
        try:
            proc = subprocess.run(argv, check=False, input=input, capture_output=True,
                                  timeout=timeout, env=self.env,
                                  stdin=None if input is not None
                                  else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise CephError(self._explain(f"`{' '.join(argv)}` did not finish in {timeout} s",
                                          exc.stderr, [self.directory / "log/client.log"])) \
                from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            raise CephError(f"`{' '.join(argv)}` exited with status {proc.returncode}: {err}")
        return proc.stdout

    def rbd(self, *args: str | os.PathLike, timeout: float = COMMAND_TIMEOUT,
            input: bytes | None = None) -> str:
        """Run ``rbd ARGS`` against the cluster; its stdout. CephError (with stderr) if it
        fails or takes longer than ``timeout``."""
        return self._command(["rbd", *map(os.fspath, args)], timeout, input).decode(
            errors="replace")

    def ceph(self, *args: str | os.PathLike, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``ceph ARGS`` against the cluster; its stdout. CephError if it fails."""
        return self._command(["ceph", *map(os.fspath, args)], timeout).decode(errors="replace")

    def create_pool(self, name: str, pg_num: int = 8) -> None:
        """Create a replicated pool (size 1) and ``rbd pool init`` it."""
        self.ceph("osd", "pool", "create", name, str(pg_num), str(pg_num))
        self.rbd("pool", "init", name)

    def create_image(self, name: str, size: int | str, *,
                     features: str | Iterable[str] | None = None, pool: str = "rbd") -> str:
        """Create ``pool/name`` of ``size`` bytes (an int) or an rbd size string ("1G"; a
        bare number in a string means MiB to rbd). ``features``: None for rbd's default
        (layering, exclusive-lock, object-map, fast-diff, deep-flatten), else the features to
        enable, e.g. ``["layering"]``; an empty list means none. Returns "pool/name"."""
        spec = f"{pool}/{name}"
        args = ["create", "--size", f"{size}B" if isinstance(size, int) else size]
        if features is not None:
            if isinstance(features, str):
                features = features.split(",")
            features = [f for f in features if f]
            if features:
                args += ["--image-feature", ",".join(features)]
            else:
                args += ["--rbd-default-features", "0"]
        self.rbd(*args, spec)
        return spec

    def remove_image(self, name: str, *, pool: str = "rbd",
                     timeout: float = COMMAND_TIMEOUT) -> None:
        """``rbd rm``; fails (CephError "image still has watchers") while a client has it open,
        including a killed one until its watch times out (10 s here)."""
        self.rbd("rm", "--no-progress", f"{pool}/{name}", timeout=timeout)

    def image_info(self, name: str, *, pool: str = "rbd") -> dict:
        """``rbd info --format json``: size, features, object size, ..."""
        return json.loads(self.rbd("info", "--format", "json", f"{pool}/{name}"))

    def add_user(self, name: str, *caps: str) -> Path:
        """A cephx user ``client.NAME`` with ``caps`` (pairs: ``"mon", "profile rbd", "osd",
        "profile rbd pool=rbd"``); its keyring file (``:keyring=PATH`` in an rbd spec)."""
        path = self.directory / f"ceph.client.{name}.keyring"
        path.write_bytes(self._command(["ceph", "auth", "get-or-create", f"client.{name}",
                                        *caps], COMMAND_TIMEOUT))
        return path

    def import_image(self, name: str, source: bytes | str | os.PathLike, *,
                     pool: str = "rbd") -> str:
        """Create ``pool/name`` from ``source`` (the bytes, or a file's path) with ``rbd
        import``; returns "pool/name"."""
        spec = f"{pool}/{name}"
        if isinstance(source, bytes):
            self.rbd("import", "--no-progress", "-", spec, input=source)
        else:
            self.rbd("import", "--no-progress", os.fspath(source), spec)
        return spec

    def export(self, name: str, path: str | os.PathLike | None = None, *,
               pool: str = "rbd") -> bytes | Path:
        """The image's contents (``rbd export``): the bytes, or written to ``path`` (returned)."""
        spec = f"{pool}/{name}"
        if path is None:
            return self._command(["rbd", "export", "--no-progress", spec, "-"], COMMAND_TIMEOUT)
        self.rbd("export", "--no-progress", spec, os.fspath(path))
        return Path(path)

    # -------------------------------------------------------------- faults

    @property
    def pids(self) -> dict[str, int]:
        """The running daemons' pids by name (mon.a, osd.0)."""
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def kill_osd(self) -> None:
        """SIGKILL the OSD and wait until it is gone (the monitor still thinks it is up: with
        one OSD nobody reports it down). With memstore its data is lost and start_osd refuses
        (module docstring); use store="bluestore" to restart after a kill."""
        name = f"osd.{self.osd_id}"
        if name in self.pids and self.store == "memstore":
            self._memstore_lost = True
        self._kill(name)

    def stop_osd(self, timeout: float = 30.0) -> None:
        """Stop the OSD cleanly (SIGTERM, wait for it to exit): memstore saves its data to
        disk first, so a later start_osd() finds it."""
        name = f"osd.{self.osd_id}"
        proc = self._procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(name)
            raise CephError(self._explain(f"{name} did not stop within {timeout} s of SIGTERM "
                                          "(killed)", b"", self._logs([name]))) from None
        (self.run_dir / f"{name}.fgpid").unlink(missing_ok=True)

    def start_osd(self, timeout: float = OSD_UP_TIMEOUT) -> float:
        """Start the same OSD again (after kill_osd/stop_osd) and wait until the monitor has it
        up in a newer map; returns the seconds that took. Peering follows: the first I/O may
        wait a moment longer."""
        name = f"osd.{self.osd_id}"
        if name in self.pids:
            raise CephError(f"{name} is running (pid {self.pids[name]}); kill or stop it first")
        if self._memstore_lost:
            raise CephError(f"{name} is a memstore OSD that was SIGKILLed: it would restart "
                            "empty, without its placement groups, and every I/O on its pools "
                            "would block; start the cluster with store='bluestore' to restart "
                            "an OSD after kill_osd(), or use stop_osd() (clean, memstore keeps "
                            "its data)")
        t0 = time.monotonic()
        before = self._osd_dump_entry(10.0)
        if before is None:
            raise CephError(self._explain("the monitor did not answer `osd dump`", b"",
                                          self._logs(["mon.a"])))
        self._spawn(name, self._osd_argv())
        self._wait_osd_up(time.monotonic() + timeout, after_epoch=before["up_from"])
        return time.monotonic() - t0

    def freeze(self) -> None:
        """SIGSTOP every daemon: the cluster stops answering while its sockets stay open, as
        with a network that drops packets (no resets, no errors: clients wait and time out).
        Not a network cut: connections still succeed (the kernel completes the handshake).
        :meth:`thaw` resumes; :meth:`stop` works on a frozen cluster."""
        for proc in self._procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT every daemon (after :meth:`freeze`)."""
        for proc in self._procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)

    def _kill(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise CephError(f"{name} (pid {proc.pid}) still there {KILL_TIMEOUT} s after "
                                "SIGKILL") from None
        (self.run_dir / f"{name}.fgpid").unlink(missing_ok=True)

    def kill_all(self, *, keep: bool = False) -> None:
        """SIGKILL every daemon, wait until they are gone, and remove the directory (unless
        ``keep``: its logs stay for a post-mortem)."""
        errors = []
        for name in list(self._procs):
            try:
                self._kill(name)
            except CephError as exc:
                errors.append(str(exc))
        if errors:
            raise CephError("; ".join(errors))
        if not keep:
            _remove(self.directory)

    stop = kill_all

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.kill_all()

    def __repr__(self) -> str:
        return (f"<CephCluster {self.directory} {self.store} port={self.port} "
                f"daemons={self.pids}>")


class _PortTaken(Exception):
    """The monitor's port was taken between choosing it and binding it."""


def _remove(directory: Path) -> None:
    run = directory / "run"
    if run.is_symlink():
        shutil.rmtree(run.resolve(), ignore_errors=True)
    shutil.rmtree(directory, ignore_errors=True)


def down(directory: str | os.PathLike, *, keep: bool = False) -> list[int]:
    """Kill the daemons of a cluster started in ``directory`` by any process (from the pid
    files in its run/), wait until they are gone and remove the directory unless ``keep``.
    Only processes whose command line names this cluster's ceph.conf are killed. Returns the
    pids killed."""
    directory = Path(directory).absolute()
    conf = str(directory / "ceph.conf")
    killed = []
    for pidfile in sorted((directory / "run").glob("*.fgpid")):
        try:
            pid = int(pidfile.read_text())
        except (OSError, ValueError):
            continue
        if conf in _cmdline(pid) and not _gone(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        pidfile.unlink(missing_ok=True)
    deadline = time.monotonic() + KILL_TIMEOUT
    while not all(_gone(p) for p in killed):
        if time.monotonic() > deadline:
            raise CephError(f"still running {KILL_TIMEOUT} s after SIGKILL: "
                            f"{[p for p in killed if not _gone(p)]}")
        time.sleep(0.02)
    if not keep:
        _remove(directory)
    return killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vblk.testing.ceph",
                                     description="A throwaway single-node Ceph cluster.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    up_p = sub.add_parser("up", help="start a cluster in DIR; prints export CEPH_CONF=...")
    up_p.add_argument("directory")
    up_p.add_argument("--store", choices=STORES, default="memstore")
    down_p = sub.add_parser("down", help="kill the cluster in DIR and remove DIR")
    down_p.add_argument("directory")
    down_p.add_argument("--keep", action="store_true", help="keep DIR (its logs)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            cluster = CephCluster.start(args.directory, store=args.store, tie_to_parent=False)
            for step, at in cluster.timings:
                print(f"# {step:<18} {at:6.2f} s", file=sys.stderr)
            print(f"export CEPH_CONF={cluster.conf}")
        else:
            down(args.directory, keep=args.keep)
    except CephError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
