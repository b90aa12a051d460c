"""End to end: `llm-mesh up` with real etcd and a real vLLM worker on the real
model; chat through the REST gateway (streaming and not), the OpenAI SDK and
gRPC; a cancelled stream stops the engine; SIGTERM stops every child."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import time

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, worker_pb2, worker_pb2_grpc
from services.procs import Child, http_ok
from tests.conftest import free_port, free_port_pair

pytestmark = pytest.mark.vllm

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def free_port_run(n: int) -> int:
    """A port p with p … p+n-1 free (for --metrics-base-port)."""
    for _ in range(100):
        base = free_port()
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports")


class Up:
    def __init__(self, tmp_path) -> None:
        self.gateway = f"http://127.0.0.1:{free_port()}"
        self.scheduler = f"127.0.0.1:{free_port()}"
        self.worker = f"127.0.0.1:{free_port()}"
        etcd_port = free_port_pair()
        self.metrics_base = free_port_run(3)  # scheduler, gateway, the worker
        self.child = Child.llm_mesh("up", [
            "up", "--gateway-port", self.gateway.rsplit(":", 1)[1], "--scheduler-port", self.scheduler.rsplit(":", 1)[1],
            "--worker-base-port", self.worker.rsplit(":", 1)[1], "--etcd-port", str(etcd_port),
            "--run-dir", str(tmp_path / "run"), "--metrics-base-port", str(self.metrics_base),
        ], tmp_path, env={"COLUMNS": "200"})

    def child_pids(self) -> dict[str, int]:
        return {name: int(pid) for name, pid in
                re.findall(r"✓\S* (\S+)\s+\S+\s+\(pid (\d+)\)", self.child.log_path.read_text())}


@pytest.fixture(scope="module")
def up(tmp_path_factory, model_dir):
    mesh = Up(tmp_path_factory.mktemp("up"))
    started = time.monotonic()
    mesh.child.start()
    try:
        mesh.child.wait_ready(lambda: "llm-mesh is up" in mesh.child.log_path.read_text(), 400, interval=0.5)
    except BaseException:
        mesh.child.stop()
        raise
    print(f"llm-mesh up ready in {time.monotonic() - started:.1f}s")
    yield mesh
    mesh.child.stop()


def test_rest_chat_answers_with_real_model_text(up):
    response = httpx.post(f"{up.gateway}/v1/chat/completions", timeout=60,
                          json={"model": MODEL, "messages": QUESTION, "max_tokens": 30, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] > 10


def test_rest_chat_streams_sse_ending_in_done(up):
    events = []
    with httpx.stream("POST", f"{up.gateway}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": QUESTION, "max_tokens": 30, "temperature": 0,
                            "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert "Paris" in text
    assert chunks[0]["object"] == "chat.completion.chunk"


def test_openai_sdk_against_the_gateway(up):
    from openai import OpenAI

    client = OpenAI(base_url=f"{up.gateway}/v1", api_key="unused")
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=30, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert [m.id for m in client.models.list().data] == [MODEL]


async def test_grpc_generate_answers_with_real_model_text(up):
    request = inference_pb2.GenerateRequest(
        model=MODEL, messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(**QUESTION[0])]),
        sampling=sampling_pb2.SamplingParams(max_tokens=30, temperature=0))
    async with grpc.aio.insecure_channel(up.scheduler) as channel:
        responses = [r async for r in inference_pb2_grpc.InferenceStub(channel).Generate(request)]
    assert "Paris" in "".join(r.text for r in responses)
    assert responses[-1].finish_reason == sampling_pb2.FINISH_REASON_STOP


async def test_cancelled_stream_stops_the_vllm_engine(up):
    request = inference_pb2.GenerateRequest(
        model=MODEL, prompt="Count from one to a thousand:",
        sampling=sampling_pb2.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
    async with grpc.aio.insecure_channel(up.scheduler) as channel, \
            grpc.aio.insecure_channel(up.worker) as worker_channel:
        worker = worker_pb2_grpc.WorkerStub(worker_channel)
        call = inference_pb2_grpc.InferenceStub(channel).Generate(request)
        for _ in range(10):
            await call.read()
        before = await worker.GetLoad(worker_pb2.GetLoadRequest())
        call.cancel()
        await asyncio.sleep(1.0)
        after = await worker.GetLoad(worker_pb2.GetLoadRequest())
        await asyncio.sleep(1.0)
        later = await worker.GetLoad(worker_pb2.GetLoadRequest())
    assert after.requests_aborted == before.requests_aborted + 1
    assert later.generated_tokens == after.generated_tokens, "vLLM kept generating after the cancel"
    assert after.generated_tokens - before.generated_tokens < 1000


def test_vllm_worker_serves_vllms_own_metrics(up):
    """vLLM registers its vllm:* metrics itself: the worker serves them, beside ours, once."""
    def scrape(offset: int) -> dict[str, list]:
        text = httpx.get(f"http://127.0.0.1:{up.metrics_base + offset}/metrics", timeout=10).text
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    worker = scrape(2)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:e2e_request_latency_seconds_count"):
        assert [s.labels["model_name"] for s in worker[name]] == [MODEL], name
    assert worker["vllm:time_to_first_token_seconds_count"][0].value >= 4  # the requests above
    assert worker["llm_mesh_worker_kv_events_published_total"][0].value > 0
    assert worker["llm_mesh_etcd_lease_healthy"][0].value == 1
    scheduler = scrape(0)
    ok = [s.value for s in scheduler["llm_mesh_requests_total"] if s.labels["outcome"] == "ok"]
    assert ok and ok[0] >= 4


def test_sigterm_stops_every_child(up):
    pids = up.child_pids()
    assert {"etcd", "scheduler", "gateway"} <= set(pids) and any(n.startswith("worker-") for n in pids)
    up.child.signal(signal.SIGTERM)
    assert up.child.process.wait(60) == 0
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) outlived `llm-mesh up`"
    assert not http_ok(f"{up.gateway}/health")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent reaped nothing yet only if it is still running).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
