"""Block scorers of a :class:`~kvrecall.stream_session.StreamSession`: which offloaded blocks an ``ask`` loads.

Every scorer returns ``Tensor[layers, n_blocks]`` (higher is better; a ``[n_blocks]`` result is used for every
layer):

``mean_key_scores`` (ReKV, ``scorer="mean-key"``)
    Each block's summary is the mean of its pre-RoPE keys per layer (all KV heads concatenated), held in one
    FAISS inner-product index per layer; the question's pre-RoPE queries, averaged over tokens and over each GQA
    group, are searched against it.
``code_scores`` (ours, ``scorer="codes"``)
    Every stored token keeps its query-aware VQ code (:mod:`kvrecall.retriever`); the question's queries score
    all codes at the profile's fixed distance (A²ATS's windowed LUT, position-free like the blocks' placement),
    scores become attention weights over all stored tokens per (question token, head), and a block's score is
    the largest attention mass its tokens receive from any question token and head (the maximum, not the mean:
    a fact is found by a few retrieval heads and question tokens, and averaging drowns them; measured at 8K,
    ``docs/streaming.md``).
    ``scorer="codes-positional"`` scores the same codes at each token's true distance from the question (the
    banded scorer: exact relative RoPE within ``near`` tokens, one LUT per distance band beyond).
``exact_block_scores`` (the ``rerank`` stage)
    The same mass-max score from the candidate blocks' decoded pre-RoPE keys, the question's queries rotated
    by a fixed distance (position-free, exact up to the codec): the second stage of an ``ask`` with
    ``rerank > 1``, over the ``top_blocks * rerank`` best blocks of the first stage.
``EmbeddingBlockScorer`` (external, ``scorer=EmbeddingBlockScorer(embedder, tokenizer)``)
    Cosine similarity of the question's text and each block's text under a sentence embedder (text streams
    only).
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["mean_key_scores", "code_scores", "exact_block_scores", "EmbeddingBlockScorer", "group_mean_queries"]


def group_mean_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Pre-RoPE queries ``[layers, heads, tokens, dim]`` -> mean per GQA group ``[layers, kv_heads * dim]``."""
    layers, heads, tokens, dim = q.shape
    g = q.float().reshape(layers, kv_heads, heads // kv_heads, tokens, dim).mean(dim=(2, 3))
    return g.reshape(layers, kv_heads * dim)


def mean_key_scores(indexes: list, q: torch.Tensor, kv_heads: int, n_blocks: int) -> torch.Tensor:
    """ReKV block scores from the per-layer FAISS indexes of mean keys: ``[layers, n_blocks]``."""
    query = group_mean_queries(q, kv_heads).numpy().astype(np.float32)
    out = torch.full((len(indexes), n_blocks), float("-inf"))
    for layer, index in enumerate(indexes):
        scores, ids = index.search(np.ascontiguousarray(query[layer : layer + 1]), n_blocks)
        keep = ids[0] >= 0
        out[layer, torch.from_numpy(ids[0][keep]).long()] = torch.from_numpy(scores[0][keep])
    return out


def code_scores(scorer, codes: torch.Tensor, q: torch.Tensor, block: int, distance: int) -> torch.Tensor:
    """Attention mass per block estimated from key codes: ``[layers, n_blocks]``.

    Parameters
    ----------
    scorer : kvrecall.retriever.fast_scoring.CodeScorer: ``"windowed"`` (every token at the profile's
        ``window_distance``) or ``"banded"`` (every token at its true distance from the question).
    codes : Tensor[layers, kv_heads, n_blocks * block, m] — codes of every stored token, in stream order.
    q : Tensor[layers, heads, tokens, dim] — the question's pre-RoPE queries.
    block : tokens per block.
    distance : the question's distance from the last stored token (windowed: the profile's fixed distance).
    """
    layers, heads, tokens, dim = q.shape
    n = codes.shape[2]
    out = torch.empty(layers, n // block)
    scale = 1.0 / math.sqrt(dim)
    for layer in range(layers):
        qs = q[layer].permute(1, 0, 2).float()  # [tokens, heads, dim] as a batch of question tokens
        c = codes[layer].unsqueeze(0).expand(tokens, *codes[layer].shape)
        s = scorer.scores(layer, qs, c, 0, n, n + distance) * scale  # [tokens, heads, n]
        out[layer] = _block_mass_max(s, block)
    return out


def _block_mass_max(s: torch.Tensor, block: int) -> torch.Tensor:
    """Scaled scores ``[tokens, heads, n_blocks * block]`` -> the largest block mass per block ``[n_blocks]``."""
    tokens, heads, n = s.shape
    mass = torch.softmax(s, dim=-1).reshape(tokens, heads, n // block, block).sum(-1)
    return mass.amax(dim=(0, 1))


def exact_block_scores(keys: torch.Tensor, q: torch.Tensor, block: int, distance: int, inv_freq: torch.Tensor,
                       rope_scaling: float = 1.0) -> torch.Tensor:
    """Mass-max block scores from exact pre-RoPE keys, queries at a fixed distance: ``[layers, n_blocks]``.

    Parameters
    ----------
    keys : Tensor[layers, kv_heads, n_blocks * block, dim] — pre-RoPE keys of the candidate blocks.
    q : Tensor[layers, heads, tokens, dim] — the question's pre-RoPE queries.
    block : tokens per block.
    distance : relative distance at which every key is scored (RoPE of ``distance`` on the query, none on keys).
    inv_freq, rope_scaling : the model's RoPE (:func:`kvrecall.models.rope_parameters`).
    """
    from kvrecall.retriever.rope_window import windowed_query

    layers, heads, tokens, dim = q.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    qr = windowed_query(q, inv_freq, distance, rope_scaling)  # [layers, heads, tokens, dim]
    out = []
    for layer in range(layers):  # one layer's [tokens, heads, n] scores at a time; a GQA group shares its keys
        qg = qr[layer].reshape(kv_heads, heads // kv_heads * tokens, dim)
        s = torch.matmul(qg, keys[layer].float().transpose(1, 2)).reshape(heads, tokens, n).transpose(0, 1)
        out.append(_block_mass_max(s / math.sqrt(dim), block))
    return torch.stack(out)


class EmbeddingBlockScorer:
    """External scorer: sentence-embedding similarity between the question's text and each block's text.

    Parameters
    ----------
    embedder : kvrecall.embedder.Embedder
    tokenizer : the LLM's tokenizer (decodes question and block token ids).
    """

    def __init__(self, embedder, tokenizer) -> None:
        self.embedder, self.tokenizer = embedder, tokenizer
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, session, question_ids: torch.Tensor) -> torch.Tensor:
        from kvrecall.stream_blocks import StreamError

        texts = []
        for i, ids in enumerate(session.block_token_ids):
            if ids is None:
                raise StreamError("EmbeddingBlockScorer needs text blocks (this stream has inputs_embeds blocks)")
            if i not in self._cache:
                texts.append((i, self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)))
        if texts:
            vecs = self.embedder.embed([t for _, t in texts])
            for (i, _), v in zip(texts, vecs):
                self._cache[i] = v
        q = self.embedder.embed([self.tokenizer.decode(question_ids.tolist(), skip_special_tokens=True)])[0]
        mat = np.stack([self._cache[i] for i in range(len(session.block_token_ids))])
        return torch.from_numpy(mat @ q)
