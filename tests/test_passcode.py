"""Planted-passcode cases on SmolLM2-135M: construction, scoring, and a real greedy answer."""

import pytest
import torch

from kvrecall.models import read_texts
from kvrecall.passcode import ANSWER_TOKENS, PasscodeError, make_case, make_cases, score


@pytest.fixture(scope="module")
def smol():
    from kvrecall.models import ModelError, load_model

    try:
        return load_model("smollm2-135m")
    except ModelError as exc:  # pragma: no cover
        pytest.skip(f"smollm2-135m unavailable: {exc}")


def test_score():
    assert score("The passcode is 48213.", "48213")
    assert not score("It is 12345, not 48213", "48213")  # the first five-digit number counts
    assert not score("4821", "48213") and not score("482130", "48213") and not score("", "48213")


def test_cases_are_planted_deterministic_and_sized(smol, texts_path):
    _, tok = smol
    texts = read_texts(texts_path / "gutenberg")
    a = make_cases(tok, texts, n=3, context_tokens=256, seed=1)
    b = make_cases(tok, texts, n=3, context_tokens=256, seed=1)
    assert [c.passcode for c in a] == [c.passcode for c in b] and all(torch.equal(x.input_ids, y.input_ids)
                                                                     for x, y in zip(a, b))
    assert [c.depth for c in a] == [0.1, 0.5, 0.9]
    for c in a:
        text = tok.decode(c.input_ids)
        assert f"passcode is {c.passcode}" in text and text.count(c.passcode) == 1
        assert 240 <= c.context_tokens <= 272 and c.input_ids.numel() > c.context_tokens
    first = tok.decode(a[0].input_ids).find(a[0].passcode) / len(tok.decode(a[0].input_ids))
    last = tok.decode(a[2].input_ids).find(a[2].passcode) / len(tok.decode(a[2].input_ids))
    assert first < 0.35 < 0.6 < last  # depth moves the needle through the excerpt


def test_smollm2_answers_a_short_case(smol, texts_path):
    model, tok = smol
    case = make_case(tok, read_texts(texts_path / "gutenberg")[2][1], 200, 0.5, "48213", offset_chars=3000)
    out = model.generate(case.input_ids[None], attention_mask=torch.ones_like(case.input_ids[None]),
                         max_new_tokens=ANSWER_TOKENS, do_sample=False, temperature=None, top_p=None, top_k=None)
    answer = tok.decode(out[0, case.input_ids.numel():], skip_special_tokens=True)
    assert case.is_correct(answer), answer


@pytest.mark.parametrize("kwargs", [{"depth": 1.5}, {"passcode": "1234"}, {"context_tokens": 10**6}])
def test_bad_cases_raise(smol, kwargs):
    _, tok = smol
    args = {"text": "Some words. " * 500, "context_tokens": 200, "depth": 0.5, "passcode": "12345"} | kwargs
    with pytest.raises(PasscodeError):
        make_case(tok, **args)
