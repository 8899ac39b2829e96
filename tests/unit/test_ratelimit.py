"""The token bucket and the per-device limiter, on a simulated clock."""
from __future__ import annotations

import random

import pytest

from vblk.ratelimit import DEFAULT_BURST_SECONDS, Limiter, Limits, TokenBucket


def simulate(limiter: Limiter, seconds: float, cost_bytes, *, step: float = 0.0005,
             start: float = 0.0, want: int = 10**9) -> list[tuple[float, int]]:
    """A greedy client that always has a request waiting; returns (time, bytes) admitted.
    The clock advances by ``step`` or straight to the limiter's wake-up time, like the
    supervisor's poll timeout (rounded up to ``step``)."""
    now, admitted = start, []
    while now < start + seconds and len(admitted) < want:
        if limiter.ready(now):
            n = cost_bytes()
            limiter.charge(now, 1, n)
            admitted.append((now, n))
            continue
        delay = limiter.delay(now)
        assert delay > 0, "not ready, yet no wait"
        now += max(step, delay)
    return admitted


def test_long_run_holds_the_iops_rate_within_a_tight_bound():
    rate = 1000
    lim = Limiter(Limits(iops=rate))
    got = simulate(lim, 100.0, lambda: 4096)
    burst = rate * DEFAULT_BURST_SECONDS
    assert rate * 100 <= len(got) <= rate * 100 + burst + 1
    # any 10 s window: within 1 % + one request
    times = [t for t, _ in got]
    for start in (5.0, 37.3, 80.0):
        inside = sum(1 for t in times if start <= t < start + 10)
        assert abs(inside - rate * 10) <= rate * 10 * 0.01 + 1


def test_long_run_holds_the_byte_rate_with_mixed_sizes():
    rng = random.Random(7)
    rate = 10 << 20
    lim = Limiter(Limits(bps=rate))
    got = simulate(lim, 60.0, lambda: rng.choice([512, 4096, 65536, 1 << 20]))
    total = sum(n for _, n in got)
    largest = max(n for _, n in got)
    assert rate * 60 - largest <= total <= rate * 60 + rate * DEFAULT_BURST_SECONDS + largest


def test_both_limits_the_tighter_one_wins():
    lim = Limiter(Limits(iops=500, bps=500 * 4096 // 2))     # bytes allow 250 4k IOPS
    got = simulate(lim, 20.0, lambda: 4096)
    assert abs(len(got) / 20 - 250) <= 250 * 0.02
    lim = Limiter(Limits(iops=100, bps=100 << 20))
    got = simulate(lim, 20.0, lambda: 4096)
    assert abs(len(got) / 20 - 100) <= 100 * 0.02


def test_burst_is_admitted_at_once_then_the_rate():
    lim = Limiter(Limits(iops=100, iops_burst=50))
    at_zero = simulate(lim, 0.0001, lambda: 0)
    assert len(at_zero) == 51           # the burst, plus one going into debt
    assert lim.delay(0.0) == pytest.approx(0.01)
    # after a long idle spell the bucket holds the burst again, not more
    again = simulate(lim, 0.0001, lambda: 0, start=100.0)
    assert len(again) == 51


def test_default_burst_is_a_tenth_of_a_second_and_at_least_one_request():
    assert TokenBucket(2000).burst == 200
    assert TokenBucket(5).burst == 1
    assert TokenBucket(10 << 20, minimum_burst=1).burst == (10 << 20) / 10


def test_a_request_larger_than_the_burst_is_admitted_and_its_debt_paid_later():
    lim = Limiter(Limits(bps=1000, bps_burst=100))
    assert lim.ready(0.0)
    lim.charge(0.0, 1, 10_000)          # 100x the burst: admitted
    assert not lim.ready(0.0)
    assert lim.delay(0.0) == pytest.approx(9.9)
    assert not lim.ready(9.8)
    assert lim.ready(9.9 + 1e-6)


def test_zero_and_none_mean_unlimited():
    for limits in (Limits(), Limits(iops=0, bps=0)):
        lim = Limiter(limits)
        assert lim.unlimited
        for _ in range(100_000):
            assert lim.ready(0.0)
            lim.charge(0.0, 1, 1 << 20)
        assert lim.delay(0.0) == 0.0
    b = TokenBucket(None)
    assert not b.active and b.ready(0.0) and b.wait(0.0) == 0.0


def test_rate_change_at_run_time():
    lim = Limiter(Limits(iops=100))
    first = simulate(lim, 10.0, lambda: 0)
    lim.set(10.0, Limits(iops=1000))
    second = simulate(lim, 10.0, lambda: 0, start=10.0)
    lim.set(20.0, Limits(iops=10))
    third = simulate(lim, 10.0, lambda: 0, start=20.0)
    assert abs(len(first) - 1000) <= 11
    assert abs(len(second) - 10_000) <= 2            # tokens kept, never more than the burst
    assert abs(len(third) - 100) <= 2
    lim.set(30.0, Limits())                          # unlimited again
    assert lim.unlimited and lim.ready(30.0) and not lim.is_throttled


def test_a_debt_survives_a_rate_change():
    lim = Limiter(Limits(bps=1000, bps_burst=1000))
    lim.charge(0.0, 1, 11_000)          # 10,000 in debt
    lim.set(0.0, Limits(bps=100_000))   # faster: the debt is paid in 0.1 s
    assert not lim.ready(0.05)
    assert lim.ready(0.1 + 1e-6)


def test_limited_after_unlimited_starts_with_a_full_bucket():
    lim = Limiter()
    lim.set(5.0, Limits(iops=10, iops_burst=3))
    assert len(simulate(lim, 0.0001, lambda: 0, start=5.0)) == 4


def test_throttle_accounting():
    lim = Limiter(Limits(iops=10))
    lim.throttled(1.0)
    lim.throttled(1.5)                  # the same interval
    lim.flowing(2.0)
    lim.throttled(3.0)
    snap = lim.snapshot(3.25)
    assert snap["throttle_events"] == 2
    assert snap["throttled_s"] == pytest.approx(1.25)
    assert snap["throttled_now"] is True
    assert snap["iops"] == 10 and snap["bps"] == 0


@pytest.mark.parametrize("bad", [dict(iops=-1), dict(bps=-5), dict(iops=1.5), dict(iops=True),
                                 dict(iops_burst=10), dict(iops=10, iops_burst=0),
                                 dict(bps_burst=4096)])
def test_limits_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        Limits(**bad)


def test_limits_round_trip():
    lim = Limiter(Limits(iops=300, bps=1 << 20, iops_burst=7))
    assert lim.limits() == Limits(300, 1 << 20, 7, None)
