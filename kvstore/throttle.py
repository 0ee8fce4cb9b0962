"""A token-bucket bandwidth throttle around a kvstore client, for benchmarks and tests of slow links.

:class:`TokenBucket` hands out bytes at ``rate_Bps`` with a burst allowance; :class:`ThrottledClient` wraps any
:class:`~kvrecall.kvstore.client.KVStoreClient` (composition, the client is not changed) and charges every byte a
Get returns or a Put sends to one shared bucket, so concurrent Gets share the link as they would on a real one::

    slow = ThrottledClient(KVStoreClient(target), rate_Bps=1.25e8)   # a 1 Gbit/s link
    slow.get_many(keys)                                               # takes >= total_bytes / 1.25e8 seconds

Exists, Delete and Stats carry a few bytes and pass through untouched.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ThrottleError", "TokenBucket", "ThrottledClient", "gbit_to_Bps"]


class ThrottleError(ValueError):
    """Invalid throttle settings or byte counts."""


def gbit_to_Bps(gbit_per_s: float) -> float:
    """Bytes per second of a link of ``gbit_per_s`` Gbit/s (1 Gbit = 1e9 bits)."""
    if not (gbit_per_s > 0 and math.isfinite(gbit_per_s)):
        raise ThrottleError(f"link speed must be a positive number of Gbit/s, got {gbit_per_s!r}")
    return gbit_per_s * 1e9 / 8


class TokenBucket:
    """Thread-safe token bucket: ``acquire(n)`` returns once ``n`` bytes fit the rate.

    Parameters
    ----------
    rate_Bps : float
        Sustained rate in bytes per second (> 0).
    burst_bytes : int, optional
        Bucket capacity: bytes that may pass at once after an idle period (default: 10 ms at ``rate_Bps``,
        at least 64 KiB). A request larger than the bucket waits for its whole size at the rate (the bucket
        goes into debt), so a long transfer always averages ``rate_Bps``.
    clock, sleep : callables, optional
        Time source and sleep function (tests may pass fakes).
    """

    def __init__(self, rate_Bps: float, burst_bytes: int | None = None, clock=time.monotonic, sleep=time.sleep):
        if not (rate_Bps > 0 and math.isfinite(rate_Bps)):
            raise ThrottleError(f"rate_Bps must be a positive finite number, got {rate_Bps!r}")
        if burst_bytes is None:
            burst_bytes = max(int(rate_Bps * 0.01), 64 << 10)
        if burst_bytes < 1:
            raise ThrottleError(f"burst_bytes must be >= 1, got {burst_bytes!r}")
        self.rate_Bps = float(rate_Bps)
        self.burst_bytes = int(burst_bytes)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst_bytes)
        self._stamp = clock()

    def acquire(self, n_bytes: int) -> float:
        """Take ``n_bytes`` from the bucket, sleeping until the rate allows them; returns the seconds slept."""
        if n_bytes < 0:
            raise ThrottleError(f"n_bytes must be >= 0, got {n_bytes}")
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst_bytes, self._tokens + (now - self._stamp) * self.rate_Bps)
            self._stamp = now
            self._tokens -= n_bytes  # reserve now (possibly into debt) so concurrent callers queue behind us
            wait = -self._tokens / self.rate_Bps if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class ThrottledClient:
    """A kvstore client whose Gets and Puts pass through a :class:`TokenBucket` (bytes per second).

    Parameters
    ----------
    client : KVStoreClient
        The client to wrap; it keeps working on its own.
    rate_Bps : float
        Link rate in bytes per second (see :func:`gbit_to_Bps`).
    burst_bytes : int, optional
        Bucket capacity (see :class:`TokenBucket`).
    max_parallel : int, optional
        Threads of :meth:`get_many` (default: the wrapped client's ``options.max_parallel`` or 8).

    Notes
    -----
    The bytes are charged after the object arrives from the wrapped client, so the caller sees each object
    complete no earlier than the link would deliver it; any unknown attribute is forwarded to ``client``.
    """

    def __init__(self, client, rate_Bps: float, burst_bytes: int | None = None, max_parallel: int | None = None):
        self.client = client
        self.bucket = TokenBucket(rate_Bps, burst_bytes)
        opts = getattr(client, "options", None)
        self.max_parallel = max_parallel or getattr(opts, "max_parallel", None) or 8
        self._pool: ThreadPoolExecutor | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self._count_lock = threading.Lock()

    @property
    def rate_Bps(self) -> float:
        return self.bucket.rate_Bps

    def _charge(self, n: int, incoming: bool) -> None:
        with self._count_lock:
            if incoming:
                self.bytes_in += n
            else:
                self.bytes_out += n
        self.bucket.acquire(n)

    def get(self, key: bytes):
        """:meth:`KVStoreClient.get`, delivered at the throttled rate."""
        data = self.client.get(key)
        if data is not None:
            self._charge(len(data), True)
        return data

    def get_into(self, key: bytes, out: memoryview) -> bool:
        """:meth:`KVStoreClient.get_into`, delivered at the throttled rate."""
        found = self.client.get_into(key, out)
        if found:
            self._charge(len(out), True)
        return found

    def get_many(self, keys: Sequence[bytes]) -> list:
        """Parallel Gets sharing the link: the whole batch takes at least ``sum(bytes) / rate_Bps``."""
        keys = list(keys)
        if not keys:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_parallel, thread_name_prefix="kvstore-throttled-get")
        return list(self._pool.map(self.get, keys))

    def put(self, key: bytes, data, **kwargs) -> list[str]:
        """:meth:`KVStoreClient.put`, sent at the throttled rate."""
        self._charge(memoryview(data).nbytes, False)
        return self.client.put(key, data, **kwargs)

    def close(self) -> None:
        """Stop the Get threads (the wrapped client is left open: its owner closes it)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "ThrottledClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self.client, name)
