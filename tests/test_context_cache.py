"""ContextCache against a real kvstore server on loopback with a real model's KV."""

import pytest
import torch

from kvrecall.context_cache import ContextCache, ContextCacheError
from kvrecall.encoder import CodecProfile, decode, encode
from kvrecall.models import logits_with_context_kv, prefill_kv, tokenize


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from kvrecall.kvstore import BackgroundServer, ServerConfig

    disk = tmp_path_factory.mktemp("store")
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, disk_dir=disk, ram_bytes=64 << 20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from kvrecall.kvstore import KVStoreClient

    with KVStoreClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def context(stories, sotu_text):
    model, tok = stories
    ids = tokenize(tok, sotu_text, 330)
    return ids, prefill_kv(model, ids)


def test_store_then_load_returns_the_decoded_prefix(client, context):
    ids, kv = context
    cache = ContextCache(client, "stories-test", None, "medium", chunk_tokens=64)
    first = cache.store(ids, kv)
    assert (first.chunks, first.stored) == (5, 5) and first.bytes_written > 0
    again = cache.store(ids, kv)
    assert again.stored == 0 and again.bytes_written == 0  # already present: nothing re-encoded
    loaded = cache.load(ids)
    assert loaded.tokens == 320 and loaded.bytes_read == first.bytes_written
    expect = torch.cat([decode(encode(kv[:, :, :, i : i + 64])) for i in range(0, 320, 64)], dim=3)
    assert torch.equal(loaded.kv, expect)


def test_a_longer_request_sharing_the_prefix_finds_it_and_a_different_one_does_not(client, context):
    ids, kv = context
    cache = ContextCache(client, "stories-test-2", None, "high", chunk_tokens=64)
    cache.store(ids[:200], kv[:, :, :, :200])
    assert cache.load(torch.cat([ids, ids])).tokens == 192
    changed = ids.clone()
    changed[100] = (changed[100] + 1) % 512
    assert cache.load(changed).tokens == 64  # chunks after the change have other keys
    assert cache.load(ids[:63]).tokens == 0
    other_model = ContextCache(client, "another-model", None, "high", chunk_tokens=64)
    assert other_model.load(ids).tokens == 0


def test_continuation_from_loaded_kv_stays_close_to_recompute(client, stories, context):
    model, _ = stories
    ids, kv = context
    samples = [kv[:, :, :, :160], kv[:, :, :, 160:]]
    profile = CodecProfile.calibrate(samples, "stories-test-3")
    cache = ContextCache(client, "stories-test-3", profile, "high", chunk_tokens=64)
    cache.store(ids[:256], kv[:, :, :, :256])
    loaded = cache.load(ids)
    got = logits_with_context_kv(model, loaded.kv, ids[256:])
    ref = model(ids[None]).logits[0, 256:]
    kl = (torch.log_softmax(ref, -1).exp() * (torch.log_softmax(ref, -1) - torch.log_softmax(got, -1))).sum(-1)
    assert kl.mean() < 0.05  # "high" keeps next-token predictions close to exact


def test_bad_arguments(client, context):
    ids, kv = context
    with pytest.raises(ContextCacheError):
        ContextCache(client, "m", None, "no-such-level")
    with pytest.raises(ContextCacheError):
        ContextCache(client, "", None)
    cache = ContextCache(client, "m", None)
    with pytest.raises(ContextCacheError):
        cache.store(ids[:10], kv[:, :, :, :11])
    with pytest.raises(ContextCacheError):
        cache.load(ids[None])
