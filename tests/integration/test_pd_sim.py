"""Prefill/decode disaggregation through real processes: a scheduler, a prefill-role and a
decode-role `sim` worker on a real etcd. The sim engines model the KV pull's time; the
orchestration (two legs, typed KVTransferParams, fallback, cancellation) is the real one."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from llm_mesh.v1 import worker_pb2, worker_pb2_grpc
from services.tokenizer import ModelTokenizer
from services.etcd_server import EtcdServer
from services.procs import free_port
from tests.conftest import SIM_ARGS, start_mesh
from tests.waiting import poll

PREFILL, DECODE = [*SIM_ARGS, "--role", "prefill"], [*SIM_ARGS, "--role", "decode"]


@pytest.fixture(scope="module")
def pd_mesh(model_dir, tmp_path_factory):
    """Its own etcd: the session's holds other tests' (aggregated) workers, and the prefill worker
    this module kills keeps its 30 s lease after the module ends."""
    tmp = tmp_path_factory.mktemp("pd-mesh")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    try:
        mesh = start_mesh(etcd, tmp, model_dir, [PREFILL, DECODE], lease_ttl=30)
        yield mesh
        mesh.stop()
    finally:
        etcd.stop()


def chat(text: str, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="SmolLM2-135M-Instruct",
        messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content=text)]),
        sampling=sampling_pb2.SamplingParams(**sampling))


def roles(mesh) -> dict[str, str]:
    """role name → address of the mesh's two workers."""
    out = {}
    for address, child in mesh.workers.items():
        out["prefill" if "prefill" in child.argv else "decode"] = address
    return out


async def load(address: str) -> worker_pb2.WorkerLoad:
    async with grpc.aio.insecure_channel(address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())


async def metrics(mesh) -> dict:
    async with httpx.AsyncClient() as client:
        text = (await client.get(mesh.metrics_url)).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_long_prompt_is_prefilled_remotely_and_decoded_without_computing_it(pd_mesh, model_dir):
    addresses = roles(pd_mesh)
    long_prompt = " ".join(f"pd-remote-{i}" for i in range(150))  # ~600 tokens, uncached anywhere
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        explained = await scheduler_pb2_grpc.SchedulerStub(channel).Explain(
            scheduler_pb2.ExplainRequest(request=chat(long_prompt, max_tokens=8, temperature=0)))
        d = explained.disaggregation
        assert d.remote and d.rule == "remote" and d.prefill_worker_id and "uncached tokens" in d.reason
        assert explained.chosen_worker_id != d.prefill_worker_id  # the decode worker
        assert [s.worker_id for s in explained.prefill_scores][:1] == [d.prefill_worker_id]
        assert d.uncached_tokens >= 64
        before_p, before_d = await load(addresses["prefill"]), await load(addresses["decode"])
        inference = inference_pb2_grpc.InferenceStub(channel)
        replies = [r async for r in inference.Generate(chat(long_prompt, max_tokens=8, temperature=0))]
    after_p, after_d = await load(addresses["prefill"]), await load(addresses["decode"])
    assert replies[0].worker_id == explained.chosen_worker_id
    assert sum(len(r.token_ids) for r in replies) == 8 and replies[-1].usage.completion_tokens == 8
    prompt_tokens = replies[-1].usage.prompt_tokens
    # The prefill worker computed the prompt (one token out); the decode worker pulled all of it.
    assert after_p.prompt_tokens - before_p.prompt_tokens == prompt_tokens
    assert after_p.generated_tokens - before_p.generated_tokens == 1
    pulled = after_d.kv_transferred_prompt_tokens - before_d.kv_transferred_prompt_tokens
    cached = after_d.cached_prompt_tokens - before_d.cached_prompt_tokens
    assert pulled > 0 and (after_d.prompt_tokens - before_d.prompt_tokens) - cached - pulled == 0
    # Greedy: the same tokens as the decode worker prefilling the same prompt itself.
    prompt = ModelTokenizer(model_dir).encode_chat([{"role": "user", "content": long_prompt}])
    assert len(prompt) == prompt_tokens
    async with grpc.aio.insecure_channel(addresses["decode"]) as channel:
        local = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
            request_id="pd-local-1", prompt_token_ids=prompt,
            sampling=sampling_pb2.SamplingParams(max_tokens=8, temperature=0)))]
    assert [t for r in local for t in r.token_ids] == [t for r in replies for t in r.token_ids]
    m = await metrics(pd_mesh)
    assert m[("llm_mesh_pd_decisions_total", (("rule", "remote"),))] >= 1
    assert m[("llm_mesh_pd_prefill_seconds_count", ())] >= 1


async def test_short_prompt_stays_on_the_decode_worker(pd_mesh):
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        explained = await scheduler_pb2_grpc.SchedulerStub(channel).Explain(
            scheduler_pb2.ExplainRequest(request=inference_pb2.GenerateRequest(
                model="SmolLM2-135M-Instruct", token_ids=inference_pb2.TokenIds(ids=[1000 + i for i in range(20)]),
                sampling=sampling_pb2.SamplingParams(max_tokens=4))))
    d = explained.disaggregation
    assert not d.remote and d.rule == "below-threshold" and d.reason.startswith("local: 20 uncached tokens < ")


async def test_worker_rejects_a_leg_its_role_does_not_take(pd_mesh):
    addresses = roles(pd_mesh)
    request = worker_pb2.WorkerGenerateRequest(request_id="wrong-leg", prompt_token_ids=[1000, 1001],
                                               sampling=sampling_pb2.SamplingParams(max_tokens=1), remote_decode=True)
    async with grpc.aio.insecure_channel(addresses["decode"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request)]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    request.sampling.max_tokens = 5
    async with grpc.aio.insecure_channel(addresses["prefill"]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(request)]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens must be 1" in info.value.details()


async def test_client_cancel_aborts_the_decode_leg(pd_mesh):
    addresses = roles(pd_mesh)
    before = await load(addresses["decode"])
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            chat(" ".join(f"pd-cancel-{i}" for i in range(150)), max_tokens=3000, ignore_eos=True))
        for _ in range(5):
            await call.read()
        call.cancel()
    after = await poll(lambda: load(addresses["decode"]), lambda lo: lo.running == 0, 10,
                       "decode leg aborted")
    assert after.requests_aborted >= before.requests_aborted + 1
    await asyncio.sleep(1.0)  # an aborted request generates nothing more
    later = await load(addresses["decode"])
    assert later.generated_tokens == after.generated_tokens


async def test_prefill_worker_registers_its_kv_endpoint_once(pd_mesh):
    """The engine id is in the membership record (published once); a prefill leg's reply then
    carries only ids, and the scheduler completes it from the record."""
    addresses = roles(pd_mesh)
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        listed = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest())
    by_address = {w.member.address: w.member for w in listed.workers}
    endpoint = by_address[addresses["prefill"]].worker.kv_endpoint
    assert endpoint.engine_id.startswith("sim-")
    prompt = [2000 + i for i in range(96)]
    async with grpc.aio.insecure_channel(addresses["prefill"]) as channel:
        replies = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
            request_id="pd-endpoint", prompt_token_ids=prompt, remote_decode=True,
            sampling=sampling_pb2.SamplingParams(max_tokens=1)))]
    kv = replies[-1].kv_transfer
    assert kv.engine_id == endpoint.engine_id and kv.num_tokens == 96 and len(kv.block_ids) == 96 // by_address[addresses["prefill"]].worker.block_size
    assert (kv.host, kv.port, kv.tp_size) == ("", 0, 0)  # where to pull from is not per request


async def test_dead_prefill_worker_falls_back_to_a_local_prefill(pd_mesh):
    """kill -9 of the prefill worker: its lease (30 s) still routes to it; the leg fails and the
    decode worker prefills itself. The request succeeds."""
    addresses = roles(pd_mesh)
    os.kill(pd_mesh.workers[addresses["prefill"]].pid, signal.SIGKILL)
    before = (await metrics(pd_mesh)).get(("llm_mesh_pd_prefill_fallbacks_total", ()), 0)
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        replies = [r async for r in inference_pb2_grpc.InferenceStub(channel).Generate(
            chat(" ".join(f"pd-fallback-{i}" for i in range(150)), max_tokens=6, temperature=0), timeout=20)]
    assert sum(len(r.token_ids) for r in replies) == 6
    assert (await metrics(pd_mesh))[("llm_mesh_pd_prefill_fallbacks_total", ())] == before + 1

