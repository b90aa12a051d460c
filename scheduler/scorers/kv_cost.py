"""kv-cost: NVIDIA Dynamo's KV-router cost; lower is better."""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.framework import DEFAULT_TIER_WEIGHTS, ScoringContext, WorkerState, minmax_lower_better
from scheduler.scorers.base import tier_weights


class KVCostScorer:
    name = "kv-cost"

    def __init__(self, overlap_weight: float = 1.0, tier_weights: Mapping[str, float] | None = None) -> None:
        if overlap_weight < 0:
            raise ValueError(f"overlap_weight must be >= 0, got {overlap_weight}")
        self.overlap_weight = float(overlap_weight)
        self.weights = _parse(tier_weights)

    def costs(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        r = ctx.request
        bs = r.block_size
        request_blocks = -(-r.prompt_tokens // bs)
        w8 = self.weights
        out = []
        for w, m in zip(workers, ctx.matches()):
            overlap = sum(w8[t] * c for t, c in enumerate(m.by_tier))  # effective overlap blocks
            prefill_tokens = w.pending_prefill_tokens + max(0.0, r.prompt_tokens - overlap * bs)
            decode_blocks = w.used_kv_blocks + request_blocks
            out.append(self.overlap_weight * prefill_tokens / bs + decode_blocks)
        return out

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        cost = self.costs(ctx, workers)
        ctx.details["kv-cost.cost"] = cost
        return minmax_lower_better(cost)


def _parse(weights: Mapping[str, float] | None) -> list[float]:
    return tier_weights(weights, DEFAULT_TIER_WEIGHTS)
