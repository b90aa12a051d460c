"""load: a less loaded worker is better; load = busy / max_num_seqs."""

from __future__ import annotations

from scheduler.framework import ScoringContext, WorkerState


class LoadScorer:
    name = "load"

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        return [1.0 / (1.0 + w.load) for w in workers]
