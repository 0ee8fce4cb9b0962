"""Metric helpers for ``bench/codec.py``: KV and attention-output error, KL / perplexity, entropy, timing."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = [
    "SquaredError",
    "attention_output",
    "next_token_stats",
    "empirical_entropy_bits",
    "median_seconds",
    "RowAccumulator",
    "PasscodeCase",
    "passcode_cases",
    "greedy_answer",
]


@dataclass
class SquaredError:
    """Pooled relative error: sqrt(sum ||approx - exact||^2 / sum ||exact||^2) over everything added."""

    err2: float = 0.0
    ref2: float = 0.0

    def add(self, exact: torch.Tensor, approx: torch.Tensor) -> None:
        exact, approx = exact.double(), approx.double()
        self.err2 += float(((approx - exact) ** 2).sum())
        self.ref2 += float((exact**2).sum())

    @property
    def value(self) -> float:
        return math.sqrt(self.err2 / self.ref2) if self.ref2 > 0 else float("nan")


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of queries over a whole context (no mask: every query comes after the context).

    Parameters
    ----------
    q : Tensor[layers, heads, queries, head_dim]
        Queries after RoPE.
    k, v : Tensor[layers, kv_heads, tokens, head_dim]
        Keys after RoPE, values.

    Returns
    -------
    Tensor[layers, heads, queries, head_dim], float64
    """
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores, dim=-1) @ v


def next_token_stats(
    ref_logits: torch.Tensor, logits: torch.Tensor, cont_ids: torch.Tensor
) -> tuple[float, int, float]:
    """KL and negative log-likelihood of a teacher-forced continuation.

    Parameters
    ----------
    ref_logits, logits : Tensor[n, vocab]
        Logits at the continuation's positions with the exact and with the decoded context KV.
    cont_ids : Tensor[n]
        The continuation; logits at position ``i`` predict ``cont_ids[i + 1]``.

    Returns
    -------
    (kl_sum, n_kl, nll_sum)
        Sum over the ``n`` positions of KL(p_exact || p_decoded) in nats, ``n``, and the summed NLL (nats) of
        ``cont_ids[1:]`` under ``logits`` (``n - 1`` terms).
    """
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    got = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    nll = -got[:-1].gather(1, cont_ids[1:].reshape(-1, 1).to(got.device)).sum()
    return float(kl.clamp(min=0).sum()), int(kl.numel()), float(nll)


def empirical_entropy_bits(symbols: np.ndarray, alphabet: int | None = None) -> float:
    """Total empirical (zeroth-order) entropy in bits of a 1-D symbol array: ``n * H(histogram)``."""
    symbols = np.asarray(symbols).reshape(-1)
    if symbols.size == 0:
        return 0.0
    counts = np.bincount(symbols.astype(np.int64), minlength=alphabet or 0).astype(np.float64)
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size)


def median_seconds(
    fn: Callable[[], object], repeats: int, budget_s: float = 2.0, min_total_s: float = 0.25, max_runs: int = 50
) -> tuple[float, object]:
    """Median wall time of ``fn`` and its last result.

    Runs at least ``repeats`` times and, for fast calls, keeps going until ``min_total_s`` is spent (at most
    ``max_runs`` runs), so a millisecond call is not timed once; stops early once ``budget_s`` is spent.
    """
    times, result = [], None
    while True:
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        total = sum(times)
        if total > budget_s or len(times) >= max_runs:
            break
        if len(times) >= max(1, repeats) and total >= min_total_s:
            break
    return statistics.median(times), result


@dataclass
class RowAccumulator:
    """Everything one (model, codec, level) row sums up over the evaluation texts."""

    bytes: int = 0
    elements: int = 0
    kv: SquaredError = field(default_factory=SquaredError)
    attn: SquaredError = field(default_factory=SquaredError)
    kl_sum: float = 0.0
    kl_n: int = 0
    nll: float = 0.0
    nll_ref: float = 0.0
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    fp16_bytes: list[int] = field(default_factory=list)

    def mbps(self, which: str) -> float:
        """fp16-equivalent MB/s: median over texts of (fp16 bytes / median seconds)."""
        times = self.encode_s if which == "encode" else self.decode_s
        rates = [b / t / 1e6 for b, t in zip(self.fp16_bytes, times) if t > 0]
        return statistics.median(rates) if rates else float("nan")


# ------------------------------------------------------------------------------------------------ passcode test
@dataclass
class PasscodeCase:
    """One planted-passcode prompt: context token ids (the KV that gets replaced), the last prompt token, answer."""

    depth: float
    passcode: str
    context_ids: torch.Tensor  # [T]
    last_id: int


def passcode_cases(tok, texts: list[tuple[str, str]], n: int, tokens: int, seed: int = 0) -> list[PasscodeCase]:
    """``n`` prompts of about ``tokens`` tokens from :func:`kvrecall.passcode.make_cases` (a book excerpt with a
    five-digit passcode planted at depths 10-90%, asked through the model's chat template), split into the context
    whose KV gets replaced and the last prompt token."""
    from kvrecall.passcode import make_cases

    return [PasscodeCase(c.depth, c.passcode, c.input_ids[:-1], int(c.input_ids[-1]))
            for c in make_cases(tok, texts, n, tokens, seed)]


def greedy_answer(model, tok, kv: torch.Tensor, last_id: int, max_new: int | None = None) -> str:
    """Greedy continuation after a context given only as its KV ``[L, 2, H, T, D]`` (keys pre-RoPE)."""
    from kvrecall.models import cache_kwargs, kv_to_cache, output_cache

    from kvrecall.passcode import ANSWER_TOKENS

    max_new = ANSWER_TOKENS if max_new is None else max_new
    cache = kv_to_cache(model, kv)
    pos, nxt, out = kv.shape[3], last_id, []
    with torch.no_grad():
        for i in range(max_new):
            o = model(torch.tensor([[nxt]]), position_ids=torch.tensor([[pos + i]]), use_cache=True,
                      **cache_kwargs(model, cache))
            cache = output_cache(o)
            nxt = int(o.logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out)
