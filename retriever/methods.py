"""Selection methods: the retriever index (:class:`IndexMethod`) and the baselines it is measured against
(:class:`OracleMethod` exact top-k, :class:`QuestMethod`, :class:`StreamingMethod` StreamingLLM, :class:`RandomMethod`).

Every method implements the same small interface, used by the bench metrics and by sparse decoding::

    reset(keys [layers, kv_heads, T, head_dim])          # pre-RoPE keys of the context
    append(layer, keys [kv_heads, n, head_dim])          # pre-RoPE keys of new tokens
    length(layer) -> int
    select(layer, q [B, heads, head_dim], k, sinks, window, length=None) -> Selection
        # pre-RoPE queries at position ``length - 1``, over tokens ``0 .. length - 1``
"""

from __future__ import annotations

import math

import torch

from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.index import KeyIndex
from kvrecall.retriever.profile import RetrieverProfile
from kvrecall.retriever.rope_window import rotate
from kvrecall.retriever.scoring import exact_scores
from kvrecall.retriever.selection import Selection, fixed_token_mask, select_from_scores, union_select

__all__ = ["IndexMethod", "OracleMethod", "QuestMethod", "StreamingMethod", "RandomMethod", "BASELINES"]


class _KeyStore:
    """Post-RoPE keys per layer (growable), for methods that look at real keys."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, group: int) -> None:
        self.inv_freq, self.scaling, self.group = inv_freq, scaling, group
        self.keys: list[torch.Tensor] = []

    def reset(self, keys: torch.Tensor) -> None:
        if keys.ndim != 4:
            raise RetrieverError(f"keys must be [layers, kv_heads, T, head_dim], got {tuple(keys.shape)}")
        pos = torch.arange(keys.shape[2])
        self.keys = [rotate(keys[layer], self.inv_freq, pos, self.scaling) for layer in range(keys.shape[0])]

    def append(self, layer: int, keys: torch.Tensor) -> None:
        start = self.keys[layer].shape[1]
        new = rotate(keys, self.inv_freq, torch.arange(start, start + keys.shape[1]), self.scaling)
        self.keys[layer] = torch.cat([self.keys[layer], new], dim=1)

    def length(self, layer: int) -> int:
        return self.keys[layer].shape[1]

    def query(self, q: torch.Tensor, length: int) -> torch.Tensor:
        pos = torch.full((q.shape[0],), length - 1)
        return rotate(q.transpose(0, 1), self.inv_freq, pos, self.scaling).transpose(0, 1)


class IndexMethod:
    """The retriever (or the plain-PQ baseline, by profile settings) through a :class:`KeyIndex`."""

    def __init__(self, profile: RetrieverProfile, name: str | None = None, backend: str = "torch") -> None:
        self.profile, self.backend = profile, backend
        s = profile.settings
        self.name = name or f"{'qa' if s.query_aware else 'plain'}-{s.kind}{s.m}x{s.bits}-{s.rope_mode}"
        self.bits_per_key = float(s.bits_per_key)
        self.index = KeyIndex(profile)

    def reset(self, keys: torch.Tensor) -> None:
        self.index = KeyIndex(self.profile)
        self.index.append_all(keys)

    def append(self, layer: int, keys: torch.Tensor) -> None:
        self.index.append(layer, keys)

    def length(self, layer: int) -> int:
        return self.index.length(layer)

    def select(self, layer, q, k, sinks=8, window=64, length=None) -> Selection:
        t = self.index.length(layer) if length is None else length
        pos = torch.full((q.shape[0],), t - 1)
        backend_length = None if t == self.index.length(layer) else t
        return self.index.select(layer, q, k, sinks, window, positions=pos, length=backend_length, backend=self.backend)


class OracleMethod:
    """Exact top-k of the true post-RoPE scores (ground truth; needs full-precision keys: 16 bits x head_dim)."""

    name = "oracle"

    def __init__(self, inv_freq: torch.Tensor, scaling: float, group: int, head_dim: int) -> None:
        self.store = _KeyStore(inv_freq, scaling, group)
        self.bits_per_key = 16.0 * head_dim

    def reset(self, keys):
        self.store.reset(keys)

    def append(self, layer, keys):
        self.store.append(layer, keys)

    def length(self, layer):
        return self.store.length(layer)

    def scores(self, layer, q, length=None) -> torch.Tensor:
        t = self.length(layer) if length is None else length
        return exact_scores(self.store.query(q, t), self.store.keys[layer][:, :t], self.store.group)

    def select(self, layer, q, k, sinks=8, window=64, length=None) -> Selection:
        return select_from_scores(self.scores(layer, q, length), self.store.group, k, sinks, window)


class QuestMethod:
    """Quest: pages of ``page`` post-RoPE keys, per-channel min/max; page score = sum_c max(q_c min_c, q_c max_c).

    Selects the best ``ceil(k / page)`` pages per query head (fp16 min and max per page: ``2*16*D/page`` bits/key).
    """

    def __init__(self, inv_freq, scaling, group, head_dim, page: int = 16) -> None:
        if page < 1:
            raise RetrieverError(f"page size must be >= 1, got {page}")
        self.store = _KeyStore(inv_freq, scaling, group)
        self.page = page
        self.name = f"quest-p{page}"
        self.bits_per_key = 2 * 16.0 * head_dim / page

    def reset(self, keys):
        self.store.reset(keys)

    def append(self, layer, keys):
        self.store.append(layer, keys)

    def length(self, layer):
        return self.store.length(layer)

    def select(self, layer, q, k, sinks=8, window=64, length=None) -> Selection:
        t = self.length(layer) if length is None else length
        keys = self.store.keys[layer][:, :t]  # [Hkv, t, D]
        pad = (-t) % self.page
        lo = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("inf")).reshape(keys.shape[0], -1, self.page, keys.shape[2]).amin(2)
        hi = torch.nn.functional.pad(keys, (0, 0, 0, pad), value=float("-inf")).reshape(keys.shape[0], -1, self.page, keys.shape[2]).amax(2)
        qr = self.store.query(q, t)  # [B, Hq, D]
        head_to_kv = torch.arange(qr.shape[1]) // self.store.group
        bound = torch.maximum(qr[:, :, None, :] * lo[head_to_kv][None], qr[:, :, None, :] * hi[head_to_kv][None]).sum(-1)
        token_scores = bound.repeat_interleave(self.page, dim=-1)[..., :t]  # [B, Hq, t]
        pages_k = math.ceil(k / self.page) * self.page
        return select_from_scores(token_scores, self.store.group, pages_k, sinks, window)


class _LengthOnly:
    """Bookkeeping of methods that need only each layer's context length, never the keys themselves."""

    _lengths: list[int]

    def reset(self, keys):
        self._lengths = [keys.shape[2]] * keys.shape[0]

    def append(self, layer, keys):
        self._lengths[layer] += keys.shape[1]

    def length(self, layer):
        return self._lengths[layer]


class StreamingMethod(_LengthOnly):
    """StreamingLLM: the sinks plus a recent window enlarged by the whole top-k allowance (``group * k``)."""

    name = "streamingllm"
    bits_per_key = 0.0

    def __init__(self, group: int) -> None:
        self.group = group
        self._lengths: list[int] = []

    def select(self, layer, q, k, sinks=8, window=64, length=None) -> Selection:
        t = self.length(layer) if length is None else length
        fixed = fixed_token_mask(t, sinks, window + self.group * k)
        b, hq = q.shape[0], q.shape[1]
        return union_select(torch.zeros(b, hq, t, dtype=torch.bool), self.group, fixed)


class RandomMethod(_LengthOnly):
    """Random top-k per query head (plus sinks and window): the floor any method must beat."""

    name = "random"
    bits_per_key = 0.0

    def __init__(self, group: int, seed: int = 0) -> None:
        self.group = group
        self.gen = torch.Generator().manual_seed(seed)
        self._lengths: list[int] = []

    def select(self, layer, q, k, sinks=8, window=64, length=None) -> Selection:
        t = self.length(layer) if length is None else length
        scores = torch.rand(q.shape[0], q.shape[1], t, generator=self.gen)
        return select_from_scores(scores, self.group, k, sinks, window)


BASELINES = (OracleMethod, QuestMethod, StreamingMethod, RandomMethod)
"""The baseline selection methods (everything here except the retriever's own :class:`IndexMethod`)."""
