"""prefix-cache: how much of the prompt a worker already holds, credited by tier."""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.framework import DEFAULT_TIER_WEIGHTS, ScoringContext, WorkerState
from scheduler.scorers.base import tier_weights


class PrefixCacheScorer:
    name = "prefix-cache"

    def __init__(self, tier_weights: Mapping[str, float] | None = None, normalize: str = "request") -> None:
        if normalize not in ("request", "minmax"):
            raise ValueError(f"normalize must be request or minmax, got {normalize!r}")
        self.weights = _parse(tier_weights)
        self.normalize = normalize

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        n = len(ctx.request.block_hashes)
        if not n:
            return [0.0] * len(workers)
        w = self.weights
        credit = [sum(w[t] * c for t, c in enumerate(m.by_tier)) for m in ctx.matches()]
        if self.normalize == "request":
            return [c / n for c in credit]
        hits = [c for c in credit if c > 0]  # llm-d: min-max over the workers with a hit, 0 for the rest
        if not hits:
            return [0.0] * len(workers)
        lo, hi = min(hits), max(hits)
        return [0.0 if c <= 0 else 1.0 if hi == lo else (c - lo) / (hi - lo) for c in credit]


def _parse(weights: Mapping[str, float] | None) -> list[float]:
    return tier_weights(weights, DEFAULT_TIER_WEIGHTS)
