import math

import pytest

from kvrecall.controller import RECOMPUTE, BandwidthEstimator, Controller, ControllerError, LoadOption

# Three levels: finer levels cost more bytes and decode a bit slower, but lose less quality.
OPTS = [
    LoadOption("high", bytes_per_token=4000, decode_tokens_per_s=2e6, quality_loss=0.001),
    LoadOption("medium", bytes_per_token=2000, decode_tokens_per_s=3e6, quality_loss=0.01),
    LoadOption("low", bytes_per_token=1000, decode_tokens_per_s=4e6, quality_loss=0.05),
]


def test_estimate_matches_the_pipeline_model():
    c = Controller(OPTS, prefill_tokens_per_s=10_000, chunk_tokens=256)
    n, bw = 2560, 1e8  # 10 chunks
    wire, decode = n * 4000 / bw, n / 2e6
    assert c.estimate_s(OPTS[0], n, bw) == pytest.approx(max(wire, decode) + min(wire, decode) / 10)
    assert c.estimate_s(RECOMPUTE, n, bw) == pytest.approx(0.256)
    assert c.estimate_s(OPTS[0], n, 0) == math.inf


def test_fastest_choice_moves_from_levels_to_recompute_as_bandwidth_drops():
    c = Controller(OPTS, prefill_tokens_per_s=10_000)
    n = 8192
    choices = [c.choose(n, bw).choice for bw in (1e10, 1e8, 3e7, 1e5)]
    # Very fast link: decode-bound, so the fastest-decoding level wins; slow links: fewer bytes; very slow: recompute.
    assert choices == ["low", "low", "low", RECOMPUTE]
    d = c.choose(n, 1e5)
    assert d.estimates[RECOMPUTE] < d.estimates["low"]


def test_slo_picks_the_best_quality_that_fits():
    c = Controller(OPTS, prefill_tokens_per_s=1_000)
    n, bw = 10_000, 1e8  # wire: high 0.4 s, medium 0.2 s, low 0.1 s; recompute 10 s
    assert c.choose(n, bw, slo_s=1.0).choice == "high"
    assert c.choose(n, bw, slo_s=0.3).choice == "medium"
    assert c.choose(n, bw, slo_s=0.15).choice == "low"
    missed = c.choose(n, bw, slo_s=0.01)
    assert missed.choice == "low" and not missed.meets_slo
    assert c.choose(n, bw, slo_s=100).choice == RECOMPUTE  # exact KV is the best quality when time allows


def test_quality_bound_and_plan_chunks_follow_the_bandwidth_estimate():
    c = Controller(OPTS, prefill_tokens_per_s=0, max_quality_loss=0.02)
    est = BandwidthEstimator(1e9)
    assert c.plan_chunks(4, est, slo_s=1.0).choice == "high"
    for _ in range(20):
        est.observe(1_000_000, 1.0)  # the link slows to 1 MB/s
    assert est.bandwidth_Bps == pytest.approx(1e6, rel=1e-3)
    d = c.plan_chunks(4, est, slo_s=1.0)
    assert d.choice == "medium" and not d.meets_slo  # "low" is excluded by the quality bound


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoadOption("x", 0, 1),
        lambda: LoadOption("x", 1, 0),
        lambda: LoadOption(RECOMPUTE, 1, 1),
        lambda: LoadOption("x", 1, 1, quality_loss=-1),
        lambda: Controller([], prefill_tokens_per_s=0),
        lambda: Controller(OPTS + OPTS[:1], prefill_tokens_per_s=1),
        lambda: Controller(OPTS, prefill_tokens_per_s=0, max_quality_loss=0.0),
        lambda: BandwidthEstimator(0),
        lambda: BandwidthEstimator(1).observe(10, 0),
        lambda: Controller(OPTS, 1).choose(10, -1),
    ],
)
def test_bad_inputs_raise(make):
    with pytest.raises(ControllerError):
        make()


def test_throughput_meter_starts_at_priors_and_follows_measurements():
    from kvrecall.loading_meter import ThroughputMeter

    m = ThroughputMeter(bandwidth_Bps=1e9, prefill_tokens_per_s=100.0, decode_Bps=2e8, alpha=0.5)
    assert m.decode_Bps("medium") == 2e8 and m.decode_Bps("fp16", prior=5e9) == 5e9
    m.observe_decode("medium", 4_000_000, 0.01)  # the first sample replaces the prior
    assert m.decode_Bps("medium") == pytest.approx(4e8)
    m.observe_decode("medium", 2_000_000, 0.01)
    assert m.decode_Bps("medium") == pytest.approx(3e8)
    m.observe_prefill(1000, 2.0)
    assert m.prefill.value == pytest.approx(500.0)
    m.observe_transfer(1_000_000, 0.01)
    assert m.bandwidth_Bps == pytest.approx(0.5 * 1e8 + 0.5 * 1e9)
    assert set(m.snapshot()) == {"bandwidth_Bps", "prefill_tokens_per_s", "decode_Bps[medium]"}
    with pytest.raises(ControllerError):
        m.prefill.observe(1, 0)
