"""Add-on archives for the test guest: extra host programs, built once and cached.

The base initramfs (``vblk.lab.guest``) stays small because every guest test boots it.
A program that only some runs need -- fio for ``vblk bench --guest`` -- goes into its own
newc cpio archive, which ``run_guest(..., archives=[path])`` appends after the base archive
(the kernel unpacks concatenated archives in turn, later files over earlier ones).

Debian's fio is linked against ~64 shared libraries (rbd, rados, gluster, ...), about 85 MB,
all of which the dynamic loader maps at start-up, so the add-on carries every library ``ldd``
lists, at the path ldd gives (the guest has no ``ld.so.cache``; glibc's built-in search path
and the libraries' RUNPATHs find them there).

Cache: ``$VBLK_CACHE_DIR/guest-addons`` (else ``~/.cache/vblk/guest-addons``), beside the
guest cache, one file ``fio-<version>-<key>.cpio`` where the key hashes this builder's version,
the fio binary and the real paths of its libraries (a new fio or library version builds a new
archive; older ones are removed).  Parallel builders serialise on a file lock and the archive
is renamed into place when complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from vblk.lab.guest import GuestBuildError, _dir, _Entry, _file, _ldd_libraries, cache_root, newc_archive

__all__ = ["ADDON_BUILDER_VERSION", "FIO", "addon_cache_dir", "build_fio_addon",
           "fio_version"]

ADDON_BUILDER_VERSION = 1
FIO = "/usr/bin/fio"


def addon_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where add-on archives live: ``cache_dir`` if given, else beside the guest cache."""
    return cache_root(cache_dir, "guest-addons")


def fio_version(fio: str = FIO) -> str:
    """``fio --version`` (e.g. ``fio-3.33``); GuestBuildError naming the package if missing."""
    if not Path(fio).exists():
        raise GuestBuildError(f"{fio} missing: apt-get install fio")
    out = subprocess.run([fio, "--version"], capture_output=True, text=True, timeout=30)
    version = out.stdout.strip()
    if out.returncode != 0 or not version:
        raise GuestBuildError(f"{fio} --version failed: {out.stderr.strip()}")
    return version


def _program_entries(program: str, guest_path: str) -> tuple[list[_Entry], list[str]]:
    """Archive entries for ``program`` at ``guest_path`` and every library it loads, with the
    directories that hold them; also the libraries' real host paths (for the cache key)."""
    files: dict[str, tuple[str, int]] = {guest_path: (program, 0o755)}
    real: list[str] = []
    for lib in _ldd_libraries(program):
        files[lib.lstrip("/")] = (os.path.realpath(lib), 0o755)
        real.append(os.path.realpath(lib))
    dirs: set[str] = set()
    entries: list[_Entry] = []
    for name in sorted(files):
        parent, chain = os.path.dirname(name), []
        while parent and parent not in dirs:
            chain.append(parent)
            dirs.add(parent)
            parent = os.path.dirname(parent)
        entries += [_dir(d) for d in reversed(chain)]
        src, perm = files[name]
        entries.append(_file(name, Path(src).read_bytes(), perm))
    return entries, sorted(real)


def _fio_key(fio: str, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"addon-builder={ADDON_BUILDER_VERSION}\n{version}\n".encode())
    h.update(Path(fio).read_bytes())
    for lib in _ldd_libraries(fio):
        h.update(os.path.realpath(lib).encode() + b"\n")
    return h.hexdigest()[:12]


def build_fio_addon(cache_dir: str | os.PathLike | None = None, *, fio: str = FIO,
                    rebuild: bool = False) -> Path:
    """The fio add-on archive (``/usr/bin/fio`` and its libraries), built on first use."""
    version = fio_version(fio)
    root = addon_cache_dir(cache_dir)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", version)
    final = root / f"{safe}-{_fio_key(fio, version)}.cpio"
    if final.is_file() and not rebuild:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if final.is_file() and not rebuild:
            return final
        entries, _libs = _program_entries(fio, "usr/bin/fio")
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".cpio", dir=root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(newc_archive(entries))
            os.chmod(tmp, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
            os.rename(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        for old in root.glob("fio-*.cpio"):
            if old != final:
                old.unlink(missing_ok=True)
        for stale in root.glob(".build-*.cpio"):       # left by a builder that was killed
            if time.time() - stale.stat().st_mtime > 3600:
                stale.unlink(missing_ok=True)
        return final
