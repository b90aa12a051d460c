"""queue: fewer requests waiting for prefill is better (llm-d's queue-scorer)."""

from __future__ import annotations

from scheduler.framework import ScoringContext, WorkerState, minmax_lower_better


class QueueScorer:
    name = "queue"

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        return minmax_lower_better([w.waiting for w in workers])
