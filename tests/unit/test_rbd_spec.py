"""The rbd: image token (QEMU's rbd filename syntax): what it means and what is refused."""
import pytest

from vblk.backing.rbd_spec import RbdSpec, is_rbd, parse_rbd
from vblk.errors import ConfigError
from vblk.options import parse_acrn


@pytest.mark.parametrize("text, want", [
    ("rbd:vms/disk1", RbdSpec("vms", "disk1")),
    ("rbd:vms/disk1@before-upgrade", RbdSpec("vms", "disk1", "before-upgrade")),
    ("rbd:vms/disk1:conf=/etc/ceph/ceph.conf:id=vms",
     RbdSpec("vms", "disk1", conf="/etc/ceph/ceph.conf", user="vms")),
    ("rbd:vms/disk1:id=client.vms", RbdSpec("vms", "disk1", user="vms")),
    ("rbd:vms/disk1:rados_osd_op_timeout=60:keyring=/k",
     RbdSpec("vms", "disk1", options=(("rados_osd_op_timeout", "60"), ("keyring", "/k")))),
    ("rbd:vms/disk1:mon_host=10.0.0.1\\:3300", RbdSpec("vms", "disk1",
                                                       options=(("mon_host", "10.0.0.1:3300"),))),
    ("rbd:vms/a\\@b@s", RbdSpec("vms", "a@b", "s")),
])
def test_spellings(text, want):
    assert is_rbd(text) and parse_rbd(text) == want


@pytest.mark.parametrize("text, match", [
    ("rbd:", "want POOL/IMAGE"),
    ("rbd:vms", "want POOL/IMAGE"),
    ("rbd:vms/", "want POOL/IMAGE"),
    ("rbd:/disk", "want POOL/IMAGE"),
    ("rbd:a/b/c", "want POOL/IMAGE"),
    ("rbd:vms/disk@", "empty snapshot"),
    ("rbd:vms/disk@a@b", "more than one @"),
    ("rbd:vms/disk:conf", "not KEY=VALUE"),
    ("rbd:vms/disk:=x", "not KEY=VALUE"),
    ("rbd:vms/disk:id=", "not KEY=VALUE"),
])
def test_refusals_name_the_problem(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_rbd(text)


def test_the_token_sits_where_acrn_puts_the_path():
    opts = parse_acrn("rbd:vms/disk1:conf=/etc/ceph/ceph.conf,writeback,sectorsize=4096/4096,"
                      "range=8/1024")
    assert opts.path == "rbd:vms/disk1:conf=/etc/ceph/ceph.conf"
    assert (opts.writeback, opts.logical_block_size, opts.range_start, opts.range_size) == \
        (True, 4096, 8 * 4096, 1024 * 4096)
    assert parse_rbd(opts.path).conf == "/etc/ceph/ceph.conf"
    assert not is_rbd("./rbd:not-a-spec.img") and not is_rbd("/var/lib/rbd.img")


@pytest.mark.parametrize("spec, match", [
    ("rbd:vms/disk1@snap", "is a snapshot, which is read-only: pass ro"),
    ("rbd:vms/disk1,nocache", "nocache is for files"),
])
def test_refused_before_any_cluster_is_asked(spec, match):
    from vblk.backing import check_backing, open_backing
    for f in (check_backing, open_backing):
        with pytest.raises(ConfigError, match=match):
            f(parse_acrn(spec))
