"""`llm-mesh top`'s frame is a pure function of what the schedulers answered."""

from __future__ import annotations

from llm_mesh.v1 import membership_pb2, scheduler_pb2, worker_pb2
from services.top import Snapshot, render_text

NOW = 1_800_000_000.0


def worker(worker_id: str, role: int, inflight: int, prompt: int, cached: int) -> scheduler_pb2.WorkerStatus:
    member = membership_pb2.Member(id=worker_id, address=f"10.0.0.{len(worker_id)}:50061",
                                   worker=membership_pb2.WorkerInfo(role=role))
    return scheduler_pb2.WorkerStatus(member=member, state=scheduler_pb2.WORKER_STATE_READY, inflight=inflight,
                                      load=worker_pb2.WorkerLoad(running=3, waiting=2, kv_cache_usage=0.25,
                                                                 prompt_tokens=prompt, cached_prompt_tokens=cached))


def test_frame_merges_replicas_and_shows_every_section():
    workers = scheduler_pb2.ListWorkersResponse(workers=[worker("w-a", membership_pb2.WORKER_ROLE_DECODE, 2, 1000, 250),
                                                         worker("w-bb", membership_pb2.WORKER_ROLE_PREFILL, 1, 0, 0)])
    stats = scheduler_pb2.SchedulerStats(
        scheduler_id="scheduler-1", policy="ours", requests_by_outcome={"ok": 7, "UNAVAILABLE": 1},
        pd_decisions_by_rule={"remote": 5}, routing_decision_p50_s=0.0004, routing_decision_p99_s=0.002,
        routing_decisions_in_window=8, routing_window_s=60, prefix_hit_ratio=0.25,
        recent_errors=[scheduler_pb2.RequestError(time_unix_ms=int((NOW - 12) * 1000), code="UNAVAILABLE",
                                                  worker_id="w-a", message="worker w-a failed")])
    plan = scheduler_pb2.ScalingPlan(computed_at_unix_ms=int(NOW * 1000), window_s=15, disaggregated=True, roles=[
        scheduler_pb2.RoleScaling(role="prefill", observed_replicas=1, desired_replicas=3, min_replicas=1,
                                  max_replicas=8, reason="30800 tok/s / (10000 tok/s x 0.70) = 4.40")])
    a = Snapshot("sched-a:1", workers, stats, plan)
    b = Snapshot("sched-b:1", workers, scheduler_pb2.SchedulerStats(), scheduler_pb2.ScalingPlan(window_s=15))
    down = Snapshot("sched-c:1", error="UNAVAILABLE: connection refused")
    frame = render_text([a, b, down], width=220, now_s=NOW)
    row = next(line for line in frame.splitlines() if "w-a " in line)
    # in-flight is summed over the replicas (each counts its own requests); the hit is cached / prompt.
    assert [cell.strip() for cell in row.split("│")[1:-1]] == \
        ["w-a", "decode", "10.0.0.3:50061", "ready", "4", "2", "3", "25%", "25%"]
    assert "│ w-bb " in frame and " prefill " in frame
    assert "UNAVAILABLE 1, ok 7" in frame and "remote 5" in frame and "0.40 / 2.00 ms (8 in 60s)" in frame
    assert "4.40" in frame and "1-8" in frame and "first plan after a 15s window" in frame
    assert "12s ago" in frame and "worker w-a failed" in frame
    assert "sched-c:1: unreachable (UNAVAILABLE: connection refused)" in frame
