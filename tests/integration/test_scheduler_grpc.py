"""The public gRPC API through a real scheduler process to real `sim` worker processes."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llm_mesh.v1 import (inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc,
                         worker_pb2, worker_pb2_grpc)

from tests.waiting import poll

@pytest.fixture
async def inference(sim_mesh):
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)


def chat(text: str, **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model="SmolLM2-135M-Instruct",
        messages=inference_pb2.ChatMessages(messages=[inference_pb2.ChatMessage(role="user", content=text)]),
        sampling=sampling_pb2.SamplingParams(**sampling),
    )


async def test_generate_streams_tokens_and_finishes_with_usage(inference):
    responses = [r async for r in inference.Generate(chat("hello", max_tokens=12, temperature=0))]
    assert responses[0].worker_id
    assert sum(len(r.token_ids) for r in responses) == 12
    last = responses[-1]
    assert last.finish_reason == sampling_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens > 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 12
    assert "".join(r.text for r in responses).strip()


async def test_chat_completion_mirrors_openai(inference):
    request = inference_pb2.ChatCompletionRequest(
        model="SmolLM2-135M-Instruct", messages=[inference_pb2.ChatMessage(role="user", content="hi")], max_tokens=5)
    reply = await inference.CreateChatCompletion(request)
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    chunks = [c async for c in inference.StreamChatCompletion(request)]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(not c.choices[0].finish_reason for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_completion_defaults_to_16_tokens(inference):
    reply = await inference.CreateCompletion(
        inference_pb2.CompletionRequest(model="SmolLM2-135M-Instruct", prompt="Once upon a time"))
    assert reply.object == "text_completion"
    assert reply.usage.completion_tokens == 16
    chunks = [c async for c in inference.StreamCompletion(
        inference_pb2.CompletionRequest(model="SmolLM2-135M-Instruct", prompt="Once", max_tokens=3))]
    assert chunks[-1].usage.completion_tokens == 3


async def test_list_models(inference):
    models = await inference.ListModels(inference_pb2.ListModelsRequest())
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct"]
    assert models.data[0].max_model_len > 0


async def test_requests_spread_over_both_workers(sim_mesh, inference):
    # The scheduler knows both workers, routable...
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        listed = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest())
    assert sorted(w.state for w in listed.workers) == [scheduler_pb2.WORKER_STATE_READY] * 2
    # ...and uses both for a burst of distinct long prompts: each queues ~500 uncached tokens, so
    # one worker taking all eight would have to look 8x slower than the other. (Short prompts that
    # share the chat template may rightly batch on one worker: the cost model's call, not a bug.)
    replies = await asyncio.gather(*[
        _first(inference.Generate(chat(f"{i} " + " ".join(f"spread{i}x{j}" for j in range(120)), max_tokens=20)))
        for i in range(8)])
    assert len({r.worker_id for r in replies}) == 2


async def _first(stream):
    async for response in stream:
        return response


def _violation_field(error: grpc.aio.AioRpcError) -> str | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return bad.field_violations[0].field
    return None


@pytest.mark.parametrize("request_, code, field, words", [
    (inference_pb2.GenerateRequest(model="SmolLM2-135M-Instruct"), "INVALID_ARGUMENT", "input", "required"),
    (inference_pb2.GenerateRequest(model="SmolLM2-135M-Instruct", prompt=""), "INVALID_ARGUMENT", "prompt", "empty"),
    (inference_pb2.GenerateRequest(model="SmolLM2-135M-Instruct", messages=inference_pb2.ChatMessages()),
     "INVALID_ARGUMENT", "messages", "empty"),
    (chat("x", max_tokens=0), "INVALID_ARGUMENT", "max_tokens", "at least 1"),
    (chat("x", max_tokens=100_000), "INVALID_ARGUMENT", "max_tokens", "context window"),
    (chat("x", temperature=3.0), "INVALID_ARGUMENT", "temperature", "[0, 2]"),
    (chat("x", temperature=float("nan")), "INVALID_ARGUMENT", "temperature", "[0, 2]"),
    (chat("x", top_p=0.0), "INVALID_ARGUMENT", "top_p", "(0, 1]"),
    (chat("x", stop=["a", "b", "c", "d", "e"]), "INVALID_ARGUMENT", "stop", "at most 4"),
    (inference_pb2.GenerateRequest(model="no-such-model", prompt="x"), "NOT_FOUND", "model", "does not exist"),
    (inference_pb2.GenerateRequest(model="SmolLM2-135M-Instruct", token_ids=inference_pb2.TokenIds(ids=[10**9])),
     "INVALID_ARGUMENT", "token_ids", "vocabulary"),
    (inference_pb2.GenerateRequest(model="SmolLM2-135M-Instruct", messages=inference_pb2.ChatMessages(
        messages=[inference_pb2.ChatMessage(role="wizard", content="x")])), "INVALID_ARGUMENT", "messages[0].role",
     "one of"),
])
async def test_bad_input_gets_a_status_with_the_reason(inference, request_, code, field, words):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in inference.Generate(request_)]
    assert info.value.code().name == code
    assert words in info.value.details()
    assert _violation_field(info.value) == field


async def test_prompt_longer_than_the_context_says_the_token_counts(inference):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in inference.Generate(chat("word " * 5000))]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert "context window is 4096 tokens" in details and "the prompt is 50" in details


async def test_n_other_than_one_is_rejected(inference):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await inference.CreateChatCompletion(inference_pb2.ChatCompletionRequest(
            model="SmolLM2-135M-Instruct", messages=[inference_pb2.ChatMessage(role="user", content="x")], n=3))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violation_field(info.value) == "n"


async def test_deadline_propagates(inference):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [r async for r in inference.Generate(chat("slow", max_tokens=2000, ignore_eos=True), timeout=0.5)]
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_cancelled_stream_aborts_the_engine_request(sim_mesh, inference):
    """The client goes away mid-stream: the worker's engine stops generating."""
    call = inference.Generate(chat("cancel me", max_tokens=3000, ignore_eos=True))
    first = await call.read()
    worker_address = _address_of(sim_mesh, first.worker_id)
    for _ in range(5):
        await call.read()
    async with grpc.aio.insecure_channel(worker_address) as channel:
        worker = worker_pb2_grpc.WorkerStub(channel)
        during = await worker.GetLoad(worker_pb2.GetLoadRequest())
        assert during.running >= 1
        call.cancel()
        # the cancel crosses two processes: a loaded machine is slow
        after = await poll(lambda: worker.GetLoad(worker_pb2.GetLoadRequest()),
                           lambda lo: lo.running == 0, 10, "the worker's request aborted")
        await asyncio.sleep(0.5)
        later = await worker.GetLoad(worker_pb2.GetLoadRequest())
    assert after.running == 0
    assert after.requests_aborted >= during.requests_aborted + 1
    assert later.generated_tokens == after.generated_tokens, "the engine kept generating after the cancel"
    assert after.generated_tokens - during.generated_tokens < 500


async def test_admin_lists_workers_and_explains(sim_mesh):
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        admin = scheduler_pb2_grpc.SchedulerStub(channel)
        listed = await admin.ListWorkers(scheduler_pb2.ListWorkersRequest())
        assert {w.member.address for w in listed.workers} == set(sim_mesh.workers)
        assert all(w.state == scheduler_pb2.WORKER_STATE_READY for w in listed.workers)
        assert all(w.member.worker.engine == "sim" for w in listed.workers)
        explained = await admin.Explain(scheduler_pb2.ExplainRequest(request=chat("explain")))
        assert explained.policy == "ours"
        assert all("ttft.predicted_s" in s.components for s in explained.scores)
        assert explained.chosen_worker_id in {w.member.id for w in listed.workers}
        assert len(explained.scores) == 2 and explained.prompt_tokens > 0


def _address_of(mesh, worker_id: str) -> str:
    import grpc as sync_grpc

    with sync_grpc.insecure_channel(mesh.scheduler_address) as channel:
        listed = scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest())
    return next(w.member.address for w in listed.workers if w.member.id == worker_id)


async def test_a_repeated_prompt_goes_where_its_kv_cache_is(sim_mesh, inference):
    """KV events reach the scheduler's index; the second request sharing a long
    prefix lands on the worker that holds it and hits its prefix cache."""
    prefix = " ".join(f"tenant-{i}" for i in range(300))  # ~900 tokens, unique to this test
    first = [r async for r in inference.Generate(chat(prefix + " first question", max_tokens=2))]
    holder = first[0].worker_id
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        admin = scheduler_pb2_grpc.SchedulerStub(channel)
        deadline = time.monotonic() + 5
        while True:  # the index learns of the blocks through the worker's KV event stream
            explained = await admin.Explain(scheduler_pb2.ExplainRequest(request=chat(prefix + " second question")))
            if explained.chosen_worker_id == holder or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert explained.chosen_worker_id == holder
    scores = {s.worker_id: s for s in explained.scores}
    other = next(w for w in scores if w != holder)
    assert scores[holder].components["ttft.prefill_s"] < scores[other].components["ttft.prefill_s"]
    second = [r async for r in inference.Generate(chat(prefix + " second question", max_tokens=2))]
    assert second[0].worker_id == holder
    assert second[-1].usage.cached_prompt_tokens >= 800


async def test_metrics_scrape_shows_routing_and_cache_hits(sim_mesh, inference):
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape() -> dict:
        async with httpx.AsyncClient() as client:
            text = (await client.get(sim_mesh.metrics_url)).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    routed = ("llm_mesh_routing_decisions_total", (("outcome", "routed"), ("policy", "ours")))
    cached = ("llm_mesh_cached_prompt_tokens_total", ())
    before = await scrape()  # the mesh is shared: earlier tests' requests are in the totals
    prompt = " ".join(f"metrics-{i}" for i in range(200))
    for _ in range(2):
        [r async for r in inference.Generate(chat(prompt, max_tokens=2))]
        await asyncio.sleep(0.3)  # let the KV events of the first reach the index
    samples = await scrape()
    assert samples[routed] - before.get(routed, 0) == 2
    assert samples[("llm_mesh_kv_index_entries", ())] > 0
    assert samples[cached] > before.get(cached, 0)  # the second request hit the first one's blocks
    assert 0 < samples[("llm_mesh_prefix_cache_hit_ratio", ())] <= 1
    assert samples[("llm_mesh_routing_decision_seconds_count", (("policy", "ours"),))] >= 2
    assert any(name == "llm_mesh_routing_stage_seconds_count" for name, _ in samples)


@pytest.mark.parametrize("flags, message", [
    (["--load-poll-interval", "0"], "--load-poll-interval must be > 0 seconds, got 0.0"),
    (["--load-poll-interval", "inf"], "--load-poll-interval must be > 0 seconds, got inf"),
    (["--profile", "/nonexistent/ours.yaml"], "--profile: can't read profile /nonexistent/ours.yaml"),
    (["--profile", "fastest"], "--profile: no profile 'fastest'"),
])
def test_bad_scheduler_flags_are_refused_at_startup(flags, message):
    import subprocess
    import sys

    from services.procs import free_port

    done = subprocess.run([sys.executable, "-m", "services.cli", "scheduler", "--port", str(free_port()), *flags],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr
