"""Profile YAML loading: shipped profiles, files, dicts, and clear errors for every mistake."""

import pytest

from scheduler.framework import ProfilePolicy
from scheduler.pickers import MaxScore, Softmax
from scheduler.profile import PROFILES_DIR, ProfileError, load_profile
from scheduler.scorers import KVUtilizationScorer, PrefixCacheScorer, QueueScorer, TTFTScorer


def test_shipped_profiles_load_by_name():
    names = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    assert names == ["default", "dynamo", "least-loaded", "llm-d", "random", "round-robin"]
    for name in names:
        assert isinstance(load_profile(name), ProfilePolicy)


def test_default_is_the_ttft_cost_model():
    p = load_profile("default")
    assert p.name == "ours"
    ((ttft, w),) = p.scorers
    assert isinstance(ttft, TTFTScorer) and w == 1.0
    assert (ttft.work_weight, ttft.pressure_cap, ttft.load_scaled, ttft.hit_scaled) == (48.0, 4.0, True, True)
    assert (ttft.track_steps, ttft.batch_weight, ttft.batch_window_s, ttft.stall_weight) == (True, 1.0, 0.01, 0.1)
    assert isinstance(p.picker, MaxScore) and p.picker.tie_break == "lru"
    assert p.overlay is not None and p.overlay.ttl_s == 20
    assert [f.name for f in p.filters] == ["model", "routable", "role"]


def test_llm_d_profile_has_its_published_weights():
    p = load_profile("llm-d")
    assert [(type(s), w) for s, w in p.scorers] == [(PrefixCacheScorer, 3.0), (QueueScorer, 2.0),
                                                     (KVUtilizationScorer, 2.0)]
    assert p.scorers[0][0].normalize == "minmax"


def test_dynamo_profile_uses_softmax_at_temperature_zero():
    p = load_profile("dynamo")
    assert isinstance(p.picker, Softmax) and p.picker.temperature == 0.0
    assert p.scorers[0][0].overlap_weight == 1.0


def test_from_a_dict_and_from_a_file(tmp_path):
    spec = {"name": "mine", "scorers": [{"name": "queue", "weight": 2}, "running"],
            "picker": {"name": "weighted-random", "params": {"seed": 1}}}
    p = load_profile(spec)
    assert p.name == "mine" and [(s.name, w) for s, w in p.scorers] == [("queue", 2.0), ("running", 1.0)]
    assert [f.name for f in p.filters] == ["model", "routable", "role"]  # the default filters
    path = tmp_path / "custom.yaml"
    path.write_text("filters: [model, {name: role, params: {allowed: [prefill]}}]\nscorers:\n"
                    "  - {name: kv-utilization, weight: 0.5}\n")
    p = load_profile(path)
    assert p.name == "custom" and [f.name for f in p.filters] == ["model", "role"]
    assert isinstance(p.picker, MaxScore) and p.scorers[0][1] == 0.5


@pytest.mark.parametrize("spec, message", [
    ({"scorers": [{"name": "prefix-cach"}]}, "unknown scorer 'prefix-cach'; known: kv-cost"),
    ({"scorers": [{"name": "queue", "weight": -1}]}, "scorer 'queue' has weight -1"),
    ({"scorers": [{"name": "queue", "weight": "high"}]}, "has weight 'high'"),
    ({"scorers": [{"name": "queue", "weight": float("nan")}]}, "has weight nan"),
    ({"scorers": [{"name": "queue", "weight": True}]}, "has weight True"),
    ({"scorers": [{"name": "ttft", "params": {"speed": 5}}]}, "scorer 'ttft': bad params"),
    ({"scorers": [{"name": "prefix-cache", "params": {"tier_weights": {"gpu": 1}}}]}, "unknown tier 'gpu'"),
    ({"scorers": [{"name": "queue", "wieght": 2}]}, "unknown key(s) ['wieght']"),
    ({"scorers": {"queue": 1}}, "scorers must be a list"),
    ({"picker": "best"}, "unknown picker 'best'"),
    ({"picker": {"name": "softmax", "params": {"temperature": -1}}}, "temperature must be >= 0"),
    ({"filters": ["gpu"]}, "unknown filter 'gpu'"),
    ({"filters": [{"name": "role", "params": {"allowed": ["leader"]}}]}, "unknown role 'leader'"),
    ({"scorer": []}, "unknown key(s) ['scorer']"),
    ({"speculative": {"ttl": 5}}, "speculative"),
    ([1, 2], "a profile is a mapping"),
    ({"rule": "sglang-ish"}, "unknown rule 'sglang-ish'; known: mooncake, sglang"),
    ({"rule": "sglang", "scorers": []}, "unknown key(s) ['scorers'] beside rule"),
    ({"rule": "sglang", "params": {"threshold": 0.5}}, "rule 'sglang': bad params"),
    ({"rule": "sglang", "params": [0.5]}, "params must be a mapping"),
    ({"rule": "sglang", "params": {"filters": "model"}}, "filters must be a list"),
    ({"rule": "sglang", "params": {"filters": ["gpu"]}}, "unknown filter 'gpu'"),
    ({"rule": "mooncake", "params": {"step_overhead_s": -0.001}}, "step_overhead_s and default_request_tokens"),
    ({"rule": "mooncake", "params": {"prefill_tokens_per_s": 0}}, "must be positive"),
])
def test_mistakes_are_reported_clearly(spec, message):
    with pytest.raises(ProfileError) as err:
        load_profile(spec)
    assert message in str(err.value)


def test_unknown_profile_name_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="no profile 'fastest'.*default, dynamo"):
        load_profile("fastest")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorers: [\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(bad)


def test_a_rule_based_peer_from_a_profile():
    from scheduler.policies import MooncakeConductor, SGLangCacheAware, policy_by_name, policy_spec

    p = load_profile({"name": "mooncake-fast", "rule": "mooncake",
                      "params": {"step_overhead_s": 0.0005, "prefill_tokens_per_s": 40000}})
    assert isinstance(p, MooncakeConductor) and p.name == "mooncake-fast"
    assert (p.overhead, p.speed, p.transfer_speed) == (0.0005, 40000, 50_000.0)  # the rest: defaults
    s = load_profile({"rule": "sglang", "params": {"filters": ["model"], "cache_threshold": 0.5}})
    assert isinstance(s, SGLangCacheAware) and s.name == "sglang" and s.cache_threshold == 0.5
    assert [f.name for f in s.filters] == ["model"]
    # policy_spec gives back each named policy as a profile that builds the same thing.
    for name in ("ours", "llm-d", "sglang", "mooncake"):
        spec = policy_spec(name)
        assert spec["name"] == name
        assert type(load_profile(spec)) is type(policy_by_name(name))
    assert policy_spec("mooncake")["params"]["step_overhead_s"] == 0.002
    with pytest.raises(ValueError, match="unknown policy 'fastest'"):
        policy_spec("fastest")
