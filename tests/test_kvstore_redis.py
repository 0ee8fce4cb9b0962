"""The Redis tier with a real redis-server: sharing between servers, large blobs, Redis going away and back."""

from __future__ import annotations

import logging
import random
import shutil
import time

import pytest
import redis

from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig
from kvrecall.kvstore.testing import RedisProcess

pytestmark = pytest.mark.redis
MiB = 1 << 20


@pytest.fixture()
def redis_server():
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (CI installs the Debian package; apt-get install redis-server)")
    with RedisProcess() as proc:
        yield proc


def cfg(tmp_path, name: str, redis_url: str, **kw) -> ServerConfig:
    kw.setdefault("ram_bytes", 16 * MiB)
    kw.setdefault("disk_bytes", 64 * MiB)
    return ServerConfig(port=0, disk_dir=tmp_path / name, redis_url=redis_url, redis_timeout_s=0.5, **kw)


def data(seed, size: int) -> bytes:
    return random.Random(str(seed)).randbytes(size)


def test_two_servers_share_one_redis(tmp_path, redis_server):
    url = redis_server.url
    with BackgroundServer(cfg(tmp_path, "a", url)) as a, BackgroundServer(cfg(tmp_path, "b", url)) as b, \
            KVStoreClient(a.target, retries=0) as ka, KVStoreClient(b.target, retries=0) as kb:
        blob = data("shared", 3 * MiB + 7)
        assert ka.put(b"chunk/1", blob) == ["ram", "disk", "redis"]
        assert kb.exists([b"chunk/1", b"chunk/2"]).present == [True, False]
        assert kb.get(b"chunk/1") == blob  # found through the other server
        # the read promoted it into b's own tiers (RAM at once, disk in the background): Redis is no longer needed
        redis.Redis(port=redis_server.port).flushall()
        assert kb.get(b"chunk/1") == blob
        assert {t.name: t.hits for t in kb.stats().tiers}["redis"] == 1
        kb.put(b"chunk/2", b"from b")
        assert ka.get(b"chunk/2") == b"from b"


def test_two_servers_share_a_redis_cluster(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not found (CI installs the Debian package; apt-get install redis-server)")
    with RedisProcess(cluster=True) as node:
        url = node.url.rsplit("/", 1)[0]  # cluster mode has no database number
        kw = {"redis_cluster": True, "redis_part_bytes": 256 * 1024}
        with BackgroundServer(cfg(tmp_path, "a", url, **kw)) as a, \
                BackgroundServer(cfg(tmp_path, "b", url, **kw)) as b, \
                KVStoreClient(a.target, retries=0) as ka, KVStoreClient(b.target, retries=0) as kb:
            assert type(a.server.store.redis._client).__name__ == "RedisCluster"
            blobs = {b"c/%d" % i: data(i, 100_000 * i + 1) for i in range(6)}  # up to 3 parts each
            for k, v in blobs.items():
                assert ka.put(k, v) == ["ram", "disk", "redis"]
            assert kb.exists(list(blobs)).prefix_length == len(blobs)
            for k, v in blobs.items():
                assert kb.get(k) == v
            assert {t.name: t.hits for t in kb.stats().tiers}["redis"] == len(blobs)


def test_large_objects_are_split_and_rewrites_never_mix(tmp_path, redis_server):
    with BackgroundServer(cfg(tmp_path, "a", redis_server.url, redis_part_bytes=256 * 1024, ram_bytes=0,
                              disk_bytes=0)) as srv, KVStoreClient(srv.target, retries=0) as kv:
        first, second = data(1, MiB + 3), data(2, 300_000)
        assert kv.put(b"big", first) == ["redis"]
        r = redis.Redis(port=redis_server.port)
        parts = [k for k in r.scan_iter(b"kvrecall:v1:*") if not k.endswith(b":meta")]
        assert len(parts) == 5 and max(r.strlen(k) for k in parts) == 256 * 1024
        assert kv.get(b"big") == first
        kv.put(b"big", second)
        assert kv.get(b"big") == second
        assert kv.delete([b"big"]) == 1 and kv.get(b"big") is None


def test_corrupt_redis_object_is_not_served(tmp_path, redis_server):
    with BackgroundServer(cfg(tmp_path, "a", redis_server.url, ram_bytes=0, disk_bytes=0)) as srv, \
            KVStoreClient(srv.target, retries=0) as kv:
        kv.put(b"k", data(3, 5000))
        r = redis.Redis(port=redis_server.port)
        part = next(k for k in r.scan_iter(b"kvrecall:v1:*") if not k.endswith(b":meta"))
        r.setrange(part, 100, b"\xff\x00")
        assert kv.get(b"k") is None
        assert kv.stats().misses == 1


def test_redis_stopped_mid_run_degrades_cleanly_and_recovers(tmp_path, redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="kvrecall.kvstore.redis")
    # Every call has a deadline: a server waiting on the dead Redis would fail with DEADLINE_EXCEEDED.
    with BackgroundServer(cfg(tmp_path, "a", redis_server.url, metrics_port=0)) as srv, \
            KVStoreClient(srv.target, retries=0, timeout_s=8) as kv:
        kv.put(b"before", b"stored while redis was up")
        redis_server.stop()
        assert kv.put(b"during", b"stored while redis was down") == ["ram", "disk"]
        assert kv.get(b"before") == b"stored while redis was up"
        assert kv.get(b"during") == b"stored while redis was down"
        assert kv.get(b"absent") is None
        assert kv.exists([b"before", b"absent"]).present == [True, False]
        tiers = {t.name: t for t in kv.stats().tiers}
        assert tiers["redis"].available is False
        assert any("unavailable" in r.getMessage() for r in caplog.records)
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5).read()
        assert b'kvstore_tier_up{tier="redis"} 0.0' in text
        assert b'kvstore_tier_errors_total{tier="redis"}' in text
        redis_server.start()  # same port: the tier comes back after its back-off
        deadline = time.monotonic() + 20
        while kv.put(b"after", b"x") != ["ram", "disk", "redis"]:
            assert time.monotonic() < deadline, "redis tier did not recover"
            time.sleep(0.2)
        assert {t.name: t for t in kv.stats().tiers}["redis"].available is True
        assert any("back" in r.getMessage() for r in caplog.records)


def test_redis_down_at_start_still_serves(tmp_path):
    from kvrecall.kvstore.testing import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with BackgroundServer(cfg(tmp_path, "a", url)) as srv, KVStoreClient(srv.target, retries=0) as kv:
        assert kv.put(b"k", b"v") == ["ram", "disk"]
        assert kv.get(b"k") == b"v"
