"""Filters: `admit` (a whole list in one pass, what decisions use) gives `reject`'s verdicts."""

import itertools
import random

import pytest

from scheduler.filters import FILTERS, ModelFilter, RoleFilter, RoutableFilter
from scheduler.framework import RequestView, Role, WorkerState, apply_filters


def _random_workers(rng: random.Random, n: int) -> list[WorkerState]:
    workers = []
    for i in range(n):
        w = WorkerState(f"w{i}", rng.choice(["m", "other"]), 8, role=rng.choice(list(Role)),
                        routable=rng.random() < 0.8)
        if rng.random() < 0.3:
            w.circuit.failed(now=100.0, error="boom")  # open until 101
        workers.append(w)
    return workers


def _requests(rng: random.Random) -> list[RequestView]:
    out = []
    for roles, now in itertools.product(
            [None, frozenset({Role.PREFILL}), frozenset({Role.BOTH, Role.DECODE}),
             frozenset({Role.UNSPECIFIED}), frozenset(Role)], [None, 100.5, 200.0]):
        exclude = frozenset(f"w{rng.randrange(20)}" for _ in range(3))
        out.append(RequestView("m", 64, [1, 2, 3, 4], 16, roles=roles, exclude=exclude, now=now))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_admit_keeps_exactly_the_workers_reject_passes(seed):
    rng = random.Random(seed)
    workers = _random_workers(rng, 20)
    filters = [ModelFilter(), RoutableFilter(), RoleFilter(), RoleFilter(["prefill"]),
               RoleFilter(["unspecified"]), RoleFilter(["both", "prefill", "decode"])]
    rejected_somewhere = 0
    for f in filters:
        for r in _requests(rng):
            expected = [w for w in workers if f.reject(r, w) is None]
            assert f.admit(r, workers) == expected, (f.name, r)
            rejected_somewhere += len(workers) - len(expected)
    assert rejected_somewhere > 0  # the states do exercise rejections


def test_apply_filters_reports_the_first_failing_filters_reason_per_worker():
    a = WorkerState("a", "m", 8)
    b = WorkerState("b", "other", 8, routable=False)  # fails model first
    c = WorkerState("c", "m", 8, routable=False)
    d = WorkerState("d", "m", 8, role=Role.PREFILL)
    e = WorkerState("e", "m", 8, role=Role.UNSPECIFIED)  # counts as both
    filters = [FILTERS[n]() for n in ("model", "routable", "role")]
    eligible, filtered = apply_filters(filters, RequestView("m", 16, [1], 16), [a, b, c, d, e])
    assert eligible == [a, e]
    assert filtered == {"b": "serves other", "c": "not routable", "d": "role prefill not allowed"}


def test_a_filter_without_admit_is_asked_per_worker():
    class OddOnly:
        name = "odd"

        def reject(self, request, worker):
            return None if int(worker.worker_id[1:]) % 2 else "even"

    workers = [WorkerState(f"w{i}", "m", 8) for i in range(5)]
    eligible, filtered = apply_filters([ModelFilter(), OddOnly()], RequestView("m", 16, [1], 16), workers)
    assert [w.worker_id for w in eligible] == ["w1", "w3"]
    assert filtered == {"w0": "even", "w2": "even", "w4": "even"}
