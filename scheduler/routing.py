"""Least-loaded routing (the baseline; KV-aware scoring plugs in beside it).

A worker's load, as one scheduler replica sees it:

    load = max(inflight, reported_running + reported_waiting) / max_num_seqs

`inflight` is what this replica has sent and not seen finish (exact, instant);
`reported_*` is the worker's own count from its last GetLoad poll (covers the
other replicas' requests, but is up to one poll interval old). Taking the max
avoids double counting our own requests while still seeing the others'.
Ties go to the worker that was picked least recently, so equal workers share
load round-robin instead of the first one taking every burst.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class WorkerState:
    """What routing needs to know about one worker."""

    worker_id: str
    model: str
    max_num_seqs: int
    routable: bool = True
    inflight: int = 0
    reported_running: int = 0
    reported_waiting: int = 0
    kv_cache_usage: float = 0.0
    last_picked: int = 0  # pick sequence number; 0 = never

    @property
    def load(self) -> float:
        busy = max(self.inflight, self.reported_running + self.reported_waiting)
        return busy / max(1, self.max_num_seqs)


@dataclasses.dataclass(frozen=True)
class Score:
    worker_id: str
    score: float  # higher is better
    components: dict[str, float]
    filtered_reason: str = ""


class LeastLoaded:
    """Pick the eligible worker with the lowest load."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._picks = 0

    def score(self, workers: list[WorkerState], model: str) -> list[Score]:
        scores = []
        for w in workers:
            reason = "" if w.routable else "not routable"
            if not reason and w.model != model:
                reason = f"serves {w.model}"
            scores.append(Score(w.worker_id, -w.load, {"load": w.load}, reason))
        return scores

    def pick(self, workers: list[WorkerState], model: str) -> WorkerState | None:
        """The chosen worker (recorded as picked), or None when none is eligible."""
        by_id = {w.worker_id: w for w in workers}
        eligible = [s for s in self.score(workers, model) if not s.filtered_reason]
        if not eligible:
            return None
        best = max(eligible, key=lambda s: (s.score, -by_id[s.worker_id].last_picked))
        chosen = by_id[best.worker_id]
        self._picks += 1
        chosen.last_picked = self._picks
        return chosen
