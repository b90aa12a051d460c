"""running: fewer running requests, relative to the worker's capacity, is better."""

from __future__ import annotations

from scheduler.framework import ScoringContext, WorkerState


class RunningScorer:
    name = "running"

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        return [1.0 - min(1.0, w.running / max(1, w.max_num_seqs)) for w in workers]
