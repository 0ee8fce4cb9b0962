"""Codec profile: a model's quantizer settings and probability tables, calibrated once, referenced by id.

Stored as one safetensors file (tensors + a JSON metadata string; no pickle). :meth:`CodecProfile.load`
validates everything (shapes, table rules, the id) before returning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvrecall.encoder.errors import CodecError
from kvrecall.encoder.quantize import LEVELS, level_index
from kvrecall.encoder.rans import MAX_SCALE_BITS, MIN_SCALE_BITS
from kvrecall.encoder.tables import TableSet

__all__ = ["CodecProfile", "PROFILE_FORMAT", "PROFILE_VERSION"]

PROFILE_FORMAT = "kvrecall-codec-profile"
PROFILE_VERSION = 1


@dataclass
class CodecProfile:
    """Quantizer settings and rANS tables of one model.

    Attributes
    ----------
    model_id : str
        Identifies the model (e.g. :func:`kvrecall.models.model_fingerprint`).
    step : ndarray[n_levels, L, 2, H, D], float32
        Quantization step of each level and channel.
    offset : ndarray[L, 2, H, D], float32
        Per-channel offset (calibration mean).
    delta : ndarray[n_levels, L, 2], bool
        Whether each (layer, K/V) is delta coded along tokens at each level.
    tmap : ndarray[n_levels, L, 2, H, D], int64
        Table id (within the level) of each channel.
    table_lo : list of ndarray[n_tables], int64
        Per level: value of alphabet index 0 of each table.
    table_freqs : list of list of ndarray[A], uint32
        Per level: frequencies of each table (last entry = escape).
    scale_bits : int
    keys_pre_rope : bool
    info : dict
        Calibration facts (tokens seen, texts, settings); part of the id.
    """

    model_id: str
    step: np.ndarray
    offset: np.ndarray
    delta: np.ndarray
    tmap: np.ndarray
    table_lo: list
    table_freqs: list
    scale_bits: int = 12
    keys_pre_rope: bool = True
    info: dict = field(default_factory=dict)
    _id: str | None = field(default=None, repr=False)
    _tablesets: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ shape facts
    @property
    def num_layers(self) -> int:
        return int(self.offset.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.offset.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.offset.shape[3])

    # ------------------------------------------------------------------ identity
    def _tensors(self) -> dict[str, np.ndarray]:
        out = {
            "step": np.ascontiguousarray(self.step, dtype=np.float32),
            "offset": np.ascontiguousarray(self.offset, dtype=np.float32),
            "delta": np.ascontiguousarray(self.delta, dtype=np.uint8),
            "tmap": np.ascontiguousarray(self.tmap, dtype=np.int32),
        }
        for i, (lo, freqs) in enumerate(zip(self.table_lo, self.table_freqs)):
            out[f"table_lo.{i}"] = np.ascontiguousarray(lo, dtype=np.int32)
            out[f"table_size.{i}"] = np.array([len(f) for f in freqs], dtype=np.int32)
            out[f"table_freq.{i}"] = np.concatenate([np.asarray(f, dtype=np.int32) for f in freqs])
        return out

    def _meta(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "model_id": self.model_id,
            "levels": list(LEVELS),
            "scale_bits": self.scale_bits,
            "keys_pre_rope": self.keys_pre_rope,
            "info": self.info,
        }

    @property
    def profile_id(self) -> str:
        """Stable 16-hex-digit id: SHA-256 over the metadata JSON and every tensor's name, shape and bytes."""
        if self._id is None:
            h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
            for name, arr in sorted(self._tensors().items()):
                h.update(name.encode())
                h.update(str(arr.shape).encode())
                h.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
            self._id = h.hexdigest()[:16]
        return self._id

    # ------------------------------------------------------------------ tables
    def tableset(self, level: str | int) -> TableSet:
        """The :class:`TableSet` of ``level`` (cached)."""
        li = level_index(level)
        if li not in self._tablesets:
            ts = TableSet(
                np.asarray(self.table_lo[li], dtype=np.int64),
                [np.asarray(f, dtype=np.uint32) for f in self.table_freqs[li]],
                np.asarray(self.tmap[li], dtype=np.int64),
                self.scale_bits,
            )
            ts.rans  # build (and validate) once
            self._tablesets[li] = ts
        return self._tablesets[li]

    def check_shape(self, layers: int, heads: int, head_dim: int) -> None:
        """Raise :class:`CodecError` if a ``[layers, 2, heads, T, head_dim]`` tensor does not fit this profile."""
        if (layers, heads, head_dim) != (self.num_layers, self.num_kv_heads, self.head_dim):
            raise CodecError(
                f"KV shape (L={layers}, H={heads}, D={head_dim}) does not match profile {self.profile_id} "
                f"(L={self.num_layers}, H={self.num_kv_heads}, D={self.head_dim}) of model {self.model_id}"
            )

    # ------------------------------------------------------------------ calibration
    @classmethod
    def calibrate(cls, kv_samples: list, model_id: str, **kwargs) -> "CodecProfile":
        """Calibrate a profile from real KV; see :func:`kvrecall.encoder.calibrate.calibrate_profile`.

        Parameters
        ----------
        kv_samples : list of Tensor[L, 2, H, T_i, D]
            KV of real text (keys pre-RoPE), ideally several chunks of several texts.
        model_id : str
        query_samples : list of Tensor[L, Hq, T_i, D], optional
            The (pre-RoPE) queries of the same prefills (``kvrecall.models.capture_qkv(...).q``). Strongly
            recommended: key channels are then weighted by how much their errors move attention scores, which
            lowers KL at equal bits (see ``docs/codec.md``).
        **kwargs
            ``key_importance``, ``value_importance``, ``importance_power``, ``group_scales``, ``n_groups``,
            ``scale_bits``, ``keys_pre_rope``, ``chunk_tokens``, ``info``, ``progress``
            (:func:`kvrecall.encoder.calibrate.calibrate_profile`).
        """
        from kvrecall.encoder.calibrate import calibrate_profile, key_importance_from_queries

        queries = kwargs.pop("query_samples", None)
        if queries is not None:
            if not kv_samples:
                raise CodecError("calibration needs at least one KV sample")
            kwargs.setdefault("key_importance", key_importance_from_queries(queries, kv_samples[0].shape[2]))
        return calibrate_profile(kv_samples, model_id, **kwargs)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the profile as a safetensors file (tensors + JSON metadata). Returns the path."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self._meta()
        meta["profile_id"] = self.profile_id
        save_file(self._tensors(), str(path), metadata={"kvrecall": json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CodecProfile":
        """Read and validate a profile written by :meth:`save`.

        Raises
        ------
        CodecError
            If the file is missing, not a safetensors file, not a codec profile, of another version or levels,
            inconsistent, or its content does not match its recorded id.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise CodecError(f"codec profile not found: {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                raw_meta = (f.metadata() or {}).get("kvrecall")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CodecError(f"{path} is not a readable safetensors codec profile: {exc}") from None
        if raw_meta is None:
            raise CodecError(f"{path} is a safetensors file but not a kvrecall codec profile")
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError:
            raise CodecError(f"{path}: profile metadata is not valid JSON") from None
        if not isinstance(meta, dict) or meta.get("format") != PROFILE_FORMAT:
            raise CodecError(f"{path} is not a kvrecall codec profile")
        if meta.get("version") != PROFILE_VERSION:
            raise CodecError(f"{path}: profile version {meta.get('version')} unsupported (reads {PROFILE_VERSION})")
        if meta.get("levels") != list(LEVELS):
            raise CodecError(f"{path}: profile levels {meta.get('levels')} differ from this build's {list(LEVELS)}")
        try:
            profile = cls._from_parts(meta, tensors)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CodecError):
                raise CodecError(f"{path}: {exc}") from None
            raise CodecError(f"{path}: malformed codec profile ({exc!r})") from None
        if profile.profile_id != meta.get("profile_id"):
            raise CodecError(f"{path}: profile content does not match its id (file modified or corrupted)")
        return profile

    @classmethod
    def _from_parts(cls, meta: dict, t: dict) -> "CodecProfile":
        n_levels = len(LEVELS)
        sb = meta["scale_bits"]
        if not isinstance(sb, int) or not MIN_SCALE_BITS <= sb <= MAX_SCALE_BITS:
            raise CodecError(f"invalid scale_bits {sb!r}")
        offset = t["offset"]
        if offset.ndim != 4 or offset.shape[1] != 2:
            raise CodecError(f"offset has shape {offset.shape}, expected [L, 2, H, D]")
        layers, _, heads, head_dim = offset.shape
        step, delta, tmap = t["step"], t["delta"], t["tmap"]
        if step.shape != (n_levels, *offset.shape) or tmap.shape != step.shape:
            raise CodecError("step/tmap shapes do not match the offsets and levels")
        if delta.shape != (n_levels, layers, 2):
            raise CodecError("delta flags have the wrong shape")
        if not (np.all(np.isfinite(step)) and np.all(step > 0) and np.all(np.isfinite(offset))):
            raise CodecError("steps must be finite and positive, offsets finite")
        lo_list, freq_list = [], []
        for i in range(n_levels):
            lo, sizes, flat = t[f"table_lo.{i}"], t[f"table_size.{i}"], t[f"table_freq.{i}"]
            if lo.shape != sizes.shape or sizes.ndim != 1 or np.any(sizes < 2) or int(sizes.sum()) != flat.size:
                raise CodecError(f"level {LEVELS[i]}: table arrays are inconsistent")
            if tmap[i].min() < 0 or tmap[i].max() >= sizes.size:
                raise CodecError(f"level {LEVELS[i]}: table map refers to a missing table")
            freq_list.append([a.astype(np.uint32) for a in np.split(flat, np.cumsum(sizes)[:-1])])
            lo_list.append(lo.astype(np.int64))
        profile = cls(
            model_id=str(meta["model_id"]),
            step=step.astype(np.float32),
            offset=offset.astype(np.float32),
            delta=delta.astype(bool),
            tmap=tmap.astype(np.int64),
            table_lo=lo_list,
            table_freqs=freq_list,
            scale_bits=sb,
            keys_pre_rope=bool(meta["keys_pre_rope"]),
            info=dict(meta.get("info") or {}),
        )
        for i in range(n_levels):
            profile.tableset(i)  # validates every table's frequency rules
        return profile
