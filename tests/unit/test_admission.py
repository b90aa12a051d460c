"""Admission control: bounded in flight, fair near capacity, a retry hint that grows with the overflow."""

from __future__ import annotations

import pytest

from scheduler.admission import AdmissionConfig, AdmissionController, capacity
from scheduler.framework import Role, WorkerState


def test_capacity_counts_serving_workers_only():
    workers = [WorkerState("a", "m", 8), WorkerState("b", "m", 4, role=Role.DECODE),
               WorkerState("p", "m", 8, role=Role.PREFILL), WorkerState("x", "other", 8),
               WorkerState("d", "m", 8, routable=False)]
    assert capacity(workers, "m", 0.5) == 12 + 6
    assert capacity(workers, "m", 0.0) == 12


def test_refuses_beyond_capacity_and_admits_again_after_a_release():
    ctl = AdmissionController(AdmissionConfig(fair_from=1.0))
    assert all(ctl.try_admit("", 4) is None for _ in range(4))
    refusal = ctl.try_admit("", 4, mean_request_s=2.0)
    assert refusal is not None and "at capacity" in refusal.reason
    assert refusal.retry_after_s == pytest.approx(2.0 / 4)
    assert ctl.inflight == 4 and ctl.refused == 1  # a refusal changes nothing in flight
    ctl.release("")
    assert ctl.try_admit("", 4) is None and ctl.inflight == 4


def test_retry_hint_grows_with_the_overflow_and_is_clamped():
    ctl = AdmissionController(AdmissionConfig(max_retry_s=3.0))
    for _ in range(10):
        ctl.try_admit("", 10)
    # capacity shrank to 4 (workers left): 6 over it, a slot frees every 1 s / 4
    assert ctl.try_admit("", 4, mean_request_s=1.0).retry_after_s == pytest.approx(7 / 4)
    assert ctl.try_admit("", 1, mean_request_s=10.0).retry_after_s == 3.0
    assert ctl.try_admit("", 4).retry_after_s == AdmissionConfig().default_retry_s


def test_a_flooding_tenant_cannot_take_the_last_slots_from_the_others():
    ctl = AdmissionController(AdmissionConfig(fair_from=0.5))
    admitted = sum(ctl.try_admit("flood", 10) is None for _ in range(20))
    assert admitted == 10  # alone, it may fill everything
    for _ in range(6):
        ctl.release("flood")
    # 4 in flight of 10: below fair_from, anyone is admitted
    assert ctl.try_admit("flood", 10) is None
    # 5 in flight (>= 0.5 × 10), flood alone: its share is everything
    assert ctl.try_admit("flood", 10) is None
    assert ctl.try_admit("light", 10) is None
    # 7 in flight, two tenants: flood holds 6 >= ceil(10 / 2) → refused; light still gets in
    refusal = ctl.try_admit("flood", 10)
    assert refusal is not None and "fair share is 5" in refusal.reason
    assert ctl.try_admit("light", 10) is None
    assert ctl.by_tenant == {"flood": 6, "light": 2}


def test_release_without_admit_is_an_error_and_counts_stay_consistent():
    ctl = AdmissionController()
    with pytest.raises(ValueError):
        ctl.release("nobody")
    ctl.try_admit("t", 2)
    ctl.release("t")
    assert ctl.inflight == 0 and ctl.by_tenant == {}


def test_disabled_admits_everything_but_still_counts():
    ctl = AdmissionController(AdmissionConfig(enabled=False))
    assert all(ctl.try_admit("", 1) is None for _ in range(5))
    assert ctl.inflight == 5
