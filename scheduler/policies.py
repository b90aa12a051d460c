"""The routing policies by name: ours and the peers we measure against.

Profile-based (scheduler/profiles/*.yaml): `ours` (default.yaml), `random`,
`round-robin`, `least-loaded`, `llm-d`, `dynamo`. Rule-based (below, because
their rules are not a weighted sum): `sglang`, `mooncake`.

Each call of `policy_by_name` returns a fresh policy with its own state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from scheduler.filters import DEFAULT_FILTERS, FILTERS
from scheduler.framework import (
    Decision, Filter, Policy, RequestView, WorkerState, minmax_lower_better, start_decision, store_continuations, with_store,
)
from scheduler.index import NUM_TIERS, BlockIndex, PrefixMatch
from scheduler.profile import PROFILES_DIR, load_profile

DEFAULT_POLICY = "ours"


def _default_filters() -> list[Filter]:
    return [FILTERS[name]() for name in DEFAULT_FILTERS]


class SGLangCacheAware:
    """SGLang router's `cache_aware` policy (sgl-router src/policies/cache_aware.rs).

    Per request, over the eligible workers, with load = requests this router
    has in flight on the worker:
    1. imbalanced = (max_load - min_load) > balance_abs_threshold
                    and max_load > min_load * balance_rel_threshold
       → the least-loaded worker (shortest queue).
    2. else: the worker with the longest prefix match in the router's
       *approximate tree* (what it routed, not KV events); if
       matched / prompt > cache_threshold → that worker,
       else → the worker with the smallest tree (fewest blocks routed to it).
    The request's prefix is then inserted into the chosen worker's tree (in both
    branches). The router knows nothing of a KV store (its tree is what it routed;
    SGLang's HiCache storage tier is the engine's business), so a store changes only
    what Explain shows (Decision.usable), never the choice. Our reading: the tree holds block hashes instead of characters,
    so the match rate is matched blocks / prompt blocks; the tree is a
    BlockIndex bounded by `max_tree_blocks` (SGLang evicts LRU leaves per
    tenant above max_tree_size on a timer); `source: index` uses the shared
    KV-event index instead of the approximate tree. Ties: match → lower
    load, then worker order; least-loaded and smallest-tree → worker order.
    """

    name = "sglang"

    def __init__(self, cache_threshold: float = 0.3, balance_abs_threshold: int = 64,
                 balance_rel_threshold: float = 1.5, max_tree_blocks: int = 1 << 21, source: str = "approx",
                 filters: Sequence[Filter] | None = None) -> None:
        if source not in ("approx", "index"):
            raise ValueError(f"source must be approx or index, got {source!r}")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.source = source
        self.tree = BlockIndex(max_blocks=max_tree_blocks)
        self.filters = list(filters) if filters is not None else _default_filters()

    def decide(self, request: RequestView, workers: list[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> Decision:
        eligible, d = start_decision(self.name, self.filters, request, workers)
        if not eligible:
            return d
        self._forget_gone(workers)
        loads = [w.inflight for w in eligible]
        hi, lo = max(loads), min(loads)
        n = len(request.block_hashes)
        tree = index if self.source == "index" else self.tree
        matched = tree.match_prefix(request.model, request.block_hashes) if n else {}
        blocks = [matched[w.worker_id].blocks if w.worker_id in matched else 0 for w in eligible]
        rates = [b / n if n else 0.0 for b in blocks]
        sizes = [float(tree.blocks_of(w.worker_id)) for w in eligible]
        d.details = {"sglang.load": [float(x) for x in loads], "sglang.match_rate": rates,
                     "sglang.tree_blocks": sizes}
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            i, branch, scores = loads.index(lo), "shortest-queue", minmax_lower_better(loads)
        else:
            best = max(range(len(eligible)), key=lambda j: (rates[j], -loads[j], -j))
            if rates[best] > self.cache_threshold:
                i, branch, scores = best, "cache-hit", rates
            else:
                i = sizes.index(min(sizes))
                branch, scores = "smallest-tree", minmax_lower_better(sizes)
        d.totals = scores
        d.components = {f"sglang.{branch}": scores}  # the branch the rule took
        d.worker_id = eligible[i].worker_id
        d.prefix = index.match_prefix(request.model, request.block_hashes) if n else {}
        empty = _empty_match()
        own = {w.worker_id: d.prefix.get(w.worker_id, empty) for w in eligible} if n else {}
        store = store_continuations(index, request, (m.blocks for m in own.values()),
                                    {w.worker_id for w in workers})
        d.usable = {wid: with_store(m, store.get(m.blocks, 0)) for wid, m in own.items()}
        held = d.prefix.get(d.worker_id)
        d.cached_tokens = min(request.prompt_tokens, (held.by_tier[0] if held else 0) * request.block_size)
        d.prefill_tokens = max(0, request.prompt_tokens - (held.blocks if held else 0) * request.block_size)
        if not dry_run:
            if n and self.source == "approx":
                self.tree.stored(d.worker_id, request.model, request.block_hashes)
        return d

    def _forget_gone(self, workers: list[WorkerState]) -> None:
        ids = {w.worker_id for w in workers}
        for wid in self.tree.workers():
            if wid not in ids:
                self.tree.drop_worker(wid)


class MooncakeConductor:
    """Mooncake's conductor choosing the prefill instance (FAST'25 paper, Algorithm 1).

    For each eligible worker: prefix_len = its leading cached blocks (any tier:
    Mooncake counts its instance's whole cache pool);
        if kvcache_balancing_threshold is set and best_len > threshold * prefix_len:
            prefix_len = best_len; T_transfer = (best_len - own) tokens / transfer_tokens_per_s
        else T_transfer = 0
        T_queue   = prefill time of the prompts queued there (our tokens, or
                    reported waiting × the mean size of ours / default_request_tokens)
        T_prefill = step_overhead_s + (prompt - prefix_len × block_size) / speed
        TTFT = T_transfer + T_queue + T_prefill
    pick the minimum (first on ties). With `ttft_slo_s` set, a request whose best
    TTFT exceeds it is rejected early: Decision.worker_id is None with the reason.
    `kvcache_balancing_threshold: null` (default) is the paper's *local*
    cache-aware variant: llm-mesh workers can't yet pull KV blocks from a peer,
    so the global variant's transfer isn't executable here; TBT-based
    rejection needs a decode pool (P/D, a later issue) and is not modelled.
    With a KV store in the mesh (Mooncake Store is the paper's shared pool): a
    worker's prefix_len extends over the store's blocks that continue its own
    run, and T_transfer counts them at transfer_tokens_per_s (every worker can
    pull from the store, so the threshold does not gate it). No store: as above.
    """

    name = "mooncake"

    def __init__(self, ttft_slo_s: float | None = None, kvcache_balancing_threshold: float | None = None,
                 transfer_tokens_per_s: float = 50_000.0, prefill_tokens_per_s: float = 10_000.0,
                 step_overhead_s: float = 0.002, default_request_tokens: int = 1024,
                 filters: Sequence[Filter] | None = None) -> None:
        if transfer_tokens_per_s <= 0 or prefill_tokens_per_s <= 0:
            raise ValueError("transfer_tokens_per_s and prefill_tokens_per_s must be positive")
        if step_overhead_s < 0 or default_request_tokens < 0:
            raise ValueError("step_overhead_s and default_request_tokens must be >= 0")
        if ttft_slo_s is not None and ttft_slo_s <= 0:
            raise ValueError(f"ttft_slo_s must be positive (or null: no rejection), got {ttft_slo_s}")
        self.ttft_slo_s = ttft_slo_s
        self.threshold = kvcache_balancing_threshold
        self.transfer_speed = transfer_tokens_per_s
        self.speed = prefill_tokens_per_s
        self.overhead = step_overhead_s
        self.default_tokens = default_request_tokens
        self.filters = list(filters) if filters is not None else _default_filters()
        self._seq = 0

    def decide(self, request: RequestView, workers: list[WorkerState], index: BlockIndex, *,
               dry_run: bool = False) -> Decision:
        eligible, d = start_decision(self.name, self.filters, request, workers)
        if not eligible:
            return d
        bs = request.block_size
        raw = index.match_prefix(request.model, request.block_hashes) if request.block_hashes else {}
        own = [raw[w.worker_id].blocks if w.worker_id in raw and w.block_size == bs else 0 for w in eligible]
        store = store_continuations(index, request, own, {w.worker_id for w in workers}) if raw else {}
        best_len = max(own)
        cols: dict[str, list[float]] = {k: [] for k in ("transfer_s", "queue_s", "prefill_s", "predicted_s")}
        for w, mine in zip(eligible, own):
            speed = w.prefill_tokens_per_s or self.speed
            transfer_s, prefix = 0.0, mine
            if self.threshold is not None and best_len > self.threshold * mine:
                prefix, transfer_s = best_len, (best_len - mine) * bs / self.transfer_speed
            extra = store.get(mine, 0) if prefix == mine else 0  # the store's blocks after its own run
            if extra:
                transfer_s += extra * bs / self.transfer_speed
                prefix += extra
            avg = w.pending_prefill_tokens / w.pending_prefill if w.pending_prefill else self.default_tokens
            ahead_tokens = max(w.pending_prefill_tokens, w.reported_waiting * avg)
            queue_s = ahead_tokens / speed + w.waiting * self.overhead
            prefill_s = self.overhead + max(0, request.prompt_tokens - prefix * bs) / speed
            for k, v in zip(cols, (transfer_s, queue_s, prefill_s, transfer_s + queue_s + prefill_s)):
                cols[k].append(v)
        ttft = cols["predicted_s"]
        d.details = {f"mooncake.{k}": v for k, v in cols.items()}
        best = min(ttft)
        d.totals = [best / t if t > 0 else 1.0 for t in ttft]
        d.components = {"mooncake.ttft": d.totals}
        d.prefix = raw
        empty = _empty_match()
        d.usable = {w.worker_id: with_store(raw.get(w.worker_id, empty), store.get(mine, 0))
                    if w.block_size == bs else empty for w, mine in zip(eligible, own)} if raw else {}
        if self.ttft_slo_s is not None and best > self.ttft_slo_s:
            d.reason = f"rejected: predicted TTFT {best:.3f}s > SLO {self.ttft_slo_s:.3f}s"
            return d
        i = ttft.index(best)
        chosen = eligible[i]
        d.worker_id = chosen.worker_id
        held = raw.get(chosen.worker_id)
        d.cached_tokens = min(request.prompt_tokens, (held.by_tier[0] if held else 0) * bs)
        d.prefill_tokens = max(0, request.prompt_tokens - (own[i] + store.get(own[i], 0)) * bs)
        if not dry_run:
            self._seq += 1
            chosen.last_picked = self._seq
        return d


def _empty_match() -> PrefixMatch:
    return PrefixMatch(0, [0] * NUM_TIERS)


_PROFILE_POLICIES = {"ours": "default", "random": "random", "round-robin": "round-robin",
                     "least-loaded": "least-loaded", "llm-d": "llm-d", "dynamo": "dynamo"}
# Rule-based peers; a profile names one with `rule:` (scheduler/profile.py).
RULE_POLICIES: dict[str, Callable[..., Policy]] = {"sglang": SGLangCacheAware, "mooncake": MooncakeConductor}
POLICY_NAMES = tuple(_PROFILE_POLICIES) + tuple(RULE_POLICIES)


def policy_spec(name: str) -> dict[str, Any]:
    """A named policy as a profile mapping, from which load_profile builds the same policy: the
    shipped YAML, or `rule:` with the rule's constructor defaults as its params. (The live bench
    rescales its times: services/bench/live.py.)"""
    if name in _PROFILE_POLICIES:
        spec = yaml.safe_load((PROFILES_DIR / f"{_PROFILE_POLICIES[name]}.yaml").read_text())
        return {**spec, "name": name}
    if name in RULE_POLICIES:
        signature = inspect.signature(RULE_POLICIES[name])
        params = {k: p.default for k, p in signature.parameters.items()
                  if k != "filters" and p.default is not inspect.Parameter.empty}
        return {"name": name, "rule": name, "params": params}
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")


def policy_by_name(name: str, seed: int | None = None) -> Policy:
    """A fresh policy: ours, random, round-robin, least-loaded, llm-d, dynamo, sglang, mooncake.

    `seed` makes the random choices (random picker, random tie-breaks, softmax) reproducible.
    """
    if name in _PROFILE_POLICIES:
        policy = load_profile(_PROFILE_POLICIES[name])
        policy.name = name
        rng = getattr(policy.picker, "rng", None)
        if rng is not None and seed is not None:
            rng.seed(seed)
        return policy
    if name in RULE_POLICIES:
        return RULE_POLICIES[name]()
    raise ValueError(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES)}")
