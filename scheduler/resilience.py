"""Failover before the first token: a per-worker circuit breaker and the retry schedule.

A request whose worker errors, refuses or vanishes before its first token is re-routed to
another worker (the client never sees the failure); the failing worker leaves routing at
once — not only when its etcd lease expires — and comes back after a cool-down.

Circuit (one per worker, in WorkerState):
- CLOSED: routable. A failure opens it (no threshold: a refused or vanished worker fails the
  next request the same way, and a retry costs a client its TTFT).
- OPEN until `opened_at + cooldown`: the `routable` filter rejects the worker ("circuit open").
- after the cool-down it is HALF-OPEN: routable again; the next outcome decides. Success
  closes it and resets the cool-down; failure re-opens it with the cool-down doubled (up to
  `max_cooldown_s`), so a worker that stays broken costs one request per cool-down, not one
  per request.

Invariants: `allows(now)` is False exactly while open; `cooldown_s` stays within
[base, max]; only `failed` / `succeeded` change state (reads never do), so Explain's dry
runs see what routing sees.

RetryPolicy: at most `max_attempts` workers per request (first try included); before
attempt k (k ≥ 1) wait `base_s × 2^(k-1)` scaled by a uniform jitter in [1 − jitter, 1 + jitter]
(spreads a burst of retries off a dead worker), never more than `max_backoff_s`.
"""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass
class Circuit:
    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    cooldown_s: float = 0.0  # the current cool-down; 0 = never opened since the last success
    open_until: float = 0.0  # monotonic time; the circuit is open while now < open_until
    failures: int = 0  # lifetime, for metrics and Explain
    last_error: str = ""

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def state(self, now: float) -> str:
        if not self.allows(now):
            return "open"
        return "half-open" if self.cooldown_s else "closed"

    def failed(self, now: float, error: str = "") -> None:
        self.cooldown_s = (self.base_cooldown_s if not self.cooldown_s
                           else min(self.max_cooldown_s, self.cooldown_s * 2))
        self.open_until = now + self.cooldown_s
        self.failures += 1
        self.last_error = error

    def succeeded(self) -> None:
        self.cooldown_s = 0.0
        self.open_until = 0.0


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_s: float = 0.05
    max_backoff_s: float = 1.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `attempt` (0 = the first try: no wait)."""
        if attempt <= 0:
            return 0.0
        scale = 1.0 + (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.max_backoff_s, self.base_s * 2 ** (attempt - 1) * scale)
