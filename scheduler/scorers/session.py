"""session-affinity: keep a session (RequestView.session_id) on one worker."""

from __future__ import annotations

import collections
import hashlib

from scheduler.framework import ScoringContext, WorkerState


class SessionAffinityScorer:
    name = "session-affinity"

    def __init__(self, mode: str = "remember", max_sessions: int = 100_000) -> None:
        if mode not in ("remember", "hash"):
            raise ValueError(f"mode must be remember or hash, got {mode!r}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.mode = mode
        self.max_sessions = max_sessions
        self._last: collections.OrderedDict[str, str] = collections.OrderedDict()  # session -> worker, LRU

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        session = ctx.request.session_id
        if not session:
            return [0.0] * len(workers)
        if self.mode == "hash":
            target = max(workers, key=lambda w: _rendezvous(session, w.worker_id)).worker_id
        else:
            target = self._last.get(session)
        return [1.0 if w.worker_id == target else 0.0 for w in workers]

    def commit(self, ctx: ScoringContext, chosen: WorkerState) -> None:
        session = ctx.request.session_id
        if self.mode != "remember" or not session:
            return
        self._last[session] = chosen.worker_id
        self._last.move_to_end(session)
        if len(self._last) > self.max_sessions:
            self._last.popitem(last=False)


def _rendezvous(session: str, worker_id: str) -> int:
    """Highest-random-weight hashing: stable across replicas and processes."""
    return int.from_bytes(hashlib.blake2b(f"{session}\0{worker_id}".encode(), digest_size=8).digest(), "big")
