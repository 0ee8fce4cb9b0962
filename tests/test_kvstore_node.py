"""The Node.js example client (examples/node) against a real server: Lookup, Put and Get of a real encoded chunk.

Skipped, with the reason, when ``node`` or the example's installed packages are missing
(``cd examples/node && npm ci`` installs them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kvrecall.kvstore import BackgroundServer, KVStoreClient, ServerConfig, chunk_keys

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir()
                       or not (EXAMPLE / "node_modules" / "@grpc" / "proto-loader").is_dir(),
                       reason="examples/node packages not installed (run: cd examples/node && npm ci)"),
]


def run_node(tmp_path: Path, target: str, tokens: list[int], blob: bytes, token: str | None = None) -> dict:
    (tmp_path / "tokens.json").write_text(json.dumps(tokens))
    (tmp_path / "chunk.bin").write_bytes(blob)
    args = [NODE, str(EXAMPLE / "kvstore_client.js"), "--target", target, "--model", "stories260K",
            "--profile", "q4-v1", "--chunk-tokens", "16", "--tokens", str(tmp_path / "tokens.json"),
            "--blob", str(tmp_path / "chunk.bin"), "--out", str(tmp_path / "fetched.bin")]
    if token:
        args += ["--token", token]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_node_client_puts_looks_up_and_gets_a_real_encoded_chunk(tmp_path):
    torch = pytest.importorskip("torch")
    from kvrecall.encoder import decode, encode

    torch.manual_seed(13)
    kv = torch.randn(2, 2, 2, 16, 8)  # [layers, K/V, heads, 16 tokens, head_dim]
    blob = encode(kv, None, "medium")
    tokens = [2**63 + 5, 0, *range(100, 130)]  # 32 tokens = 2 chunks of 16; one id above 2**53
    cfg = ServerConfig(port=0, disk_dir=tmp_path / "store", ram_bytes=16 << 20, disk_bytes=64 << 20,
                       token="node-test-token")
    with BackgroundServer(cfg) as srv:
        out = run_node(tmp_path, srv.target, tokens, blob, token="node-test-token")
        keys = chunk_keys(tokens, "stories260K", "q4-v1", 16)
        assert out["keys"] == [k.hex() for k in keys]  # the server's keys are Python's chunk_keys
        assert out["cached_before"] == 0 and out["cached_after"] == 1 and out["cached_tokens_after"] == 16
        assert out["put_tiers"] == ["ram", "disk"] and out["bytes"] == len(blob)
        fetched = (tmp_path / "fetched.bin").read_bytes()
        assert fetched == blob
        with KVStoreClient(srv.target, token="node-test-token", retries=0) as py:  # and Python reads Node's Put
            assert py.get(keys[0]) == blob
        assert torch.equal(decode(fetched, None), decode(blob, None))
