"""Admission control: a bounded number of requests in the mesh, fair across tenants.

Beyond capacity a request is refused at once with a retry hint (the service turns it into
RESOURCE_EXHAUSTED with google.rpc.RetryInfo / HTTP 429 with Retry-After) instead of queueing
without bound: admitted requests keep their latency, memory stays bounded under a flood.

capacity = Σ over routable serving workers (decode or aggregated; prefill-only workers hold
no request end to end) of ceil(max_num_seqs × (1 + queue_factor)): a full batch running plus
`queue_factor` of a batch waiting per worker (default 0.5 — half a batch of queued prefills
already costs an arriving prompt several prefill steps).

Rules, for a request of tenant t, with n = admitted requests in flight (this replica):
1. n ≥ capacity → refused ("at capacity").
2. n ≥ fair_from × capacity and t already holds ≥ its fair share, ceil(capacity / tenants
   with requests in flight, t included) → refused ("tenant over its fair share"): near
   capacity the last slots go to the tenants that hold fewer, so one tenant's flood cannot
   starve the others. Requests without a tenant share the tenant "".
3. otherwise admitted; `release` when it ends (any outcome).

retry_after_s: with capacity requests in service, one ends every mean_request_s / capacity
on average; a refused client should come back after its turn: (n − capacity + 1) of those,
at least `min_retry_s`, at most `max_retry_s` (a default when no request was measured yet).

Invariants: in-flight counts never go negative and always equal admits − releases; a
refused request changes nothing. Several scheduler replicas each admit up to the capacity
they see: the mesh-wide bound is replicas × capacity, which is what the replicas' own
queues can hold.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from scheduler.framework import Role, WorkerState


@dataclasses.dataclass(frozen=True)
class AdmissionConfig:
    queue_factor: float = 0.5
    fair_from: float = 0.75
    min_retry_s: float = 0.1
    max_retry_s: float = 30.0
    default_retry_s: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.queue_factor < 0:
            raise ValueError("queue_factor must be >= 0")
        if not 0 < self.fair_from <= 1:
            raise ValueError("fair_from must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class Refusal:
    reason: str
    retry_after_s: float


def capacity(workers: Iterable[WorkerState], model: str, queue_factor: float) -> int:
    """Requests the routable workers serving `model` hold end to end (see the module doc)."""
    return sum(math.ceil(w.max_num_seqs * (1 + queue_factor)) for w in workers
               if w.model == model and w.routable and w.role != Role.PREFILL)


class AdmissionController:
    def __init__(self, config: AdmissionConfig = AdmissionConfig()) -> None:
        self.config = config
        self.inflight = 0
        self.by_tenant: dict[str, int] = {}
        self.refused = 0

    def try_admit(self, tenant: str, capacity: int, mean_request_s: float | None = None) -> Refusal | None:
        """None (and counted in flight) or the refusal; `capacity` from `capacity()`."""
        c = self.config
        if not c.enabled:
            self._admit(tenant)
            return None
        held = self.by_tenant.get(tenant, 0)
        if self.inflight >= capacity:
            return self._refuse(f"at capacity: {self.inflight} requests in flight, capacity {capacity}",
                                capacity, mean_request_s)
        if self.inflight >= c.fair_from * capacity:
            tenants = len(self.by_tenant) + (0 if held else 1)
            share = math.ceil(capacity / tenants)
            if held >= share:
                return self._refuse(f"tenant {tenant or '(none)'!r} holds {held} of {capacity} slots, "
                                    f"its fair share is {share}", capacity, mean_request_s)
        self._admit(tenant)
        return None

    def release(self, tenant: str) -> None:
        held = self.by_tenant.get(tenant, 0)
        if held <= 0:
            raise ValueError(f"release of tenant {tenant!r} without an admitted request")
        self.inflight -= 1
        if held == 1:
            del self.by_tenant[tenant]
        else:
            self.by_tenant[tenant] = held - 1

    def _admit(self, tenant: str) -> None:
        self.inflight += 1
        self.by_tenant[tenant] = self.by_tenant.get(tenant, 0) + 1

    def _refuse(self, reason: str, capacity: int, mean_request_s: float | None) -> Refusal:
        c = self.config
        self.refused += 1
        if mean_request_s is None or capacity <= 0:
            wait = c.default_retry_s
        else:
            wait = (max(0, self.inflight - capacity) + 1) * mean_request_s / capacity
        return Refusal(reason, min(c.max_retry_s, max(c.min_retry_s, wait)))
