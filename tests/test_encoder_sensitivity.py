"""Bit allocation from measured sensitivity: real KL measurements on stories260K, the allocation rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvrecall.encoder import CodecError, CodecProfile
from kvrecall.encoder.sensitivity import group_scales_from_sensitivity, measure_sensitivity


def test_allocation_equalizes_kl_contributions():
    rng = np.random.default_rng()
    sens = rng.uniform(1e-5, 1e-2, size=(6, 2))
    base = np.ones((6, 2))
    g = group_scales_from_sensitivity(sens, base, clip=100.0)
    assert abs(np.log(g).mean()) < 1e-9  # geometric mean 1
    contribution = sens * g**2  # KL ~ sensitivity * step^2
    assert np.allclose(contribution, contribution.mean(), rtol=1e-9)
    clipped = group_scales_from_sensitivity(sens, base, clip=2.0)
    assert clipped.max() / np.exp(np.log(clipped).mean()) <= 2.0 + 1e-9
    with pytest.raises(CodecError, match=r"\[L, 2\]"):
        group_scales_from_sensitivity(np.ones((3, 3)))


def test_measured_sensitivity_on_stories(stories, sotu_text):
    from kvrecall.models import prefill_kv, tokenize

    model, tok = stories
    ids = tokenize(tok, sotu_text, 160)
    kv = prefill_kv(model, ids)
    profile = CodecProfile.calibrate([kv], "stories-sens")
    sens = measure_sensitivity(model, kv[:, :, :, :128].contiguous(), ids[128:], profile, level="lowest")
    assert sens.shape == (kv.shape[0], 2) and np.all(sens > 0)
    fine = measure_sensitivity(model, kv[:, :, :, :128].contiguous(), ids[128:], profile, level="high")
    assert fine.sum() < sens.sum()  # finer steps, less KL
    g = group_scales_from_sensitivity(sens)
    prof = CodecProfile.calibrate([kv], "stories-sens", group_scales=g)
    assert prof.info["group_scales"] == [[round(float(v), 6) for v in row] for row in g]
    with pytest.raises(CodecError, match="2 continuation"):
        measure_sensitivity(model, kv, ids[:1], profile)
