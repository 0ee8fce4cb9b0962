"""Planted-passcode cases: a five-digit passcode hidden at a chosen depth of a book excerpt, asked back at the end.

A case is built from a real text (e.g. ``../shared/data/texts/gutenberg``), cut to ``context_tokens`` tokens,
with the sentence ``The secret passcode is 48213. Remember it.`` inserted at ``depth`` (0 = start, 1 = end) on a
sentence boundary; the question is appended and the whole is wrapped in the model's chat template::

    cases = make_cases(tok, read_texts(root), n=10, context_tokens=2048, seed=0)
    for case in cases:
        out = model.generate(case.input_ids[None], max_new_tokens=ANSWER_TOKENS, do_sample=False)
        ok = case.is_correct(tok.decode(out[0, case.input_ids.numel():]))

:func:`score` says whether a greedy answer names the planted passcode (the first five-digit number in the answer
must be it). Cases are deterministic for a given seed, texts and tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

__all__ = ["PasscodeError", "PasscodeCase", "make_case", "make_cases", "score", "ANSWER_TOKENS", "QUESTION"]

ANSWER_TOKENS = 24
"""New tokens that suffice for the answer (SmolLM2 says "The secret passcode mentioned in the text is 48213", one
token per digit)."""
QUESTION = "What is the secret passcode mentioned in the text above? Answer with the five digits only."
_NEEDLE = " The secret passcode is {code}. Remember it. "
_FIVE_DIGITS = re.compile(r"(?<!\d)(\d{5})(?!\d)")


class PasscodeError(ValueError):
    """A passcode case cannot be built from the given text or settings."""


@dataclass(frozen=True)
class PasscodeCase:
    """One planted-passcode prompt.

    Attributes
    ----------
    input_ids : Tensor[tokens], int64
        The chat-templated prompt (context with the needle, then the question, then the assistant turn).
    passcode : str
        The five digits planted.
    depth : float
        Where the needle sits in the excerpt (0 = start, 1 = end).
    source : str
        Name of the text the excerpt comes from.
    context_tokens : int
        Tokens of the excerpt (the needle included), before the question and template.
    """

    input_ids: torch.Tensor
    passcode: str
    depth: float
    source: str
    context_tokens: int

    def is_correct(self, answer: str) -> bool:
        """Whether ``answer`` (decoded text of the generated tokens) names this case's passcode."""
        return score(answer, self.passcode)


def score(answer: str, passcode: str) -> bool:
    """True when the first five-digit number in ``answer`` is ``passcode``."""
    found = _FIVE_DIGITS.search(answer)
    return found is not None and found.group(1) == passcode


def _chat_ids(tokenizer, content: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": content}]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return out["input_ids"][0].to(torch.long)
    return torch.tensor(tokenizer(content + "\n\n").input_ids, dtype=torch.long)  # base models: plain prompt


def make_case(tokenizer, text: str, context_tokens: int, depth: float, passcode: str, source: str = "",
              offset_chars: int = 0) -> PasscodeCase:
    """Plant ``passcode`` at ``depth`` of a ``context_tokens``-token excerpt of ``text`` starting near ``offset_chars``.

    Raises
    ------
    PasscodeError
        If ``depth`` is outside [0, 1], ``passcode`` is not five digits, or the text is too short.
    """
    if not 0.0 <= depth <= 1.0:
        raise PasscodeError(f"depth must be in [0, 1], got {depth}")
    if not re.fullmatch(r"\d{5}", passcode):
        raise PasscodeError(f"passcode must be five digits, got {passcode!r}")
    if context_tokens < 32:
        raise PasscodeError(f"context_tokens must be >= 32, got {context_tokens}")
    body = text[offset_chars:]
    needle = _NEEDLE.format(code=passcode)
    budget = context_tokens - len(tokenizer(needle, add_special_tokens=False).input_ids)
    ids = tokenizer(body, add_special_tokens=False).input_ids[:budget] if body else []
    if len(ids) < budget:
        raise PasscodeError(f"{source or 'text'} holds {len(ids)} tokens after offset {offset_chars}; "
                            f"{budget} needed")
    excerpt = tokenizer.decode(ids)
    cut = int(depth * len(excerpt))
    if 0 < cut < len(excerpt):  # move to the next sentence end so the needle does not split a sentence
        stop = excerpt.find(". ", cut)
        cut = stop + 1 if 0 <= stop < cut + 400 else cut
    planted = excerpt[:cut] + needle + excerpt[cut:]
    return PasscodeCase(_chat_ids(tokenizer, planted + "\n\n" + QUESTION), passcode, depth, source,
                        len(tokenizer(planted, add_special_tokens=False).input_ids))


def make_cases(tokenizer, texts: list[tuple[str, str]], n: int = 10, context_tokens: int = 2048,
               seed: int = 0) -> list[PasscodeCase]:
    """``n`` cases over ``texts`` (``(name, text)`` pairs, e.g. :func:`kvrecall.models.read_texts`).

    Depths are spread evenly over [0.1, 0.9]; passcodes, texts and start offsets come from ``seed``.
    """
    if n < 1:
        raise PasscodeError(f"n must be >= 1, got {n}")
    if not texts:
        raise PasscodeError("no texts given")
    rng = random.Random(seed)
    depths = [0.5] if n == 1 else [0.1 + 0.8 * i / (n - 1) for i in range(n)]
    need_chars = context_tokens * 6  # generous: English text runs ~4 characters per token
    usable = [(name, text) for name, text in texts if len(text) > need_chars]
    if not usable:
        raise PasscodeError(f"no text is long enough for {context_tokens} tokens")
    cases = []
    for i, depth in enumerate(depths):
        name, text = usable[i % len(usable)]
        offset = rng.randrange(0, max(1, len(text) - need_chars))
        code = f"{rng.randrange(10000, 100000)}"
        cases.append(make_case(tokenizer, text, context_tokens, depth, code, name, offset))
    return cases
