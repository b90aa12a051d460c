"""The simulator checked against a live run: the live run's own worker choices, replayed in
services/bench/des.py, compared request by request.

With the choices fixed, what is left to differ is the modelled timing: the engines' steps,
the KV events, the router's spacing of a burst. So a small per-request error says the
simulator's engines are faithful, and a policy's sim/live gap comes from its decisions (what
its router saw), not from the model. (This is how the 2026-12-07/08 gaps were found: a burst
landing at once, a load report always current.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scheduler.framework import Decision, RequestView, WorkerState, start_decision
from scheduler.index import BlockIndex, Tier
from services.bench.des import ClusterSpec, RequestResult, arrival_order, percentile, simulate
from services.bench.workload import WorkloadRequest


class ForcedChoices:
    """A policy that sends the n-th request it is asked about to `workers[n]` (None: reject it)."""

    name = "forced"

    def __init__(self, workers: Sequence[str | None]) -> None:
        self.workers = list(workers)
        self.decided = 0

    def decide(self, request: RequestView, workers: list[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> Decision:
        _, d = start_decision(self.name, [], request, workers)
        want = self.workers[self.decided]
        self.decided += 1
        if want is None:
            d.reason = "failed in the live run"
            return d
        held = index.match_prefix(request.model, request.block_hashes).get(want) if request.block_hashes else None
        d.worker_id = want
        d.cached_tokens = min(request.prompt_tokens, (held.by_tier[Tier.ENGINE] if held else 0) * request.block_size)
        d.prefill_tokens = max(0, request.prompt_tokens - (held.blocks if held else 0) * request.block_size)
        return d


def replay_choices(requests: list[WorkloadRequest], live: list[RequestResult], spec: ClusterSpec, *,
                   decision_s: float, load_poll_s: float) -> dict[str, float]:
    """Simulate `requests` with each sent where `live[i]` (same order) went; the simulated p90/mean
    TTFT and hit rate, and the per-request TTFT error (simulated − live) over the requests that
    completed both ways. Live worker ids map to the simulated ones in order of first use."""
    names = [w for w, _ in spec.worker_roles()]
    ids: dict[str, str] = {}
    for r in live:
        if r.worker and r.worker not in ids:
            if len(ids) == len(names):
                raise ValueError(f"the live run used more workers than the {len(names)} simulated")
            ids[r.worker] = names[len(ids)]
    order = arrival_order(requests)
    forced = [ids[live[i].worker] if live[i].worker else None for i in order]
    simulated: list[RequestResult] = []
    summary = simulate(requests, ForcedChoices(forced), spec, decision_s=decision_s, load_poll_s=load_poll_s,
                       results_out=simulated)
    errors = [s.ttft - live[i].ttft for s, i in zip(simulated, order)
              if math.isfinite(s.ttft) and live[i].finish_s is not None and live[i].first_token_s is not None]
    return {"ttft_p90_s": summary["ttft_p90_s"], "ttft_mean_s": summary["ttft_mean_s"],
            "hit_rate": summary["hit_rate"],
            "ttft_error_mean_s": statistics.fmean(errors) if errors else math.nan,
            "ttft_error_abs_p90_s": percentile([abs(e) for e in errors], 90), "compared": len(errors)}
