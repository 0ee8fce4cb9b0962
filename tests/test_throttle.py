"""The token-bucket throttle: exact accounting with a fake clock, and its rate against a real kvstore server."""

import os
import time

import pytest

from kvrecall.kvstore.throttle import ThrottledClient, ThrottleError, TokenBucket, gbit_to_Bps


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_bucket_allows_the_burst_then_holds_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(1000.0, burst_bytes=500, clock=clock, sleep=clock.sleep)
    assert bucket.acquire(500) == 0.0  # the full bucket passes at once
    assert bucket.acquire(250) == pytest.approx(0.25)
    assert bucket.acquire(2000) == pytest.approx(2.0)  # larger than the bucket: waits its whole size
    clock.now += 10.0  # idle: refills, but never beyond the burst
    assert bucket.acquire(500) == 0.0
    assert bucket.acquire(1) == pytest.approx(0.001)


@pytest.mark.parametrize(
    "make", [lambda: TokenBucket(0), lambda: TokenBucket(float("inf")), lambda: TokenBucket(10, burst_bytes=0),
             lambda: TokenBucket(10).acquire(-1), lambda: gbit_to_Bps(0)]
)
def test_bad_settings_raise(make):
    with pytest.raises(ThrottleError):
        make()


def test_gbit_conversion():
    assert gbit_to_Bps(1) == 1.25e8 and gbit_to_Bps(100) == 1.25e10


def test_throttled_gets_from_a_real_server_hold_the_rate_within_ten_percent(tmp_path):
    from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig

    rate = 16e6  # far below loopback speed, so the bucket, not the link, sets the pace
    blobs = {f"k{i}".encode(): os.urandom(1 << 20) for i in range(8)}
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, disk_dir=tmp_path, ram_bytes=64 << 20)) as srv, \
            KVStoreClient(srv.target) as raw:
        for k, v in blobs.items():
            raw.put(k, v)
        with ThrottledClient(raw, rate) as slow:
            t0 = time.perf_counter()
            got = slow.get_many(list(blobs))
            elapsed = time.perf_counter() - t0
            assert [bytes(g) for g in got] == list(blobs.values())
            assert slow.bytes_in == 8 << 20
            achieved = (8 << 20) / elapsed
            assert 0.9 * rate <= achieved <= 1.1 * rate, f"achieved {achieved / 1e6:.1f} MB/s for {rate / 1e6} MB/s"
            t0 = time.perf_counter()
            one = slow.get(b"k0")
            single = (1 << 20) / (time.perf_counter() - t0)
            assert bytes(one) == blobs[b"k0"] and 0.9 * rate <= single <= 1.1 * rate
            assert slow.get(b"absent") is None
            assert slow.exists([b"k1"]).present == [True]  # passes through to the wrapped client
