"""Per-step scoring of coded keys for retrieval decoding, and a fast top-k + GQA union.

Three scorers of the same codes, measured side by side in ``bench/decode.py`` and ``docs/retrieval-decoding.md``:

``positional``
    Decode every code to its pre-RoPE key, rotate it at its true position, dot with the query rotated at its
    position: the exact score of the quantized key. ``O(T * head_dim)`` work per KV head and step.
``windowed``
    A²ATS: one lookup table (LUT) ``centroid · R_w q`` per query head for a fixed distance ``w``; a token's score
    is one gather ``LUT[code]``. ``O(K * head_dim + T)``.
``banded`` (default)
    Tokens nearer than ``near`` are scored ``positional``; farther tokens by distance bands growing
    geometrically by ``band_ratio``, each band with its own LUT. RoPE's ``(R_p q)·(R_j k) = (R_{p-j} q)·k``
    lets one rotated query score every code at one distance; a band's query is the *mean* rotation over the
    band's distances (RoPE at the middle distance, each frequency pair scaled by the Dirichlet kernel
    ``sin(θw/2) / (w sin(θ/2))`` of the band width ``w``), so a band's LUT score is the exact score of the code
    averaged over the band: frequencies that turn many times within the band, whose phase a single distance
    would guess at random, weigh nothing, slow ones keep their full weight. The near band, where attention is
    most position-specific, stays exact. ``O(n_bands * K * head_dim + near * head_dim + T)``.

All scorers read only codes, the decoded centroids of the profile (per-model, shared by all sequences) and the
query; they never touch the full keys.
"""

from __future__ import annotations

import math

import torch

from kvrecall.models import apply_rope, rope_tables, rotate_half, shared_rope_table
from kvrecall.retriever.code_buffer import CodeBuffer
from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.profile import RetrieverProfile

__all__ = ["SCORERS", "CodeScorer", "compact_mask", "padded_selection", "topk_union", "topk_union_reference"]

SCORERS = ("banded", "positional", "windowed")
SAMPLE_STRIDE = 8  # candidates(): one token in this many sets each query head's score threshold


class CodeScorer:
    """Scores of coded pre-RoPE keys for decode queries, from one profile.

    Parameters
    ----------
    profile : RetrieverProfile
        A ``positional`` or ``windowed`` profile (codes of pre-RoPE keys); ``absolute`` profiles code post-RoPE
        keys and are rejected.
    method : ``"banded"``, ``"positional"`` or ``"windowed"``.
    near : int
        ``banded``: tokens at distance ``< near`` are scored exactly (positional).
    band_ratio : float
        ``banded``: each far band spans distances ``[d, d * band_ratio)``.
    device : torch device of the decoded centroids.
    lut_scores : callable ``(q [1, Hq, D], codebooks [Hkv, 1, K, D], codes [Hkv, n, 1], group) -> [1, Hq, n]``,
        optional: computes the far bands' ``LUT[code]`` scores (e.g. the Triton kernel
        ``kvrecall.kernels.score_topk.lut_scores_triton``, passed in by the integration layer on a GPU); by
        default torch builds the LUTs and gathers.
    """

    def __init__(
        self,
        profile: RetrieverProfile,
        method: str = "banded",
        near: int = 1024,
        band_ratio: float = 2.0,
        device: str | torch.device = "cpu",
        lut_scores=None,
    ) -> None:
        s = profile.settings
        if s.rope_mode == "absolute":
            raise RetrieverError("retrieval decoding needs a profile of pre-RoPE codes ('positional' or 'windowed'), "
                                 "got rope_mode 'absolute'")
        if method not in SCORERS:
            raise RetrieverError(f"scorer must be one of {SCORERS}, got {method!r}")
        if not isinstance(near, int) or near < 1:
            raise RetrieverError(f"near must be a positive int, got {near!r}")
        if not (isinstance(band_ratio, (int, float)) and band_ratio > 1.0):
            raise RetrieverError(f"band_ratio must be > 1, got {band_ratio!r}")
        self.settings = s
        self.method, self.near, self.band_ratio = method, near, float(band_ratio)
        self.device = torch.device(device)
        self.group = s.group_size
        self.inv_freq = profile.inv_freq.to(self.device)
        self.scaling = s.rope_scaling
        self._far_cache = None  # (ranges key, (cos, sin)) of the last _far_tables call
        self.lut_scores = lut_scores
        # decoded centroids in the untransformed pre-RoPE key space: [L, Hkv, K, D] (vq) — k_hat = c' @ L^-1
        self._query_t = profile.query_transform.to(self.device)  # L^-T
        self._codebooks = profile.codebooks.to(self.device)  # [L, Hkv, m, K, D/m]
        if s.m == 1:
            self._decoded = torch.einsum("lhkd,lhed->lhke", self._codebooks[:, :, 0], self._query_t).contiguous()
        else:
            self._decoded = None

    @property
    def codebook_bytes(self) -> int:
        """Bytes of the per-model decoded codebooks this scorer keeps (shared by every sequence)."""
        t = self._decoded if self._decoded is not None else self._codebooks
        return t.numel() * t.element_size()

    # ------------------------------------------------------------------ pieces
    def _rotate_queries(self, q: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, D]`` pre-RoPE -> ``[B, Hq, n, D]`` rotated by each of ``distances [n]``."""
        cos, sin = rope_tables(self.inv_freq, distances, self.scaling)
        return apply_rope(q.float()[:, :, None, :], cos, sin)

    def _lut(self, layer: int, qr: torch.Tensor) -> torch.Tensor:
        """LUTs for rotated queries ``qr [B, Hq, n, D]`` -> ``[Hkv, K, B * group * n]`` (score of every centroid)."""
        b, hq, n, d = qr.shape
        hkv = hq // self.group
        q = qr.reshape(b, hkv, self.group, n, d).permute(1, 4, 0, 2, 3).reshape(hkv, d, b * self.group * n)
        if self._decoded is not None:
            return torch.bmm(self._decoded[layer], q)
        # product codes: q' = q L^-T, one LUT per sub-vector, summed after the gather
        raise RetrieverError("banded/windowed LUT scoring is implemented for vq profiles (m == 1)")

    def _decode(self, layer: int, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Hkv, n, m]`` -> pre-RoPE keys ``[B, Hkv, n, D]``."""
        if self._decoded is not None:
            c = codes[..., 0].long()
            table = self._decoded[layer]  # [Hkv, K, D]
            return torch.stack([table[h][c[:, h]] for h in range(table.shape[0])], dim=1)
        books = self._codebooks[layer]  # [Hkv, m, K, D/m]
        idx = codes.long()
        parts = []
        for j in range(books.shape[1]):
            parts.append(torch.stack([books[h, j][idx[:, h, :, j]] for h in range(books.shape[0])], dim=1))
        kt = torch.cat(parts, dim=-1)  # transformed space
        return torch.einsum("bhnd,hed->bhne", kt, self._query_t[layer])

    def _positional(self, layer: int, q: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor, pos: int):
        """Exact scores of decoded keys at ``positions [n]``: ``[B, Hq, n]``."""
        keys = self._decode(layer, codes)  # [B, Hkv, n, D]
        cos, sin = rope_tables(self.inv_freq, positions, self.scaling)
        keys = apply_rope(keys, cos, sin)
        qr = self._rotate_queries(q, torch.tensor([pos], device=q.device))[:, :, 0]  # [B, Hq, D]
        b, hq, d = qr.shape
        hkv = hq // self.group
        out = torch.matmul(qr.reshape(b, hkv, self.group, d), keys.transpose(2, 3))  # [B, Hkv, group, n]
        return out.reshape(b, hq, -1)

    def _gather_lut(self, lut: torch.Tensor, codes: torch.Tensor, col: int) -> torch.Tensor:
        """Scores ``[B, Hq, n]`` from ``lut [Hkv, n_cols, B, K, group]`` column ``col`` for codes ``[B, Hkv, n]``."""
        hkv, _, b = lut.shape[:3]
        out = []
        for bi in range(b):
            rows = [lut[h, col, bi].index_select(0, codes[bi, h]) for h in range(hkv)]  # [n, group] each
            out.append(torch.stack(rows).permute(0, 2, 1).reshape(hkv * self.group, -1))
        return torch.stack(out)

    def bands(self, lo: int, hi: int, pos: int) -> list[tuple[int, int, float | None]]:
        """Token ranges ``(start, end, distance)`` covering ``[lo, hi)`` for a query at ``pos``, nearest first;
        ``distance`` is the LUT's (banded: the middle distance of the range's tokens), None marks the exactly
        scored range."""
        if hi <= lo:
            return []
        if self.method == "positional":
            return [(lo, hi, None)]
        if self.method == "windowed":
            return [(lo, hi, self.settings.window_distance)]
        out = []
        near_start = max(lo, pos - self.near + 1)
        if near_start < hi:
            out.append((near_start, hi, None))
        end = min(hi, near_start)
        d_lo = self.near
        while end > lo:
            d_hi = int(math.ceil(d_lo * self.band_ratio))
            start = max(lo, pos - d_hi + 1)
            out.append((start, end, pos - (start + end - 1) / 2))
            end, d_lo = start, d_hi
        return out

    def _band_queries(self, q: torch.Tensor, far: list[tuple[int, int, float]]) -> torch.Tensor:
        """``q [B, Hq, D]`` pre-RoPE -> the LUT queries of the far ranges ``far`` (``bands`` entries):
        ``[B, Hq, n_far, D]``. Windowed: rotated by the profile's distance. Banded: the mean rotation over each
        range's distances (see the module docstring)."""
        cos, sin = self._far_tables(far, q.device)  # [n_far, D]
        qf = q.float()[:, :, None, :]
        return qf * cos + rotate_half(qf) * sin

    def _far_tables(self, far: list[tuple[int, int, float]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [n_far, D]`` rotating a query into each far range's LUT query (banded: times the range's
        Dirichlet kernel). Every layer of a decode step asks for the same ranges: the last answer is kept."""
        key = (tuple(far), self.method, str(device))
        if self._far_cache is not None and self._far_cache[0] == key:
            return self._far_cache[1]
        dist = torch.tensor([d for _, _, d in far], dtype=torch.float64, device=device)
        cos, sin = rope_tables(self.inv_freq.to(device), dist, self.scaling)
        if self.method == "banded":
            theta = self.inv_freq.to(device).double()[None, :]  # [1, D/2]
            width = torch.tensor([e - s for s, e, _ in far], dtype=torch.float64, device=device)[:, None]
            kernel = torch.sin(theta * width / 2) / (width * torch.sin(theta / 2))  # [n_far, D/2], 1 at width 1
            kernel = torch.cat([kernel, kernel], dim=-1).float()
            cos, sin = cos * kernel, sin * kernel
        self._far_cache = (key, (cos, sin))
        return cos, sin

    def scores_reference(self, layer: int, q: torch.Tensor, codes: torch.Tensor, lo: int, hi: int,
                         pos: int) -> torch.Tensor:
        """The plain reference of :meth:`scores` (per band and head; same results, slower).

        Parameters
        ----------
        q : Tensor[B, Hq, D], pre-RoPE.
        codes : Tensor[B, Hkv, >= hi, m] of integer codes of tokens ``0 ..``, or a
            :class:`~kvrecall.retriever.code_buffer.CodeBuffer` holding them.

        Returns
        -------
        Tensor[B, Hq, hi - lo], float32
        """
        b = q.shape[0]
        out = torch.empty(b, q.shape[1], max(0, hi - lo), device=q.device)
        bands = self.bands(lo, hi, pos)
        far = [(s, e, d) for s, e, d in bands if d is not None]
        if far:
            lut = self._lut(layer, self._band_queries(q, far))  # [Hkv, K, B * group * n_far]
            hkv, n_codes = lut.shape[:2]
            lut = lut.reshape(hkv, n_codes, b, self.group, len(far)).permute(0, 4, 2, 1, 3).contiguous()
            for i, (s, e, _) in enumerate(far):
                out[:, :, s - lo : e - lo] = self._gather_lut(lut, code_range(codes, s, e)[..., 0], i)
        for s, e, d in bands:
            if d is None:
                positions = torch.arange(s, e, device=q.device)
                out[:, :, s - lo : e - lo] = self._positional(layer, q, code_range(codes, s, e), positions, pos)
        return out

    # ------------------------------------------------------------------ fast path
    def _key_tables(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE ``cos, sin [end - start, D]`` of positions ``start .. end-1``, sliced from the model's
        :func:`~kvrecall.models.shared_rope_table`."""
        cos, sin = shared_rope_table(self.inv_freq, self.scaling, end)
        return cos[start:end], sin[start:end]

    def scores(self, layer: int, q: torch.Tensor, codes: torch.Tensor, lo: int, hi: int, pos: int) -> torch.Tensor:
        """Approximate scores of tokens ``lo .. hi-1`` for pre-RoPE queries at position ``pos``.

        One LUT matmul for all far bands and heads, one ``gather`` of the codes per band (a band is a contiguous
        token range, so the codes alone index it: no per-token state is kept), one decode + matmul for the near
        tokens. Equal (to float rounding) to :meth:`scores_reference`.

        Parameters
        ----------
        layer : int
        q : Tensor[B, Hq, D], pre-RoPE.
        codes : Tensor[B, Hkv, >= hi, m] of integer codes of tokens ``0 ..``, or a
            :class:`~kvrecall.retriever.code_buffer.CodeBuffer` holding them.
        lo, hi : token range; pos : the query's position.

        Returns
        -------
        Tensor[B, Hq, hi - lo], float32
        """
        if self._decoded is None:
            return self.scores_reference(layer, q, codes, lo, hi, pos)
        b, hq, d = q.shape
        g = self.group
        hkv = hq // g
        n = max(0, hi - lo)
        if n == 0:
            return q.new_empty(b, hq, 0, dtype=torch.float32)
        ranges = self.bands(lo, hi, pos)
        far = [r for r in ranges if r[2] is not None]  # nearest first
        out = torch.empty(b, hkv, g, n, device=q.device)
        if far and self.lut_scores is not None:
            qr = self._band_queries(q, far)  # [B, Hq, nb, D]
            for band, (s, e, _) in enumerate(far):
                out[:, :, :, s - lo : e - lo] = self._band_scores(layer, qr[:, :, band], code_range(codes, s, e)[..., 0])
        elif far:
            lut = self._band_luts(layer, self._band_queries(q, far))  # [B, Hkv, g, nb, K]
            for band, (s, e, _) in enumerate(far):
                c = code_range(codes, s, e)[:, :, None, :, 0].expand(b, hkv, g, e - s)
                out[:, :, :, s - lo : e - lo] = lut[:, :, :, band].gather(3, c)
        for s, e, dist in ranges:
            if dist is None:
                out[:, :, :, s - lo : e - lo] = self._near_scores(layer, q, code_range(codes, s, e)[..., 0], s, e, pos)
        return out.reshape(b, hq, n)


    # ------------------------------------------------------------------ shortlist
    def candidates(self, layer: int, q: torch.Tensor, codes: torch.Tensor, lo: int, hi: int, pos: int,
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """About ``count`` best-scoring tokens of ``lo .. hi-1`` per query head, unioned per GQA group.

        Short ranges (fewer than ``max(4096, 8 * count)`` tokens) take each head's exact top-``count`` of
        :meth:`scores`. Longer ones (banded and windowed scorers) skip the per-head top-k: a strided sample of one
        token in :data:`SAMPLE_STRIDE` gives each query head its score threshold (the sample's
        ``ceil(count / stride)``-th best), and a token is a candidate when any head of its group scores it at or
        above that head's threshold. In a far band the scores are ``LUT[code]``, so the union is one lookup of a
        boolean table per KV head (``any_h LUT_h >= thr_h``): one gather per token and KV head instead of one
        per query head, and no top-k over the context. Each head keeps ``count`` tokens up to the sample's
        error (about ``1 / sqrt(count / stride)``, 6% at 2,000); callers rescore candidates exactly.

        Parameters
        ----------
        q : Tensor[B, Hq, D], pre-RoPE; codes : as in :meth:`scores`.

        Returns
        -------
        idx : Tensor[B, Hkv, S], int64 token indices (ascending per row; padding holds ``lo``).
        valid : Tensor[B, Hkv, S], bool.
        """
        b, hq, d = q.shape
        g = self.group
        hkv = hq // g
        n = max(0, hi - lo)
        if count >= n:
            idx = torch.arange(lo, hi, device=q.device).expand(b, hkv, n).contiguous()
            return idx, torch.ones(b, hkv, n, dtype=torch.bool, device=q.device)
        stride = SAMPLE_STRIDE
        if self._decoded is None or self.method == "positional" or n < max(4096, stride * count):
            scores = self.scores(layer, q, codes, lo, hi, pos)
            top = _topk_rows(scores.reshape(b * hq, n), count).reshape(b, hkv, -1)
            mask = torch.zeros(b, hkv, n, dtype=torch.bool, device=q.device)
            mask.scatter_(2, top, True)
            return compact_mask(mask, lo)
        c_all = code_range(codes, lo, hi)[..., 0]  # [B, Hkv, n]
        ranges = self.bands(lo, hi, pos)
        far = [r for r in ranges if r[2] is not None]
        lut = qr = None
        kernel = self.lut_scores is not None
        if far:
            qr = self._band_queries(q, far)  # [B, Hq, nb, D]
        if far and not kernel:
            lut = self._band_luts(layer, qr)  # [B, Hkv, g, nb, K]
        near = {}  # ranges scored in full (the near one; every band with a lut_scores kernel)
        samples = []
        band = 0
        for s, e, dist in ranges:
            rel, first = s - lo, (-(s - lo)) % stride
            if dist is None or kernel:
                if dist is None:
                    sc = self._near_scores(layer, q, c_all[:, :, rel : e - lo], s, e, pos)  # [B, Hkv, g, e - s]
                else:
                    sc = self._band_scores(layer, qr[:, :, band], c_all[:, :, rel : e - lo])
                    band += 1
                near[(s, e)] = sc
                samples.append(sc[..., first::stride])
            else:
                c = c_all[:, :, None, rel + first : e - lo : stride].expand(b, hkv, g, -1)
                samples.append(lut[:, :, :, band].gather(3, c))
                band += 1
        sample = torch.cat(samples, dim=-1)  # [B, Hkv, g, ~n / stride]
        rank = min(sample.shape[-1], max(1, math.ceil(count / stride)))
        thr = sample.topk(rank, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [B, Hkv, g, 1]
        mask = torch.empty(b, hkv, n, dtype=torch.bool, device=q.device)
        band = 0
        for s, e, dist in ranges:
            if (s, e) in near:
                mask[:, :, s - lo : e - lo] = (near[(s, e)] >= thr).any(2)
            else:
                table = (lut[:, :, :, band] >= thr).any(2)  # [B, Hkv, K]: codes some head of the group keeps
                mask[:, :, s - lo : e - lo] = table.gather(2, c_all[:, :, s - lo : e - lo])
                band += 1
        return compact_mask(mask, lo)

    def _band_luts(self, layer: int, qr: torch.Tensor) -> torch.Tensor:
        """LUTs of the far bands' queries ``qr [B, Hq, nb, D]``: ``[B, Hkv, g, nb, K]``, the score of every
        decoded centroid, in one batched matmul over KV heads."""
        b, hq, nb, d = qr.shape
        hkv = hq // self.group
        qm = qr.reshape(b, hkv, self.group * nb, d).transpose(0, 1).reshape(hkv, b * self.group * nb, d)
        lut = torch.bmm(qm, self._decoded[layer].transpose(1, 2))  # [Hkv, B*g*nb, K]
        return lut.reshape(hkv, b, self.group, nb, lut.shape[-1]).transpose(0, 1)

    def _band_scores(self, layer: int, qb: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``LUT[code]`` scores ``[B, Hkv, g, n]`` of one far band through the ``lut_scores`` kernel: its LUT query
        ``qb [B, Hq, D]`` against the decoded centroids, codes ``c [B, Hkv, n]`` (one call per batch row: the
        kernel takes one row's codes)."""
        b, hq, _ = qb.shape
        hkv = hq // self.group
        books = self._decoded[layer][:, None]  # [Hkv, 1, K, D]
        rows = [self.lut_scores(qb[bi : bi + 1].contiguous(), books, c[bi, :, :, None].contiguous(), self.group)
                for bi in range(b)]
        return torch.cat(rows).reshape(b, hkv, self.group, -1)

    def _near_scores(self, layer: int, q: torch.Tensor, c: torch.Tensor, s: int, e: int, pos: int) -> torch.Tensor:
        """Exact scores ``[B, Hkv, g, e - s]`` of the decoded codes ``c [B, Hkv, e - s]`` of tokens ``s .. e-1``.

        With ``q'`` the query rotated at ``pos``, ``q' · R_j k = (k ⊙ cos_j) · q' - (k ⊙ sin_j) · rotate_half(q')``:
        two products and two matmuls, the keys are never rotated (half the passes of ``apply_rope``)."""
        b, hq, d = q.shape
        hkv = hq // self.group
        k = self._decoded.shape[2]
        rows = c + (torch.arange(hkv, device=q.device) * k)[:, None]
        keys = self._decoded[layer].reshape(hkv * k, d).index_select(0, rows.reshape(-1)).reshape(b, hkv, -1, d)
        cos, sin = self._key_tables(s, e)
        cq, sq = self._key_tables(pos, pos + 1)  # the query's rotation: a row of the shared table
        qp = apply_rope(q.float(), cq, sq).reshape(b, hkv, self.group, d)
        out = torch.matmul(qp, (keys * cos).transpose(2, 3))
        return out.sub_(torch.matmul(rotate_half(qp), (keys * sin).transpose(2, 3)))


def compact_mask(mask: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The True columns of each row of ``mask [B, H, N]`` as one padded block.

    One ``nonzero`` per row and one padding copy (measured 0.25 ms for 3 rows of 32K at 17% density on one core,
    against 0.41 ms for a single ``nonzero`` over all rows plus the index arithmetic to split it).

    Returns
    -------
    idx : Tensor[B, H, S], int64, ascending column indices + ``offset``, S = the largest row count; padding
        holds ``offset``.
    valid : Tensor[B, H, S], bool.
    """
    b, h, n = mask.shape
    if b * h == 0:
        return (torch.zeros(b, h, 0, dtype=torch.int64, device=mask.device),
                torch.zeros(b, h, 0, dtype=torch.bool, device=mask.device))
    rows = [r.nonzero().squeeze(1) for r in mask.reshape(b * h, n)]
    idx = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)  # [B*H, S]
    valid = idx >= 0
    return (idx.clamp_min_(0) + offset).reshape(b, h, -1), valid.reshape(b, h, -1)


def code_range(codes: torch.Tensor | CodeBuffer, start: int, end: int) -> torch.Tensor:
    """Codes of tokens ``start .. end-1`` as ``int64 [B, Hkv, end - start, m]`` from a tensor or a buffer."""
    if isinstance(codes, CodeBuffer):
        return codes.range(start, end)
    return codes[:, :, start:end].long()


def _topk_rows_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference of :func:`_topk_rows` (one row at a time): indices ``[R, k]`` of the ``k`` largest entries."""
    r, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(r, n)
    stride = 8
    if n < 8 * k or n < 4096:
        return scores.topk(k, dim=-1, sorted=False).indices
    sample = scores[:, ::stride]
    rank = min(sample.shape[1], int(math.ceil(1.5 * k / stride)) + 4)
    thr = sample.topk(rank, dim=-1, sorted=True).values[:, -1:]
    keep = scores >= thr
    out = torch.empty(r, k, dtype=torch.int64, device=scores.device)
    counts = keep.sum(-1)
    for i in range(r):
        if int(counts[i]) < k:
            out[i] = scores[i].topk(k, sorted=False).indices
            continue
        cand = keep[i].nonzero().squeeze(1)
        out[i] = cand[scores[i, cand].topk(k, sorted=False).indices]
    return out


def topk_union_reference(scores: torch.Tensor, group: int, k: int, offset: int = 0) -> list[list[torch.Tensor]]:
    """Reference of :func:`topk_union` (``torch.unique`` per row and head; same result).

    Parameters
    ----------
    scores : Tensor[B, Hq, N] over tokens ``offset .. offset + N - 1``.

    Returns
    -------
    list (per batch row) of lists (per KV head) of ascending int64 token indices (``offset`` added).
    """
    b, hq, n = scores.shape
    hkv = hq // group
    if k <= 0 or n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=scores.device)
        return [[empty for _ in range(hkv)] for _ in range(b)]
    idx = _topk_rows_reference(scores.reshape(b * hq, n), min(k, n)).reshape(b, hkv, -1)
    return [[torch.unique(idx[bi, h]) + offset for h in range(hkv)] for bi in range(b)]


def _topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[R, k]`` of the ``k`` largest entries of each row of ``scores [R, N]`` (exact, any order).

    A strided sample (1/8) gives a per-row threshold that keeps about ``1.5 k`` candidates; the candidates of all
    rows are compacted into one padded ``[R, max candidates]`` block and the exact top-k is one batched ``topk``
    over it (no loop over rows). When the threshold kept fewer than ``k`` in some row, a full ``topk``.
    """
    r, n = scores.shape
    if k >= n:
        return torch.arange(n, device=scores.device).expand(r, n)
    stride = 8
    if n < 8 * k or n < 4096:
        return scores.topk(k, dim=-1, sorted=False).indices
    sample = scores[:, ::stride]
    rank = min(sample.shape[1], int(math.ceil(1.5 * k / stride)) + 4)
    thr = sample.topk(rank, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    keep = scores >= thr
    flat = keep.view(-1).nonzero().squeeze(1)  # candidates of all rows, row-major
    rows = torch.div(flat, n, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=r)
    if int(counts.min()) < k:
        return scores.topk(k, dim=-1, sorted=False).indices
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    dest = torch.arange(flat.numel(), device=scores.device) - starts.index_select(0, rows) + rows * width
    vals = scores.new_full((r * width,), float("-inf"))
    vals.index_copy_(0, dest, scores.reshape(-1).index_select(0, flat))
    cols = flat.new_zeros(r * width)
    cols.index_copy_(0, dest, flat - rows * n)
    top = vals.view(r, width).topk(k, dim=-1, sorted=False).indices
    return cols.view(r, width).gather(1, top)


def topk_union(scores: torch.Tensor, group: int, k: int, offset: int = 0) -> list[list[torch.Tensor]]:
    """Top-``k`` token indices per query head, unioned within each GQA group.

    One batched top-k over all heads, the union as a boolean scatter per KV head, one ``nonzero`` for all.

    Parameters
    ----------
    scores : Tensor[B, Hq, N] over tokens ``offset .. offset + N - 1``.
    group : query heads per KV head; k : tokens per query head.

    Returns
    -------
    list (per batch row) of lists (per KV head) of ascending int64 token indices (``offset`` added).
    """
    b, hq, n = scores.shape
    hkv = hq // group
    if k <= 0 or n == 0:
        empty = torch.empty(0, dtype=torch.int64, device=scores.device)
        return [[empty for _ in range(hkv)] for _ in range(b)]
    idx = _topk_rows(scores.reshape(b * hq, n), min(k, n)).reshape(b, hkv, -1)
    mask = torch.zeros(b, hkv, n, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, idx, True)
    cols = mask.nonzero()[:, 2] + offset
    parts = cols.split(mask.sum(-1).reshape(-1).tolist())
    return [[parts[bi * hkv + h] for h in range(hkv)] for bi in range(b)]


def padded_selection(chosen: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-(row, KV head) index lists of :func:`topk_union` as one padded block, on the CPU.

    Parameters
    ----------
    chosen : list (B) of lists (Hkv) of int64 token indices (any lengths, any device).

    Returns
    -------
    idx : Tensor[B, Hkv, S], int64, S = the longest list; padding rows hold 0.
    valid : Tensor[B, Hkv, S], bool, True where ``idx`` holds a selected token.
    """
    b, hkv = len(chosen), len(chosen[0]) if chosen else 0
    flat = [c.reshape(-1).to("cpu", torch.int64) for row in chosen for c in row]
    if len(flat) != b * hkv:
        raise ValueError("every batch row must select for the same number of KV heads")
    lengths = torch.tensor([c.numel() for c in flat], dtype=torch.int64)
    s_max = int(lengths.max()) if flat else 0
    if s_max == 0:
        return torch.zeros(b, hkv, 0, dtype=torch.int64), torch.zeros(b, hkv, 0, dtype=torch.bool)
    idx = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=0).reshape(b, hkv, s_max)
    valid = (torch.arange(s_max)[None, :] < lengths[:, None]).reshape(b, hkv, s_max)
    return idx, valid
