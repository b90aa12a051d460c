"""End to end: prefill/decode disaggregation through the whole mesh on real vLLM workers.

A real etcd, a scheduler process, a prefill-role vLLM worker (kv_producer, core 0) and a
decode-role vLLM worker (kv_consumer, core 1) moving KV over NIXL. References come first from
an aggregated vLLM worker (role both) that is then stopped, so a P/D output is compared with an
independent computation, not with the decode engine's own (pulled) cache.

Asserted through the public gRPC API and the workers' load reports: a long prompt is prefilled
remotely and its greedy output equals the aggregated one; the decode worker computes none of its
prompt tokens; prompts sharing a prefix complete without a stall; a client cancel ends both legs
and leaves no KV held on either worker; a kill -9 of the prefill worker falls back to a local
prefill on the decode worker with the same greedy output.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from llm_mesh.v1 import worker_pb2, worker_pb2_grpc
from services.etcd_server import EtcdServer
from services.procs import Child, free_port, grpc_serving
from services.tokenizer import ModelTokenizer
from tests.conftest import start_mesh

pytestmark = pytest.mark.vllm

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 10
KV_LEASE_S = 12  # the prefill engine's hold on KV nobody pulls (vLLM's default is 30 s)
STALL_S = 15.0  # a P/D request here takes 1–4 s on a loaded machine; the stall took 31 s
VLLM = ["--engine", "vllm", "--max-model-len", "2048", "--max-num-seqs", "4", "--kv-cache-gib", "1"]


def vllm_args(role: str, core: str) -> list[str]:
    return [*VLLM, "--role", role, "--cpu-cores", core, "--kv-side-channel-port", str(free_port())]


WORDS = ("river mountain lantern orbit copper violet harbor meadow signal quartz ember canyon "
         "thistle beacon glacier falcon prism tundra willow cobalt").split()


def text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3 + i // 20) % 20] for i in range(words))


SHARED = "Background notes. " + text(1, 400)
PROMPTS = {
    "long": "Summarize: " + text(2, 450),
    "shared0": SHARED + " Question: which word comes first?",
    "shared1": SHARED + " Question: which word is repeated most often, and why does it matter here?",
    "cancel": "Write a long story about " + text(3, 300),
    "unpulled": "Translate: " + text(5, 300),
    "fallback": "Explain: " + text(4, 350),
}


def chat(content: str, max_tokens: int = MAX_TOKENS, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=MODEL,
        messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content=content)]),
        sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, **sampling))


async def load(address: str) -> worker_pb2.WorkerLoad:
    async with grpc.aio.insecure_channel(address) as channel:
        return await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    """Its own etcd: the killed prefill worker's lease outlives this module."""
    server = EtcdServer(tmp_path_factory.mktemp("pd-vllm-etcd"), free_port(), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def references(etcd, model_dir, tmp_path_factory) -> dict[str, list[int]]:
    """Greedy outputs of an aggregated vLLM worker, called directly with the chat-templated ids."""
    tokenizer = ModelTokenizer(str(model_dir))
    port = free_port()
    address = f"127.0.0.1:{port}"
    child = Child.llm_mesh("aggregated", ["worker", "--port", str(port), "--etcd", etcd.endpoint,
                                          *VLLM, "--cpu-cores", "0-1"], tmp_path_factory.mktemp("pd-agg"))
    child.start()
    try:
        child.wait_ready(lambda: grpc_serving(address), 300)

        # The blocking gRPC API: a second event loop (asyncio.run) would bind grpc.aio's one
        # process-wide poller to a loop that is closed before the tests run.
        def generate(name: str, content: str) -> list[int]:
            ids = tokenizer.encode_chat([{"role": "user", "content": content}])
            with grpc.insecure_channel(address) as channel:
                replies = list(worker_pb2_grpc.WorkerStub(channel).Generate(
                    worker_pb2.WorkerGenerateRequest(request_id=f"agg-{name}", prompt_token_ids=ids,
                                                     sampling=chat("", MAX_TOKENS).sampling), timeout=120))
            return [t for r in replies for t in r.token_ids]

        return {name: generate(name, content) for name, content in PROMPTS.items() if name != "cancel"}
    finally:
        child.stop()


@pytest.fixture(scope="module")
def pd_mesh(etcd, references, model_dir, tmp_path_factory):
    mesh = start_mesh(etcd, tmp_path_factory.mktemp("pd-vllm"), model_dir,
                      [[*vllm_args("prefill", "0"), "--kv-lease-s", str(KV_LEASE_S)], vllm_args("decode", "1")],
                      lease_ttl=30, worker_timeout=300)
    yield mesh
    mesh.stop()


def roles(mesh) -> dict[str, str]:
    return {("prefill" if "prefill" in child.argv else "decode"): address for address, child in mesh.workers.items()}


async def generate(mesh, name: str, max_tokens: int = MAX_TOKENS) -> tuple[list[int], inference_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
        replies = [r async for r in inference_pb2_grpc.InferenceStub(channel).Generate(
            chat(PROMPTS[name], max_tokens), timeout=120)]
    return [t for r in replies for t in r.token_ids], replies[-1]


async def explain(mesh, name: str) -> scheduler_pb2.ExplainResponse:
    async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
        return await scheduler_pb2_grpc.SchedulerStub(channel).Explain(
            scheduler_pb2.ExplainRequest(request=chat(PROMPTS[name])))


async def test_long_prompt_prefilled_remotely_decodes_the_aggregated_tokens(pd_mesh, references):
    addresses = roles(pd_mesh)
    explained = await explain(pd_mesh, "long")
    assert explained.disaggregation.rule == "remote", explained.disaggregation.reason
    before_p, before_d = await load(addresses["prefill"]), await load(addresses["decode"])
    tokens, last = await generate(pd_mesh, "long")
    after_p, after_d = await load(addresses["prefill"]), await load(addresses["decode"])
    assert tokens == references["long"]
    prompt_tokens = last.usage.prompt_tokens
    assert after_p.prompt_tokens - before_p.prompt_tokens == prompt_tokens
    assert after_p.generated_tokens - before_p.generated_tokens == 1
    # The decode engine computed no prompt token: every one was pulled or already cached there.
    pulled = after_d.kv_transferred_prompt_tokens - before_d.kv_transferred_prompt_tokens
    cached = after_d.cached_prompt_tokens - before_d.cached_prompt_tokens
    assert pulled > 0 and after_d.prompt_tokens - before_d.prompt_tokens == prompt_tokens == pulled + cached


async def test_each_pd_worker_publishes_its_nixl_agent_metadata_under_its_lease(pd_mesh, etcd):
    import msgspec
    from etcd3aio import Etcd3Client
    from google.protobuf import json_format

    from llm_mesh.v1 import membership_pb2

    # Decoded as plain msgpack maps (vLLM's NixlHandshakePayload / NixlAgentMetadata fields):
    # importing vLLM's nixl package would load the NIXL bindings into pytest, which aborts it.

    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        listed = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest())
    client = Etcd3Client([etcd.endpoint])
    await client.connect()
    try:
        for worker in listed.workers:
            info = worker.member.worker
            assert info.kv_endpoint.engine_id and info.kv_endpoint.port and info.nixl_metadata_key
            got = await client.kv.get(info.nixl_metadata_key)
            assert got.kvs and got.kvs[0].lease  # under a lease: it goes with the worker
            stored = json_format.Parse(got.kvs[0].value, membership_pb2.NixlAgentMetadata())
            payload = msgspec.msgpack.decode(stored.handshake_payload)
            agent = msgspec.msgpack.decode(payload["agent_metadata_bytes"])
            assert stored.engine_id == agent["engine_id"] == info.kv_endpoint.engine_id
            assert agent["num_blocks"] == stored.num_blocks == info.kv_blocks_total
            assert len(agent["agent_metadata"]) == stored.agent_metadata_bytes > 0  # the NIXL agent blob
            assert payload["compatibility_hash"] == stored.compatibility_hash
    finally:
        await client.close()


async def test_prompts_sharing_a_prefix_complete_without_a_stall(pd_mesh, references):
    for name in ("shared0", "shared1"):
        started = time.monotonic()
        tokens, _ = await generate(pd_mesh, name)
        elapsed = time.monotonic() - started
        assert tokens == references[name], name
        assert elapsed < STALL_S, f"{name} took {elapsed:.1f}s"


async def test_prefilled_kv_that_no_decode_leg_pulls_is_freed_after_the_lease(pd_mesh, model_dir):
    """A decode leg that never reaches its engine (worker gone, scheduler died) leaves the
    prefiller holding the blocks: they are released after --kv-lease-s, not leaked."""
    addresses = roles(pd_mesh)
    ids = ModelTokenizer(str(model_dir)).encode_chat([{"role": "user", "content": PROMPTS["unpulled"]}])
    async with grpc.aio.insecure_channel(addresses["prefill"]) as channel:
        replies = [r async for r in worker_pb2_grpc.WorkerStub(channel).Generate(worker_pb2.WorkerGenerateRequest(
            request_id="unpulled", prompt_token_ids=ids, remote_decode=True,
            sampling=sampling_pb2.SamplingParams(max_tokens=1, temperature=0)), timeout=120)]
    finished = time.monotonic()
    assert len(replies[-1].kv_transfer.block_ids) == -(-len(ids) // 32)  # the last block partly filled
    held = (await load(addresses["prefill"])).kv_cache_usage
    assert held > 0
    while (usage := (await load(addresses["prefill"])).kv_cache_usage) > 0:
        assert time.monotonic() - finished < KV_LEASE_S + 10, f"still held ({usage}) after the lease"
        await asyncio.sleep(0.5)
    assert time.monotonic() - finished > KV_LEASE_S / 2  # freed by the lease, not at once


async def test_client_cancel_ends_both_legs_and_frees_their_kv(pd_mesh):
    addresses = roles(pd_mesh)
    before_d = await load(addresses["decode"])
    async with grpc.aio.insecure_channel(pd_mesh.scheduler_address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(chat(PROMPTS["cancel"], 1500, ignore_eos=True))
        for _ in range(3):
            await call.read()
        call.cancel()
    deadline = time.monotonic() + 10
    while True:
        p, d = await load(addresses["prefill"]), await load(addresses["decode"])
        if (p.running, p.waiting, d.running, d.waiting) == (0, 0, 0, 0) and p.kv_cache_usage == d.kv_cache_usage == 0:
            break
        assert time.monotonic() < deadline, f"still held: prefill {p}, decode {d}"
        await asyncio.sleep(0.25)
    assert d.requests_aborted >= before_d.requests_aborted + 1
    await asyncio.sleep(1.0)
    assert (await load(addresses["decode"])).generated_tokens == d.generated_tokens


async def test_killed_prefill_worker_falls_back_to_a_local_prefill(pd_mesh, references):
    """kill -9 (of the worker's whole process group): its lease (30 s) still names it, the leg
    fails, the decode worker prefills itself."""
    addresses = roles(pd_mesh)
    pd_mesh.workers[addresses["prefill"]].kill()  # the worker and its engine processes, as a dead pod
    before_d = await load(addresses["decode"])
    tokens, last = await generate(pd_mesh, "fallback")
    after_d = await load(addresses["decode"])
    assert tokens == references["fallback"]
    assert after_d.kv_transferred_prompt_tokens == before_d.kv_transferred_prompt_tokens
    assert after_d.prompt_tokens - before_d.prompt_tokens == last.usage.prompt_tokens
