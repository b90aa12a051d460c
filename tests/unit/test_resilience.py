"""Circuit breaker and retry schedule for failover before the first token."""

from __future__ import annotations

import random

import pytest

from scheduler.resilience import Circuit, RetryPolicy


def test_circuit_opens_at_once_and_reopens_with_a_doubled_cooldown():
    c = Circuit(base_cooldown_s=1.0, max_cooldown_s=3.0)
    assert c.allows(0.0) and c.state(0.0) == "closed"
    c.failed(10.0, "UNAVAILABLE")
    assert not c.allows(10.5) and c.state(10.5) == "open"
    assert c.allows(11.0) and c.state(11.0) == "half-open"
    c.failed(11.0)
    assert not c.allows(12.9) and c.allows(13.0)  # 2 s
    c.failed(13.0)
    c.failed(16.0)
    assert c.cooldown_s == 3.0 and c.open_until == 19.0  # capped
    assert c.failures == 4 and c.last_error == ""


def test_success_closes_and_resets_the_cooldown():
    c = Circuit(base_cooldown_s=1.0)
    c.failed(0.0)
    c.failed(1.0)
    c.succeeded()
    assert c.state(1.5) == "closed"
    c.failed(2.0)
    assert c.open_until == 3.0


def test_reads_do_not_change_state():
    c = Circuit()
    c.failed(0.0)
    before = (c.cooldown_s, c.open_until, c.failures)
    for t in (0.1, 5.0, 100.0):
        c.allows(t), c.state(t)
    assert (c.cooldown_s, c.open_until, c.failures) == before


def test_backoff_doubles_with_bounded_jitter():
    policy = RetryPolicy(max_attempts=4, base_s=0.1, max_backoff_s=0.35, jitter=0.5)
    rng = random.Random(7)
    assert policy.backoff_s(0, rng) == 0.0
    for attempt, nominal in ((1, 0.1), (2, 0.2)):
        waits = [policy.backoff_s(attempt, rng) for _ in range(200)]
        assert min(waits) >= nominal * 0.5 and max(waits) <= nominal * 1.5
        assert max(waits) - min(waits) > nominal * 0.5  # jittered, not constant
    assert max(policy.backoff_s(3, rng) for _ in range(50)) <= 0.35


def test_retry_policy_validates():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.0)


def test_routable_filter_skips_open_circuits_and_workers_that_failed_the_request():
    from scheduler.framework import RequestView, WorkerState
    from scheduler.index import BlockIndex
    from scheduler.policies import policy_by_name

    workers = [WorkerState("a", "m", 4), WorkerState("b", "m", 4), WorkerState("c", "m", 4)]
    workers[0].circuit.failed(100.0, "UNAVAILABLE")
    view = RequestView.from_tokens("m", list(range(64)), 16, now=100.5, exclude=frozenset({"b"}))
    decision = policy_by_name("ours").decide(view, workers, BlockIndex(), dry_run=True)
    assert decision.worker_id == "c"
    assert decision.filtered == {"a": "circuit open (UNAVAILABLE)", "b": "failed this request"}
    later = RequestView.from_tokens("m", list(range(64)), 16, now=101.0)  # cool-down over: half-open
    assert policy_by_name("ours").decide(later, workers, BlockIndex(), dry_run=True).filtered == {}
