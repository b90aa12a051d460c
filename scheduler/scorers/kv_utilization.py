"""kv-utilization: more free KV cache is better (llm-d's kv-cache-utilization-scorer)."""

from __future__ import annotations

from scheduler.framework import ScoringContext, WorkerState


class KVUtilizationScorer:
    name = "kv-utilization"

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        out = []
        for w in workers:
            used = w.kv_cache_usage
            if w.kv_blocks_total:  # our own not-yet-reported requests count too
                used = max(used, w.active_blocks / w.kv_blocks_total)
            out.append(1.0 - min(1.0, max(0.0, used)))
        return out
