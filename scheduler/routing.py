"""Compatibility shim for the services written before the framework (scheduler.framework).

`WorkerState` now lives in scheduler.framework; `LeastLoaded` is the
`least-loaded` policy behind the old `pick(workers, model)` / `score(...)`
calls. New code: `scheduler.policies.policy_by_name(name).decide(...)`.
"""

from __future__ import annotations

from scheduler.framework import RequestView, WorkerScore, WorkerState
from scheduler.index import BlockIndex
from scheduler.policies import policy_by_name

Score = WorkerScore

__all__ = ["LeastLoaded", "Score", "WorkerState"]


class LeastLoaded:
    """Pick the eligible worker with the lowest load (busy / max_num_seqs); ties take turns."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._policy = policy_by_name("least-loaded")
        self._index = BlockIndex(max_blocks=2)

    def score(self, workers: list[WorkerState], model: str) -> list[WorkerScore]:
        return self._policy.decide(_request(model), workers, self._index, dry_run=True).worker_scores()

    def pick(self, workers: list[WorkerState], model: str) -> WorkerState | None:
        """The chosen worker (recorded as picked), or None when none is eligible."""
        decision = self._policy.decide(_request(model), workers, self._index)
        return next((w for w in workers if w.worker_id == decision.worker_id), None)


def _request(model: str) -> RequestView:
    return RequestView(model=model, prompt_tokens=0, block_hashes=(), block_size=16)
