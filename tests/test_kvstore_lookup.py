"""Lookup (server-side prefix-chain keys) and the documented key derivation's test vectors."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import grpc
import pytest

from kvrecall.kvstore import AsyncKVStoreClient, BackgroundServer, KVStoreClient, KVStoreError, Limits, ServerConfig
from kvrecall.kvstore import chunk_keys
from kvrecall.kvstore.v1 import kvstore_pb2 as pb

DOC = Path(__file__).resolve().parents[1] / "docs" / "keys.md"


def doc_vectors() -> list[dict]:
    text = DOC.read_text(encoding="utf-8")
    block = re.search(r"<!-- test-vectors:begin -->\s*```json\n(.*?)```\s*<!-- test-vectors:end -->", text, re.S)
    assert block, "docs/keys.md lost its test-vector block"
    vectors = json.loads(block.group(1))
    for v in vectors:
        if "token_ids_range" in v:
            v["token_ids"] = list(range(*v["token_ids_range"]))
    return vectors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = ServerConfig(port=0, disk_dir=tmp_path_factory.mktemp("lk") / "store", ram_bytes=32 << 20,
                       disk_bytes=64 << 20, limits=Limits(max_lookup_tokens=100_000, max_keys_per_call=2000))
    with BackgroundServer(cfg) as srv:
        yield srv


def test_documented_vectors_match_chunk_keys():
    vectors = doc_vectors()
    assert len(vectors) >= 4
    for v in vectors:
        keys = chunk_keys(v["token_ids"], v["model_id"], v["profile_id"], v["chunk_tokens"], bytes.fromhex(v["parent"]))
        assert [k.hex() for k in keys] == v["keys"], v["name"]


def test_documented_vectors_match_lookup(server):
    with KVStoreClient(server.target, retries=0) as kv:
        for v in doc_vectors():
            got = kv.lookup(v["token_ids"], v["model_id"], v["profile_id"], v["chunk_tokens"],
                            bytes.fromhex(v["parent"]))
            assert [k.hex() for k in got.keys] == v["keys"], v["name"]


def test_lookup_returns_the_chain_and_the_cached_prefix(server):
    rng = random.Random(13)
    ids = [rng.randrange(0, 2**63) for _ in range(1100)]
    with KVStoreClient(server.target, retries=0) as kv:
        for chunk in (1, 7, 256):
            parent = rng.randbytes(32) if chunk == 7 else b""
            want = chunk_keys(ids, "lookup-model", "lookup-profile", chunk, parent)
            got = kv.lookup(ids, "lookup-model", "lookup-profile", chunk, parent)
            assert got.keys == want and got.cached_chunks == 0 and got.sizes == [0] * len(want)
        keys = chunk_keys(ids, "lookup-model", "lookup-profile", 256)
        for i in (0, 1, 3):  # chunk 2 missing: the cached prefix is 2 chunks long
            kv.put(keys[i], b"chunk %d" % i)
        got = kv.lookup(ids, "lookup-model", "lookup-profile", 256)
        assert got.cached_chunks == 2 and got.cached_tokens == 512
        assert got.sizes == [7, 7, 0, 7] and got.keys == keys
        assert kv.lookup(ids[:255], "lookup-model", "lookup-profile").keys == []  # no full chunk

    async def via_aio():
        async with AsyncKVStoreClient(server.target, retries=0) as kv:
            return await kv.lookup(ids, "lookup-model", "lookup-profile", 256)

    assert asyncio.run(via_aio()).cached_chunks == 2


def test_lookup_rejects_bad_requests(server):
    with grpc.insecure_channel(server.target) as ch:
        lookup = ch.unary_unary("/kvrecall.kvstore.v1.KVStore/Lookup",
                                request_serializer=pb.LookupRequest.SerializeToString,
                                response_deserializer=pb.LookupResponse.FromString)
        bad = [
            (pb.LookupRequest(model_id="", profile_id="p", token_ids=[1]), "non-empty"),
            (pb.LookupRequest(model_id="m", profile_id="", token_ids=[1]), "non-empty"),
            (pb.LookupRequest(model_id="m", profile_id="p", chunk_tokens=(1 << 20) + 1, token_ids=[1]), "chunk"),
            (pb.LookupRequest(model_id="m", profile_id="p", token_ids=[1] * 100_001), "limit"),
            (pb.LookupRequest(model_id="m", profile_id="p", chunk_tokens=1, token_ids=[1] * 2001), "chunks"),
            (pb.LookupRequest(model_id="m", profile_id="p", token_ids=[1], parent=b"x" * 2000), "limit"),
        ]
        for request, words in bad:
            with pytest.raises(grpc.RpcError) as err:
                lookup(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        assert lookup(pb.LookupRequest(model_id="m", profile_id="p", token_ids=[1] * 256), timeout=10).keys
    with KVStoreClient(server.target, retries=0) as kv, pytest.raises(ValueError):
        kv.lookup([1, 2], "", "p")
    with KVStoreClient(server.target, retries=0) as kv, pytest.raises(KVStoreError) as err:
        kv.lookup([1] * 100_001, "m", "p")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
