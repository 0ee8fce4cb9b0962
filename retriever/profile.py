"""Retriever profile: per-model transforms and codebooks, saved as one safetensors file with JSON settings.

File layout (no pickle): tensors ``key_transform [L, Hkv, D, D]``, ``query_transform [L, Hkv, D, D]``,
``codebooks [L, Hkv, M, K, D/M]``, ``inv_freq [D/2]`` (all float32), and the JSON settings stored in the
safetensors metadata under the key ``kvrecall_retriever``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvrecall.retriever.codebooks import check_codebook_settings
from kvrecall.retriever.errors import RetrieverError

__all__ = ["RetrieverSettings", "RetrieverProfile", "FORMAT", "VERSION"]

FORMAT = "kvrecall-retriever"
VERSION = 1
_META_KEY = "kvrecall_retriever"
_ROPE_MODES = ("windowed", "absolute", "positional")
_KINDS = ("vq", "pq")


@dataclass(frozen=True)
class RetrieverSettings:
    """Settings of a profile (the JSON half of the file).

    Attributes
    ----------
    model_id : str
        :func:`kvrecall.models.model_fingerprint` of the model calibrated on.
    kind : str
        ``"vq"`` (one codebook over the head dim, ``m == 1``) or ``"pq"`` (``m`` sub-vectors).
    m, bits : int
        Sub-vectors and bits per sub-vector; ``bits_per_key = m * bits``.
    rope_mode : str
        ``"windowed"`` (A²ATS: pre-RoPE keys, query rotated by the fixed distance ``window_distance``, LUT
        scoring), ``"absolute"`` (post-RoPE keys and queries at their true positions; the plain baseline) or
        ``"positional"`` (pre-RoPE keys; decoded keys are rotated at their true positions when scored, and H is
        averaged over queries rotated by distances drawn uniformly from ``0 .. window_distance``).
    query_aware : bool
        Whether the Cholesky transform of the query second moment is used (else identity).
    """

    model_id: str
    model_name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kind: str = "vq"
    m: int = 1
    bits: int = 12
    rope_mode: str = "windowed"
    window_distance: int = 2048
    query_aware: bool = True
    rope_scaling: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def bits_per_key(self) -> int:
        return self.m * self.bits

    def validate(self) -> None:
        """Raise :class:`RetrieverError` on any inconsistent or out-of-range field."""
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "m", "bits", "window_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "window_distance" else 1):
                raise RetrieverError(f"profile setting {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise RetrieverError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise RetrieverError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.kind not in _KINDS:
            raise RetrieverError(f"codebook kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "vq" and self.m != 1:
            raise RetrieverError(f"a single-codebook (vq) profile has m == 1, got m={self.m}")
        check_codebook_settings(self.head_dim, self.m, self.bits)
        if self.rope_mode not in _ROPE_MODES:
            raise RetrieverError(f"rope_mode must be one of {_ROPE_MODES}, got {self.rope_mode!r}")
        if not isinstance(self.query_aware, bool):
            raise RetrieverError(f"query_aware must be a bool, got {self.query_aware!r}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise RetrieverError("profile has no model_id")
        if not isinstance(self.rope_scaling, (int, float)) or not math.isfinite(self.rope_scaling) or self.rope_scaling <= 0:
            raise RetrieverError(f"rope_scaling must be a positive number, got {self.rope_scaling!r}")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every tensor in the file."""
        L, H, D, M = self.num_layers, self.num_kv_heads, self.head_dim, self.m
        return {
            "key_transform": (L, H, D, D),
            "query_transform": (L, H, D, D),
            "codebooks": (L, H, M, 1 << self.bits, D // M),
            "inv_freq": (D // 2,),
        }


@dataclass
class RetrieverProfile:
    """A calibrated retriever for one model: settings plus tensors (see the module docstring for shapes)."""

    settings: RetrieverSettings
    key_transform: torch.Tensor
    query_transform: torch.Tensor
    codebooks: torch.Tensor
    inv_freq: torch.Tensor

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check settings, tensor shapes, dtypes and finiteness; raise :class:`RetrieverError` if any is off."""
        self.settings.validate()
        for name, shape in self.settings.tensor_shapes().items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise RetrieverError(f"profile tensor {name} is missing")
            if tuple(t.shape) != shape:
                raise RetrieverError(f"profile tensor {name} has shape {tuple(t.shape)}, settings imply {shape}")
            if t.dtype != torch.float32:
                raise RetrieverError(f"profile tensor {name} has dtype {t.dtype}, expected torch.float32")
            if not torch.isfinite(t).all():
                raise RetrieverError(f"profile tensor {name} contains NaN or Inf")

    @property
    def bits_per_key(self) -> int:
        return self.settings.bits_per_key

    def check_model(self, model=None, model_path: str | Path | None = None) -> None:
        """Raise :class:`RetrieverError` if ``model`` (shapes) or ``model_path`` (fingerprint) does not match."""
        if model is not None:
            from kvrecall.models import model_info

            info = model_info(model)
            s = self.settings
            got = (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim)
            want = (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim)
            if got != want:
                raise RetrieverError(
                    f"profile is for (layers, heads, kv_heads, head_dim) = {want}, the model has {got}"
                )
        if model_path is not None:
            from kvrecall.models import model_fingerprint

            fp = model_fingerprint(model_path)
            if fp != self.settings.model_id:
                raise RetrieverError(
                    f"profile was calibrated for model {self.settings.model_id} ({self.settings.model_name}), "
                    f"but {model_path} has fingerprint {fp}"
                )

    def save(self, path: str | Path) -> None:
        """Write the profile as a safetensors file with the settings as JSON metadata."""
        from safetensors.torch import save_file

        self.validate()
        meta = {"format": FORMAT, "version": VERSION, "settings": asdict(self.settings)}
        tensors = {name: getattr(self, name).contiguous() for name in self.settings.tensor_shapes()}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, model=None, model_path: str | Path | None = None) -> "RetrieverProfile":
        """Read and validate a profile; optionally check it against a model and/or its folder's fingerprint.

        Raises
        ------
        RetrieverError
            Missing or corrupted file, wrong format/version, bad settings, tensor shape/dtype mismatch, or a
            model that does not match.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RetrieverError(f"retriever profile not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except RetrieverError:
            raise
        except Exception as exc:  # safetensors raises several types for bad headers and truncation
            raise RetrieverError(f"{path} is not a readable safetensors retriever profile: {exc}") from exc
        if _META_KEY not in metadata:
            raise RetrieverError(f"{path} has no {_META_KEY!r} metadata: not a kvrecall retriever profile")
        try:
            meta = json.loads(metadata[_META_KEY])
        except json.JSONDecodeError as exc:
            raise RetrieverError(f"{path}: settings JSON is corrupted: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise RetrieverError(f"{path}: format is {meta.get('format') if isinstance(meta, dict) else meta!r}, expected {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise RetrieverError(f"{path}: profile version {meta.get('version')!r} is not supported (expected {VERSION})")
        raw = meta.get("settings")
        if not isinstance(raw, dict):
            raise RetrieverError(f"{path}: settings missing")
        known = set(RetrieverSettings.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise RetrieverError(f"{path}: unknown settings {sorted(unknown)}")
        try:
            settings = RetrieverSettings(**raw)
        except TypeError as exc:
            raise RetrieverError(f"{path}: incomplete settings: {exc}") from exc
        settings.validate()
        expected = settings.tensor_shapes()
        missing = set(expected) - set(tensors)
        extra = set(tensors) - set(expected)
        if missing or extra:
            raise RetrieverError(f"{path}: tensors missing {sorted(missing)} / unexpected {sorted(extra)}")
        profile = cls(settings=settings, **{name: tensors[name] for name in expected})
        profile.check_model(model, model_path)
        return profile
