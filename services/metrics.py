"""Prometheus metrics of a scheduler replica (served on `--metrics-port`, /metrics).

Routing:
- llm_mesh_routing_decisions_total{policy, outcome}   outcome: routed | rejected
- llm_mesh_routing_decision_seconds{policy}           whole decide() (filters, scorers, picker)
- llm_mesh_routing_stage_seconds{policy, stage}       per scorer / picker, from Decision.timings_s
Prefix cache (engine-reported hits of the requests this replica routed, and what routing predicted):
- llm_mesh_prompt_tokens_total
- llm_mesh_cached_prompt_tokens_total                 hits the engines reported (usage.cached_prompt_tokens)
- llm_mesh_predicted_cached_prompt_tokens_total       hits the index predicted at the chosen worker
- llm_mesh_prefix_cache_hit_ratio                     cached / prompt tokens since start
Prefill/decode (scheduler/disagg.py):
- llm_mesh_pd_decisions_total{rule}                   remote | below-threshold | aggregated-decode-worker | no-prefill-worker | prefill-pool-overloaded | unrouted
- llm_mesh_pd_prefill_seconds                         remote prefill legs (dispatch → KV location back)
- llm_mesh_pd_prefill_fallbacks_total                 remote prefills that failed or timed out: prefilled locally instead
KV index:
- llm_mesh_kv_index_entries, llm_mesh_kv_events_applied_total, llm_mesh_kv_event_resyncs_total

The PromQL form of the hit ratio over a window is
rate(llm_mesh_cached_prompt_tokens_total[5m]) / rate(llm_mesh_prompt_tokens_total[5m]).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.framework import Decision

# Decisions take 0.1–1 ms; stages a few µs to a few hundred.
_DECISION_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
_STAGE_BUCKETS = (1e-6, 5e-6, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)
_PREFILL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter("llm_mesh_routing_decisions_total", "Routing decisions", ["policy", "outcome"],
                                 registry=r)
        self.decision_seconds = Histogram("llm_mesh_routing_decision_seconds", "Time of one routing decision",
                                          ["policy"], buckets=_DECISION_BUCKETS, registry=r)
        self.stage_seconds = Histogram("llm_mesh_routing_stage_seconds", "Time per routing stage (scorer, picker)",
                                       ["policy", "stage"], buckets=_STAGE_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_mesh_prompt_tokens", "Prompt tokens routed", registry=r)
        self.cached_tokens = Counter("llm_mesh_cached_prompt_tokens",
                                     "Prompt tokens the engines served from their prefix cache", registry=r)
        self.predicted_cached = Counter("llm_mesh_predicted_cached_prompt_tokens",
                                        "Prompt tokens the index predicted cached at the chosen worker", registry=r)
        self._totals = [0, 0]  # prompt, cached: for the ratio gauge
        self.hit_ratio = Gauge("llm_mesh_prefix_cache_hit_ratio", "Cached / prompt tokens since start", registry=r)
        self.hit_ratio.set_function(lambda: self._totals[1] / self._totals[0] if self._totals[0] else 0.0)
        self.pd_decisions = Counter("llm_mesh_pd_decisions", "Prefill/decode decisions", ["rule"], registry=r)
        self.pd_prefill_seconds = Histogram("llm_mesh_pd_prefill_seconds", "Remote prefill legs",
                                            buckets=_PREFILL_BUCKETS, registry=r)
        self.pd_fallbacks = Counter("llm_mesh_pd_prefill_fallbacks",
                                    "Remote prefills that failed or timed out (prefilled locally)", registry=r)

    def disaggregated(self, rule: str) -> None:
        self.pd_decisions.labels(rule).inc()

    def prefilled_remotely(self, seconds: float) -> None:
        self.pd_prefill_seconds.observe(seconds)

    def prefill_fallback(self) -> None:
        self.pd_fallbacks.inc()

    def decided(self, decision: Decision) -> None:
        policy = decision.policy
        self.decisions.labels(policy, "routed" if decision.worker_id else "rejected").inc()
        timings = decision.timings_s or {}
        if "total" in timings:
            self.decision_seconds.labels(policy).observe(timings["total"])
        for stage, seconds in timings.items():
            if stage != "total":
                self.stage_seconds.labels(policy, stage).observe(seconds)
        if decision.worker_id:
            self.predicted_cached.inc(decision.cached_tokens)

    def finished(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._totals[0] += prompt_tokens
        self._totals[1] += cached_tokens

    def watch_index(self, entries: Callable[[], int], feeds: Callable[[], dict]) -> None:
        self.registry.register(_IndexCollector(entries, feeds))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _IndexCollector(Collector):
    def __init__(self, entries: Callable[[], int], feeds: Callable[[], dict]) -> None:
        self._entries, self._feeds = entries, feeds

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        yield GaugeMetricFamily("llm_mesh_kv_index_entries", "(block, worker, tier) entries in the index",
                                value=self._entries())
        applied = CounterMetricFamily("llm_mesh_kv_events_applied", "KV events applied to the index",
                                      labels=["worker"])
        resyncs = CounterMetricFamily("llm_mesh_kv_event_resyncs", "Out-of-sync KV event batches (resync)",
                                      labels=["worker"])
        for worker_id, feed in self._feeds().items():
            applied.add_metric([worker_id], feed.events)
            resyncs.add_metric([worker_id], feed.resyncs)
        yield applied
        yield resyncs
