"""Filters: hard constraints a worker must meet before it is scored.

Each returns the reason a worker is rejected (shown by Explain) or None, and `admit` gives
the same verdict for a whole list in one pass (what a decision uses; see framework.Filter).
- `model`: the worker serves the request's model.
- `routable`: the worker accepts new requests: not draining, its circuit breaker closed
  (scheduler/resilience.py), and not one that already failed this request (failover).
- `role`: the worker's role is allowed (params `allowed`: list of prefill/decode/both;
  default [both, decode]: an aggregated request may run on a decode worker, which
  prefills locally, but never on a prefill-only worker). `RequestView.roles` overrides.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scheduler.framework import RequestView, Role, WorkerState


class ModelFilter:
    name = "model"

    def reject(self, request: RequestView, worker: WorkerState) -> str | None:
        return None if worker.model == request.model else f"serves {worker.model}"

    def admit(self, request: RequestView, workers: list[WorkerState]) -> list[WorkerState]:
        model = request.model
        return [w for w in workers if w.model == model]


class RoutableFilter:
    name = "routable"

    def reject(self, request: RequestView, worker: WorkerState) -> str | None:
        return worker.unavailable_reason(request)

    def admit(self, request: RequestView, workers: list[WorkerState]) -> list[WorkerState]:
        exclude, now = request.exclude, request.now
        return [w for w in workers if w.routable and w.worker_id not in exclude
                and (now is None or w.circuit.allows(now))]


class RoleFilter:
    name = "role"

    def __init__(self, allowed: Iterable[str] = ("both", "decode")) -> None:
        roles = []
        for r in allowed:
            try:
                roles.append(Role[str(r).upper()])
            except KeyError:
                raise ValueError(f"unknown role {r!r}; use prefill, decode or both") from None
        self.allowed = frozenset(roles)

    def reject(self, request: RequestView, worker: WorkerState) -> str | None:
        allowed = request.roles if request.roles is not None else self.allowed
        role = Role.BOTH if worker.role == Role.UNSPECIFIED else worker.role  # records from before roles
        return None if role in allowed else f"role {role.name.lower()} not allowed"

    def admit(self, request: RequestView, workers: list[WorkerState]) -> list[WorkerState]:
        allowed = request.roles if request.roles is not None else self.allowed
        # reject()'s mapping turned around: an UNSPECIFIED worker is BOTH.
        ok = {r for r in allowed if r != Role.UNSPECIFIED}
        if Role.BOTH in allowed:
            ok.add(Role.UNSPECIFIED)
        return [w for w in workers if w.role in ok]


FILTERS: dict[str, Any] = {"model": ModelFilter, "routable": RoutableFilter, "role": RoleFilter}
DEFAULT_FILTERS = ("model", "routable", "role")
