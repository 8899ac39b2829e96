"""vblk.stats counters, histogram and snapshot; the control protocol's answers and the
Prometheus text made from a snapshot; ``vblk stats``'s table (no sockets, no processes)."""
from __future__ import annotations

import json
import timeit
import tracemalloc

import msgpack
import pytest

from vblk.cli.ops import duration, micros, render
from vblk.control import ControlServer, parse_listen_address
from vblk.errors import ConfigError
from vblk.stats import BUCKETS, KINDS, Stats, percentiles
from vblk.units import format_size
from vblk.virtio.constants import BlkStatus, BlkType


def kind_counts(stats: Stats, field: str = "requests") -> dict[str, int]:
    t = stats.snapshot()["queues"][0]["types"]
    return {k: t[k][field] for k in KINDS}


def test_request_types_map_to_kinds():
    s = Stats(1)
    for rtype, n in ((BlkType.IN, 4096), (BlkType.OUT, 512), (BlkType.FLUSH, 0),
                     (BlkType.FLUSH_OUT, 0), (BlkType.GET_ID, 20), (BlkType.DISCARD, 8192),
                     (BlkType.WRITE_ZEROES, 1024), (BlkType.WRITE_ZEROES, 512), (0x7777, 0),
                     (2, 0)):
        s.started(0, rtype, n)
    assert kind_counts(s) == {"read": 1, "write": 1, "flush": 2, "get_id": 1, "discard": 1,
                              "write_zeroes": 2, "other": 2}
    assert kind_counts(s, "bytes") == {"read": 4096, "write": 512, "flush": 0, "get_id": 20,
                                       "discard": 8192, "write_zeroes": 1536, "other": 0}
    q = s.snapshot()["queues"][0]
    assert (q["requests"], q["bytes"], q["in_flight"]) == (10, 4628 + 8192 + 1536, 10)


def test_finished_counts_statuses_and_in_flight():
    s = Stats(2)
    for status in (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.IOERR, BlkStatus.UNSUPP):
        s.started(1, BlkType.OUT, 512)
        s.finished(1, BlkType.OUT, status, 1000)
    s.started(1, BlkType.IN, 512)
    s.refused(1)
    q0, q1 = s.snapshot()["queues"]
    assert (q1["in_flight"], q1["ioerr"], q1["unsupp"], q1["refused"]) == (1, 2, 1, 1)
    assert (q0["requests"], q0["in_flight"], q0["ioerr"]) == (0, 0, 0)


def test_served_counts_as_reads_started_and_finished_at_once():
    """Page-cache hits are counted per drain in one step; the snapshot is the same as for
    each one started and finished OK with a latency of 0."""
    one_by_one, bulk = Stats(1), Stats(1)
    for _ in range(3):
        one_by_one.started(0, BlkType.IN, 4096)
        one_by_one.finished(0, BlkType.IN, BlkStatus.OK, 0)
    bulk.served(0, 3, 3 * 4096)
    a, b = one_by_one.snapshot(histograms=True), bulk.snapshot(histograms=True)
    for snap in (a, b):
        snap.pop("uptime_s", None)
        snap.pop("started_at", None)
    assert a["queues"] == b["queues"]
    assert b["queues"][0]["types"]["read"]["requests"] == 3
    assert b["queues"][0]["in_flight"] == 0


@pytest.mark.parametrize("latency_ns, bucket", [
    (0, 0), (999, 0), (1000, 1), (1999, 1), (2000, 2), (3999, 2), (4000, 3),
    (1_000_000, 10),                     # 1000 µs: [512, 1024)
    ((1 << 30) * 1000, BUCKETS - 1), (10**15, BUCKETS - 1),
])
def test_latency_lands_in_its_log2_microsecond_bucket(latency_ns, bucket):
    s = Stats(1)
    s.started(0, BlkType.IN, 0)
    s.finished(0, BlkType.IN, 0, latency_ns)
    buckets = s.snapshot(histograms=True)["queues"][0]["types"]["read"]["latency_buckets"]
    assert len(buckets) == BUCKETS
    assert buckets[bucket] == 1 and sum(buckets) == 1


def test_percentiles_interpolate_inside_the_bucket():
    assert percentiles([0] * BUCKETS) == {"p50": None, "p99": None, "p99_9": None}
    one_bucket = [0] * BUCKETS
    one_bucket[6] = 1000                 # [32, 64) µs
    assert percentiles(one_bucket) == {"p50": 48.0, "p99": 63.7, "p99_9": 64.0}
    mixed = [0] * BUCKETS
    mixed[1], mixed[11] = 990, 10         # 990 at [1, 2) µs, 10 at [1024, 2048) µs
    p = percentiles(mixed)
    assert 1 <= p["p50"] < 2
    assert p["p99"] == 2.0               # the 990th of 1000 is the last of the fast ones
    assert 1024 <= p["p99_9"] <= 2048


def test_percentiles_by_kind_and_merged_per_queue():
    s = Stats(1)
    for _ in range(99):
        s.started(0, BlkType.IN, 4096)
        s.finished(0, BlkType.IN, 0, 50_000)
    s.started(0, BlkType.FLUSH, 0)
    s.finished(0, BlkType.FLUSH, 0, 5_000_000)
    q = s.snapshot()["queues"][0]
    assert 32 <= q["types"]["read"]["latency_us"]["p99_9"] <= 64
    assert 4096 <= q["types"]["flush"]["latency_us"]["p50"] <= 8192
    assert 32 <= q["latency_us"]["p50"] <= 64 and q["latency_us"]["p99_9"] >= 4096


def test_process_wide_fields():
    s = Stats(1, workers=8, info={"image": "d.img"})
    snap = s.snapshot()
    assert snap["frontend"] == {"connected": False, "since": None, "connections": 0}
    assert snap["workers"] == {"count": 8, "restarts": 0}
    assert snap["info"] == {"image": "d.img"} and snap["uptime_s"] >= 0
    s.frontend_connected()
    s.worker_restarted()
    snap = s.snapshot()
    assert snap["frontend"]["connected"] and snap["frontend"]["since"] <= snap["time"]
    assert snap["workers"]["restarts"] == 1
    s.frontend_disconnected()
    s.frontend_connected()
    assert s.snapshot()["frontend"]["connections"] == 2


def test_snapshot_travels_as_msgpack_and_json():
    s = Stats(1)
    s.started(0, BlkType.IN, 4096)
    s.finished(0, BlkType.IN, 0, 12_345)
    snap = s.snapshot(histograms=True)
    assert msgpack.unpackb(msgpack.packb(snap)) == snap
    assert json.loads(json.dumps(snap)) == snap


def test_the_hot_path_allocates_nothing_that_stays():
    s = Stats(1)
    for _ in range(100):                  # warm up: dict/list internals, int caches
        s.started(0, BlkType.IN, 4096)
        s.finished(0, BlkType.IN, 0, 40_000)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(20_000):
            s.started(0, BlkType.OUT if i & 1 else BlkType.IN, 4096)
            s.finished(0, BlkType.OUT if i & 1 else BlkType.IN, 0, 40_000 + i)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(d.size_diff for d in after.compare_to(before, "filename")
                if d.traceback[0].filename.endswith("stats.py"))
    assert grown < 1024, grown


def test_the_hot_path_is_cheap():
    """A loose bound (it is measured properly in the report): a pair costs well under 10 µs."""
    s = Stats(1)
    n = 20_000
    seconds = min(timeit.repeat(lambda: (s.started(0, 0, 4096), s.finished(0, 0, 0, 40_000)),
                                number=n, repeat=3))
    assert seconds / n < 10e-6, seconds / n


# -- the control protocol, without a socket -----------------------------------------------------

def test_control_answers():
    s = Stats(1, workers=2)
    with ControlServer(s.snapshot) as server:
        answer = server.handle({"op": "stats"})
        assert answer["ok"] and answer["stats"]["workers"]["count"] == 2
        assert "latency_buckets" not in answer["stats"]["queues"][0]["types"]["read"]
        assert "latency_buckets" in server.handle({"op": "stats", "histograms": True})["stats"][
            "queues"][0]["types"]["read"]
        assert server.handle({"op": "ping"}) == {"ok": True}
        assert server.handle({"op": "nope"}) == {"ok": False, "error": "unknown op 'nope'"}
        assert server.handle([1, 2]) == {"ok": False, "error": "a request is a map with an 'op'"}


def test_prometheus_text_from_a_snapshot():
    from prometheus_client.parser import text_string_to_metric_families
    s = Stats(1, workers=4, info={"image": "d.img"})
    s.started(0, BlkType.GET_ID, 20)
    s.finished(0, BlkType.GET_ID, 0, 3_000)
    for rtype, nbytes in ((BlkType.DISCARD, 1 << 20), (BlkType.WRITE_ZEROES, 4096)):
        s.started(0, rtype, nbytes)
        s.finished(0, rtype, 0, 50_000)
    with ControlServer(s.snapshot) as server:
        text = server.metrics_text().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["vblk_request_duration_seconds"].type == "histogram"
    assert families["vblk_requests"].type == "counter"
    assert families["vblk_info"].type == "gauge"        # text format 0.0.4 has no info type
    values = {(x.name, tuple(sorted(x.labels.items()))): x.value
              for f in families.values() for x in f.samples}
    assert values[("vblk_requests_total", (("queue", "0"), ("type", "get_id")))] == 1
    assert values[("vblk_requests_total", (("queue", "0"), ("type", "discard")))] == 1
    assert values[("vblk_requests_total", (("queue", "0"), ("type", "write_zeroes")))] == 1
    assert values[("vblk_request_bytes_total", (("queue", "0"), ("type", "discard")))] == 1 << 20
    assert values[("vblk_info", (("image", "d.img"),))] == 1
    assert values[("vblk_request_duration_seconds_bucket",
                   (("le", "4e-06"), ("queue", "0"), ("type", "get_id")))] == 1
    assert values[("vblk_request_duration_seconds_bucket",
                   (("le", "2e-06"), ("queue", "0"), ("type", "get_id")))] == 0


@pytest.mark.parametrize("text, want", [("127.0.0.1:9100", ("127.0.0.1", 9100)),
                                        ("[::1]:0", ("::1", 0)), ("localhost:80", ("localhost", 80))])
def test_metrics_listen_addresses(text, want):
    assert parse_listen_address(text) == want


@pytest.mark.parametrize("text", ["9100", ":9100", "host:", "host:http", "host:70000"])
def test_bad_metrics_listen_addresses(text):
    with pytest.raises(ConfigError):
        parse_listen_address(text)


# -- vblk stats's table --------------------------------------------------------------------------

def test_units_as_an_operator_reads_them():
    assert [format_size(n) for n in (0, 512, 4096, 1536 * 1024, 3 << 30)] == \
        ["0 B", "512 B", "4.0 KiB", "1.5 MiB", "3.0 GiB"]
    assert [micros(x) for x in (None, 0.4, 48, 1536, 2_500_000)] == \
        ["-", "0µs", "48µs", "1.54ms", "2.50s"]
    assert [duration(x) for x in (0, 59.9, 61, 3723)] == ["0s", "59s", "1m01s", "1h02m03s"]


def test_table_with_rates_from_two_snapshots():
    s = Stats(1, workers=8, info={"image": "d.img", "socket": "/run/vblk/d.sock"})
    first = s.snapshot()
    for _ in range(10):
        s.started(0, BlkType.IN, 4096)
        s.finished(0, BlkType.IN, 0, 100_000)
    second = s.snapshot()
    second["time"] = first["time"] + 2.0
    text = render(second, first)
    lines = text.splitlines()
    assert lines[0].startswith(f"vblk pid {second['pid']} | up ")
    assert "image d.img | socket /run/vblk/d.sock" in lines[0]
    assert lines[1] == "frontend: not connected, 0 connections since start | workers: 8, 0 restarts"
    header = next(line for line in lines if line.strip().startswith("type"))
    assert header.split() == ["type", "requests", "bytes", "p50", "p99", "p99.9", "req/s", "bytes/s"]
    read = next(line for line in lines if line.strip().startswith("read")).split()
    assert read[1:4] == ["10", "40.0", "KiB"] and read[-3:] == ["5.0", "20.0", "KiB"]
    assert "req/s" not in render(second)                  # one snapshot: no rates


def test_limits_in_the_snapshot_the_control_op_and_prometheus():
    from prometheus_client.parser import text_string_to_metric_families

    from vblk.ratelimit import Limiter, Limits
    s = Stats(1)
    assert s.snapshot()["limits"] is None
    s.limiter = Limiter(Limits(iops=300, bps=1 << 20))
    s.limiter.throttled(0.0)
    s.limiter.flowing(2.5)
    snap = s.snapshot()["limits"]
    assert (snap["iops"], snap["bps"], snap["throttle_events"]) == (300, 1 << 20, 1)
    with ControlServer(s.snapshot) as server:
        server.register("limit", lambda req: {"ok": True, "limits": {"iops": req["iops"]}})
        assert server.handle({"op": "limit", "iops": 5}) == {"ok": True, "limits": {"iops": 5}}
        text = server.metrics_text().decode()
    values = {x.name: x.value for f in text_string_to_metric_families(text) for x in f.samples}
    assert values["vblk_limit_iops"] == 300
    assert values["vblk_limit_bytes_per_second"] == 1 << 20
    assert values["vblk_throttle_events_total"] == 1
    assert values["vblk_throttled_seconds_total"] == 2.5
