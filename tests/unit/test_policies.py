"""Each policy's rule on hand-built states: ours and the peers (random, round-robin, least-loaded,
llm-d, Dynamo, SGLang, Mooncake), plus the bookkeeping every service relies on."""

import collections

import pytest

from scheduler.block_hash import BlockHasher, external_block_hash
from scheduler.framework import RequestView, Role, WorkerState
from scheduler.index import BlockIndex, Tier
from scheduler.policies import POLICY_NAMES, MooncakeConductor, SGLangCacheAware, policy_by_name

BS = 16


def ws(*ids: str, max_num_seqs: int = 16, **kw) -> list[WorkerState]:
    return [WorkerState(i, "m", max_num_seqs=max_num_seqs, **kw) for i in ids]


def request(blocks: int, first: int = 100, tokens: int | None = None, **kw) -> RequestView:
    n = tokens if tokens is not None else blocks * BS
    return RequestView("m", n, list(range(first, first + blocks)), BS, **kw)


# ---- common to all ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_routes_only_to_eligible_workers_and_explains(name):
    workers = ws("a", "b", "c", "d")
    workers[1].routable = False
    workers[2].model = "other"
    workers[3].role = Role.PREFILL
    ix = BlockIndex()
    d = policy_by_name(name, seed=0).decide(request(4), workers, ix)
    assert d.worker_id == "a" and d.policy == name
    assert d.filtered == {"b": "not routable", "c": "serves other", "d": "role prefill not allowed"}
    rows = {r.worker_id: r for r in d.worker_scores()}
    assert rows["b"].filtered_reason == "not routable" and rows["a"].filtered_reason == ""
    assert d.request_blocks == 4 and d.prefill_tokens == 64 and d.cached_tokens == 0
    none = policy_by_name(name).decide(request(4), workers[1:], ix)
    assert none.worker_id is None and none.reason == "no eligible worker"


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_components_sum_to_the_total(name):
    workers = ws("a", "b", "c")
    workers[0].reported_waiting = 3
    ix = BlockIndex()
    ix.stored("b", "m", request(4).block_hashes[:2])
    d = policy_by_name(name, seed=0).decide(request(4), workers, ix)
    for i in range(len(d.eligible)):
        assert sum(col[i] for col in d.components.values()) == pytest.approx(d.totals[i])


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="ours, random"):
        policy_by_name("fastest")


# ---- bookkeeping ------------------------------------------------------------------------------


def test_ticket_tracks_a_request_through_its_life():
    w = WorkerState("a", "m", 8)
    t = w.start(prefill_tokens=1000, kv_blocks=63)
    assert (w.inflight, w.pending_prefill, w.pending_prefill_tokens, w.active_blocks) == (1, 1, 1000, 63)
    assert w.waiting == 1 and w.running == 0
    t.first_token(ttft_s=0.5)  # nothing queued ahead: a speed sample
    assert (w.pending_prefill, w.pending_prefill_tokens) == (0, 0) and w.prefill_tokens_per_s == 2000
    assert w.running == 1
    t2 = w.start(1000, 63)  # queued behind nothing now either (the first is running, not waiting)
    t2.first_token(ttft_s=1.0)
    assert w.prefill_tokens_per_s == pytest.approx(0.8 * 2000 + 0.2 * 1000)
    t.finish()
    t.finish()  # idempotent
    t2.finish()
    assert (w.inflight, w.active_blocks) == (0, 0)


def test_a_request_that_fails_before_its_first_token_is_undone():
    w = WorkerState("a", "m", 8)
    w.start(500, 10)
    t = w.start(300, 5)  # queued behind the first: no speed sample from it
    t.first_token(ttft_s=0.1)
    assert w.prefill_tokens_per_s is None
    w2 = WorkerState("b", "m", 8)
    t3 = w2.start(300, 5)
    t3.finish()
    assert (w2.inflight, w2.pending_prefill, w2.pending_prefill_tokens, w2.active_blocks) == (0, 0, 0, 0)


def test_our_first_tokens_and_ends_keep_an_old_report_current():
    w = WorkerState("a", "m", 8)
    before = [w.start(1000, 10), w.start(1000, 10)]
    asked = w.dispatched  # the poll is sent: both may be in its answer
    after = w.start(1000, 10)  # sent while the poll is in flight: not in it
    w.report(running=3, waiting=4, kv_cache_usage=0.5, as_of=asked)  # + another replica's 3 and 2
    assert (w.reported_running, w.reported_waiting, w.kv_cache_usage) == (3, 4, 0.5)
    before[0].first_token()  # it was waiting in the report: now it runs
    assert (w.reported_running, w.reported_waiting) == (4, 3) and w.waiting == 3
    before[0].finish()
    assert (w.reported_running, w.reported_waiting) == (3, 3)
    after.first_token()  # not in the report: it changes nothing there
    after.finish()
    assert (w.reported_running, w.reported_waiting) == (3, 3)
    before[1].finish()  # failed before its first token: it leaves the waiting queue, then the engine
    assert (w.reported_running, w.reported_waiting) == (3, 2)
    w.report(running=0, waiting=1, kv_cache_usage=0.0)  # no as_of: it counts all we sent so far
    assert w.report_seq == w.dispatched == 3
    stale = WorkerState("b", "m", 8)
    t = stale.start(10, 1)
    stale.report(running=0, waiting=0, kv_cache_usage=0.0)  # it already ran (report counts none)
    t.first_token()
    t.finish()
    assert (stale.reported_running, stale.reported_waiting) == (0, 0)  # never below zero


def test_request_view_hashes_like_vllm():
    tokens = list(range(40))
    r = RequestView.from_tokens("m", tokens, block_size=16, session_id="s")
    expected = [external_block_hash(h) for h in BlockHasher(16).hash_blocks(tokens)]
    assert list(r.block_hashes) == expected and r.num_blocks == 2
    assert r.prompt_tokens == 40 and r.session_id == "s"


def test_decision_reports_what_the_chosen_worker_has_cached():
    ix = BlockIndex()
    req = request(10, tokens=170)
    ix.stored("a", "m", req.block_hashes[:6])
    ix.stored("a", "m", req.block_hashes[6:8], Tier.HOST)
    d = policy_by_name("dynamo").decide(req, ws("a"), ix)
    assert (d.cached_tokens, d.prefill_tokens) == (96, 170 - 128)
    assert d.prefix["a"].blocks == 8


# ---- random, round-robin, least-loaded -------------------------------------------------------------


def test_random_is_reproducible_with_a_seed_and_spreads():
    workers = ws("a", "b", "c")
    p1, p2, p3 = (policy_by_name("random", seed=s) for s in (7, 7, 8))
    seq1 = [p1.decide(request(1), workers, BlockIndex()).worker_id for _ in range(30)]
    seq2 = [p2.decide(request(1), workers, BlockIndex()).worker_id for _ in range(30)]
    seq3 = [p3.decide(request(1), workers, BlockIndex()).worker_id for _ in range(30)]
    assert seq1 == seq2 != seq3 and set(seq1) == {"a", "b", "c"}


def test_round_robin_cycles_in_id_order_and_skips_ineligible():
    p = policy_by_name("round-robin")
    workers = ws("c", "a", "b")
    ix = BlockIndex()
    assert [p.decide(request(1), workers, ix).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    assert p.decide(request(1), workers, ix, dry_run=True).worker_id == "b"
    workers[2].routable = False  # b
    assert [p.decide(request(1), workers, ix).worker_id for _ in range(3)] == ["c", "a", "c"]


def test_least_loaded_is_relative_to_capacity_and_takes_turns():
    p = policy_by_name("least-loaded")
    big, small = WorkerState("big", "m", 32, inflight=4), WorkerState("small", "m", 4, inflight=2)
    assert p.decide(request(1), [small, big], BlockIndex()).worker_id == "big"
    equal = ws("a", "b")
    assert [p.decide(request(1), equal, BlockIndex()).worker_id for _ in range(4)] == ["a", "b", "a", "b"]


# ---- llm-d ----------------------------------------------------------------------------------------


def test_llm_d_weights_prefix_3_queue_2_kv_2():
    ix = BlockIndex()
    req = request(8)
    ix.stored("cached", "m", req.block_hashes)
    ix.stored("half", "m", req.block_hashes[:4])
    workers = ws("cached", "half", "idle")
    workers[0].reported_waiting, workers[0].kv_cache_usage = 4, 0.5
    workers[1].reported_waiting, workers[1].kv_cache_usage = 2, 0.5
    d = policy_by_name("llm-d", seed=0).decide(req, workers, ix)
    # prefix min-max over hits: 1, 0, 0; queue min-max: 0, .5, 1; kv: .5, .5, 1
    assert d.totals == pytest.approx([3 * 1 + 2 * 0 + 2 * 0.5, 3 * 0 + 2 * 0.5 + 2 * 0.5, 0 + 2 + 2])
    assert d.worker_id == "idle"
    workers[0].reported_waiting = 1  # a shorter queue: the cache wins
    assert policy_by_name("llm-d", seed=0).decide(req, workers, ix).worker_id == "cached"


# ---- Dynamo ------------------------------------------------------------------------------------


def test_dynamo_picks_the_lowest_cost_and_ties_to_the_smallest_tree():
    ix = BlockIndex()
    req = request(4)
    ix.stored("cached", "m", req.block_hashes)
    workers = ws("cached", "busy", kv_blocks_total=100)
    workers[0].active_blocks = 3  # cost 0 + 3 + 4 = 7  vs  4 + 2 + 4 = 10
    workers[1].active_blocks = 2
    assert policy_by_name("dynamo").decide(req, workers, ix).worker_id == "cached"
    workers[0].active_blocks = 7  # 11 vs 10
    assert policy_by_name("dynamo").decide(req, workers, ix).worker_id == "busy"
    ix.stored("big-tree", "m", list(range(1000, 1100)))
    tied = ws("big-tree", "small-tree")
    for _ in range(5):
        assert policy_by_name("dynamo").decide(request(4, first=5000), tied, ix).worker_id == "small-tree"


def test_dynamo_temperature_samples_softmax_of_normalized_cost():
    from scheduler.profile import load_profile

    ix = BlockIndex()
    workers = ws("a", "b", "c", kv_blocks_total=100)
    for w, blocks in zip(workers, (0, 10, 20)):
        w.active_blocks = blocks  # costs 4, 14, 24: normalized 0, .5, 1
    p = load_profile({"scorers": [{"name": "kv-cost"}],
                      "picker": {"name": "softmax", "params": {"temperature": 0.5, "seed": 3}}})
    counts = collections.Counter(p.decide(request(4), workers, ix).worker_id for _ in range(4000))
    import math
    z = [math.exp(-x / 0.5) for x in (0, 0.5, 1)]
    for w, weight in zip("abc", z):
        assert counts[w] / 4000 == pytest.approx(weight / sum(z), abs=0.03)


# ---- SGLang ------------------------------------------------------------------------------------


def test_sglang_imbalance_thresholds():
    def route(load_a: int, load_b: int) -> str:
        p = SGLangCacheAware()
        ix = BlockIndex()
        workers = ws("a", "b", inflight=0)
        workers[0].inflight, workers[1].inflight = load_a, load_b
        p.tree.stored("a", "m", request(4).block_hashes)  # a has the whole prompt in its tree
        return p.decide(request(4), workers, ix).worker_id

    assert route(100, 36) == "a"  # diff 64 is not > 64: balanced, cache wins
    assert route(101, 36) == "b"  # diff 65 > 64 and 101 > 1.5 x 36: shortest queue
    assert route(300, 210) == "a"  # diff 90 but 300 < 1.5 x 210: balanced


def test_sglang_cache_threshold_and_smallest_tree():
    p = SGLangCacheAware()
    ix = BlockIndex()
    workers = ws("a", "b", "c")
    p.tree.stored("a", "m", request(10).block_hashes[:3])  # 30% of the prompt: not > 0.3
    p.tree.stored("b", "m", list(range(900, 905)))  # unrelated: b's tree is bigger than c's
    p.tree.stored("c", "m", [999])
    d = p.decide(request(10), workers, ix)
    assert d.worker_id == "c" and "sglang.smallest-tree" in d.components
    assert d.details["sglang.match_rate"] == pytest.approx([0.3, 0.0, 0.0])
    # c's tree now holds the prompt: a continuation of it goes there (rate 10/12 > 0.3)
    d = p.decide(request(12), workers, ix)
    assert d.worker_id == "c" and "sglang.cache-hit" in d.components


def test_sglang_dry_run_leaves_the_tree_alone_and_forgets_departed_workers():
    p = SGLangCacheAware()
    workers = ws("a", "b")
    p.decide(request(4), workers, BlockIndex(), dry_run=True)
    assert len(p.tree) == 0
    p.decide(request(4), workers, BlockIndex())
    assert len(p.tree) == 4
    chosen = p.tree.workers()[0]
    p.decide(request(1, first=7), [w for w in workers if w.worker_id != chosen], BlockIndex())
    assert chosen not in p.tree.workers()


def test_sglang_can_use_the_event_index_instead():
    ix = BlockIndex()
    ix.stored("b", "m", request(4).block_hashes)
    assert SGLangCacheAware(source="index").decide(request(4), ws("a", "b"), ix).worker_id == "b"
    assert SGLangCacheAware().decide(request(4), ws("a", "b"), ix).worker_id == "a"  # its own tree is empty


# ---- Mooncake ----------------------------------------------------------------------------------


def test_mooncake_predicts_ttft_and_picks_the_minimum():
    ix = BlockIndex()
    req = request(100, tokens=1600)
    ix.stored("cached", "m", req.block_hashes[:75])  # 1200 cached, 400 to prefill
    workers = ws("cached", "idle")
    workers[0].pending_prefill, workers[0].pending_prefill_tokens = 1, 600
    p = MooncakeConductor(prefill_tokens_per_s=1000, step_overhead_s=0.0)
    d = p.decide(req, workers, ix)
    assert d.details["mooncake.predicted_s"] == pytest.approx([0.6 + 0.4, 1.6])
    assert d.worker_id == "cached"
    workers[0].pending_prefill_tokens = 1300  # 1.3 + 0.4 > 1.6
    assert p.decide(req, workers, ix).worker_id == "idle"


def test_mooncake_rejects_early_when_the_slo_cannot_be_met():
    workers = ws("a", "b")
    for w in workers:
        w.pending_prefill, w.pending_prefill_tokens = 3, 5000
    p = MooncakeConductor(ttft_slo_s=2.0, prefill_tokens_per_s=1000, step_overhead_s=0.0)
    d = p.decide(request(10), workers, BlockIndex())
    assert d.worker_id is None and "SLO" in d.reason
    assert d.details["mooncake.predicted_s"][0] == pytest.approx(5.16)
    ok = MooncakeConductor(ttft_slo_s=6.0, prefill_tokens_per_s=1000, step_overhead_s=0.0)
    assert ok.decide(request(10), workers, BlockIndex()).worker_id == "a"


def test_mooncake_global_variant_adds_transfer_from_the_best_holder():
    ix = BlockIndex()
    req = request(100, tokens=1600)
    ix.stored("holder", "m", req.block_hashes)
    workers = ws("holder", "other")
    workers[0].pending_prefill, workers[0].pending_prefill_tokens = 1, 2000
    p = MooncakeConductor(kvcache_balancing_threshold=2.0, transfer_tokens_per_s=16000,
                          prefill_tokens_per_s=1000, step_overhead_s=0.0)
    d = p.decide(req, workers, ix)
    # other: best_len 100 > 2 x 0 → fetch 1600 tokens (0.1 s), prefill only the last... nothing left
    assert d.details["mooncake.transfer_s"] == pytest.approx([0.0, 0.1])
    assert d.details["mooncake.predicted_s"] == pytest.approx([2.0, 0.1])
    assert d.worker_id == "other"


# ---- ours ---------------------------------------------------------------------------------------


def test_ours_trades_cache_hits_against_queues():
    ix = BlockIndex()
    req = request(200, tokens=3200)
    ix.stored("cached", "m", req.block_hashes)
    workers = ws("cached", "idle")
    workers[0].pending_prefill, workers[0].pending_prefill_tokens = 1, 4000  # 0.4 s of queue at 10k tok/s
    d = policy_by_name("ours").decide(req, workers, ix)
    # idle: 0.322 s to prefill, charged 48 x 0.5 (mean waiting) more for the recomputation
    assert d.details["ttft.cost_s"][1] == pytest.approx(0.322 * 25)
    assert d.worker_id == "cached"  # 0.4 s queue + ~0 prefill < 0.322 s prefill + the charge
    workers[0].pending_prefill_tokens = 100_000  # 10 s of queue: now worth recomputing
    d = policy_by_name("ours").decide(req, workers, ix)
    assert d.worker_id == "idle"
    workers[0].pending_prefill = workers[0].pending_prefill_tokens = 0
    workers[0].reported_running = 16  # nobody waits, but all of cached's slots are busy
    d = policy_by_name("ours").decide(req, workers, ix)
    assert d.details["ttft.cost_s"][1] == pytest.approx(0.322)  # no queue: no recomputation charge
    assert d.details["ttft.admit_s"][0] == pytest.approx(2.0 / 17)  # one of 16 running must end
    assert d.worker_id == "cached"


def test_ours_keeps_a_burst_of_a_new_prefix_together_until_events_arrive():
    p = policy_by_name("ours")
    ix = BlockIndex()  # no KV events yet
    workers = ws("a", "b", "c")
    for w in workers[1:]:
        w.pending_prefill, w.pending_prefill_tokens = 1, 500  # b and c are a little busy
    first = p.decide(request(64, now=0.0), workers, ix)
    assert first.worker_id == "a"
    workers[0].start(first.prefill_tokens, first.request_blocks)  # a prefills 1024 tokens now
    # Without speculation a would cost 0.1 s queue + 0.1 s prefill and b/c 0.05 + 0.1: b would win.
    second = p.decide(request(64, now=0.1), workers, ix)
    assert second.worker_id == "a" and second.prefill_tokens == 0  # its prompt is (speculatively) there
    later = p.decide(request(64, now=100.0), workers, ix)  # the speculation expired
    assert later.worker_id != "a"


def test_ours_dry_run_changes_nothing():
    p = policy_by_name("ours")
    workers = ws("a", "b")
    req = request(8, session_id="s", now=0.0)
    d = p.decide(req, workers, BlockIndex(), dry_run=True)
    assert all(w.last_picked == 0 for w in workers)
    assert p.decide(req, workers, BlockIndex(), dry_run=True).worker_id == d.worker_id
    real = p.decide(req, workers, BlockIndex())
    assert {w.worker_id: w.last_picked for w in workers}[real.worker_id] == 1
    assert set(real.timings_s) >= {"filters", "ttft", "picker", "total"}


def test_session_affinity_can_be_added_to_ours():
    from scheduler.profile import PROFILES_DIR, load_profile
    import yaml

    spec = yaml.safe_load((PROFILES_DIR / "default.yaml").read_text())
    spec["scorers"].append({"name": "session-affinity", "weight": 0.05})
    p = load_profile(spec)
    workers = ws("a", "b")
    first = p.decide(request(4, first=1, session_id="s"), workers, BlockIndex())
    # another prompt of the same session, equal cost everywhere: affinity decides, not turn-taking
    assert p.decide(request(4, first=50, session_id="s"), workers, BlockIndex()).worker_id == first.worker_id


# ---- with a KV store ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_without_a_store_nothing_is_credited_to_it_and_explain_shows_each_workers_blocks(name):
    ix = BlockIndex()
    req = request(8)
    ix.stored("a", "m", req.block_hashes[:3])
    d = policy_by_name(name, seed=1).decide(req, ws("a", "b"), ix, dry_run=True)
    rows = {s.worker_id: s.prefix_by_tier for s in d.worker_scores()}
    assert rows == {"a": (3, 0, 0, 0), "b": (0, 0, 0, 0)}


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_explain_shows_store_hits_per_worker(name):
    ix = BlockIndex()
    req = request(8)
    ix.stored("a", "m", req.block_hashes[:3])
    ix.stored("kvstore-0", "m", req.block_hashes[:6], Tier.STORE)
    workers = ws("a", "b", "c")
    workers[2].routable = False
    d = policy_by_name(name, seed=1).decide(req, workers, ix, dry_run=True)
    rows = {s.worker_id: s.prefix_by_tier for s in d.worker_scores()}
    assert rows == {"a": (3, 0, 0, 3), "b": (0, 0, 0, 6), "c": ()}  # c is filtered: no line of blocks
    assert "kvstore-0" in d.prefix and d.worker_id in ("a", "b")


def test_ours_takes_a_store_hit_over_a_recompute_but_an_engine_hit_over_both():
    ix = BlockIndex()
    req = request(200, tokens=3200)
    ix.stored("kvstore-0", "m", req.block_hashes[:190], Tier.STORE)
    workers = ws("cold", "other")
    p = policy_by_name("ours")
    d = p.decide(req, workers, ix, dry_run=True)
    # both can load the store's 190 blocks; equal: the decision's prediction counts them as held
    assert d.prefill_tokens == 3200 - 190 * BS
    ix.stored("other", "m", req.block_hashes[:190])
    d = p.decide(req, workers, ix, dry_run=True)
    assert d.worker_id == "other"
    assert d.details["ttft.load_s"][1] == 0.0 and d.details["ttft.load_s"][0] > 0.0


def test_mooncake_counts_the_store_as_its_pool_with_a_transfer():
    ix = BlockIndex()
    req = request(100, tokens=1600)
    ix.stored("kvstore-0", "m", req.block_hashes[:80], Tier.STORE)
    ix.stored("own", "m", req.block_hashes[:20])
    workers = ws("own", "idle")
    p = MooncakeConductor(transfer_tokens_per_s=16000, prefill_tokens_per_s=1000, step_overhead_s=0.0)
    d = p.decide(req, workers, ix)
    # own: 20 own blocks + 60 from the store (960 tokens, 0.06 s); idle: 80 from the store (0.08 s)
    assert d.details["mooncake.transfer_s"] == pytest.approx([0.06, 0.08])
    assert d.details["mooncake.prefill_s"] == pytest.approx([0.32, 0.32])
    assert d.worker_id == "own" and d.prefill_tokens == 1600 - 80 * BS


def test_sglang_routes_as_if_there_were_no_store():
    req = request(8)
    with_store, without = BlockIndex(), BlockIndex()
    for ix in (with_store, without):
        ix.stored("b", "m", req.block_hashes[:1])
    with_store.stored("kvstore-0", "m", req.block_hashes, Tier.STORE)
    for source in ("approx", "index"):
        a = SGLangCacheAware(source=source).decide(req, ws("a", "b"), with_store)
        b = SGLangCacheAware(source=source).decide(req, ws("a", "b"), without)
        assert (a.worker_id, a.totals, a.prefill_tokens) == (b.worker_id, b.totals, b.prefill_tokens)
