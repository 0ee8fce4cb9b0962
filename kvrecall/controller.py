"""Pick how to bring a context's KV to the GPU: load it at some compression level, or recompute it.

CacheGen's observation: the best choice depends on the bandwidth between the store and the GPU. On a fast link the
finest level costs little time; on a slow one a coarser level (fewer bytes) wins; on a very slow one recomputing
the prefill beats any transfer. Loading is pipelined chunk by chunk (chunk *i* decodes while chunk *i+1* is on the
wire), so a level's time for ``n`` tokens split into ``c`` chunks is modelled as::

    t = max(t_wire, t_decode) + min(t_wire, t_decode) / c        # pipeline plus one chunk of fill
    t_wire = n * bytes_per_token / bandwidth,   t_decode = n / decode_tokens_per_s

and recompute costs ``n / prefill_tokens_per_s``. Bandwidth comes from a :class:`BandwidthEstimator` fed with the
observed transfers, and :meth:`Controller.plan_chunks` re-decides per chunk as the estimate moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["ControllerError", "LoadOption", "Decision", "Controller", "BandwidthEstimator", "RECOMPUTE"]

RECOMPUTE = "recompute"


class ControllerError(ValueError):
    """Invalid controller configuration or request."""


@dataclass(frozen=True)
class LoadOption:
    """One way to load a context's KV.

    Parameters
    ----------
    name : str
        Codec level name (e.g. ``"medium"``).
    bytes_per_token : float
        Encoded bytes per context token, all layers and heads, headers included (> 0).
    decode_tokens_per_s : float
        Decode throughput in context tokens per second on the loading device (> 0; ``math.inf`` if free).
    quality_loss : float
        A measured quality cost, e.g. mean next-token KL versus exact KV (>= 0; lower is better).
    """

    name: str
    bytes_per_token: float
    decode_tokens_per_s: float
    quality_loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or self.name == RECOMPUTE:
            raise ControllerError(f"invalid option name {self.name!r}")
        if not (self.bytes_per_token > 0 and math.isfinite(self.bytes_per_token)):
            raise ControllerError(f"{self.name}: bytes_per_token must be a positive number")
        if not self.decode_tokens_per_s > 0:
            raise ControllerError(f"{self.name}: decode_tokens_per_s must be > 0")
        if not (self.quality_loss >= 0 and math.isfinite(self.quality_loss)):
            raise ControllerError(f"{self.name}: quality_loss must be a finite number >= 0")


@dataclass(frozen=True)
class Decision:
    """The controller's choice and the estimated seconds of every candidate it considered."""

    choice: str
    estimated_s: float
    estimates: dict[str, float] = field(default_factory=dict)
    meets_slo: bool = True


class Controller:
    """Choose a compression level or recompute from bandwidth, an optional time budget and a quality bound.

    Parameters
    ----------
    options : list of LoadOption
        The levels available in the store for this context.
    prefill_tokens_per_s : float
        Recompute throughput of the serving model (tokens/s of prefill); ``0`` disables recompute.
    max_quality_loss : float, optional
        Options whose ``quality_loss`` exceeds this are never chosen.
    chunk_tokens : int
        Tokens per stored chunk (pipeline granularity).

    Rules
    -----
    With an SLO: the lowest-loss candidate whose estimate meets it (recompute counts as loss 0); if none meets it,
    the fastest candidate (``meets_slo=False``). Without an SLO: the fastest candidate.
    """

    def __init__(
        self,
        options: list[LoadOption],
        prefill_tokens_per_s: float,
        max_quality_loss: float | None = None,
        chunk_tokens: int = 256,
    ) -> None:
        if not options and prefill_tokens_per_s <= 0:
            raise ControllerError("need at least one load option or a recompute throughput")
        names = [o.name for o in options]
        if len(set(names)) != len(names):
            raise ControllerError(f"duplicate option names: {names}")
        if prefill_tokens_per_s < 0 or not math.isfinite(prefill_tokens_per_s):
            raise ControllerError("prefill_tokens_per_s must be a finite number >= 0")
        if chunk_tokens < 1:
            raise ControllerError("chunk_tokens must be >= 1")
        allowed = [o for o in options if max_quality_loss is None or o.quality_loss <= max_quality_loss]
        if not allowed and prefill_tokens_per_s <= 0:
            raise ControllerError("max_quality_loss excludes every option and recompute is disabled")
        self.options = allowed
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.chunk_tokens = chunk_tokens

    def estimate_s(self, option: LoadOption | str, n_tokens: int, bandwidth_Bps: float) -> float:
        """Estimated seconds to bring ``n_tokens`` of KV to the device with ``option`` (or ``"recompute"``)."""
        if n_tokens < 0:
            raise ControllerError("n_tokens must be >= 0")
        if option == RECOMPUTE:
            return n_tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s > 0 else math.inf
        if not bandwidth_Bps > 0:
            return math.inf
        wire = n_tokens * option.bytes_per_token / bandwidth_Bps
        decode = n_tokens / option.decode_tokens_per_s
        chunks = max(1, math.ceil(n_tokens / self.chunk_tokens))
        return max(wire, decode) + min(wire, decode) / chunks

    def choose(self, n_tokens: int, bandwidth_Bps: float, slo_s: float | None = None) -> Decision:
        """Pick an option for ``n_tokens`` at ``bandwidth_Bps`` (bytes/s), optionally within ``slo_s`` seconds."""
        if bandwidth_Bps < 0 or math.isnan(bandwidth_Bps):
            raise ControllerError("bandwidth_Bps must be >= 0")
        candidates: list[tuple[str, float, float]] = [
            (o.name, self.estimate_s(o, n_tokens, bandwidth_Bps), o.quality_loss) for o in self.options
        ]
        if self.prefill_tokens_per_s > 0:
            candidates.append((RECOMPUTE, self.estimate_s(RECOMPUTE, n_tokens, bandwidth_Bps), 0.0))
        estimates = {name: t for name, t, _ in candidates}
        fastest = min(candidates, key=lambda c: (c[1], c[2]))
        if slo_s is None:
            return Decision(fastest[0], fastest[1], estimates, True)
        meeting = [c for c in candidates if c[1] <= slo_s]
        if not meeting:
            return Decision(fastest[0], fastest[1], estimates, False)
        best = min(meeting, key=lambda c: (c[2], c[1]))
        return Decision(best[0], best[1], estimates, True)

    def plan_chunks(
        self, n_chunks: int, estimator: "BandwidthEstimator", slo_s: float, elapsed_s: float = 0.0
    ) -> Decision:
        """Re-decide for the remaining ``n_chunks`` chunks with the time left in the budget.

        Call before each chunk is requested; CacheGen adapts per chunk in the same way.
        """
        if n_chunks < 0:
            raise ControllerError("n_chunks must be >= 0")
        remaining = max(slo_s - elapsed_s, 0.0)
        return self.choose(n_chunks * self.chunk_tokens, estimator.bandwidth_Bps, remaining)


class BandwidthEstimator:
    """Exponentially weighted estimate of link bandwidth from observed transfers.

    Parameters
    ----------
    initial_Bps : float
        Estimate before any observation.
    alpha : float
        Weight of the newest observation, in (0, 1].
    """

    def __init__(self, initial_Bps: float, alpha: float = 0.5) -> None:
        if not initial_Bps > 0:
            raise ControllerError("initial_Bps must be > 0")
        if not 0 < alpha <= 1:
            raise ControllerError("alpha must be in (0, 1]")
        self.bandwidth_Bps = float(initial_Bps)
        self.alpha = alpha

    def observe(self, n_bytes: int, seconds: float) -> float:
        """Fold in one transfer of ``n_bytes`` that took ``seconds``; returns the new estimate."""
        if n_bytes < 0 or not seconds > 0:
            raise ControllerError("observe needs n_bytes >= 0 and seconds > 0")
        sample = n_bytes / seconds
        self.bandwidth_Bps = self.alpha * sample + (1 - self.alpha) * self.bandwidth_Bps
        return self.bandwidth_Bps
