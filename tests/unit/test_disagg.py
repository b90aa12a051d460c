"""The per-request P/D decision (scheduler/disagg.py) on hand-built states: every branch of the
rule, thresholds from the profile YAML, and the invariants on roles."""

import pytest

from scheduler.disagg import DisaggConfig, Disaggregator
from scheduler.framework import RequestView, Role, WorkerState
from scheduler.index import BlockIndex
from scheduler.policies import policy_by_name
from scheduler.profile import ProfileError, load_profile

BS = 16


def worker(wid: str, role: Role, **kw) -> WorkerState:
    return WorkerState(wid, "m", max_num_seqs=16, role=role, block_size=BS, kv_blocks_total=4096, **kw)


def request(blocks: int, first: int = 100) -> RequestView:
    return RequestView("m", blocks * BS, list(range(first, first + blocks)), BS)


def cluster(prefill: int = 2, decode: int = 2) -> list[WorkerState]:
    return ([worker(f"p{i}", Role.PREFILL) for i in range(prefill)]
            + [worker(f"d{i}", Role.DECODE) for i in range(decode)])


def test_long_uncached_prompt_prefills_remotely_on_a_prefill_worker():
    pd = Disaggregator(policy_by_name("ours"))
    d = pd.decide(request(64), cluster(), BlockIndex())  # 1024 uncached tokens everywhere
    assert d.remote and d.rule == "remote"
    assert d.decode_worker in {"d0", "d1"} and d.prefill_worker in {"p0", "p1"}
    assert d.uncached_tokens == 1024 and d.decode_prefill_tokens == 0
    assert d.reason == f"remote: 1024 uncached tokens >= 64, prefill on {d.prefill_worker}"


def test_threshold_is_on_the_uncached_tokens_at_the_chosen_decode_worker():
    ix = BlockIndex()
    req = request(64)
    ix.stored("d1", "m", req.block_hashes[:61])  # d1 holds all but 3 blocks = 48 tokens
    d = Disaggregator(policy_by_name("ours")).decide(req, cluster(), ix)
    assert d.decode_worker == "d1" and not d.remote and d.rule == "below-threshold"
    assert d.reason == "local: 48 uncached tokens < 64"
    assert d.prefill_worker == "d1" and d.decode_prefill_tokens == 48
    # Exactly at the threshold goes remote.
    ix2 = BlockIndex()
    ix2.stored("d1", "m", req.block_hashes[:60])  # 4 blocks left = 64 tokens
    d2 = Disaggregator(policy_by_name("ours")).decide(req, cluster(), ix2)
    assert d2.decode_worker == "d1" and d2.uncached_tokens == 64 and d2.remote


def test_no_prefill_worker_routes_exactly_as_the_policy_alone():
    for roles in ([Role.BOTH] * 3, [Role.DECODE] * 3):
        workers = [worker(f"w{i}", r) for i, r in enumerate(roles)]
        workers[0].reported_waiting = 2
        ix = BlockIndex()
        ix.stored("w2", "m", request(64).block_hashes[:8])
        alone = policy_by_name("ours").decide(request(64), workers, ix, dry_run=True)
        d = Disaggregator(policy_by_name("ours")).decide(request(64), workers, ix, dry_run=True)
        assert not d.remote and d.rule == "no-prefill-worker" and d.reason == "local: no prefill worker"
        assert d.decode.worker_id == alone.worker_id == "w2"
        assert d.decode.totals == alone.totals and d.decode.prefill_tokens == alone.prefill_tokens


def test_overloaded_prefill_pool_prefills_locally():
    workers = cluster()
    workers[0].reported_waiting = 9
    workers[1].reported_waiting = 12
    d = Disaggregator(policy_by_name("ours")).decide(request(64), workers, BlockIndex())
    assert not d.remote and d.rule == "prefill-pool-overloaded"
    assert d.reason == "local: prefill pool queue 9 > 8"
    workers[0].reported_waiting = 8  # one worker at the limit: the pool is not overloaded
    d = Disaggregator(policy_by_name("ours")).decide(request(64), workers, BlockIndex())
    assert d.remote and d.prefill_worker == "p0"


def test_unroutable_prefill_workers_do_not_count():
    workers = cluster()
    workers[0].routable = False
    workers[1].model = "other"
    d = Disaggregator(policy_by_name("ours")).decide(request(64), workers, BlockIndex())
    assert not d.remote and d.rule == "no-prefill-worker"


def test_prefill_picker_prefers_the_prefill_worker_holding_the_prefix():
    ix = BlockIndex()
    req = request(128)
    ix.stored("p1", "m", req.block_hashes[:96])
    d = Disaggregator(policy_by_name("ours")).decide(req, cluster(), ix)
    assert d.remote and d.prefill_worker == "p1"
    assert d.prefill is not None and d.prefill.prefill_tokens == 32 * BS
    # ... and its queue: the same prefix holder with a long queue loses to an idle peer.
    workers = cluster()
    workers[1].reported_waiting = 6
    workers[1].pending_prefill_tokens = 6 * 2048
    workers[1].pending_prefill = 6
    d = Disaggregator(policy_by_name("ours")).decide(req, workers, ix)
    assert d.remote and d.prefill_worker == "p0"


def test_prefill_worker_is_never_the_decode_worker_whatever_the_profile():
    # A profile without the role filter would take any worker; the disaggregator never offers it one.
    policy = load_profile({"name": "no-roles", "filters": ["model"], "scorers": [{"name": "queue"}]})
    workers = cluster(prefill=3, decode=1)
    workers[3].reported_waiting = 10  # the only decode worker is the worst-scored
    d = Disaggregator(policy).decide(request(64), workers, BlockIndex())
    assert d.decode_worker == "d0" and d.prefill_worker in {"p0", "p1", "p2"}
    only_prefill = Disaggregator(policy).decide(request(64), cluster(decode=0), BlockIndex())
    assert only_prefill.decode_worker is None and only_prefill.rule == "unrouted" and not only_prefill.remote
    assert only_prefill.reason == "unrouted: no workers"


def test_thresholds_come_from_the_profile_yaml(tmp_path):
    path = tmp_path / "pd.yaml"
    path.write_text("name: pd\nscorers: [{name: ttft}]\n"
                    "disaggregation: {remote_prefill_min_tokens: 2048, max_prefill_queue: 1}\n")
    pd = Disaggregator(load_profile(path))
    assert pd.config == DisaggConfig(remote_prefill_min_tokens=2048, max_prefill_queue=1)
    d = pd.decide(request(64), cluster(), BlockIndex())
    assert not d.remote and d.reason == "local: 1024 uncached tokens < 2048"
    workers = cluster()
    for w in workers[:2]:
        w.reported_waiting = 2
    d = pd.decide(request(256), workers, BlockIndex())
    assert d.reason == "local: prefill pool queue 2 > 1"
    # Shipped profiles: ours states the defaults, llm-d its published 16.
    assert load_profile("default").disagg == DisaggConfig()
    assert load_profile("llm-d").disagg.remote_prefill_min_tokens == 16
    assert load_profile("random").disagg == DisaggConfig()  # no section: defaults


def test_an_explicit_config_and_prefill_profile_override_the_profile():
    prefill_profile = {"filters": ["model", {"name": "role", "params": {"allowed": ["prefill"]}}],
                       "scorers": [{"name": "queue"}], "picker": "round-robin"}
    pd = Disaggregator(policy_by_name("llm-d"), DisaggConfig(remote_prefill_min_tokens=512,
                                                             prefill_profile=prefill_profile))
    picks = [pd.decide(request(64), cluster(), BlockIndex()).prefill_worker for _ in range(3)]
    assert picks == ["p0", "p1", "p0"]  # round-robin: the configured prefill profile is used
    assert pd.decide(request(16), cluster(), BlockIndex()).rule == "below-threshold"  # 256 < 512
    assert pd.decide(request(32), cluster(), BlockIndex()).remote  # 512


@pytest.mark.parametrize("section, match", [
    ({"remote_prefill_min_tokens": -1}, "remote_prefill_min_tokens must be an integer >= 0"),
    ({"max_prefill_queue": 1.5}, "max_prefill_queue must be an integer >= 0"),
    ({"threshold": 16}, r"unknown key\(s\) \['threshold'\]"),
    ([16], "disaggregation must be a mapping"),
])
def test_bad_disaggregation_sections_are_refused(section, match):
    with pytest.raises(ProfileError, match=match):
        load_profile({"scorers": [{"name": "queue"}], "disaggregation": section})


def test_dry_run_changes_nothing_and_a_real_decision_commits_both_legs():
    workers = cluster()
    pd = Disaggregator(policy_by_name("ours"))
    before = [w.last_picked for w in workers]
    d = pd.decide(request(64), workers, BlockIndex(), dry_run=True)
    assert d.remote and [w.last_picked for w in workers] == before
    d = pd.decide(request(64), workers, BlockIndex())
    chosen = {w.worker_id: w.last_picked for w in workers if w.last_picked}
    assert set(chosen) == {d.decode_worker, d.prefill_worker}


def test_an_aggregated_decode_choice_prefills_locally():
    """A BOTH-role worker runs no KV connector: it cannot pull a remote prefill's KV."""
    workers = [worker("p0", Role.PREFILL), worker("b0", Role.BOTH)]
    d = Disaggregator(policy_by_name("ours")).decide(request(64), workers, BlockIndex())
    assert d.decode_worker == "b0" and not d.remote and d.rule == "aggregated-decode-worker"
    assert d.reason == "local: b0 is an aggregated worker" and d.decode_prefill_tokens == 1024
