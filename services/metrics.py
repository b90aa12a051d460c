"""Prometheus metrics of a scheduler replica (served on `--metrics-port`, /metrics), and what
every process exports (etcd lease health; `serve`). Workers: services/worker_metrics.py;
gateway: services/gateway_metrics.py. The README's "Metrics" table lists them all.

Requests (the Inference servicer around Router.run, timed from before tokenization; `model` is "" for a
request that named no served model):
- llm_mesh_requests_total{model, outcome}            ok | error | cancelled | rejected (see RequestClock)
- llm_mesh_time_to_first_token_seconds{model}        to the first response carrying tokens
- llm_mesh_inter_token_latency_seconds{model}        between consecutive responses carrying tokens
- llm_mesh_e2e_request_latency_seconds{model}        to the last response (every outcome)
- llm_mesh_in_flight_requests
Workers, from the load each worker reports (GetLoad, polled every second); a worker that
left etcd leaves these series:
- llm_mesh_worker_waiting_requests{worker, role}, llm_mesh_worker_running_requests{worker, role},
  llm_mesh_worker_kv_cache_usage_ratio{worker, role}
etcd lease of this process (every registered process: scheduler, worker, gateway):
- llm_mesh_etcd_lease_healthy{kind}                  1 while keep-alives succeed, 0 while they fail
- llm_mesh_etcd_keepalive_failures_total{kind}       failed etcd requests of the registration
- llm_mesh_etcd_reregistrations_total{kind}          new leases after the first (a lease lapsed)
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
Failover and admission (services/router.py):
- llm_mesh_failovers_total{kind, code}                kind: retry (before the first token) | migrate (after it)
- llm_mesh_admission_refused_total                    refused at capacity: RESOURCE_EXHAUSTED / HTTP 429
KV index:
- llm_mesh_kv_index_entries, llm_mesh_kv_events_applied_total, llm_mesh_kv_event_resyncs_total
Scaling planner (services/planner_loop.py registers them on this registry; scheduler/PLANNER.md):
- llm_mesh_planner_desired_replicas{role}, llm_mesh_planner_observed_replicas{role}   role: prefill | decode

The PromQL form of the hit ratio over a window is
rate(llm_mesh_cached_prompt_tokens_total[5m]) / rate(llm_mesh_prompt_tokens_total[5m]).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_mesh.v1 import membership_pb2
from scheduler.framework import Decision
from services.grpc_util import RpcError

# Client-facing latencies: TTFT and whole requests 10 ms … 60 s, token gaps 1 ms … 5 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Decisions take 0.1–1 ms; stages a few µs to a few hundred.
_DECISION_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)
_STAGE_BUCKETS = (1e-6, 5e-6, 2e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3)
_PREFILL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Children:
    """`metric.labels(*values)` for the per-request path: prometheus_client's labels() takes a
    lock and checks its arguments on every call (~2 µs; ~10 calls per request); this is one dict
    lookup once a child exists. Label values here come from bounded sets (policies, stages,
    served models, outcomes), and prometheus_client keeps each child anyway."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self._labels = metric.labels
        self._made: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._labels(*values)
        return child


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
        self.requests = Counter("llm_mesh_requests", "Requests by outcome", ["model", "outcome"], registry=r)
        self.ttft = Histogram("llm_mesh_time_to_first_token_seconds", "Time to the first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llm_mesh_inter_token_latency_seconds", "Time between token-carrying responses",
                             ["model"], buckets=TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("llm_mesh_e2e_request_latency_seconds", "Whole requests", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("llm_mesh_in_flight_requests", "Requests being served", registry=r)
        self.failovers = Counter("llm_mesh_failovers", "Requests moved to another worker after a worker failed",
                                 ["kind", "code"], registry=r)
        self.admission_refusals = Counter("llm_mesh_admission_refused",
                                          "Requests refused at capacity (RESOURCE_EXHAUSTED / HTTP 429)", registry=r)
        # The labelled series touched on every request
        self.decisions_of, self.decision_seconds_of = _Children(self.decisions), _Children(self.decision_seconds)
        self.stage_seconds_of, self.pd_decisions_of = _Children(self.stage_seconds), _Children(self.pd_decisions)
        self.requests_of, self.ttft_of = _Children(self.requests), _Children(self.ttft)
        self.itl_of, self.e2e_of = _Children(self.itl), _Children(self.e2e)

    def failed_over(self, kind: str, code: str) -> None:
        self.failovers.labels(kind, code).inc()

    def admission_refused(self) -> None:
        self.admission_refusals.inc()

    def request(self, model: str) -> RequestClock:
        """Times one request: `with metrics.request(model) as clock: ... clock.tokens() ...`."""
        return RequestClock(self, model)

    def disaggregated(self, rule: str) -> None:
        self.pd_decisions_of(rule).inc()

    def prefilled_remotely(self, seconds: float) -> None:
        self.pd_prefill_seconds.observe(seconds)

    def prefill_fallback(self) -> None:
        self.pd_fallbacks.inc()

    def decided(self, decision: Decision) -> None:
        policy = decision.policy
        self.decisions_of(policy, "routed" if decision.worker_id else "rejected").inc()
        timings = decision.timings_s or {}
        if "total" in timings:
            self.decision_seconds_of(policy).observe(timings["total"])
        for stage, seconds in timings.items():
            if stage != "total":
                self.stage_seconds_of(policy, stage).observe(seconds)
        if decision.worker_id:
            self.predicted_cached.inc(decision.cached_tokens)

    def finished(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._totals[0] += prompt_tokens
        self._totals[1] += cached_tokens

    def watch_index(self, entries: Callable[[], int], feeds: Callable[[], dict]) -> None:
        self.registry.register(_IndexCollector(entries, feeds))

    def watch_workers(self, loads: Callable[[], Iterable[tuple[str, str, ReportedLoad]]]) -> None:
        """Export the workers' reported load: `loads()` gives (worker id, role, load), read at every scrape."""
        self.registry.register(_WorkerLoadCollector(loads))

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        serve(self.registry, port, host)


def serve(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
    """/metrics of `registry` on host:port, from a daemon thread (scrapes never wait on the event loop)."""
    start_http_server(port, addr=host, registry=registry)


class RequestClock:
    """One request's outcome and latencies. Outcomes, from how the request ended:
    - ok: it finished (stop or length);
    - cancelled: the client cancelled, went away, or its deadline passed;
    - rejected: the scheduler refused it before any worker saw it (invalid input, unknown
      model, no routable worker): an RpcError it raised itself, not one caused by a worker;
    - error: anything else (a worker failed, the engine aborted it)."""

    def __init__(self, metrics: SchedulerMetrics, model: str) -> None:
        self._metrics = metrics
        self.model = model  # may be set once the request is validated
        self.finished_ok = False
        self._started = self._last = time.monotonic()
        self._first = True

    def tokens(self) -> None:
        """A response carrying tokens was sent."""
        now = time.monotonic()
        if self._first:
            self._metrics.ttft_of(self.model).observe(now - self._started)
            self._first = False
        else:
            self._metrics.itl_of(self.model).observe(now - self._last)
        self._last = now

    def __enter__(self) -> RequestClock:
        self._metrics.in_flight.inc()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        m = self._metrics
        m.in_flight.dec()
        m.requests_of(self.model, self._outcome(exc)).inc()
        m.e2e_of(self.model).observe(time.monotonic() - self._started)

    def _outcome(self, exc: BaseException | None) -> str:
        if exc is None:
            return "ok" if self.finished_ok else "error"
        if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            return "cancelled"
        if isinstance(exc, RpcError):
            if exc.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "cancelled"
            return "rejected" if exc.__cause__ is None else "error"
        return "error"


class ReportedLoad(Protocol):
    """llm_mesh.v1.WorkerLoad, as far as these gauges read it."""

    waiting: int
    running: int
    kv_cache_usage: float


class _WorkerLoadCollector(Collector):
    def __init__(self, loads: Callable[[], Iterable[tuple[str, str, ReportedLoad]]]) -> None:
        self._loads = loads

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        labels = ["worker", "role"]
        waiting = GaugeMetricFamily("llm_mesh_worker_waiting_requests", "Requests queued on the worker", labels=labels)
        running = GaugeMetricFamily("llm_mesh_worker_running_requests", "Requests running on the worker",
                                    labels=labels)
        kv = GaugeMetricFamily("llm_mesh_worker_kv_cache_usage_ratio", "Fraction of the worker's KV blocks in use",
                               labels=labels)
        for worker_id, role, load in self._loads():
            key = [worker_id, role]
            waiting.add_metric(key, load.waiting)
            running.add_metric(key, load.running)
            kv.add_metric(key, load.kv_cache_usage)
        yield from (waiting, running, kv)


class LeaseState(Protocol):
    """What services.membership.Registration exposes about its lease."""

    member: membership_pb2.Member
    healthy: bool
    keepalive_failures: int
    registrations: int


def watch_lease(registry: CollectorRegistry, registration: LeaseState) -> None:
    """Export the etcd lease health of this process's registration."""
    registry.register(_LeaseCollector(registration))


class _LeaseCollector(Collector):
    def __init__(self, registration: LeaseState) -> None:
        self._registration = registration
        kind = membership_pb2.MemberKind.Name(registration.member.kind)
        self._kind = kind.removeprefix("MEMBER_KIND_").lower()

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        r, labels = self._registration, ["kind"]
        healthy = GaugeMetricFamily("llm_mesh_etcd_lease_healthy", "1 while etcd lease keep-alives succeed",
                                    labels=labels)
        healthy.add_metric([self._kind], 1.0 if r.healthy else 0.0)
        failures = CounterMetricFamily("llm_mesh_etcd_keepalive_failures", "Failed etcd requests of the registration",
                                       labels=labels)
        failures.add_metric([self._kind], r.keepalive_failures)
        again = CounterMetricFamily("llm_mesh_etcd_reregistrations", "Registrations under a new lease after the first",
                                    labels=labels)
        again.add_metric([self._kind], max(r.registrations - 1, 0))
        yield from (healthy, failures, again)


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
