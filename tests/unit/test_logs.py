"""Refusals are logged with their reason, but a hostile peer cannot flood the log."""
import logging

from vblk.logs import RateLimitedLog


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
