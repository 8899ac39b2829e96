"""The ``vblk`` command run for real (``python -m vblk.cli``): refusals, ``info``, and a short serve."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from vblk.backing import open_backing
from vblk.options import parse_acrn
from vblk.testing.cli import error_line

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def vblk(*args: str, cwd: Path, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "vblk.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          **kw)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    line = error_line(result)
    assert result.stdout == ""
    return line


@pytest.fixture
def sockdir():
    """A short directory for sockets (sun_path is 107 bytes; pytest's tmp_path can be long)."""
    d = Path(tempfile.mkdtemp(prefix="vblk-cli-"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def make_image(path: Path, size: int = MiB, data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def fingerprint(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, path.read_bytes()


# -- refusals: one line, exit 2, nothing created --------------------------------------------

def test_serve_a_missing_image_refuses_without_creating_the_socket(tmp_path, sockdir):
    sock = sockdir / "x.sock"
    msg = one_error_line(vblk("serve", "missing.img", "--socket-path", sock, cwd=tmp_path))
    assert msg == "image missing.img does not exist (vblk never creates images)"
    assert not sock.exists() and not (tmp_path / "missing.img").exists()


@pytest.mark.parametrize("spec, words", [
    ("disk.img,bogus", "unknown option 'bogus'"),
    ("disk.img,discardfoo", "unknown option 'discardfoo'"),
    ("disk.img,discard=8:1", "discard=8:1: want A:B:C"),
    ("disk.img,discard=0:1:0", "discard=0:1:0: discard max sectors 0 is outside"),
    ("mq=0,disk.img", "the number of queues must be 1..64"),
    ("disk.img,aio=io_uring", "aio= does not apply to vblk"),
    ("disk.img,sectorsize=1000", "not a power of two"),
    ("disk.img,range=1/2/3", "not a decimal number"),
])
def test_serve_a_bad_option_refuses(tmp_path, sockdir, spec, words):
    make_image(tmp_path / "disk.img")
    sock = sockdir / "x.sock"
    assert words in one_error_line(vblk("serve", spec, "--socket-path", sock, cwd=tmp_path))
    assert not sock.exists()


def test_serve_a_range_past_the_end_leaves_the_image_untouched(tmp_path, sockdir):
    img = make_image(tmp_path / "disk.img", MiB, b"precious")
    os.utime(img, ns=(1_000_000_000, 1_000_000_000))
    before = fingerprint(img)
    sock = sockdir / "x.sock"
    msg = one_error_line(vblk("serve", "disk.img,writeback,range=2000/100", "--socket-path", sock,
                              cwd=tmp_path))
    assert msg == (f"range {2000 * 512}/{100 * 512} (bytes) ends at byte {2100 * 512} "
                   f"past the end of disk.img ({MiB} bytes)")
    assert fingerprint(img) == before
    assert not sock.exists()


def test_serve_a_flag_range_past_the_end_refuses(tmp_path, sockdir):
    make_image(tmp_path / "disk.img")
    msg = one_error_line(vblk("serve", "disk.img", "--range", "512K/1M", "--socket-path",
                              sockdir / "x.sock", cwd=tmp_path))
    assert "ends at byte 1572864 past the end of disk.img" in msg


def test_range_given_both_ways_refuses(tmp_path, sockdir):
    make_image(tmp_path / "disk.img")
    msg = one_error_line(vblk("serve", "disk.img,range=0/8", "--range", "0/4K", "--socket-path",
                              sockdir / "x.sock", cwd=tmp_path))
    assert "range= in the option string" in msg and "--range 0/4K" in msg


def test_serve_a_directory_refuses(tmp_path, sockdir):
    msg = one_error_line(vblk("serve", tmp_path, "--socket-path", sockdir / "x.sock", cwd=tmp_path))
    assert "is a directory" in msg


def test_serve_needs_exactly_one_listener(tmp_path, sockdir):
    make_image(tmp_path / "disk.img")
    assert "exactly one of --socket-path and --fd" in one_error_line(
        vblk("serve", "disk.img", cwd=tmp_path))
    assert "exactly one of --socket-path and --fd" in one_error_line(
        vblk("serve", "disk.img", "--socket-path", sockdir / "x.sock", "--fd", "0", cwd=tmp_path))


@pytest.mark.parametrize("args, words", [
    (("--workers", "0"), "--workers 0 is out of range 1..64"),
    (("--workers", "65"), "--workers 65"),
    (("--slots", "100"), "--slots 100 must be a power of two"),
    (("--log-level", "loud"), "log level 'LOUD'"),
    (("--poll-us", "10001"), "--poll-us 10001 is out of range 0..10000"),
    (("--poll-us", "-1"), "--poll-us -1 is out of range"),
    (("--sectorsize", "4096/512"), "smaller than the logical block size"),
    (("--serial", "x" * 21), "at most 20"),
    (("--discard-limits", "8:1"), "--discard-limits 8:1: want A:B:C"),
    (("--discard-limits", "8:300:0"), "max segments 300 is outside 1..256"),
    (("--no-discard", "--discard-limits", "8:1:0"), "contradict"),
    (("--sectorsize", "4096", "--discard-limits", "4:1:0"), "not a whole number of 4096-byte"),
])
def test_serve_bad_flags_refuse(tmp_path, sockdir, args, words):
    make_image(tmp_path / "disk.img")
    sock = sockdir / "x.sock"
    assert words in one_error_line(vblk("serve", "disk.img", "--socket-path", sock, *args,
                                        cwd=tmp_path))
    assert not sock.exists()


def test_serve_refuses_to_replace_a_file_at_the_socket_path(tmp_path, sockdir):
    make_image(tmp_path / "disk.img")
    not_a_socket = make_image(sockdir / "x.sock", 7, b"keep me")
    msg = one_error_line(vblk("serve", "disk.img", "--socket-path", not_a_socket, cwd=tmp_path))
    assert msg == f"{not_a_socket} exists and is not a socket; refusing to replace it"
    assert not_a_socket.read_bytes() == b"keep me"


def test_serve_refuses_a_socket_in_a_missing_directory(tmp_path, sockdir):
    make_image(tmp_path / "disk.img")
    msg = one_error_line(vblk("serve", "disk.img", "--socket-path", sockdir / "no" / "x.sock",
                              cwd=tmp_path))
    assert msg == f"socket directory {sockdir / 'no'} does not exist"


def test_serve_refuses_a_socket_path_too_long_for_bind(tmp_path):
    make_image(tmp_path / "disk.img")
    msg = one_error_line(vblk("serve", "disk.img", "--socket-path", "/tmp/" + "s" * 120,
                              cwd=tmp_path))
    assert "longer than 107 bytes" in msg


def test_serve_refuses_an_fd_that_is_not_a_listening_socket(tmp_path):
    img = make_image(tmp_path / "disk.img")
    assert one_error_line(vblk("serve", "disk.img", "--fd", "99", cwd=tmp_path)) == \
        "--fd 99 is not an open file descriptor"
    with open(img, "rb") as f:
        fd = f.fileno()
        msg = one_error_line(vblk("serve", "disk.img", "--fd", str(fd), cwd=tmp_path,
                                  pass_fds=(fd,)))
    assert msg == f"--fd {fd} is not a socket"
    a, b = socket.socketpair()
    with a, b:
        fd = a.fileno()
        msg = one_error_line(vblk("serve", "disk.img", "--fd", str(fd), cwd=tmp_path,
                                  pass_fds=(fd,)))
    assert msg == f"--fd {fd} is a socket that is not listening"


def test_serve_refuses_a_window_locked_by_another_vblk(tmp_path, sockdir):
    img = make_image(tmp_path / "disk.img")
    with open_backing(parse_acrn(f"{img},range=0/16")):
        msg = one_error_line(vblk("serve", "disk.img,range=8/16", "--socket-path",
                                  sockdir / "x.sock", cwd=tmp_path))
    assert msg == "disk.img bytes 4096..12288 are in use by another process"
    assert not (sockdir / "x.sock").exists()


def test_an_unwritable_image_is_not_silently_served_read_only(tmp_path, sockdir):
    """ACRN quietly falls back to read-only; vblk refuses and says to pass ro."""
    img = make_image(tmp_path / "disk.img")
    img.chmod(0o444)
    immutable = False
    if os.geteuid() == 0:                 # root ignores file modes: make it immutable instead
        if subprocess.run(["chattr", "+i", str(img)], capture_output=True).returncode:
            pytest.skip("cannot make an immutable file here")
        immutable = True
    try:
        sock = sockdir / "x.sock"
        msg = one_error_line(vblk("serve", "disk.img", "--socket-path", sock, cwd=tmp_path))
        assert msg.startswith("cannot open disk.img for writing") and "pass ro" in msg
        assert not sock.exists()
        r = vblk("info", "disk.img", "--ro", cwd=tmp_path)
        assert r.returncode == 0 and "read-only:" in r.stdout, r.stderr
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(img)], check=True)


@pytest.mark.parametrize("args,words", [
    (("serve",), "give the image as SPEC or as --blk-file PATH"),
    (("serve", "--socket-path", "x"), "give the image as SPEC"),
    (("serve", "d.img", "--frobnicate"), "No such option: --frobnicate (see 'vblk serve --help')"),
    (("info",), "Missing argument 'SPEC' (see 'vblk info --help')"),
    (("frobnicate",), "No such command 'frobnicate' (see 'vblk --help')"),
    (("serve", "d.img", "--workers", "many"), "Invalid value for '--workers'"),
    (("stats", "--socket-path", "s", "--timeout", "soon"), "Invalid value for '--timeout'"),
    (("resize",), "Missing argument 'SIZE'"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, words):
    """click's usage errors end as vblk's own refusals do: one line, status 2."""
    assert words in one_error_line(vblk(*args, cwd=tmp_path))


def test_old_spellings_still_work_with_one_warning_line(tmp_path):
    make_image(tmp_path / "disk.img")
    r = vblk("info", "disk.img", "--writeback", cwd=tmp_path)
    assert r.returncode == 0 and parse_info(r.stdout)["cache"] == "writeback"
    assert r.stderr == ("vblk: warning: --writeback is deprecated (it still works): use "
                        "--cache writeback\n")
    r = vblk("info", "disk.img", "--writethru", cwd=tmp_path)
    assert parse_info(r.stdout)["cache"] == "writethrough" and "use --cache writethrough" in r.stderr
    assert parse_info(vblk("info", "disk.img", "--cache", "writeback", cwd=tmp_path).stdout)[
        "cache"] == "writeback"
    r = vblk("serve", "disk.img", "--queue-size", "48", "--socket-path", "x.sock", cwd=tmp_path)
    warning, error = r.stderr.splitlines()
    assert warning == "vblk: warning: --queue-size is deprecated (it still works): use --slots"
    assert r.returncode == 2 and error == "vblk: error: --slots 48 must be a power of two in 1..32768"
    assert not (tmp_path / "x.sock").exists()


@pytest.mark.parametrize("args,words", [
    (("info", "d.img", "--cache", "writeback", "--writethru"), "give --cache (or its old spelling "
                                                               "--writethru), not both"),
    (("info", "d.img", "--cache", "wb"), "--cache wb: give writethrough or writeback"),
    (("serve", "d.img", "--slots", "8", "--queue-size", "8"), "give --slots (or its old spelling "
                                                             "--queue-size), not both"),
    (("stats", "--socket-path", "a", "--socket", "a"), "give --socket-path (or its old spelling"),
    (("limit", "--socket-path", "a", "--iops-limit", "5", "--iops", "5"), "give --iops-limit"),
    (("bench", "--socket-path", "a", "--iops-limit", "5", "--limit-iops", "5"), "give --iops-limit"),
    (("resize", "a.sock", "1M", "--socket-path", "a.sock"), "or as the old positional INSTANCE"),
])
def test_both_spellings_of_one_option_are_refused(tmp_path, args, words):
    make_image(tmp_path / "d.img")
    assert words in one_error_line(vblk(*args, cwd=tmp_path))


def test_bare_vblk_prints_the_usage_and_exits_2(tmp_path):
    r = vblk(cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("Usage: vblk [OPTIONS] COMMAND") and "serve" in r.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_package_version(tmp_path, flag):
    import vblk as package
    r = vblk(flag, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"vblk {package.__version__}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", package.__version__)


# -- info -------------------------------------------------------------------------------------

def parse_info(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(":")
        rows[key] = value.strip()
    return rows


def test_info_shows_what_the_guest_would_see(tmp_path):
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    before = fingerprint(img)
    r = vblk("info", "disk.img,writeback,sectorsize=4096/4096,range=256/512", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = parse_info(r.stdout)
    assert rows["image"] == f"disk.img (regular file, {4 * MiB} bytes)"
    assert rows["capacity"] == f"{512 * 8} sectors of 512 bytes ({512 * 4096} bytes)"
    assert rows["logical block size"] == rows["physical block size"] == "4096"
    assert rows["read-only"] == "no"
    assert rows["cache"] == "writeback"
    assert rows["range"] == f"bytes {256 * 4096}..{768 * 4096} of the image"
    assert re.fullmatch(r"VBLK-[0-9a-f]{15}", rows["serial"])
    assert fingerprint(img) == before


def test_info_with_flags(tmp_path):
    make_image(tmp_path / "disk.img", MiB + 100)
    r = vblk("info", "disk.img", "--ro", "--serial", "my-disk", "--sectorsize", "512/512",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = parse_info(r.stdout)
    assert rows["capacity"] == f"{MiB // 512} sectors of 512 bytes ({MiB} bytes)"
    assert rows["physical block size"] == "512"
    assert (rows["read-only"], rows["cache"], rows["serial"]) == ("yes", "writethrough", "my-disk")
    assert rows["range"] == "whole image (its last 100 bytes are not a whole block and are not served)"
    r = vblk("info", "disk.img", "--ro", "--sectorsize", "512/4096", "--range", "0/1M",
             cwd=tmp_path)
    assert parse_info(r.stdout)["range"] == f"bytes 0..{MiB} of the image"
    assert parse_info(r.stdout)["physical block size"] == "4096"


def test_info_shows_discard_and_write_zeroes(tmp_path):
    make_image(tmp_path / "disk.img", 4 * MiB)
    rows = parse_info(vblk("info", "disk.img,discard", cwd=tmp_path).stdout)
    assert rows["discard"] == (f"on, up to {4 * MiB // 512} sectors x 1 segments per request, "
                               f"alignment none")
    assert rows["write-zeroes"] == "yes, up to 65536 sectors x 1 segment, may unmap"
    rows = parse_info(vblk("info", "disk.img,discard", "--discard-limits", "64:4:8",
                           cwd=tmp_path).stdout)
    assert rows["discard"] == "on, up to 64 sectors x 4 segments per request, alignment 8"
    rows = parse_info(vblk("info", "disk.img,discard", "--no-discard", cwd=tmp_path).stdout)
    assert (rows["discard"], rows["write-zeroes"]) == ("off", "yes, up to 65536 sectors x 1 segment")
    rows = parse_info(vblk("info", "disk.img,ro,discard", cwd=tmp_path).stdout)
    assert (rows["discard"], rows["write-zeroes"]) == ("off (read-only)", "no (read-only)")


def test_info_json_has_the_tables_facts(tmp_path):
    make_image(tmp_path / "disk.img", 4 * MiB + 100)
    import json
    r = vblk("info", "disk.img,writeback,discard=64:4:8,range=8/2048", "--json", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    info = json.loads(r.stdout)
    table = parse_info(vblk("info", "disk.img,writeback,discard=64:4:8,range=8/2048",
                            cwd=tmp_path).stdout)
    assert (info["image"], info["kind"], info["image_bytes"]) == ("disk.img", "regular file",
                                                                  4 * MiB + 100)
    assert (info["capacity_bytes"], info["capacity_sectors"]) == (MiB, 2048)
    assert info["window"] == {"start": 8 * 512, "end": 8 * 512 + MiB}
    assert (info["cache"], info["read_only"], info["nocache"]) == ("writeback", False, False)
    assert info["cache"] == table["cache"] and info["serial"] == table["serial"]
    assert info["discard"] == {"max_sectors": 64, "max_segments": 4, "alignment_sectors": 8}
    assert info["write_zeroes"]["may_unmap"] is True
    ro = json.loads(vblk("info", "disk.img,ro", "--json", cwd=tmp_path).stdout)
    assert (ro["read_only"], ro["discard"], ro["write_zeroes"], ro["cache"]) == \
        (True, None, None, "writethrough")


def test_demo_refuses_an_existing_image_in_one_line(tmp_path):
    image = make_image(tmp_path / "disk.img", MiB, b"keep me")
    before = fingerprint(image)
    msg = one_error_line(vblk("demo", "--image", image, cwd=tmp_path))
    assert msg == f"--image {image} already exists; the demo formats its image, so give a new path"
    assert fingerprint(image) == before and sorted(tmp_path.iterdir()) == [image]


def test_info_serial_is_stable(tmp_path):
    make_image(tmp_path / "disk.img")
    a = parse_info(vblk("info", "disk.img", cwd=tmp_path).stdout)["serial"]
    b = parse_info(vblk("info", "disk.img,ro", cwd=tmp_path).stdout)["serial"]
    assert a == b


def test_info_errors_are_one_line(tmp_path):
    assert "does not exist" in one_error_line(vblk("info", "nope.img", cwd=tmp_path))


# -- a short serve ------------------------------------------------------------------------------

def wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vblk serve exited with {proc.returncode}: {proc.stderr.read()}")
        if path.exists():
            return
        time.sleep(0.05)
    pytest.fail(f"{path} did not appear within {timeout}s")


def test_serve_listens_logs_key_value_lines_and_stops_on_sigterm(tmp_path, sockdir):
    img = make_image(tmp_path / "disk.img", MiB, b"data")
    sock = sockdir / "vblk.sock"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "vblk.cli", "serve", "disk.img,writeback",
                             "--socket-path", str(sock), "--workers", "2"], cwd=tmp_path,
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        # The image is locked while it is served.
        r = vblk("info", "disk.img", cwd=tmp_path)
        assert "in use by another process" in one_error_line(r)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert not sock.exists()
    lines = [line for line in err.splitlines() if line]
    assert lines and all(re.match(r"ts=\S+ level=[A-Z]+ logger=\S+ ", line)
                         for line in lines if not line.startswith(("INFO", "WARNING", "DEBUG"))), err
    assert any("event=serving" in line and "image=disk.img" in line for line in lines), err
    assert img.read_bytes()[:4] == b"data"


def test_a_path_with_a_space_and_an_equals_sign_stays_one_log_field(tmp_path, sockdir):
    from tests.unit.test_logs import parse_fields
    folder = tmp_path / "my vms"
    folder.mkdir()
    img = make_image(folder / "disk=1 copy.img", MiB)
    sock = sockdir / "vm 1.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vblk.cli", "serve", "--blk-file", img,
                             "--socket-path", str(sock), "--workers", "1"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(sock, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    serving = [parse_fields(line) for line in err.splitlines() if "event=serving" in line]
    assert len(serving) == 1, err
    fields = serving[0]
    assert (fields["image"], fields["socket"]) == (str(img), str(sock)), err
    assert (fields["size"], fields["lbs"], fields["cache"]) == (str(MiB), "512", "writethrough")
    control = [parse_fields(line) for line in err.splitlines() if "event=control_listening" in line]
    assert control[0]["control"] == f"{sock}.ctl", err
    # numbers and names keep their bare form: the tests' quick parser still reads them
    line = next(li for li in err.splitlines() if "event=serving" in li)
    quick = dict(re.findall(r"(\w+)=(\S+)", line))
    assert (quick["event"], quick["size"], quick["iops_limit"]) == ("serving", str(MiB), "0")


def test_shell_completion_script_is_offered():
    out = subprocess.run([sys.executable, "-m", "vblk.cli", "--show-completion", "bash"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "complete" in out.stdout and "_VBLK_COMPLETE" in out.stdout.upper()
    words = subprocess.run(["bash", "-c", out.stdout + "\nCOMP_WORDS=(vblk se); COMP_CWORD=1; "
                            "_vblk_completion vblk; printf '%s\\n' \"${COMPREPLY[@]}\""],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ,
                                "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]})
    assert "serve" in words.stdout, words.stdout + words.stderr
