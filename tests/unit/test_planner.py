"""The scaling planner on a recorded load series (tests/data/planner_series.json, recorded from the
discrete-event simulator by tests/data/record_planner_series.py: a 4 prefill + 6 decode cluster,
Mooncake conversation requests at 3 req/s, ramping to 10, holding, then dropping to 1.5)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

from scheduler.planner import LoadSample, Planner, PlannerConfig, ScalingPlan, plan_series
from scheduler.profile import ProfileError, load_profile

SERIES = json.loads((pathlib.Path(__file__).parents[1] / "data" / "planner_series.json").read_text())
PHASES = [row["phase"] for row in SERIES["samples"]]
SAMPLES = [LoadSample(**{k: v for k, v in row.items() if k != "phase"}) for row in SERIES["samples"]]
CONFIG = PlannerConfig(ttft_p90_s=3.0, itl_p90_s=0.05, max_prefill_replicas=12, max_decode_replicas=12)


def indices(phase: str) -> list[int]:
    return [i for i, p in enumerate(PHASES) if p == phase]


def closed_loop(config: PlannerConfig, samples: list[LoadSample] = SAMPLES) -> list[ScalingPlan]:
    """Replay as if each plan were applied before the next window: the replica counts follow the
    plan (the recorded KV usage spreads over them); the demand is the recorded one."""
    planner = Planner(config)
    prefill, decode = samples[0].prefill_replicas, samples[0].decode_replicas
    plans = []
    for s in samples:
        kv = s.kv_utilization * s.decode_replicas / max(1, decode)
        plan = planner.observe(dataclasses.replace(s, prefill_replicas=prefill, decode_replicas=decode,
                                                   kv_utilization=kv))
        plans.append(plan)
        prefill, decode = plan.prefill.desired, plan.decode.desired
    return plans


def desired(plans: list[ScalingPlan], role: str) -> list[int]:
    return [getattr(p, role).desired for p in plans]


def reversals(values: list[int]) -> int:
    """Changes of direction (up then down, or down then up), ignoring holds."""
    steps = [b - a for a, b in zip(values, values[1:]) if b != a]
    return sum(1 for a, b in zip(steps, steps[1:]) if (a > 0) != (b > 0))


def test_the_fixture_has_the_recorded_shape():
    assert [p for i, p in enumerate(PHASES) if i == 0 or PHASES[i - 1] != p] == \
        ["steady-low", "ramp", "steady-high", "drop"]
    low = [SAMPLES[i].prefill_demand for i in indices("steady-low")]
    high = [SAMPLES[i].prefill_demand for i in indices("steady-high")]
    assert sum(high) / len(high) > 2.5 * sum(low) / len(low)
    assert all(SAMPLES[i].ttft_p90_s > CONFIG.ttft_p90_s for i in indices("steady-high"))  # overloaded
    assert all(SAMPLES[i].ttft_p90_s < CONFIG.ttft_p90_s for i in indices("steady-low"))


def test_ramps_up_when_load_rises():
    plans = closed_loop(CONFIG)
    rising = indices("ramp") + indices("steady-high")
    for role in ("prefill", "decode"):
        values = [desired(plans, role)[i] for i in rising]
        assert values == sorted(values), f"{role} went down while load rose: {values}"
    low_p = max(desired(plans, "prefill")[i] for i in indices("steady-low"))
    high_p = min(desired(plans, "prefill")[i] for i in indices("steady-high"))
    assert high_p >= 2 * low_p
    # Enough prefill replicas for the high phase's demand at the target utilization.
    demand = max(SAMPLES[i].prefill_demand for i in indices("steady-high"))
    assert high_p >= min(CONFIG.max_prefill_replicas,
                         math.ceil(demand / (CONFIG.prefill_tokens_per_s * CONFIG.target_utilization)))
    assert desired(plans, "decode")[indices("steady-high")[-1]] > desired(plans, "decode")[indices("ramp")[0]]


def test_holds_steady_load_steady():
    plans = closed_loop(CONFIG)
    for role in ("prefill", "decode"):
        values = desired(plans, role)
        for phase in ("steady-low", "steady-high", "drop"):
            part = [values[i] for i in indices(phase)]
            assert reversals(part) == 0, f"{role} flapped in {phase}: {part}"
        # The whole series: up for the ramp, down for the drop (decode also sheds its initial excess).
        assert reversals(values) <= (1 if role == "prefill" else 2), f"{role}: {values}"
    assert len({desired(plans, "prefill")[i] for i in indices("steady-low")}) == 1
    assert len({desired(plans, "prefill")[i] for i in indices("steady-high")}) == 1


def test_without_stabilization_the_same_series_flaps():
    """The series is noisy enough that hysteresis is what keeps it steady (the test above has teeth)."""
    bare = dataclasses.replace(CONFIG, scale_down_windows=1, tolerance=0.0, predictor="last")
    values = desired(closed_loop(bare), "prefill")
    assert reversals(values) >= 3


@pytest.mark.parametrize("windows", [2, 4, 6])
def test_scales_down_only_after_the_stabilization_window(windows):
    config = dataclasses.replace(CONFIG, scale_down_windows=windows)
    plans = closed_loop(config)
    for role in ("prefill", "decode"):
        for i, plan in enumerate(plans):
            decision = getattr(plan, role)
            if decision.desired < decision.observed:
                recent = [getattr(p, role).required for p in plans[max(0, i - windows + 1): i + 1]]
                assert i >= windows - 1 and all(r < decision.observed for r in recent), (role, i, recent)
    drop = indices("drop")
    before = desired(plans, "prefill")[drop[0] - 1]
    first_down = next(i for i in drop if desired(plans, "prefill")[i] < before)
    assert first_down >= drop[0] + windows - 1
    assert desired(plans, "prefill")[-1] < before  # and it does come down


def test_respects_bounds_and_step():
    config = dataclasses.replace(CONFIG, min_prefill_replicas=2, max_prefill_replicas=6, min_decode_replicas=2,
                                 max_decode_replicas=4, max_step=1)
    for plans in (closed_loop(config), plan_series(SAMPLES, config)):
        for plan in plans:
            for role, low, high in (("prefill", 2, 6), ("decode", 2, 4)):
                d = getattr(plan, role)
                assert low <= d.desired <= high
                if low <= d.observed <= high:
                    assert abs(d.desired - d.observed) <= 1
    plans = closed_loop(config)
    assert max(desired(plans, "prefill")) == 6 and min(desired(plans, "decode")) == 2


def test_reacts_to_an_slo_breach():
    corrected, uncorrected = plan_series(SAMPLES, CONFIG), plan_series(
        SAMPLES, dataclasses.replace(CONFIG, max_slo_correction=1.0))
    breached = 0
    for s, a, b in zip(SAMPLES, corrected, uncorrected):
        ratio = a.prefill.required / b.prefill.required
        if s.ttft_p90_s is not None and s.ttft_p90_s > CONFIG.ttft_p90_s:
            breached += 1
            assert ratio == pytest.approx(min(2.0, s.ttft_p90_s / CONFIG.ttft_p90_s))
            assert "TTFT p90" in a.prefill.reason
        else:
            assert ratio == pytest.approx(1.0)
    assert breached >= 6
    # ITL: a tighter SLO that the overloaded windows miss asks for more decode replicas there.
    tight = dataclasses.replace(CONFIG, itl_p90_s=0.012)
    raised = 0
    for s, a, b in zip(SAMPLES, plan_series(SAMPLES, tight), uncorrected):
        if s.itl_p90_s > 0.012:
            assert a.decode.required >= b.decode.required  # (the KV need may still dominate)
            raised += a.decode.required > b.decode.required
        else:
            assert a.decode.required == pytest.approx(b.decode.required)
    assert raised >= 3


def test_aggregated_mesh_plans_only_decode_for_both_kinds_of_work():
    aggregated = [dataclasses.replace(s, prefill_replicas=0, decode_replicas=10) for s in SAMPLES]
    config = dataclasses.replace(CONFIG, max_decode_replicas=32, max_slo_correction=1.0)
    plans, pd = plan_series(aggregated, config), plan_series(SAMPLES, config)
    assert all(p.prefill is None and not p.disaggregated and [r.role for r in p.roles()] == ["decode"]
               for p in plans)
    for a, d in zip(plans, pd):
        # The workers' time is shared: the need covers the prefill pool's work plus the decoding.
        decoding = d.predicted_decode_tokens_per_s / (config.decode_tokens_per_s * config.target_utilization)
        assert a.decode.required >= d.prefill.required + decoding - 1e-9
    assert min(plans[i].decode.desired for i in indices("steady-high")) > \
        max(plans[i].decode.desired for i in indices("steady-low"))


def test_profile_planner_section():
    policy = load_profile({"name": "p", "scorers": [], "planner": {"ttft_p90_s": 1.5, "max_step": 3}})
    assert policy.planner == PlannerConfig(ttft_p90_s=1.5, max_step=3)
    assert load_profile("default").planner == PlannerConfig()
    with pytest.raises(ProfileError, match="planner: unknown key"):
        load_profile({"name": "p", "planner": {"ttft_slo": 1}})
    with pytest.raises(ProfileError, match="min_decode_replicas 5 > max_decode_replicas 2"):
        load_profile({"name": "p", "planner": {"min_decode_replicas": 5, "max_decode_replicas": 2}})
    with pytest.raises(ProfileError, match="predictor"):
        load_profile({"name": "p", "planner": {"predictor": "prophet"}})


def test_mesh_demand_sums_worker_counter_deltas():
    from llm_mesh.v1.worker_pb2 import WorkerLoad
    from scheduler.framework import Role
    from services.planner_loop import mesh_demand

    def load(**counters) -> WorkerLoad:
        return WorkerLoad(**counters)

    previous = {"p": load(prompt_tokens=1000, requests_finished=4, generated_tokens=4),
                "d": load(prompt_tokens=1000, cached_prompt_tokens=100, kv_transferred_prompt_tokens=800,
                          requests_finished=4, generated_tokens=400),
                "restarted": load(prompt_tokens=5000, requests_finished=50, generated_tokens=5000)}
    current = {"p": (Role.PREFILL, load(prompt_tokens=3000, cached_prompt_tokens=500, requests_finished=6,
                                        generated_tokens=6)),
               "d": (Role.DECODE, load(prompt_tokens=3000, cached_prompt_tokens=200, kv_transferred_prompt_tokens=2400,
                                       requests_finished=6, generated_tokens=700)),
               "restarted": (Role.BOTH, load(prompt_tokens=100, requests_finished=1, generated_tokens=10)),
               "new": (Role.BOTH, load(prompt_tokens=9999, requests_finished=99, generated_tokens=9999))}
    demand = mesh_demand(previous, current)
    # prefill legs (p) add compute only; d: 2000 prompt, 100 cached, 1600 pulled; restarted: counts from 0.
    assert demand.finished == 2 + 1 and demand.prompt_tokens == 2000 + 100
    assert demand.computed_prompt_tokens == (2000 - 500) + (2000 - 100 - 1600) + 100
    assert demand.generated_tokens == 300 + 10
