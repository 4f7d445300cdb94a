"""Prometheus metrics of one app, in its own `CollectorRegistry` (never the global one).

Counters and histograms are updated by the routes; the engine's gauges (queue, running
sequences, KV cache, tiers) and per-adapter figures are read from the engine at scrape
time, so they are never stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.protocol import EngineAPI

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ApiMetrics:
    def __init__(self, engine_source: Callable[[], EngineAPI | None]) -> None:
        """`engine_source()` is the engine now (None while the model loads), read at every scrape."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("loraplex_http_requests", "HTTP requests by route, method and status",
                                     ["route", "method", "status"], registry=r)
        self.errors = Counter("loraplex_http_errors", "HTTP responses with a 4xx or 5xx status, by status",
                              ["status"], registry=r)
        self.requests = Counter("loraplex_requests", "Generation requests accepted by the engine, by model "
                                "(adapter name or base model)", ["model"], registry=r)
        self.aborted = Counter("loraplex_requests_aborted", "Generation requests ended early "
                               "(client gone or error)", ["model"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed, by model",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated, by model",
                                         ["model"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time from request to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Mean time per generated token after "
                              "the first, per request", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_request_duration_seconds", "Time from request to last generated token",
                             buckets=E2E_BUCKETS, registry=r)
        self.adapter_admin = Counter("loraplex_adapter_admin_operations", "Adapter admin operations by "
                                     "operation and outcome", ["operation", "outcome"], registry=r)
        r.register(EngineCollector(engine_source))

    def generation_started(self, model: str) -> None:
        self.requests.labels(model).inc()

    def generation_finished(self, model: str, prompt_tokens: int, completion_tokens: int, started: float,
                            first_token_at: float | None, aborted: bool) -> None:
        now = time.perf_counter()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if aborted:
            self.aborted.labels(model).inc()
            return
        self.e2e.observe(now - started)
        if first_token_at is not None and completion_tokens > 1:
            self.tpot.observe((now - first_token_at) / (completion_tokens - 1))

    def forget_model(self, model: str) -> None:
        """Drop the per-model series of a deleted adapter, so label sets stay bounded."""
        for counter in (self.requests, self.aborted, self.prompt_tokens, self.generation_tokens):
            try:
                counter.remove(model)
            except KeyError:
                pass

    def http_response(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        if status >= 400:
            self.errors.labels(str(status)).inc()


class EngineCollector(Collector):
    """Scrape-time gauges from `engine.stats()` and per-adapter series from `engine.list_adapters()`."""

    def __init__(self, engine_source: Callable[[], EngineAPI | None]) -> None:
        self.engine_source = engine_source

    @property
    def engine(self) -> EngineAPI | None:
        return self.engine_source()

    def collect(self) -> Iterator[Metric]:
        yield from self._stats()
        yield from self._adapters()

    def _stats(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:  # the model is still loading
            return
        try:
            stats = engine.stats()
        except Exception as exc:  # engine not ready: no gauges rather than a failed scrape
            log.debug("engine stats unavailable: %s", exc)
            return
        gauges = {
            "loraplex_queue_waiting": ("Requests waiting for the scheduler", stats.waiting),
            "loraplex_sequences_running": ("Sequences in the running batch", stats.running),
            "loraplex_kv_cache_blocks_used": ("KV cache blocks in use", stats.kv_blocks_used),
            "loraplex_kv_cache_blocks_total": ("KV cache blocks allocated", stats.kv_blocks_total),
            "loraplex_kv_cache_usage_ratio": ("Fraction of the KV cache in use",
                                              stats.kv_blocks_used / max(1, stats.kv_blocks_total)),
        }
        queried, hits = getattr(stats, "prefix_cache_queried_tokens", 0), getattr(stats, "prefix_cache_hit_tokens", 0)
        gauges["loraplex_kv_cache_blocks_cached"] = ("KV cache blocks the prefix cache can reuse",
                                                     getattr(stats, "kv_blocks_cached", 0))
        gauges["loraplex_prefix_cache_hit_ratio"] = ("Prompt tokens served from the prefix cache / prompt tokens",
                                                     hits / max(1, queried))
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("loraplex_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                  "cache", value=queried)
        yield CounterMetricFamily("loraplex_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the "
                                  "prefix cache", value=hits)
        yield CounterMetricFamily("loraplex_preemptions", "Sequences preempted (to be recomputed) for want of KV "
                                  "cache blocks", value=getattr(stats, "preemptions", 0))
        use = getattr(stats, "memory", None)
        if use is not None:
            memory = GaugeMetricFamily("loraplex_memory_bytes", "Bytes held by the engine, by owner: the base model's "
                                       "weights, the KV cache, adapters on the device and in the CPU tier",
                                       labels=["owner"])
            for owner, value in (("model", use.model_bytes), ("kv_cache", use.kv_cache_bytes),
                                 ("adapters_device", use.adapter_device_bytes), ("adapters_cpu", use.adapter_cpu_bytes)):
                memory.add_metric([owner], value)
            yield memory
        resident = GaugeMetricFamily("loraplex_adapters_resident", "Adapters held per tier", labels=["tier"])
        resident.add_metric(["device"], stats.adapters_on_device)
        resident.add_metric(["cpu"], stats.adapters_on_cpu)
        yield resident
        yield from _pool_metrics(getattr(stats, "adapter_pool", None))


    def _adapters(self) -> Iterator[Metric]:
        engine = self.engine
        if engine is None:  # the model is still loading
            return
        try:
            adapters = engine.list_adapters()
        except Exception as exc:
            log.debug("adapter list unavailable: %s", exc)
            return
        info = GaugeMetricFamily("loraplex_adapter_info", "One series per registered adapter; 1 = current",
                                 labels=["adapter", "version", "status", "tier"])
        requests = CounterMetricFamily("loraplex_adapter_requests", "Requests served, per adapter", labels=["adapter"])
        tokens = CounterMetricFamily("loraplex_adapter_tokens", "Tokens generated, per adapter", labels=["adapter"])
        loads = CounterMetricFamily("loraplex_adapter_loads", "Loads into a device slot, per adapter",
                                    labels=["adapter"])
        load_seconds = GaugeMetricFamily("loraplex_adapter_load_seconds", "Duration of the adapter's last load",
                                         labels=["adapter"])
        for a in adapters:
            info.add_metric([a.name, str(a.version), a.status, a.tier], 1)
            requests.add_metric([a.name], a.requests)
            tokens.add_metric([a.name], a.tokens)
            loads.add_metric([a.name], a.loads)
            load_seconds.add_metric([a.name], a.load_seconds)
        yield from (info, requests, tokens, loads, load_seconds)


def _pool_metrics(pool: Any) -> Iterator[Metric]:
    """The device's adapter memory: the pool (or the padded slots, a slot per page)."""
    if pool is None:
        return
    gauges = {
        "loraplex_adapter_pool_bytes": ("Bytes of the device's adapter pool", pool.capacity_bytes),
        "loraplex_adapter_pool_used_bytes": ("Pool bytes taken by resident adapters", pool.used_bytes),
        "loraplex_adapter_pool_free_bytes": ("Pool bytes no adapter holds", pool.capacity_bytes - pool.used_bytes),
        "loraplex_adapter_pool_free_pages": ("Pool pages no adapter holds (padded slots: free slots)",
                                             pool.free_pages),
        "loraplex_adapter_pool_adapters": ("Adapters resident in the pool", pool.resident),
        "loraplex_adapter_pool_pinned": ("Resident adapters a running sequence uses (never evicted)", pool.pinned),
    }
    for name, (doc, value) in gauges.items():
        yield GaugeMetricFamily(name, doc, value=value)
    yield CounterMetricFamily("loraplex_adapter_pool_evictions", "Idle adapters evicted from the pool to make room",
                              value=pool.evictions)
    yield CounterMetricFamily("loraplex_adapter_pool_admissions_delayed", "Admissions put off because adapters of "
                              "running sequences held the pool", value=pool.admissions_delayed)
    yield CounterMetricFamily("loraplex_adapter_pool_compactions", "Times resident adapters were slid together to "
                              "make one free extent", value=pool.compactions)
