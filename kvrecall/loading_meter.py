"""Measured throughputs the loading controller decides from: link bandwidth, prefill speed, decode speed per level.

One :class:`ThroughputMeter` lives with a :class:`~kvrecall.context_cache.ContextCache` (or is shared between
several, e.g. by a server that opens a cache per request): every Get, every chunk decode and every prefill the
cache performs is folded in, so later loads decide from what this machine and link actually did. Before the first
measurement the priors in :mod:`kvrecall.defaults` stand in.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from kvrecall import defaults
from kvrecall.controller import BandwidthEstimator, ControllerError

__all__ = ["Rate", "ThroughputMeter"]


@dataclass
class Rate:
    """An exponentially weighted rate (units per second); ``value`` is the prior until the first observation."""

    value: float
    alpha: float = 0.5
    samples: int = 0

    def observe(self, units: float, seconds: float) -> float:
        """Fold in ``units`` done in ``seconds``; returns the new estimate."""
        if units < 0 or not seconds > 0 or not math.isfinite(units):
            raise ControllerError(f"observe needs units >= 0 and seconds > 0, got {units}, {seconds}")
        sample = units / seconds
        self.value = sample if self.samples == 0 else self.alpha * sample + (1 - self.alpha) * self.value
        self.samples += 1
        return self.value


class ThroughputMeter:
    """Bandwidth (bytes/s), prefill (tokens/s) and per-level decode (fp16-equivalent bytes/s per thread) estimates.

    Parameters
    ----------
    bandwidth_Bps, prefill_tokens_per_s, decode_Bps : float, optional
        Priors (default: :data:`kvrecall.defaults.LOAD_PRIOR_BANDWIDTH_BPS` and friends).
    alpha : float
        Weight of the newest observation.

    Notes
    -----
    Thread-safe: decode threads report while the fetch loop reads.
    """

    def __init__(
        self,
        bandwidth_Bps: float = defaults.LOAD_PRIOR_BANDWIDTH_BPS,
        prefill_tokens_per_s: float = defaults.LOAD_PRIOR_PREFILL_TOKENS_PER_S,
        decode_Bps: float = defaults.LOAD_PRIOR_DECODE_BPS,
        alpha: float = 0.5,
    ) -> None:
        self.bandwidth = BandwidthEstimator(bandwidth_Bps, alpha)
        self.prefill = Rate(prefill_tokens_per_s, alpha)
        self._decode_prior = decode_Bps
        self._decode: dict[str, Rate] = {}
        self._alpha = alpha
        self._lock = threading.Lock()

    @property
    def bandwidth_Bps(self) -> float:
        return self.bandwidth.bandwidth_Bps

    def observe_transfer(self, n_bytes: int, seconds: float) -> None:
        """One stretch of fetching: ``n_bytes`` arrived over ``seconds`` of wall time."""
        if n_bytes > 0 and seconds > 0:
            with self._lock:
                self.bandwidth.observe(n_bytes, seconds)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill of ``tokens`` took ``seconds``."""
        if tokens > 0 and seconds > 0:
            with self._lock:
                self.prefill.observe(tokens, seconds)

    def observe_decode(self, level: str, fp16_bytes: int, seconds: float) -> None:
        """One thread decoded ``fp16_bytes`` (fp16-equivalent size of the chunk) at ``level`` in ``seconds``."""
        if fp16_bytes > 0 and seconds > 0:
            with self._lock:
                self._decode.setdefault(level, Rate(self._decode_prior, self._alpha)).observe(fp16_bytes, seconds)

    def decode_Bps(self, level: str, prior: float | None = None) -> float:
        """Per-thread decode throughput of ``level`` (fp16-equivalent bytes/s).

        Before ``level`` was measured: ``prior``, or the meter's codec prior when None.
        """
        with self._lock:
            rate = self._decode.get(level)
            if rate is not None:
                return rate.value
            return self._decode_prior if prior is None else prior

    def snapshot(self) -> dict[str, float]:
        """Current estimates, for logs and reports."""
        with self._lock:
            out = {"bandwidth_Bps": self.bandwidth.bandwidth_Bps, "prefill_tokens_per_s": self.prefill.value}
            out.update({f"decode_Bps[{k}]": r.value for k, r in self._decode.items()})
        return out
