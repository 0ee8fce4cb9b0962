"""A²ATS-style retrieval: query-aware vector-quantized key codes and top-k token selection.

Public names::

    RetrieverProfile, RetrieverSettings   # calibrated transforms + codebooks (safetensors + JSON)
    calibrate                             # fit a profile on calibration tokens
    KeyIndex                              # per-sequence codes, append, score, select (torch or faiss)
    select, select_from_scores, Selection # top-k per query head + GQA union + sinks + window
    lut_scores                            # LUT scoring of codes (the kernels' reference)
    sparse_attention, sparse_decode_logits
    RetrieverError
"""

from kvrecall.retriever.attention import sparse_attention, sparse_decode_logits
from kvrecall.retriever.calibration import calibrate
from kvrecall.retriever.errors import RetrieverError
from kvrecall.retriever.index import KeyIndex
from kvrecall.retriever.profile import RetrieverProfile, RetrieverSettings
from kvrecall.retriever.scoring import exact_scores, lut_scores
from kvrecall.retriever.selection import Selection, resolve_budget, select_from_scores

__all__ = [
    "RetrieverError",
    "RetrieverProfile",
    "RetrieverSettings",
    "KeyIndex",
    "Selection",
    "select",
    "select_from_scores",
    "resolve_budget",
    "lut_scores",
    "exact_scores",
    "calibrate",
    "sparse_attention",
    "sparse_decode_logits",
]


def select(
    index: KeyIndex,
    layer: int,
    queries,
    budget: int | float,
    sinks: int = 8,
    window: int = 64,
    positions=None,
    backend: str = "torch",
) -> Selection:
    """Tokens to fetch for one decode step: ``index.select`` (see :meth:`KeyIndex.select`)."""
    return index.select(layer, queries, budget, sinks, window, positions=positions, backend=backend)
