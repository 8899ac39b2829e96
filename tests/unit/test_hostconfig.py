"""``vblk serve --config FILE``: the TOML becomes one ServeConfig per disk, or one refusal
that names the disk."""
from __future__ import annotations

import pytest

from vblk.errors import ConfigError
from vblk.hostconfig import HostConfig, check_host_config, load_host_config, parse_host_config
from vblk.options import ServeConfig, parse_acrn

MiB = 1 << 20


def disk(**kw) -> dict:
    return {"spec": "/img/a.img", "socket-path": "/run/a.sock", **kw}


def named(n: str, **kw) -> dict:
    return {"spec": f"/img/{n}.img", "socket-path": f"/run/{n}.sock", **kw}


def test_each_disk_gets_the_flags_of_vblk_serve():
    host = parse_host_config({"workers": 4, "log-level": "warning", "disk": [
        disk(spec="mq=2,/img/a.img,writeback", **{"iops-limit": "5k", "slots": 128}),
        {"spec": "/img/b.img", "socket-path": "/run/b.sock", "ro": True, "range": "1M/2M",
         "discard-limits": "8:1:0", "bps-limit": 1048576, "serial": "B",
         "control-socket": "/run/b-control", "socket-mode": "0660"},
    ]})
    assert (host.workers, host.log_level, host.control_socket) == (4, "WARNING", None)
    a, b = host.disks
    assert a.name == "a" and b.name == "b"
    assert a.serve.disk.num_queues == 2 and a.serve.disk.writeback
    assert (a.serve.limits.iops, a.serve.slots) == (5000, 128)
    assert b.serve.disk.readonly and (b.serve.disk.range_start, b.serve.disk.range_size) == (MiB, 2 * MiB)
    assert b.serve.disk.discard.max_sectors == 8 and b.serve.disk.serial == "B"
    assert (b.serve.limits.bps, b.serve.control_socket, b.serve.socket_mode) == \
        (MiB, "/run/b-control", 0o660)


def test_one_disk_of_vblk_serve_spec_is_a_host_of_one_without_a_name():
    config = ServeConfig(disk=parse_acrn("/img/a.img"), socket_path="/run/a.sock", workers=3,
                         poll_us=200)
    host = HostConfig.single(config)
    assert host.workers == 3 and [(d.name, d.serve) for d in host.disks] == [("", config)]
    assert host.poll_us == 200


def test_the_polling_window_is_the_hosts():
    assert parse_host_config({"poll-us": 0, "disk": [disk()]}).poll_us == 0
    assert parse_host_config({"disk": [disk()]}).poll_us is None       # the default window
    with pytest.raises(ConfigError, match="--poll-us 10001 is out of range 0..10000"):
        ServeConfig(disk=parse_acrn("/img/a.img"), socket_path="/run/a.sock", poll_us=10001)


def writeback_of(*tables: dict) -> tuple[list[bool], tuple[str, ...]]:
    host = parse_host_config({"disk": list(tables)}, where="host.toml")
    return [d.serve.disk.writeback for d in host.disks], host.warnings


def test_cache_means_what_dash_dash_cache_means():
    # like --cache, the key wins over the option string's writeback/writethru
    assert writeback_of(disk(cache="writeback"), named("b", cache="writethrough"),
                        named("c", spec="/img/c.img,writeback", cache="writethrough"),
                        named("d", spec="/img/d.img,writethru", cache="writeback"),
                        named("e", spec="/img/e.img,writeback")) == \
        ([True, False, False, True, True], ())


def test_the_old_writeback_key_still_works_with_one_warning_naming_the_disk():
    modes, warnings = writeback_of(disk(), named("b", writeback=True),
                                   named("c", spec="/img/c.img,writeback", writeback=False))
    assert modes == [False, True, False]
    assert warnings == (
        'host.toml: disk 2 (b): writeback = true is deprecated (it still works): use '
        'cache = "writeback"',
        'host.toml: disk 3 (c): writeback = false is deprecated (it still works): use '
        'cache = "writethrough"')


def test_nocache_is_o_direct_as_dash_dash_nocache_not_a_cache_mode_and_not_deprecated():
    host = parse_host_config({"disk": [disk(nocache=True), named("b", nocache=True,
                                                                 cache="writeback")]})
    a, b = (d.serve.disk for d in host.disks)
    assert (a.nocache, a.writeback, b.nocache, b.writeback) == (True, False, True, True)
    assert host.warnings == ()


@pytest.mark.parametrize("table, message", [
    (disk(cache="none"), 'disk 1 (a): cache = \'none\': give "writethrough" or "writeback"'),
    (disk(cache="writethru"), "disk 1 (a): cache = 'writethru': give"),
    (disk(cache=True), "disk 1 (a): cache = True is not a string"),
    (disk(writeback="yes"), "disk 1 (a): writeback = 'yes' is not true or false"),
    (disk(cache="writeback", writeback=False), "disk 1 (a): cache = 'writeback' and its old "
                                               "spelling writeback = false are both given: "
                                               "give cache only"),
    (disk(cache="writeback", writeback=True), "disk 1 (a): cache = 'writeback' and its old "
                                              "spelling writeback = true are both given"),
])
def test_a_bad_cache_or_cache_with_its_old_spelling_is_refused_naming_the_disk(table, message):
    with pytest.raises(ConfigError) as exc:
        parse_host_config({"disk": [table]}, where="host.toml")
    assert str(exc.value).startswith("host.toml: " + message), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("data, message", [
    ({}, "no disk"),
    ({"disk": []}, "no disk"),
    ({"disks": [disk()]}, "unknown key 'disks'"),
    ({"workers": 0, "disk": [disk()]}, "workers 0 is out of range"),
    ({"workers": "8", "disk": [disk()]}, "workers = '8' is not an integer"),
    ({"log-level": "loud", "disk": [disk()]}, "log level 'loud'"),
    ({"poll-us": 20000, "disk": [disk()]}, "poll-us 20000 is out of range 0..10000"),
    ({"poll-us": -1, "disk": [disk()]}, "poll-us -1 is out of range"),
    ({"poll-us": "50", "disk": [disk()]}, "poll-us = '50' is not an integer"),
    ({"disk": [disk(), {"spec": "/img/b.img"}]}, "disk 2: socket-path is missing"),
    ({"disk": [disk(frob=1)]}, "disk 1 (a): unknown key 'frob'"),
    ({"disk": [disk(ro="yes")]}, "disk 1 (a): ro = 'yes' is not true or false"),
    ({"disk": [disk(**{"num-queues": True})]}, "num-queues = True is not an integer"),
    ({"disk": [disk(spec="/img/a.img,bogus")]}, "disk 1 (a): unknown option 'bogus'"),
    ({"disk": [disk(**{"slots": 3})]}, "disk 1 (a): --slots 3 must be a power of two"),
    ({"disk": [disk(**{"iops-burst": 5})]}, "disk 1 (a): --iops-burst needs --iops-limit"),
    ({"disk": [disk(name="../x")]}, "name '../x' must be"),
    ({"disk": [disk(), disk(spec="/img/b.img", name="b")]},
     "disk 2 (b): socket-path /run/a.sock is already disk 1 (a)'s socket-path"),
    ({"disk": [disk(), disk(spec="/img/b.img", **{"socket-path": "/run/x/a.sock"})]},
     "disk 2 (a): name a is already disk 1 (a)'s name"),
    ({"disk": [disk(), disk(name="b", **{"socket-path": "/run/b.sock",
                                         "control-socket": "/run/a.sock"})]},
     "disk 2 (b): control-socket /run/a.sock is already disk 1 (a)'s socket-path"),
    ({"control-socket": "/run/a.sock.ctl", "disk": [disk()]},
     "disk 1 (a): control-socket /run/a.sock.ctl is already the host's control-socket"),
])
def test_a_bad_config_is_refused_with_the_disk_and_the_problem(data, message):
    with pytest.raises(ConfigError) as exc:
        parse_host_config(data, where="host.toml")
    assert str(exc.value).startswith("host.toml: ")
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_an_unreadable_or_invalid_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="No such file"):
        load_host_config(str(tmp_path / "none.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[[disk]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_host_config(str(bad))


def _image(tmp_path, name: str, size: int = MiB) -> str:
    path = tmp_path / name
    path.write_bytes(bytes(size))
    return str(path)


def test_the_images_are_checked_and_two_writers_of_the_same_bytes_refused(tmp_path):
    a, b = _image(tmp_path, "a.img", 4 * MiB), _image(tmp_path, "b.img")
    sock = str(tmp_path / "{}.sock")

    def host(*disks):
        return parse_host_config({"disk": [{"spec": s, "socket-path": sock.format(i)}
                                           for i, s in enumerate(disks)]}, where="h")
    check_host_config(host(a, b), where="h")
    check_host_config(host(f"{a},range=0/2048", f"{a},range=2048/2048"), where="h")   # halves
    check_host_config(host(f"{a},ro", f"{a},ro"), where="h")                           # readers
    with pytest.raises(ConfigError, match=r"h: disk 2 \(1\): its window of .* overlaps disk 1"):
        check_host_config(host(a, f"{a},range=2048/2048"), where="h")
    with pytest.raises(ConfigError, match=r"h: disk 2 \(1\): .*missing.img"):
        check_host_config(host(a, str(tmp_path / "missing.img")), where="h")
    with pytest.raises(ConfigError, match=r"h: disk 1 \(a\): socket directory .* does not exist"):
        check_host_config(parse_host_config({"disk": [{"spec": a, "socket-path":
                                                       str(tmp_path / "no" / "a.sock")}]},
                                            where="h"), where="h")


# -- slot-capacity ---------------------------------------------------------------------------

def test_the_slot_area_has_room_for_added_disks_only_where_disks_can_be_added():
    from vblk.hostconfig import DEFAULT_SLOT_ROOM, slot_area_size
    plain = parse_host_config({"disk": [disk()]})
    assert slot_area_size(plain, 64) == 64                       # no control socket: no add
    hosted = parse_host_config({"control-socket": "/run/h.ctl", "disk": [disk()]})
    assert DEFAULT_SLOT_ROOM == 4096
    assert slot_area_size(hosted, 64) == 64 + DEFAULT_SLOT_ROOM
    assert slot_area_size(hosted, 6400) == 6400 + DEFAULT_SLOT_ROOM   # many disks: room still
    sized = parse_host_config({"control-socket": "/run/h.ctl", "slot-capacity": 512,
                               "disk": [disk(slots=256), disk(spec="rbd:p/i", slots=1024,
                                                              **{"socket-path": "/run/r.sock"})]})
    assert sized.slot_capacity == 512 and slot_area_size(sized, 256) == 512


@pytest.mark.parametrize("data, message", [
    ({"slot-capacity": 512, "disk": [disk()]}, "slot-capacity means nothing without control-socket"),
    ({"control-socket": "/run/h.ctl", "slot-capacity": 100, "disk": [disk(slots=128)]},
     "slot-capacity 100 is out of range 128..262144"),
    ({"control-socket": "/run/h.ctl", "slot-capacity": "4k", "disk": [disk()]},
     "slot-capacity = '4k' is not an integer"),
])
def test_a_bad_slot_capacity_is_refused(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_host_config(data, where="host.toml")


# -- a disk added at run time ----------------------------------------------------------------

def test_a_disk_file_holds_one_disk_table_and_nothing_else(tmp_path):
    from vblk.hostconfig import load_disk_file
    good = tmp_path / "vm3.toml"
    good.write_text('[[disk]]\nname = "vm3"\nspec = "/img/c.img"\nsocket-path = "/run/c.sock"\n'
                    'num-queues = 2\n')
    assert load_disk_file(str(good)) == {"name": "vm3", "spec": "/img/c.img",
                                         "socket-path": "/run/c.sock", "num-queues": 2}
    for text in ('workers = 2\n[[disk]]\nspec = "/a"\n', '[[disk]]\nspec = "/a"\n[[disk]]\n',
                 '[disk]\nspec = "/a"\n', 'spec = "/a"\n', ''):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match="holds one \\[\\[disk\\]\\] table and nothing else"):
            load_disk_file(str(bad))
    dated = tmp_path / "dated.toml"
    dated.write_text('[[disk]]\nspec = 1979-05-27\n')
    with pytest.raises(ConfigError, match="spec = datetime.date.* is not a value any disk key"):
        load_disk_file(str(dated))
    with pytest.raises(ConfigError, match="none.toml: No such file"):
        load_disk_file(str(tmp_path / "none.toml"))


def test_an_added_disk_is_parsed_as_a_table_of_the_config_with_absolute_paths():
    from vblk.hostconfig import parse_added_disk
    host = parse_host_config({"workers": 3, "disk": [disk()]})
    entry, label = parse_added_disk(disk(spec="/img/c.img,writeback", name="vm3"), 4, host, "f")
    assert label == "disk 5 (vm3)" and entry.serve.disk.writeback and entry.serve.workers == 3
    for table, message in [
        (disk(frob=1, name="vm3"), "f: disk 5 (vm3): unknown key 'frob'"),
        (disk(spec="img/c.img"), "f: disk 5 (a): spec: img/c.img is a relative path"),
        (disk(**{"socket-path": "c.sock"}), "f: disk 5 (c): socket-path: c.sock is a relative path"),
        (disk(**{"control-socket": "c.ctl"}), "f: disk 5 (a): control-socket: c.ctl is a relative"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_added_disk(table, 4, host, "f")
        assert str(exc.value).startswith(message), str(exc.value)
    entry, _ = parse_added_disk(disk(spec="rbd:pool/img"), 4, host, "f")    # not a path
    assert entry.serve.disk.path == "rbd:pool/img"
    warnings: list[str] = []
    entry, _ = parse_added_disk(disk(writeback=True, name="vm3"), 4, host, "f", warnings)
    assert entry.serve.disk.writeback
    assert warnings == ['f: disk 5 (vm3): writeback = true is deprecated (it still works): use '
                        'cache = "writeback"']


def test_an_added_disk_is_checked_against_the_served_ones_as_the_last_table_of_their_file(
        tmp_path):
    from vblk.backing import check_backing
    from vblk.hostconfig import check_added_disk, parse_added_disk
    a, b = _image(tmp_path, "a.img", 4 * MiB), _image(tmp_path, "b.img")
    sock = str(tmp_path / "{}.sock")
    host = parse_host_config({"control-socket": str(tmp_path / "host.ctl"), "disk": [
        {"spec": f"{a},range=0/4096", "socket-path": sock.format("a"), "name": "a"}]})
    served = [("disk 1 (a)", e, check_backing(e.serve.disk)) for e in host.disks]

    def add(**table):
        entry, label = parse_added_disk({"socket-path": sock.format("new"), **table}, 1, host, "f")
        return check_added_disk(entry, label, served, host, "f")
    assert add(spec=b).size == MiB
    assert add(spec=f"{a},range=4096/4096").start == 4096 * 512            # the other half
    for table, message in [
        ({"spec": b, "name": "a"}, "f: disk 2 \\(a\\): name a is already disk 1 \\(a\\)'s name"),
        ({"spec": b, "name": "x", "socket-path": sock.format("a")},
         "socket-path .*a.sock is already disk 1 \\(a\\)'s socket-path"),
        ({"spec": b, "control-socket": str(tmp_path / "host.ctl")},
         "control-socket .*host.ctl is already the host's control-socket"),
        ({"spec": f"{a},range=2048/4096"},
         "f: disk 2 \\(new\\): its window of .*a.img.* overlaps disk 1 \\(a\\)'s and one of them"),
        ({"spec": str(tmp_path / "missing.img")}, "f: disk 2 \\(new\\): .*missing.img"),
        ({"spec": b, "socket-path": str(tmp_path / "no" / "x.sock")}, "socket directory"),
        ({"spec": f"{b},sectorsize=3000"}, "f: disk 2 \\(new\\): "),
    ]:
        with pytest.raises(ConfigError, match=message):
            add(**table)
