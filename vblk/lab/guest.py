"""A real Linux test guest for vblk, and a QEMU runner that boots it.

The guest is Debian's stock kernel (unpacked from the ``linux-image-*`` package
that ``linux-image-amd64`` depends on, never installed) plus a small initramfs
made here: busybox-static for the shell and tools, the host's ``mke2fs`` and
``e2fsck`` with their shared libraries, and the kernel modules needed for a
virtio-blk disk with ext4 on it.  Its ``/init`` loads the modules, waits for
``/dev/vda``, runs ``/scenario.sh`` under ``sh -e`` and prints
``VBLK-GUEST-EXIT=<status>`` before powering off.

The scenario is not part of the cached image: each run appends a second,
uncompressed newc cpio archive holding ``/scenario.sh`` (and any extra files)
to the cached base archive.  The kernel unpacks concatenated archives in turn.

Public API::

    build_guest(cache_dir=None, *, rebuild=False) -> GuestImage
    run_guest(socket_path, script, *, timeout=180, memory="512M", queue_size=64,
              num_queues=1, extra_qemu_args=(), image=None, log_path=None,
              bios=None, accel=None, files=None, cmdline_extra="", smp=1,
              archives=()) -> GuestResult
    start_guest(socket_path, script, **the same but timeout) -> GuestProcess
        (returns at once: send() types into the console, wait_for() a line, wait())

Command line: ``python -m vblk.lab.guest build [--fio]`` builds (or finds) the cached
image (and the fio add-on of ``vblk.lab.guestaddon``) and prints their paths;
``python -m vblk.lab.guest run SOCK SCRIPT [--fio] [--archive CPIO]`` boots it once
against a running backend.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from vblk.errors import EXIT_FAILED, EXIT_OK, VblkError

__all__ = [
    "GEOMETRY_SCRIPT",
    "GuestBuildError",
    "GuestProcess",
    "GuestImage",
    "GuestResult",
    "LISTEN_FOR_HOST_SCRIPT",
    "VERIFY_FILES_SCRIPT",
    "assert_geometry",
    "build_guest",
    "files_script",
    "debugfs_cat",
    "default_accel",
    "default_pbs",
    "host_fsck",
    "make_image",
    "newc_archive",
    "qemu_command",
    "run_guest",
    "start_guest",
    "scenario_archive",
    "sha256_file",
    "sync_calls",
]

# Bump when the way the image is built changes in a way the hashed inputs
# below do not capture.
BUILDER_VERSION = 4

EXIT_MARKER = "VBLK-GUEST-EXIT="
START_MARKER = "VBLK-GUEST-SCENARIO-START"
ERROR_MARKER = "VBLK-GUEST-ERROR="

QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")

# Root modules to load, in this order; each one's dependencies (from the
# kernel's modules.dep) are loaded before it.  crc32c_generic is a soft
# dependency of ext4/jbd2 ("crypto-crc32c"), so it is named explicitly.
ROOT_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")

# Host binaries copied into the guest, with the names they get there.  util-linux's
# blkdiscard and fstrim replace busybox's applets: busybox's blkdiscard has no -z
# (BLKZEROOUT, which Linux sends as WRITE_ZEROES without UNMAP); util-linux's fallocate -p
# on the disk sends WRITE_ZEROES with UNMAP.
HOST_BINARIES: Mapping[str, tuple[str, ...]] = {
    "/usr/sbin/mke2fs": ("sbin/mke2fs", "sbin/mkfs.ext4", "sbin/mkfs.ext2"),
    "/usr/sbin/e2fsck": ("sbin/e2fsck", "sbin/fsck.ext4"),
    "/usr/sbin/blkdiscard": ("sbin/blkdiscard",),
    "/usr/sbin/fstrim": ("sbin/fstrim",),
    "/usr/bin/fallocate": ("usr/bin/fallocate",),
}
# The Debian package each host binary comes from (named when one is missing).
HOST_BINARY_PACKAGES: Mapping[str, str] = {
    "/usr/sbin/mke2fs": "e2fsprogs", "/usr/sbin/e2fsck": "e2fsprogs",
    "/usr/sbin/blkdiscard": "util-linux", "/usr/sbin/fstrim": "util-linux",
    "/usr/bin/fallocate": "util-linux",
}
HOST_FILES: Mapping[str, str] = {"/etc/mke2fs.conf": "etc/mke2fs.conf"}
BUSYBOX = "/bin/busybox"

DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init "
    "i8042.noaux i8042.nokbd i8042.nopnp 8250.nr_uarts=1 "
    "tsc=reliable no_timer_check noreplace-smp cryptomgr.notests "
    "random.trust_cpu=on mitigations=off"
)

INIT_TEMPLATE = r"""#!/bin/sh
# vblk test guest init (builder version @BUILDER@)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /mnt /run /root
echo "VBLK-GUEST-INIT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
for m in @MODULES@; do
    insmod "/lib/modules/@KVER@/$m.ko" || echo "VBLK-GUEST-WARN insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do
    sleep 0.05
    i=$((i + 1))
done
if [ -b /dev/vda ]; then
    echo "VBLK-GUEST-DISK uptime=$(cut -d' ' -f1 /proc/uptime)"
    echo "@START@"
    cd /root
    sh -e /scenario.sh
    status=$?
    cd /
    if [ "$status" != 0 ]; then
        echo "VBLK-GUEST-FAILED status=$status; last kernel messages:"
        dmesg | tail -n 25
    fi
else
    echo "@ERROR@no /dev/vda after 10 s"
    dmesg | tail -n 40
    status=253
fi
echo "@EXIT@$status"
timeout 20 sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"""


class GuestBuildError(VblkError):
    """The guest image could not be built (missing tool, package or kernel)."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str


@dataclasses.dataclass
class GuestResult:
    """What one boot of the test guest did.

    ``exit_status`` is the scenario's exit status as the guest reported it, or
    None when the guest never reported one (timeout, crash, QEMU failure).
    """

    exit_status: int | None
    output: str
    seconds: float
    stderr: str = ""
    qemu_returncode: int | None = None
    timed_out: bool = False
    aborted: str = ""  # why the run was cut short other than by timeout, if it was
    command: tuple[str, ...] = ()
    # (seconds since QEMU start, line) for every serial line, as read on the host.
    timed_lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    started_at: float = 0.0  # time.time() when QEMU was started
    hook_errors: list[str] = dataclasses.field(default_factory=list)  # what on_line raised

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    @property
    def scenario_output(self) -> str:
        """The serial output from the scenario start marker on (all if absent)."""
        lines = self.output.splitlines()
        for i, line in enumerate(lines):
            if line.strip() == START_MARKER:
                return "\n".join(lines[i + 1 :])
        return self.output

    @property
    def values(self) -> dict[str, str]:
        """``KEY=VALUE`` lines the scenario printed (last one wins)."""
        found: dict[str, str] = {}
        for line in self.scenario_output.splitlines():
            m = _VALUE_RE.match(line.strip())
            if m:
                found[m.group(1)] = m.group(2)
        return found

    @property
    def boot_seconds(self) -> float | None:
        """Host seconds from QEMU start until the scenario started."""
        t = self.line_time(START_MARKER)
        return t

    def line_time(self, prefix: str, exact: bool = False) -> float | None:
        """Seconds since QEMU start at which the first serial line starting with
        prefix (or equal to it, if exact) arrived on the host."""
        for t, line in self.timed_lines:
            s = line.strip()
            if s == prefix or (not exact and s.startswith(prefix)):
                return t
        return None

    def wall_time(self, prefix: str, exact: bool = False) -> float | None:
        """Like line_time, but as a time.time() value (for matching host logs)."""
        t = self.line_time(prefix, exact)
        return None if t is None else self.started_at + t

    def describe(self, tail: int = 60) -> str:
        """A readable summary for test failure messages."""
        lines = self.output.splitlines()
        shown = "\n".join(lines[-tail:])
        parts = [
            f"guest exit_status={self.exit_status} qemu_rc={self.qemu_returncode} "
            f"timed_out={self.timed_out} seconds={self.seconds:.1f}"
            + (f" aborted: {self.aborted}" if self.aborted else ""),
            f"--- serial output (last {tail} lines) ---",
            shown,
        ]
        if self.stderr.strip():
            parts += ["--- qemu stderr ---", self.stderr.strip()[-4000:]]
        if self.hook_errors:
            parts += ["--- on_line errors ---", *self.hook_errors]
        return "\n".join(parts)

    def check(self) -> GuestResult:
        """Raise AssertionError with the output unless the scenario exited 0."""
        if self.exit_status != 0 or self.hook_errors:
            raise AssertionError("test guest scenario failed:\n" + self.describe())
        return self


_VALUE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


# --------------------------------------------------------------------------
# newc cpio writer


def _newc_header(ino: int, mode: int, nlink: int, size: int, name: bytes,
                 rdev_major: int = 0, rdev_minor: int = 0, mtime: int = 0) -> bytes:
    fields = (
        ino, mode, 0, 0, nlink, mtime, size,
        0, 0, rdev_major, rdev_minor, len(name) + 1, 0,
    )
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


@dataclasses.dataclass
class _Entry:
    name: str  # path inside the archive, no leading slash
    mode: int  # full st_mode
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[_Entry]) -> bytes:
    """Serialise entries as an SVR4 "newc" cpio archive (what initramfs reads)."""
    out = bytearray()
    ino = 1000
    for e in entries:
        ino += 1
        name = e.name.lstrip("/").encode()
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        hdr = _newc_header(ino, e.mode, nlink, len(e.data), name, *e.rdev)
        out += hdr + name + b"\0"
        out += _pad4(len(hdr) + len(name) + 1)
        out += e.data + _pad4(len(e.data))
    trailer = b"TRAILER!!!"
    hdr = _newc_header(0, 0, 1, 0, trailer)
    out += hdr + trailer + b"\0" + _pad4(len(hdr) + len(trailer) + 1)
    # Pad to 512 so a following archive starts aligned.
    out += b"\0" * ((512 - len(out) % 512) % 512)
    return bytes(out)


def _dir(name: str, perm: int = 0o755) -> _Entry:
    return _Entry(name, stat.S_IFDIR | perm)


def _file(name: str, data: bytes, perm: int = 0o644) -> _Entry:
    return _Entry(name, stat.S_IFREG | perm, data)


def _symlink(name: str, target: str) -> _Entry:
    return _Entry(name, stat.S_IFLNK | 0o777, target.encode())


def _chardev(name: str, major: int, minor: int, perm: int = 0o600) -> _Entry:
    return _Entry(name, stat.S_IFCHR | perm, b"", (major, minor))


def scenario_archive(script: str, files: Mapping[str, bytes | str] | None = None) -> bytes:
    """The per-run archive: /scenario.sh plus optional extra files."""
    entries: list[_Entry] = []
    dirs: set[str] = set()
    items: dict[str, bytes] = {"scenario.sh": script.encode()}
    for path, content in (files or {}).items():
        items[path.lstrip("/")] = content.encode() if isinstance(content, str) else bytes(content)
    for path, data in items.items():
        parent = os.path.dirname(path)
        chain = []
        while parent and parent not in dirs:
            chain.append(parent)
            dirs.add(parent)
            parent = os.path.dirname(parent)
        entries += [_dir(d) for d in reversed(chain)]
        entries.append(_file(path, data, 0o755 if path.endswith(".sh") else 0o644))
    return newc_archive(entries)


# --------------------------------------------------------------------------
# building the image


def cache_root(cache_dir: str | os.PathLike | None, leaf: str = "guest") -> Path:
    """``cache_dir`` if given, else ``$VBLK_CACHE_DIR/LEAF``, else ``~/.cache/vblk/LEAF``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("VBLK_CACHE_DIR")
    if env:
        return Path(env) / leaf
    return Path.home() / ".cache" / "vblk" / leaf


def _builder_hash() -> str:
    h = hashlib.sha256()
    h.update(f"builder={BUILDER_VERSION}\n".encode())
    h.update(INIT_TEMPLATE.encode())
    h.update(repr(ROOT_MODULES).encode())
    h.update(repr(sorted(HOST_BINARIES.items())).encode())
    h.update(repr(sorted(HOST_FILES.items())).encode())
    return h.hexdigest()[:12]


def _run(cmd: Sequence[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found: {e}") from None
    except subprocess.CalledProcessError as e:
        raise GuestBuildError(
            f"{' '.join(cmd)} failed with status {e.returncode}:\n{e.stdout}\n{e.stderr}"
        ) from None


def kernel_package() -> str:
    """Name of the versioned kernel package linux-image-amd64 depends on."""
    env = os.environ.get("VBLK_GUEST_KERNEL_PACKAGE")
    if env:
        return env
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    except GuestBuildError as e:
        raise GuestBuildError(f"cannot resolve the guest kernel package ({e}); "
                              "run `apt-get update` first") from None
    names = re.findall(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
    if not names:
        raise GuestBuildError(
            "`apt-cache depends linux-image-amd64` names no linux-image-<version> package; "
            f"run `apt-get update` first. Output was:\n{out}")
    return sorted(names)[-1]


def _kernel_version_of(package: str) -> str:
    return package[len("linux-image-"):]


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True,
                              capture_output=True).stdout
    return data


def _module_name(rel: str) -> str:
    base = rel.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def _resolve_modules(moddir: Path, roots: Sequence[str]) -> list[str]:
    """Module paths (relative to moddir) to load, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    order: list[str] = []
    seen: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in seen:
            return
        if mod in stack:
            raise GuestBuildError(f"module dependency loop at {mod}")
        for d in reversed(deps.get(mod, [])):
            visit(d, stack + (mod,))
        seen.add(mod)
        order.append(mod)

    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        builtin = {_module_name(x) for x in bfile.read_text().split()}
    for root in roots:
        key = root.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key in builtin:
            continue
        else:
            raise GuestBuildError(f"kernel module {root} not found in {moddir}")
    return order


_PAYLOADS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00\x00", "lzma"),
)


def _has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF64 kernel has the Xen PVH entry note QEMU boots through."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        off, end = p_offset, p_offset + p_filesz
        while off + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, off)
            name = elf[off + 12: off + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            off += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def _extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage, if it can be found and has a PVH entry."""
    for magic, kind in _PAYLOADS:
        start = bzimage.find(magic)
        while start != -1:
            try:
                if kind == "xz":
                    out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
                elif kind == "lzma":
                    out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(
                        bzimage[start:])
                elif kind == "gzip":
                    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bzimage[start:])
                else:
                    out = subprocess.run(["zstd", "-dc"], input=bzimage[start:],
                                         capture_output=True).stdout
            except (lzma.LZMAError, zlib.error, OSError):
                out = b""
            if out[:4] == b"\x7fELF":
                return out if _has_pvh_note(out) else None
            start = bzimage.find(magic, start + 1)
    return None


def _ldd_libraries(binary: str) -> list[str]:
    out = _run(["ldd", binary]).stdout
    libs = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"\S+\s+=>\s+(/\S+)", line) or re.match(r"(/\S+)\s+\(", line)
        if m:
            libs.append(m.group(1))
    return libs


def _tree_entries(tree: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, tree)
        if rel_dir != ".":
            entries.append(_dir(rel_dir, stat.S_IMODE(os.lstat(dirpath).st_mode)))
        for fn in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, fn)
            rel = os.path.normpath(os.path.join(rel_dir, fn))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entries.append(_symlink(rel, os.readlink(p)))
            elif stat.S_ISREG(st.st_mode):
                entries.append(_file(rel, Path(p).read_bytes(), stat.S_IMODE(st.st_mode)))
    return entries


def _build_into(out_dir: Path, package: str, log) -> GuestImage:
    kver = _kernel_version_of(package)
    work = out_dir / "work"
    work.mkdir(parents=True)
    deb_env = os.environ.get("VBLK_GUEST_KERNEL_DEB")
    if deb_env:
        deb = Path(deb_env)
    else:
        log(f"downloading {package} ...")
        _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=work)
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download {package} produced no .deb in {work}")
        deb = debs[-1]
    kroot = work / "kernel"
    log(f"unpacking {deb.name} ...")
    _run(["dpkg-deb", "-x", str(deb), str(kroot)])
    vmlinuz = kroot / "boot" / f"vmlinuz-{kver}"
    if not vmlinuz.exists():
        cands = sorted((kroot / "boot").glob("vmlinuz-*"))
        if not cands:
            raise GuestBuildError(f"no vmlinuz in {deb}")
        vmlinuz = cands[-1]
        kver = vmlinuz.name[len("vmlinuz-"):]
    moddir = None
    for base in (kroot / "lib" / "modules", kroot / "usr" / "lib" / "modules"):
        if (base / kver).is_dir():
            moddir = base / kver
    if moddir is None:
        raise GuestBuildError(f"no modules directory for {kver} in {deb}")
    depmod_base = moddir.parent.parent.parent  # .../kernel (holding lib/modules)
    _run(["depmod", "-b", str(depmod_base), kver])
    modules = _resolve_modules(moddir, ROOT_MODULES)

    log("building the initramfs (busybox, host tools, kernel modules)")
    tree = work / "initramfs"
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "mnt", "root", "run",
              "usr/bin", "usr/sbin", f"lib/modules/{kver}"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    # busybox and its applets (symlinks), except names the host tools provide
    if not Path(BUSYBOX).exists():
        raise GuestBuildError(f"{BUSYBOX} missing: apt-get install busybox-static")
    shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
    provided = {Path(n).name for names in HOST_BINARIES.values() for n in names}
    applets = _run([BUSYBOX, "--list-full"]).stdout.split()
    for applet in applets:
        if Path(applet).name in provided or applet == "bin/busybox":
            continue
        target = tree / applet
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to("/bin/busybox")
    # host binaries and their libraries
    libs: set[str] = set()
    for src, names in HOST_BINARIES.items():
        if not Path(src).exists():
            raise GuestBuildError(f"{src} missing: apt-get install "
                                  f"{HOST_BINARY_PACKAGES.get(src, 'e2fsprogs')}")
        shutil.copy2(src, tree / names[0])
        for alias in names[1:]:
            (tree / alias).symlink_to(Path(names[0]).name)
        libs.update(_ldd_libraries(src))
    for lib in sorted(libs):
        dest = tree / lib.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(lib), dest)
        os.chmod(dest, 0o755)
    for src, dest in HOST_FILES.items():
        if Path(src).exists():
            shutil.copyfile(src, tree / dest)
    # kernel modules, decompressed, under their plain names
    names = []
    for rel in modules:
        name = _module_name(rel)
        names.append(name)
        (tree / "lib" / "modules" / kver / f"{name}.ko").write_bytes(
            _read_module(moddir / rel))
    # init
    init = (INIT_TEMPLATE.replace("@BUILDER@", str(BUILDER_VERSION))
            .replace("@MODULES@", " ".join(names)).replace("@KVER@", kver)
            .replace("@START@", START_MARKER).replace("@ERROR@", ERROR_MARKER)
            .replace("@EXIT@", EXIT_MARKER))
    (tree / "init").write_text(init)
    os.chmod(tree / "init", 0o755)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    (tree / "etc" / "mtab").symlink_to("/proc/mounts")

    entries = _tree_entries(tree)
    entries.insert(0, _chardev("dev/console", 5, 1))
    entries.insert(1, _chardev("dev/null", 1, 3, 0o666))
    initrd = out_dir / "initrd.img"
    initrd.write_bytes(newc_archive(entries))
    # Booting the decompressed ELF kernel through its PVH entry point skips
    # the in-guest XZ decompression, which costs ~3 s under TCG.
    elf = _extract_vmlinux(vmlinuz.read_bytes())
    if elf is not None:
        kernel = out_dir / "vmlinux"
        kernel.write_bytes(elf)
    else:
        log("no PVH-capable vmlinux could be extracted; booting the bzImage")
        kernel = out_dir / "vmlinuz"
        shutil.copyfile(vmlinuz, kernel)
    (out_dir / "manifest.json").write_text(json.dumps({
        "kernel_version": kver,
        "package": package,
        "deb": deb.name,
        "builder_version": BUILDER_VERSION,
        "builder_hash": _builder_hash(),
        "kernel": kernel.name,
        "modules": names,
        "libraries": sorted(libs),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    shutil.rmtree(work)
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=kver)


def _image_from(dir_: Path) -> GuestImage | None:
    manifest = dir_ / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = dir_ / info.get("kernel", "vmlinuz"), dir_ / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return GuestImage(kernel=kernel, initrd=initrd, kernel_version=info["kernel_version"])


def _version_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _find_cached(root: Path, bhash: str, kver: str | None = None) -> GuestImage | None:
    if not root.is_dir():
        return None
    pattern = f"{kver}-{bhash}" if kver else f"*-{bhash}"
    for d in sorted(root.glob(pattern), key=lambda p: _version_key(p.name), reverse=True):
        img = _image_from(d)
        if img is not None:
            return img
    return None


def build_guest(cache_dir: Path | None = None, *, rebuild: bool = False,
                verbose: bool = False, progress: Callable[[str], None] | None = None) -> GuestImage:
    """Build the test guest (kernel + base initramfs), or return the cached one.

    The cache lives in ``cache_dir``, else ``$VBLK_CACHE_DIR/guest``, else
    ``~/.cache/vblk/guest``, one directory per ``<kernel-version>-<builder-hash>``.
    A cached build for the current builder is returned without asking apt;
    ``rebuild=True`` asks apt for the current kernel and builds it if missing.
    Parallel callers (pytest-xdist workers) serialise on a file lock; the build
    goes into a temporary directory that is renamed into place when complete.
    ``progress(step)`` hears each step of a build (``verbose``: they go to stderr).
    """
    root = cache_root(cache_dir)
    bhash = _builder_hash()
    if not rebuild:
        img = _find_cached(root, bhash)
        if img is not None:
            return img
    root.mkdir(parents=True, exist_ok=True)
    log = progress or ((lambda msg: print(f"[vblk guest] {msg}", file=sys.stderr, flush=True))
                       if verbose else (lambda msg: None))
    with open(root / ".lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if not rebuild:
            img = _find_cached(root, bhash)
            if img is not None:
                return img
        log("asking apt for the current kernel package")
        package = kernel_package()
        kver = _kernel_version_of(package)
        img = _find_cached(root, bhash, kver)
        if img is not None:
            return img
        final = root / f"{kver}-{bhash}"
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{kver}-", dir=root))
        try:
            log(f"building guest for {kver} in {tmp}")
            t0 = time.monotonic()
            _build_into(tmp, package, log)
            if final.exists():
                shutil.rmtree(final)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
            log(f"built in {time.monotonic() - t0:.1f} s")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        img = _image_from(final)
        if img is None:
            raise GuestBuildError(f"guest build in {final} is incomplete")
        _prune(root, keep=final)
        return img


def _prune(root: Path, keep: Path) -> None:
    """Remove cached builds made by other builder versions (and stale temp dirs)."""
    for d in root.iterdir():
        if d == keep or not d.is_dir():
            continue
        stale_tmp = d.name.startswith(".build-") and time.time() - d.stat().st_mtime > 3600
        old_build = not d.name.startswith(".") and not d.name.endswith("-" + _builder_hash())
        if stale_tmp or old_build:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# running it


def default_accel() -> str:
    """"kvm" only where a real KVM module (kvm_intel/kvm_amd) is loaded, else "tcg".

    ``$VBLK_GUEST_ACCEL`` overrides.  Nested flavours of /dev/kvm (e.g. kvm_pvm)
    hang a stock kernel, so they are not used.
    """
    env = os.environ.get("VBLK_GUEST_ACCEL")
    if env:
        return env
    real = any(Path(f"/sys/module/{m}").exists() for m in ("kvm_intel", "kvm_amd"))
    if real and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


def qemu_command(image: GuestImage, initrd: Path, socket_path: str | os.PathLike, *,
                 memory: str = "512M", queue_size: int = 64, num_queues: int = 1,
                 bios: str | os.PathLike | None = None, accel: str | None = None,
                 cmdline_extra: str = "", reconnect: int | None = None,
                 smp: int = 1, extra_qemu_args: Sequence[str] = ()) -> list[str]:
    """The QEMU command line for one boot (serial console on stdout).

    ``reconnect=N``: QEMU redials the backend N seconds after it goes away (a backend
    restarted by systemd); the guest's disk carries on."""
    chardev = f"socket,id=vb0,path={os.fspath(socket_path)}"
    if reconnect is not None:
        chardev += f",reconnect={int(reconnect)}"
    accel = accel or default_accel()
    cpu = "host" if accel == "kvm" else "max"
    cmd = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "q35,memory-backend=mem", "-accel", _accel_option(accel, smp),
        "-cpu", cpu, "-smp", str(smp), "-m", memory,
        "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", (DEFAULT_CMDLINE + " " + cmdline_extra).strip(),
        "-serial", "stdio", "-monitor", "none",
        "-chardev", chardev,
        "-device", f"vhost-user-blk-pci,chardev=vb0,num-queues={num_queues},"
                   f"queue-size={queue_size}",
    ]
    if bios is not None:
        if str(bios) == "qboot":
            bios = QBOOT
        cmd += ["-bios", os.fspath(bios)]
    cmd += list(extra_qemu_args)
    return cmd


def _accel_option(accel: str, smp: int) -> str:
    """``-accel``'s value. TCG with more vCPUs than the host has CPUs runs them all on one
    thread (``thread=single``): with a thread each (MTTCG) a 4-vCPU guest on a loaded 2-CPU
    host was seen stuck in its boot for 240 s (soft lockups in every vCPU's migration/N:
    stop_machine waits for all vCPUs at once, and the host could not run them at once)."""
    if accel == "tcg" and smp > (os.cpu_count() or 1):
        return "tcg,thread=single"
    return accel


def _check_prerequisites() -> None:
    if shutil.which(QEMU) is None:
        raise GuestBuildError(f"{QEMU} not found: apt-get install qemu-system-x86")


def run_guest(socket_path: str | os.PathLike, script: str, *, timeout: float = 180,
              alive: Callable[[], bool] | None = None, **kw) -> GuestResult:
    """Boot the test guest against the vhost-user-blk backend at socket_path.

    ``script`` runs as ``sh -e /scenario.sh`` once /dev/vda exists; what it
    prints comes back in ``GuestResult.output`` and its ``KEY=VALUE`` lines in
    ``GuestResult.values``.  On timeout QEMU is killed and the result has ``timed_out=True``
    and ``exit_status=None`` with the output so far; nothing is raised, call
    ``result.check()`` to assert success.  ``alive`` (e.g. "the backend process still runs")
    is polled; once it returns False the guest gets 3 s to finish, then QEMU is killed and
    ``result.aborted`` says why, so a dead backend fails fast instead of timing out.
    The other keywords are ``start_guest``'s.
    """
    return start_guest(socket_path, script, **kw).wait(timeout, alive=alive)


def start_guest(socket_path: str | os.PathLike, script: str, *,
                memory: str = "512M", queue_size: int = 64, num_queues: int = 1,
                extra_qemu_args: Sequence[str] = (), image: GuestImage | None = None,
                log_path: str | os.PathLike | None = None,
                bios: str | os.PathLike | None = None, accel: str | None = None,
                files: Mapping[str, bytes | str] | None = None,
                cmdline_extra: str = "", reconnect: int | None = None, smp: int = 1,
                on_line: Callable[[str], None] | None = None,
                archives: Sequence[str | os.PathLike] = ()) -> GuestProcess:
    """Start the test guest and return at once (``run_guest`` is this, then ``wait``); for a
    host that acts while the guest runs, e.g. two QEMUs of a live migration
    (``extra_qemu_args`` with ``-qmp``, ``-incoming``).

    ``files`` adds more files to the guest (path -> content).  ``bios="qboot"`` uses qboot
    instead of SeaBIOS.  ``smp``: the guest's vCPUs (a multiqueue guest uses at most one
    queue per vCPU).  ``on_line(line)`` is called with each console line as it arrives (on a
    reader thread), so the host can act when the guest prints a marker; what it raises is
    logged to ``GuestResult.stderr`` and fails ``check()``, and the guest runs on.
    ``archives``: more newc cpio archives (e.g. ``guestaddon.build_fio_addon()``), appended
    after the base initramfs and before the scenario, in order.
    """
    _check_prerequisites()
    image = image or build_guest()
    tmp = tempfile.TemporaryDirectory(prefix="vblk-guest-")
    try:
        initrd = Path(tmp.name) / "initrd.img"
        with open(initrd, "wb") as f, open(image.initrd, "rb") as base:
            shutil.copyfileobj(base, f)
            for path in archives:
                with open(path, "rb") as extra:
                    shutil.copyfileobj(extra, f)
                if f.tell() % 4:                  # newc archives start 4-byte aligned
                    f.write(b"\0" * (4 - f.tell() % 4))
            f.write(scenario_archive(script, files))
        cmd = qemu_command(image, initrd, socket_path, memory=memory, queue_size=queue_size,
                           num_queues=num_queues, bios=bios, accel=accel,
                           cmdline_extra=cmdline_extra, reconnect=reconnect, smp=smp,
                           extra_qemu_args=extra_qemu_args)
        return GuestProcess(cmd, log_path=log_path, on_line=on_line, workdir=tmp)
    except BaseException:
        tmp.cleanup()
        raise


class GuestProcess:
    """A running QEMU of the test guest (``start_guest``): its serial console read line by line
    on threads, its input (``send``) the guest's console."""

    def __init__(self, cmd: list[str], *, log_path=None,
                 on_line: Callable[[str], None] | None = None,
                 workdir: tempfile.TemporaryDirectory | None = None) -> None:
        self.cmd = cmd
        self._workdir = workdir
        self._log = open(log_path, "a", buffering=1, errors="replace") if log_path else None
        self._on_line = on_line
        self.timed: list[tuple[float, str]] = []
        self._err_chunks: list[str] = []
        self._hook_errors: list[str] = []
        self._exit_seen = threading.Event()
        self._arrived = threading.Condition()
        self.started_at = time.time()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for r in self._readers:
            r.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
            with self._arrived:
                self.timed.append((time.monotonic() - self.t0, line))
                self._arrived.notify_all()
            if self._log:
                self._log.write(line + "\n")
            if self._on_line is not None:
                try:
                    self._on_line(line)
                except Exception as exc:          # the test's own hook: report, keep reading
                    self._hook_errors.append(f"on_line({line!r}) raised {exc!r}")
            if line.strip().startswith(EXIT_MARKER):
                self._exit_seen.set()
        with self._arrived:
            self._arrived.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            self._err_chunks.append(raw.decode("utf-8", "replace"))

    def send(self, text: str) -> None:
        """Type ``text`` into the guest's serial console (the scenario's stdin is /dev/console:
        ``read line`` gets it; the console echoes it)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        """The first serial line starting with ``prefix`` (waiting up to ``timeout`` s for it),
        or None if none came (or QEMU's output ended)."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for _, line in self.timed:
                    if line.strip().startswith(prefix):
                        return line.strip()
                left = deadline - time.monotonic()
                if left <= 0 or not self._readers[0].is_alive():
                    return None
                self._arrived.wait(min(left, 0.5))

    def wait(self, timeout: float, *, alive: Callable[[], bool] | None = None) -> GuestResult:
        """Until the guest reports its exit status (then poweroff gets 15 s) or QEMU exits, at
        most ``timeout`` s after the start; QEMU is killed if still running. What it did."""
        proc = self.proc
        timed_out = False
        aborted = ""
        deadline = self.t0 + timeout
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if alive is not None and not aborted and not alive():
                    aborted = "the backend is gone (alive() returned False)"
                    deadline = min(deadline, now + 3.0)
                if self._exit_seen.wait(min(0.1, deadline - now)):
                    # the scenario is over: give poweroff a little time, then kill
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        pass
                    break
        finally:
            self.kill()
            for r in self._readers:
                r.join(timeout=5)
            if self._log:
                if aborted:
                    self._log.write(f"[vblk guest: {aborted}]\n")
                elif timed_out:
                    self._log.write(f"[vblk guest: timed out after {timeout} s; QEMU killed]\n")
                self._log.close()
                self._log = None
            if self._workdir is not None:
                self._workdir.cleanup()
                self._workdir = None
        timed = self.timed
        status: int | None = None
        for _, line in timed:
            s = line.strip()
            if s.startswith(EXIT_MARKER):
                with contextlib.suppress(ValueError):
                    status = int(s[len(EXIT_MARKER):].strip())
        return GuestResult(exit_status=status, output="\n".join(line for _, line in timed),
                           seconds=time.monotonic() - self.t0,
                           stderr="".join(self._err_chunks), qemu_returncode=proc.returncode,
                           timed_out=timed_out and not aborted, aborted=aborted,
                           command=tuple(self.cmd), timed_lines=timed,
                           started_at=self.started_at, hook_errors=self._hook_errors)

    def run_beside(self, thread: threading.Thread, stop: threading.Event, timeout: float, *,
                   alive: Callable[[], bool] | None = None) -> GuestResult:
        """The host's side of a workload that runs until the host says stop
        (LISTEN_FOR_HOST_SCRIPT): start ``thread`` and let it work while QEMU runs, however
        long a loaded machine takes; then set ``stop``, join it, type the stop line and
        ``wait`` (``timeout``, ``alive``) for what the guest reports."""
        thread.start()
        while thread.is_alive() and self.proc.poll() is None:
            thread.join(0.2)
        stop.set()
        thread.join()
        self.send("DONE\n")
        return self.wait(timeout, alive=alive)

    def kill(self) -> None:
        """Kill QEMU if it still runs (and close its console input)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


# --------------------------------------------------------------------------
# host-side helpers for guest tests


def make_image(path: Path, size: int) -> Path:
    """A sparse image of size bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# A workload that runs until the host says stop: this line (in the background) turns the next
# line typed into the console (``GuestProcess.send``, ``run_beside``) into /tmp/host-said; the
# workload loops ``while [ ! -e /tmp/host-said ]``.
LISTEN_FOR_HOST_SCRIPT = '(read -r said; echo "$said" > /tmp/host-said) </dev/console &'

# With ext4 on /dev/vda mounted at /mnt: unmount, e2fsck -fn (FSCK=0 when clean; the log
# printed when not).
UNMOUNT_AND_FSCK_SCRIPT = r"""umount /mnt
rc=0; e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1 || rc=$?
echo FSCK=$rc
[ $rc = 0 ] || cat /tmp/fsck.log
"""

# The end of a file workload that kept each file's sha256 line in /root/all.sums, with ext4
# on /dev/vda mounted at /mnt: unmount, e2fsck -fn (FSCK=0 when clean), drop the page cache,
# mount again and check every sum from the disk (CHECK=0, CHECKED= files whose sum matched).
VERIFY_FILES_SCRIPT = UNMOUNT_AND_FSCK_SCRIPT + r"""echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
rc=0; sha256sum -c /root/all.sums > /tmp/check.log 2>&1 || rc=$?
echo CHECK=$rc
echo CHECKED=$(grep -c ': OK$' /tmp/check.log)
[ $rc = 0 ] || grep -v ': OK$' /tmp/check.log | head
umount /mnt
"""


GEOMETRY_SCRIPT = r"""
echo SIZE=$(cat /sys/block/vda/size)
echo LBS=$(cat /sys/block/vda/queue/logical_block_size)
echo PBS=$(cat /sys/block/vda/queue/physical_block_size)
echo RO=$(cat /sys/block/vda/ro)
echo WRITE_CACHE=$(cat /sys/block/vda/queue/write_cache | tr ' ' _)
echo BYTES=$(blockdev --getsize64 /dev/vda)
"""


def files_script(sizes: Sequence[int], big_mib: int = 0) -> str:
    """GEOMETRY_SCRIPT, then ext4 on /dev/vda with one file of random bytes per size (and one
    of ``big_mib`` MiB if given): each file's SHA_f= and LEN_f=; after an unmount, e2fsck -fn
    (FSCK=) and, with the page cache dropped, every sum checked from the disk (REREAD=0,
    REREAD_OK= files that matched)."""
    big = (f"dd if=/dev/urandom of=/mnt/f{big_mib * (1 << 20)} bs=1M count={big_mib} "
           f"2>/dev/null\n" if big_mib else "")
    return GEOMETRY_SCRIPT + r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
for n in @SIZES@; do head -c $n /dev/urandom > /mnt/f$n; done
""".replace("@SIZES@", " ".join(map(str, sizes))) + big + r"""cd /mnt
for f in f*; do
    echo "SHA_$f=$(sha256sum $f | cut -d' ' -f1)"
    echo "LEN_$f=$(stat -c %s $f)"
done
sha256sum f* > /tmp/sums
cd /
sync
""" + UNMOUNT_AND_FSCK_SCRIPT + r"""echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
cd /mnt
rc=0; sha256sum -c /tmp/sums > /tmp/check.log 2>&1 || rc=$?
echo REREAD=$rc
echo REREAD_OK=$(grep -c ': OK$' /tmp/check.log)
[ $rc = 0 ] || cat /tmp/check.log
cd /
umount /mnt
"""


def assert_geometry(result: GuestResult, *, size_bytes: int, lbs: int = 512, pbs: int,
                    ro: bool = False, writeback: bool = False) -> None:
    v = result.values
    got = {k: v.get(k) for k in ("SIZE", "LBS", "PBS", "RO", "WRITE_CACHE", "BYTES")}
    want = {"SIZE": str(size_bytes // 512), "LBS": str(lbs), "PBS": str(pbs),
            "RO": "1" if ro else "0",
            "WRITE_CACHE": "write_back" if writeback else "write_through",
            "BYTES": str(size_bytes)}
    if got != want:
        raise AssertionError(f"guest sees the wrong geometry: got {got}, want {want}\n"
                             + result.describe())


def default_pbs(image: Path, lbs: int = 512) -> int:
    """vblk's default physical block size for a regular file, after ACRN: max(L, st_blksize)."""
    return max(lbs, os.stat(image).st_blksize)


_STRACE_RE = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(fsync|fdatasync)\(")


def sync_calls(strace_path: Path) -> list[float]:
    """Wall-clock times of the fsync/fdatasync calls in an ``strace -ttt`` trace."""
    times = []
    for line in strace_path.read_text(errors="replace").splitlines():
        m = _STRACE_RE.match(line)
        if m:
            times.append(float(m.group(2)))
    return times


def host_fsck(image: Path, offset: int = 0, size: int | None = None) -> subprocess.CompletedProcess:
    """e2fsck -fn on the image (or a byte window of it, copied out first)."""
    target = image
    tmp = None
    if offset or size is not None:
        tmp = Path(tempfile.mkstemp(prefix="vblk-fsck-", dir="/tmp")[1])
        with open(image, "rb") as src, open(tmp, "wb") as dst:
            src.seek(offset)
            remaining = size if size is not None else os.path.getsize(image) - offset
            while remaining > 0:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
        target = tmp
    try:
        return subprocess.run(["e2fsck", "-fn", str(target)], capture_output=True, text=True)
    finally:
        if tmp is not None:
            tmp.unlink()


def debugfs_cat(image: Path, path: str) -> bytes:
    """A file's contents read straight from an ext4 image on the host (no mount)."""
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    if r.returncode != 0:
        raise AssertionError(f"debugfs cat {path} failed: {r.stderr.decode(errors='replace')}")
    return r.stdout


# --------------------------------------------------------------------------
# command line


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vblk.lab.guest",
                                 description="Build or boot vblk's test guest.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the cached guest and print its paths")
    b.add_argument("--cache-dir", type=Path)
    b.add_argument("--rebuild", action="store_true",
                   help="ask apt for the current kernel and build it if not cached")
    b.add_argument("--fio", action="store_true",
                   help="also build (or find) the fio add-on archive (vblk bench --guest)")
    r = sub.add_parser("run", help="boot the guest once against a vhost-user-blk socket")
    r.add_argument("socket")
    r.add_argument("script", help="scenario file (sh), or - for stdin")
    r.add_argument("--timeout", type=float, default=180)
    r.add_argument("--bios")
    r.add_argument("--queue-size", type=int, default=64)
    r.add_argument("--archive", action="append", default=[], metavar="CPIO",
                   help="append this newc archive to the initramfs (repeatable)")
    r.add_argument("--fio", action="store_true", help="append the fio add-on")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        t0 = time.monotonic()
        try:
            img = build_guest(args.cache_dir, rebuild=args.rebuild, verbose=True)
        except GuestBuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"kernel_version={img.kernel_version}")
        print(f"kernel={img.kernel}")
        print(f"initrd={img.initrd}")
        if args.fio:
            from vblk.lab.guestaddon import build_fio_addon
            try:
                print(f"fio_addon={build_fio_addon()}")
            except GuestBuildError as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_FAILED
        print(f"seconds={time.monotonic() - t0:.1f}")
        return EXIT_OK
    script = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
    archives = list(args.archive)
    if args.fio:
        from vblk.lab.guestaddon import build_fio_addon
        archives.append(build_fio_addon())
    res = run_guest(args.socket, script, timeout=args.timeout, bios=args.bios,
                    queue_size=args.queue_size, archives=archives)
    print(res.output)
    if res.stderr:
        print(res.stderr, file=sys.stderr)
    print(f"[exit_status={res.exit_status} seconds={res.seconds:.1f} "
          f"boot={res.boot_seconds}]", file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(_main())
