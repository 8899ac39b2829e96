"""I/O rate limits: a token bucket per resource (requests, bytes) and the per-device limiter.

Theory of operation
-------------------
Sans-I/O: nothing here reads a clock. Every method takes ``now`` (seconds, any monotonic
origin) and the caller -- the supervisor -- passes ``time.monotonic()``.

A ``TokenBucket`` holds up to ``burst`` tokens and gains ``rate`` tokens per second. A request
may be *admitted* while the bucket is not in debt (``tokens >= 0``); admitting it then takes
its whole cost, which may push the bucket below zero. That is the one rule that keeps a
request larger than the burst from waiting forever: it is admitted as soon as the debt of the
ones before it is paid, and its own debt is paid afterwards. The cost of a request need not
be known before it is admitted, which is what lets the supervisor leave requests in the avail
ring (back-pressure) instead of popping, parsing and holding them: it asks ``ready(now)``
before it pops a chain, and ``charge(now, ...)`` once it knows what the chain is.

Bound: over any window of ``t`` seconds a bucket admits at most
``burst + rate * t + (cost of one request)`` -- the burst it may start with, what accrues, and
the last request that went into debt. Over a long run the rate is exact.

Bursts: by default a bucket holds a tenth of a second of its rate (at least one request for
IOPS), as QEMU's throttling does when no burst is given. For a 10 s measurement that adds at
most 1 % on top of the rate (and nothing in the steady state), well within 5 %; it lets a guest
that was idle send a short batch without waiting, and costs no more than a 100 ms wait after
the bucket runs dry.

A rate of 0 (or None) means unlimited: the bucket is then inactive and admits everything.
"""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BURST_SECONDS = 0.1        # a default bucket holds this many seconds of its rate
_EPSILON = 1e-9                    # float slack when the debt is paid exactly


def default_burst(rate: float, minimum: float = 1.0) -> float:
    """The burst a bucket gets when none is given: 0.1 s of ``rate``, at least ``minimum``."""
    return max(rate * DEFAULT_BURST_SECONDS, minimum)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; rate 0 = unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "explicit_burst")

    def __init__(self, rate: float = 0, burst: float | None = None, *, now: float = 0.0,
                 minimum_burst: float = 1.0) -> None:
        self.rate = 0.0
        self.burst = 0.0
        self.tokens = 0.0
        self.stamp = now
        self.explicit_burst = False
        self.configure(now, rate, burst, minimum_burst=minimum_burst)

    @property
    def active(self) -> bool:
        return self.rate > 0

    def configure(self, now: float, rate: float | None, burst: float | None = None, *,
                  minimum_burst: float = 1.0) -> None:
        """Change the rate (0/None: unlimited) and burst (None: the default for the rate).
        Tokens saved at the old rate are kept, up to the new burst; a debt is kept too, so
        changing the rate never lets requests through that were already paid for on credit.
        A bucket that was unlimited starts full."""
        rate = float(rate or 0)
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError("a rate and a burst are not negative")
        was_active = self.active
        self._refill(now)
        self.rate = rate
        self.explicit_burst = burst is not None
        self.burst = float(burst) if burst is not None else (default_burst(rate, minimum_burst)
                                                               if rate else 0.0)
        if not self.active:
            self.tokens = 0.0
        elif not was_active:
            self.tokens = self.burst
        else:
            self.tokens = min(self.tokens, self.burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if self.rate and now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def ready(self, now: float) -> bool:
        """May a request be admitted now (the bucket is not in debt)?"""
        if not self.rate:
            return True
        self._refill(now)
        return self.tokens >= -_EPSILON

    def take(self, now: float, cost: float) -> None:
        """Charge an admitted request's cost (the bucket may go into debt)."""
        if self.rate:
            self._refill(now)
            self.tokens -= cost

    def wait(self, now: float) -> float:
        """Seconds from ``now`` until ``ready`` (0 if it is ready now)."""
        if not self.rate:
            return 0.0
        self._refill(now)
        if self.tokens >= -_EPSILON:
            return 0.0
        return -self.tokens / self.rate


@dataclass(frozen=True, slots=True)
class Limits:
    """What an operator asks for: IOPS and bytes/s (0 = unlimited) and optional bursts."""
    iops: int = 0
    bps: int = 0
    iops_burst: int | None = None
    bps_burst: int | None = None

    def __post_init__(self) -> None:
        for name in ("iops", "bps", "iops_burst", "bps_burst"):
            value = getattr(self, name)
            if value is None and name.endswith("burst"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name.replace('_', '-')} {value!r} is not a whole number >= 0")
        if self.iops_burst is not None and (not self.iops or self.iops_burst < 1):
            raise ValueError("iops-burst needs an IOPS limit and is at least 1")
        if self.bps_burst is not None and (not self.bps or self.bps_burst < 1):
            raise ValueError("bps-burst needs a bytes/s limit and is at least 1")


class Limiter:
    """The limits of one device: a request bucket (IOPS) and a byte bucket (bytes/s), shared
    by all its queues, plus how often and how long requests had to wait for them."""

    def __init__(self, limits: Limits = Limits(), *, now: float = 0.0) -> None:
        self.iops = TokenBucket(now=now)
        self.bps = TokenBucket(now=now)
        self.unlimited = True
        self.throttle_events = 0            # times admission stopped for want of tokens
        self.throttled_s = 0.0              # time spent stopped (closed intervals)
        self._throttled_since: float | None = None
        self.set(now, limits)

    def set(self, now: float, limits: Limits) -> None:
        """Apply new limits at ``now``; what was saved or owed is carried over (see
        ``TokenBucket.configure``)."""
        self.iops.configure(now, limits.iops, limits.iops_burst, minimum_burst=1.0)
        self.bps.configure(now, limits.bps, limits.bps_burst, minimum_burst=1.0)
        self.unlimited = not (self.iops.active or self.bps.active)
        if self.unlimited:
            self.flowing(now)

    def limits(self) -> Limits:
        return Limits(int(self.iops.rate), int(self.bps.rate),
                      int(self.iops.burst) if self.iops.explicit_burst else None,
                      int(self.bps.burst) if self.bps.explicit_burst else None)

    # -- admission ----------------------------------------------------------------------
    def ready(self, now: float) -> bool:
        """May one more request be admitted now?"""
        return self.unlimited or (self.iops.ready(now) and self.bps.ready(now))

    def charge(self, now: float, requests: int, nbytes: int) -> None:
        """An admitted request (``requests`` = 1) moving ``nbytes`` of data."""
        if not self.unlimited:
            self.iops.take(now, requests)
            self.bps.take(now, nbytes)

    def delay(self, now: float) -> float:
        """Seconds until ``ready`` may be true again."""
        if self.unlimited:
            return 0.0
        return max(self.iops.wait(now), self.bps.wait(now))

    # -- accounting ---------------------------------------------------------------------
    def throttled(self, now: float) -> None:
        """Admission stopped for want of tokens (repeated calls extend one interval)."""
        if self._throttled_since is None:
            self._throttled_since = now
            self.throttle_events += 1

    def flowing(self, now: float) -> None:
        """Nothing waits for tokens any more."""
        if self._throttled_since is not None:
            self.throttled_s += max(0.0, now - self._throttled_since)
            self._throttled_since = None

    @property
    def is_throttled(self) -> bool:
        return self._throttled_since is not None

    def snapshot(self, now: float) -> dict:
        """Limits in effect and throttling so far, as a plain dict (for the control socket)."""
        ongoing = 0.0 if self._throttled_since is None else max(0.0, now - self._throttled_since)
        return {
            "iops": int(self.iops.rate), "iops_burst": round(self.iops.burst, 3),
            "bps": int(self.bps.rate), "bps_burst": round(self.bps.burst, 3),
            "throttle_events": self.throttle_events,
            "throttled_s": round(self.throttled_s + ongoing, 6),
            "throttled_now": self._throttled_since is not None,
        }
