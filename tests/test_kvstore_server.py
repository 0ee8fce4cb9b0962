"""The kvstore service end to end on loopback: real grpc.aio server (in this process), real files in tmp_path."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrecall.kvstore import (
    AsyncKVStoreClient,
    BackgroundServer,
    KVStoreClient,
    KVStoreError,
    KVStoreServer,
    Limits,
    ServerConfig,
    chunk_keys,
)
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

MiB = 1 << 20


def config(tmp_path: Path, **kw) -> ServerConfig:
    kw.setdefault("disk_dir", tmp_path / "store")
    kw.setdefault("ram_bytes", 64 * MiB)
    kw.setdefault("disk_bytes", 256 * MiB)
    return ServerConfig(port=0, **kw)


def payload(seed: object, size: int) -> bytes:
    return random.Random(str(seed)).randbytes(size)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    with BackgroundServer(config(tmp_path_factory.mktemp("kv"))) as srv:
        yield srv


@pytest.fixture()
def kv(shared_server):
    with KVStoreClient(shared_server.target, retries=0, timeout_s=20) as client:
        yield client


def health_status(target: str, creds=None) -> int:
    channel = grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service="kvrecall.kvstore.v1.KVStore"), timeout=5).status


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("size", [0, 1, 64 * MiB], ids=["0B", "1B", "64MiB"])
def test_round_trip(kv, size):
    data = payload(size, size)
    key = b"rt/%d" % size
    tiers = kv.put(key, data)
    assert tiers == ["ram", "disk"] if size < 64 * MiB else "disk" in tiers
    got = kv.get(key)
    assert got is not None and len(got) == size and got == data
    out = memoryview(bytearray(size))
    assert kv.get_into(key, out) and out == data
    assert kv.exists([key]).sizes == [size]
    assert kv.delete([key]) == 1 and kv.get(key) is None


def test_get_many_fills_one_buffer(kv):
    keys = [b"many/%d" % i for i in range(6)]
    datas = [payload(k, 1000 * i + 3) for i, k in enumerate(keys)]
    for k, d in zip(keys, datas):
        kv.put(k, d)
    views = kv.get_many(keys[:3] + [b"many/missing"] + keys[3:])
    assert views[3] is None
    got = [v for v in views if v is not None]
    assert [bytes(v) for v in got] == datas
    assert len({v.obj is got[0].obj for v in got}) == 1 and got[0].obj is got[-1].obj  # one shared buffer


def test_exists_reports_cached_prefix_length(kv):
    keys = chunk_keys(list(range(2048)), "stories260K", "q4", chunk_tokens=256)
    for k in keys[:5]:
        kv.put(k, b"chunk")
    kv.put(keys[6], b"chunk")
    res = kv.exists(keys)
    assert res.prefix_length == 5 and res.present == [True] * 5 + [False, True, False]
    assert kv.cached_prefix_length(keys) == 5 and kv.cached_prefix_length([]) == 0


@pytest.mark.parametrize("where", [10, MiB + 5, 3 * MiB - 2], ids=["first-chunk", "middle-chunk", "tail-chunk"])
def test_client_detects_corruption_end_to_end(tmp_path, where):
    """Damage the server's RAM copy behind its back: the client's CRC check must refuse the bytes."""
    from kvrecall.kvstore import ChecksumError

    with BackgroundServer(config(tmp_path, disk_bytes=0)) as srv, KVStoreClient(srv.target, retries=0) as kv:
        data = payload("e2e", 3 * MiB)
        kv.put(b"k", data)
        stored = srv.server.store.ram.get(b"k").data
        stored[where] ^= 0x10
        with pytest.raises(ChecksumError, match="crc32"):
            kv.get(b"k")
        with pytest.raises(ChecksumError):
            kv.get_into(b"k", memoryview(bytearray(3 * MiB)))
        with KVStoreClient(srv.target, retries=0, verify=False) as unchecked:
            assert unchecked.get(b"k") != data  # the damage is real; only verification catches it
        stored[where] ^= 0x10
        assert kv.get(b"k") == data


def test_missing_key_is_none(kv):
    assert kv.get(b"never-stored") is None
    assert not kv.get_into(b"never-stored", memoryview(bytearray(3)))


def test_ttl_expires(kv):
    kv.put(b"ttl", b"short-lived", ttl_s=1)
    assert kv.get(b"ttl") == b"short-lived"
    time.sleep(1.3)
    assert kv.get(b"ttl") is None and kv.exists([b"ttl"]).present == [False]


def test_async_client(shared_server):
    async def scenario():
        async with AsyncKVStoreClient(shared_server.target, retries=0) as akv:
            datas = {b"aio/%d" % i: payload(i, 300_000 + i) for i in range(5)}
            await asyncio.gather(*(akv.put(k, d) for k, d in datas.items()))
            assert await akv.get(b"aio/3") == datas[b"aio/3"]
            views = await akv.get_many(list(datas) + [b"aio/none"])
            assert [bytes(v) for v in views[:-1]] == list(datas.values()) and views[-1] is None
            assert (await akv.exists(list(datas))).prefix_length == 5
            assert await akv.delete([b"aio/0", b"aio/none"]) == 1
            assert await akv.get(b"aio/0") is None
            with pytest.raises(KVStoreError) as err:
                await akv.put(b"", b"x")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            stats = await akv.stats()
            assert {t.name for t in stats.tiers} == {"ram", "disk"}

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------- bad inputs
def raw_put(channel, messages):
    call = channel.stream_unary("/kvrecall.kvstore.v1.KVStore/Put", request_serializer=None,
                                response_deserializer=pb.PutResponse.FromString)
    return call(iter(messages), timeout=10)


def header(key: bytes, data: bytes, crc: int | None = None) -> bytes:
    h = pb.ObjectHeader(key=key, total_bytes=len(data), crc32=zlib.crc32(data) if crc is None else crc)
    return pb.PutRequest(header=h).SerializeToString()


def data_msg(data: bytes) -> bytes:
    return pb.PutRequest(data=data).SerializeToString()


def expect_code(code: grpc.StatusCode, fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_bad_inputs_get_the_right_status_and_the_server_keeps_serving(tmp_path):
    limits = Limits(max_key_bytes=100, max_object_bytes=MiB, max_message_bytes=512 * 1024, chunk_bytes=256 * 1024)
    with BackgroundServer(config(tmp_path, limits=limits)) as srv, grpc.insecure_channel(srv.target) as ch:
        inv, exh = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
        expect_code(inv, lambda: raw_put(ch, [header(b"", b"abc"), data_msg(b"abc")]))  # empty key
        assert "100" in expect_code(inv, lambda: raw_put(ch, [header(b"k" * 101, b"abc"), data_msg(b"abc")]))
        assert "limit" in expect_code(exh, lambda: raw_put(ch, [header(b"big", bytes(MiB + 1))]))  # no alloc
        assert "checksum" in expect_code(inv, lambda: raw_put(ch, [header(b"k", b"abc", crc=1), data_msg(b"abc")]))
        expect_code(inv, lambda: raw_put(ch, [header(b"k", b"abcd"), data_msg(b"abc")]))  # short
        expect_code(inv, lambda: raw_put(ch, [header(b"k", b"ab"), data_msg(b"abc")]))  # long
        expect_code(inv, lambda: raw_put(ch, [data_msg(b"abc")]))  # no header
        expect_code(inv, lambda: raw_put(ch, []))  # empty stream
        expect_code(inv, lambda: raw_put(ch, [header(b"k", b"ab"), header(b"k", b"ab")]))  # header twice
        expect_code(exh, lambda: raw_put(ch, [header(b"k", bytes(600_000)), data_msg(bytes(600_000))]))  # message
        get = ch.unary_stream("/kvrecall.kvstore.v1.KVStore/Get", request_serializer=pb.GetRequest.SerializeToString,
                              response_deserializer=pb.GetResponse.FromString)
        expect_code(inv, lambda: list(get(pb.GetRequest(key=b""), timeout=5)))
        expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(get(pb.GetRequest(key=b"absent"), timeout=5)))
        exists = ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Exists",
                                request_serializer=pb.ExistsRequest.SerializeToString,
                                response_deserializer=pb.ExistsResponse.FromString)
        expect_code(inv, lambda: exists(pb.ExistsRequest(keys=[b"ok", b"x" * 101]), timeout=5))
        unknown = ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Frobnicate")
        expect_code(grpc.StatusCode.UNIMPLEMENTED, lambda: unknown(b"", timeout=5))
        # The client enforces the same limits before sending, with typed errors.
        with KVStoreClient(srv.target, retries=0, chunk_bytes=200_000) as kv:
            with pytest.raises(KVStoreError) as err:
                kv.put(b"", b"x")
            assert err.value.code == inv
            with pytest.raises(KVStoreError) as err:
                kv.put(b"big", bytes(MiB + 1))
            assert err.value.code == exh
            with pytest.raises(TypeError):
                kv.put(b"k", "text is not bytes")
            # Still serving, including a chunked Put in many messages and a Get in chunks of the server's size.
            data = payload("after", 900_000)
            assert kv.put(b"after", data) == ["ram", "disk"]
            assert kv.get(b"after") == data
            assert kv.stats().misses >= 1


def test_inflight_put_budget_bounds_receive_buffers(tmp_path):
    limits = Limits(max_inflight_put_bytes=MiB)
    gate = threading.Event()
    blob = payload("inflight", 800_000)

    def held_back():  # half the object arrives, then the stream waits: 500,000 received bytes are held
        yield header(b"first", blob)
        yield data_msg(blob[:500_000])
        gate.wait(30)
        yield data_msg(blob[500_000:])

    with BackgroundServer(config(tmp_path, limits=limits)) as srv, grpc.insecure_channel(srv.target) as ch:
        first = ch.stream_unary("/kvrecall.kvstore.v1.KVStore/Put", request_serializer=None,
                                response_deserializer=pb.PutResponse.FromString).future(held_back(), timeout=30)
        with KVStoreClient(srv.target, retries=0) as kv:
            deadline = time.monotonic() + 10
            while srv.server.service._inflight.used < 500_000:  # the first Put holds the bytes it received
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(KVStoreError) as err:
                kv.put(b"second", blob)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in-flight" in str(err.value)
            gate.set()
            assert first.result().stored_bytes == len(blob)
            assert kv.put(b"second", blob) == ["ram", "disk"]
            assert srv.server.service._inflight.used == 0


def test_get_chunk_size_is_clamped(kv):
    data = payload("clamp", 100_000)
    kv.put(b"clamp", data)
    msgs = list(kv._get(pb.GetRequest(key=b"clamp", chunk_bytes=1), timeout=10))
    assert len(msgs) == 1 + -(-len(data) // 4096)  # header + 4 KiB chunks, not 100,000 one-byte messages


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.binary(max_size=1030), pieces=st.lists(st.binary(max_size=3000), max_size=4),
       size_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]), crc_flip=st.sampled_from([0, 0, 0, 1, 1 << 31]))
def test_put_validation_fuzz(shared_server, key, pieces, size_delta, crc_flip):
    """A Put succeeds exactly when the key is valid and the data matches the declared size and CRC-32."""
    blob = b"".join(pieces)
    total = len(blob) + size_delta
    if total < 0:
        return
    crc = zlib.crc32(blob) ^ crc_flip
    msgs = [pb.PutRequest(header=pb.ObjectHeader(key=key, total_bytes=total, crc32=crc)).SerializeToString()]
    msgs += [data_msg(p) for p in pieces]
    valid = 0 < len(key) <= 1024 and size_delta == 0 and crc_flip == 0
    with grpc.insecure_channel(shared_server.target) as ch:
        if valid:
            assert raw_put(ch, msgs).stored_bytes == len(blob)
            with KVStoreClient(shared_server.target, retries=0) as kv:
                assert kv.get(key) == blob
        else:
            expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: raw_put(ch, msgs))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keys=st.lists(st.binary(max_size=1100), max_size=8))
def test_exists_validation_fuzz(kv, keys):
    exists = kv._exists  # raw call: no client-side validation
    if any(len(k) == 0 or len(k) > 1024 for k in keys):
        with pytest.raises(grpc.RpcError) as err:
            exists(pb.ExistsRequest(keys=keys), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        res = exists(pb.ExistsRequest(keys=keys), timeout=5)
        assert len(res.present) == len(keys) and res.prefix_length <= len(keys)


# --------------------------------------------------------------------------------------------- security
def test_bearer_token(tmp_path):
    with BackgroundServer(config(tmp_path, token="s3cret-token")) as srv:
        for token in (None, "wrong", "s3cret-token-but-longer", "s3cret-tokem"):
            with KVStoreClient(srv.target, token=token, retries=0) as kv:
                for call in (lambda: kv.put(b"k", b"v"), lambda: kv.get(b"k"), lambda: kv.exists([b"k"]),
                             kv.stats, lambda: kv.delete([b"k"])):
                    with pytest.raises(KVStoreError) as err:
                        call()
                    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(srv.target) as ch:  # unknown methods and reflection are protected too
            expect_code(grpc.StatusCode.UNAUTHENTICATED,
                        lambda: ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Nope")(b"", timeout=5))
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
                ProtoReflectionDescriptorDatabase,
            )

            expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: ProtoReflectionDescriptorDatabase(ch).get_services())
            token_md = (("authorization", "Bearer s3cret-token"),)
            expect_code(grpc.StatusCode.UNIMPLEMENTED, lambda: ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Nope")(
                b"", timeout=5, metadata=token_md))
        assert health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING  # health is exempt
        with KVStoreClient(srv.target, token="s3cret-token", retries=0) as kv:
            kv.put(b"k", b"v")
            assert kv.get(b"k") == b"v"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl binary not found (needed to make test certificates)")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=kv-test-ca",
             cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_tls_and_client_certificates(tmp_path, certs):
    c = certs
    cfg = config(tmp_path, tls_cert=c / "server.pem", tls_key=c / "server.key", tls_client_ca=c / "ca.pem")
    with BackgroundServer(cfg) as srv:
        with KVStoreClient(srv.target, tls=True, ca=str(c / "ca.pem"), cert=str(c / "client.pem"),
                           key=str(c / "client.key"), retries=0) as kv:
            kv.put(b"secure", b"payload")
            assert kv.get(b"secure") == b"payload"
        with KVStoreClient(srv.target, tls=True, ca=str(c / "ca.pem"), retries=0, timeout_s=5) as kv:
            with pytest.raises(KVStoreError) as err:  # no client certificate
                kv.get(b"secure")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        with KVStoreClient(srv.target, retries=0, timeout_s=5) as kv:
            with pytest.raises(KVStoreError) as err:  # plaintext to a TLS port
                kv.get(b"secure")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with BackgroundServer(config(tmp_path / "b", tls_cert=c / "server.pem", tls_key=c / "server.key")) as srv:
        with KVStoreClient(srv.target, tls=True, ca=str(c / "ca.pem"), retries=0) as kv:  # server-only TLS
            kv.put(b"k", b"v")
            assert kv.get(b"k") == b"v"


# --------------------------------------------------------------------------------------------- operations
def test_health_not_serving_until_ready_then_serving_then_draining(tmp_path):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = KVStoreServer(config(tmp_path, drain_s=0.0))
    release = threading.Event()
    real_open = server.store.disk.open
    server.store.disk.open = lambda: (release.wait(30), real_open())[1]  # a slow index rebuild
    asyncio.run_coroutine_threadsafe(server.start(wait_ready=False), loop).result(30)
    target = f"127.0.0.1:{server.port}"
    try:
        assert health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with KVStoreClient(target, retries=0) as kv:
            with pytest.raises(KVStoreError) as err:
                kv.exists([b"k"])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        retried: list[object] = []
        patient = KVStoreClient(target, retries=30, backoff_s=0.02)  # retries UNAVAILABLE with back-off
        waiter = threading.Thread(target=lambda: retried.append(patient.exists([b"k"]).present))
        waiter.start()
        time.sleep(0.3)
        assert retried == []  # still retrying while the server is not ready
        release.set()
        waiter.join(30)
        patient.close()
        assert retried == [[False]]
        asyncio.run_coroutine_threadsafe(server.wait_ready(), loop).result(30)
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        with KVStoreClient(target, retries=0) as kv:
            kv.put(b"k", b"v")
            stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=1, drain=3.0), loop)
            deadline = time.monotonic() + 5
            while health_status(target) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert kv.get(b"k") == b"v"  # still serving while draining
            stopping.result(30)
            with pytest.raises(KVStoreError) as err:
                kv.get(b"k")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_reflection_lists_the_services(shared_server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(shared_server.target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"kvrecall.kvstore.v1.KVStore", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("kvrecall.kvstore.v1.KVStore")
        assert desc.package == "kvrecall.kvstore.v1"


def test_prometheus_metrics(tmp_path):
    with BackgroundServer(config(tmp_path, metrics_port=0)) as srv:
        with KVStoreClient(srv.target, retries=0) as kv:
            kv.put(b"m", bytes(1000))
            kv.get(b"m")
            kv.get(b"missing")
        # A call's latency is recorded as its handler returns, which can be just after the client saw the status.
        deadline = time.monotonic() + 10
        while True:
            url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                     if line and not line.startswith("#")}
            if lines.get('kvstore_request_seconds_count{method="Get"}') == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert lines['kvstore_hits_total{tier="ram"}'] == 1
    assert lines["kvstore_misses_total"] == 1
    assert lines["kvstore_bytes_in_total"] == 1000 and lines["kvstore_bytes_out_total"] == 1000
    assert lines['kvstore_tier_bytes{tier="disk"}'] > 1000
    assert lines['kvstore_tier_objects{tier="ram"}'] == 1
    assert lines['kvstore_evictions_total{tier="ram"}'] == 0
    assert lines['kvstore_request_seconds_count{method="Get"}'] == 2
    assert lines['kvstore_requests_total{code="NOT_FOUND",method="Get"}'] == 1


def test_eviction_keeps_ram_and_disk_under_budget(tmp_path):
    ram_budget, disk_budget = MiB, 3 * MiB
    with BackgroundServer(config(tmp_path, ram_bytes=ram_budget, disk_bytes=disk_budget)) as srv:
        with KVStoreClient(srv.target, retries=0) as kv:
            for i in range(20):
                kv.put(b"ev/%d" % i, payload(i, 300_000))
                stats = {t.name: t for t in kv.stats().tiers}
                assert stats["ram"].bytes <= ram_budget and stats["disk"].bytes <= disk_budget
                on_disk = sum(f.stat().st_size for f in (tmp_path / "store" / "objects").rglob("*") if f.is_file())
                assert on_disk <= disk_budget
            assert stats["ram"].evictions > 0 and stats["disk"].evictions > 0
            assert kv.get(b"ev/19") == payload(19, 300_000)
            assert kv.get(b"ev/0") is None
            oldest_on_disk = min(i for i in range(20) if kv.exists([b"ev/%d" % i]).present[0])
            assert kv.get(b"ev/%d" % oldest_on_disk) == payload(oldest_on_disk, 300_000)  # disk read, promoted
            assert {t.name: t for t in kv.stats().tiers}["disk"].hits >= 1


def test_sixteen_concurrent_clients_every_byte_verified(tmp_path):
    cfg = config(tmp_path, ram_bytes=4 * MiB, disk_bytes=64 * MiB, disk_fsync=False)
    errors: list[str] = []
    verified = [0]
    lock = threading.Lock()
    with BackgroundServer(cfg) as srv:
        deadline = time.monotonic() + 3.0

        def worker(w: int) -> None:
            rng = random.Random(w)
            written: list[bytes] = []
            try:
                with KVStoreClient(srv.target, chunk_bytes=rng.choice([64 * 1024, 256 * 1024]), timeout_s=30) as kv:
                    i = 0
                    while time.monotonic() < deadline:
                        size = rng.choice([0, 1, 4096, 100_000, 700_000])
                        key = b"c/%d/%d/%d" % (w, i, size)
                        data = payload(key, size)
                        kv.put(key, data)
                        got = kv.get(key)
                        if got != data:
                            errors.append(f"read-after-write mismatch for {key!r}")
                        written.append(key)
                        other = b"c/%d/%d/%d" % (rng.randrange(16), rng.randrange(i + 1), size)
                        got = kv.get(other)
                        if got is not None and got != payload(other, size):
                            errors.append(f"wrong bytes for {other!r}")
                        n = 2 + int(got is not None)
                        views = kv.get_many(written[-3:])
                        for k, v in zip(written[-3:], views):
                            if v is not None and v != payload(k, int(k.rsplit(b"/", 1)[1])):
                                errors.append(f"get_many wrong bytes for {k!r}")
                            n += v is not None
                        with lock:
                            verified[0] += n
                        i += 1
            except Exception as exc:  # reported below
                errors.append(f"worker {w}: {exc!r}")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        stats = srv.server.store
    assert errors == []
    assert verified[0] >= 16 * 2
    assert stats.ram.used_bytes <= 4 * MiB and stats.disk.used_bytes <= 64 * MiB
