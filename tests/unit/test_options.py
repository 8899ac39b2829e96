"""vblk.options: ACRN's option string, the CLI flags on top, and the rules DiskOptions enforces."""
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblk.errors import ConfigError
from vblk.options import DiscardOption, DiskOptions, ServeConfig, merge_flags, parse_acrn
from vblk.units import format_size, parse_size, spell_size


def refused(spec: str, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_acrn(spec)
    for w in words:
        assert w in str(e.value), (spec, str(e.value))
    return str(e.value)


# -- the path and the defaults ----------------------------------------------------------------

def test_a_bare_path_gets_acrns_defaults():
    o = parse_acrn("/srv/disk.img")
    assert o == DiskOptions("/srv/disk.img")
    assert (o.readonly, o.writeback, o.nocache) == (False, False, False)
    assert (o.logical_block_size, o.physical_block_size) == (512, None)
    assert (o.range_start, o.range_size, o.serial) == (0, None, None)
    assert o.cache_mode == "writethrough"


def test_the_readme_example_parses_to_bytes():
    o = parse_acrn("disk.img,writeback,sectorsize=4096/4096,range=256/32768")
    assert o.writeback and o.logical_block_size == o.physical_block_size == 4096
    assert o.range_start == 256 * 4096 and o.range_size == 32768 * 4096


@pytest.mark.parametrize("spec", ["", ",ro", "iothread", "mq=1", "iothread,mq=1"])
def test_an_empty_path_is_refused(spec):
    refused(spec, "no image path")


def test_a_path_containing_nodisk_is_just_a_path():
    assert parse_acrn("/images/nodisk-backup.img").path == "/images/nodisk-backup.img"
    assert parse_acrn("./nodisk,ro").path == "./nodisk"


def test_the_nodisk_placeholder_is_refused_by_name():
    refused("nodisk", "nodisk", "not supported yet")


def test_a_nul_in_the_path_is_refused():
    refused("a\0b.img", "NUL")


# -- flags in the string ------------------------------------------------------------------------

def test_ro_and_nocache():
    o = parse_acrn("d.img,ro,nocache")
    assert o.readonly and o.nocache and not o.writeback


@pytest.mark.parametrize("spec, wb", [("d.img,writeback", True), ("d.img,writethru", False),
                                      ("d.img,writeback,writethru", False),
                                      ("d.img,writethru,writeback", True)])
def test_writeback_and_writethru_last_one_wins(spec, wb):
    assert parse_acrn(spec).writeback is wb


@pytest.mark.parametrize("value, lbs, pbs", [("512", 512, None), ("4096", 4096, None),
                                             ("512/4096", 512, 4096), ("1024/2048", 1024, 2048),
                                             ("4096/4096", 4096, 4096)])
def test_sectorsize(value, lbs, pbs):
    o = parse_acrn(f"d.img,sectorsize={value}")
    assert (o.logical_block_size, o.physical_block_size) == (lbs, pbs)


@pytest.mark.parametrize("value, words", [
    ("1000", ("1000", "not a power of two")),
    ("256", ("256", "outside 512..4096")),
    ("8192", ("8192", "outside 512..4096")),
    ("4096/512", ("physical block size 512", "smaller than the logical block size 4096")),
    ("512/8192", ("8192", "outside 512..4096")),
    ("512/1000", ("1000", "not a power of two")),
    ("abc", ("'abc'", "not a decimal number")),
    ("", ("want L or L/P",)),
    ("512/", ("want L or L/P",)),
    ("-512", ("not a decimal number",)),
])
def test_bad_sectorsize_names_the_problem(value, words):
    msg = refused(f"d.img,sectorsize={value}", *words)
    assert "sectorsize=" in msg


def test_range_counts_logical_sectors():
    o = parse_acrn("d.img,range=8/16")
    assert (o.range_start, o.range_size) == (8 * 512, 16 * 512)


def test_range_uses_the_final_sector_size_whatever_the_order():
    a = parse_acrn("d.img,range=2/3,sectorsize=4096")
    b = parse_acrn("d.img,sectorsize=4096,range=2/3")
    assert a == b
    assert (a.range_start, a.range_size) == (2 * 4096, 3 * 4096)


@pytest.mark.parametrize("value, words", [
    ("8", ("want range=START/COUNT",)), ("/8", ("want range=START/COUNT",)),
    ("8/", ("want range=START/COUNT",)), ("a/8", ("'a'", "not a decimal number")),
    ("8/-1", ("not a decimal number",)), ("8/0", ("count must be at least 1",)),
])
def test_bad_range_names_the_problem(value, words):
    refused(f"d.img,range={value}", f"range={value}", *words)


@pytest.mark.parametrize("name", ["sectorsize=512", "range=0/8"])
def test_an_option_with_a_value_may_be_given_once(name):
    key = name.split("=")[0]
    refused(f"d.img,{name},{name}", f"{key}= is given twice")


# -- ACRN's leading tokens --------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["iothread,d.img", "mq=1,d.img", "mq,d.img",
                                  "iothread,mq=1,d.img", "mq=1,iothread,d.img,ro"])
def test_iothread_and_mq1_before_the_path_are_accepted(spec):
    assert parse_acrn(spec).path == "d.img"


@pytest.mark.parametrize("spec, n", [("mq=2,d.img", 2), ("iothread,mq=4,d.img", 4),
                                     ("mq=64,d.img,ro", 64), ("mq,d.img", 1), ("d.img", 1)])
def test_mq_sets_the_number_of_queues(spec, n):
    assert parse_acrn(spec).num_queues == n


def test_mq_after_the_path_must_move():
    refused("d.img,mq=8", "'mq=8'", "must come before the path")


@pytest.mark.parametrize("spec", ["mq=0,d.img", "mq=65,d.img"])
def test_mq_out_of_range_is_refused(spec):
    refused(spec, spec.split(",")[0], "1..64")


def test_num_queues_flag_and_mq_string_do_not_mix():
    assert merge_flags(parse_acrn("d.img"), num_queues=4).num_queues == 4
    with pytest.raises(ConfigError, match="given twice"):
        merge_flags(parse_acrn("mq=2,d.img"), num_queues=4)
    with pytest.raises(ConfigError, match="1..64"):
        merge_flags(parse_acrn("d.img"), num_queues=0)


def test_mq_garbage_is_refused():
    refused("mq=x,d.img", "mq=x", "not a decimal number")


def test_iothread_with_a_value_is_refused_by_name():
    refused("iothread=2,d.img", "iothread=2", "not supported yet")


@pytest.mark.parametrize("token", ["iothread", "mq=1", "mq"])
def test_leading_tokens_after_the_path_must_move(token):
    refused(f"d.img,{token}", f"'{token}'", "must come before the path")


# -- refused options ----------------------------------------------------------------------------

@pytest.mark.parametrize("token, name", [("no_bst_block", "no_bst_block")])
def test_unimplemented_acrn_options_are_refused_by_name(token, name):
    refused(f"d.img,{token}", f"option '{name}' is not supported yet")


# -- discard ------------------------------------------------------------------------------------

def test_bare_discard_takes_acrns_defaults_decided_at_open():
    assert parse_acrn("d.img").discard is None
    d = parse_acrn("d.img,discard").discard
    assert d == DiscardOption(None, 1, 0)          # max sectors: the disk's size, at open


def test_the_default_discard_limit_is_the_disk_as_far_as_the_u32_reaches():
    from vblk.options import U32_MAX, default_max_discard_sectors
    assert default_max_discard_sectors(4 << 20) == 8192
    assert default_max_discard_sectors(4096 + 100) == 8               # whole sectors only
    assert default_max_discard_sectors(U32_MAX * 512) == U32_MAX
    assert default_max_discard_sectors(3 << 40) == U32_MAX            # 3 TiB: clamped


@pytest.mark.parametrize("value, want", [
    ("8:1:0", (8, 1, 0)), ("4294967295:256:4294967288", (2 ** 32 - 1, 256, 2 ** 32 - 8)),
    ("65536:4:8", (65536, 4, 8)), ("007:1:0", (7, 1, 0)),
])
def test_discard_with_three_numbers(value, want):
    d = parse_acrn(f"d.img,discard={value}").discard
    assert (d.max_sectors, d.max_segments, d.alignment) == want


@pytest.mark.parametrize("value, words", [
    ("", "want A:B:C"), ("8", "want A:B:C"), ("8:1", "want A:B:C"), ("8:1:0:0", "want A:B:C"),
    ("8:1:", "'' is not a decimal number"), ("a:1:0", "'a' is not a decimal number"),
    ("-8:1:0", "not a decimal number"), ("8:+1:0", "not a decimal number"),
    ("0x10:1:0", "not a decimal number"), ("8 :1:0", "not a decimal number"),
    ("0:1:0", "max sectors 0 is outside"), ("4294967296:1:0", "max sectors 4294967296 is outside"),
    ("8:0:0", "max segments 0 is outside"), ("8:257:0", "max segments 257 is outside"),
    ("8:1:4294967296", "alignment 4294967296 is outside"),
])
def test_bad_discard_values_are_refused(value, words):
    msg = refused(f"d.img,discard={value}", words)
    assert msg.startswith(f"discard={value}: ")


def test_discard_limits_must_be_whole_logical_blocks():
    refused("d.img,discard=4:1:0,sectorsize=4096", "max sectors 4", "4096-byte logical blocks")
    refused("d.img,sectorsize=4096,discard=8:1:4", "alignment 4", "4096-byte logical blocks")
    assert parse_acrn("d.img,discard=8:2:8,sectorsize=4096").discard == DiscardOption(8, 2, 8)
    with pytest.raises(ConfigError, match="alignment 1"):
        merge_flags(parse_acrn("d.img,discard=8:1:1"), sectorsize="4096")


def test_discard_given_twice_in_the_string_is_refused():
    refused("d.img,discard,discard=8:1:0", "discard is given twice")


def test_discard_flags_lay_over_the_string():
    base = parse_acrn("d.img,discard=16:2:8")
    assert merge_flags(base, discard=True).discard == DiscardOption(16, 2, 8)   # keeps limits
    assert merge_flags(base, discard=False).discard is None
    assert merge_flags(parse_acrn("d.img"), discard=True).discard == DiscardOption()
    assert merge_flags(parse_acrn("d.img"), discard_limits="32:4:0").discard == DiscardOption(32, 4, 0)
    assert merge_flags(base, discard_limits="32:4:0").discard == DiscardOption(32, 4, 0)
    with pytest.raises(ConfigError, match="contradict"):
        merge_flags(base, discard=False, discard_limits="32:4:0")
    with pytest.raises(ConfigError, match="--discard-limits 1:2: want A:B:C"):
        merge_flags(base, discard_limits="1:2")


@pytest.mark.parametrize("token", ["aio=threads", "aio=io_uring"])
def test_aio_does_not_apply(token):
    msg = refused(f"d.img,{token}")
    assert msg == "aio= does not apply to vblk: workers use synchronous I/O"


@pytest.mark.parametrize("token", ["discardfoo", "rangefoo=1/2", "sectorsizex=512", "aiox=1",
                                   "xyz", "RO", "ro=1", "writebackx", " ro", "range", "sectorsize"])
def test_options_are_matched_exactly_not_by_prefix(token):
    refused(f"d.img,{token}", f"unknown option '{token}'", "'d.img,")


def test_empty_tokens_are_refused():
    refused("d.img,,ro", "empty option")
    refused("d.img,", "empty option")


# -- DiskOptions' own rules -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"path": ""}, ("no image path",)),
    ({"logical_block_size": 768}, ("768", "not a power of two")),
    ({"physical_block_size": 256}, ("256", "outside 512..4096")),
    ({"logical_block_size": 4096, "physical_block_size": 512}, ("smaller than the logical",)),
    ({"range_start": -512}, ("negative",)),
    ({"range_start": 100}, ("100", "whole number of 512-byte logical sectors")),
    ({"range_size": 0}, ("at least one logical sector",)),
    ({"range_size": 1000}, ("1000", "whole number")),
    ({"logical_block_size": 4096, "range_start": 512}, ("512", "4096-byte")),
    ({"serial": ""}, ("serial is empty",)),
    ({"serial": "x" * 21}, ("21 bytes", "at most 20")),
    ({"serial": "dïsk"}, ("printable ASCII",)),
    ({"serial": "a\nb"}, ("printable ASCII",)),
])
def test_disk_options_validate_once(kwargs, words):
    args = {"path": "d.img", **kwargs}
    with pytest.raises(ConfigError) as e:
        DiskOptions(**args)
    for w in words:
        assert w in str(e.value)


def test_disk_options_are_frozen():
    o = DiskOptions("d.img")
    with pytest.raises(AttributeError):
        o.readonly = True       # type: ignore[misc]


def test_a_twenty_byte_serial_is_fine():
    assert DiskOptions("d.img", serial="A" * 20).serial == "A" * 20


# -- flags over the string ----------------------------------------------------------------------

def test_flags_override_the_string():
    o = parse_acrn("d.img,writeback")
    m = merge_flags(o, readonly=True, writeback=False, nocache=True, serial="disk-1")
    assert m.readonly and not m.writeback and m.nocache and m.serial == "disk-1"
    assert merge_flags(parse_acrn("d.img,writethru"), writeback=True).writeback


def test_no_flags_change_nothing():
    o = parse_acrn("d.img,ro,range=1/2")
    assert merge_flags(o) is o


def test_flag_range_counts_bytes_with_suffixes():
    m = merge_flags(parse_acrn("d.img"), range_="1M/128M")
    assert (m.range_start, m.range_size) == (1 << 20, 128 << 20)
    m = merge_flags(parse_acrn("d.img"), range_="0/1g")
    assert (m.range_start, m.range_size) == (0, 1 << 30)


def test_the_readme_flag_example_equals_the_string_example():
    flags = merge_flags(parse_acrn("disk.img"), writeback=True, sectorsize="4096/4096",
                        range_="1M/128M")
    assert flags == parse_acrn("disk.img,writeback,sectorsize=4096/4096,range=256/32768")


def test_flag_range_must_be_whole_logical_sectors():
    with pytest.raises(ConfigError, match=r"--range 100/4096: start 100 bytes is not a whole"):
        merge_flags(parse_acrn("d.img"), range_="100/4096")
    with pytest.raises(ConfigError, match=r"size 1024 bytes is not a whole number of 4096-byte"):
        merge_flags(parse_acrn("d.img,sectorsize=4096"), range_="0/1K")
    with pytest.raises(ConfigError, match=r"size 512 bytes is not a whole number of 4096-byte"):
        merge_flags(parse_acrn("d.img"), sectorsize="4096", range_="4K/512")


@pytest.mark.parametrize("value, words", [("4096", ("want START/SIZE",)),
                                          ("1X/2", ("'1X'", "not a size")),
                                          ("0/0", ("at least one logical sector",)),
                                          ("-1/2", ("not a size",))])
def test_bad_flag_range_names_the_problem(value, words):
    with pytest.raises(ConfigError) as e:
        merge_flags(parse_acrn("d.img"), range_=value)
    for w in words:
        assert w in str(e.value)


def test_flag_sectorsize():
    m = merge_flags(parse_acrn("d.img"), sectorsize="512/4096")
    assert (m.logical_block_size, m.physical_block_size) == (512, 4096)
    with pytest.raises(ConfigError, match="--sectorsize 3000: logical block size 3000 is not a power"):
        merge_flags(parse_acrn("d.img"), sectorsize="3000")


def test_sectorsize_both_ways_is_an_error_naming_both():
    with pytest.raises(ConfigError) as e:
        merge_flags(parse_acrn("d.img,sectorsize=512"), sectorsize="512")
    assert "sectorsize= in the option string" in str(e.value)
    assert "--sectorsize 512" in str(e.value)


def test_range_both_ways_is_an_error_naming_both():
    with pytest.raises(ConfigError) as e:
        merge_flags(parse_acrn("d.img,range=0/8"), range_="0/4K")
    assert "range= in the option string" in str(e.value) and "--range 0/4K" in str(e.value)


def test_a_flag_sectorsize_rescales_a_string_range_like_acrn():
    m = merge_flags(parse_acrn("d.img,range=2/3"), sectorsize="4096")
    assert (m.range_start, m.range_size) == (2 * 4096, 3 * 4096)


def test_a_bad_serial_flag_is_refused():
    with pytest.raises(ConfigError, match="at most 20"):
        merge_flags(parse_acrn("d.img"), serial="s" * 21)


# -- sizes ------------------------------------------------------------------------------------

# One grammar for every size vblk takes (--range, --bps-limit, vblk resize, vblk bench --bs):
# what --range took before (4K, 2M) and what vblk bench took (128k, 1GiB, 512b) both read.
@pytest.mark.parametrize("text, n", [("0", 0), ("512", 512), ("4K", 4096), ("4k", 4096),
                                     ("2M", 2 << 20), ("3G", 3 << 30), ("1T", 1 << 40),
                                     ("128k", 128 << 10), ("1GiB", 1 << 30), ("4MiB", 4 << 20),
                                     ("4mib", 4 << 20), ("64KB", 64 << 10), ("64Ki", 64 << 10),
                                     ("512B", 512), ("512b", 512), (" 16M ", 16 << 20)])
def test_parse_size(text, n):
    assert parse_size(text, "x") == n


@pytest.mark.parametrize("text", ["", "K", "B", "1.5M", "1 K", "0x10", "1P", "-1", "1KiBB",
                                  "1KBi", "512iB", "4 KiB", "١٢"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError, match="not a size"):
        parse_size(text, "x")


def test_a_flag_range_takes_every_size_spelling():
    m = merge_flags(parse_acrn("d.img"), range_="0/4MiB")
    assert (m.range_start, m.range_size) == (0, 4 << 20)
    assert merge_flags(parse_acrn("d.img"), range_="1KiB/2m").range_start == 1024


@pytest.mark.parametrize("n", [512, 1536, 4096, 128 << 10, 3 << 20, 1 << 30, 5 << 40, 7])
def test_spell_size_is_exact_and_read_back(n):
    assert parse_size(spell_size(n), "x") == n


def test_sizes_for_reading():
    assert [format_size(n) for n in (0, 512, 1023, 4096, 1536 * 1024, 3 << 30, 2 << 40)] == \
        ["0 B", "512 B", "1023 B", "4.0 KiB", "1.5 MiB", "3.0 GiB", "2.0 TiB"]


# -- ServeConfig ------------------------------------------------------------------------------

def serve_config(**kw):
    args = {"disk": DiskOptions("d.img"), "socket_path": "/run/vblk/d.sock", **kw}
    return ServeConfig(**args)


def test_serve_config_defaults():
    c = serve_config()
    assert (c.workers, c.slots, c.log_level, c.listen_fd) == (8, 64, "INFO", None)


@pytest.mark.parametrize("kw, words", [
    ({"socket_path": None}, ("exactly one of --socket-path and --fd",)),
    ({"listen_fd": 3}, ("exactly one of --socket-path and --fd",)),
    ({"socket_path": ""}, ("--socket-path is empty",)),
    ({"workers": 0}, ("--workers 0", "1..64")),
    ({"workers": 65}, ("--workers 65",)),
    ({"slots": 48}, ("--slots 48", "power of two")),
    ({"slots": 65536}, ("--slots 65536",)),
    ({"slots": 0}, ("--slots 0",)),
    ({"log_level": "LOUD"}, ("'LOUD'", "debug")),
])
def test_serve_config_validates(kw, words):
    with pytest.raises(ConfigError) as e:
        serve_config(**kw)
    for w in words:
        assert w in str(e.value)


def test_serve_config_with_an_fd():
    c = ServeConfig(DiskOptions("d.img"), listen_fd=3, slots=1, workers=64)
    assert c.socket_path is None and c.listen_fd == 3


# -- properties -------------------------------------------------------------------------------

OPTION_TOKENS = ["ro", "nocache", "writeback", "sectorsize=4096/4096", "range=3/7"]


@pytest.mark.parametrize("order", list(itertools.permutations(OPTION_TOKENS)))
def test_option_order_does_not_matter(order):
    assert parse_acrn("d.img," + ",".join(order)) == parse_acrn("d.img," + ",".join(OPTION_TOKENS))


@given(start=st.integers(0, 1 << 30), count=st.integers(1, 1 << 30),
       lbs=st.sampled_from([512, 1024, 2048, 4096]))
def test_string_range_and_flag_range_agree(start, count, lbs):
    s = parse_acrn(f"d.img,sectorsize={lbs},range={start}/{count}")
    f = merge_flags(parse_acrn(f"d.img,sectorsize={lbs}"), range_=f"{start * lbs}/{count * lbs}")
    assert s == f


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=30))
def test_parse_acrn_only_ever_raises_config_error(spec):
    try:
        o = parse_acrn(spec)
    except ConfigError:
        return
    assert o.path and "," not in o.path


# -- rate limits ------------------------------------------------------------------------------

def test_rate_limits_parse_counts_and_sizes():
    from vblk.options import parse_limits
    from vblk.ratelimit import Limits
    assert parse_limits() == Limits()
    assert parse_limits(iops="2k", bps="50M") == Limits(iops=2000, bps=50 << 20)
    assert parse_limits(iops="300", iops_burst="30", bps="4096", bps_burst="1K") == \
        Limits(300, 4096, 30, 1024)
    assert parse_limits(iops="0", bps="0") == Limits()


@pytest.mark.parametrize("kw, words", [
    (dict(iops="-1"), "--iops-limit -1"),
    (dict(iops="1.5"), "not a whole number"),
    (dict(bps="10Q"), "--bps-limit 10Q"),
    (dict(iops_burst="5"), "--iops-burst needs --iops-limit"),
    (dict(bps="1M", bps_burst="0"), "--bps-burst 0 must be at least 1"),
])
def test_bad_rate_limits_name_the_flag(kw, words):
    from vblk.options import parse_limits
    with pytest.raises(ConfigError) as e:
        parse_limits(**kw)
    assert words in str(e.value)


def test_a_burst_alone_is_a_change_for_a_running_vblk():
    from vblk.options import parse_limits
    assert parse_limits(iops_burst="5", burst_needs_rate=False) == {"iops_burst": 5}
