"""The scheduling framework: filters → weighted scorers → picker (llm-d's plugin model).

A `Policy` turns (request, workers, index) into a `Decision`. `ProfilePolicy`
is the generic one: each filter may reject a worker (with a reason), each
scorer gives every remaining worker a score in [0, 1] (higher is better), the
total is the weighted sum, and the picker chooses. Profiles wire it from YAML
(scheduler.profile); rule-based peers (scheduler.policies) implement `Policy`
directly.

Who updates what:
- The **service** owns `WorkerState`: it fills membership and GetLoad fields
  and does the request bookkeeping through `WorkerState.start()` → `Ticket`
  (`first_token`, `finish`). It must call `start()` right after `decide()`
  returned the worker, with no `await` in between, so the next decision sees
  the request (both run on one event loop).
- The **policy** owns its own state (round-robin cursor, session table,
  speculative prefixes, pick sequence) and, when a decision is committed
  (`dry_run=False`), sets the chosen worker's `last_picked`. `Explain` passes
  `dry_run=True`: nothing changes anywhere, except that the index counts the
  looked-up blocks as recently used.
- The **index** is fed by KV events only (and touched by lookups).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from scheduler.index import BlockIndex, PrefixMatch, Tier
from scheduler.resilience import Circuit

if TYPE_CHECKING:
    from scheduler.disagg import DisaggConfig

# ---- state the services fill -------------------------------------------------------------


class Role(enum.IntEnum):
    """A worker's role; same numbers as llm_mesh.v1.WorkerRole."""

    UNSPECIFIED = 0
    PREFILL = 1
    DECODE = 2
    BOTH = 3


@dataclasses.dataclass
class WorkerState:
    """What routing knows about one worker, as one scheduler replica sees it.

    Membership fields come from etcd; `reported_*` / `kv_cache_usage` from the
    worker's last GetLoad poll (`report()`: they include other replicas' requests
    but may be a poll interval old); `inflight`, `pending_*` and `active_blocks`
    are this replica's own requests (exact and instant), kept by `start()`/`Ticket`.
    Routing takes the max of the two views so it neither double counts its own
    requests nor ignores the other replicas'. Between polls the report is kept
    current for what this replica sees: a request of ours that the report may
    count (dispatched before it was asked for) moves from `reported_waiting` to
    `reported_running` at its first token and leaves `reported_running` when it
    ends. (Without that, a 1 s old report keeps a request "waiting" up to 1 s
    after its prefill ended, and the TTFT model queues later ones behind it.)
    """

    worker_id: str
    model: str
    max_num_seqs: int
    role: Role = Role.BOTH
    block_size: int = 16
    kv_blocks_total: int = 0
    routable: bool = True
    # This replica's requests on the worker.
    inflight: int = 0
    pending_prefill: int = 0  # dispatched, first token not seen yet
    pending_prefill_tokens: int = 0  # their predicted uncached prompt tokens
    active_blocks: int = 0  # KV blocks their prompts occupy (estimate)
    # The worker's report.
    reported_running: int = 0
    reported_waiting: int = 0
    kv_cache_usage: float = 0.0
    dispatched: int = 0  # this replica's requests ever sent here (each Ticket's `seq`)
    report_seq: int = 0  # `dispatched` when the last report was asked for: tickets up to it may be in it
    # Measured prefill speed (uncached tokens/s), EWMA of unqueued requests; None until measured.
    prefill_tokens_per_s: float | None = None
    # Measured mean request duration (dispatch → last token), EWMA; None until measured.
    mean_request_s: float | None = None
    last_picked: int = 0  # pick sequence number of the policy that last chose it; 0 = never
    # Failover (scheduler/resilience.py): opened when a request failed here before its first token.
    circuit: Circuit = dataclasses.field(default_factory=Circuit)

    def unavailable_reason(self, request: RequestView) -> str | None:
        """Why this worker must not take `request` now (the `routable` filter), or None:
        draining, already failed this request (failover), or its circuit is open.
        (filters.RoutableFilter.admit makes the same test for a list of workers.)"""
        if not self.routable:
            return "not routable"
        if self.worker_id in request.exclude:
            return "failed this request"
        if request.now is not None and not self.circuit.allows(request.now):
            return f"circuit open ({self.circuit.last_error or 'failed'})"
        return None

    @property
    def busy(self) -> int:
        """Requests on the worker (running + waiting)."""
        return max(self.inflight, self.reported_running + self.reported_waiting)

    @property
    def load(self) -> float:
        """busy / max_num_seqs (may exceed 1 when requests queue)."""
        return self.busy / max(1, self.max_num_seqs)

    @property
    def waiting(self) -> int:
        """Requests queued for prefill."""
        return max(self.reported_waiting, self.pending_prefill)

    @property
    def running(self) -> int:
        """Requests being generated."""
        return max(self.reported_running, self.inflight - self.pending_prefill)

    @property
    def used_kv_blocks(self) -> int:
        """KV blocks held by running requests: the report, or our own estimate if larger."""
        return max(self.active_blocks, int(self.kv_cache_usage * self.kv_blocks_total))

    def report(self, running: int, waiting: int, kv_cache_usage: float, *, as_of: int | None = None) -> None:
        """Take the worker's load report. `as_of`: `dispatched` when the report was asked for
        (default: now); our requests dispatched by then may be counted in it."""
        self.reported_running, self.reported_waiting, self.kv_cache_usage = running, waiting, kv_cache_usage
        self.report_seq = self.dispatched if as_of is None else as_of

    def start(self, prefill_tokens: int, kv_blocks: int) -> Ticket:
        """Record a request dispatched here (use `Decision.prefill_tokens` / `.request_blocks`)."""
        self.dispatched += 1
        ticket = Ticket(self, prefill_tokens, kv_blocks, queued_ahead=self.waiting, seq=self.dispatched)
        self.inflight += 1
        self.pending_prefill += 1
        self.pending_prefill_tokens += prefill_tokens
        self.active_blocks += kv_blocks
        return ticket


@dataclasses.dataclass
class Ticket:
    """One dispatched request's bookkeeping; `finish()` undoes whatever is left, once."""

    state: WorkerState
    prefill_tokens: int
    kv_blocks: int
    queued_ahead: int
    seq: int = 0  # WorkerState.dispatched when it was sent
    prefilled: bool = False
    finished: bool = False

    # Below this many uncached tokens the fixed per-request cost dominates: no speed sample.
    MIN_SAMPLE_TOKENS = 64
    EWMA = 0.2

    def first_token(self, ttft_s: float | None = None) -> None:
        """The first token arrived; `ttft_s` (dispatch → first token) feeds the speed estimate."""
        if self.prefilled or self.finished:
            return
        self.prefilled = True
        s = self.state
        s.pending_prefill -= 1
        s.pending_prefill_tokens -= self.prefill_tokens
        if self.seq <= s.report_seq and s.reported_waiting > 0:  # the report may count it waiting
            s.reported_waiting -= 1
            s.reported_running += 1
        # Only a request that queued behind nothing measures the worker's speed.
        if ttft_s and ttft_s > 0 and self.queued_ahead == 0 and self.prefill_tokens >= self.MIN_SAMPLE_TOKENS:
            speed = self.prefill_tokens / ttft_s
            old = s.prefill_tokens_per_s
            s.prefill_tokens_per_s = speed if old is None else (1 - self.EWMA) * old + self.EWMA * speed

    def finish(self, elapsed_s: float | None = None, completed: bool = True) -> None:
        """The request ended (any way). Idempotent. `elapsed_s` (dispatch → end) of a request that
        completed normally feeds the mean request duration."""
        if self.finished:
            return
        if not self.prefilled:
            self.first_token()
        self.finished = True
        s = self.state
        s.inflight -= 1
        if self.seq <= s.report_seq and s.reported_running > 0:  # the report may count it running
            s.reported_running -= 1
        s.active_blocks -= self.kv_blocks
        if completed and elapsed_s and elapsed_s > 0:
            old = s.mean_request_s
            s.mean_request_s = elapsed_s if old is None else (1 - self.EWMA) * old + self.EWMA * elapsed_s


# ---- the request ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequestView:
    """What routing knows about one request (tokenized and hashed by the service)."""

    model: str
    prompt_tokens: int
    block_hashes: Sequence[int]  # external_block_hash of each full block, in order
    block_size: int
    session_id: str = ""
    request_id: str = ""
    max_tokens: int = 0
    # Seconds on a monotonic clock (service: time.monotonic(); simulator: sim time). Only
    # time-based policy state (speculative prefixes' TTL) uses it; None = no clock.
    now: float | None = None
    roles: frozenset[Role] | None = None  # override the role filter's allowed roles
    exclude: frozenset[str] = frozenset()  # worker ids that already failed this request (failover)

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)

    @classmethod
    def from_tokens(cls, model: str, token_ids: Sequence[int], block_size: int, seed: str | None = None,
                    **kwargs: object) -> RequestView:
        """Hash `token_ids` exactly as vLLM does (scheduler.block_hash) and build the view."""
        from scheduler.block_hash import DEFAULT_SEED, external_block_hash, hasher_for

        hasher = hasher_for(block_size, seed or DEFAULT_SEED)
        hashes = [external_block_hash(h) for h in hasher.hash_blocks(token_ids)]
        return cls(model=model, prompt_tokens=len(token_ids), block_hashes=hashes, block_size=block_size,
                   **kwargs)  # type: ignore[arg-type]


# ---- the decision --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkerScore:
    """One worker's line in Explain (protos/llm_mesh/v1/scheduler.proto WorkerScore)."""

    worker_id: str
    score: float
    components: dict[str, float]
    filtered_reason: str = ""
    # The prompt's leading blocks usable here, by tier (its own run, then the KV store's
    # continuation); empty for filtered workers (proto: WorkerScore.prefix_blocks).
    prefix_by_tier: tuple[int, ...] = ()


@dataclasses.dataclass
class Decision:
    """What a policy decided and why.

    Columns are aligned with `eligible` (the workers that passed the filters).
    `components[name][i]` is scorer `name`'s *weighted* contribution for
    eligible[i] (they sum to `totals[i]`); `details[key][i]` are raw model
    inputs/outputs for Explain (e.g. "ttft.predicted_s"), not part of the sum.
    """

    worker_id: str | None
    policy: str
    eligible: list[str] = dataclasses.field(default_factory=list)
    totals: list[float] = dataclasses.field(default_factory=list)
    components: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    details: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    filtered: dict[str, str] = dataclasses.field(default_factory=dict)  # worker_id -> reason
    reason: str = ""  # why worker_id is None (no eligible worker, SLO reject...)
    prefix: dict[str, PrefixMatch] = dataclasses.field(default_factory=dict)  # index matches, by holder
    # Per eligible worker: the leading blocks it can use (its own run + the KV store's continuation).
    usable: dict[str, PrefixMatch] = dataclasses.field(default_factory=dict)
    prefill_tokens: int = 0  # predicted uncached prompt tokens at the chosen worker
    cached_tokens: int = 0  # prompt tokens the chosen worker holds in its engine tier
    request_blocks: int = 0  # full blocks of the prompt
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)  # per filter/scorer/picker stage

    def worker_scores(self) -> list[WorkerScore]:
        """Every worker's score line: eligible ones first (best first), then the filtered ones."""
        rows = []
        for i, wid in enumerate(self.eligible):
            comps = {name: col[i] for name, col in self.components.items()}
            comps.update({name: col[i] for name, col in self.details.items()})
            m = self.usable.get(wid)
            rows.append(WorkerScore(wid, self.totals[i], comps,
                                    prefix_by_tier=tuple(m.by_tier) if m is not None else (0,) * len(Tier)))
        rows.sort(key=lambda r: -r.score)
        rows += [WorkerScore(wid, 0.0, {}, reason) for wid, reason in self.filtered.items()]
        return rows


# ---- plugin protocols ------------------------------------------------------------------------


class Filter(Protocol):
    name: str

    def reject(self, request: RequestView, worker: WorkerState) -> str | None:
        """Why `worker` can't take `request`, or None when it can."""

    # Optional: `admit(request, workers) -> the workers it accepts, in order`, the same answer
    # as `reject` per worker in one pass. apply_filters uses it when present (a method call per
    # worker per filter was ~15% of a 64-worker decision) and asks `reject` only for the reasons.


class Scorer(Protocol):
    name: str

    def score(self, ctx: ScoringContext, workers: list[WorkerState]) -> list[float]:
        """One score in [0, 1] per worker (higher is better), aligned with `workers`."""


class Picker(Protocol):
    name: str

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        """Index into `workers` of the chosen one (workers is never empty)."""


class Policy(Protocol):
    name: str

    def decide(self, request: RequestView, workers: list[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> Decision:
        """Route one request. `dry_run=True` (Explain) leaves all state as it was."""


class Committing(Protocol):
    """Optional scorer/picker hook: called once the decision is final (not on dry runs)."""

    def commit(self, ctx: ScoringContext, chosen: WorkerState) -> None: ...


# ---- shared per-decision context ---------------------------------------------------------------

# Tier credits for a prefix hit (Dynamo's: host 0.75, disk 0.25); the store's is ours.
DEFAULT_TIER_WEIGHTS = {Tier.ENGINE: 1.0, Tier.HOST: 0.75, Tier.DISK: 0.25, Tier.STORE: 0.5}


def store_continuations(index: BlockIndex, request: RequestView, starts: Iterable[int],
                        exclude: set[str] | frozenset[str] = frozenset()) -> dict[int, int]:
    """For each start (a worker's own run length): how many blocks past it a KV store holds
    consecutively (the longest over stores that are not in `exclude`). An engine loads exactly
    these: vLLM's offloading connector looks up the blocks after its local hit. {} without a store."""
    stores = [h for h in index.holders_in_tier(Tier.STORE) if h not in exclude]
    if not stores or not request.block_hashes:
        return {}
    model, hashes = request.model, request.block_hashes
    return {k: max(index.run_from(s, model, hashes, k) for s in stores) for k in set(starts)}


def with_store(m: PrefixMatch, extra: int) -> PrefixMatch:
    """A worker's match extended by `extra` store blocks right after its own run."""
    if extra <= 0:
        return m
    by = list(m.by_tier)
    by[Tier.STORE] += extra
    return PrefixMatch(m.blocks + extra, by)


class ScoringContext:
    """Per-decision state shared by the plugins: the request, the index matches (looked up once)."""

    def __init__(self, request: RequestView, index: BlockIndex, workers: list[WorkerState], *,
                 dry_run: bool = False, overlay: PrefixOverlay | None = None) -> None:
        self.request = request
        self.index = index
        self.workers = workers
        self.dry_run = dry_run
        self.overlay = overlay
        self.details: dict[str, list[float]] = {}
        self._raw: dict[str, PrefixMatch] | None = None
        self._matches: list[PrefixMatch] | None = None

    @property
    def raw_matches(self) -> dict[str, PrefixMatch]:
        """The index's matches for the request, by holder id (workers, and KV stores)."""
        if self._raw is None:
            r = self.request
            self._raw = self.index.match_prefix(r.model, r.block_hashes) if r.block_hashes else {}
        return self._raw

    def matches(self) -> list[PrefixMatch]:
        """Per worker (aligned with `self.workers`): its usable leading blocks by tier.

        Its own blocks (any tier), extended by the speculative overlay (blocks of
        requests we just routed there whose KV events haven't arrived; counted as
        ENGINE), then by the KV store's blocks that continue that run (STORE tier:
        an engine loads from the store the blocks after its own hit, as vLLM's
        offloading connector does). A worker whose block size differs from the
        request's matches nothing.
        """
        if self._matches is not None:
            return self._matches
        raw = self.raw_matches
        r = self.request
        spec = self.overlay.match(r) if self.overlay is not None else {}
        empty = PrefixMatch(0, [0, 0, 0, 0])
        out = []
        for w in self.workers:
            if w.block_size != r.block_size:
                out.append(empty)
                continue
            m = raw.get(w.worker_id, empty)
            extra_engine = spec.get(w.worker_id, 0) - m.blocks if spec else 0
            if extra_engine > 0:
                by = list(m.by_tier)
                by[Tier.ENGINE] += extra_engine
                m = PrefixMatch(m.blocks + extra_engine, by)
            out.append(m)
        ids = {w.worker_id for w in self.workers}
        store = store_continuations(self.index, r, (m.blocks for m in out), ids)
        if store:
            out = [with_store(m, store[m.blocks]) if w.block_size == r.block_size else m
                   for w, m in zip(self.workers, out)]
        self._matches = out
        return out


class PrefixOverlay(Protocol):
    def match(self, request: RequestView) -> dict[str, int]: ...

    def record(self, request: RequestView, worker_id: str) -> None: ...


def minmax_lower_better(values: Sequence[float]) -> list[float]:
    """(max - v) / (max - min): 1 for the lowest, 0 for the highest; all 1 when equal."""
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


def apply_filters(filters: Sequence[Filter], request: RequestView, workers: list[WorkerState]
                  ) -> tuple[list[WorkerState], dict[str, str]]:
    """(eligible workers, {worker_id: the first failing filter's reason} for the rest)."""
    filtered: dict[str, str] = {}
    eligible = workers
    for f in filters:
        admit = getattr(f, "admit", None)
        if admit is None:
            kept = []
            for w in eligible:
                why = f.reject(request, w)
                if why:
                    filtered[w.worker_id] = why
                else:
                    kept.append(w)
        else:
            kept = admit(request, eligible)
            if len(kept) != len(eligible):
                admitted = {id(w) for w in kept}
                for w in eligible:
                    if id(w) not in admitted:
                        filtered[w.worker_id] = f.reject(request, w) or f"rejected by {f.name}"
        eligible = kept
    return list(eligible), filtered


def start_decision(policy: str, filters: Sequence[Filter], request: RequestView, workers: list[WorkerState]
                   ) -> tuple[list[WorkerState], Decision]:
    """Filter the workers and open the policy's Decision; when none is eligible the
    Decision already says why (callers return it as is)."""
    t0 = time.perf_counter()
    eligible, filtered = apply_filters(filters, request, workers)
    decision = Decision(None, policy, [w.worker_id for w in eligible], filtered=filtered,
                        request_blocks=len(request.block_hashes), timings_s={"filters": time.perf_counter() - t0})
    if not eligible:
        decision.reason = "no eligible worker" if workers else "no workers"
    return eligible, decision


# ---- the generic policy ----------------------------------------------------------------------------


class ProfilePolicy:
    """filters → weighted scorers → picker, as a profile describes (scheduler.profile.load_profile)."""

    def __init__(self, name: str, filters: Sequence[Filter], scorers: Sequence[tuple[Scorer, float]],
                 picker: Picker, overlay: PrefixOverlay | None = None) -> None:
        self.name = name
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.picker = picker
        self.overlay = overlay
        # The profile's `disaggregation:` section (scheduler.disagg.DisaggConfig); None = defaults.
        self.disagg: DisaggConfig | None = None
        self._seq = 0

    def decide(self, request: RequestView, workers: list[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> Decision:
        clock = time.perf_counter
        eligible, decision = start_decision(self.name, self.filters, request, workers)
        if not eligible:
            return decision
        timings = decision.timings_s
        ctx = ScoringContext(request, index, eligible, dry_run=dry_run, overlay=self.overlay)
        totals = [0.0] * len(eligible)
        for scorer, weight in self.scorers:
            t = clock()
            scores = scorer.score(ctx, eligible)
            contrib = [weight * s for s in scores]
            decision.components[scorer.name] = contrib
            totals = [a + b for a, b in zip(totals, contrib)]
            timings[scorer.name] = clock() - t
        t = clock()
        chosen_i = self.picker.pick(ctx, eligible, totals)
        timings["picker"] = clock() - t
        decision.totals = totals
        decision.details = ctx.details
        return self._finish(decision, ctx, eligible, chosen_i)

    def _finish(self, decision: Decision, ctx: ScoringContext, eligible: list[WorkerState], i: int
                ) -> Decision:
        chosen = eligible[i]
        decision.worker_id = chosen.worker_id
        decision.prefix = ctx.raw_matches if ctx.request.block_hashes else {}
        if ctx.request.block_hashes:
            decision.usable = {w.worker_id: m for w, m in zip(eligible, ctx.matches())}
        m = ctx.matches()[i] if ctx.request.block_hashes else None
        decision.cached_tokens = min(ctx.request.prompt_tokens,
                                     (m.by_tier[Tier.ENGINE] if m else 0) * ctx.request.block_size)
        held_tokens = (m.blocks if m else 0) * ctx.request.block_size
        decision.prefill_tokens = max(0, ctx.request.prompt_tokens - held_tokens)
        if not ctx.dry_run:
            self._seq += 1
            chosen.last_picked = self._seq
            for plugin in [s for s, _ in self.scorers] + [self.picker]:
                commit = getattr(plugin, "commit", None)
                if commit is not None:
                    commit(ctx, chosen)
            if self.overlay is not None:
                self.overlay.record(ctx.request, chosen.worker_id)
        decision.timings_s["total"] = sum(decision.timings_s.values())
        return decision
