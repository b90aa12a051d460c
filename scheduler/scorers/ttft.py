"""ttft: predicted time to first token at each worker (our default cost model); lower is better."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from scheduler.framework import ScoringContext, WorkerState
from scheduler.index import Tier
from scheduler.scorers.base import tier_weights

# Tokens/s at which a tier's blocks reach the engine (host→device copy, disk read, store pull).
DEFAULT_LOAD_SPEED = {Tier.ENGINE: 0.0, Tier.HOST: 200_000.0, Tier.DISK: 20_000.0, Tier.STORE: 50_000.0}


@dataclasses.dataclass
class _Steps:
    """This replica's picture of one worker's prefill steps, from its own dispatches."""

    start: float  # when the prefill step in flight started (or will: requests until then join it)
    end: float  # its predicted end
    inflight: int = 1  # our requests in it
    queued: int = 0  # ours waiting for the next step (they will all share it)
    queued_tokens: int = 0  # their uncached tokens


class TTFTScorer:
    name = "ttft"

    def __init__(self, prefill_tokens_per_s: float = 10_000.0, step_overhead_s: float = 0.002,
                 default_request_tokens: int = 1024, request_duration_s: float = 2.0,
                 load_tokens_per_s: Mapping[str, float] | None = None, work_weight: float = 0.0,
                 load_scaled: bool = True, hit_scaled: bool = True, track_steps: bool = False,
                 batch_weight: float = 0.0, batch_window_s: float = 0.01,
                 stall_weight: float = 0.0, pressure_cap: float = 1.0) -> None:
        if prefill_tokens_per_s <= 0 or request_duration_s <= 0:
            raise ValueError("prefill_tokens_per_s and request_duration_s must be positive")
        if work_weight < 0 or step_overhead_s < 0 or default_request_tokens < 0:
            raise ValueError("work_weight, step_overhead_s and default_request_tokens must be >= 0")
        if batch_weight < 0 or batch_window_s < 0 or stall_weight < 0:
            raise ValueError("batch_weight, batch_window_s and stall_weight must be >= 0")
        if pressure_cap <= 0:
            raise ValueError(f"pressure_cap must be positive, got {pressure_cap}")
        self.speed = float(prefill_tokens_per_s)
        self.overhead = float(step_overhead_s)
        self.default_tokens = int(default_request_tokens)
        self.request_duration_s = float(request_duration_s)
        self.load_speed = tier_weights(load_tokens_per_s, DEFAULT_LOAD_SPEED)
        self.work_weight = float(work_weight)
        self.load_scaled = bool(load_scaled)
        self.hit_scaled = bool(hit_scaled)
        self.track_steps = bool(track_steps)
        self.batch_weight = float(batch_weight)
        self.batch_window_s = float(batch_window_s)
        self.stall_weight = float(stall_weight)
        self.pressure_cap = float(pressure_cap)
        self._steps: dict[str, _Steps] = {}

    def _view(self, w: WorkerState, now: float | None, speed: float) -> _Steps | None:
        """The worker's steps as of `now` (a copy); None when none of ours waits for a first token there."""
        s = self._steps.get(w.worker_id)
        pending = w.pending_prefill
        if now is None or s is None or pending == 0:
            return None
        v = _Steps(s.start, s.end, s.inflight, s.queued, s.queued_tokens)  # (dataclasses.replace: 5x slower)
        done = v.inflight + v.queued - pending  # ours that got their first token since
        if done > 0:
            v.inflight -= done
            if v.inflight <= 0:  # the step ended before we predicted: the queued batch runs from now
                v.queued += v.inflight
                v.start, v.end = now, now + self.overhead + v.queued_tokens / speed
                v.inflight, v.queued, v.queued_tokens = v.queued, 0, 0
        if v.end <= now and v.queued:  # the step ended as predicted: the queued batch is in flight
            v.start, v.end = v.end, v.end + self.overhead + v.queued_tokens / speed
            v.inflight, v.queued, v.queued_tokens = v.queued, 0, 0
        return v

    def commit(self, ctx: ScoringContext, chosen: WorkerState) -> None:
        now = ctx.request.now
        if not self.track_steps or now is None:
            return
        column = ctx.details.get("ttft.uncached")
        if column is None:
            return
        i = next(j for j, w in enumerate(ctx.workers) if w is chosen)
        speed = chosen.prefill_tokens_per_s or self.speed
        uncached = column[i]
        v = self._view(chosen, now, speed)
        if v is None or (v.inflight <= 0 and not v.queued):
            # A new step: at once on an idle engine; after its decode step on a busy one, and
            # whatever arrives meanwhile joins it.
            start = now + (self.batch_window_s if chosen.running else 0.0)
            v = _Steps(start, start + self.overhead + uncached / speed)
        elif v.inflight > 0 and now < v.start:
            v.end += uncached / speed
            v.inflight += 1
        else:
            v.queued += 1
            v.queued_tokens += int(uncached)
        self._steps[chosen.worker_id] = v

    def predict(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[tuple[float, ...]]:
        """Per worker: (cost, ttft, queue_s, admit_s, prefill_s, load_s, uncached tokens);
        cost = ttft + work charge + batch charge + stall charge."""
        r = ctx.request
        bs = r.block_size
        prompt = r.prompt_tokens
        request_blocks = -(-prompt // bs)
        overhead, default_tokens, load_speed = self.overhead, self.default_tokens, self.load_speed
        stall_weight = self.stall_weight
        # (The WorkerState properties are inlined: this loop runs for every worker on every request.)
        # (Conditional expressions, not max(): a builtin call per term was a fifth of the decision.)
        waiting = [a if a > b else b for a, b in ((w.reported_waiting, w.pending_prefill) for w in workers)]
        # The work charge: recomputing what another worker holds costs the cluster prefill time that
        # later requests wait behind, and duplicates the prefix in a second cache (evicting others').
        # Scaled by the mean queue length (0: nothing waits, nothing is delayed; each request waiting
        # is delayed by it, up to `pressure_cap` of them) and by the share of the prompt cached
        # somewhere (little reusable: the work is mostly unavoidable anyway).
        work_weight = self.work_weight
        if self.load_scaled:
            work_weight *= min(self.pressure_cap, sum(waiting) / len(workers))
        if self.hit_scaled:
            best = max(m.blocks for m in ctx.matches()) * bs
            work_weight *= min(1.0, best / prompt) if prompt else 0.0
        out = []
        now = r.now if self.track_steps else None
        for w, m, queued in zip(workers, ctx.matches(), waiting):
            speed = w.prefill_tokens_per_s or self.speed
            # Queue: prompts ahead of us. Ours are known exactly; the report only counts requests,
            # sized like our own pending ones (or a default when we have none there).
            pending, pending_tokens = w.pending_prefill, w.pending_prefill_tokens
            reported_waiting = w.reported_waiting
            avg = pending_tokens / pending if pending else default_tokens
            ahead = reported_waiting * avg
            if pending_tokens > ahead:
                ahead = pending_tokens
            batch = queued
            if now is not None:
                v = self._view(w, now, speed)
                reported_s = reported_waiting * avg / speed
                if v is None:
                    queue_s, batch = reported_s, reported_waiting
                elif v.inflight > 0 and now < v.start:  # joins the step about to start
                    queue_s = max(v.end - now - overhead, reported_s)
                    batch = max(v.inflight, w.reported_waiting)
                else:
                    residual = max(0.0, v.end - now) if v.inflight > 0 else 0.0
                    batch = max(v.queued, w.reported_waiting)
                    queue_s = residual + max(v.queued_tokens / speed, reported_s)
            else:
                queue_s = ahead / speed + queued * overhead
            # Admission: the engine takes us (and those ahead) only with a free sequence slot and free
            # KV blocks; short of either, running requests must finish first. k of R running requests
            # end, on average, k / (R + 1) of a request's duration from now.
            inflight, reported_running = w.inflight, w.reported_running
            running = inflight - pending
            if reported_running > running:
                running = reported_running
            busy = reported_running + reported_waiting
            deficit = (inflight if inflight > busy else busy) + 1 - w.max_num_seqs
            total = w.kv_blocks_total
            if total:
                used = int(w.kv_cache_usage * total)
                if w.active_blocks > used:
                    used = w.active_blocks
                need = request_blocks + ahead / bs
                if need > total - used:
                    per_request = used / running if running else need
                    short = (need - total + used) / (per_request if per_request > 1.0 else 1.0)
                    if short > deficit:
                        deficit = short
            admit_s = 0.0
            if deficit > 0:
                admit_s = deficit * (w.mean_request_s or self.request_duration_s) / (running + 1)
            # Prefill: the uncached tokens (vLLM recomputes at least the last one).
            uncached = prompt - m.blocks * bs
            if uncached < 1:
                uncached = 1 if prompt else 0
            prefill_s = overhead + uncached / speed
            load_s = 0.0
            if m.blocks != m.by_tier[0]:
                t = m.by_tier
                load_s = sum(t[i] * bs / load_speed[i] for i in (1, 2, 3) if t[i])
            ttft = queue_s + admit_s + prefill_s + load_s
            cost = ttft + work_weight * prefill_s
            if self.batch_weight and batch:
                cost += self.batch_weight * batch * prefill_s  # delays those it is batched with
            if stall_weight and running:
                # The decodes running there skip their steps while this prefill runs: a long
                # prompt on a busy worker costs every one of them its prefill time in latency.
                cost += stall_weight * running * prefill_s
            out.append((cost, ttft, queue_s, admit_s, prefill_s, load_s, float(uncached)))
        return out

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        pred = self.predict(ctx, workers)
        cost = [p[0] for p in pred]
        keys = ("cost_s", "predicted_s", "queue_s", "admit_s", "prefill_s", "load_s", "uncached")
        for i, key in enumerate(keys):
            ctx.details[f"ttft.{key}"] = [p[i] for p in pred]
        best = min(cost)
        return [best / c if c > 0 else 1.0 for c in cost]
