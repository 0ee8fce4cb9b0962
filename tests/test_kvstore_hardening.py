"""Hostile clients, full disks, precise errors and counts: the defects of issue 13, each against a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrecall.kvstore import BackgroundServer, KVStoreClient, KVStoreError, Limits, ServerConfig
from kvrecall.kvstore.auth import bearer_credentials
from kvrecall.kvstore.server import TIER_HEALTH_PREFIX
from kvrecall.kvstore.testing import RedisProcess, free_port
from kvrecall.kvstore.tiers_disk import DiskTier
from kvrecall.kvstore.objects import StoredObject, crc32_of
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

MiB = 1 << 20
PUT = "/kvrecall.kvstore.v1.KVStore/Put"
needs_redis = pytest.mark.skipif(
    not Path("/usr/bin/redis-server").exists() and not __import__("shutil").which("redis-server"),
    reason="redis-server not installed")


def config(tmp_path: Path, **kw) -> ServerConfig:
    kw.setdefault("disk_dir", tmp_path / "store")
    kw.setdefault("ram_bytes", 64 * MiB)
    kw.setdefault("disk_bytes", 256 * MiB)
    return ServerConfig(port=0, **kw)


def header(key: bytes, total: int, crc: int = 0) -> bytes:
    return pb.PutRequest(header=pb.ObjectHeader(key=key, total_bytes=total, crc32=crc)).SerializeToString()


def serve_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvrecall.cli", "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------------- 1. secrets in logs
def test_redact_url_hides_every_form_of_password():
    from kvrecall.kvstore.secrets import redact_text, redact_url, resolve_url

    assert redact_url("redis://:hunter2@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("rediss://alice:hunter2@h:1/0") == "rediss://alice:***@h:1/0"
    assert "hunter2" not in redact_url("redis://hunter2@h:1/0")
    assert "hunter2" not in redact_url("redis://h:1/0?password=hunter2&db=1") and "db=1" in redact_url(
        "redis://h:1/0?password=hunter2&db=1")
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_text("Error for redis://:hunter2@h:1/0 (hunter2)", "redis://:hunter2@h:1/0").count("hunter2") == 0
    os.environ["KVR_TEST_URL_X"] = "redis://:pw@h:1/0"
    try:
        assert resolve_url("env:KVR_TEST_URL_X") == "redis://:pw@h:1/0"
    finally:
        del os.environ["KVR_TEST_URL_X"]
    with pytest.raises(ValueError, match="KVR_TEST_UNSET"):
        resolve_url("env:KVR_TEST_UNSET")
    with pytest.raises(ValueError, match="cannot read"):
        resolve_url("file:/nonexistent/kvrecall-url")


@needs_redis
def test_redis_password_from_env_or_file_never_printed(tmp_path):
    import redis

    secret = "pw-" + os.urandom(6).hex()
    with RedisProcess() as rp:
        redis.Redis(port=rp.port).config_set("requirepass", secret)
        url = f"redis://:{secret}@127.0.0.1:{rp.port}/0"
        (tmp_path / "url").write_text(url + "\n")
        cfg = config(tmp_path, redis_url_file=tmp_path / "url", disk_dir=None)
        assert cfg.redis_url == url and secret not in repr(cfg)
        from kvrecall.kvstore.testing import ServerProcess

        srv = ServerProcess(["--redis-url", "env:KVR_REDIS_URL", "--disk-bytes", "0", "--log-level", "INFO"],
                            env={"KVR_REDIS_URL": url})
        with srv:
            cmdline = Path(f"/proc/{srv.proc.pid}/cmdline").read_bytes()
            assert secret.encode() not in cmdline  # what `ps` shows
            with KVStoreClient(srv.target, retries=0, timeout_s=10) as kv:
                assert kv.put(b"k", b"v") == ["ram", "redis"]
                rp.stop()  # the tier logs that Redis is down: with the URL, never with the password
                assert kv.put(b"k2", b"v") == ["ram"]
            assert srv.terminate() == 0
        text = "".join(srv.lines)
        assert "unavailable" in text and f"redis://:***@127.0.0.1:{rp.port}/0" in text
        assert secret not in text


# ------------------------------------------------------------------------------------- 2. memory, idle streams
def test_header_only_puts_hold_no_memory_and_stalled_streams_time_out(tmp_path):
    limits = Limits(max_inflight_put_bytes=64 * MiB, put_idle_timeout_s=1.5)
    release = threading.Event()

    def stalled(key: bytes):
        yield header(key, 1 << 30)  # declares 1 GiB, sends nothing more
        release.wait(20)

    with BackgroundServer(config(tmp_path, limits=limits)) as srv, grpc.insecure_channel(srv.target) as ch:
        put = ch.stream_unary(PUT, request_serializer=None, response_deserializer=pb.PutResponse.FromString)
        before = rss_bytes()
        t0 = time.monotonic()
        calls = [put.future(stalled(b"stall/%d" % i), timeout=30) for i in range(2)]
        with KVStoreClient(srv.target, retries=0, timeout_s=20) as kv:
            blob = os.urandom(8 * MiB)
            assert kv.put(b"other", blob) == ["ram", "disk"]  # others' Puts are not refused meanwhile
            assert kv.get(b"other") == blob
        assert rss_bytes() - before < 256 * MiB  # a 1 GiB buffer per header would show here
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=20)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing" in err.value.details()
        assert time.monotonic() - t0 < 15  # ended by the idle timeout, not by the client's 30 s deadline
        release.set()
        assert srv.server.service._inflight.used == 0
        reg = srv.server.metrics.registry
        deadline = time.monotonic() + 10
        while reg.get_sample_value("kvstore_requests_total", {"method": "Put", "code": "DEADLINE_EXCEEDED"}) != 2:
            assert time.monotonic() < deadline, "stalled Puts not counted as DEADLINE_EXCEEDED"
            time.sleep(0.05)


# ------------------------------------------------------------------------------------- 3. long keys
def test_max_key_bytes_above_what_tiers_read_back_is_refused_at_startup():
    with pytest.raises(ValueError, match="65535"):
        Limits(max_key_bytes=65536)
    proc = serve_cli("--max-key-bytes", "70000", "--disk-bytes", "0")
    assert proc.returncode == 2 and "65535" in proc.stderr and "listening" not in proc.stdout


@needs_redis
def test_longest_allowed_key_round_trips_through_ram_disk_restart_and_redis(tmp_path):
    limits = Limits(max_key_bytes=65535)
    key = os.urandom(65535)
    blob = os.urandom(300_000)
    with RedisProcess() as rp:
        with BackgroundServer(config(tmp_path, limits=limits, redis_url=rp.url)) as srv:
            with KVStoreClient(srv.target, retries=0, max_key_bytes=65535) as kv:
                assert kv.put(key, blob) == ["ram", "disk", "redis"]
                assert kv.get(key) == blob
        # restart: the disk tier reads it back (no RAM tier), then a server with Redis alone does
        with BackgroundServer(config(tmp_path, limits=limits, ram_bytes=0)) as srv:
            with KVStoreClient(srv.target, retries=0, max_key_bytes=65535) as kv:
                assert kv.get(key) == blob and kv.stats().corrupt_objects == 0
        with BackgroundServer(config(tmp_path, limits=limits, ram_bytes=0, disk_dir=None, redis_url=rp.url)) as srv:
            with KVStoreClient(srv.target, retries=0, max_key_bytes=65535) as kv:
                assert kv.get(key) == blob


# ------------------------------------------------------------------------------------- 4. disk full
@pytest.fixture()
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 3 MiB tmpfs to fill (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_health(target: str, service: str, want: int) -> None:
    deadline = time.monotonic() + 10
    while health(target, service) != want:
        assert time.monotonic() < deadline, f"{service} never reached {want}"
        time.sleep(0.05)


def test_full_disk_shows_in_stats_metrics_and_health_and_require_disk_fails_puts(small_fs):
    cfg = ServerConfig(port=0, disk_dir=small_fs / "store", disk_bytes=64 * MiB, ram_bytes=64 * MiB)
    blobs = [os.urandom(MiB) for _ in range(4)]
    with BackgroundServer(cfg) as srv, KVStoreClient(srv.target, retries=0) as kv:
        tiers = [kv.put(b"fill/%d" % i, b) for i, b in enumerate(blobs)]
        assert tiers[0] == ["ram", "disk"] and tiers[-1] == ["ram"]  # acknowledged RAM-only, and it says so
        disk = next(t for t in kv.stats().tiers if t.name == "disk")
        assert not disk.available and disk.errors >= 1 and "No space" in disk.last_error
        reg = srv.server.metrics.registry
        assert reg.get_sample_value("kvstore_tier_errors_total", {"tier": "disk"}) >= 1
        assert reg.get_sample_value("kvstore_tier_up", {"tier": "disk"}) == 0
        wait_health(srv.target, TIER_HEALTH_PREFIX + "disk", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health(srv.target, "kvrecall.kvstore.v1.KVStore") == health_pb2.HealthCheckResponse.SERVING
    (small_fs / "filler").write_bytes(b"")
    cfg = ServerConfig(port=0, disk_dir=small_fs / "store", disk_bytes=64 * MiB, ram_bytes=64 * MiB,
                       require_disk=True)
    with BackgroundServer(cfg) as srv, KVStoreClient(srv.target, retries=0) as kv:
        with open(small_fs / "filler", "wb") as f:  # take what is left
            try:
                while True:
                    f.write(bytes(64 * 1024))
                    f.flush()
            except OSError:
                pass
        with pytest.raises(KVStoreError) as err:
            kv.put(b"must-be-durable", blobs[0])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "No space" in str(err.value)
        assert kv.get(b"must-be-durable") is None  # nothing half-stored
        wait_health(srv.target, "kvrecall.kvstore.v1.KVStore", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert kv.delete([b"fill/0"]) == 1
        (small_fs / "filler").unlink()  # space comes back: the probe notices without any Put
        wait_health(srv.target, "kvrecall.kvstore.v1.KVStore", health_pb2.HealthCheckResponse.SERVING)
        assert kv.put(b"must-be-durable", blobs[0]) == ["ram", "disk"]
        assert next(t for t in kv.stats().tiers if t.name == "disk").available


# ------------------------------------------------------------------------------------- 5, 6. counts, malformed
def test_cancelled_and_malformed_requests_are_counted_right_and_answered_invalid_argument(tmp_path, caplog):
    gate = threading.Event()

    def cancelled_midway():
        yield header(b"cancel", 2 * MiB, 0)
        yield pb.PutRequest(data=bytes(MiB)).SerializeToString()
        gate.wait(20)

    with BackgroundServer(config(tmp_path)) as srv, grpc.insecure_channel(srv.target) as ch:
        reg = srv.server.metrics.registry

        def count(method, code):
            return reg.get_sample_value("kvstore_requests_total", {"method": method, "code": code}) or 0

        put = ch.stream_unary(PUT, request_serializer=None, response_deserializer=pb.PutResponse.FromString)
        call = put.future(cancelled_midway(), timeout=30)
        deadline = time.monotonic() + 10
        while srv.server.service._inflight.used < MiB:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        call.cancel()
        gate.set()
        deadline = time.monotonic() + 10
        while count("Put", "CANCELLED") < 1:
            assert time.monotonic() < deadline, "a cancelled Put was not counted CANCELLED"
            time.sleep(0.02)
        assert count("Put", "INVALID_ARGUMENT") == 0
        caplog.clear()
        garbage = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x10short"]
        for raw in garbage:  # not protobuf at all, a truncated header, a truncated data field
            with pytest.raises(grpc.RpcError) as err:
                put(iter([raw]), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # a good header, then a malformed data message
            put(iter([header(b"k", 3, zlib.crc32(b"abc")), b"\x12\x09abc"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert count("Put", "INVALID_ARGUMENT") == len(garbage) + 1 and count("Put", "INTERNAL") == 0
        for method in ("Exists", "Delete", "Stats", "Lookup", "Get"):
            call = (ch.unary_stream if method == "Get" else ch.unary_unary)(f"/kvrecall.kvstore.v1.KVStore/{method}")
            with pytest.raises(grpc.RpcError) as err:
                result = call(b"\x0a\xff\xff", timeout=10)
                list(result) if method == "Get" else None
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value.code())
            assert count(method, "INVALID_ARGUMENT") == 1, method
        assert not [r for r in caplog.records if r.levelname == "ERROR" or r.exc_info], caplog.text
        with KVStoreClient(srv.target, retries=0) as kv:  # still serving
            assert kv.put(b"after", b"x") and kv.get(b"after") == b"x"


# ------------------------------------------------------------------------------------- 7. startup errors
def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.mark.skipif(not __import__("shutil").which("openssl"), reason="openssl not installed")
def test_tls_key_that_does_not_match_its_certificate_is_named(tmp_path):
    cert_a, _ = _self_signed(tmp_path, "a")
    _, key_b = _self_signed(tmp_path, "b")
    proc = serve_cli("--tls-cert", str(cert_a), "--tls-key", str(key_b), "--disk-bytes", "0")
    assert proc.returncode == 2, proc.stderr
    assert "does not match" in proc.stderr and str(key_b) in proc.stderr and "address" not in proc.stderr


def test_busy_metrics_port_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = serve_cli("--metrics-port", str(port), "--disk-dir", str(tmp_path / "d"))
    assert proc.returncode == 2 and f"127.0.0.1:{port}" in proc.stderr and "metrics" in proc.stderr, proc.stderr


def test_second_server_on_a_locked_directory_fails_before_listening(tmp_path):
    with BackgroundServer(config(tmp_path)):
        proc = serve_cli("--disk-dir", str(tmp_path / "store"))
    assert proc.returncode == 2 and "in use by another kvstore server" in proc.stderr
    assert "listening" not in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------------- 8. concurrent overwrites
@needs_redis
def test_concurrent_overwrites_of_one_key_leave_every_tier_with_the_same_version(tmp_path):
    import asyncio

    with RedisProcess() as rp, BackgroundServer(config(tmp_path, redis_url=rp.url)) as srv:
        store = srv.server.store
        versions = [os.urandom(256 * 1024) for _ in range(8)]
        clients = [KVStoreClient(srv.target, retries=0) for _ in versions]
        try:
            for round_ in range(10):
                key = b"contended/%d" % round_
                barrier = threading.Barrier(len(versions))

                def writer(i):
                    barrier.wait()
                    clients[i].put(key, versions[i])

                threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(versions))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                in_ram = bytes(store.ram.get(key).data)
                on_disk = bytes(store.disk.get(key).data)
                in_redis = bytes(asyncio.run_coroutine_threadsafe(store.redis.get(key), srv.loop).result(10).data)
                assert in_ram in versions
                assert in_ram == on_disk == in_redis, f"round {round_}: tiers disagree"
        finally:
            for c in clients:
                c.close()


# ------------------------------------------------------------------------------------- 9. disk budget
def test_disk_budget_holds_with_concurrent_writers(tmp_path):
    budget, size, writers = 32 * MiB, 4 * MiB, 8
    tier = DiskTier(tmp_path / "d", budget, fsync=True)
    tier.open()
    blob = os.urandom(size)
    obj = StoredObject(blob, crc32_of(blob))
    stop = threading.Event()
    peak = [0, 0]

    def sample():
        while not stop.is_set():
            total = 0
            for sub in ("objects", "tmp"):  # objects first: a file renamed meanwhile is counted at most once
                for root, _, files in os.walk(tmp_path / "d" / sub):
                    for name in files:
                        try:
                            total += os.stat(os.path.join(root, name)).st_size
                        except FileNotFoundError:
                            pass
            peak[0] = max(peak[0], total)
            peak[1] = max(peak[1], tier.used_bytes + tier.reserved_bytes)

    def write(i):
        for j in range(5):
            tier.put(b"w/%d/%d" % (i, j), obj)

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    sampler.join()
    tier.close()
    assert peak[1] <= budget
    # the scan can count one file twice (evicted after it was seen, its replacement seen in tmp/)
    assert peak[0] <= budget + size + 4096, f"disk usage peaked at {peak[0] / MiB:.1f} MiB"
    assert tier.used_bytes <= budget and tier.reserved_bytes == 0


# ------------------------------------------------------------------------------------- 10. shutdown
def test_shutdown_does_not_wait_for_watch_streams_or_idle_puts(tmp_path):
    srv = BackgroundServer(config(tmp_path, grace_s=10))
    ch = grpc.insecure_channel(srv.target)
    seen: list[int] = []
    watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)

    def follow():
        try:
            for resp in watch:
                seen.append(resp.status)
        except grpc.RpcError:
            pass

    follower = threading.Thread(target=follow)
    follower.start()
    release = threading.Event()

    def idle_put():
        yield header(b"idle", 10, 0)
        release.wait(30)

    put = ch.stream_unary(PUT, request_serializer=None, response_deserializer=pb.PutResponse.FromString)
    idle = put.future(idle_put(), timeout=60)
    deadline = time.monotonic() + 10
    while not seen:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.stop(grace=10)
    elapsed = time.monotonic() - t0
    release.set()
    follower.join(10)
    with pytest.raises(grpc.RpcError) as err:
        idle.result(timeout=10)
    ch.close()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.value.details()
    assert seen[-1] == health_pb2.HealthCheckResponse.NOT_SERVING and not follower.is_alive()
    assert elapsed < 5, f"shutdown took {elapsed:.1f} s of a 10 s grace"


# ------------------------------------------------------------------------------------- 11. bearer scheme
def test_bearer_scheme_is_case_insensitive(tmp_path):
    assert bearer_credentials("bEaReR  tok") == "tok" and bearer_credentials("Basic tok") is None
    with BackgroundServer(config(tmp_path, token="s3cret")) as srv, grpc.insecure_channel(srv.target) as ch:
        stats = ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Stats", request_serializer=None,
                               response_deserializer=pb.StatsResponse.FromString)
        for good in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR  s3cret"):
            stats(b"", metadata=(("authorization", good),), timeout=5)
        for bad in ("Basic s3cret", "Bearers3cret", "bearer s3cre", "bearer", "s3cret", "bearer S3CRET"):
            with pytest.raises(grpc.RpcError) as err:
                stats(b"", metadata=(("authorization", bad),), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, bad


# ------------------------------------------------------------------------------------- write-behind mode
def test_write_behind_acknowledges_from_memory_and_lands_on_disk_in_write_order(tmp_path):
    versions = [os.urandom(200_000) for _ in range(6)]
    with BackgroundServer(config(tmp_path, disk_write_behind=True)) as srv, KVStoreClient(srv.target) as kv:
        for v in versions:  # rapid overwrites: the disk must end with the last one, never an older one
            assert kv.put(b"wb/key", v) == ["ram"]
        others = {b"wb/%d" % i: os.urandom(50_000) for i in range(10)}
        for key, blob in others.items():
            kv.put(key, blob)
        assert kv.get(b"wb/key") == versions[-1]
    # stop() waited for the background writes: a fresh server with no RAM reads everything from disk
    with BackgroundServer(config(tmp_path, ram_bytes=0)) as srv, KVStoreClient(srv.target) as kv:
        assert kv.get(b"wb/key") == versions[-1]
        assert all(kv.get(key) == blob for key, blob in others.items())
    with pytest.raises(ValueError, match="write_behind"):
        config(tmp_path, disk_write_behind=True, require_disk=True)
