"""Pieces shared by :mod:`kvrecall.rag` and :mod:`kvrecall.stream_session`: a greedy decode loop over any cache
that times the first token, pre-RoPE K/V capture during a cached forward, and caches built from pre-RoPE KV at
chosen positions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvrecall.models import apply_rope, cache_kwargs, model_info, output_cache, rope_cos_sin

__all__ = ["GreedyResult", "greedy_generate", "capture_kv", "cache_at_positions", "eos_ids"]


@dataclass
class GreedyResult:
    """Greedy continuation of a prompt.

    Attributes
    ----------
    tokens : list[int]
        New token ids (the EOS that ended it included).
    first_token_s : float
        Seconds from the call until the first new token was known (the prompt forward + argmax).
    total_s : float
    kv : Tensor[layers, 2, kv_heads, n, head_dim] or None
        Pre-RoPE K/V of the prompt tokens fed to the first forward, when ``capture=True``.
    """

    tokens: list[int]
    first_token_s: float
    total_s: float
    kv: torch.Tensor | None = field(default=None, repr=False)


def eos_ids(model, tokenizer=None) -> set[int]:
    """Token ids that end a greedy answer (the generation config's EOS, else the tokenizer's)."""
    out: set[int] = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        out.add(eos)
    elif eos is not None:
        out.update(int(e) for e in eos)
    return out


class capture_kv:
    """Context manager recording every layer's pre-RoPE K and V (``k_proj``/``v_proj`` outputs) of one forward.

    ``.kv()`` gives ``Tensor[layers, 2, kv_heads, tokens, head_dim]`` for the tokens of the last forward (batch
    1). With ``queries=True`` the pre-RoPE queries are kept too (``.q()`` -> ``[layers, heads, tokens, dim]``).
    """

    def __init__(self, model, queries: bool = False) -> None:
        self.model, self.queries = model, queries
        self.info = model_info(model)
        self._out: dict[tuple[int, str], torch.Tensor] = {}
        self._hooks: list = []

    def __enter__(self) -> "capture_kv":
        names = ("k_proj", "v_proj", "q_proj") if self.queries else ("k_proj", "v_proj")
        for i, layer in enumerate(self.model.model.layers):
            for name in names:
                def hook(_mod, _inp, out, key=(i, name)):
                    self._out[key] = out.detach()
                self._hooks.append(getattr(layer.self_attn, name).register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _heads(self, name: str, n_heads: int) -> torch.Tensor:
        parts = []
        for i in range(self.info.num_layers):
            x = self._out[(i, name)][0]  # [tokens, n_heads * dim]
            parts.append(x.reshape(x.shape[0], n_heads, self.info.head_dim).transpose(0, 1))
        return torch.stack(parts)

    def kv(self) -> torch.Tensor:
        return torch.stack([self._heads("k_proj", self.info.num_kv_heads),
                            self._heads("v_proj", self.info.num_kv_heads)], dim=1)

    def q(self) -> torch.Tensor:
        return self._heads("q_proj", self.info.num_heads)


def cache_at_positions(model, kv: torch.Tensor, positions: torch.Tensor):
    """A ``DynamicCache`` from pre-RoPE ``kv [layers, 2, kv_heads, S, head_dim]``, keys rotated at ``positions``.

    ``positions`` is ``[S]`` (one position per cached token, the same for every layer) or ``[layers, S]`` (each
    layer its own tokens, e.g. per-layer retrieved blocks at their true stream positions).
    """
    from transformers import DynamicCache

    info = model_info(model)
    param = next(model.parameters())
    kv = kv.to(param.device, param.dtype)
    cache = DynamicCache(config=model.config)
    per_layer = positions.ndim == 2
    if not per_layer:
        cos, sin = rope_cos_sin(model, positions.to(param.device))
    for layer in range(info.num_layers):
        if per_layer:
            cos, sin = rope_cos_sin(model, positions[layer].to(param.device))
        k = apply_rope(kv[layer, 0], cos.to(param.dtype), sin.to(param.dtype))
        cache.update(k.unsqueeze(0).contiguous(), kv[layer, 1].unsqueeze(0).contiguous(), layer)
    return cache


@torch.no_grad()
def greedy_generate(model, cache, prompt_ids: torch.Tensor, start_position: int, max_new_tokens: int,
                    stop_ids: set[int] | None = None, capture: bool = False) -> GreedyResult:
    """Greedy decoding of ``prompt_ids [n]`` placed at positions ``start_position ..`` after ``cache``.

    Parameters
    ----------
    cache : transformers Cache (``DynamicCache``, :class:`~kvrecall.retrieval_cache.RetrievalCache`, ...) holding
        the context; it is extended in place.
    prompt_ids : Tensor[n], n >= 1 — the uncached rest of the prompt.
    start_position : position of ``prompt_ids[0]`` (RoPE); the cache's tokens precede it.
    stop_ids : token ids that end the answer (kept in ``tokens``).
    capture : also return the pre-RoPE K/V of ``prompt_ids`` (for storing the prefix afterwards).
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    ids = prompt_ids.reshape(1, -1).to(device)
    pos = torch.arange(start_position, start_position + ids.shape[1], device=device)[None]
    grab = capture_kv(model) if capture else None
    if grab is not None:
        with grab:
            out = model(ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
    else:
        out = model(ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
    cache = output_cache(out) or cache
    nxt = int(out.logits[0, -1].argmax())
    first = time.perf_counter() - t0
    tokens = [nxt]
    position = start_position + ids.shape[1]
    stop = stop_ids or set()
    while len(tokens) < max_new_tokens and nxt not in stop:
        step = torch.tensor([[nxt]], device=device)
        out = model(step, position_ids=torch.tensor([[position]], device=device), use_cache=True,
                    **cache_kwargs(model, cache))
        cache = output_cache(out) or cache
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        position += 1
    return GreedyResult(tokens, first, time.perf_counter() - t0, grab.kv() if grab is not None else None)
