"""Discrete-event simulation of a mesh: the real routing code (scheduler/) in
front of N simulated engines (services/engines/sim_model), in simulated time.

Per arrival: every engine is advanced to the arrival time (so queues, KV usage
and the block index are current), the request's prompt is hashed exactly as
the engines hash it, the policy decides, and the request joins that engine.
Between arrivals the clock jumps to the next engine event. Engines' KV events
feed the block index as they happen (a live mesh adds the event stream's
latency; `event_delay_s` is not modelled yet).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import statistics
from collections.abc import Sequence

from scheduler.block_hash import BlockHasher, external_block_hash
from services.bench.workload import WorkloadRequest, prompt_tokens
from services.engines.base import EngineRequest, SamplingOptions
from services.engines.sim_model import SimConfig, SimLatency, SimModel, Vocabulary


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    workers: int = 8
    block_size: int = 32
    num_blocks: int = 4096          # per engine: 131k tokens at block size 32
    max_num_seqs: int = 64
    max_model_len: int = 131_072
    latency: SimLatency = SimLatency()


@dataclasses.dataclass
class RequestResult:
    arrival_s: float
    worker: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def ttft(self) -> float:
        return (self.first_token_s or math.inf) - self.arrival_s

    @property
    def e2e(self) -> float:
        return (self.finish_s or math.inf) - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(results: list[RequestResult], slo_ttft_s: float, duration_s: float) -> dict[str, float]:
    done = [r for r in results if r.finish_s is not None]
    ttft = [r.ttft for r in done]
    e2e = [r.e2e for r in done]
    per_worker: dict[str, int] = {}
    for r in results:
        per_worker[r.worker] = per_worker.get(r.worker, 0) + r.input_tokens - r.cached_tokens
    loads = list(per_worker.values()) or [0]
    prompt = sum(r.input_tokens for r in done) or 1
    return {
        "requests": len(results),
        "completed": len(done),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_mean_s": statistics.fmean(e2e) if e2e else math.nan,
        "e2e_p90_s": percentile(e2e, 90),
        "output_tok_per_s": sum(r.output_tokens for r in done) / max(duration_s, 1e-9),
        "hit_rate": sum(r.cached_tokens for r in done) / prompt,
        # Uncached prompt tokens (the real work) of the busiest worker over the mean.
        "imbalance": max(loads) / max(1e-9, statistics.fmean(loads)),
        "slo_attainment": sum(t <= slo_ttft_s for t in ttft) / max(1, len(results)),
    }
