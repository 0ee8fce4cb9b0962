"""The main job runs end to end on the real model: codec + store + load, then retrieval decoding."""

import json

from kvrecall.cli import main


def test_demo_command_end_to_end(stories_path, texts_path, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--model", str(stories_path), "--texts", str(texts_path / "state_union"), "--tokens", "256",
               "--continuation", "32", "--retrieval-tokens", "2048", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cached prefix found" in printed and "next-token KL" in printed
    result = json.loads(out.read_text())
    codec = result["codec"]
    assert codec["tokens_loaded"] == 256
    assert 0 < codec["bits_per_element"] < 16
    assert 0 <= codec["kl"] < 0.5 and codec["top1"] > 0.5
    retrieval = result["retrieval"]
    # Query-aware codes find what matters: far closer to dense attention than sinks + recent window alone.
    assert retrieval["query-aware VQ"]["kl"] < 0.5 * retrieval["StreamingLLM"]["kl"]
