"""The scaling planner in a scheduler replica: every window, a LoadSample from this replica's
requests (services/router_stats) and the worker pool's load reports, fed to scheduler.planner;
the plan is published as Prometheus gauges and through Scheduler.GetScalingPlan.

The demand (requests, prompt tokens computed, tokens generated) comes from the workers' lifetime
counters in their load reports, so it is the whole mesh's, whichever replica routed the
requests: every replica plans the same. Latencies (TTFT, ITL) are this replica's own requests: a
sample of the same traffic. Until a request finishes somewhere, the router's own window stands in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Gauge

from llm_mesh.v1 import scheduler_pb2, worker_pb2
from scheduler.framework import Role
from scheduler.planner import LoadSample, Planner, PlannerConfig, ScalingPlan
from services.router_stats import RouterStats, WindowLoad, percentile
from services.worker_pool import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 15.0


@dataclasses.dataclass(frozen=True)
class MeshDemand:
    """The whole mesh's work between two snapshots of the workers' lifetime counters."""

    finished: int  # requests finished by the decode pool
    prompt_tokens: int  # their prompt tokens
    computed_prompt_tokens: int  # prompt tokens computed anywhere (no prefix hit, no KV pulled)
    generated_tokens: int  # by the decode pool


def mesh_demand(previous: Mapping[str, worker_pb2.WorkerLoad],
                current: Mapping[str, tuple[Role, worker_pb2.WorkerLoad]]) -> MeshDemand:
    """Counter deltas per worker, summed. A worker absent from `previous` only sets its baseline
    (its lifetime is not this window's work); a counter that went back (a restart) counts from 0."""
    finished = prompt = computed = generated = 0
    for worker_id, (role, now) in current.items():
        before = previous.get(worker_id)
        if before is None:
            continue

        def delta(field: str) -> int:
            a, b = getattr(before, field), getattr(now, field)
            return b - a if b >= a else b

        computed += max(0, delta("prompt_tokens") - delta("cached_prompt_tokens")
                        - delta("kv_transferred_prompt_tokens"))
        if role != Role.PREFILL:  # a prefill leg is not a request, nor its one token an output
            finished += delta("requests_finished")
            prompt += delta("prompt_tokens")
            generated += delta("generated_tokens")
    return MeshDemand(finished, prompt, computed, generated)


def build_sample(window: WindowLoad, window_s: float, pool: WorkerPool, demand: MeshDemand | None = None
                 ) -> LoadSample:
    """This window's LoadSample: the mesh's demand from the workers' counters (`demand`; the router's
    own requests while none finished), latencies from the router, the rest from the workers' reports."""
    workers = [w for w in list(pool.workers.values()) if w.state.routable]
    prefill = [w.state for w in workers if w.state.role == Role.PREFILL]
    decode = [w.state for w in workers if w.state.role != Role.PREFILL]
    prefilling = prefill or decode  # aggregated: the decode pool prefills
    speeds = [s.prefill_tokens_per_s for s in prefilling if s.prefill_tokens_per_s]
    if demand is not None and demand.finished > 0:
        count, prompt, uncached = demand.finished, demand.prompt_tokens, demand.computed_prompt_tokens
        output, finished = demand.generated_tokens, demand.finished
    else:
        count, prompt, uncached = window.arrivals, window.prompt_tokens, window.uncached_tokens
        output, finished = window.output_tokens, window.finished
    return LoadSample(
        window_s=window_s, arrival_rate=count / window_s,
        prompt_tokens_mean=prompt / max(1, count),
        uncached_prompt_tokens_mean=uncached / max(1, count),
        output_tokens_mean=output / max(1, finished),
        ttft_p90_s=percentile(window.ttfts, 90) if window.ttfts else None,
        itl_p90_s=percentile(window.itls, 90) if window.itls else None,
        prefill_queue=sum(s.waiting for s in prefilling),
        decode_running=sum(s.running for s in decode),
        kv_utilization=sum(s.kv_cache_usage for s in decode) / len(decode) if decode else 0.0,
        prefill_replicas=len(prefill), decode_replicas=len(decode),
        prefill_tokens_per_s=sum(speeds) / len(speeds) if speeds else None,
        decode_tokens_per_s=output / window_s / len(decode) if decode else None,
    )


class PlannerLoop:
    """Runs the planner every `window_s` and keeps the latest plan."""

    def __init__(self, stats: RouterStats, pool: WorkerPool, config: PlannerConfig, registry: CollectorRegistry,
                 window_s: float = DEFAULT_WINDOW_S) -> None:
        self.stats, self.pool, self.config, self.window_s = stats, pool, config, window_s
        self.planner = Planner(config)
        self.plan: ScalingPlan | None = None
        self.sample: LoadSample | None = None
        self.computed_at_s = 0.0
        self._task: asyncio.Task[None] | None = None
        self._counters: dict[str, worker_pb2.WorkerLoad] = {}  # the workers' loads at the last step
        self.desired = Gauge("llm_mesh_planner_desired_replicas", "Replicas the scaling planner recommends",
                             ["role"], registry=registry)
        self.observed = Gauge("llm_mesh_planner_observed_replicas", "Replicas of the role the planner saw",
                              ["role"], registry=registry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="planner")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        self.stats.take_window()  # start the first window now
        self._snapshot()
        while True:
            await asyncio.sleep(self.window_s)
            try:
                self.step()
            except Exception:  # a planner bug must not stop the scheduler from serving
                log.exception("scaling planner step failed")

    def step(self) -> ScalingPlan:
        window = self.stats.take_window()
        elapsed = max(1e-3, time.monotonic() - window.started_s)
        previous = self._counters
        demand = mesh_demand(previous, self._snapshot())
        self.sample = build_sample(window, elapsed, self.pool, demand)
        self.plan = self.planner.observe(self.sample)
        self.computed_at_s = time.time()
        published = {r.role for r in self.plan.roles()}
        for role in ("prefill", "decode"):
            if role not in published:  # aggregated mesh: no prefill series at all
                with contextlib.suppress(KeyError):
                    self.desired.remove(role)
                    self.observed.remove(role)
        for r in self.plan.roles():
            self.desired.labels(r.role).set(r.desired)
            self.observed.labels(r.role).set(r.observed)
        return self.plan

    def _snapshot(self) -> dict[str, tuple[Role, worker_pb2.WorkerLoad]]:
        # A worker not polled yet has an empty load: leaving it out makes its first report a baseline.
        current = {w.member.id: (w.state.role, w.load) for w in list(self.pool.workers.values())
                   if w.load.ByteSize()}
        self._counters = {worker_id: load for worker_id, (_, load) in current.items()}
        return current

    def to_proto(self) -> scheduler_pb2.ScalingPlan:
        c = self.config
        out = scheduler_pb2.ScalingPlan(window_s=self.window_s, ttft_p90_slo_s=c.ttft_p90_s,
                                        itl_p90_slo_s=c.itl_p90_s)
        if self.plan is None or self.sample is None:
            return out
        plan, s = self.plan, self.sample
        out.computed_at_unix_ms = int(self.computed_at_s * 1000)
        out.disaggregated = plan.disaggregated
        for r in plan.roles():
            low, high = ((c.min_prefill_replicas, c.max_prefill_replicas) if r.role == "prefill"
                         else (c.min_decode_replicas, c.max_decode_replicas))
            out.roles.add(role=r.role, observed_replicas=r.observed, desired_replicas=r.desired,
                          required_replicas=r.required, min_replicas=low, max_replicas=high, reason=r.reason)
        out.load.CopyFrom(scheduler_pb2.PlannerLoad(
            arrival_rate=s.arrival_rate, prompt_tokens_mean=s.prompt_tokens_mean,
            uncached_prompt_tokens_mean=s.uncached_prompt_tokens_mean, output_tokens_mean=s.output_tokens_mean,
            ttft_p90_s=s.ttft_p90_s or 0.0, itl_p90_s=s.itl_p90_s or 0.0, prefill_queue=s.prefill_queue,
            decode_running=s.decode_running, kv_utilization=s.kv_utilization,
            predicted_prefill_tokens_per_s=plan.predicted_prefill_tokens_per_s,
            predicted_decode_tokens_per_s=plan.predicted_decode_tokens_per_s))
        return out
