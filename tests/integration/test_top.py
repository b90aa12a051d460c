"""`llm-mesh top`, Scheduler.GetStats and Scheduler.GetScalingPlan through real processes: a real
etcd, a prefill-role and a decode-role `sim` worker, and a scheduler planning every second."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_mesh.v1 import inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from services.etcd_server import EtcdServer
from services.procs import free_port
from tests.conftest import start_mesh
from tests.integration.test_pd_sim import DECODE, PREFILL, chat, roles

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LONG = " ".join(f"top-remote-{i}" for i in range(150))  # ~600 tokens: prefilled remotely


@pytest.fixture(scope="module")
def top_mesh(model_dir, tmp_path_factory):
    """Its own etcd: this module kills its decode worker, whose 30 s lease outlives the module."""
    tmp = tmp_path_factory.mktemp("top-mesh")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    try:
        mesh = start_mesh(etcd, tmp, model_dir, [PREFILL, DECODE], lease_ttl=30,
                          scheduler_args=["--planner-window", "1"])
        yield mesh
        mesh.stop()
    finally:
        etcd.stop()


async def admin(mesh, method: str):
    async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        request = {"GetStats": scheduler_pb2.GetStatsRequest, "GetScalingPlan": scheduler_pb2.GetScalingPlanRequest,
                   "ListWorkers": scheduler_pb2.ListWorkersRequest}[method]()
        return await getattr(stub, method)(request, timeout=5)


async def generate(mesh, request) -> None:
    async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
        async for _ in inference_pb2_grpc.InferenceStub(channel).Generate(request, timeout=30):
            pass


def top_once(mesh) -> str:
    out = subprocess.run([sys.executable, "-m", "services.cli", "top", "--once", "--scheduler",
                          mesh.scheduler_address, "--width", "200"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    print(out.stdout)  # the frame, for the record (pytest -s)
    return out.stdout


async def test_stats_count_the_requests_and_errors_and_top_shows_them(top_mesh):
    requests = [chat(LONG, max_tokens=8, temperature=0)] + [chat(f"top short {i}", max_tokens=6) for i in range(3)]
    for request in requests:
        await generate(top_mesh, request)
    unknown = chat("hi", max_tokens=4)
    unknown.model = "no-such-model"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(top_mesh, unknown)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    stats = await admin(top_mesh, "GetStats")
    assert dict(stats.requests_by_outcome) == {"ok": 4, "NOT_FOUND": 1}
    assert sum(stats.pd_decisions_by_rule.values()) == 4  # the unknown model never reached routing
    assert stats.pd_decisions_by_rule["remote"] == 1 and stats.pd_decisions_by_rule["below-threshold"] == 3
    assert stats.routing_decisions_in_window == 4 and 0 < stats.routing_decision_p50_s <= stats.routing_decision_p99_s
    assert stats.prompt_tokens > 600 and stats.policy and stats.scheduler_id.startswith("scheduler-")
    error = stats.recent_errors[-1]
    assert error.code == "NOT_FOUND" and "no-such-model" in error.message and error.model == "no-such-model"
    assert error.worker_id == "" and abs(error.time_unix_ms / 1000 - time.time()) < 30

    workers = (await admin(top_mesh, "ListWorkers")).workers
    frame = top_once(top_mesh)
    for w in workers:
        assert w.member.id in frame and w.member.address in frame
    assert "ok 4" in frame and "NOT_FOUND 1" in frame and "remote 1" in frame and "below-threshold 3" in frame
    assert "no-such-model" in frame and "prefill" in frame and "decode" in frame


async def test_scaling_plan_is_published_within_bounds(top_mesh):
    """The plan's demand is the workers' counters: every request here generated 6 or 8 tokens, so
    any window with finishes has a mean in [6, 8] (a prefill leg's one token counted as a request
    would pull it below 6)."""
    await asyncio.gather(*(generate(top_mesh, chat(f"plan {i}", max_tokens=6)) for i in range(2)))
    deadline = time.monotonic() + 10
    plan = await admin(top_mesh, "GetScalingPlan")
    while plan.load.arrival_rate == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        plan = await admin(top_mesh, "GetScalingPlan")
    assert plan.load.arrival_rate > 0 and 6 <= plan.load.output_tokens_mean <= 8
    assert plan.computed_at_unix_ms and plan.window_s == 1.0 and plan.disaggregated
    assert plan.ttft_p90_slo_s == 2.0 and plan.itl_p90_slo_s == 0.05  # the default profile's planner section
    by_role = {r.role: r for r in plan.roles}
    assert sorted(by_role) == ["decode", "prefill"]
    for r in by_role.values():
        assert r.observed_replicas == 1 and r.min_replicas <= r.desired_replicas <= r.max_replicas and r.reason
    async with httpx.AsyncClient() as client:
        text = (await client.get(top_mesh.metrics_url)).text
    gauges = {(s.name, s.labels.get("role")): s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name.startswith("llm_mesh_planner_")}
    assert gauges[("llm_mesh_planner_observed_replicas", "prefill")] == 1
    assert gauges[("llm_mesh_planner_observed_replicas", "decode")] == 1
    assert 1 <= gauges[("llm_mesh_planner_desired_replicas", "decode")] <= by_role["decode"].max_replicas


async def test_a_dead_worker_shows_in_recent_errors(top_mesh):
    """kill -9 of the decode worker: its 30 s lease still routes to it, the request fails UNAVAILABLE,
    and the error names the worker."""
    decode_address = roles(top_mesh)["decode"]
    decode_id = next(w.member.id for w in (await admin(top_mesh, "ListWorkers")).workers
                     if w.member.address == decode_address)
    os.kill(top_mesh.workers[decode_address].pid, signal.SIGKILL)
    top_mesh.workers[decode_address].process.wait(timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(top_mesh, chat("after the kill", max_tokens=4))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    stats = await admin(top_mesh, "GetStats")
    assert stats.requests_by_outcome["UNAVAILABLE"] == 1 and stats.requests_by_outcome["ok"] == 6
    error = stats.recent_errors[-1]
    assert error.code == "UNAVAILABLE" and error.worker_id == decode_id and decode_id in error.message
    frame = top_once(top_mesh)
    assert "UNAVAILABLE" in frame and decode_id in frame
