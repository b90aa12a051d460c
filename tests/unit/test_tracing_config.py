"""services.tracing: which OTEL_* environments turn tracing on, and with what."""

from __future__ import annotations

import pytest

from services.tracing import DEFAULT_SAMPLER_RATIO, TracingConfig, config_from_env, scores_json
from scheduler.framework import WorkerScore

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},
    {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
    {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_TRACES_EXPORTER": "otlp,none"},
    {"OTEL_TRACES_EXPORTER": "zipkin"},  # not supported here: warned about, nothing installed
])
def test_off(env: dict[str, str]) -> None:
    assert config_from_env("llm-mesh-worker", env) is None


@pytest.mark.parametrize("env, exporters", [
    (ENDPOINT, ("otlp",)),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"}, ("otlp",)),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),  # the exporter's own default endpoint
    ({"OTEL_TRACES_EXPORTER": "console, otlp,console"}, ("console", "otlp")),
    ({**ENDPOINT, "OTEL_SDK_DISABLED": "false"}, ("otlp",)),
])
def test_on(env: dict[str, str], exporters: tuple[str, ...]) -> None:
    assert config_from_env("llm-mesh-worker", env) == TracingConfig(
        exporters, "llm-mesh-worker", sampler_from_env=False, ratio=DEFAULT_SAMPLER_RATIO)


def test_service_name_and_sampler_from_env() -> None:
    config = config_from_env("llm-mesh-gateway", {**ENDPOINT, "OTEL_SERVICE_NAME": "edge",
                                                  "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert config is not None
    assert (config.service_name, config.ratio, config.sampler_from_env) == ("edge", 0.25, False)
    config = config_from_env("llm-mesh-gateway", {**ENDPOINT, "OTEL_TRACES_SAMPLER": "always_off"})
    assert config is not None and config.sampler_from_env  # the SDK builds the named sampler


@pytest.mark.parametrize("arg", ["1.5", "-0.1", "lots"])
def test_a_bad_ratio_falls_back_to_the_default(arg: str) -> None:
    config = config_from_env("s", {**ENDPOINT, "OTEL_TRACES_SAMPLER_ARG": arg})
    assert config is not None and config.ratio == DEFAULT_SAMPLER_RATIO


def test_route_scores_are_bounded_and_skip_filtered_workers() -> None:
    rows = [WorkerScore("gone", 100.0, {}, "unhealthy")]  # filtered: never listed, whatever its score
    rows += [WorkerScore(f"w{i}", 10.0 - i, {}) for i in range(20)]
    assert scores_json(rows, limit=3) == '{"w0":10.0,"w1":9.0,"w2":8.0}'


@pytest.mark.parametrize("content", [False, True])
def test_request_text_reaches_a_span_only_with_the_content_flag(content: bool, monkeypatch) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llm_mesh.v1 import inference_pb2, sampling_pb2
    from services.tracing import RequestTrace

    if content:
        monkeypatch.setenv("LLM_MESH_TRACE_CONTENT", "1")
    else:
        monkeypatch.delenv("LLM_MESH_TRACE_CONTENT", raising=False)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # local: the process-wide provider stays the no-op one
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    question = inference_pb2.ChatMessage(role="user", content="secret question")
    request = inference_pb2.GenerateRequest(
        model="m", messages=inference_pb2.ChatMessages(messages=[question]),
        sampling=sampling_pb2.SamplingParams(max_tokens=3))
    with trace.use_span(provider.get_tracer("t").start_span("server"), end_on_exit=True):
        traced = RequestTrace(request)
        traced.response(inference_pb2.GenerateResponse(text="secret ", worker_id="w1"))
        traced.response(inference_pb2.GenerateResponse(
            text="answer", finish_reason=sampling_pb2.FINISH_REASON_STOP,
            usage=sampling_pb2.Usage(prompt_tokens=5, completion_tokens=2, cached_prompt_tokens=1)))
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes)
    assert (attributes["gen_ai.operation.name"], attributes["gen_ai.usage.input_tokens"],
            attributes["gen_ai.usage.output_tokens"], attributes["gen_ai.usage.cache_read.input_tokens"],
            tuple(attributes["gen_ai.response.finish_reasons"]), attributes["llm_mesh.worker.id"]) == (
        "chat", 5, 2, 1, ("stop",), "w1")
    text = repr(attributes)
    assert ("secret question" in text and "secret answer" in text) == content
    assert ("secret" in text) == content
