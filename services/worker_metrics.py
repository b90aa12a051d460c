"""Prometheus metrics of a worker (`llm-mesh worker --metrics-port`, /metrics).

Served from prometheus_client's default registry, because that is where vLLM puts its own:
with `--engine vllm`, AsyncLLM (log stats on) registers vLLM's `vllm:*` metrics there
(vllm/v1/metrics/loggers.py PrometheusStatLogger, labels model_name and engine). Every
other engine (sim) gets the same names and labels, computed here from its outputs
(`VllmCompatibleEngine`), so dashboards cannot tell the engines apart:
- vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc   (engine.load())
- vllm:prompt_tokens_total, vllm:generation_tokens_total
- vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total      (prompt tokens / cached ones)
- vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds, vllm:e2e_request_latency_seconds
  (from the engine's generate() call; ITL between token-carrying outputs; prompt and cache
  counts and e2e are taken when a request finishes, also when aborted)
Plus, whatever the engine:
- llm_mesh_worker_kv_events_published_total   KV events this worker numbered for the schedulers
- llm_mesh_etcd_lease_* (services/metrics.watch_lease, kind="worker"), process_*, python_*
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services import metrics
from services.engines.base import Engine, EngineInfo, EngineLoad, EngineOutput, EngineRequest, KVEventSink
from services.kv_event_log import KVEventLog
from services.membership import Registration

# vLLM 0.32's default buckets (vllm/v1/metrics/buckets.py), cut where they stop mattering here.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
_LABELS = ["model_name", "engine"]
ENGINE_INDEX = "0"  # vLLM's `engine` label: the data-parallel engine index (one engine per worker)


class WorkerMetrics:
    def __init__(self, kv_log: KVEventLog, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        registry.register(_KVEventsCollector(lambda: kv_log.seq))

    def watch_lease(self, registration: Registration) -> None:
        metrics.watch_lease(self.registry, registration)

    def vllm_compatible(self, engine: Engine) -> Engine:
        """`engine` recording vLLM's metrics (for engines that do not register their own)."""
        return VllmCompatibleEngine(engine, self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        metrics.serve(self.registry, port, host)


class _KVEventsCollector(Collector):
    def __init__(self, published: Callable[[], int]) -> None:
        self._published = published

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        # KVEventLog numbers its events 1, 2, … per process: the last seq is the count.
        yield CounterMetricFamily("llm_mesh_worker_kv_events_published", "KV events numbered for the schedulers",
                                  value=self._published())


class VllmCompatibleEngine(Engine):
    """Delegates to `engine`; records vLLM-named metrics from what it yields."""

    def __init__(self, engine: Engine, registry: CollectorRegistry) -> None:
        self._engine = engine
        r = registry
        self._running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                              _LABELS, registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                              _LABELS, registry=r)
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                               _LABELS, registry=r)
        self._prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", _LABELS, registry=r)
        self._generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", _LABELS,
                                   registry=r)
        self._queries = Counter("vllm:prefix_cache_queries",
                                "Prefix cache queries, in terms of number of queried tokens.", _LABELS, registry=r)
        self._hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                             _LABELS, registry=r)
        self._ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               _LABELS, buckets=_TTFT_BUCKETS, registry=r)
        self._itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                              _LABELS, buckets=_ITL_BUCKETS, registry=r)
        self._e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              _LABELS, buckets=_E2E_BUCKETS, registry=r)
        self._model = ""

    async def start(self) -> EngineInfo:
        info = await self._engine.start()
        self._model = labels = info.model
        self._running.labels(labels, ENGINE_INDEX).set_function(lambda: self._engine.load().running)
        self._waiting.labels(labels, ENGINE_INDEX).set_function(lambda: self._engine.load().waiting)
        self._kv_usage.labels(labels, ENGINE_INDEX).set_function(lambda: self._engine.load().kv_cache_usage)
        # Every series exists from the start at 0, as vLLM creates them (create_metric_per_engine).
        for family in (self._prompt, self._generation, self._queries, self._hits, self._ttft, self._itl, self._e2e):
            family.labels(labels, ENGINE_INDEX)
        return info

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        outputs = self._engine.generate(request)
        labels = (self._model, ENGINE_INDEX)
        started = last = time.monotonic()
        first = True
        try:
            async for out in outputs:
                now = time.monotonic()
                if out.token_ids:
                    (self._ttft if first else self._itl).labels(*labels).observe(now - last)
                    self._generation.labels(*labels).inc(len(out.token_ids))
                    first, last = False, now
                if out.finish_reason is not None:
                    self._prompt.labels(*labels).inc(out.prompt_tokens)
                    self._queries.labels(*labels).inc(out.prompt_tokens)
                    self._hits.labels(*labels).inc(out.cached_prompt_tokens)
                    self._e2e.labels(*labels).observe(now - started)
                yield out
        finally:
            await outputs.aclose()  # closing us must close (abort) the engine's request

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        self._engine.set_kv_event_sink(sink)

    async def abort(self, request_id: str) -> bool:
        return await self._engine.abort(request_id)

    def load(self) -> EngineLoad:
        return self._engine.load()

    async def stop(self) -> None:
        await self._engine.stop()
