"""The main job end to end on stories260K (--fast): embedded store, three requests, one table, JSON figures."""

import json

from kvrecall.cli import main


def test_demo_fast_run_end_to_end(stories_path, texts_path, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = main(["demo", "--fast", "--model", str(stories_path), "--texts", str(texts_path), "--tokens", "300",
               "--chunk-tokens", "128", "--no-progress", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for row in ("bytes stored vs fp16", "TTFT load (req 2)", "answer 3 (retrieval 3%)", "resident bytes",
                "next-token KL vs req 1"):
        assert row in printed
    r = json.loads(out.read_text())
    assert r["tokens_loaded"] == r["prompt_tokens"] - 1  # the whole prompt came from the store but one token
    assert 0 < r["bytes_stored"] < r["fp16_bytes"] / 2
    assert r["ttft_load_s"] > 0 and r["ttft_recompute_s"] > 0
    assert 0 <= r["kl_loaded"] < 0.1  # "medium" keeps the next token's distribution close to recompute
    assert r["resident_bytes"]["retrieval"] < r["resident_bytes"]["dense_fp16"]
    assert set(r["answers"]) == {"recompute", "loaded", "retrieval"} and all(map(str, r["answers"].values()))


def test_demo_rejects_bad_settings_before_loading_anything(texts_path, tmp_path, capsys):
    assert main(["demo", "--texts", str(texts_path), "--level", "nope"]) == 2
    assert "unknown --level 'nope'" in capsys.readouterr().err
    assert main(["demo", "--texts", str(tmp_path / "missing")]) == 2
    assert main(["demo", "--texts", str(texts_path), "--tokens", "10"]) == 2
