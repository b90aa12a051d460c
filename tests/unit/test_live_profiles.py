"""The live bench's profiles: every policy constant in time units follows the compressed cluster."""

import inspect

import pytest

from scheduler.policies import POLICY_NAMES, RULE_POLICIES, policy_spec
from scheduler.profile import load_profile
from services.bench.live import compress_time

# Numeric profile keys that are not times or rates: counts, weights, ratios, sizes. A new key in
# time units must end in `_s` (or `_per_s` for a rate), or the live bench leaves it uncompressed.
DIMENSIONLESS = {"balance_abs_threshold", "balance_rel_threshold", "batch_weight", "cache_threshold",
                 "default_request_tokens", "max_blocks", "max_prefill_queue", "max_tree_blocks", "overlap_weight",
                 "pressure_cap", "remote_prefill_min_tokens", "stall_weight", "stride", "temperature", "weight",
                 "work_weight"}


def _numeric_keys(value, key=""):
    if isinstance(value, dict):
        return set().union(*(_numeric_keys(v, k) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_numeric_keys(v, key) for v in value)) if value else set()
    return {key} if isinstance(value, (int, float)) and not isinstance(value, bool) else set()


def test_ours_constants_for_a_4x_faster_cluster():
    spec = compress_time(policy_spec("ours"), 4.0)
    (ttft,) = spec["scorers"]
    p = ttft["params"]
    assert (p["step_overhead_s"], p["request_duration_s"], p["batch_window_s"]) == (0.0005, 0.5, 0.0025)
    assert p["prefill_tokens_per_s"] == 40_000
    assert p["load_tokens_per_s"] == {"host": 800_000, "disk": 80_000, "store": 200_000}
    assert (p["work_weight"], p["pressure_cap"], p["default_request_tokens"]) == (48.0, 4.0, 1024)
    assert spec["speculative"]["ttl_s"] == 5 and spec["speculative"]["stride"] == 4
    assert spec["planner"] == {"ttft_p90_s": 0.5, "itl_p90_s": 0.0125}
    assert spec["disaggregation"] == policy_spec("ours")["disaggregation"]
    policy = load_profile(spec)
    scorer = policy.scorers[0][0]
    assert (scorer.overhead, scorer.batch_window_s, policy.overlay.ttl_s) == (0.0005, 0.0025, 5)


def test_mooncake_constants_for_a_2x_faster_cluster():
    p = compress_time(policy_spec("mooncake"), 2.0)["params"]
    assert (p["step_overhead_s"], p["prefill_tokens_per_s"], p["transfer_tokens_per_s"]) == (0.001, 20_000, 100_000)
    assert p["ttft_slo_s"] is None and p["default_request_tokens"] == 1024
    policy = load_profile(compress_time(policy_spec("mooncake"), 2.0))
    assert (policy.overhead, policy.speed) == (0.001, 20_000)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_numeric_constant_is_a_time_a_rate_or_known_dimensionless(name):
    keys = _numeric_keys(policy_spec(name))
    untimed = {k for k in keys if not k.endswith("_s")} - DIMENSIONLESS
    # per-tier speeds sit under load_tokens_per_s (compressed as a mapping)
    assert untimed <= {"engine", "host", "disk", "store"}, untimed
    if name in RULE_POLICIES:  # every numeric constructor default is in the spec
        defaults = {k for k, v in inspect.signature(RULE_POLICIES[name]).parameters.items()
                    if isinstance(v.default, (int, float)) and not isinstance(v.default, bool)}
        assert defaults <= keys


def test_speedup_one_changes_nothing():
    for name in POLICY_NAMES:
        assert compress_time(policy_spec(name), 1.0) == policy_spec(name)
