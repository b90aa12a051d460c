"""The REST gateway against a real mesh (etcd, scheduler process, `sim` workers).

Most tests run the gateway in-process through httpx's ASGI transport; the
ones about sockets (client disconnects, the OpenAI SDK, random bytes, signals,
etcd registration) run it behind a real uvicorn server or as a real process.
Status codes the real scheduler cannot be made to return on demand (401, 403,
429 with a retry hint, 500, a failure mid-stream) come from a fake `Inference`
server in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from etcd3aio import Etcd3Client, prefix_range_end
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.gateway import build_app
from services.grpc_util import status_with_details
from services.procs import Child, http_ok

pytestmark = pytest.mark.timeout(300)

ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "rate_limit_error", "request_cancelled", "server_error", "service_unavailable", "timeout_error"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_error(response: httpx.Response, status: int, *, param: str | None = "any",
                 says: str | None = None) -> dict[str, Any]:
    """The response is OpenAI's error shape with this status (and param / message text)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] in ERROR_TYPES, error
    if param != "any":
        assert error["param"] == param, error
    if says is not None:
        assert says.lower() in error["message"].lower(), error
    return error


def parse_sse(text: str) -> list[Any]:
    """`data:` events in order; "[DONE]" stays a string, everything else is parsed JSON."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block.removeprefix("data: ")
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def chat_body(model: str, content: Any = "Say hi.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


@pytest.fixture(scope="module")
async def gw(sim_mesh) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(sim_mesh.scheduler_address)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                     timeout=60) as client:
            yield client


@pytest.fixture(scope="module")
def gateway_process(sim_mesh, tmp_path_factory) -> Iterator[str]:
    """`llm-mesh gateway` as a real process, registered in etcd; yields its base URL."""
    port = free_port()
    child = Child.llm_mesh(f"gateway-{port}", ["gateway", "--port", str(port), "--scheduler",
                                               sim_mesh.scheduler_address, "--etcd", sim_mesh.etcd],
                           tmp_path_factory.mktemp("gateway"))
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_ready(lambda: http_ok(f"{url}/health"), 60)
        yield url
    finally:
        child.stop()


# ---------------------------------------------------------------- happy paths


async def test_chat_completion(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(sim_mesh.model, user="alice"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["model"] == sim_mesh.model
    assert abs(body["created"] - time.time()) < 60
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(usage["prompt_tokens_details"]["cached_tokens"], int)


async def test_completion(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/completions", json={"model": sim_mesh.model, "prompt": "Once upon a time",
                                               "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["text"]
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 5


async def test_completion_defaults_to_16_tokens(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/completions", json={"model": sim_mesh.model, "prompt": ["Once upon a time"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 16  # the sim engine never stops early (no EOS)
    assert body["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_ends_with_done(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(sim_mesh.model, stream=True))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len(chunks) >= 2
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert "usage" not in chunk  # only with stream_options.include_usage
        [choice] = chunk["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text


async def test_chat_stream_include_usage(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(
        sim_mesh.model, stream=True, stream_options={"include_usage": True}, max_tokens=6))
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None for c in chunks)
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk" and last["id"] == chunks[0]["id"]
    usage = last["usage"]
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_completion_stream(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.post("/v1/completions", json={"model": sim_mesh.model, "prompt": "The sky is", "max_tokens": 6,
                                               "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["object"] == "text_completion" for c in events[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["text"] for c in chunks)
    assert last["choices"] == [] and 1 <= last["usage"]["completion_tokens"] <= 6


async def test_greedy_stream_matches_unary(gw: httpx.AsyncClient, sim_mesh) -> None:
    body = chat_body(sim_mesh.model, "Count to five.", temperature=0, max_tokens=10)
    unary = (await gw.post("/v1/chat/completions", json=body)).json()
    events = parse_sse((await gw.post("/v1/chat/completions", json=body | {"stream": True})).text)
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == unary["choices"][0]["message"]["content"]


async def test_models(gw: httpx.AsyncClient, sim_mesh) -> None:
    r = await gw.get("/v1/models")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list"
    [model] = [m for m in body["data"] if m["id"] == sim_mesh.model]
    assert model["object"] == "model" and model["owned_by"] == "llm-mesh"
    assert isinstance(model["created"], int) and model["max_model_len"] > 0


async def test_health(gw: httpx.AsyncClient) -> None:
    r = await gw.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_scheduler_down_is_503() -> None:
    app = build_app(f"127.0.0.1:{free_port()}")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert_error(await client.get("/v1/models"), 503)
        down = await client.post("/v1/chat/completions", json=chat_body("m"))
        assert_error(down, 503)
        assert "127.0.0.1" not in down.text, "internal addresses must not reach clients"
        assert down.headers["Retry-After"] == "1"


async def test_accepted_openai_variants(gw: httpx.AsyncClient, sim_mesh) -> None:
    variants = [
        chat_body(sim_mesh.model, stop="\n\n"),
        chat_body(sim_mesh.model, stop=["a", "b", "c", "d"]),
        chat_body(sim_mesh.model, stop=None, temperature=None, user=None, seed=7, top_p=0.9, n=1),
        chat_body(sim_mesh.model, [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi."}]),
        chat_body(sim_mesh.model, logprobs=False, presence_penalty=0.5, some_future_field={"x": [1]}),
        chat_body(sim_mesh.model, user="bob", stream=False),
    ]
    for body in variants:
        r = await gw.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, (body, r.text)


async def test_max_completion_tokens_is_an_alias(gw: httpx.AsyncClient, sim_mesh) -> None:
    body = chat_body(sim_mesh.model, "Write a long story.", max_completion_tokens=3)
    del body["max_tokens"]
    r = await gw.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3
    same = await gw.post("/v1/chat/completions", json=body | {"max_tokens": 3})
    assert same.status_code == 200, same.text


# ---------------------------------------------------------------- bad input at the edge


async def test_body_too_large_is_413(sim_mesh) -> None:
    app = build_app(sim_mesh.scheduler_address, max_body_bytes=1024)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        big = json.dumps(chat_body(sim_mesh.model, "x" * 2000)).encode()
        assert_error(await client.post("/v1/chat/completions", content=big), 413, says="larger than 1024")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds while reading
            for i in range(0, len(big), 100):
                yield big[i:i + 100]

        r = await client.post("/v1/chat/completions", content=chunked())
        assert "content-length" not in r.request.headers
        assert_error(r, 413, says="larger than 1024")
        small = await client.post("/v1/chat/completions", json=chat_body(sim_mesh.model))
        assert small.status_code == 200, small.text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(("raw", "says"), [
    (b"\xff\xfe{}", "utf-8"),
    (b'{"model": "caf\xe9"}', "utf-8"),
    (b"", "not valid json"),
    (b"{", "not valid json"),
    (b'{"model": "m",}', "not valid json"),
    (b'{"temperature": NaN}', "not valid json"),
    (b'{"temperature": Infinity}', "not valid json"),
    (b"[" * 200_000 + b"]" * 200_000, "not valid json"),
    (b"[]", "must be a json object, got array"),
    (b'"hello"', "got string"),
    (b"42", "got number"),
    (b"null", "got null"),
    (b"true", "got boolean"),
])
async def test_malformed_body_is_400(gw: httpx.AsyncClient, path: str, raw: bytes, says: str) -> None:
    assert_error(await gw.post(path, content=raw), 400, param=None, says=says)


@pytest.mark.parametrize(("patch", "param", "says"), [
    ({"model": 5}, "model", "must be a string"),
    ({"max_tokens": "ten"}, "max_tokens", "must be an integer"),
    ({"max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"max_tokens": True}, "max_tokens", "must be an integer"),
    ({"max_tokens": -1}, "max_tokens", "between"),
    ({"max_tokens": 2**40}, "max_tokens", "between"),
    ({"max_completion_tokens": [3]}, "max_completion_tokens", "must be an integer"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "differ"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"top_p": {}}, "top_p", "must be a number"),
    ({"seed": "x"}, "seed", "must be an integer"),
    ({"seed": 2**70}, "seed", "between"),
    ({"n": "1"}, "n", "must be an integer"),
    ({"user": 12}, "user", "must be a string"),
    ({"stop": 3}, "stop", "string or an array"),
    ({"stop": {"a": 1}}, "stop", "string or an array"),
    ({"stop": ["ok", 1]}, "stop[1]", "must be a string"),
    ({"stream": "yes"}, "stream", "must be a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"stream": True, "stream_options": []}, "stream_options", "must be an object"),
    ({"stream": True, "stream_options": {"include_usage": "x"}}, "stream_options.include_usage", "boolean"),
    ({"messages": "hi"}, "messages", "must be an array"),
    ({"messages": {"role": "user"}}, "messages", "must be an array"),
    ({"messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "must be a string"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string or an array"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content", "string or an array"),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0].content[0]", "must be an object"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "only text"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
     "messages[0].content[0].text", "must be a string"),
    ({"messages": [{"role": "user", "content": "hi", "name": 1}]}, "messages[0].name", "must be a string"),
    ({"messages": [{"role": "user", "content": "bad \ud800 surrogate"}]}, "messages[0].content", "surrogate"),
])
async def test_chat_wrong_types_are_400(gw: httpx.AsyncClient, sim_mesh, patch: dict[str, Any], param: str,
                                        says: str) -> None:
    body = chat_body(sim_mesh.model) | patch
    raw = json.dumps(body).encode()  # ensure_ascii keeps a lone surrogate as a \\ud800 escape
    assert_error(await gw.post("/v1/chat/completions", content=raw), 400, param=param, says=says)


@pytest.mark.parametrize(("patch", "param", "says"), [
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": [1, 2, 3]}, "prompt", "must be a string"),
    ({"prompt": ["a", "b"]}, "prompt", "must be a string"),
    ({"prompt": {"text": "a"}}, "prompt", "must be a string"),
    ({"max_tokens": "ten"}, "max_tokens", "must be an integer"),
    ({"stop": [None]}, "stop[0]", "must be a string"),
])
async def test_completion_wrong_types_are_400(gw: httpx.AsyncClient, sim_mesh, patch: dict[str, Any], param: str,
                                              says: str) -> None:
    body = {"model": sim_mesh.model, "prompt": "hi", "max_tokens": 4} | patch
    assert_error(await gw.post("/v1/completions", json=body), 400, param=param, says=says)


@pytest.mark.parametrize(("patch", "status", "param"), [
    ({"messages": []}, 400, "messages"),
    ({"messages": None}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100_000}, 400, "max_tokens"),
    ({"n": 2}, 400, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"temperature": 5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"model": "no-such-model"}, 404, "model"),
    ({"model": None}, 400, "model"),
])
async def test_scheduler_validation_maps_to_http(gw: httpx.AsyncClient, sim_mesh, patch: dict[str, Any],
                                                 status: int, param: str) -> None:
    body = chat_body(sim_mesh.model) | patch
    for stream in (False, True):  # errors before the first chunk are real statuses when streaming too
        error = assert_error(await gw.post("/v1/chat/completions", json=body | {"stream": stream}), status,
                             param=param)
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_prompt_longer_than_context_is_400(gw: httpx.AsyncClient, sim_mesh) -> None:
    body = {"model": sim_mesh.model, "prompt": "hello " * 6000, "max_tokens": 4}
    assert_error(await gw.post("/v1/completions", json=body), 400, param="prompt", says="context window")


async def test_unknown_path_is_404_json(gw: httpx.AsyncClient) -> None:
    assert_error(await gw.get("/v1/nope"), 404, says="/v1/nope")
    assert_error(await gw.post("/v1/embeddings", json={}), 404)


async def test_wrong_method_is_405_json(gw: httpx.AsyncClient) -> None:
    r = await gw.get("/v1/chat/completions")
    assert_error(r, 405, says="GET")
    assert "POST" in r.headers["allow"]
    assert_error(await gw.post("/v1/models"), 405)
    assert_error(await gw.delete("/health"), 405)


# ---------------------------------------------------------------- deadlines


async def test_request_timeout_is_504_or_sse_error(sim_mesh) -> None:
    app = build_app(sim_mesh.scheduler_address, request_timeout=1.0)
    body = chat_body(sim_mesh.model, "Write a very long story.", max_tokens=3000, temperature=1.0)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30) as client:
        assert_error(await client.post("/v1/chat/completions", json=body), 504)
        r = await client.post("/v1/chat/completions", json=body | {"stream": True})
        assert r.status_code == 200  # the deadline passes after the first chunk
        events = parse_sse(r.text)
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["type"] == "timeout_error" and error["code"] == "deadline_exceeded"


# ---------------------------------------------------------------- real sockets


class _QuietServer(uvicorn.Server):
    """uvicorn inside the test's event loop, leaving signal handling to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve_in_loop(app: Any) -> AsyncIterator[str]:
    port = free_port()
    server = _QuietServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def _worker_loads(sim_mesh) -> list[worker_pb2.WorkerLoad]:
    loads = []
    for address in sim_mesh.workers:
        async with grpc.aio.insecure_channel(address) as channel:
            loads.append(await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest(), timeout=5))
    return loads


async def _scheduler_inflight(sim_mesh) -> int:
    async with grpc.aio.insecure_channel(sim_mesh.scheduler_address) as channel:
        workers = await scheduler_pb2_grpc.SchedulerStub(channel).ListWorkers(scheduler_pb2.ListWorkersRequest(),
                                                                              timeout=5)
    return sum(w.inflight for w in workers.workers)


async def test_client_disconnect_aborts_the_engine_request(sim_mesh) -> None:
    aborted_before = sum(load.requests_aborted for load in await _worker_loads(sim_mesh))
    body = chat_body(sim_mesh.model, "Write a very long story.", stream=True, max_tokens=3000)
    async with serve_in_loop(build_app(sim_mesh.scheduler_address)) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                first = await anext(lines)
                assert first.startswith("data: ")
                assert await _scheduler_inflight(sim_mesh) == 1
            # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            aborted = sum(load.requests_aborted for load in await _worker_loads(sim_mesh))
            if aborted > aborted_before and await _scheduler_inflight(sim_mesh) == 0:
                break
            await asyncio.sleep(0.1)
        assert await _scheduler_inflight(sim_mesh) == 0
        assert aborted == aborted_before + 1


def test_openai_sdk(gateway_process: str, sim_mesh) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{gateway_process}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=sim_mesh.model, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8)
    assert reply.object == "chat.completion" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.total_tokens == reply.usage.prompt_tokens + \
        reply.usage.completion_tokens

    stream = client.chat.completions.create(
        model=sim_mesh.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 6

    assert [m.id for m in client.models.list()] == [sim_mesh.model]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=sim_mesh.model, messages=[], max_tokens=2)


async def _gateway_keys(endpoint: str) -> list[str]:
    prefix = "/llm-mesh/v1/gateways/"
    client = Etcd3Client([endpoint])
    await client.connect()
    try:
        response = await client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()), timeout=5)
    finally:
        await client.close()
    return [kv.key.decode() for kv in response.kvs]


async def test_gateway_registers_in_etcd_and_stops_cleanly(sim_mesh, tmp_path) -> None:
    before = set(await _gateway_keys(sim_mesh.etcd))
    port = free_port()
    child = Child.llm_mesh("gateway-reg", ["gateway", "--port", str(port), "--scheduler",
                                           sim_mesh.scheduler_address, "--etcd", sim_mesh.etcd], tmp_path)
    child.start()
    try:
        await asyncio.to_thread(child.wait_ready, lambda: http_ok(f"http://127.0.0.1:{port}/health"), 60)
        deadline = time.monotonic() + 10
        while not (set(await _gateway_keys(sim_mesh.etcd)) - before) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(set(await _gateway_keys(sim_mesh.etcd)) - before) == 1
    finally:
        rc = await asyncio.to_thread(child.stop)
    assert rc == 0, child.tail()
    assert set(await _gateway_keys(sim_mesh.etcd)) == before  # lease revoked, not left to expire


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_known = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
          "stop", "n", "user", "stream", "stream_options"]


_bounded_max_tokens = st.integers(-2, 4) | _json.filter(lambda v: v is not None and not (isinstance(v, int) and v > 4))


@st.composite
def _request_bodies(draw: st.DrawFn, model: str, path: str) -> Any:
    """Arbitrary JSON, or a valid request with a few fields replaced by arbitrary JSON
    (max_tokens stays small or invalid, so no example starts a long generation)."""
    if draw(st.integers(0, 2)) == 0:
        return draw(st.dictionaries(st.sampled_from(_known), _json, max_size=6) | _json)
    body: dict[str, Any] = {"model": model, "max_tokens": 3}
    if path == "/v1/completions":
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    for key in draw(st.lists(st.sampled_from(_known), max_size=2, unique=True)):
        body[key] = draw(_bounded_max_tokens if key in ("max_tokens", "max_completion_tokens") else _json)
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_json_never_5xx(gateway_process: str, sim_mesh, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    body = data.draw(_request_bodies(sim_mesh.model, path))
    r = httpx.post(gateway_process + path, content=json.dumps(body), timeout=30)
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/x"]),
       raw=st.binary(max_size=512))
def test_random_bytes_never_5xx(gateway_process: str, path: str, raw: bytes) -> None:
    r = httpx.post(gateway_process + path, content=raw, timeout=30)
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, (raw, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- status mapping (fake scheduler)


class _FakeInference(inference_pb2_grpc.InferenceServicer):
    """Fails with the status named in `user`; "SLOW" hangs until cancelled; "MIDSTREAM" fails after a chunk."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    @staticmethod
    def _status(user: str) -> grpc.Status:
        code = grpc.StatusCode[user]
        return status_with_details(code, f"fake {code.name}", field="messages" if code.name == "INVALID_ARGUMENT"
                                   else None, retry_after_s=2.5 if code.name in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else None)

    async def _hang(self) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def CreateChatCompletion(self, request, context):
        if request.user == "SLOW":
            await self._hang()
        await context.abort_with_status(self._status(request.user))

    async def StreamChatCompletion(self, request, context):
        if request.user in ("SLOW", "MIDSTREAM"):
            yield inference_pb2.ChatCompletionChunk(
                id="chatcmpl-fake", object="chat.completion.chunk", created=1, model="fake",
                choices=[inference_pb2.ChatChunkChoice(delta=inference_pb2.ChatDelta(role="assistant", content="x"))])
            if request.user == "SLOW":
                await self._hang()
            await context.abort_with_status(self._status("INTERNAL"))
        await context.abort_with_status(self._status(request.user))


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[tuple[_FakeInference, str]]:
    server = grpc.aio.server()
    servicer = _FakeInference()
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


@pytest.mark.parametrize(("code", "status", "error_type"), [
    ("INVALID_ARGUMENT", 400, "invalid_request_error"),
    ("UNAUTHENTICATED", 401, "authentication_error"),
    ("PERMISSION_DENIED", 403, "permission_error"),
    ("NOT_FOUND", 404, "not_found_error"),
    ("RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    ("CANCELLED", 499, "request_cancelled"),
    ("INTERNAL", 500, "server_error"),
    ("UNKNOWN", 500, "server_error"),
    ("FAILED_PRECONDITION", 500, "server_error"),
    ("UNAVAILABLE", 503, "service_unavailable"),
    ("DEADLINE_EXCEEDED", 504, "timeout_error"),
])
async def test_grpc_status_mapping(fake, code: str, status: int, error_type: str) -> None:
    _, address = fake
    app = build_app(address)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json=chat_body("m", user=code, stream=stream))
            error = assert_error(r, status, says=f"fake {code}")
            assert error["type"] == error_type
            assert error["param"] == ("messages" if code == "INVALID_ARGUMENT" else None)
            assert r.headers.get("retry-after") == ("3" if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE") else None)


async def test_error_mid_stream_is_an_sse_event(fake) -> None:
    _, address = fake
    app = build_app(address)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        r = await client.post("/v1/chat/completions", json=chat_body("m", user="MIDSTREAM", stream=True))
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": "x"}
    assert events[1] == {"error": {"message": "fake INTERNAL", "type": "server_error", "param": None,
                                   "code": "internal"}}
    assert events[2] == "[DONE]" and len(events) == 3


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_cancels_the_grpc_call(fake, stream: bool) -> None:
    servicer, address = fake
    servicer.cancelled.clear()
    async with serve_in_loop(build_app(address)) as url:
        async with httpx.AsyncClient() as client:
            body = chat_body("m", user="SLOW", stream=stream)
            if stream:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=10) as r:
                    assert r.status_code == 200
                    assert (await anext(r.aiter_lines())).startswith("data: ")
            else:
                with pytest.raises(httpx.ReadTimeout):
                    await client.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)
        await asyncio.wait_for(servicer.cancelled.wait(), 5)
