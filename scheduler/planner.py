"""Scaling planner: desired prefill and decode replicas from the mesh's recent load (pure, no I/O).

In the spirit of NVIDIA Dynamo's SLA planner: every window the planner predicts the next
window's demand, converts it into replicas with the per-replica throughput the mesh measured
(or the configured profile), corrects for an observed SLO breach, and stabilizes the result.
Formula, defaults and config keys: scheduler/PLANNER.md.

    planner = Planner(PlannerConfig(ttft_p90_s=2.0))
    plan = planner.observe(sample)      # one LoadSample per window, oldest first
    plan.decode.desired, plan.prefill.desired if plan.prefill else None

Roles: "prefill" is the prefill-role pool; "decode" is every worker that decodes (decode-role and
aggregated workers). A mesh without prefill workers is aggregated: its workers prefill and
decode, the plan has only "decode" (`prefill` is None) and sizes it for both kinds of work.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

PREDICTORS = ("max", "ewma", "last")


@dataclasses.dataclass(frozen=True)
class LoadSample:
    """What one window (window_s seconds) of the mesh looked like."""

    window_s: float
    arrival_rate: float  # requests/s
    prompt_tokens_mean: float
    uncached_prompt_tokens_mean: float  # prompt tokens some worker had to compute (prefix hits excluded)
    output_tokens_mean: float
    ttft_p90_s: float | None  # None: no request finished its first token in the window
    itl_p90_s: float | None  # p90 over requests of their mean inter-token gap
    prefill_queue: int  # requests waiting for prefill (the prefill pool; aggregated: all workers)
    decode_running: int  # requests decoding in the decode pool
    kv_utilization: float  # mean KV-cache usage of the decode pool, [0, 1]
    prefill_replicas: int  # prefill-role workers now (0: aggregated mesh)
    decode_replicas: int  # decoding workers now
    prefill_tokens_per_s: float | None = None  # measured per-replica prefill speed (capacity)
    decode_tokens_per_s: float | None = None  # per decode replica, generated in this window

    @property
    def prefill_demand(self) -> float:
        """Uncached prompt tokens/s arriving."""
        return self.arrival_rate * self.uncached_prompt_tokens_mean

    @property
    def decode_demand(self) -> float:
        """Output tokens/s to generate."""
        return self.arrival_rate * self.output_tokens_mean


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """The `planner:` section of a profile (scheduler/PLANNER.md)."""

    ttft_p90_s: float = 2.0  # SLO
    itl_p90_s: float = 0.05  # SLO
    predictor: str = "max"  # max of the last `lookback_windows` | ewma | last
    lookback_windows: int = 3
    ewma_alpha: float = 0.5
    # Per-replica capacity until measured (prefill) or as the profiled floor (decode: a window's
    # output only shows what the load asked for, so a measurement can only raise this).
    prefill_tokens_per_s: float = 10_000.0
    decode_tokens_per_s: float = 2_000.0
    target_utilization: float = 0.7  # headroom: the fraction of capacity the plan fills
    max_kv_utilization: float = 0.8  # decode pool's KV usage the plan keeps under
    max_slo_correction: float = 2.0  # cap on the TTFT/ITL breach multiplier
    tolerance: float = 0.1  # |need/current - 1| within this: hold (no churn on noise)
    min_prefill_replicas: int = 1
    max_prefill_replicas: int = 16
    min_decode_replicas: int = 1
    max_decode_replicas: int = 16
    max_step: int = 2  # replicas added or removed per role per decision
    scale_down_windows: int = 4  # consecutive windows below the current count before scaling down

    def __post_init__(self) -> None:
        positive = ("ttft_p90_s", "itl_p90_s", "prefill_tokens_per_s", "decode_tokens_per_s")
        for key in positive:
            if not _number(getattr(self, key)) or getattr(self, key) <= 0:
                raise ValueError(f"{key} must be a number > 0, got {getattr(self, key)!r}")
        for key in ("target_utilization", "max_kv_utilization", "ewma_alpha"):
            value = getattr(self, key)
            if not _number(value) or not 0 < value <= 1:
                raise ValueError(f"{key} must be in (0, 1], got {value!r}")
        if not _number(self.max_slo_correction) or self.max_slo_correction < 1:
            raise ValueError(f"max_slo_correction must be >= 1, got {self.max_slo_correction!r}")
        if not _number(self.tolerance) or not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance!r}")
        for key in ("lookback_windows", "max_step", "scale_down_windows", "min_prefill_replicas",
                    "max_prefill_replicas", "min_decode_replicas", "max_decode_replicas"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
        if self.lookback_windows < 1 or self.max_step < 1 or self.scale_down_windows < 1:
            raise ValueError("lookback_windows, max_step and scale_down_windows must be >= 1")
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}_replicas"), getattr(self, f"max_{role}_replicas")
            if low > high:
                raise ValueError(f"min_{role}_replicas {low} > max_{role}_replicas {high}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {self.predictor!r}")


@dataclasses.dataclass(frozen=True)
class RoleDecision:
    role: str  # "prefill" | "decode"
    observed: int  # replicas now
    desired: int  # after bounds, step and stabilization
    required: float  # the unrounded need (replicas) before them
    reason: str  # the numbers, e.g. "12000 tok/s / (10000 tok/s x 0.70) = 1.71; TTFT p90 2.4 s > 2.0 s: x1.20"


@dataclasses.dataclass(frozen=True)
class ScalingPlan:
    prefill: RoleDecision | None  # None: aggregated mesh
    decode: RoleDecision
    predicted_prefill_tokens_per_s: float
    predicted_decode_tokens_per_s: float

    @property
    def disaggregated(self) -> bool:
        return self.prefill is not None

    def roles(self) -> list[RoleDecision]:
        return [r for r in (self.prefill, self.decode) if r is not None]


class _Predictor:
    def __init__(self, config: PlannerConfig) -> None:
        self.kind, self.alpha = config.predictor, config.ewma_alpha
        self.recent: collections.deque[float] = collections.deque(maxlen=config.lookback_windows)
        self.ewma: float | None = None

    def add(self, value: float) -> float:
        """Record this window's value; the prediction for the next one."""
        self.recent.append(value)
        self.ewma = value if self.ewma is None else self.alpha * value + (1 - self.alpha) * self.ewma
        if self.kind == "max":
            return max(self.recent)
        return self.ewma if self.kind == "ewma" else value


class _Stabilizer:
    """Bounds, max step, tolerance and scale-down stabilization for one role (as Kubernetes' HPA:
    scale down to the highest recommendation of the last N windows, so only after N in a row
    were below the current count)."""

    def __init__(self, low: int, high: int, config: PlannerConfig) -> None:
        self.low, self.high, self.config = low, high, config
        self.recent: collections.deque[int] = collections.deque(maxlen=config.scale_down_windows)

    def decide(self, required: float, observed: int) -> tuple[int, str]:
        c = self.config
        if observed > 0 and abs(required / observed - 1) <= c.tolerance:
            target = observed
        else:
            target = math.ceil(required - 1e-9)
        target = min(self.high, max(self.low, target))
        self.recent.append(target)
        if target > observed:
            desired, note = min(target, observed + c.max_step), ""
        elif target == observed:
            desired, note = observed, ""
        elif len(self.recent) < c.scale_down_windows or max(self.recent) >= observed:
            below = sum(t < observed for t in self.recent)
            desired, note = observed, f"scale-down held ({below}/{c.scale_down_windows} windows below)"
        else:
            desired, note = max(max(self.recent), observed - c.max_step), ""
        # The bounds are hard (a cost cap, a floor for availability): outside them, comply at once.
        bounded = min(self.high, max(self.low, desired))
        return bounded, note if bounded == desired else f"bounded to [{self.low}, {self.high}]"


class Planner:
    """Feed one LoadSample per window; each call returns the plan for the next window."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        c = self.config
        self._prefill_demand = _Predictor(c)
        self._decode_demand = _Predictor(c)
        self._prefill = _Stabilizer(c.min_prefill_replicas, c.max_prefill_replicas, c)
        self._decode = _Stabilizer(c.min_decode_replicas, c.max_decode_replicas, c)
        self._decode_capacity = c.decode_tokens_per_s  # raised by windows that met the ITL SLO

    def observe(self, sample: LoadSample) -> ScalingPlan:
        c = self.config
        prefill_tps = self._prefill_demand.add(sample.prefill_demand)
        decode_tps = self._decode_demand.add(sample.decode_demand)
        itl_ok = sample.itl_p90_s is None or sample.itl_p90_s <= c.itl_p90_s
        if itl_ok and sample.decode_tokens_per_s:
            self._decode_capacity = max(self._decode_capacity, sample.decode_tokens_per_s)
        prefill_cap = sample.prefill_tokens_per_s or c.prefill_tokens_per_s
        ttft_factor = _breach(sample.ttft_p90_s, c.ttft_p90_s, c.max_slo_correction)
        itl_factor = _breach(sample.itl_p90_s, c.itl_p90_s, c.max_slo_correction)
        # Backlog: prompts already queued must be prefilled in the next window on top of new ones.
        backlog_tps = sample.prefill_queue * sample.uncached_prompt_tokens_mean / sample.window_s
        # KV: usage grows with the decode load; keep it under max_kv_utilization.
        growth = decode_tps / sample.decode_demand if sample.decode_demand > 0 else 1.0
        kv_need = sample.decode_replicas * sample.kv_utilization * growth / c.max_kv_utilization
        if sample.prefill_replicas > 0:
            p_need = (prefill_tps + backlog_tps) / (prefill_cap * c.target_utilization) * ttft_factor
            p_why = (f"{prefill_tps + backlog_tps:.0f} tok/s / ({prefill_cap:.0f} tok/s x "
                     f"{c.target_utilization:.2f}){_factor_note('TTFT', sample.ttft_p90_s, c.ttft_p90_s, ttft_factor)}")
            d_tput = decode_tps / (self._decode_capacity * c.target_utilization) * itl_factor
            d_why = (f"{decode_tps:.0f} tok/s / ({self._decode_capacity:.0f} tok/s x {c.target_utilization:.2f})"
                     f"{_factor_note('ITL', sample.itl_p90_s, c.itl_p90_s, itl_factor)}")
            prefill = self._role("prefill", self._prefill, p_need, sample.prefill_replicas, p_why)
        else:
            # Aggregated: each worker's time is shared between prefill and decode steps.
            busy = ((prefill_tps + backlog_tps) / prefill_cap + decode_tps / self._decode_capacity)
            d_tput = busy / c.target_utilization * max(ttft_factor, itl_factor)
            d_why = (f"({prefill_tps + backlog_tps:.0f} / {prefill_cap:.0f} + {decode_tps:.0f} / "
                     f"{self._decode_capacity:.0f}) / {c.target_utilization:.2f}"
                     f"{_factor_note('TTFT', sample.ttft_p90_s, c.ttft_p90_s, ttft_factor)}"
                     f"{_factor_note('ITL', sample.itl_p90_s, c.itl_p90_s, itl_factor)}")
            prefill = None
        if kv_need > d_tput:
            d_need, d_why = kv_need, (f"KV {sample.kv_utilization:.2f} x {sample.decode_replicas} x growth "
                                      f"{growth:.2f} / {c.max_kv_utilization:.2f}")
        else:
            d_need = d_tput
        decode = self._role("decode", self._decode, d_need, sample.decode_replicas, d_why)
        return ScalingPlan(prefill, decode, prefill_tps, decode_tps)

    @staticmethod
    def _role(role: str, stabilizer: _Stabilizer, need: float, observed: int, why: str) -> RoleDecision:
        desired, note = stabilizer.decide(need, observed)
        reason = f"{why} = {need:.2f}" + (f"; {note}" if note else "")
        return RoleDecision(role, observed, desired, need, reason)


def plan_series(samples: Iterable[LoadSample], config: PlannerConfig | None = None) -> list[ScalingPlan]:
    """The plans a planner would publish over a recorded series, one per sample."""
    planner = Planner(config)
    return [planner.observe(s) for s in samples]


def _breach(observed: float | None, slo: float, cap: float) -> float:
    """Multiplier on the need when the observed p90 exceeds its SLO (1 when within it)."""
    if observed is None or observed <= slo:
        return 1.0
    return min(cap, observed / slo)


def _factor_note(name: str, observed: float | None, slo: float, factor: float) -> str:
    return f" x{factor:.2f} ({name} p90 {observed:.3f} s > {slo:.3f} s)" if factor > 1 else ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
