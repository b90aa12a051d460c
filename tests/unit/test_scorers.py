"""Each scorer on hand-built worker states, with the values its formula (scorers/README.md) gives."""

import pytest

from scheduler.framework import RequestView, ScoringContext, WorkerState
from scheduler.index import BlockIndex, Tier
from scheduler.scorers import (
    KVCostScorer, KVUtilizationScorer, LoadScorer, PrefixCacheScorer, QueueScorer, RunningScorer,
    SessionAffinityScorer, TTFTScorer,
)
from scheduler.speculative import SpeculativePrefixes

BS = 16


def ws(*ids: str, max_num_seqs: int = 16, **kw) -> list[WorkerState]:
    return [WorkerState(i, "m", max_num_seqs=max_num_seqs, **kw) for i in ids]


def request(blocks: int, tokens: int | None = None, **kw) -> RequestView:
    n = tokens if tokens is not None else blocks * BS
    return RequestView("m", n, list(range(100, 100 + blocks)), BS, **kw)


def ctx(req: RequestView, workers: list[WorkerState], index: BlockIndex | None = None,
        **kw) -> ScoringContext:
    return ScoringContext(req, index or BlockIndex(), workers, **kw)


def approx(values):
    return pytest.approx(values, abs=1e-9)


def test_prefix_cache_credits_tiers():
    ix = BlockIndex()
    req = request(4)
    ix.stored("full", "m", req.block_hashes)
    ix.stored("mixed", "m", req.block_hashes[:2])
    ix.stored("mixed", "m", req.block_hashes[2:], Tier.HOST)
    ix.stored("disk", "m", req.block_hashes[:2], Tier.DISK)
    workers = ws("full", "mixed", "disk", "cold")
    expected = [1.0, (2 + 1.5) / 4, 0.5 / 4, 0.0]
    assert PrefixCacheScorer().score(ctx(req, workers, ix), workers) == approx(expected)
    custom = PrefixCacheScorer(tier_weights={"host": 0.5, "disk": 0})
    assert custom.score(ctx(req, workers, ix), workers) == approx([1.0, 3 / 4, 0.0, 0.0])


def test_prefix_cache_minmax_is_llm_d_normalization():
    ix = BlockIndex()
    req = request(4)
    ix.stored("a", "m", req.block_hashes)
    ix.stored("b", "m", req.block_hashes[:2])
    ix.stored("c", "m", req.block_hashes[:3])
    workers = ws("a", "b", "c", "cold")
    scorer = PrefixCacheScorer(normalize="minmax", tier_weights={"host": 1})
    assert scorer.score(ctx(req, workers, ix), workers) == approx([1.0, 0.0, 0.5, 0.0])
    only = ws("b", "cold")  # one worker with a hit: it gets 1
    assert scorer.score(ctx(req, only, ix), only) == approx([1.0, 0.0])


def test_prefix_cache_ignores_workers_with_another_block_size():
    ix = BlockIndex()
    req = request(2)
    ix.stored("a", "m", req.block_hashes)
    workers = [WorkerState("a", "m", 16, block_size=32)]
    assert PrefixCacheScorer().score(ctx(req, workers, ix), workers) == [0.0]


def test_queue_is_min_max_over_waiting():
    workers = ws("a", "b", "c")
    workers[0].reported_waiting = 4
    workers[1].reported_waiting, workers[1].pending_prefill = 1, 2  # our own pending count wins: 2
    assert QueueScorer().score(ctx(request(1), workers), workers) == approx([0.0, 0.5, 1.0])
    idle = ws("a", "b")
    assert QueueScorer().score(ctx(request(1), idle), idle) == [1.0, 1.0]


def test_running_is_relative_to_capacity():
    workers = ws("a", "b", "c", max_num_seqs=8)
    workers[0].reported_running = 4
    workers[1].inflight = 10  # ours, all past prefill: 10 > 8 running
    workers[2].inflight, workers[2].pending_prefill = 3, 3  # still prefilling: not running
    assert RunningScorer().score(ctx(request(1), workers), workers) == approx([0.5, 0.0, 1.0])


def test_kv_utilization_uses_the_report_or_our_own_estimate():
    workers = ws("a", "b", "c", kv_blocks_total=1000)
    workers[0].kv_cache_usage = 0.25
    workers[1].kv_cache_usage, workers[1].active_blocks = 0.1, 600
    workers[2].kv_cache_usage = 1.3  # clamped
    assert KVUtilizationScorer().score(ctx(request(1), workers), workers) == approx([0.75, 0.4, 0.0])


def test_load_scorer():
    workers = ws("a", "b", max_num_seqs=4)
    workers[0].reported_running, workers[0].reported_waiting = 3, 1
    assert LoadScorer().score(ctx(request(1), workers), workers) == approx([0.5, 1.0])


def test_session_affinity_remembers_with_bounded_memory():
    scorer = SessionAffinityScorer(max_sessions=2)
    workers = ws("a", "b", "c")
    s1 = request(1, session_id="s1")
    assert scorer.score(ctx(s1, workers), workers) == [0.0, 0.0, 0.0]
    scorer.commit(ctx(s1, workers), workers[1])
    assert scorer.score(ctx(s1, workers), workers) == [0.0, 1.0, 0.0]
    assert scorer.score(ctx(request(1), workers), workers) == [0.0, 0.0, 0.0]  # no session id
    for s, w in (("s2", workers[0]), ("s3", workers[2])):
        scorer.commit(ctx(request(1, session_id=s), workers), w)
    assert scorer.score(ctx(s1, workers), workers) == [0.0, 0.0, 0.0]  # s1 was the least recent: forgotten
    assert scorer.score(ctx(request(1, session_id="s3"), workers), workers) == [0.0, 0.0, 1.0]


def test_session_affinity_hash_mode_is_stable_and_consistent():
    workers = ws(*(f"w{i}" for i in range(8)))
    req = request(1, session_id="user-42")
    a = SessionAffinityScorer(mode="hash").score(ctx(req, workers), workers)
    b = SessionAffinityScorer(mode="hash").score(ctx(req, workers), workers)  # another replica
    assert a == b and sum(a) == 1.0
    target = workers[a.index(1.0)]
    fewer = [w for w in workers if w is target or w.worker_id != "w0" and w.worker_id != "w1"]
    c = SessionAffinityScorer(mode="hash").score(ctx(req, fewer), fewer)
    assert fewer[c.index(1.0)] is target  # other workers leaving doesn't move the session


def test_ttft_model_by_hand():
    ix = BlockIndex()
    req = request(64, tokens=64 * BS + 8)  # 1032 tokens
    ix.stored("warm", "m", req.block_hashes[:32])  # 512 cached
    ix.stored("host", "m", req.block_hashes, Tier.HOST)  # all 1024 in host memory
    workers = ws("cold", "warm", "queued", "host")
    workers[2].pending_prefill, workers[2].pending_prefill_tokens = 2, 3000
    workers[2].prefill_tokens_per_s = 2000.0  # measured: faster than the default
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, load_tokens_per_s={"host": 4096})
    c = ctx(req, workers, ix)
    scores = scorer.score(c, workers)
    expected = [1.032, 0.520, 3000 / 2000 + 1032 / 2000, 8 / 1000 + 1024 / 4096]
    assert c.details["ttft.predicted_s"] == approx(expected)
    assert c.details["ttft.queue_s"] == approx([0, 0, 1.5, 0])
    assert scores == approx([min(expected) / t for t in expected])


def test_ttft_queue_from_reported_waiting_and_a_full_engine():
    workers = ws("reported", "full", max_num_seqs=4)
    workers[0].reported_waiting = 3  # other replicas' requests, sized by the default
    workers[1].reported_running = 4  # all slots taken: one request must finish first
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, default_request_tokens=500,
                        request_duration_s=8.0)
    c = ctx(request(10), workers)
    scorer.score(c, workers)
    assert c.details["ttft.queue_s"] == approx([1.5, 0.0])  # 3 x 500 tokens / 1000 tok/s
    assert c.details["ttft.admit_s"] == approx([0.0, 1.6])  # 1 of 4 running must end: 1 x 8 s / (4 + 1)


def test_ttft_waits_for_kv_blocks_to_free_up():
    workers = ws("roomy", "tight", kv_blocks_total=1000)
    for w in workers:
        w.reported_running = 4
    workers[0].kv_cache_usage = 0.5
    workers[1].kv_cache_usage = 0.95  # 50 blocks free, 950 held by 4 requests (237.5 each)
    workers[1].mean_request_s = 10.0  # measured
    scorer = TTFTScorer(prefill_tokens_per_s=1e6, step_overhead_s=0.0)
    c = ctx(request(100), workers)  # needs 100 blocks: 50 short, ~0.21 of a request must end
    scorer.score(c, workers)
    assert c.details["ttft.admit_s"] == approx([0.0, (50 / 237.5) * 10.0 / 5])


def test_ttft_work_weight_charges_recomputation():
    ix = BlockIndex()
    req = request(100)
    ix.stored("cached", "m", req.block_hashes)
    workers = ws("cached", "idle")
    workers[0].pending_prefill, workers[0].pending_prefill_tokens = 1, 2000  # 2 s queue vs 1.6 s prefill
    greedy = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0)
    assert greedy.score(ctx(req, workers, ix), workers)[1] == 1.0
    frugal = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, work_weight=0.5, load_scaled=False)
    c = ctx(req, workers, ix)
    assert frugal.score(c, workers)[0] == 1.0
    assert c.details["ttft.cost_s"] == approx([2.0 + 0.001 * 1.5, 1.6 * 1.5])
    assert c.details["ttft.predicted_s"] == approx([2.001, 1.6])  # the TTFT itself, without the charge
    # Load-scaled: the charge times the mean number waiting per worker (here 1 of 2: half).
    scaled = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, work_weight=0.5)
    c = ctx(req, workers, ix)
    scaled.score(c, workers)
    assert c.details["ttft.cost_s"] == approx([2.0 + 0.001 * 1.25, 1.6 * 1.25])
    workers[0].pending_prefill = workers[0].pending_prefill_tokens = 0  # nobody waits: no charge
    c = ctx(req, workers, ix)
    scaled.score(c, workers)
    assert c.details["ttft.cost_s"] == approx([0.001, 1.6])


def test_ttft_work_charge_grows_with_the_queue_up_to_pressure_cap():
    ix = BlockIndex()
    req = request(100)
    ix.stored("cached", "m", req.block_hashes)
    workers = ws("cached", "idle")
    workers[0].reported_waiting = 6  # 3 waiting per worker on average

    def charge(cap: float) -> list[float]:
        c = ctx(req, workers, ix)
        scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, work_weight=2.0, pressure_cap=cap)
        scorer.score(c, workers)
        d = c.details
        return [(cost - ttft) / pre
                for cost, ttft, pre in zip(d["ttft.cost_s"], d["ttft.predicted_s"], d["ttft.prefill_s"])]

    assert charge(1.0) == approx([2.0, 2.0])  # the default: saturates at one waiting per worker
    assert charge(2.0) == approx([4.0, 4.0])
    assert charge(4.0) == approx([6.0, 6.0])  # the mean queue (3) itself, below the cap
    with pytest.raises(ValueError, match="pressure_cap"):
        TTFTScorer(pressure_cap=0)


def test_ttft_counts_speculative_prefixes_as_cached():
    req = request(10, tokens=160, now=0.0)
    overlay = SpeculativePrefixes(ttl_s=5, stride=1)
    overlay.record(req, "b")
    workers = ws("a", "b")
    c = ctx(req, workers, overlay=overlay)
    TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0).score(c, workers)
    assert c.details["ttft.prefill_s"] == approx([0.160, 0.001])
    later = request(10, tokens=160, now=6.0)  # past the TTL
    c = ctx(later, workers, overlay=overlay)
    TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0).score(c, workers)
    assert c.details["ttft.prefill_s"] == approx([0.160, 0.160])


def test_ttft_work_charge_scales_with_the_reusable_share_of_the_prompt():
    ix = BlockIndex()
    req = request(100)
    ix.stored("quarter", "m", req.block_hashes[:25])
    workers = ws("quarter", "idle")
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, work_weight=2.0, load_scaled=False)
    c = ctx(req, workers, ix)
    scorer.score(c, workers)
    charge = 2.0 * 0.25  # a quarter of the prompt is held somewhere
    assert c.details["ttft.cost_s"] == approx([1.2 * (1 + charge), 1.6 * (1 + charge)])
    flat = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, work_weight=2.0, load_scaled=False,
                      hit_scaled=False)
    c = ctx(req, workers, ix)
    flat.score(c, workers)
    assert c.details["ttft.cost_s"] == approx([1.2 * 3, 1.6 * 3])


def _route(scorer, workers, i, tokens, now):
    """Score a cold prompt of `tokens` at `now`, commit it to workers[i] and dispatch it there."""
    req = request(tokens // BS, tokens=tokens, now=now)
    c = ctx(req, workers)
    scorer.score(c, workers)
    scorer.commit(c, workers[i])
    return workers[i].start(tokens, req.num_blocks)


def _probe(scorer, workers, tokens, now):
    c = ctx(request(tokens // BS, tokens=tokens, now=now), workers)
    scorer.score(c, workers)
    return c.details


def test_ttft_tracks_the_prefill_steps_it_dispatched():
    workers = ws("a", "b")
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, track_steps=True, batch_weight=1.0)
    first = _route(scorer, workers, 0, 4000, now=0.0)  # a is idle: its 4 s step starts at once
    d = _probe(scorer, workers, 160, now=3.0)
    assert d["ttft.queue_s"] == approx([1.0, 0.0])  # 1 s of a's step is left (not the whole 4 s)
    assert d["ttft.cost_s"] == approx([1.16, 0.16])  # nobody waits for a next step: no batch charge
    second = _route(scorer, workers, 0, 2000, now=3.0)  # waits for a's next step
    d = _probe(scorer, workers, 160, now=3.5)
    assert d["ttft.queue_s"] == approx([0.5 + 2.0, 0.0])  # the step's rest, then the queued batch
    assert d["ttft.predicted_s"] == approx([2.66, 0.16])
    # Joining that batch delays the one request in it by this prefill: charged batch_weight x 1 x 0.16 s.
    assert d["ttft.cost_s"] == approx([2.66 + 0.16, 0.16])
    first.first_token()  # the step ended early (at 3.9 s): the queued batch runs from now
    assert _probe(scorer, workers, 160, now=3.9)["ttft.queue_s"] == approx([2.0, 0.0])
    second.first_token()  # none of ours waits there any more
    assert _probe(scorer, workers, 160, now=5.0)["ttft.queue_s"] == approx([0.0, 0.0])


def test_ttft_joins_the_step_a_busy_engine_is_about_to_start():
    workers = ws("decoding", "idle")
    workers[0].reported_running = 2  # mid decode step: what arrives before it ends is prefilled together
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, track_steps=True, batch_weight=1.0,
                        batch_window_s=0.01)
    _route(scorer, workers, 0, 1000, now=0.0)  # its step starts after the decode step: 0.01 .. 1.01
    d = _probe(scorer, workers, 500, now=0.0)  # same instant (a burst): joins it, ends it at 1.51
    assert d["ttft.queue_s"] == approx([1.01, 0.0])
    assert d["ttft.predicted_s"] == approx([1.51, 0.5])
    assert d["ttft.cost_s"] == approx([1.51 + 0.5, 0.5])  # and delays the one already in it by 0.5 s
    _route(scorer, workers, 0, 500, now=0.0)
    assert _probe(scorer, workers, 500, now=0.0)["ttft.queue_s"] == approx([1.51, 0.0])
    d = _probe(scorer, workers, 500, now=0.02)  # the step has started: wait for its end
    assert d["ttft.queue_s"] == approx([1.49, 0.0])
    assert d["ttft.cost_s"] == approx([1.99, 0.5])  # nobody is batched with it: no charge
    # Without a clock the model is off: all of ours before their first token count, in full.
    d = _probe(scorer, workers, 500, now=None)
    assert d["ttft.queue_s"] == approx([1.5, 0.0])


def test_ttft_stall_charge_keeps_long_prompts_off_busy_decoders():
    # a measured a little faster, but 20 decodes run there against b's 2: a long prefill at a
    # stalls ten times as many running requests.
    workers = ws("a", "b", max_num_seqs=64)
    workers[0].prefill_tokens_per_s, workers[0].reported_running = 12_000.0, 20
    workers[1].prefill_tokens_per_s, workers[1].reported_running = 10_000.0, 2
    req = request(256, tokens=8192)
    plain, stalled = ctx(req, workers), ctx(req, workers)
    TTFTScorer(step_overhead_s=0.0).score(plain, workers)
    scores = TTFTScorer(step_overhead_s=0.0, stall_weight=0.1).score(stalled, workers)
    assert plain.details["ttft.cost_s"] == approx([8192 / 12_000, 8192 / 10_000])  # TTFT alone: a
    assert stalled.details["ttft.cost_s"] == approx([8192 / 12_000 * 3.0, 8192 / 10_000 * 1.2])
    assert scores[1] == 1.0 and scores[0] < 1.0  # b
    assert stalled.details["ttft.predicted_s"] == plain.details["ttft.predicted_s"]  # a charge, not a TTFT
    with pytest.raises(ValueError):
        TTFTScorer(stall_weight=-0.1)


def test_ttft_rejects_negative_batch_params():
    with pytest.raises(ValueError):
        TTFTScorer(batch_weight=-1)
    with pytest.raises(ValueError):
        TTFTScorer(batch_window_s=-0.1)


def test_speculative_runs_are_counted_at_stride_granularity():
    overlay = SpeculativePrefixes(stride=4)
    overlay.record(request(10, now=0.0), "a")  # positions 3, 7 and the last (9) recorded
    assert overlay.match(request(10, now=1.0)) == {"a": 10}
    assert overlay.match(request(9, now=1.0)) == {"a": 8}  # a prefix of it: whole strides only
    overlay.record(request(6, now=2.0), "b")  # b now owns position 3 (and its own last, 5)
    assert overlay.match(request(10, now=3.0)) == {"b": 4, "a": 10}


def test_speculative_samples_widen_along_long_prompts():
    overlay = SpeculativePrefixes(stride=4, max_stride=32)
    overlay.record(request(3400, now=0.0), "a")
    assert len(overlay) < 250  # ~240 sampled positions, not 850 at a fixed stride of 4
    assert overlay.match(request(3400, now=1.0)) == {"a": 3400}
    # One sequence for every length: any prefix of the long prompt matches on the same positions,
    # under-counted by less than the step there (4 for the first 256 blocks, at most 32).
    for n, step in ((9, 4), (256, 4), (257, 8), (700, 8), (1000, 16), (3399, 32)):
        run = overlay.match(request(n, now=1.0))["a"]
        assert n - step < run <= n, (n, run)
    # And a short prompt recorded first is found by the long one that extends it.
    short_first = SpeculativePrefixes(stride=4, max_stride=32)
    short_first.record(request(1000, now=0.0), "b")
    assert 1000 - 16 < short_first.match(request(3400, now=1.0))["b"] <= 1000


def test_speculative_generations_bound_memory_and_forget_a_worker():
    overlay = SpeculativePrefixes(stride=1, max_blocks=8)  # generations of 4 entries
    for i in range(100):  # one-block prompts 0..99, spread over the shards
        overlay.record(RequestView("m", BS, [i], BS, now=0.0), "a" if i % 2 else "b")
        assert len(overlay) <= 8
    seen = {i for i in range(100) if overlay.match(RequestView("m", BS, [i], BS, now=1.0))}
    assert {96, 97, 98, 99} <= seen <= set(range(92, 100))  # the last 4 always, nothing older than 8
    overlay.forget_worker("a")
    assert overlay.match(RequestView("m", BS, [99], BS, now=1.0)) == {}
    assert overlay.match(RequestView("m", BS, [98], BS, now=1.0)) == {"b": 1}


def test_speculative_rejects_max_stride_below_stride():
    with pytest.raises(ValueError):
        SpeculativePrefixes(stride=8, max_stride=4)


def test_store_tier_is_usable_by_every_worker():
    ix = BlockIndex()
    req = request(8)
    ix.stored("kvstore-0", "m", req.block_hashes[:6], Tier.STORE)
    ix.stored("a", "m", req.block_hashes[:2])
    workers = ws("a", "b")
    matches = ctx(req, workers, ix).matches()
    assert [m.by_tier for m in matches] == [[2, 0, 0, 4], [0, 0, 0, 6]]


def test_kv_cost_is_dynamos_formula():
    ix = BlockIndex()
    req = request(4)  # 64 tokens, 4 blocks
    ix.stored("cached", "m", req.block_hashes)
    ix.stored("host", "m", req.block_hashes, Tier.HOST)
    workers = ws("cached", "idle", "host", "busy", kv_blocks_total=100)
    workers[0].active_blocks = 10
    workers[3].pending_prefill_tokens, workers[3].kv_cache_usage = 32, 0.5
    scorer = KVCostScorer(overlap_weight=1.0)
    c = ctx(req, workers, ix)
    scores = scorer.score(c, workers)
    # cost = weight x (pending prefill + uncached tokens) / block_size + (active blocks + request blocks)
    costs = [0 + 10 + 4, 4 + 0 + 4, (64 - 0.75 * 64) / 16 + 4, (32 + 64) / 16 + 50 + 4]
    assert c.details["kv-cost.cost"] == approx(costs)
    lo, hi = min(costs), max(costs)
    assert scores == approx([(hi - x) / (hi - lo) for x in costs])
    no_overlap = KVCostScorer(overlap_weight=0.0)
    c = ctx(req, workers, ix)
    no_overlap.score(c, workers)
    assert c.details["kv-cost.cost"] == approx([14, 4, 4, 54])  # load only


@pytest.mark.parametrize("make", [
    lambda: PrefixCacheScorer(normalize="nope"),
    lambda: PrefixCacheScorer(tier_weights={"gpu": 1}),
    lambda: PrefixCacheScorer(tier_weights={"host": -1}),
    lambda: SessionAffinityScorer(mode="sticky"),
    lambda: TTFTScorer(prefill_tokens_per_s=0),
    lambda: KVCostScorer(overlap_weight=-1),
])
def test_bad_params_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_store_hits_score_below_engine_hits_and_cost_their_load():
    ix = BlockIndex()
    req = request(8)
    ix.stored("engine", "m", req.block_hashes[:6])
    ix.stored("kvstore-0", "m", req.block_hashes[:6], Tier.STORE)
    workers = ws("engine", "cold")
    c = ctx(req, workers, ix)
    assert [m.by_tier for m in c.matches()] == [[6, 0, 0, 0], [0, 0, 0, 6]]
    # prefix-cache: engine blocks credit 1, store blocks 0.5 (the store's default tier weight)
    assert PrefixCacheScorer().score(c, workers) == approx([6 / 8, 3 / 8])
    scorer = TTFTScorer(prefill_tokens_per_s=1000, step_overhead_s=0.0, load_tokens_per_s={"store": 960})
    scorer.score(c, workers)
    # both compute the 2 blocks left (32 tokens, 0.032 s); the cold worker loads 96 tokens first (0.1 s)
    assert c.details["ttft.load_s"] == approx([0.0, 0.1])
    assert c.details["ttft.predicted_s"] == approx([0.032, 0.132])
    dynamo = KVCostScorer()  # Dynamo's profile credits the store at 0.25, the class default at 0.5
    dynamo.score(c, workers)
    assert c.details["kv-cost.cost"] == approx([(128 - 96) / 16 + 8, (128 - 48) / 16 + 8])


def test_store_continues_a_workers_own_and_speculative_run_only_beyond_it():
    ix = BlockIndex()
    req = request(10, now=0.0)
    ix.stored("kvstore-0", "m", req.block_hashes[:8], Tier.STORE)
    ix.stored("a", "m", req.block_hashes[:2])
    ix.stored("h", "m", req.block_hashes[:9], Tier.HOST)  # longer than the store: the store adds nothing
    overlay = SpeculativePrefixes(stride=1)
    overlay.record(request(5, now=0.0), "b")  # b has 5 blocks in flight (ENGINE)
    workers = ws("a", "b", "h", "c")
    matches = ctx(req, workers, ix, overlay=overlay).matches()
    assert [(m.blocks, m.by_tier) for m in matches] == [
        (8, [2, 0, 0, 6]), (8, [5, 0, 0, 3]), (9, [0, 9, 0, 0]), (8, [0, 0, 0, 8])]
    # A filtered-out worker's own blocks are not a store: only pure STORE-tier holders count.
    only = ws("c")
    ix2 = BlockIndex()
    ix2.stored("a", "m", req.block_hashes[:4])
    assert ctx(req, only, ix2).matches()[0].blocks == 0
