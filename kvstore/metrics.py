"""Prometheus metrics of one kvstore server, in its own registry (several servers can share a process).

Counters and tier sizes are read from the store at scrape time (one source of truth shared with the Stats
RPC); request latencies and status codes are recorded by the service as calls finish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvrecall.kvstore.store import TieredStore

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _StoreCollector(Collector):
    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self):
        s = self.store
        hits = CounterMetricFamily("kvstore_hits", "Reads served, by the tier that had the object", labels=["tier"])
        evictions = CounterMetricFamily("kvstore_evictions", "Objects evicted to stay under budget", labels=["tier"])
        corrupt = CounterMetricFamily("kvstore_corrupt_objects", "Objects dropped for failing a checksum",
                                      labels=["tier"])
        errors = CounterMetricFamily("kvstore_tier_errors", "Failed calls to a tier (e.g. Redis down)",
                                     labels=["tier"])
        size = GaugeMetricFamily("kvstore_tier_bytes", "Bytes held by a tier", labels=["tier"])
        objects = GaugeMetricFamily("kvstore_tier_objects", "Objects held by a tier", labels=["tier"])
        budget = GaugeMetricFamily("kvstore_tier_budget_bytes", "Byte budget of a tier", labels=["tier"])
        up = GaugeMetricFamily("kvstore_tier_up", "1 if the tier answers, 0 if it is down", labels=["tier"])
        for tier in s.tiers():
            hits.add_metric([tier.name], tier.hits)
            evictions.add_metric([tier.name], tier.evictions)
            corrupt.add_metric([tier.name], getattr(tier, "corrupt", 0))
            errors.add_metric([tier.name], getattr(tier, "errors", 0))
            up.add_metric([tier.name], 1.0 if getattr(tier, "available", True) else 0.0)
            if hasattr(tier, "used_bytes"):
                size.add_metric([tier.name], tier.used_bytes)
                objects.add_metric([tier.name], len(tier))
                budget.add_metric([tier.name], tier.budget_bytes)
        yield hits
        yield evictions
        yield corrupt
        yield errors
        yield size
        yield objects
        yield budget
        yield up
        yield CounterMetricFamily("kvstore_misses", "Reads of keys no tier had", value=s.misses)
        yield CounterMetricFamily("kvstore_bytes_in", "Object bytes received by Put", value=s.bytes_in)
        yield CounterMetricFamily("kvstore_bytes_out", "Object bytes sent by Get", value=s.bytes_out)


class Metrics:
    """Registry with the store collector, a per-method latency histogram and a per-code request counter."""

    def __init__(self, store: TieredStore) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StoreCollector(store))
        self.latency = Histogram("kvstore_request_seconds", "Request latency by method", ["method"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("kvstore_requests", "Finished requests by method and status code",
                                ["method", "code"], registry=self.registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.latency.labels(method).observe(seconds)
        self.requests.labels(method, code).inc()
