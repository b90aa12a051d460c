"""Every service's Prometheus /metrics, scraped from real processes (own etcd, two sim workers,
a scheduler, a gateway): the documented names exist and count exactly the traffic sent."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.etcd_server import EtcdServer
from services.procs import Child, http_ok
from tests.conftest import SIM_ARGS, Mesh, free_port, start_mesh

Samples = dict[tuple[str, frozenset], float]
PROMPT = " ".join(f"shared-{i}" for i in range(120))  # several full KV blocks: cache hits and KV events


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=5).raise_for_status().text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted(n for n, _ in samples if n == name)}"
    return samples[key]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of `name` over every series whose labels include `labels`."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert found, f"{name}{labels} not exported"
    return sum(found)


def labels_of(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(ls) for n, ls in samples if n == name]


async def scrape_until(url: str, done, timeout: float = 10) -> Samples:
    """Scrape until `done(samples)` (state that settles asynchronously: polls, cancels)."""
    deadline = time.monotonic() + timeout
    while not done(samples := scrape(url)):
        assert time.monotonic() < deadline, f"{url}: not settled within {timeout}s"
        await asyncio.sleep(0.1)
    return samples


@dataclasses.dataclass
class MeteredMesh:
    mesh: Mesh
    worker_metrics: list[str]  # /metrics URLs
    gateway: str
    gateway_metrics: str


@pytest.fixture(scope="module")
def metered(tmp_path_factory, model_dir) -> Iterator[MeteredMesh]:
    """Its own etcd: no other test's scheduler may route to these workers (exact counts)."""
    tmp = tmp_path_factory.mktemp("metrics")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    worker_ports = [free_port(), free_port()]
    mesh = start_mesh(etcd, tmp / "logs", model_dir, [[*SIM_ARGS, "--metrics-port", str(p)] for p in worker_ports])
    gateway_port, gateway_metrics = free_port(), free_port()
    gateway = Child.llm_mesh("gateway", ["gateway", "--port", str(gateway_port), "--scheduler", mesh.scheduler_address,
                                         "--etcd", mesh.etcd, "--metrics-port", str(gateway_metrics)], tmp / "logs")
    mesh.children.append(gateway)
    url = f"http://127.0.0.1:{gateway_port}"
    try:
        gateway.start()
        gateway.wait_ready(lambda: http_ok(f"{url}/health/ready"), 60)
        yield MeteredMesh(mesh, [f"http://127.0.0.1:{p}/metrics" for p in worker_ports], url,
                          f"http://127.0.0.1:{gateway_metrics}/metrics")
    finally:
        mesh.stop()
        etcd.stop()


async def rest_chat(client: httpx.AsyncClient, model: str, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0}
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
    assert usage is not None
    return usage


def grpc_request(model: str, max_tokens: int = 6) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=model, prompt=PROMPT,
                                         sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))


async def test_every_service_exports_its_documented_metrics(metered: MeteredMesh) -> None:
    mesh = metered.mesh
    usages = []
    async with httpx.AsyncClient(base_url=metered.gateway, timeout=60) as client:
        for stream in (False, False, True):
            usages.append(await rest_chat(client, mesh.model, stream))
        assert (await client.get("/no/such/route")).status_code == 404
    async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
        inference = inference_pb2_grpc.InferenceStub(channel)
        for _ in range(2):
            responses = [r async for r in inference.Generate(grpc_request(mesh.model))]
            u = responses[-1].usage
            usages.append({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                           "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}})
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            [r async for r in inference.Generate(grpc_request("no-such-model"))]
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest())
    worker_ids = {w.member.id for w in listed.workers}
    ok = len(usages)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert cached > 0, "the repeated prompt must hit the prefix cache"

    # Scheduler: request level, per worker (after the next load poll), lease, and the older names.
    s = await scrape_until(mesh.metrics_url, lambda s: {
        d["worker"] for d in labels_of(s, "llm_mesh_worker_running_requests")} == worker_ids)
    m = mesh.model
    assert value(s, "llm_mesh_requests_total", model=m, outcome="ok") == ok
    assert value(s, "llm_mesh_requests_total", model="", outcome="rejected") == 1
    assert value(s, "llm_mesh_time_to_first_token_seconds_count", model=m) == ok
    assert value(s, "llm_mesh_e2e_request_latency_seconds_count", model=m) == ok
    assert value(s, "llm_mesh_e2e_request_latency_seconds_count", model="") == 1
    assert value(s, "llm_mesh_inter_token_latency_seconds_count", model=m) >= ok
    assert 0 < value(s, "llm_mesh_time_to_first_token_seconds_sum", model=m) < 30 * ok
    assert value(s, "llm_mesh_in_flight_requests") == 0
    for name in ("llm_mesh_worker_waiting_requests", "llm_mesh_worker_running_requests",
                 "llm_mesh_worker_kv_cache_usage_ratio"):
        assert {(d["worker"], d["role"]) for d in labels_of(s, name)} == {(w, "both") for w in worker_ids}
    assert all(0 <= value(s, "llm_mesh_worker_kv_cache_usage_ratio", worker=w, role="both") <= 1
               for w in worker_ids)
    assert value(s, "llm_mesh_etcd_lease_healthy", kind="scheduler") == 1
    assert value(s, "llm_mesh_etcd_keepalive_failures_total", kind="scheduler") == 0
    assert value(s, "llm_mesh_etcd_reregistrations_total", kind="scheduler") == 0
    assert value(s, "llm_mesh_routing_decisions_total", policy="ours", outcome="routed") == ok
    assert value(s, "llm_mesh_prompt_tokens_total") == prompt_tokens

    # Workers: vLLM's names computed from the sim engine's outputs, summed over both workers.
    w = [scrape(url) for url in metered.worker_metrics]
    assert sum(total(x, "vllm:time_to_first_token_seconds_count", model_name=m, engine="0") for x in w) == ok
    assert sum(total(x, "vllm:e2e_request_latency_seconds_count", model_name=m) for x in w) == ok
    assert sum(total(x, "vllm:inter_token_latency_seconds_count", model_name=m) for x in w) > 0
    assert sum(total(x, "vllm:prompt_tokens_total", model_name=m) for x in w) == prompt_tokens
    assert sum(total(x, "vllm:prefix_cache_queries_total", model_name=m) for x in w) == prompt_tokens
    assert sum(total(x, "vllm:prefix_cache_hits_total", model_name=m) for x in w) == cached
    assert sum(total(x, "vllm:generation_tokens_total", model_name=m) for x in w) == completion
    for x in w:
        assert value(x, "vllm:num_requests_running", model_name=m, engine="0") == 0
        assert value(x, "vllm:num_requests_waiting", model_name=m, engine="0") == 0
        assert 0 <= value(x, "vllm:kv_cache_usage_perc", model_name=m, engine="0") <= 1
        assert value(x, "llm_mesh_etcd_lease_healthy", kind="worker") == 1
        assert value(x, "llm_mesh_etcd_reregistrations_total", kind="worker") == 0
    assert sum(value(x, "llm_mesh_worker_kv_events_published_total") for x in w) > 0

    # Gateway.
    g = scrape(metered.gateway_metrics)
    assert value(g, "llm_mesh_gateway_requests_total", route="/v1/chat/completions", code="200") == 3
    assert value(g, "llm_mesh_gateway_requests_total", route="other", code="404") == 1
    assert value(g, "llm_mesh_gateway_request_seconds_count", route="/v1/chat/completions") == 3
    assert value(g, "llm_mesh_gateway_open_streams") == 0
    assert value(g, "llm_mesh_etcd_lease_healthy", kind="gateway") == 1


async def test_open_stream_and_cancelled_request_are_counted(metered: MeteredMesh) -> None:
    mesh = metered.mesh
    cancelled = ("llm_mesh_requests_total", frozenset({"model": mesh.model, "outcome": "cancelled"}.items()))
    cancelled_before = scrape(mesh.metrics_url).get(cancelled, 0)
    body = {"model": mesh.model, "messages": [{"role": "user", "content": "count"}], "max_tokens": 2000,
            "stream": True}
    async with httpx.AsyncClient(base_url=metered.gateway, timeout=60) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            await anext(lines)
            assert value(scrape(metered.gateway_metrics), "llm_mesh_gateway_open_streams") == 1
            assert value(scrape(mesh.metrics_url), "llm_mesh_in_flight_requests") == 1
    # The client left: the gateway cancels its gRPC call, the scheduler counts a cancelled request.
    s = await scrape_until(mesh.metrics_url, lambda s: s.get(cancelled, 0) == cancelled_before + 1)
    assert value(s, "llm_mesh_in_flight_requests") == 0
    assert value(scrape(metered.gateway_metrics), "llm_mesh_gateway_open_streams") == 0
