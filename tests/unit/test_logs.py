"""Refusals are logged with their reason, but a hostile peer cannot flood the log; a value that
would break a key=value parser (a path with a space or an ``=``) is quoted."""
import logging
import re

import pytest

from vblk.logs import RateLimitedLog, quote


def test_a_burst_is_logged_then_the_rest_is_counted(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("vblk.logs.time.monotonic", lambda: clock[0])
    limited = RateLimitedLog(burst=3, period=10.0, logger=logging.getLogger("t"))
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(50):
            limited.warning("chain", "event=chain_refused n=%d", i)
        limited.warning("other", "event=other")             # another kind has its own budget
        clock[0] += 11
        limited.warning("chain", "event=chain_refused n=%d", 99)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["event=chain_refused n=0", "event=chain_refused n=1", "event=chain_refused n=2",
                     "event=other", "event=log_suppressed kind=chain count=47",
                     "event=chain_refused n=99"]


# -- quoting: every field stays one field for a key=value parser ------------------------------

FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def parse_fields(line: str) -> dict[str, str]:
    """A logfmt reader: bare values end at a space, quoted ones at the closing quote."""
    out = {}
    for key, value in FIELD.findall(line):
        if value.startswith('"'):
            value = re.sub(r'\\x([0-9a-f]{2})', lambda m: chr(int(m.group(1), 16)), value[1:-1])
            value = re.sub(r'\\(.)', lambda m: {"n": "\n", "r": "\r", "t": "\t"}.get(m.group(1),
                                                                               m.group(1)), value)
        out[key] = value
    return out


@pytest.mark.parametrize("value", ["/var/lib/vblk/vm1.img", "fd:3", "4096", "writeback",
                                   "rbd:vms/disk1", "[15]"])
def test_a_value_that_needs_no_quotes_is_written_bare(value):
    assert quote(value) == value


@pytest.mark.parametrize("value", ["/srv/my disk.img", "/srv/a=b.img", 'say "hi"', "back\\slash",
                                   "two\nlines", "tab\there", "bell\x07", "", "rbd:p/i:conf=/c",
                                   "[15, 2]", "/srv/vm disk=2,writeback.img"])
def test_a_value_with_a_space_quote_equals_or_control_character_is_quoted(value):
    line = f"event=serving image={quote(value)} size=4096 socket=/run/vblk/a.sock"
    assert "\n" not in line and quote(value).startswith('"')
    assert parse_fields(line) == {"event": "serving", "image": value, "size": "4096",
                                  "socket": "/run/vblk/a.sock"}
    # the tests' own quick parser, (\w+)=(\S+), still reads the fields around it
    quick = dict(re.findall(r"(\w+)=(\S+)", line))
    assert (quick["event"], quick["size"], quick["socket"]) == ("serving", "4096", "/run/vblk/a.sock")


def test_exceptions_are_quoted_as_one_value():
    exc = OSError(5, "Input/output error")
    assert parse_fields(f"event=io_error error={quote(repr(exc))} worker=1") == \
        {"event": "io_error", "error": repr(exc), "worker": "1"}
