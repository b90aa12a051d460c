"""ttft: predicted time to first token at each worker (our default cost model); lower is better."""

from __future__ import annotations

from collections.abc import Mapping

from scheduler.framework import ScoringContext, WorkerState
from scheduler.index import Tier
from scheduler.scorers.base import tier_weights

# Tokens/s at which a tier's blocks reach the engine (host→device copy, disk read, store pull).
DEFAULT_LOAD_SPEED = {Tier.ENGINE: 0.0, Tier.HOST: 200_000.0, Tier.DISK: 20_000.0, Tier.STORE: 50_000.0}


class TTFTScorer:
    name = "ttft"

    def __init__(self, prefill_tokens_per_s: float = 10_000.0, step_overhead_s: float = 0.002,
                 default_request_tokens: int = 1024, request_duration_s: float = 2.0,
                 load_tokens_per_s: Mapping[str, float] | None = None, work_weight: float = 0.0,
                 load_scaled: bool = True, hit_scaled: bool = True) -> None:
        if prefill_tokens_per_s <= 0 or request_duration_s <= 0:
            raise ValueError("prefill_tokens_per_s and request_duration_s must be positive")
        if work_weight < 0 or step_overhead_s < 0 or default_request_tokens < 0:
            raise ValueError("work_weight, step_overhead_s and default_request_tokens must be >= 0")
        self.speed = float(prefill_tokens_per_s)
        self.overhead = float(step_overhead_s)
        self.default_tokens = int(default_request_tokens)
        self.request_duration_s = float(request_duration_s)
        self.load_speed = tier_weights(load_tokens_per_s, DEFAULT_LOAD_SPEED)
        self.work_weight = float(work_weight)
        self.load_scaled = bool(load_scaled)
        self.hit_scaled = bool(hit_scaled)

    def predict(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[tuple[float, ...]]:
        """Per worker: (cost, ttft, queue_s, admit_s, prefill_s, load_s); cost = ttft + work charge."""
        r = ctx.request
        bs = r.block_size
        prompt = r.prompt_tokens
        request_blocks = -(-prompt // bs)
        overhead, default_tokens, load_speed = self.overhead, self.default_tokens, self.load_speed
        # (The WorkerState properties are inlined: this loop runs for every worker on every request.)
        waiting = [max(w.reported_waiting, w.pending_prefill) for w in workers]
        # The work charge: recomputing what another worker holds costs the cluster prefill time that
        # later requests wait behind, and duplicates the prefix in a second cache (evicting others').
        # Scaled by the mean queue length (<= 1: nothing waits, nothing is delayed) and by the share
        # of the prompt cached somewhere (little reusable: the work is mostly unavoidable anyway).
        work_weight = self.work_weight
        if self.load_scaled:
            work_weight *= min(1.0, sum(waiting) / len(workers))
        if self.hit_scaled:
            best = max(m.blocks for m in ctx.matches()) * bs
            work_weight *= min(1.0, best / prompt) if prompt else 0.0
        out = []
        for w, m, queued in zip(workers, ctx.matches(), waiting):
            speed = w.prefill_tokens_per_s or self.speed
            # Queue: prompts ahead of us. Ours are known exactly; the report only counts requests,
            # sized like our own pending ones (or a default when we have none there).
            pending, pending_tokens = w.pending_prefill, w.pending_prefill_tokens
            avg = pending_tokens / pending if pending else default_tokens
            ahead = max(pending_tokens, w.reported_waiting * avg)
            queue_s = ahead / speed + queued * overhead
            # Admission: the engine takes us (and those ahead) only with a free sequence slot and free
            # KV blocks; short of either, running requests must finish first. k of R running requests
            # end, on average, k / (R + 1) of a request's duration from now.
            running = max(w.reported_running, w.inflight - pending)
            deficit = max(w.inflight, w.reported_running + w.reported_waiting) + 1 - w.max_num_seqs
            total = w.kv_blocks_total
            if total:
                used = max(w.active_blocks, int(w.kv_cache_usage * total))
                need = request_blocks + ahead / bs
                if need > total - used:
                    per_request = used / running if running else need
                    deficit = max(deficit, (need - total + used) / max(1.0, per_request))
            admit_s = 0.0
            if deficit > 0:
                admit_s = deficit * (w.mean_request_s or self.request_duration_s) / (running + 1)
            # Prefill: the uncached tokens (vLLM recomputes at least the last one).
            uncached = max(1, prompt - m.blocks * bs) if prompt else 0
            prefill_s = overhead + uncached / speed
            load_s = 0.0
            if m.blocks != m.by_tier[0]:
                t = m.by_tier
                load_s = sum(t[i] * bs / load_speed[i] for i in (1, 2, 3) if t[i])
            ttft = queue_s + admit_s + prefill_s + load_s
            out.append((ttft + work_weight * prefill_s, ttft, queue_s, admit_s, prefill_s, load_s))
        return out

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        pred = self.predict(ctx, workers)
        cost = [p[0] for p in pred]
        for i, key in enumerate(("cost_s", "predicted_s", "queue_s", "admit_s", "prefill_s", "load_s")):
            ctx.details[f"ttft.{key}"] = [p[i] for p in pred]
        best = min(cost)
        return [best / c if c > 0 else 1.0 for c in cost]
