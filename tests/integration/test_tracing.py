"""OpenTelemetry tracing through real processes: gateway, scheduler, a prefill-role and a
decode-role `sim` worker on a real etcd, exporting over OTLP/gRPC to a receiver run by the test
(tests/otlp_receiver.py).

The traced mesh runs with a 30 s batch delay, so nothing is exported while it serves: every span
arrives through the flush each service does when SIGTERM stops it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import secrets
from collections.abc import Iterator

import httpx
import pytest

from services.etcd_server import EtcdServer
from services.procs import Child, free_port, http_ok
from tests.conftest import SIM_ARGS, Mesh, start_mesh
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(300)

PREFILL, DECODE = [*SIM_ARGS, "--role", "prefill"], [*SIM_ARGS, "--role", "decode"]
SECRET = "zebra-tracing-secret"  # in every prompt here: must never reach a span
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
GATEWAY, SCHEDULER, WORKER = "llm-mesh-gateway", "llm-mesh-scheduler", "llm-mesh-worker"


def traceparent() -> tuple[str, str, str]:
    """(header, trace id, the client's span id) of a new sampled W3C trace context."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@dataclasses.dataclass
class Request:
    trace_id: str
    client_span_id: str
    response: httpx.Response


@dataclasses.dataclass
class TracedRun:
    receiver: OtlpReceiver
    exported_while_serving: int
    chat: Request  # a long prompt: prefilled remotely, decoded with the pulled KV
    stream: Request
    unknown_model: Request

    def spans(self, request: Request) -> list[ReceivedSpan]:
        return self.receiver.trace(request.trace_id)


def start_gateway(mesh: Mesh, log_dir: pathlib.Path, env: dict[str, str] | None) -> tuple[Child, str]:
    port = free_port()
    child = Child.llm_mesh(f"gateway-{port}", ["gateway", "--port", str(port), "--scheduler",
                                               mesh.scheduler_address], log_dir, env)
    child.start()
    mesh.children.append(child)  # mesh.stop() stops it first
    url = f"http://127.0.0.1:{port}"
    child.wait_ready(lambda: http_ok(f"{url}/health"), 60)
    return child, url


def post(url: str, body: dict) -> Request:
    header, trace_id, span_id = traceparent()
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{url}/v1/chat/completions", json=body, headers={"traceparent": header})
        response.read()
    assert response.status_code in (200, 404), response.text
    return Request(trace_id, span_id, response)


def chat_body(model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **extra}


@pytest.fixture(scope="module")
def traced(model_dir, tmp_path_factory) -> Iterator[TracedRun]:
    receiver = OtlpReceiver().start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "30000"}
    tmp = tmp_path_factory.mktemp("traced-mesh")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    try:
        mesh = start_mesh(etcd, tmp, model_dir, [PREFILL, DECODE], env=env)
        try:
            _, url = start_gateway(mesh, tmp, env)
            long_prompt = " ".join(f"{SECRET}-{i}" for i in range(150))  # far above the remote threshold
            chat = post(url, chat_body(mesh.model, long_prompt))
            stream = post(url, chat_body(mesh.model, f"{SECRET} streamed", stream=True))
            unknown = post(url, chat_body("no-such-model", f"{SECRET} unknown"))
            exported_while_serving = len(receiver.spans)
        finally:
            mesh.stop()  # SIGTERM: each service flushes its spans on the way out
        yield TracedRun(receiver, exported_while_serving, chat, stream, unknown)
    finally:
        etcd.stop()
        receiver.stop()


def by_name(spans: list[ReceivedSpan], service: str, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.service == service and s.name == name]


def one(spans: list[ReceivedSpan], service: str, name: str, **attributes) -> ReceivedSpan:
    found = [s for s in by_name(spans, service, name)
             if all(s.attributes.get(k) == v for k, v in attributes.items())]
    assert len(found) == 1, (service, name, attributes, [(s.service, s.name) for s in spans])
    return found[0]


def tree(spans: list[ReceivedSpan]) -> list[str]:
    """Every span as the path from the root: "service:name > service:name > ...", sorted."""
    ids = {s.span_id: s for s in spans}

    def label(s: ReceivedSpan) -> str:
        leg = s.attributes.get("llm_mesh.pd.leg")
        return f"{s.service.removeprefix('llm-mesh-')}:{s.name}" + (f"[{leg}]" if leg else "")

    def path(s: ReceivedSpan) -> str:
        return f"{path(ids[s.parent_span_id])} > {label(s)}" if s.parent_span_id in ids else label(s)

    return sorted(path(s) for s in spans)


def test_spans_arrive_through_the_flush_on_sigterm(traced: TracedRun) -> None:
    assert traced.exported_while_serving == 0
    assert traced.receiver.wait_for(lambda: len(traced.spans(traced.chat)) == 14), len(traced.receiver.spans)


def test_one_request_is_one_trace_across_gateway_scheduler_and_both_workers(traced: TracedRun) -> None:
    # Every span any service sent belongs to one of the three requests: probes, load polls and
    # KV event streams make none.
    requests = (traced.chat, traced.stream, traced.unknown_model)
    assert {s.trace_id for s in traced.receiver.spans} == {r.trace_id for r in requests}
    spans = traced.spans(traced.chat)
    assert {s.service for s in spans} == {GATEWAY, SCHEDULER, WORKER}
    ids = {s.span_id for s in spans}
    [root] = [s for s in spans if s.parent_span_id not in ids]
    assert (root.service, root.name, root.kind) == (GATEWAY, "POST /v1/chat/completions", SERVER)
    assert root.parent_span_id == traced.chat.client_span_id  # the caller's traceparent
    assert len(ids) == len(spans)
    http = "gateway:POST /v1/chat/completions"
    gw_call = f"{http} > gateway:llm_mesh.v1.Inference/CreateChatCompletion"
    sched = f"{gw_call} > scheduler:llm_mesh.v1.Inference/CreateChatCompletion"
    prefill, decode = f"{sched} > scheduler:prefill", f"{sched} > scheduler:decode"
    worker_call = " > scheduler:llm_mesh.v1.Worker/Generate"
    prefill_call, decode_call = prefill + worker_call, decode + worker_call
    worker_rpc = " > worker:llm_mesh.v1.Worker/Generate"
    prefill_rpc, decode_rpc = prefill_call + worker_rpc, decode_call + worker_rpc
    assert tree(spans) == sorted([
        http, gw_call, sched, f"{sched} > scheduler:tokenize", f"{sched} > scheduler:route",
        prefill, prefill_call, prefill_rpc, f"{prefill_rpc} > worker:generate[prefill]",
        decode, decode_call, decode_rpc, f"{decode_rpc} > worker:generate[decode]",
        f"{decode_rpc} > worker:generate[decode] > worker:kv_transfer",
    ]), "\n".join(tree(spans))
    assert all(s.status_code != STATUS_ERROR for s in spans)


def test_streamed_request_is_one_trace_that_the_http_span_covers(traced: TracedRun) -> None:
    response = traced.stream.response
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    spans = traced.spans(traced.stream)
    ids = {s.span_id for s in spans}
    [root] = [s for s in spans if s.parent_span_id not in ids]
    assert root.name == "POST /v1/chat/completions" and root.parent_span_id == traced.stream.client_span_id
    server = one(spans, SCHEDULER, "llm_mesh.v1.Inference/StreamChatCompletion")
    assert server.kind == SERVER
    assert one(spans, GATEWAY, "llm_mesh.v1.Inference/StreamChatCompletion").kind == CLIENT
    assert root.raw.end_time_unix_nano >= server.raw.end_time_unix_nano  # the body streamed inside the span
    assert server.attributes["gen_ai.usage.output_tokens"] >= 1
    one(spans, WORKER, "generate", **{"llm_mesh.pd.leg": "aggregated"})  # short: no remote prefill


def test_spans_carry_http_rpc_genai_routing_and_pd_attributes(traced: TracedRun) -> None:
    spans = traced.spans(traced.chat)
    usage = traced.chat.response.json()["usage"]
    http = one(spans, GATEWAY, "POST /v1/chat/completions")
    assert {k: http.attributes[k] for k in ("http.request.method", "http.route", "http.response.status_code",
                                             "url.path")} == {"http.request.method": "POST",
                                                              "http.route": "/v1/chat/completions",
                                                              "http.response.status_code": 200,
                                                              "url.path": "/v1/chat/completions"}
    server = one(spans, SCHEDULER, "llm_mesh.v1.Inference/CreateChatCompletion")
    assert server.attributes["rpc.system"] == "grpc" and server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["rpc.service"] == "llm_mesh.v1.Inference"
    assert server.attributes["rpc.method"] == "CreateChatCompletion"
    genai = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "SmolLM2-135M-Instruct",
             "gen_ai.request.max_tokens": 8, "gen_ai.request.temperature": 0.0,
             "gen_ai.usage.input_tokens": usage["prompt_tokens"],
             "gen_ai.usage.output_tokens": usage["completion_tokens"]}
    assert {k: server.attributes.get(k) for k in genai} == genai
    assert server.attributes["gen_ai.response.finish_reasons"][0] in ("stop", "length")
    assert one(spans, SCHEDULER, "tokenize").attributes["llm_mesh.prompt_tokens"] == usage["prompt_tokens"]

    route = one(spans, SCHEDULER, "route").attributes
    decode, prefill = one(spans, SCHEDULER, "decode").attributes, one(spans, SCHEDULER, "prefill").attributes
    assert route["llm_mesh.route.policy"] == "ours" and route["llm_mesh.pd.rule"] == "remote"
    assert route["llm_mesh.pd.reason"].startswith("remote: ") and route["llm_mesh.pd.remote"] is True
    assert route["llm_mesh.route.worker"] == decode["llm_mesh.worker.id"]
    assert route["llm_mesh.pd.prefill_worker"] == prefill["llm_mesh.worker.id"]
    assert prefill["llm_mesh.worker.id"] != decode["llm_mesh.worker.id"]
    assert list(json.loads(route["llm_mesh.route.scores"])) == [decode["llm_mesh.worker.id"]]
    assert list(json.loads(route["llm_mesh.pd.prefill_scores"])) == [prefill["llm_mesh.worker.id"]]
    assert route["llm_mesh.route.predicted_cached_tokens"] == 0  # a new prompt
    assert route["llm_mesh.pd.uncached_tokens"] == usage["prompt_tokens"]
    assert prefill["llm_mesh.pd.outcome"] == "remote"
    assert prefill["llm_mesh.kv.tokens"] == usage["prompt_tokens"]
    assert decode["llm_mesh.pd.kv_pulled"] is True
    assert decode["gen_ai.usage.output_tokens"] == usage["completion_tokens"]

    prefill_leg = one(spans, WORKER, "generate", **{"llm_mesh.pd.leg": "prefill"}).attributes
    decode_leg = one(spans, WORKER, "generate", **{"llm_mesh.pd.leg": "decode"}).attributes
    assert prefill_leg["gen_ai.usage.output_tokens"] == 1 and prefill_leg["llm_mesh.worker.role"] == "prefill"
    assert decode_leg["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert decode_leg["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    kv = one(spans, WORKER, "kv_transfer").attributes
    assert kv["llm_mesh.kv.tokens"] == usage["prompt_tokens"] and kv["llm_mesh.kv.blocks"] > 0
    assert kv["llm_mesh.kv.transferred_tokens"] + kv["llm_mesh.kv.cached_tokens"] == usage["prompt_tokens"]


def test_no_span_holds_prompt_or_completion_text(traced: TracedRun) -> None:
    completion = traced.chat.response.json()["choices"][0]["message"]["content"]
    assert traced.receiver.spans
    for s in traced.receiver.spans:
        wire = s.raw.SerializeToString()
        assert SECRET.encode() not in wire, (s.service, s.name)
        if len(completion.strip()) >= 12:  # long enough not to occur by chance
            assert completion.encode() not in wire, (s.service, s.name)
        assert not any(k.startswith(("gen_ai.input", "gen_ai.output", "gen_ai.prompt")) for k in s.attributes)


def test_errors_set_error_status_with_the_grpc_code(traced: TracedRun) -> None:
    assert traced.unknown_model.response.status_code == 404
    spans = traced.spans(traced.unknown_model)
    http = one(spans, GATEWAY, "POST /v1/chat/completions")
    assert http.attributes["http.response.status_code"] == 404
    assert http.status_code != STATUS_ERROR  # a client error (HTTP semconv)
    for service, kind in ((GATEWAY, CLIENT), (SCHEDULER, SERVER)):
        rpc = one(spans, service, "llm_mesh.v1.Inference/CreateChatCompletion")
        assert rpc.kind == kind and rpc.status_code == STATUS_ERROR, rpc
        assert rpc.attributes["rpc.grpc.status_code"] == 5 and rpc.status_message.startswith("NOT_FOUND")
    tokenize = one(spans, SCHEDULER, "tokenize")
    assert tokenize.status_code == STATUS_ERROR and "exception" in tokenize.events
    assert tokenize.attributes["rpc.grpc.status_code"] == 5
    assert not by_name(spans, SCHEDULER, "route") and not by_name(spans, WORKER, "generate")


def test_nothing_is_exported_without_otel_settings(model_dir, tmp_path_factory, monkeypatch) -> None:
    """Off by default: a receiver on OTLP's default endpoint (127.0.0.1:4317, where an SDK that
    exported by default would send) gets nothing from a mesh started without OTEL_* — not while
    it serves, nor when SIGTERM stops it."""
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    try:
        receiver = OtlpReceiver("127.0.0.1:4317").start()
    except (OSError, RuntimeError):
        pytest.skip("127.0.0.1:4317 (the OTLP default port) is taken")
    tmp = tmp_path_factory.mktemp("untraced-mesh")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    try:
        mesh = start_mesh(etcd, tmp, model_dir, [SIM_ARGS], env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
        try:
            _, url = start_gateway(mesh, tmp, {"OTEL_BSP_SCHEDULE_DELAY": "50"})
            request = post(url, chat_body(mesh.model, f"{SECRET} untraced"))
            assert request.response.status_code == 200
        finally:
            mesh.stop()
        assert receiver.exports == 0 and receiver.spans == []
    finally:
        etcd.stop()
        receiver.stop()
