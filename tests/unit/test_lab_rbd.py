"""The pure parts of the RBD comparison: rbd bench's options and output, and how the copies are
named to vblk and qemu-storage-daemon. No cluster, no process."""
from __future__ import annotations

import pytest

from vblk.backing.rbd_spec import parse_rbd
from vblk.lab.rbdbench import RbdBenchOutputError, bench_args, parse_rbd_bench
from vblk.lab.rbdimage import RbdSource, last_words
from vblk.lab.workload import Workload

# what rbd bench 16.2 prints (a readwrite run adds the read_/write_ lines)
OUTPUT = """\
bench  type readwrite read:write=70:30 io_size 4096 io_threads 4 bytes 4194304 pattern random
  SEC       OPS   OPS/SEC   BYTES/SEC
    1      9984   10001.2    39 MiB/s
elapsed: 1   ops: 12288   ops/sec: 10190.5   bytes/sec: 40 MiB/s
read_ops: 8601   read_ops/sec: 7133.2   read_bytes/sec: 28 MiB/s
write_ops: 3687   write_ops/sec: 3057.3   write_bytes/sec: 12 MiB/s
"""


def test_rbd_bench_output_is_read_from_its_final_line():
    assert parse_rbd_bench(OUTPUT) == (12288, 10190.5)
    assert parse_rbd_bench("elapsed: 0   ops: 20   ops/sec: 5000   bytes/sec: 20 MiB/s\n") \
        == (20, 5000.0)
    assert parse_rbd_bench("elapsed:     3  ops:   262144  ops/sec: 8.1e+04  bytes/sec: 1 GiB/s") \
        == (262144, 81000.0)
    for bad in ("", "  SEC       OPS   OPS/SEC   BYTES/SEC\n    1  9984  10001.2  39 MiB/s\n",
                "elapsed: 0   ops: 0   ops/sec: -nan   bytes/sec: 8 EiB/s\n",
                "elapsed: 0   ops: 5   ops/sec: inf   bytes/sec: 8 EiB/s\n"):
        with pytest.raises(RbdBenchOutputError):
            parse_rbd_bench(bad)


@pytest.mark.parametrize("spec, want", [
    ("randread:4k:32", "--io-type read --io-size 4096 --io-threads 32 --io-pattern rand"),
    ("read:128k:8", "--io-type read --io-size 131072 --io-threads 8 --io-pattern seq"),
    ("write:128k:8", "--io-type write --io-size 131072 --io-threads 8 --io-pattern seq"),
    ("randwrite:4k:1", "--io-type write --io-size 4096 --io-threads 1 --io-pattern rand"),
    ("randrw:4k:4", "--io-type readwrite --io-size 4096 --io-threads 4 --io-pattern rand"),
])
def test_a_workload_becomes_rbd_bench_options(spec, want):
    args = " ".join(bench_args(Workload.parse(spec, duration=1.0, rwmix=70), 1 << 20))
    assert args.startswith(f"bench {want} --io-total 1048576")
    assert args.endswith("--rbd_cache=false")
    assert ("--rw-mix-read 70" in args) == spec.startswith("randrw")
    two_queues = Workload.parse(spec, duration=1.0, queues=2)
    assert f"--io-threads {2 * two_queues.qd} " in " ".join(bench_args(two_queues, 4096))


def test_copies_are_named_alike_to_vblk_and_qsd():
    source = RbdSource(parse_rbd(r"rbd:pool/disk\:1:conf=/etc/ce\:ph/c.conf:id=client.vms"),
                       1 << 30, None, ())
    name = source.copy_name("0123abcd", "vblk")
    assert name == "disk:1.bench-0123abcd-vblk"
    back = parse_rbd(source.vblk_token(name))
    assert (back.pool, back.image, back.conf, back.user) == ("pool", name, "/etc/ce:ph/c.conf",
                                                             "vms")
    assert source.qsd_blockdev("a,b") == ("driver=rbd,pool=pool,image=a,,b,"
                                          "conf=/etc/ce:ph/c.conf,user=vms,node-name=disk0,"
                                          "cache.direct=on")
    bare = RbdSource(parse_rbd("rbd:p/i"), 1, None, ())
    assert bare.vblk_token("i2") == "rbd:p/i2"
    assert bare.qsd_blockdev("i2") == "driver=rbd,pool=p,image=i2,node-name=disk0,cache.direct=on"
    assert bare.rbd_argv("ls")[-1] == "ls" and "-c" not in bare.rbd_argv("ls")


def test_rbds_own_words_are_its_last_rbd_line():
    noise = "2026-12-07T08:00:19 7ff7 -1 auth: unable to find a keyring\n"
    assert last_words(noise + "rbd: error opening image x: (2) No such file or directory\n"
                      + "\n") == "rbd: error opening image x: (2) No such file or directory"
    assert last_words(noise) == noise.strip()
    assert last_words("") == "(no output)"
