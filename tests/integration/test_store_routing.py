"""Routing knows the KV store: a real `llm-mesh kvstore` process joins the sim mesh (real etcd,
scheduler and workers); the scheduler follows its KV events, credits its blocks to every worker
below their own engine hits, shows them in Explain, and forgets them when the store leaves."""

from __future__ import annotations

import asyncio
import pathlib
import random
import time

import grpc

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.framework import RequestView
from services.etcd_server import EtcdServer
from services.kvstore_client import KVStoreClient
from services.procs import Child, free_port, grpc_serving

BLOCK_BYTES = 4096
LAYOUT = "test-layout"


def start_store(tmp_path: pathlib.Path, etcd: EtcdServer) -> tuple[Child, str, str]:
    port = free_port()
    store_id = f"kvstore-routing-{port}"
    child = Child.llm_mesh(store_id, [
        "kvstore", "--port", str(port), "--id", store_id, "--etcd", etcd.endpoint, "--ram-mib", "4",
        "--lease-ttl", "2", "--nixl", "off", "--kv-events-heartbeat", "0.5"], tmp_path)
    child.start()
    address = f"127.0.0.1:{port}"
    child.wait_ready(lambda: grpc_serving(address), timeout=60)
    return child, store_id, address


def token_request(model: str, tokens: list[int], max_tokens: int = 1) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=model, token_ids=inference_pb2.TokenIds(ids=tokens),
                                         sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))


async def explain_until(admin, request, done, timeout: float, what: str) -> scheduler_pb2.ExplainResponse:
    deadline = time.monotonic() + timeout
    while True:
        explained = await admin.Explain(scheduler_pb2.ExplainRequest(request=request))
        if done(explained):
            return explained
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s; last Explain: {explained}")
        await asyncio.sleep(0.1)


def blocks_of(explained: scheduler_pb2.ExplainResponse) -> dict[str, tuple[int, int]]:
    return {s.worker_id: (s.prefix_blocks.engine, s.prefix_blocks.store) for s in explained.scores}


async def test_store_hits_are_routed_on_explained_and_forgotten(sim_mesh, etcd: EtcdServer,
                                                               tmp_path: pathlib.Path) -> None:
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        admin = scheduler_pb2_grpc.SchedulerStub(channel)
        listed = await admin.ListWorkers(scheduler_pb2.ListWorkersRequest())
        assert len(listed.workers) == 2
        block_size = listed.workers[0].member.worker.block_size
        model = listed.workers[0].member.worker.model
        rng = random.Random(time.time_ns())
        tokens = [rng.randrange(1000, 40000) for _ in range(20 * block_size + 3)]  # unique to this run
        hashes = list(RequestView.from_tokens(model, tokens, block_size).block_hashes)
        request = token_request(model, tokens)
        child, store_id, address = start_store(tmp_path, etcd)
        try:
            with KVStoreClient(address) as store:
                assert store.put(model, LAYOUT, [(h, bytes([i]) * BLOCK_BYTES)
                                                 for i, h in enumerate(hashes[:12])]) == (12, [])
            # Both workers can load the store's 12 blocks; neither holds any of them itself.
            explained = await explain_until(admin, request, lambda e: all(
                b == (0, 12) for b in blocks_of(e).values()), 15, "store blocks credited to every worker")
            assert all(s.components["ttft.load_s"] > 0 for s in explained.scores)
            assert all(s.components["ttft.uncached"] == len(tokens) - 12 * block_size for s in explained.scores)
            # One worker computes the prompt: its engine blocks now beat the store's for it.
            async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as inference_channel:
                stub = inference_pb2_grpc.InferenceStub(inference_channel)
                holder = [r async for r in stub.Generate(token_request(model, tokens))][0].worker_id
            explained = await explain_until(admin, request, lambda e: blocks_of(e)[holder] == (20, 0), 15,
                                            "the holder's own blocks")
            other = next(w for w in blocks_of(explained) if w != holder)
            assert blocks_of(explained)[other] == (0, 12)
            assert explained.chosen_worker_id == holder
            scores = {s.worker_id: s for s in explained.scores}
            assert scores[holder].components["ttft.load_s"] == 0.0 < scores[other].components["ttft.load_s"]
        finally:
            child.kill()
        # The store died: its etcd key expires with its lease (2 s) and its blocks leave the index.
        await explain_until(admin, request, lambda e: blocks_of(e)[other] == (0, 0), 20,
                            "the dead store's blocks forgotten")
