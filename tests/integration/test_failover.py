"""Failover through real processes (a scheduler and sim workers on their own etcd): a worker
killed before the first token or mid-stream costs the client nothing — the request is retried
or migrated (prompt + tokens sent) to another worker, greedy output identical to an
uninterrupted run — and the dead worker leaves routing at once (circuit open, Explain says so).
Admission: beyond capacity requests are refused at once with RESOURCE_EXHAUSTED and a retry
hint (HTTP 429 + Retry-After through the gateway)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import httpx
import pytest
from grpc_status import rpc_status
from google.rpc import error_details_pb2
from prometheus_client.parser import text_string_to_metric_families

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.etcd_server import EtcdServer
from services.procs import Child, free_port, http_ok
from tests.conftest import SIM_ARGS, start_mesh
from tests.waiting import poll

MODEL = "SmolLM2-135M-Instruct"
# ~10 ms a token: a 120-token stream lasts >1 s, long enough to kill its worker mid-way.
SLOW = [*SIM_ARGS, "--sim-itl", "0.01", "--max-num-seqs", "64"]


@pytest.fixture
def etcd(tmp_path):
    server = EtcdServer(tmp_path / "etcd", free_port(), free_port())
    server.start()
    yield server
    server.stop()


def request(i: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL, token_ids=inference_pb2.TokenIds(ids=[3000 + (i * 37 + j) % 20000 for j in range(40)]),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


async def stream(address: str, req: inference_pb2.GenerateRequest, on_token=None) -> tuple[list[int], str, int]:
    """(tokens, first worker id, usage.completion_tokens) of one Generate stream."""
    tokens, worker, completion = [], "", 0
    async with grpc.aio.insecure_channel(address) as channel:
        async for r in inference_pb2_grpc.InferenceStub(channel).Generate(req, timeout=60):
            worker = worker or r.worker_id
            tokens.extend(r.token_ids)
            if on_token is not None:
                on_token(r.worker_id)
            if r.HasField("usage"):
                completion = r.usage.completion_tokens
    return tokens, worker, completion


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


async def scrape(url: str) -> dict:
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_kill_9_mid_stream_loses_no_request_and_no_token(etcd, model_dir, tmp_path):
    """50 concurrent greedy streams over 3 workers; the busiest is killed mid-stream."""
    mesh = start_mesh(etcd, tmp_path, model_dir, [SLOW, SLOW, SLOW], lease_ttl=30)
    try:
        n, max_tokens = 50, 120
        reference = await asyncio.gather(*(stream(mesh.scheduler_address, request(i, max_tokens)) for i in range(n)))
        by_id = {child.argv[child.argv.index("--port") + 1]: child for child in mesh.workers.values()}
        started = asyncio.Event()
        counts: dict[str, int] = {}

        def on_first(worker_id: str) -> None:
            if worker_id:
                counts[worker_id] = counts.get(worker_id, 0) + 1
                if sum(counts.values()) == n:
                    started.set()

        runs = [asyncio.create_task(stream(mesh.scheduler_address, request(i, max_tokens), on_first))
                for i in range(n)]
        await asyncio.wait_for(started.wait(), 20)
        await asyncio.sleep(0.3)  # every stream is past its first token
        victim = max(counts, key=counts.get)  # worker-<port>-<hex>
        os.kill(by_id[victim.split("-")[1]].pid, signal.SIGKILL)
        results = await asyncio.gather(*runs)
        for i, ((tokens, _, completion), (expected, _, _)) in enumerate(zip(results, reference)):
            assert tokens == expected, f"stream {i}: lost or repeated tokens"
            assert completion == max_tokens
        m = await scrape(mesh.metrics_url)
        migrated = m.get(("llm_mesh_failovers_total", (("code", "UNAVAILABLE"), ("kind", "migrate"))), 0)
        assert migrated == counts[victim] >= 1
        # The dead worker is out of routing at once (its lease still names it for 30 s).
        async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
            explained = await scheduler_pb2_grpc.SchedulerStub(channel).Explain(
                scheduler_pb2.ExplainRequest(request=request(999, 4)))
        filtered = {s.worker_id: s.filtered_reason for s in explained.scores if s.filtered_reason}
        assert filtered[victim].startswith("circuit open")
    finally:
        mesh.stop()


async def test_dead_worker_before_the_first_token_is_retried_elsewhere(etcd, model_dir, tmp_path):
    mesh = start_mesh(etcd, tmp_path, model_dir, [SIM_ARGS, SIM_ARGS], lease_ttl=30)
    try:
        first = next(iter(mesh.workers.values()))
        os.kill(first.pid, signal.SIGKILL)  # still registered: routing will pick it at first
        results = await asyncio.gather(*(stream(mesh.scheduler_address, request(i, 8)) for i in range(10)))
        assert all(len(tokens) == 8 for tokens, _, _ in results)
        m = await scrape(mesh.metrics_url)
        assert m.get(("llm_mesh_failovers_total", (("code", "UNAVAILABLE"), ("kind", "retry"))), 0) >= 1
        assert m[("llm_mesh_requests_total", (("model", MODEL), ("outcome", "ok")))] == 10
    finally:
        mesh.stop()


async def test_overload_is_refused_at_once_with_a_retry_hint(etcd, model_dir, tmp_path):
    """2 workers × max_num_seqs 4 × (1 + 0.5) = capacity 12; 36 concurrent streams (3×) while
    12 long ones (400 tokens × 10 ms) hold the capacity."""
    worker = [*SIM_ARGS, "--sim-itl", "0.01", "--max-num-seqs", "4"]
    mesh = start_mesh(etcd, tmp_path, model_dir, [worker, worker])
    gateway_port = free_port()
    gateway = Child.llm_mesh("gateway", ["gateway", "--port", str(gateway_port), "--scheduler",
                                         mesh.scheduler_address], tmp_path)
    gateway.start()
    try:
        gateway.wait_ready(lambda: http_ok(f"http://127.0.0.1:{gateway_port}/health"), 60)
        long = [asyncio.create_task(stream(mesh.scheduler_address, request(i, 400))) for i in range(12)]
        async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
            async def inflight() -> int:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                listed = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest())
                return sum(w.inflight for w in listed.workers)

            await poll(inflight, lambda n: n == 12, 30, "all 12 long streams admitted")
        refused_at = time.monotonic()
        extra = await asyncio.gather(*(stream(mesh.scheduler_address, request(100 + i, 150)) for i in range(24)),
                                     return_exceptions=True)
        refused_in = time.monotonic() - refused_at
        assert all(isinstance(e, grpc.aio.AioRpcError) for e in extra), extra
        assert {e.code() for e in extra} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert refused_in < 2.0  # promptly, not after queueing
        details = rpc_status.from_call(extra[0]).details
        hint = error_details_pb2.RetryInfo()
        assert any(d.Unpack(hint) for d in details) and hint.retry_delay.ToTimedelta().total_seconds() > 0
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"http://127.0.0.1:{gateway_port}/v1/completions",
                                      json={"model": MODEL, "prompt": "hello", "max_tokens": 4},
                                      headers={"X-Tenant-Id": "tenant-a"})
        assert reply.status_code == 429 and int(reply.headers["Retry-After"]) >= 1
        # A flood while at capacity: refused, and memory stays bounded (nothing queues).
        before = rss_mb(mesh.scheduler.pid)
        flood = await asyncio.gather(*(stream(mesh.scheduler_address, request(1000 + i, 150)) for i in range(400)),
                                     return_exceptions=True)
        assert sum(isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                   for e in flood) == 400
        assert rss_mb(mesh.scheduler.pid) - before < 50
        admitted = await asyncio.gather(*long)
        assert all(len(tokens) == 400 for tokens, _, _ in admitted)
        m = await scrape(mesh.metrics_url)
        assert m[("llm_mesh_admission_refused_total", ())] == 425
        # Capacity is back: admitted again.
        tokens, _, _ = await stream(mesh.scheduler_address, request(500, 4))
        assert len(tokens) == 4
    finally:
        gateway.stop()
        mesh.stop()


async def test_rolling_restart_of_every_worker_loses_nothing(etcd, model_dir, tmp_path):
    """SIGTERM each worker in turn under load (a replacement joins first): a draining worker
    takes no new request, finishes what it can within --drain-seconds, and the scheduler
    migrates the rest; every stream completes with the uninterrupted greedy tokens."""
    drain = [*SLOW, "--drain-seconds", "0.5"]
    mesh = start_mesh(etcd, tmp_path, model_dir, [drain, drain], lease_ttl=30)
    try:
        n, max_tokens = 16, 150
        reference = await asyncio.gather(*(stream(mesh.scheduler_address, request(i, max_tokens)) for i in range(n)))
        runs = [asyncio.create_task(stream(mesh.scheduler_address, request(i, max_tokens))) for i in range(n)]
        await asyncio.sleep(0.4)
        for old in list(mesh.workers):
            mesh.start_worker(drain, 30)
            child = mesh.workers.pop(old)
            assert child.stop() == 0, child.tail()  # SIGTERM: drain, then exit cleanly
        results = await asyncio.gather(*runs)
        assert [r[0] for r in results] == [r[0] for r in reference]
    finally:
        mesh.stop()


async def test_etcd_stopped_for_20s_under_load_fails_no_request(etcd, model_dir, tmp_path):
    """The mesh serves from its last view while etcd is down; nothing restarts; the members
    keep (or re-take) their registrations when it is back."""
    mesh = start_mesh(etcd, tmp_path, model_dir, [SIM_ARGS, SIM_ARGS], lease_ttl=5)
    try:
        pids = {child.pid for child in mesh.workers.values()} | {mesh.scheduler.pid}
        done, failures = 0, []

        async def load(until: float, i: int) -> None:
            nonlocal done
            while time.monotonic() < until:
                try:
                    tokens, _, _ = await stream(mesh.scheduler_address, request(i, 8))
                    assert len(tokens) == 8
                    done += 1
                except (grpc.aio.AioRpcError, AssertionError) as exc:
                    failures.append(exc)
                await asyncio.sleep(0.1)

        started = time.monotonic()
        runner = asyncio.gather(*(load(started + 26, i) for i in range(4)))
        await asyncio.sleep(2)
        etcd.stop()
        await asyncio.sleep(20)
        etcd.start()
        await runner
        assert failures == [] and done > 100
        assert all(child.alive() for child in mesh.workers.values()) and mesh.scheduler.alive()
        assert {child.pid for child in mesh.workers.values()} | {mesh.scheduler.pid} == pids
        async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
            deadline = time.monotonic() + 30
            while len((await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(
                    scheduler_pb2.ListWorkersRequest())).workers) != 2:
                assert time.monotonic() < deadline, "workers did not come back in the scheduler's view"
                await asyncio.sleep(0.5)
        tokens, _, _ = await stream(mesh.scheduler_address, request(7, 8))
        assert len(tokens) == 8
    finally:
        mesh.stop()


async def test_admitted_requests_keep_their_ttft_under_3x_overload(etcd, model_dir, tmp_path):
    """36 closed-loop clients against capacity 12 for 6 s: admitted requests' TTFT stays inside
    the default profile's 2 s TTFT SLO, refusals come at once."""
    worker = [*SIM_ARGS, "--sim-itl", "0.01", "--max-num-seqs", "4"]
    mesh = start_mesh(etcd, tmp_path, model_dir, [worker, worker])
    try:
        ttfts, refusals, others = [], [], []

        async def client(i: int, until: float) -> None:
            n = 0
            async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
                stub = inference_pb2_grpc.InferenceStub(channel)
                while time.monotonic() < until:
                    n += 1
                    sent = time.monotonic()
                    try:
                        async for r in stub.Generate(request(i * 1000 + n, 50), timeout=30):
                            if r.token_ids and sent:
                                ttfts.append(time.monotonic() - sent)
                                sent = 0.0
                    except grpc.aio.AioRpcError as exc:
                        (refusals if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else others).append(
                            time.monotonic() - sent if sent else exc)
                        await asyncio.sleep(0.05)

        unloaded = [(await stream(mesh.scheduler_address, request(90_000 + i, 50)))[0] for i in range(3)]
        assert all(len(t) == 50 for t in unloaded)
        until = time.monotonic() + 6
        await asyncio.gather(*(client(i, until) for i in range(36)))
        ttfts.sort()
        refusals.sort()
        assert others == []
        assert len(ttfts) > 50 and len(refusals) > 100
        p99 = ttfts[int(0.99 * (len(ttfts) - 1))]
        # The default profile's TTFT SLO (scheduler/profiles/default.yaml planner.ttft_p90_s) is 2 s: the
        # queued half-batch waits for a running request (50 tokens × 10 ms) to end, never for a queue.
        assert p99 < 2.0, f"admitted TTFT p99 {p99:.3f}s"
        # Promptly: a refusal never waits for a running request the way an admitted one does. Compared
        # with the admitted TTFT of the same run (not a fixed bound) and at p90, so one stall of a loaded
        # machine, which holds at most the 36 clients' refusals in flight (~1%), does not decide it.
        assert refusals[int(0.9 * (len(refusals) - 1))] < ttfts[len(ttfts) // 2] / 2
        print(f"admitted {len(ttfts)} TTFT p50 {ttfts[len(ttfts) // 2] * 1e3:.0f} ms p99 {p99 * 1e3:.0f} ms; "
              f"refused {len(refusals)} in p99 {refusals[int(0.99 * (len(refusals) - 1))] * 1e3:.0f} ms")
    finally:
        mesh.stop()
