"""Opening local images (vblk.backing.local) on real temporary files and a loop device:
geometry, ranges, open modes, locks and serials. What the opened backing then does is the
conformance suite's (test_backing_conformance.py)."""
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vblk.backing import Backing, BackingInfo, check_backing, open_backing
from vblk.backing.local import compute_window, derive_physical
from vblk.errors import ConfigError
from vblk.options import DiskOptions, merge_flags, parse_acrn
from vblk.testing.loopdev import loop_device as attach_loop

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    def make(size=MiB, name="disk.img", data: bytes | None = None) -> Path:
        p = tmp_path / name
        with open(p, "wb") as f:
            if data is not None:
                f.write(data)
            f.truncate(size)
        return p
    return make


@pytest.fixture
def opened():
    """open_backing, closing whatever was opened at teardown."""
    backings: list[Backing] = []

    def _open(opts: DiskOptions) -> Backing:
        b = open_backing(opts)
        backings.append(b)
        return b
    yield _open
    for b in backings:
        b.close()


def acrn(path, options=""):
    return parse_acrn(f"{path}{',' if options else ''}{options}")


# -- geometry ---------------------------------------------------------------------------------

def test_a_whole_file(image, opened):
    p = image(MiB)
    b = opened(acrn(p))
    assert (b.info.start, b.info.size, b.info.image_size) == (0, MiB, MiB)
    assert b.info.capacity_sectors == MiB // 512
    assert not b.info.is_block_device and b.info.path == str(p)
    assert (b.info.logical_block_size, b.info.readonly, b.info.writeback, b.info.nocache) == \
        (512, False, False, False)


def test_physical_block_size_is_st_blksize_at_least_the_logical_size(image, opened):
    p = image()
    blksize = os.stat(p).st_blksize
    assert opened(acrn(p, "ro")).info.physical_block_size == derive_physical(512, blksize)
    assert opened(acrn(p, "ro,sectorsize=4096")).info.physical_block_size == 4096
    assert opened(acrn(p, "ro,sectorsize=512/1024")).info.physical_block_size == 1024


def test_derive_physical():
    assert derive_physical(512, 4096) == 4096
    assert derive_physical(4096, 512) == 4096
    assert derive_physical(512, 512) == 512
    assert derive_physical(512, 1 << 20) == 4096          # capped: ACRN would report 1 MiB
    assert derive_physical(1024, 3000) == 1024            # not a power of two: ignore it
    assert derive_physical(512, 0) == 512


def test_a_size_that_is_not_whole_blocks_is_rounded_down(image, opened):
    p = image(MiB + 1000)
    assert opened(acrn(p, "ro")).info.size == MiB + 512
    assert opened(acrn(p, "ro,sectorsize=4096")).info.size == MiB


@pytest.mark.parametrize("size, options", [(0, ""), (511, ""), (4095, "sectorsize=4096")])
def test_less_than_one_logical_block_is_an_error(image, size, options):
    p = image(size)
    with pytest.raises(ConfigError, match=f"{p} has {size} bytes, less than one"):
        check_backing(acrn(p, options))
    with pytest.raises(ConfigError, match="nothing to serve"):
        open_backing(acrn(p, options))


def test_range_in_sectors(image, opened):
    p = image(MiB)
    b = opened(acrn(p, "range=256/1024"))
    assert (b.info.start, b.info.size, b.info.capacity_sectors) == (256 * 512, 1024 * 512, 1024)
    b4 = opened(acrn(p, "sectorsize=4096,range=160/32"))
    assert (b4.info.start, b4.info.size, b4.info.capacity_sectors) == (160 * 4096, 32 * 4096, 32 * 8)


def test_a_range_ending_exactly_at_the_end_is_fine(image, opened):
    p = image(MiB)
    b = opened(acrn(p, f"range=1024/{MiB // 512 - 1024}"))
    assert b.info.end == MiB


def test_a_range_past_the_end_is_an_error_naming_where(image):
    p = image(MiB)
    opts = acrn(p, "range=2000/100")
    with pytest.raises(ConfigError) as e:
        check_backing(opts)
    end = 2100 * 512
    assert str(e.value) == (f"range {2000 * 512}/{100 * 512} (bytes) ends at byte {end} "
                            f"past the end of {p} ({MiB} bytes)")
    with pytest.raises(ConfigError, match=f"ends at byte {end} past the end"):
        open_backing(opts)


def test_a_start_without_a_size_runs_to_the_end(image, opened):
    p = image(MiB + 700)
    b = opened(DiskOptions(str(p), range_start=4096))
    assert (b.info.start, b.info.size) == (4096, MiB - 4096 + 512)


def test_compute_window_edges():
    assert compute_window("x", 4096, 512, 0, None) == (0, 4096)
    assert compute_window("x", 4096, 512, 4096 - 512, None) == (3584, 512)
    with pytest.raises(ConfigError, match="after byte 4096, less than one 512-byte"):
        compute_window("x", 4096, 512, 4096, None)
    with pytest.raises(ConfigError, match="starts at byte 8192, past the end of x"):
        compute_window("x", 4096, 512, 8192, None)
    with pytest.raises(ConfigError, match="ends at byte 4608 past the end of x .4096 bytes."):
        compute_window("x", 4096, 512, 512, 4096)


# -- opening --------------------------------------------------------------------------------

def access_mode(fd):
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def test_ro_opens_read_only_and_rw_read_write(image, opened):
    p = image()
    with open_backing(acrn(p, "ro")) as ro:
        assert ro.info.readonly and access_mode(ro.fd) == os.O_RDONLY
    rw = opened(acrn(p))
    assert not rw.info.readonly and access_mode(rw.fd) == os.O_RDWR


def test_fds_are_cloexec_blocking_and_direct_only_with_nocache(image, opened):
    p = image()
    b = opened(acrn(p, "ro"))
    flags = fcntl.fcntl(b.fd, fcntl.F_GETFL)
    assert fcntl.fcntl(b.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not flags & os.O_NONBLOCK and not flags & os.O_DIRECT
    try:
        d = opened(acrn(p, "ro,nocache"))
    except ConfigError as e:                      # a filesystem without O_DIRECT says so
        assert "does not support O_DIRECT" in str(e)
    else:
        assert fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_DIRECT and d.info.nocache


def test_writeback_is_carried(image, opened):
    assert opened(acrn(image(), "writeback")).info.writeback


def test_a_missing_image_is_named_and_not_created(tmp_path):
    p = tmp_path / "missing.img"
    for f in (check_backing, open_backing):
        with pytest.raises(ConfigError, match=f"image {p} does not exist"):
            f(acrn(p))
    assert not p.exists()


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=f"image {tmp_path} is a directory"):
        check_backing(acrn(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        open_backing(acrn(tmp_path))


def test_a_fifo_is_refused_without_hanging(tmp_path):
    p = tmp_path / "fifo"
    os.mkfifo(p)
    with pytest.raises(ConfigError, match="is a FIFO"):
        check_backing(acrn(p, "ro"))


def test_a_character_device_is_refused():
    with pytest.raises(ConfigError, match="/dev/null is a character device"):
        check_backing(acrn("/dev/null", "ro"))


def test_a_symlink_to_an_image_is_followed(image, opened, tmp_path):
    p = image()
    link = tmp_path / "link.img"
    link.symlink_to(p)
    assert opened(acrn(link, "ro")).info.size == MiB


def test_close_is_idempotent(image):
    b = open_backing(acrn(image()))
    fd = b.fd
    b.close()
    assert b.fd == -1
    b.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_backing_is_a_context_manager(image):
    with open_backing(acrn(image())) as b:
        assert b.fd >= 0
    assert b.fd == -1


def test_check_backing_returns_the_same_geometry_as_open_backing(image, opened):
    p = image(3 * MiB + 100)
    opts = acrn(p, "writeback,sectorsize=1024/4096,range=4/1000")
    info = check_backing(opts)
    b = opened(opts)
    assert isinstance(info, BackingInfo) and not isinstance(info, Backing)
    for name in BackingInfo.__dataclass_fields__:
        assert getattr(info, name) == getattr(b.info, name), name


def test_check_backing_leaves_the_image_untouched(image):
    p = image(MiB, data=b"hello")
    before = os.stat(p)
    check_backing(acrn(p, "writeback,range=0/16"))
    after = os.stat(p)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert p.read_bytes()[:5] == b"hello"


# -- writability --------------------------------------------------------------------------------

def as_nobody(fn):
    """Run ``fn()`` in a forked child, unprivileged if we are root (root ignores file modes).

    Returns what ``fn`` returned (a string), or the child's traceback text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: never return into pytest
        status = 0
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = fn()
        except BaseException as e:                  # noqa: BLE001 - report anything
            out, status = f"child failed: {e!r}", 1
        os.write(w, out.encode())
        os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_an_unwritable_image_without_ro_says_to_pass_ro():
    d = Path(tempfile.mkdtemp(prefix="vblk-ro-"))
    try:
        os.chmod(d, 0o755)
        p = d / "ro.img"
        p.write_bytes(bytes(MiB))
        os.chmod(p, 0o444)

        def probe() -> str:
            lines = []
            for f in (check_backing, open_backing):
                try:
                    f(acrn(p))
                    lines.append(f"{f.__name__} opened")
                except ConfigError as e:
                    lines.append(f"{f.__name__} {e}")
            with open_backing(acrn(p, "ro")) as b:
                lines.append(f"ro {b.info.readonly} {b.info.size} {access_mode(b.fd) == os.O_RDONLY}")
            return "\n".join(lines)

        lines = as_nobody(probe).splitlines()
        assert lines == [
            f"check_backing cannot open {p} for writing: permission denied or immutable "
            f"(pass ro to serve it read-only)",
            f"open_backing cannot open {p} for writing: permission denied "
            f"(pass ro to serve it read-only)",
            f"ro True {MiB} True"]
    finally:
        shutil.rmtree(d)


def test_an_unreadable_image_is_named():
    d = Path(tempfile.mkdtemp(prefix="vblk-unreadable-"))
    try:
        os.chmod(d, 0o755)
        p = d / "secret.img"
        p.write_bytes(bytes(MiB))
        os.chmod(p, 0o200)

        def probe() -> str:
            try:
                check_backing(acrn(p, "ro"))
            except ConfigError as e:
                return str(e)
            return "opened"

        assert as_nobody(probe) == f"cannot open {p} for reading: permission denied"
    finally:
        shutil.rmtree(d)


@pytest.fixture
def readonly_mount():
    """A directory on a tmpfs remounted read-only, holding ``disk.img`` (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    d = Path(tempfile.mkdtemp(prefix="vblk-rofs-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "vblk-test", str(d)],
                      capture_output=True).returncode:
        d.rmdir()
        pytest.skip("cannot mount a tmpfs here")
    try:
        (d / "disk.img").write_bytes(bytes(MiB))
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True, capture_output=True)
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        d.rmdir()


def test_an_image_on_a_read_only_filesystem_says_to_pass_ro(readonly_mount, opened):
    p = readonly_mount / "disk.img"
    want = f"{p} is on a read-only filesystem (pass ro to serve it read-only)"
    for f in (check_backing, open_backing):
        with pytest.raises(ConfigError) as e:
            f(acrn(p))
        assert str(e.value) == want
    assert opened(acrn(p, "ro")).info.readonly


# -- locks ------------------------------------------------------------------------------------

def test_a_second_writer_on_the_same_window_is_refused(image, opened):
    p = image()
    opened(acrn(p))
    with pytest.raises(ConfigError) as e:
        open_backing(acrn(p))
    assert str(e.value) == f"{p} bytes 0..{MiB} are in use by another process"
    with pytest.raises(ConfigError, match="in use by another process"):
        check_backing(acrn(p))


def test_a_reader_is_refused_while_a_writer_holds_the_window(image, opened):
    p = image()
    opened(acrn(p, "range=0/64"))
    with pytest.raises(ConfigError, match=f"{p} bytes 16384..49152 are in use"):
        open_backing(acrn(p, "ro,range=32/64"))


def test_readers_share_and_block_a_writer(image, opened):
    p = image()
    opened(acrn(p, "ro"))
    opened(acrn(p, "ro"))
    with pytest.raises(ConfigError, match="in use by another process"):
        open_backing(acrn(p, "range=100/1"))
    with pytest.raises(ConfigError, match="in use by another process"):
        check_backing(acrn(p, "range=100/1"))


def test_disjoint_ranges_can_both_be_written(image, opened):
    p = image()
    a = opened(acrn(p, "range=0/1024"))
    b = opened(acrn(p, "range=1024/1024"))
    assert a.info.end == b.info.start


def test_closing_releases_the_lock(image):
    p = image()
    b = open_backing(acrn(p))
    b.close()
    open_backing(acrn(p)).close()


def test_a_failed_open_leaks_no_fd(image, opened):
    p = image()
    opened(acrn(p))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ConfigError):
            open_backing(acrn(p))
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_lock_is_seen_by_another_process(image, opened):
    p = image()
    opened(acrn(p))
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; from vblk.backing import open_backing; from vblk.options import parse_acrn\n"
            "try:\n    open_backing(parse_acrn(sys.argv[1]))\n"
            "except Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=60)
    assert "in use by another process" in out.stdout, out.stderr


# -- serial -----------------------------------------------------------------------------------

def test_the_derived_serial_is_20_bytes_and_stable(image, opened):
    p = image()
    a = check_backing(acrn(p, "ro"))
    b = opened(acrn(p, "ro"))
    assert a.serial == b.info.serial and len(a.serial) == 20
    assert a.serial.startswith(b"VBLK-") and all(c in b"0123456789abcdef" for c in a.serial[5:])
    assert a.serial_text == a.serial.decode()


def test_the_serial_survives_a_restart_in_another_process(image):
    p = image()
    repo = Path(__file__).resolve().parents[2]
    code = ("import sys; from vblk.backing import check_backing; from vblk.options import parse_acrn\n"
            "print(check_backing(parse_acrn(sys.argv[1])).serial_text)")
    out = subprocess.run([sys.executable, "-c", code, f"{p},ro"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=60, check=True)
    assert out.stdout.strip() == check_backing(acrn(p, "ro")).serial_text


def test_the_serial_depends_on_the_image_and_the_window(image, tmp_path):
    p, q = image(name="a.img"), image(name="b.img")
    serials = {check_backing(acrn(p, "ro")).serial, check_backing(acrn(q, "ro")).serial,
               check_backing(acrn(p, "ro,range=0/8")).serial,
               check_backing(acrn(p, "ro,range=8/8")).serial}
    assert len(serials) == 4


def test_the_serial_does_not_depend_on_cache_mode_or_how_the_path_is_spelt(image, tmp_path):
    p = image()
    link = tmp_path / "link.img"
    link.symlink_to(p)
    assert (check_backing(acrn(p, "ro")).serial == check_backing(acrn(p, "writeback")).serial
            == check_backing(acrn(link, "ro")).serial)


def test_a_given_serial_is_nul_padded(image):
    opts = merge_flags(acrn(image(), "ro"), serial="disk-1")
    info = check_backing(opts)
    assert info.serial == b"disk-1" + bytes(14) and info.serial_text == "disk-1"
    assert check_backing(merge_flags(opts, serial="S" * 20)).serial == b"S" * 20


# -- block devices (loop device; skipped where loop devices cannot be made) -----------------------

@pytest.fixture
def loop_device(image):
    with attach_loop(image(2 * MiB)) as dev:
        yield dev


def test_a_block_device_uses_blkgetsize64_and_blkpbszget(loop_device, opened):
    with open_backing(acrn(loop_device, "ro")) as b:
        assert b.info.is_block_device and b.info.image_size == b.info.size == 2 * MiB
        assert b.info.physical_block_size >= 512 and access_mode(b.fd) == os.O_RDONLY
    b2 = opened(acrn(loop_device, "range=8/8"))
    assert (b2.info.start, b2.info.size, access_mode(b2.fd)) == (4096, 4096, os.O_RDWR)
    with pytest.raises(ConfigError, match=f"{loop_device} bytes 0..{2 * MiB} are in use"):
        check_backing(acrn(loop_device))
