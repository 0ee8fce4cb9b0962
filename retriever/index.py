"""Per-sequence key index: codes per (layer, KV head, token), built at prefill and appended during decoding."""

from __future__ import annotations

import numpy as np
import torch

from kvrecall.retriever.codebooks import code_dtype, decode, encode, pack_faiss_codes
from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.profile import RetrieverProfile
from kvrecall.retriever.rope_window import rotate, windowed_query
from kvrecall.retriever.scoring import exact_scores, lut_scores
from kvrecall.retriever.selection import (
    Selection,
    fixed_token_mask,
    resolve_budget,
    select_from_scores,
    union_select,
)

__all__ = ["KeyIndex"]


class KeyIndex:
    """Key codes of one sequence for every layer, scored with the profile's codebooks.

    Parameters
    ----------
    profile : RetrieverProfile
    device : torch device for codes and scoring (the GPU in production, CPU here).

    Notes
    -----
    Keys are appended in position order starting at 0, as pre-RoPE ``[kv_heads, tokens, head_dim]`` tensors.
    """

    def __init__(self, profile: RetrieverProfile, device: str | torch.device = "cpu") -> None:
        self.profile = profile
        self.settings = profile.settings
        self.device = torch.device(device)
        s = self.settings
        self.group = s.group_size
        self._key_t = profile.key_transform.to(self.device)
        self._query_t = profile.query_transform.to(self.device)
        self._codebooks = profile.codebooks.to(self.device)
        self._inv_freq = profile.inv_freq.to(self.device)
        self._dtype = code_dtype(s.bits)
        self._codes = [torch.empty(s.num_kv_heads, 0, s.m, dtype=self._dtype, device=self.device) for _ in range(s.num_layers)]
        self._lengths = [0] * s.num_layers
        self._faiss: dict[tuple[int, int], object] = {}

    # ------------------------------------------------------------------ building
    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.settings.num_layers:
            raise RetrieverError(f"layer {layer!r} out of range 0..{self.settings.num_layers - 1}")

    def length(self, layer: int = 0) -> int:
        """Tokens indexed so far in ``layer``."""
        self._check_layer(layer)
        return self._lengths[layer]

    def append(self, layer: int, keys: torch.Tensor) -> None:
        """Code and append pre-RoPE keys ``Tensor[kv_heads, n, head_dim]`` at the next positions of ``layer``."""
        self._check_layer(layer)
        s = self.settings
        if keys.ndim != 3 or keys.shape[0] != s.num_kv_heads or keys.shape[2] != s.head_dim:
            raise RetrieverError(
                f"keys must be [kv_heads={s.num_kv_heads}, n, head_dim={s.head_dim}], got {tuple(keys.shape)}"
            )
        if not torch.isfinite(keys).all():
            raise RetrieverError("keys contain NaN or Inf")
        start, n = self._lengths[layer], keys.shape[1]
        if n == 0:
            return
        k = keys.to(self.device).float()
        if s.rope_mode == "absolute":
            k = rotate(k, self._inv_freq, torch.arange(start, start + n), s.rope_scaling)
        k = torch.einsum("htd,hde->hte", k, self._key_t[layer])
        self.append_codes(layer, torch.stack([encode(k[h], self._codebooks[layer, h]) for h in range(s.num_kv_heads)]))

    def append_codes(self, layer: int, codes: torch.Tensor) -> None:
        """Append precomputed codes ``Tensor[kv_heads, n, m]`` (e.g. an index restored from storage)."""
        self._check_layer(layer)
        s = self.settings
        if codes.ndim != 3 or codes.shape[0] != s.num_kv_heads or codes.shape[2] != s.m:
            raise RetrieverError(f"codes must be [kv_heads={s.num_kv_heads}, n, m={s.m}], got {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise RetrieverError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << s.bits)):
            raise RetrieverError(f"codes out of range 0..{(1 << s.bits) - 1}")
        new = codes.to(self.device, self._dtype)
        start, n = self._lengths[layer], codes.shape[1]
        buf = self._codes[layer]
        if start + n > buf.shape[1]:
            grown = torch.empty(s.num_kv_heads, max(2 * buf.shape[1], start + n, 64), s.m, dtype=self._dtype, device=self.device)
            grown[:, :start] = buf[:, :start]
            self._codes[layer] = buf = grown
        buf[:, start : start + n] = new
        self._lengths[layer] = start + n

    def append_all(self, keys: torch.Tensor) -> None:
        """Append pre-RoPE keys of every layer: ``Tensor[layers, kv_heads, n, head_dim]``."""
        if keys.ndim != 4 or keys.shape[0] != self.settings.num_layers:
            raise RetrieverError(f"keys must be [layers={self.settings.num_layers}, kv_heads, n, head_dim], got {tuple(keys.shape)}")
        for layer in range(keys.shape[0]):
            self.append(layer, keys[layer])

    def codes(self, layer: int, length: int | None = None) -> torch.Tensor:
        """Codes of the first ``length`` tokens (default all): ``Tensor[kv_heads, length, m]``."""
        self._check_layer(layer)
        n = self._lengths[layer] if length is None else length
        if not 0 <= n <= self._lengths[layer]:
            raise RetrieverError(f"length {length} exceeds the {self._lengths[layer]} indexed tokens of layer {layer}")
        return self._codes[layer][:, :n]

    # ------------------------------------------------------------------ scoring
    def transform_queries(self, layer: int, q: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-RoPE queries ``[B, Hq, D]`` -> rotated (windowed or at ``positions [B]``) and transformed queries."""
        self._check_layer(layer)
        s = self.settings
        if q.ndim != 3 or q.shape[1] != s.num_heads or q.shape[2] != s.head_dim:
            raise RetrieverError(f"queries must be [B, heads={s.num_heads}, head_dim={s.head_dim}], got {tuple(q.shape)}")
        qf = q.to(self.device).float()
        if s.rope_mode == "windowed":
            qr = windowed_query(qf, self._inv_freq, s.window_distance, s.rope_scaling)
        elif s.rope_mode == "positional":
            raise RetrieverError("a positional index has no transformed-query LUT path; use scores()")
        else:
            if positions is None:
                raise RetrieverError("an absolute-RoPE index needs the query positions")
            pos = torch.as_tensor(positions).reshape(-1)
            if pos.numel() != q.shape[0]:
                raise RetrieverError(f"{pos.numel()} positions for {q.shape[0]} queries")
            qr = rotate(qf.transpose(0, 1), self._inv_freq, pos, s.rope_scaling).transpose(0, 1)
        head_to_kv = torch.arange(s.num_heads, device=self.device) // self.group
        return torch.einsum("bhd,hde->bhe", qr, self._query_t[layer][head_to_kv])

    def decoded_keys(self, layer: int, length: int | None = None) -> torch.Tensor:
        """Reconstructed keys in the untransformed space, ``Tensor[kv_heads, T, head_dim]`` (pre-RoPE unless the
        profile is ``absolute``)."""
        codes = self.codes(layer, length)
        out = [decode(codes[h], self._codebooks[layer, h]) @ self._query_t[layer, h].T for h in range(codes.shape[0])]
        return torch.stack(out)

    def scores(self, layer: int, q: torch.Tensor, positions=None, length: int | None = None) -> torch.Tensor:
        """Approximate scores ``Tensor[B, Hq, T]`` of pre-RoPE queries ``[B, Hq, D]`` against indexed keys.

        ``windowed`` and ``absolute`` profiles score with :func:`lut_scores`; ``positional`` profiles decode the
        keys, rotate them at their true positions and dot them with the query rotated at ``positions`` (one
        position for all ``B`` queries).
        """
        s = self.settings
        if s.rope_mode == "positional":
            if positions is None:
                raise RetrieverError("a positional index needs the query positions")
            pos = torch.as_tensor(positions).reshape(-1)
            if pos.numel() != q.shape[0] or (pos != pos[0]).any():
                raise RetrieverError("a positional index scores queries of one position at a time")
            keys = self.decoded_keys(layer, length)
            keys = rotate(keys, self._inv_freq, torch.arange(keys.shape[1]), s.rope_scaling)
            qr = rotate(q.to(self.device).float().transpose(0, 1), self._inv_freq, pos, s.rope_scaling).transpose(0, 1)
            return exact_scores(qr, keys, self.group)
        qt = self.transform_queries(layer, q, positions)
        return lut_scores(qt, self._codebooks[layer], self.codes(layer, length), self.group)

    def select(
        self,
        layer: int,
        q: torch.Tensor,
        budget: int | float,
        sinks: int = 8,
        window: int = 64,
        positions=None,
        length: int | None = None,
        backend: str = "torch",
    ) -> Selection:
        """Tokens to attend to for queries ``[B, Hq, D]`` (pre-RoPE) over the first ``length`` indexed tokens.

        ``backend="torch"`` scores with the LUT path; ``"faiss"`` with one ``faiss.IndexPQ`` (inner product)
        per KV head over all indexed tokens (``length`` must then be None).
        """
        t = self._lengths[layer] if length is None else length
        k = resolve_budget(budget, t)
        if backend == "torch":
            return select_from_scores(self.scores(layer, q, positions, length), self.group, k, sinks, window)
        if backend == "faiss":
            if length is not None and length != self._lengths[layer]:
                raise RetrieverError("the faiss backend searches the whole index; pass length=None")
            return self._select_faiss(layer, self.transform_queries(layer, q, positions), k, sinks, window)
        raise RetrieverError(f"unknown backend {backend!r} (use 'torch' or 'faiss')")

    # ------------------------------------------------------------------ faiss CPU path
    def _faiss_index(self, layer: int, head: int):
        import faiss

        s = self.settings
        index = self._faiss.get((layer, head))
        if index is None:
            index = faiss.IndexPQ(s.head_dim, s.m, s.bits, faiss.METRIC_INNER_PRODUCT)
            cents = self._codebooks[layer, head].detach().cpu().numpy().astype(np.float32).ravel()
            faiss.copy_array_to_vector(cents, index.pq.centroids)
            index.is_trained = True
            self._faiss[(layer, head)] = index
        have, want = index.ntotal, self._lengths[layer]
        if want > have:
            index.add_sa_codes(pack_faiss_codes(self._codes[layer][head, have:want], s.bits))
        return index

    def _select_faiss(self, layer: int, qt: torch.Tensor, k: int, sinks: int, window: int) -> Selection:
        b, hq, d = qt.shape
        t = self._lengths[layer]
        fixed = fixed_token_mask(t, sinks, window)
        n_fixed = int(fixed.sum())
        k = min(k, t - n_fixed)
        head_masks = torch.zeros(b, hq, t, dtype=torch.bool)
        if k > 0:
            want = min(t, k + n_fixed)
            fixed_np = fixed.numpy()
            for h in range(self.settings.num_kv_heads):
                heads = slice(h * self.group, (h + 1) * self.group)
                x = np.ascontiguousarray(qt[:, heads].reshape(-1, d).detach().cpu().numpy().astype(np.float32))
                _, ids = self._faiss_index(layer, h).search(x, want)
                for row, hits in enumerate(ids):
                    hits = hits[hits >= 0]
                    kept = hits[~fixed_np[hits]][:k]
                    head_masks[row // self.group, h * self.group + row % self.group, torch.from_numpy(kept)] = True
        return union_select(head_masks, self.group, fixed)
