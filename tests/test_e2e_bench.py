"""bench/e2e.py runs end to end on a tiny configuration (stories260K) and its table, JSON and plot hold up."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_e2e_bench_tiny_run(stories_path, texts_path, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    rc = _bench().main(["--model", str(stories_path), "--texts", str(texts_path), "--contexts", "256",
                        "--bandwidths", "0.1", "100", "--levels", "medium", "--repeats", "1", "--continuation", "4",
                        "--passcode-cases", "1", "--passcode-tokens", "128", "--cachegen-chunks", "1",
                        "--chunk-tokens", "128", "--calib-tokens", "256", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fastest fixed" in printed and "decoder" in printed and "passcode" in printed
    r = json.loads(out.read_text())
    methods = {row["method"] for row in r["ttft"]}
    assert methods == {"recompute", "fp16", "ours:medium", "auto", "cachegen"}
    for row in r["ttft"]:
        assert row["ttft_s"] > 0
    auto = [row for row in r["ttft"] if row["method"] == "auto"]
    assert len(auto) == 2 and all(row["choices"] for row in auto)
    slow_fp16 = next(row for row in r["ttft"] if row["method"] == "fp16" and row["gbit"] == 0.1)
    # The throttle held the link to 0.1 Gbit/s: only its documented burst may pass without waiting.
    from kvrecall.kvstore.throttle import TokenBucket

    rate = 0.1e9 / 8
    assert slow_fp16["ttft_s"] >= (slow_fp16["bytes"] - TokenBucket(rate).burst_bytes) / rate
    assert r["decoder"][0]["GBps_1_thread"] > 0 and r["passcode"]["cases"] == 1
    assert out.with_suffix(".png").stat().st_size > 1000
