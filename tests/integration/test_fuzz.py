"""Hostile input against a real mesh: the gateway as a process, the scheduler's gRPC APIs and a worker's.

Properties, over a bounded, derandomized hypothesis run plus hand-written nasty cases:
- the gateway never answers 5xx: a 4xx in OpenAI's error shape that names the parameter;
- gRPC never answers UNKNOWN or INTERNAL: INVALID_ARGUMENT (or NOT_FOUND, RESOURCE_EXHAUSTED…) with a
  reason, and a google.rpc.BadRequest naming the field for INVALID_ARGUMENT;
- afterwards every process is alive, each one's RSS grew by less than RSS_GROWTH_BOUND_MB over the
  whole run, and a normal request still succeeds.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis.control import currently_in_test_context, event
from hypothesis import strategies as st

from llm_mesh.v1 import (inference_pb2, inference_pb2_grpc, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc,
                         worker_pb2, worker_pb2_grpc)
from services.procs import Child, free_port, http_ok

pytestmark = pytest.mark.timeout(300)

RSS_GROWTH_BOUND_MB = 200
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MB = 1024 * 1024
# Examples per property: 40 in `make test`; LLM_MESH_FUZZ_EXAMPLES=1700 is the long campaign
# (6 properties: > 10,000 hostile inputs).
FUZZ = settings(max_examples=int(os.environ.get("LLM_MESH_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BAD_GRPC_CODES = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# gRPC channels to the mesh: room to send oversized messages, so the *server's* limit is what is tested.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * MB), ("grpc.max_receive_message_length", 64 * MB)]


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def gateway(sim_mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Child]]:
    """`llm-mesh gateway` as a real process (so its pid can be watched); yields (base URL, child)."""
    port = free_port()
    child = Child.llm_mesh(f"gateway-fuzz-{port}", ["gateway", "--port", str(port), "--scheduler",
                                                    sim_mesh.scheduler_address], tmp_path_factory.mktemp("gw-fuzz"))
    child.start()
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_ready(lambda: http_ok(f"{url}/health"), 60)
        yield url, child
    finally:
        child.stop()


def _pids(sim_mesh, gateway: tuple[str, Child]) -> dict[str, int]:
    return {"gateway": gateway[1].pid, "scheduler": sim_mesh.scheduler.pid,
            **{f"worker {address}": child.pid for address, child in sim_mesh.workers.items()}}


def note(outcome: str) -> None:
    """Count an outcome in hypothesis's statistics (when called from a hypothesis test)."""
    if currently_in_test_context():
        event(outcome)


def vm_rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def normal_request_succeeds(url: str, model: str) -> None:
    r = httpx.post(url + CHAT, json={"model": model, "messages": [{"role": "user", "content": "Say hi."}],
                                     "max_tokens": 4}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def rss_before(sim_mesh, gateway: tuple[str, Child]) -> dict[str, float]:
    """Every process's RSS once warm (after one normal request over each API), before any fuzzing."""
    normal_request_succeeds(gateway[0], sim_mesh.model)
    with grpc.insecure_channel(sim_mesh.scheduler_address) as channel:
        list(inference_pb2_grpc.InferenceStub(channel).Generate(_generate(sim_mesh.model), timeout=30))
    return {name: vm_rss_mb(pid) for name, pid in _pids(sim_mesh, gateway).items()}


@pytest.fixture(scope="module")
def url(gateway: tuple[str, Child], rss_before: dict[str, float]) -> str:
    return gateway[0]


def assert_clean_http_error(r: httpx.Response, what: Any) -> dict[str, Any]:
    """Not a 5xx; an error is OpenAI's shape and names its parameter unless the whole body is bad."""
    note(f"HTTP {r.status_code}")
    assert r.status_code < 500, (str(what)[:300], r.text[:500])
    if r.status_code < 400:
        return {}
    assert r.status_code in (400, 404, 413), (str(what)[:300], r.text[:500])
    body = r.json()
    error = body["error"]
    assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], error
    assert len(r.content) < 8192, "an error must not echo a huge input back"
    if r.status_code == 404:
        assert error["param"] == "model", error
    elif r.status_code == 400 and error["code"] not in ("invalid_json", "invalid_encoding"):
        assert isinstance(error["param"], str) and error["param"], error
    return error


def assert_clean_rpc_error(exc: grpc.RpcError, what: Any, names_a_field: bool = True) -> None:
    code = exc.code()
    note(f"gRPC {code.name}")
    assert code not in BAD_GRPC_CODES, (str(what)[:300], code, exc.details())
    assert exc.details(), (str(what)[:300], code)
    assert len(exc.details()) < 8192, "an error must not echo a huge input back"
    if code == grpc.StatusCode.INVALID_ARGUMENT and names_a_field:
        fields = bad_fields(exc)
        assert fields and all(fields), (exc.details(), fields)


def bad_fields(exc: grpc.RpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest in the error's trailers."""
    status = rpc_status.from_call(exc)
    fields = []
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def _generate(model: str, **sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(model=model, prompt="Hello there",
                                         sampling=sampling_pb2.SamplingParams(max_tokens=3, **sampling))


# ---------------------------------------------------------------- REST: strategies


_EXTREME_NUMBERS = [0, -1, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30,
                    -0.0, 0.5, 1.0, 1.5, 2.0000001, 1e-320, 1e38, 1e39, 1e308, -1e308, 3.4028235e38]
_ODD_TEXT = ["", "\x00", "a\x00b", "\u202eevil\u202c", "\u200f\u200e", "😀" * 50, "\ufeff", "\uffff", "\U0010ffff",
             "e\u0301" * 20, "\\ud800", "\r\n\r\n", "data: [DONE]\n\n", "<|im_start|>system", "%s%n{0}"]
_scalar = (st.none() | st.booleans() | st.sampled_from(_EXTREME_NUMBERS) | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(_ODD_TEXT) | st.text(max_size=30))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8) | st.sampled_from(["role", "content", "type", "text"]),
                                       inner, max_size=4), max_leaves=10)
# max_tokens small, or invalid: no example may start a long generation (the window is 4096 tokens).
_max_tokens = st.integers(-3, 4) | _json.filter(
    lambda v: v is not None and not (isinstance(v, int | float) and 5 <= v <= 4096))
_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
           "stop", "n", "user", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
           "frequency_penalty", "logit_bias", "response_format", "tools", "best_of", "echo", "suffix"]
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | _json,
                                  "content": st.sampled_from(_ODD_TEXT) | _json},
                                 optional={"name": st.sampled_from(_ODD_TEXT) | _json})


def _field_value(key: str) -> st.SearchStrategy[Any]:
    if key in ("max_tokens", "max_completion_tokens"):
        return _max_tokens
    if key == "messages":
        return st.lists(_message, max_size=3) | _json
    if key == "stop":
        return st.lists(st.sampled_from(_ODD_TEXT) | _json, max_size=6) | st.sampled_from(_ODD_TEXT) | _json
    return _json


@st.composite
def hostile_bodies(draw: st.DrawFn, model: str, path: str) -> dict[str, Any]:
    """A valid small request with a few fields replaced by hostile values."""
    body: dict[str, Any] = {"model": model, "max_tokens": 3}
    if path == COMPLETIONS:
        body["prompt"] = "Hello"
    else:
        body["messages"] = [{"role": "user", "content": "Hello"}]
    for key in draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=3, unique=True)):
        body[key] = draw(_field_value(key))
    return body


def _dumps(body: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \ud800 escapes (the JSON is valid, its strings are not Unicode)
    return json.dumps(body, allow_nan=False).encode()


# ---------------------------------------------------------------- REST: properties


@FUZZ
@given(data=st.data())
def test_hostile_json_fields_never_5xx(url: str, sim_mesh, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from([CHAT, COMPLETIONS]))
    body = data.draw(hostile_bodies(sim_mesh.model, path))
    assert_clean_http_error(httpx.post(url + path, content=_dumps(body), timeout=30), body)


_CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  "application/json; charset=latin-1", "*/*;;;=", "a" * 2000]


@FUZZ
@given(path=st.sampled_from([CHAT, COMPLETIONS]), content_type=st.sampled_from(_CONTENT_TYPES),
       raw=st.binary(max_size=256) | st.sampled_from([b"", b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"{\"a\":\xff}",
                                                      b"\x1f\x8b\x08\x00", b"null", b"[]", b"\"x\"", b"1e400"]))
def test_raw_bodies_never_5xx(url: str, path: str, content_type: str | None, raw: bytes) -> None:
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(url + path, content=raw, headers=headers, timeout=30)
    error = assert_clean_http_error(r, raw)
    assert error, "no raw body here is a valid request"


def _nested(depth: int) -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"


def _nasty_cases(model: str) -> list[tuple[str, bytes, dict[str, Any], int, str | None]]:
    """(path, body, headers, expected status, expected param): hand-written."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    one_mb = "x" * MB

    def j(**patch: Any) -> bytes:
        return _dumps(chat | patch)

    bomb = gzip.compress(b"[" * (32 * MB))  # ~32 KB on the wire, 32 MB if anything inflated it
    return [
        (CHAT, b"", {}, 400, None),
        (CHAT, b"   ", {}, 400, None),
        (CHAT, b"\xff" * 100, {}, 400, None),
        (CHAT, _nested(10_000), {}, 400, None),
        (CHAT, _nested(100_000), {}, 400, None),
        (CHAT, b'{"messages": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_001, {}, 400, None),
        (CHAT, b'{"model": "m", "unknown": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", {}, 400, None),
        (CHAT, b'{"model": "%s", "max_tokens": NaN}' % model.encode(), {}, 400, None),
        (CHAT, b'{"model": "%s", "temperature": Infinity}' % model.encode(), {}, 400, None),
        (CHAT, b'{"model": "%s", "top_p": -Infinity}' % model.encode(), {}, 400, None),
        (CHAT, j()[:-1] + b', "temperature": 1e400}', {}, 400, "temperature"),
        (CHAT, j()[:-1] + b', "max_tokens": 1e400}', {}, 400, "max_tokens"),
        (CHAT, j()[:-1] + b', "seed": ' + b"9" * 5000 + b"}", {}, 400, None),  # beyond int() digit limit
        (CHAT, j()[:-1] + b', "max_tokens": 99999999999999999999999}', {}, 400, "max_tokens"),
        (CHAT, j()[:-1] + b', "max_tokens": 4.0}', {}, 400, "max_tokens"),
        (CHAT, j()[:-1] + b', "max_tokens": 0, "max_tokens": 3}', {}, 200, None),  # duplicate keys: the last wins
        (CHAT, j()[:-1] + b', "model": "nope", "model": "%s"}' % model.encode(), {}, 200, None),
        (CHAT, j(n=2**31), {}, 400, "n"),
        (CHAT, j(n=2**63), {}, 400, "n"),
        (CHAT, j(n=-1), {}, 400, "n"),
        (CHAT, j(n=1.0), {}, 400, "n"),
        (CHAT, j(max_tokens=2**31), {}, 400, "max_tokens"),
        (CHAT, j(max_tokens=2**32), {}, 400, "max_tokens"),
        (CHAT, j(max_tokens=-(2**63)), {}, 400, "max_tokens"),
        (CHAT, j(max_tokens=True), {}, 400, "max_tokens"),
        (CHAT, j(seed=2**63), {}, 400, "seed"),
        (CHAT, j(seed=-(2**63)), {}, 200, None),
        (CHAT, j(temperature=1e39), {}, 400, "temperature"),
        (CHAT, j(temperature=-0.0), {}, 200, None),
        (CHAT, j(top_p=1e-46), {}, 400, "top_p"),  # a positive double, 0 as a float32
        (CHAT, j(top_p="0.5"), {}, 400, "top_p"),
        (CHAT, j(logprobs=True, top_logprobs=2**40, logit_bias={"1": 1e308}), {}, 200, None),  # ignored, unknown
        (CHAT, j(stop=[str(i) for i in range(10_000)]), {}, 400, "stop"),
        (CHAT, j(stop="\ud800"), {}, 400, "stop"),
        (CHAT, j(stop=["ok", "\udfff"]), {}, 400, "stop[1]"),
        (CHAT, j(stop=one_mb), {}, 400, "stop"),
        (CHAT, j(stop=""), {}, 400, "stop"),
        (CHAT, j(user=one_mb), {}, 400, "user"),
        (CHAT, j(user="\ud83d"), {}, 400, "user"),
        (CHAT, j(model=one_mb), {}, 400, "model"),
        (CHAT, j(model="\x00"), {}, 404, "model"),
        (CHAT, j(messages=[{"role": "user", "content": "\ud800\udc00 ok \udc00"}]), {}, 400,
         "messages[0].content"),
        (CHAT, j(messages=[{"role": "user\x00", "content": "hi"}]), {}, 400, "messages[0].role"),
        (CHAT, j(messages=[{"role": "user", "content": "\x00\u202e😀\u200f" * 200}]), {}, 200, None),
        (CHAT, j(messages=[{"role": "user", "content": "hello " * 170_000}]), {}, 400, "prompt"),  # ~1 MB
        (CHAT, j(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), {},
         400, "messages[0].content[0].type"),
        (CHAT, j(messages=[{"role": "user", "content": "hi", "name": one_mb}]), {}, 200, None),  # the template drops it
        (CHAT, j(messages=[{"role": "user", "content": "hi"}] * 20_000), {}, 400, "prompt"),
        (CHAT, j(stream=True, stream_options={"include_usage": "yes"}), {}, 400, "stream_options.include_usage"),
        (CHAT, j(stream="true"), {}, 400, "stream"),
        (COMPLETIONS, _dumps({"model": model, "prompt": [1, 2, 3], "max_tokens": 3}), {}, 400, "prompt"),
        (COMPLETIONS, _dumps({"model": model, "prompt": one_mb, "max_tokens": 3}), {}, 400, "prompt"),
        (COMPLETIONS, _dumps({"model": model, "prompt": "\x00", "max_tokens": 3}), {}, 200, None),
        (COMPLETIONS, _dumps({"model": model, "prompt": "hi", "max_tokens": 3, "stop": "\ud800"}), {}, 400, "stop"),
        (CHAT, j(), {"content-type": "text/plain"}, 200, None),  # the body is JSON whatever it is labelled
        (CHAT, j(), {"content-type": "application/x-www-form-urlencoded"}, 200, None),
        # Request bodies are never inflated: a gzip bomb is just bytes that are not UTF-8.
        (CHAT, bomb, {"content-encoding": "gzip", "content-type": "application/json"}, 400, None),
        (CHAT, b"x" * (5 * MB), {}, 413, None),
        (CHAT, j(), {"x-tenant-id": b"\xe9t\xe9"}, 400, "X-Tenant-Id"),
        (CHAT, j(), {"x-tenant-id": "t" * 200}, 400, "X-Tenant-Id"),
    ]


def test_nasty_rest_cases(url: str, sim_mesh) -> None:
    failures = []
    for path, body, headers, status, param in _nasty_cases(sim_mesh.model):
        r = httpx.post(url + path, content=body, headers=headers, timeout=60)
        what = f"{path} {body[:120]!r} {headers}"
        try:
            error = assert_clean_http_error(r, what)
            assert r.status_code == status, (r.status_code, r.text[:300])
            if param is not None:
                assert error["param"] == param, error
        except (AssertionError, ValueError) as exc:
            failures.append(f"{what}: {exc!r} {r.status_code} {r.text[:200]!r}")
    assert not failures, "\n".join(failures)


def test_body_streamed_without_length_is_cut_at_the_limit(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "prompt": "'
        for _ in range(64):  # 64 MB offered; the gateway stops reading past 4 MiB
            yield b"a" * MB

    r = httpx.post(url + COMPLETIONS, content=chunks(), timeout=60)
    assert assert_clean_http_error(r, "chunked")["code"] == "body_too_large"


def test_oversized_declared_length_is_413(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n{}" % 2**63)
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 "), head[:300]


# ---------------------------------------------------------------- gRPC: strategies


_U32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2, 49151, 49152, 2**31 - 1, 2**31, 2**32 - 1])
_F32 = st.floats(width=32) | st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 2.0, 2.0001])
_I64 = st.integers(-(2**63), 2**63 - 1)
# Strings protobuf can carry (valid Unicode): NUL, RTL marks, emoji, private use; plus long ones.
_PB_TEXT = (st.text(st.characters(exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    [s for s in _ODD_TEXT if s != "\\ud800"]) | st.sampled_from(["x" * MB, "y" * 5000]))


@st.composite
def hostile_sampling(draw: st.DrawFn) -> sampling_pb2.SamplingParams:
    params = sampling_pb2.SamplingParams(max_tokens=draw(st.integers(0, 3) | st.sampled_from([5000, 2**31, 2**32 - 1])))
    if draw(st.booleans()):
        params.temperature = draw(_F32)
    if draw(st.booleans()):
        params.top_p = draw(_F32)
    if draw(st.booleans()):
        params.seed = draw(_I64)
    params.stop.extend(draw(st.lists(_PB_TEXT, max_size=6) | st.just([str(i) for i in range(10_000)])))
    params.stop_token_ids.extend(draw(st.lists(_U32, max_size=8)))
    params.ignore_eos = draw(st.booleans())
    return params


@st.composite
def hostile_generate(draw: st.DrawFn, model: str) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=draw(st.just(model) | _PB_TEXT), sampling=draw(hostile_sampling()),
                                            request_id=draw(_PB_TEXT), session_id=draw(_PB_TEXT))
    which = draw(st.sampled_from(["prompt", "messages", "token_ids", "none"]))
    if which == "prompt":
        request.prompt = draw(_PB_TEXT)
    elif which == "messages":
        for _ in range(draw(st.integers(0, 3))):
            request.messages.messages.add(role=draw(st.sampled_from(["user", "system", "tool"]) | _PB_TEXT),
                                          content=draw(_PB_TEXT), name=draw(_PB_TEXT))
        if not request.messages.messages:
            request.messages.SetInParent()
    elif which == "token_ids":
        ids = draw(st.lists(_U32, max_size=40) | st.sampled_from(["big", "huge"]))
        request.token_ids.ids.extend({"big": [7] * 5000, "huge": [7] * 3_000_000}.get(ids, ids)
                                     if isinstance(ids, str) else ids)
        request.token_ids.SetInParent()
    return request


@st.composite
def hostile_worker_request(draw: st.DrawFn, model: str) -> worker_pb2.WorkerGenerateRequest:
    request = worker_pb2.WorkerGenerateRequest(
        request_id=draw(st.text(max_size=8).map(lambda s: f"fuzz-{s}") | _PB_TEXT),
        model=draw(st.just(model) | st.just("") | _PB_TEXT), sampling=draw(hostile_sampling()))
    ids = draw(st.lists(_U32, max_size=40) | st.sampled_from(["big", "huge"]))
    request.prompt_token_ids.extend({"big": [7] * 5000, "huge": [7] * 3_000_000}.get(ids, ids)
                                    if isinstance(ids, str) else ids)
    request.remote_decode = draw(st.booleans())
    if draw(st.booleans()):
        request.remote_prefill.CopyFrom(worker_pb2.KVTransferParams(
            engine_id=draw(_PB_TEXT), block_ids=draw(st.lists(_U32, max_size=5)), num_tokens=draw(_U32)))
    return request


def _drain(call: Iterator[Any], what: Any, names_a_field: bool = True) -> None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        assert_clean_rpc_error(exc, what, names_a_field)
    else:
        note("gRPC OK")


# ---------------------------------------------------------------- gRPC: properties


@pytest.fixture(scope="module")
def scheduler_channel(sim_mesh, rss_before: dict[str, float]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sim_mesh.scheduler_address, options=CHANNEL_OPTIONS) as channel:
        yield channel


@FUZZ
@given(data=st.data())
def test_hostile_generate_never_unknown(scheduler_channel: grpc.Channel, sim_mesh, data: st.DataObject) -> None:
    request = data.draw(hostile_generate(sim_mesh.model))
    stub = inference_pb2_grpc.InferenceStub(scheduler_channel)
    _drain(stub.Generate(request, timeout=30), request)
    try:  # Explain validates the same request without running it
        scheduler_pb2_grpc.SchedulerStub(scheduler_channel).Explain(scheduler_pb2.ExplainRequest(request=request),
                                                                    timeout=30)
    except grpc.RpcError as exc:
        assert_clean_rpc_error(exc, request)


@FUZZ
@given(data=st.data())
def test_hostile_openai_grpc_never_unknown(scheduler_channel: grpc.Channel, sim_mesh, data: st.DataObject) -> None:
    sampling = data.draw(hostile_sampling())
    common = {"model": data.draw(st.just(sim_mesh.model) | _PB_TEXT), "max_tokens": sampling.max_tokens,
              "stop": sampling.stop, "user": data.draw(_PB_TEXT),
              "n": data.draw(st.sampled_from([0, 1, 2, 2**32 - 1]))}
    for name in ("temperature", "top_p", "seed"):
        if sampling.HasField(name):
            common[name] = getattr(sampling, name)
    stub = inference_pb2_grpc.InferenceStub(scheduler_channel)
    if data.draw(st.booleans()):
        messages = [inference_pb2.ChatMessage(role=data.draw(st.sampled_from(["user", "assistant"]) | _PB_TEXT),
                                              content=data.draw(_PB_TEXT)) for _ in range(data.draw(st.integers(0, 2)))]
        request: Any = inference_pb2.ChatCompletionRequest(messages=messages, **common)
        unary, stream = stub.CreateChatCompletion, stub.StreamChatCompletion
    else:
        request = inference_pb2.CompletionRequest(prompt=data.draw(_PB_TEXT), **common)
        unary, stream = stub.CreateCompletion, stub.StreamCompletion
    try:
        unary(request, timeout=30)
    except grpc.RpcError as exc:
        assert_clean_rpc_error(exc, request)
    _drain(stream(request, timeout=30), request)


@FUZZ
@given(data=st.data())
def test_hostile_worker_generate_never_unknown(sim_mesh, rss_before: dict[str, float], data: st.DataObject) -> None:
    address = data.draw(st.sampled_from(sorted(sim_mesh.workers)))
    request = data.draw(hostile_worker_request(sim_mesh.model))
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        _drain(stub.Generate(request, timeout=30), request)
        stub.Abort(worker_pb2.AbortRequest(request_id=request.request_id), timeout=10)


_METHODS = {
    "scheduler": ["/llm_mesh.v1.Inference/Generate", "/llm_mesh.v1.Inference/CreateChatCompletion",
                  "/llm_mesh.v1.Inference/StreamCompletion", "/llm_mesh.v1.Scheduler/Explain",
                  "/llm_mesh.v1.Scheduler/ListWorkers"],
    "worker": ["/llm_mesh.v1.Worker/Generate", "/llm_mesh.v1.Worker/Abort", "/llm_mesh.v1.Worker/GetLoad",
               "/llm_mesh.v1.Worker/GenerateStream"],
}
_BIDI = {"/llm_mesh.v1.Worker/GenerateStream"}
_STREAMING = {"/llm_mesh.v1.Inference/Generate", "/llm_mesh.v1.Inference/StreamCompletion",
              "/llm_mesh.v1.Worker/Generate"}
# Bytes that are not a valid message: truncated varints, wrong wire types, invalid UTF-8 in a string field.
_BAD_PROTO = [b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x12\x03\xed\xa0\x80",
              b"\x32\x01\xc0", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01", b"\x07", b"\xff" * 16]


@FUZZ
@given(target=st.sampled_from(["scheduler", "worker"]), data=st.data(),
       raw=st.binary(max_size=128) | st.sampled_from(_BAD_PROTO))
def test_undecodable_grpc_messages_never_unknown(sim_mesh, rss_before: dict[str, float], target: str,
                                                 data: st.DataObject, raw: bytes) -> None:
    address = sim_mesh.scheduler_address if target == "scheduler" else sorted(sim_mesh.workers)[0]
    method = data.draw(st.sampled_from(_METHODS[target]))
    with grpc.insecure_channel(address) as channel:
        if method in _BIDI:
            _drain(channel.stream_stream(method)(iter([raw]), timeout=10), (method, raw), names_a_field=False)
            return
        if method in _STREAMING:
            _drain(channel.unary_stream(method)(raw, timeout=10), (method, raw), names_a_field=False)
            return
        try:
            channel.unary_unary(method)(raw, timeout=10)
            note("gRPC OK")
        except grpc.RpcError as exc:
            assert_clean_rpc_error(exc, (method, raw), names_a_field=False)


def test_nasty_grpc_cases(scheduler_channel: grpc.Channel, sim_mesh) -> None:
    """Hand-written: oversized messages, huge token lists, and admin views that stay small however
    large the bad requests were."""
    stub = inference_pb2_grpc.InferenceStub(scheduler_channel)
    one_mb = "m" * MB
    cases = [
        inference_pb2.GenerateRequest(model=sim_mesh.model, token_ids=inference_pb2.TokenIds(ids=[1] * 5_000_000)),
        inference_pb2.GenerateRequest(model=sim_mesh.model, token_ids=inference_pb2.TokenIds(ids=[2**32 - 1] * 10),
                                      sampling=sampling_pb2.SamplingParams(max_tokens=1)),
        inference_pb2.GenerateRequest(model=sim_mesh.model, prompt="x" * (17 * MB)),
        inference_pb2.GenerateRequest(model=sim_mesh.model, prompt="hi " * (MB // 2),
                                      sampling=sampling_pb2.SamplingParams(max_tokens=1)),
    ] + [inference_pb2.GenerateRequest(model=one_mb, request_id=one_mb, session_id=one_mb, prompt="hi",
                                       sampling=sampling_pb2.SamplingParams(max_tokens=1)) for _ in range(20)]
    for request in cases:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(request, timeout=60))
        assert_clean_rpc_error(caught.value, request.model[:50])
    stats = scheduler_pb2_grpc.SchedulerStub(scheduler_channel).GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)
    assert stats.ByteSize() < MB, "recent errors must not keep huge inputs"


def test_worker_rejects_what_the_scheduler_would(sim_mesh, rss_before: dict[str, float]) -> None:
    def worker_request(request_id: str, prompt: list[int], **sampling: Any) -> worker_pb2.WorkerGenerateRequest:
        return worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                                sampling=sampling_pb2.SamplingParams(**sampling))

    cases = [(worker_request("nan", [7], max_tokens=2, temperature=float("nan")), "sampling.temperature"),
             (worker_request("inf", [7], max_tokens=2, top_p=float("inf")), "sampling.top_p"),
             (worker_request("", [7], max_tokens=2), "request_id"),
             (worker_request("long", [7] * 5000, max_tokens=1), "prompt_token_ids")]
    with grpc.insecure_channel(sorted(sim_mesh.workers)[0]) as channel:
        for request, field in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(worker_pb2_grpc.WorkerStub(channel).Generate(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert bad_fields(caught.value) == [field], caught.value.details()


def test_rejected_huge_requests_are_not_kept(sim_mesh, rss_before: dict[str, float]) -> None:
    """A rejected near-limit message is freed at once, not when a full garbage collection runs
    (grpc.aio's abort keeps a reference cycle through the servicer's frames: ~50 MB per call here)."""
    address, worker = sorted(sim_mesh.workers.items())[0]
    calls = [(address, worker.pid, "/llm_mesh.v1.Worker/Generate", worker_pb2.WorkerGenerateRequest(
        request_id="huge", prompt_token_ids=[7] * 3_000_000, sampling=sampling_pb2.SamplingParams(max_tokens=1))),
             (sim_mesh.scheduler_address, sim_mesh.scheduler.pid, "/llm_mesh.v1.Inference/Generate",
              inference_pb2.GenerateRequest(model=sim_mesh.model,
                                            token_ids=inference_pb2.TokenIds(ids=[1] * 3_000_000)))]
    for target, pid, method, request in calls:
        raw = request.SerializeToString()
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_stream(method)
            before = vm_rss_mb(pid)
            for _ in range(6):
                with pytest.raises(grpc.RpcError) as caught:
                    list(call(raw, timeout=30))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            grown = vm_rss_mb(pid) - before
        assert grown < 100, f"{method}: RSS grew {grown:.0f} MB over 6 rejected 12 MB requests"


# ---------------------------------------------------------------- afterwards


def test_after_the_fuzz_everything_is_alive_and_bounded(url: str, sim_mesh, gateway: tuple[str, Child],
                                                        rss_before: dict[str, float]) -> None:
    pids = _pids(sim_mesh, gateway)
    for name, pid in pids.items():
        assert os.path.exists(f"/proc/{pid}"), f"{name} (pid {pid}) died"
    assert gateway[1].alive() and sim_mesh.scheduler.alive() and all(c.alive() for c in sim_mesh.workers.values())
    normal_request_succeeds(url, sim_mesh.model)
    with grpc.insecure_channel(sim_mesh.scheduler_address) as channel:
        responses = list(inference_pb2_grpc.InferenceStub(channel).Generate(_generate(sim_mesh.model), timeout=30))
    assert responses[-1].usage.completion_tokens == 3
    after = {name: vm_rss_mb(pid) for name, pid in pids.items()}
    growth = {name: round(after[name] - rss_before[name], 1) for name in pids}
    print(f"RSS MB before {rss_before} after {after} growth {growth}")
    assert all(g < RSS_GROWTH_BOUND_MB for g in growth.values()), growth
