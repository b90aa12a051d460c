"""Prefill/decode disaggregation: per request, prefill on the decode worker or on a prefill worker.

The rule (decode first, as llm-d's pd-profile-handler):
1. The decode worker is chosen by the routing policy (any `Policy`: a profile's filters →
   scorers → picker, or a rule-based one) among the non-prefill workers, KV-aware as always.
   No decode worker (or a rejection) → rule "unrouted", with the policy's reason.
2. uncached = the prompt tokens the chosen decode worker would have to compute
   (`Decision.prefill_tokens`: prompt − its usable leading blocks, any tier). Remote only when
   uncached >= `remote_prefill_min_tokens`; else local.
3. The prefill pool = the routable prefill-role workers serving the model. None → local.
   Only a decode-role worker pulls KV (an aggregated one runs no KV connector): an aggregated
   (Role.BOTH) decode choice prefills locally, rule "aggregated-decode-worker".
   Overloaded when even its least-queued worker has more than `max_prefill_queue` requests
   waiting for prefill (`WorkerState.waiting`) → local: waiting behind a backed-up pool costs
   more TTFT than the decode stall it saves.
4. Else remote: the prefill worker is chosen by the prefill policy (by default a TTFT profile:
   its own prefix hits and its queue) among the prefill-role workers only.

Invariants:
- a prefill-role worker is never the decode worker; the prefill worker is always prefill-role;
- with no prefill-role worker the decode policy is called exactly once, with the same
  request and the same workers in the same order as without disaggregation, so aggregated
  and decode-only clusters route exactly as before;
- `prefill` is set iff `remote`; the prefill policy is only consulted (and only commits) when
  the request does go remote;
- `rule` is one of RULES (a label for metrics); `reason` says the same with the numbers.

Why remote_prefill_min_tokens defaults to 64 (llm-d's sample config uses 16): a local prefill
of n uncached tokens stalls every running decode on that worker for step_overhead + n / speed
(vLLM without chunked prefill; sim defaults 2 ms + n × 0.1 ms), while a remote prefill adds to
this request's TTFT at least one decode step (8 ms: the decode side recomputes the last prompt
token), the pull's fixed latency and the prefill pool's own step. The two meet near
(itl − step_overhead) / per-token = 60 tokens: from 64 (two 32-token blocks) up, the local
stall on everybody else's next token exceeds a whole decode step. A larger threshold lets the
frequent short prefills set the decode ITL tail: in the discrete-event simulator (8 workers,
10 req/s, 10% 8k-token prompts, others 128 tokens, policy `ours`) 256 left the pooled ITL p99
of a 2P+6D cluster at aggregated's 24 ms, 64 brought it to 9 ms (README.md, "Prefill/decode
disaggregation"). `max_prefill_queue` defaults to 8: eight prompts ahead on the
least-queued prefill worker is already >= 8 prefill steps of waiting, and for the long prompts
P/D is for, seconds; prefilling locally then costs this request less than the queue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from scheduler.framework import Decision, Policy, RequestView, Role, WorkerState
from scheduler.index import BlockIndex

# The shipped choice of prefill worker: the TTFT cost model (queue wait + prefill of the tokens
# that worker doesn't hold), among prefill-role workers only.
DEFAULT_PREFILL_PROFILE: Mapping[str, Any] = {
    "name": "prefill",
    "filters": ["model", "routable", {"name": "role", "params": {"allowed": ["prefill"]}}],
    "scorers": [{"name": "ttft", "weight": 1.0}],
    "picker": {"name": "max-score", "params": {"tie_break": "lru"}},
    "speculative": {"ttl_s": 20},
}

RULES = ("remote", "below-threshold", "aggregated-decode-worker", "no-prefill-worker",
         "prefill-pool-overloaded", "unrouted")


@dataclasses.dataclass(frozen=True)
class DisaggConfig:
    """The `disaggregation:` section of a profile (keys in scheduler/scorers/README.md#disaggregation)."""

    remote_prefill_min_tokens: int = 64
    max_prefill_queue: int = 8
    prefill_profile: str | Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: DEFAULT_PREFILL_PROFILE)

    def __post_init__(self) -> None:
        for key in ("remote_prefill_min_tokens", "max_prefill_queue"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        if not isinstance(self.prefill_profile, (str, Mapping)):
            raise ValueError(f"prefill_profile is a profile name, file or mapping, "
                             f"got {self.prefill_profile!r}")


@dataclasses.dataclass(frozen=True)
class DisaggDecision:
    """Where one request prefills and decodes, and why."""

    decode: Decision
    prefill: Decision | None  # the prefill worker's decision; set iff remote
    rule: str  # one of RULES
    reason: str  # human-readable, with the numbers: "remote: 1800 uncached tokens >= 64, prefill on p00"
    uncached_tokens: int = 0  # at the decode worker

    @property
    def remote(self) -> bool:
        return self.prefill is not None

    @property
    def decode_worker(self) -> str | None:
        return self.decode.worker_id

    @property
    def prefill_worker(self) -> str | None:
        """Who computes the prompt: the prefill worker if remote, else the decode worker."""
        return self.prefill.worker_id if self.prefill is not None else self.decode.worker_id

    @property
    def decode_prefill_tokens(self) -> int:
        """Prompt tokens the decode worker computes (for its Ticket): none when prefilled remotely."""
        return 0 if self.remote else self.decode.prefill_tokens


class Disaggregator:
    """Applies the rule above on top of a routing policy (the decode choice)."""

    def __init__(self, decode_policy: Policy, config: DisaggConfig | None = None,
                 prefill_policy: Policy | None = None) -> None:
        self.decode_policy = decode_policy
        self.config = config or getattr(decode_policy, "disagg", None) or DisaggConfig()
        if prefill_policy is None:
            from scheduler.profile import load_profile  # profile.py imports this module

            prefill_policy = load_profile(self.config.prefill_profile)
        self.prefill_policy = prefill_policy

    def decide(self, request: RequestView, workers: Sequence[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> DisaggDecision:
        decode_candidates = [w for w in workers if w.role != Role.PREFILL]
        prefill_candidates = [w for w in workers if w.role == Role.PREFILL]
        decode = self.decode_policy.decide(request, decode_candidates, index, dry_run=dry_run)
        if decode.worker_id is None:
            return DisaggDecision(decode, None, "unrouted", f"unrouted: {decode.reason}")
        uncached, cfg = decode.prefill_tokens, self.config
        if uncached < cfg.remote_prefill_min_tokens:
            why = f"local: {uncached} uncached tokens < {cfg.remote_prefill_min_tokens}"
            return DisaggDecision(decode, None, "below-threshold", why, uncached)
        pool = [w for w in prefill_candidates if w.unavailable_reason(request) is None and w.model == request.model]
        if not pool:
            return DisaggDecision(decode, None, "no-prefill-worker", "local: no prefill worker", uncached)
        chosen = next((w for w in decode_candidates if w.worker_id == decode.worker_id), None)
        if chosen is not None and chosen.role != Role.DECODE:
            return DisaggDecision(decode, None, "aggregated-decode-worker",
                                  f"local: {decode.worker_id} is an aggregated worker", uncached)
        queue = min(w.waiting for w in pool)
        if queue > cfg.max_prefill_queue:
            return DisaggDecision(decode, None, "prefill-pool-overloaded",
                                  f"local: prefill pool queue {queue} > {cfg.max_prefill_queue}", uncached)
        prefill = self.prefill_policy.decide(request, prefill_candidates, index, dry_run=dry_run)
        if prefill.worker_id is None:
            return DisaggDecision(decode, None, "no-prefill-worker",
                                  f"local: no eligible prefill worker ({prefill.reason})", uncached)
        return DisaggDecision(decode, prefill, "remote",
                              f"remote: {uncached} uncached tokens >= {cfg.remote_prefill_min_tokens}, "
                              f"prefill on {prefill.worker_id}", uncached)
