"""The RBD side of ``vblk bench --compare rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=USER]``.

``RbdSource.check`` reads the spec and asks the cluster about the image (``rbd info``) before
anything is created: a bad spec, an unknown pool or image, an unreachable cluster is a
BenchError (one line, exit status 2). ``image_copies`` makes the two copies the backends
serve, in the source's pool (``rbd cp``: the head's data, the source's features and object
size, holes kept), named after the source with a suffix unique to the run, and removes them
afterwards unless told to keep them. ``RbdSource.vblk_token`` and ``qsd_blockdev`` are how
vblk and qemu-storage-daemon name a copy (same pool, conf and user). Every ``rbd`` command
runs with a timeout and its failure names the command and rbd's own last line.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from vblk.backing.rbd_spec import RbdSpec, is_rbd, parse_rbd
from vblk.errors import ConfigError
from vblk.lab.workload import BenchError
from vblk.testing.frontend import BackendError
from vblk.units import MiB

COMMAND_TIMEOUT = 60.0           # rbd info, du, rm
CONNECT_TIMEOUT = 10             # seconds to reach the monitors (client_mount_timeout)
COPY_RATE = 20 * MiB             # bytes/s a copy is allowed at least, for its timeout
REMOVE_PATIENCE = 45.0           # a killed client's watch holds an image this long at most


class RbdToolError(BackendError):
    """An ``rbd`` command failed or hung during a run (exit status 1)."""


def last_words(stderr: str) -> str:
    """rbd's own message from its stderr: the last ``rbd: ...`` line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("rbd:")]
    return (said or lines or ["(no output)"])[-1]


def _escape(text: str, separators: str = ":") -> str:
    """A part of an ``rbd:`` token with rbd_spec's separators escaped (an option's value:
    ``:``; the pool and the image: ``:@/`` too)."""
    for ch in "\\" + separators:
        text = text.replace(ch, "\\" + ch)
    return text


def _qsd_value(text: str) -> str:
    return text.replace(",", ",,")


@dataclass(frozen=True)
class RbdSource:
    """The image to copy, as the cluster described it."""
    spec: RbdSpec
    size: int
    used: int | None                 # bytes allocated (None: not known cheaply)
    features: tuple[str, ...]

    @classmethod
    def check(cls, token: str, what: str = "--compare") -> RbdSource:
        """The spec read and the image found (BenchError, before anything is created)."""
        if "," in token:
            raise BenchError(f"{what} {token}: no ACRN options here; give vblk's options "
                             "with --vblk-args and the cache mode with --cache")
        try:
            spec = parse_rbd(token)
        except ConfigError as exc:
            raise BenchError(f"{what}: {exc}") from None
        if spec.options:
            key = spec.options[0][0]
            raise BenchError(f"{what} {token}: the Ceph option {key}= cannot be given to "
                             "qemu-storage-daemon's rbd driver; put it in the conf file")
        if shutil.which("rbd") is None:
            raise BenchError(f"{what} {token} needs the rbd command (apt-get install ceph-common)")
        source = cls(spec, 0, None, ())
        try:
            info = json.loads(source.rbd("info", "--format", "json", spec.name))
        except RbdToolError as exc:
            raise BenchError(f"{what} {spec.name}: {exc}") from None
        except ValueError:
            raise BenchError(f"{what} {spec.name}: rbd info gave no JSON") from None
        features = tuple(info.get("features", ()))
        return cls(spec, int(info["size"]), source._used(features), features)

    def _used(self, features: Sequence[str]) -> int | None:
        """Bytes allocated in the image's head, when fast-diff answers at once (without it
        rbd du reads every object)."""
        if "fast-diff" not in features or self.spec.snap:
            return None
        try:
            out = json.loads(self.rbd("du", "--format", "json", self.spec.name))
            return sum(int(i["used_size"]) for i in out["images"] if i["name"] == self.spec.image)
        except (RbdToolError, ValueError, KeyError, TypeError):
            return None

    def rbd_argv(self, *args: str) -> list[str]:
        """``rbd`` with this source's conf and user, and a bounded connect."""
        argv = ["rbd", f"--client_mount_timeout={CONNECT_TIMEOUT}"]
        if self.spec.conf:
            argv += ["-c", self.spec.conf]
        if self.spec.user:
            argv += ["--id", self.spec.user]
        return [*argv, *args]

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``rbd ARGS``; its stdout, or RbdToolError with rbd's own last line."""
        argv = self.rbd_argv(*args)
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RbdToolError(f"`rbd {' '.join(args)}` did not finish within {timeout:g} s") \
                from None
        if proc.returncode != 0:
            raise RbdToolError(last_words(proc.stderr))
        return proc.stdout

    def copy_name(self, run: str, backend: str) -> str:
        return f"{self.spec.image}.bench-{run}-{backend}"

    def vblk_token(self, image: str) -> str:
        """vblk's ``rbd:`` token for ``image`` in the source's pool, with its conf and user."""
        token = f"rbd:{_escape(self.spec.pool, ':@/')}/{_escape(image, ':@/')}"
        if self.spec.conf:
            token += f":conf={_escape(self.spec.conf)}"
        if self.spec.user:
            token += f":id={_escape(self.spec.user)}"
        return token

    def qsd_blockdev(self, image: str) -> str:
        """qemu-storage-daemon's ``--blockdev`` for ``image`` as node ``disk0``, librbd's cache
        off (``cache.direct=on`` is QEMU's rbd_cache=false, as vblk's)."""
        parts = ["driver=rbd", f"pool={_qsd_value(self.spec.pool)}",
                 f"image={_qsd_value(image)}"]
        if self.spec.conf:
            parts.append(f"conf={_qsd_value(self.spec.conf)}")
        if self.spec.user:
            parts.append(f"user={_qsd_value(self.spec.user)}")
        return ",".join([*parts, "node-name=disk0", "cache.direct=on"])

    def sparse_note(self) -> str | None:
        """A warning when much of the image was never written: a librbd that holds the
        exclusive lock has the object map loaded and answers reads of objects that do not
        exist with zeros, without the OSDs. vblk takes the lock at start, qsd at its first
        write: such reads compare nothing of the cluster, and not alike."""
        if self.used is None or self.used >= 0.99 * self.size:
            return None
        return (f"{self.spec.name} is {self.used / self.size:.0%} allocated: whoever holds the "
                "exclusive lock (vblk from the start, qsd after its first write) reads the rest "
                "as zeros without the OSDs; fill the image (rbd import of random data) for a "
                "fair read benchmark")

    def describe(self) -> str:
        used = "" if self.used is None else f", {self.used / MiB:,.0f} MiB allocated"
        return f"{self.spec.name} ({self.size / MiB:,.0f} MiB{used})"


def is_rbd_image(image: object) -> bool:
    return isinstance(image, str) and is_rbd(image)


@contextlib.contextmanager
def image_copies(source: RbdSource, backends: Sequence[str], *, keep: bool = False,
                 say: Callable[[str], None] = lambda msg: None) -> Iterator[dict[str, str]]:
    """Copy the source once per backend into its pool; yields backend -> image name. On exit
    (after the clients have closed them) remove every copy made, unless ``keep``."""
    run = uuid.uuid4().hex[:8]
    names = {b: source.copy_name(run, b) for b in backends}
    made: list[str] = []
    timeout = COMMAND_TIMEOUT + source.size / COPY_RATE
    try:
        say(f"copying {source.describe()} to {', '.join(names.values())}")
        for name in names.values():
            made.append(name)        # a copy cut short by Ctrl-C is removed too
            source.rbd("cp", "--no-progress", source.spec.name, f"{source.spec.pool}/{name}",
                       timeout=timeout)
        yield names
    finally:
        if keep:
            say(f"kept the copies {', '.join(f'{source.spec.pool}/{n}' for n in made)}")
        else:
            remove_copies(source, made)


def remove_copies(source: RbdSource, names: Sequence[str]) -> list[str]:
    """``rbd rm`` each image, waiting out a lingering watch; returns (and reports on stderr)
    the ones left behind."""
    left = []
    for name in names:
        spec = f"{source.spec.pool}/{name}"
        deadline = time.monotonic() + REMOVE_PATIENCE
        while True:
            try:
                source.rbd("rm", "--no-progress", spec)
                break
            except RbdToolError as exc:
                if "No such file" in str(exc):
                    break
                if "watchers" in str(exc) and time.monotonic() < deadline:
                    time.sleep(1.0)
                    continue
                left.append(name)
                print(f"vblk bench: could not remove the copy {spec}: {exc}; remove it with "
                      f"`{' '.join(source.rbd_argv('rm', spec))}`", file=sys.stderr, flush=True)
                break
    return left
