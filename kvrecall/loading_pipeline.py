"""Pipelined loading of a context's stored chunks: Gets in flight while earlier chunks decode, each chunk decoded
straight into its slot of the destination, and (with ``level="auto"``) a per-chunk choice of level or recompute.

The loop keeps up to ``fetch_workers`` Gets in flight. Just before chunk *i* is requested, ``decide(i)`` names the
level to fetch it at, or ``"recompute"`` to stop loading there (the caller prefills the rest). A chunk that arrives
goes to one of ``decode_workers`` threads (the native rANS coder and the torch/numpy arithmetic release the GIL),
which decodes it and hands the tensor to ``place(i, kv_chunk)``; places write disjoint slices of a preallocated
destination, so nothing is concatenated afterwards.

Every completed Get updates the meter's bandwidth estimate (bytes arrived since the first request over the wall
time), so the choice for later chunks follows the link as measured during this very load.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from kvrecall.controller import RECOMPUTE
from kvrecall.loading_meter import ThroughputMeter

__all__ = ["ChunkChoice", "LoadReport", "run_pipeline", "LOG"]

LOG = logging.getLogger("kvrecall.loading")


@dataclass(frozen=True)
class ChunkChoice:
    """What was decided for one chunk, just before it was requested.

    Attributes
    ----------
    index : int
        Chunk index in the context.
    choice : str
        Level fetched, or ``"recompute"`` (this chunk and all after it are prefilled instead).
    estimated_s : float
        The controller's estimate for the remaining tokens with this choice (NaN for a fixed level).
    bandwidth_Bps : float
        Bandwidth estimate at that moment.
    estimates : dict
        Every candidate's estimate (``{}`` for a fixed level).
    """

    index: int
    choice: str
    estimated_s: float
    bandwidth_Bps: float
    estimates: dict = field(default_factory=dict)


@dataclass
class LoadReport:
    """How a load went: what the cache holds, per-chunk choices, bytes, times, expected vs actual delay.

    Attributes
    ----------
    tokens : int
        Tokens of KV in the result (the one-token rule and recompute decisions applied).
    stored_tokens : int
        Leading tokens of the request the store holds (at any level).
    choices : list of ChunkChoice
    bytes_read : int
    timings : dict
        ``exists_s``, ``fetch_s`` (first request to last arrival), ``decode_s`` (summed decode-thread time),
        ``load_s`` (Exists to the last chunk in place), and ``prefill_s`` when the caller prefilled the rest.
    expected_s : float
        The controller's estimate, at the first chunk, of the load time (NaN for a fixed level).
    error : str
        Why nothing was loaded when the store failed (empty otherwise).
    """

    tokens: int = 0
    stored_tokens: int = 0
    choices: list[ChunkChoice] = field(default_factory=list)
    bytes_read: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    expected_s: float = float("nan")
    error: str = ""

    @property
    def actual_s(self) -> float:
        """Measured load time (Exists to the last chunk in place)."""
        return self.timings.get("exists_s", 0.0) + self.timings.get("load_s", 0.0)

    @property
    def levels(self) -> dict[str, int]:
        """Chunks loaded per level."""
        out: dict[str, int] = {}
        for c in self.choices:
            if c.choice != RECOMPUTE:
                out[c.choice] = out.get(c.choice, 0) + 1
        return out


def run_pipeline(
    n_chunks: int,
    decide: Callable[[int], ChunkChoice],
    fetch: Callable[[int, str], object],
    decode: Callable[[int, str, object], torch.Tensor],
    place: Callable[[int, torch.Tensor], None],
    fp16_bytes: Callable[[int], int],
    meter: ThroughputMeter,
    fetch_workers: int,
    decode_workers: int,
) -> tuple[int, list[ChunkChoice], int, dict[str, float]]:
    """Fetch, decode and place chunks ``0 .. n_chunks - 1`` until a recompute decision or a missing chunk.

    Parameters
    ----------
    n_chunks : int
        Chunks wanted.
    decide : callable(i) -> ChunkChoice
        Called just before chunk ``i`` is requested.
    fetch : callable(i, level) -> bytes-like or None
        Blocking Get of chunk ``i`` at ``level`` (None when the store no longer holds it).
    decode : callable(i, level, data) -> Tensor[layers, 2, kv_heads, tokens, head_dim]
    place : callable(i, kv_chunk) -> None
        Writes the decoded chunk into its slice of the destination (called from decode threads).
    fp16_bytes : callable(i) -> int
        fp16-equivalent size of chunk ``i`` (for the decode-throughput meter).

    Returns
    -------
    (chunks_loaded, choices, bytes_read, timings)
        ``chunks_loaded`` leading chunks are in place.
    """
    choices: list[ChunkChoice] = []
    limit = n_chunks  # chunks [0, limit) can still end up loaded
    bytes_read = 0
    decode_time = [0.0]
    lock = threading.Lock()
    t_first = None
    t_last = None

    def decode_and_place(i: int, level: str, data) -> None:
        t = time.perf_counter()
        kv = decode(i, level, data)
        place(i, kv)
        dt = time.perf_counter() - t
        with lock:
            decode_time[0] += dt
        meter.observe_decode(level, fp16_bytes(i), dt)

    with ThreadPoolExecutor(fetch_workers, thread_name_prefix="kvrecall-fetch") as fetch_pool, ThreadPoolExecutor(
        decode_workers, thread_name_prefix="kvrecall-decode"
    ) as decode_pool:
        in_flight: dict = {}
        decoding: dict = {}
        issued = 0
        try:
            while True:
                while issued < limit and len(in_flight) < fetch_workers:
                    c = decide(issued)
                    choices.append(c)
                    if c.choice == RECOMPUTE:
                        limit = issued
                        break
                    if t_first is None:
                        t_first = time.perf_counter()
                    in_flight[fetch_pool.submit(fetch, issued, c.choice)] = (issued, c.choice)
                    issued += 1
                if not in_flight:
                    break
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for fut in done:
                    i, level = in_flight.pop(fut)
                    data = fut.result()
                    t_last = time.perf_counter()
                    if data is None:  # evicted between Exists and Get: keep the prefix before it
                        LOG.warning("chunk %d vanished between Exists and Get; loading %d chunks", i, min(limit, i))
                        limit = min(limit, i)
                        continue
                    if i >= limit:
                        continue
                    bytes_read += len(data)
                    meter.observe_transfer(bytes_read, t_last - t_first)
                    decoding[decode_pool.submit(decode_and_place, i, level, data)] = i
            for fut, i in decoding.items():
                if i >= limit:
                    fut.cancel()
                    continue
                try:
                    fut.result()
                except Exception as exc:  # noqa: BLE001 - a damaged chunk ends the usable prefix, loudly
                    warnings.warn(f"kvrecall: chunk {i} failed to decode ({type(exc).__name__}: {exc}); "
                                  f"loading the {i} chunks before it", RuntimeWarning, 3)
                    limit = min(limit, i)
        finally:
            for fut in in_flight:
                fut.cancel()
    timings = {
        "fetch_s": (t_last - t_first) if t_first is not None and t_last is not None else 0.0,
        "decode_s": decode_time[0],
    }
    return limit, choices, bytes_read, timings
