"""OpenTelemetry tracing for every llm-mesh service: the one place it is configured.

Off by default. `setup_tracing(name)` (first thing in each service's `run`) installs an SDK
tracer provider only when the standard variables ask for an exporter:

- `OTEL_TRACES_EXPORTER`: `otlp` (gRPC) and/or `console`, comma-separated; `none` = off.
  Unset: on with `otlp` iff `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`
  is set (the exporter reads those, `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, … itself).
- `OTEL_SDK_DISABLED=true` turns it off whatever else is set.
- `OTEL_TRACES_SAMPLER` / `_ARG`: any SDK sampler; unset, `parentbased_traceidratio` with
  ratio `OTEL_TRACES_SAMPLER_ARG` (default 1.0), so the gateway (or the first traced hop)
  decides and every hop after it follows the incoming `traceparent`'s sampled flag.
- `OTEL_SERVICE_NAME` overrides the service name; `OTEL_RESOURCE_ATTRIBUTES` adds attributes;
  `OTEL_BSP_*` tune the batch span processor; `OTEL_PROPAGATORS` the propagators (W3C
  tracecontext + baggage by default).

Off, nothing is installed: no interceptors, no middleware; `span()`/`current()` skip even the
API's no-op tracer (~8 µs of tracing calls per scheduler request). `LLM_MESH_TRACE_CONTENT=1`
adds prompts and completions to spans; without it no span holds request text, only counts.

Context travels as W3C `traceparent` in gRPC metadata (our own small aio interceptors: the
opentelemetry-instrumentation-grpc aio server interceptor misses `abort_with_status`, which every
servicer here uses, and ends streaming client spans only when the response iterator is collected)
and in the gateway's HTTP headers. gRPC spans follow the RPC semantic conventions
(`{service}/{method}`, rpc.*); any non-OK status is an ERROR with `rpc.grpc.status_code`. Client
spans are made only inside a trace, so background RPCs (load polls, KV event streams) make none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Setter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

log = logging.getLogger(__name__)

# Stays a no-op until setup_tracing installs a provider (the API's ProxyTracer then delegates).
tracer = trace.get_tracer("llm_mesh")

CONTENT_ENV = "LLM_MESH_TRACE_CONTENT"
DEFAULT_SAMPLER_RATIO = 1.0
SHUTDOWN_TIMEOUT_S = 5.0
MAX_SCORED_WORKERS = 8  # per-worker scores kept on a route span (bounded attribute size)

# RPCs and HTTP paths that never make spans: probes, reflection, polls and endless streams.
UNTRACED_RPC_PREFIXES = (
    "/grpc.health.v1.Health/", "/grpc.reflection.",
    "/llm_mesh.v1.Worker/WatchKVEvents", "/llm_mesh.v1.Worker/GetLoad",
)
UNTRACED_HTTP_PATHS = frozenset({"/health", "/healthz", "/ready", "/readyz", "/livez", "/metrics"})
# Metadata and admin RPCs that probes and dashboards poll (the gateway's /health asks ListModels,
# `llm-mesh top` the Scheduler API): a span only inside a trace, never a root of its own.
CHILD_ONLY_RPC_PREFIXES = ("/llm_mesh.v1.Inference/ListModels", "/llm_mesh.v1.Scheduler/")

_provider: Any = None  # the SDK TracerProvider while tracing is on


@dataclasses.dataclass(frozen=True)
class TracingConfig:
    exporters: tuple[str, ...]  # "otlp", "console"
    service_name: str
    sampler_from_env: bool  # OTEL_TRACES_SAMPLER is set: the SDK builds it
    ratio: float  # parentbased_traceidratio's ratio otherwise


def config_from_env(service_name: str, environ: Mapping[str, str] = os.environ) -> TracingConfig | None:
    """What setup_tracing would install for this environment; None: tracing stays off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        names = list(dict.fromkeys(n.strip() for n in named.split(",") if n.strip()))
        for name in set(names) - {"otlp", "console", "none"}:
            log.warning("OTEL_TRACES_EXPORTER: %r is not supported here (otlp, console, none)", name)
        exporters = [] if "none" in names else [n for n in names if n in ("otlp", "console")]
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        exporters = ["otlp"]
    else:
        exporters = []
    if not exporters:
        return None
    ratio = DEFAULT_SAMPLER_RATIO
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if arg:
        try:
            ratio = float(arg)
            if not 0.0 <= ratio <= 1.0:
                raise ValueError(arg)
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a ratio in [0, 1]; using %s", arg,
                        DEFAULT_SAMPLER_RATIO)
            ratio = DEFAULT_SAMPLER_RATIO
    return TracingConfig(tuple(exporters), environ.get("OTEL_SERVICE_NAME") or service_name,
                         sampler_from_env=bool(environ.get("OTEL_TRACES_SAMPLER", "").strip()), ratio=ratio)


def setup_tracing(service_name: str) -> None:
    """Install the SDK (batch processor, OTLP gRPC exporter) if the environment asks for it."""
    global _provider
    config = config_from_env(service_name)
    if config is None or _provider is not None:
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from services import __version__

    # Resource.create lets attributes passed here win over OTEL_SERVICE_NAME: pass the resolved one.
    resource = Resource.create({SERVICE_NAME: config.service_name, SERVICE_VERSION: __version__,
                                "service.namespace": "llm-mesh"})
    sampler = None if config.sampler_from_env else ParentBasedTraceIdRatio(config.ratio)
    provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=True)
    for name in config.exporters:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter: Any = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("tracing on: service %s, exporters %s, sampler %s", config.service_name,
             ",".join(config.exporters),
             "from OTEL_TRACES_SAMPLER" if sampler is None else f"parentbased_traceidratio {config.ratio}")


def shutdown_tracing(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Export what is still buffered, then stop (call on every service's way out)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    provider.force_flush(int(timeout_s * 1000))
    provider.shutdown()


def enabled() -> bool:
    return _provider is not None


def content_enabled() -> bool:
    """Prompts and completions may go into spans (LLM_MESH_TRACE_CONTENT=1)."""
    return os.environ.get(CONTENT_ENV, "").strip().lower() in ("1", "true", "yes")


def record_error(span: Span, code: grpc.StatusCode, message: str) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"))


def _untraced(method: str) -> bool:
    return method.startswith(UNTRACED_RPC_PREFIXES)


def _rpc_attributes(method: str) -> dict[str, Any]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


# ---------------------------------------------------------------- gRPC client


class _MetadataSetter(Setter[grpc.aio.Metadata]):
    def set(self, carrier: grpc.aio.Metadata, key: str, value: str) -> None:
        carrier[key] = value


_SETTER = _MetadataSetter()


class _ClientTracing:
    """A CLIENT span per call made inside a trace; traceparent into the call's metadata. The span
    ends when the call does (done callback), whether it finished, failed or was cancelled."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._peer = {"server.address": host or target}
        if port.isdigit():
            self._peer["server.port"] = int(port)

    async def _intercept(self, continuation: Callable[..., Awaitable[Any]],
                         details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if not trace.get_current_span().get_span_context().is_valid or _untraced(method):
            return await continuation(details, request)
        span = tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT,
                                 attributes=_rpc_attributes(method) | self._peer)
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span), setter=_SETTER)
        details = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                             details.wait_for_ready)
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        call.add_done_callback(lambda done: asyncio.ensure_future(_end_client_span(span, done)))
        return call


async def _end_client_span(span: Span, call: Any) -> None:
    try:
        code = await call.code()
        if code == grpc.StatusCode.OK:
            span.set_attribute("rpc.grpc.status_code", 0)
        else:
            record_error(span, code, await call.details() or "")
    finally:
        span.end()


class _UnaryUnaryClient(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[override]
        return await self._intercept(continuation, details, request)


class _UnaryStreamClient(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[override]
        return await self._intercept(continuation, details, request)


def client_interceptors(target: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for a grpc.aio channel to `target` (host:port); none while tracing is off."""
    return [_UnaryUnaryClient(target), _UnaryStreamClient(target)] if enabled() else []


# ---------------------------------------------------------------- gRPC server


class _ServerTracing(grpc.aio.ServerInterceptor):
    """A SERVER span per unary-unary and unary-stream call, child of the caller's traceparent,
    current while the servicer runs; status from the servicer context (abort_with_status too)."""

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or _untraced(method):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_traced_unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_traced_stream(method, handler.unary_stream))
        return handler  # streamed requests: Worker.GenerateStream traces each request (worker_stream.py)


def _start_server_span(method: str, context: grpc.aio.ServicerContext) -> tuple[Span, object] | None:
    parent = propagate.extract({m.key: m.value for m in context.invocation_metadata() or ()
                                if isinstance(m.value, str)})
    in_a_trace = trace.get_current_span(parent).get_span_context().is_valid
    if method.startswith(CHILD_ONLY_RPC_PREFIXES) and not in_a_trace:
        return None
    attributes = _rpc_attributes(method)
    peer = context.peer()  # ipv4:127.0.0.1:5555, ipv6:[::1]:5555
    if peer.startswith(("ipv4:", "ipv6:")):
        attributes["client.address"] = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]")
    span = tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _end_server_span(span: Span, token: object, context: grpc.aio.ServicerContext,
                     exc: BaseException | None) -> None:
    cancelled = isinstance(exc, (asyncio.CancelledError, GeneratorExit))
    code = context.code()
    if code is None:  # never set: the servicer returned (OK), was cancelled or raised
        code = (grpc.StatusCode.OK if exc is None else
                grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN)
    if exc is not None and not cancelled and not isinstance(exc, grpc.aio.AbortError):
        span.record_exception(exc)
    if code == grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", 0)
    else:
        record_error(span, code, context.details() or (type(exc).__name__ if exc is not None else ""))
    otel_context.detach(token)
    span.end()


def _traced_unary(method: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _start_server_span(method, context)
        if started is None:
            return await behavior(request, context)
        span, token = started
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            _end_server_span(span, token, context, exc)
            raise
        _end_server_span(span, token, context, None)
        return response
    return traced


def _traced_stream(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _start_server_span(method, context)
        if started is None:
            async for response in behavior(request, context):
                yield response
            return
        span, token = started
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            _end_server_span(span, token, context, exc)
            raise
        _end_server_span(span, token, context, None)
    return traced


# ---------------------------------------------------------------- calls multiplexed on a stream
# (services/worker_stream.py): each request on a Worker.GenerateStream is traced as the unary
# call it stands for, CLIENT span on the scheduler, SERVER span on the worker, the trace context
# in the request message instead of metadata.


def stream_client_span(method: str, target: str) -> Span | None:
    """A CLIENT span for one request on a stream, inside a trace only (as the interceptor)."""
    if _provider is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    host, _, port = target.rpartition(":")
    peer: dict[str, Any] = {"server.address": host or target}
    if port.isdigit():
        peer["server.port"] = int(port)
    return tracer.start_span(method.lstrip("/"), kind=SpanKind.CLIENT, attributes=_rpc_attributes(method) | peer)


def inject(span: Span | None) -> dict[str, str]:
    """The W3C trace context (traceparent, tracestate) that makes the callee a child of `span`."""
    carrier: dict[str, str] = {}
    if span is not None:
        propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def end_client_span(span: Span | None, code: grpc.StatusCode, message: str) -> None:
    if span is None:
        return
    if code == grpc.StatusCode.OK:
        span.set_attribute("rpc.grpc.status_code", 0)
    else:
        record_error(span, code, message)
    span.end()


@contextlib.contextmanager
def stream_server_span(method: str, carrier: Mapping[str, str]) -> Iterator[Span]:
    """A current SERVER span for one request on a stream, child of the caller's trace context
    (`carrier`); OK unless an error was recorded on it. Off: a span that records nothing."""
    if _provider is None:
        yield trace.INVALID_SPAN
        return
    parent = propagate.extract(dict(carrier))
    span = tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER,
                             attributes=_rpc_attributes(method))
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield span
    except BaseException as exc:
        fail(span, exc)
        raise
    finally:
        if span.is_recording() and not span.attributes.get("rpc.grpc.status_code"):  # type: ignore[attr-defined]
            span.set_attribute("rpc.grpc.status_code", 0)
        otel_context.detach(token)
        span.end()


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for a grpc.aio server; none while tracing is off."""
    return [_ServerTracing()] if enabled() else []


# ---------------------------------------------------------------- HTTP (the gateway)


class HttpTracingMiddleware:
    """ASGI middleware: a SERVER span per request (HTTP semantic conventions), child of an incoming
    `traceparent`, current while the app runs — so the gateway's gRPC call continues the trace.
    Covers a streamed body to its end. 5xx is an ERROR; 4xx is the client's (HTTP semconv)."""

    def __init__(self, app: Any, routes: Sequence[str] = ()) -> None:
        self.app = app
        self.routes = frozenset(routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_HTTP_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method, path = scope["method"], scope["path"]
        route = path if path in self.routes else None  # unknown paths must not multiply span names
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": path,
                                      "url.scheme": scope.get("scheme", "http"),
                                      "network.protocol.version": scope.get("http_version", "1.1")}
        if route:
            attributes["http.route"] = route
        if scope.get("server"):
            attributes["server.address"], attributes["server.port"] = scope["server"][0], scope["server"][1]
        if scope.get("client"):
            attributes["client.address"] = scope["client"][0]
        if "user-agent" in headers:
            attributes["user_agent.original"] = headers["user-agent"]
        name = f"{method} {route}" if route else method
        with tracer.start_as_current_span(name, context=propagate.extract(headers), kind=SpanKind.SERVER,
                                          attributes=attributes) as span:
            responded = False

            async def traced_send(message: dict[str, Any]) -> None:
                nonlocal responded
                if message["type"] == "http.response.start":
                    responded, status = True, message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(Status(StatusCode.ERROR, str(status)))
                await send(message)

            try:
                await self.app(scope, receive, traced_send)
            except Exception:  # recorded by the span; Starlette's outer error middleware answers 500
                if not responded:
                    span.set_attribute("http.response.status_code", 500)
                raise


# ---------------------------------------------------------------- attributes of the mesh's spans


def scores_json(rows: Sequence[Any], limit: int = MAX_SCORED_WORKERS) -> str:
    """The best `limit` eligible workers' scores as compact JSON: {"worker-a": 1.25, ...}
    (`rows` as Decision.worker_scores() gives them: eligible ones first, best first)."""
    best = [r for r in rows if not r.filtered_reason][:limit]
    return json.dumps({r.worker_id: round(r.score, 4) for r in best}, separators=(",", ":"))


def route_attributes(pd: Any) -> dict[str, Any]:
    """Attributes of a `route` span from a scheduler.disagg.DisaggDecision."""
    decision = pd.decode
    attributes: dict[str, Any] = {
        "llm_mesh.route.policy": decision.policy,
        "llm_mesh.route.worker": decision.worker_id or "",
        "llm_mesh.route.eligible": len(decision.eligible),
        "llm_mesh.route.filtered": len(decision.filtered),
        "llm_mesh.route.scores": scores_json(decision.worker_scores()),
        "llm_mesh.route.predicted_cached_tokens": decision.cached_tokens,
        "llm_mesh.route.predicted_prefill_tokens": decision.prefill_tokens,
        "llm_mesh.pd.remote": pd.remote,
        "llm_mesh.pd.rule": pd.rule,
        "llm_mesh.pd.reason": pd.reason,
        "llm_mesh.pd.uncached_tokens": pd.uncached_tokens,
    }
    if decision.reason:
        attributes["llm_mesh.route.reason"] = decision.reason
    if pd.prefill is not None:
        attributes["llm_mesh.pd.prefill_worker"] = pd.prefill.worker_id or ""
        attributes["llm_mesh.pd.prefill_scores"] = scores_json(pd.prefill.worker_scores())
    return attributes


# ---------------------------------------------------------------- span helpers for the services


_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable; yields a span that records nothing


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[Span]:
    """A current INTERNAL span; an exception is recorded, and its gRPC code when it has one.
    Off, not even the no-op tracer is asked (it would still attach a context: ~10x the cost)."""
    return _NO_SPAN if _provider is None else _recorded_span(name, attributes)


@contextlib.contextmanager
def _recorded_span(name: str, attributes: Mapping[str, Any] | None) -> Iterator[Span]:
    with tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                      set_status_on_exception=False) as current:
        try:
            yield current
        except BaseException as exc:
            fail(current, exc)
            raise


def fail(span: Span, exc: BaseException) -> None:
    """Mark `span` failed by `exc`: ERROR with the gRPC code (RpcError, AioRpcError, cancellation)."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        record_error(span, grpc.StatusCode.CANCELLED, "cancelled")
        return
    span.record_exception(exc)
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code  # AioRpcError.code() / RpcError.code
    if isinstance(code, grpc.StatusCode):
        details = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        record_error(span, code, details or "")
    else:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def current(span: Span) -> Any:
    """Make `span` current for a block without ending it (a gRPC call created inside is its child)."""
    return _NO_SPAN if _provider is None else trace.use_span(span, end_on_exit=False)


def finish_reason_name(reason: int) -> str:
    from llm_mesh.v1 import sampling_pb2

    return sampling_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class RequestTrace:
    """GenAI attributes of one public request on the current span (the scheduler's Inference
    server span): the request as asked, as resolved, and its usage. Content only with
    LLM_MESH_TRACE_CONTENT=1."""

    def __init__(self, request: Any) -> None:
        self.span = trace.get_current_span()
        self.recording = self.span.is_recording()
        self.text: list[str] | None = [] if self.recording and content_enabled() else None
        if not self.recording:
            return
        which = request.WhichOneof("input")
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat" if which == "messages" else "text_completion",
            "gen_ai.provider.name": "llm-mesh"}
        if request.model:
            attributes["gen_ai.request.model"] = request.model
        for name in ("temperature", "top_p", "seed"):
            if request.sampling.HasField(name):
                attributes[f"gen_ai.request.{name}"] = getattr(request.sampling, name)
        if request.sampling.stop:
            attributes["gen_ai.request.stop_sequences"] = list(request.sampling.stop)
        if self.text is not None:
            if which == "messages":
                messages = [{"role": m.role, "parts": [{"type": "text", "content": m.content}]}
                            for m in request.messages.messages]
            else:
                messages = [{"role": "user", "parts": [{"type": "text", "content": request.prompt}]}]
            attributes["gen_ai.input.messages"] = json.dumps(messages, ensure_ascii=False)
        self.span.set_attributes(attributes)

    def prepared(self, prepared: Any) -> None:
        """What validation resolved: model, max_tokens, prompt length."""
        if self.recording:
            self.span.set_attributes({
                "gen_ai.request.model": prepared.model,
                "gen_ai.request.max_tokens": prepared.sampling.max_tokens,
                "gen_ai.usage.input_tokens": len(prepared.prompt_token_ids),
                "llm_mesh.request_id": prepared.request_id,
            })

    def response(self, response: Any) -> None:
        """A llm_mesh.v1.GenerateResponse; the one with usage ends the request."""
        if not self.recording:
            return
        if self.text is not None:
            self.text.append(response.text)
        if response.worker_id:  # on the first response
            self.span.set_attribute("llm_mesh.worker.id", response.worker_id)
        if response.HasField("usage"):
            describe_usage(self.span, response.usage, response.finish_reason,
                           "".join(self.text) if self.text is not None else None)


def describe_usage(span: Span, usage: Any, finish_reason: int, text: str | None = None) -> None:
    """GenAI usage of a finished request (llm_mesh.v1.Usage) on `span`; `text` only with content on."""
    if not span.is_recording():
        return
    span.set_attributes({
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cached_prompt_tokens,
        "gen_ai.response.finish_reasons": [finish_reason_name(finish_reason)],
    })
    if text is not None and content_enabled():
        span.set_attribute("gen_ai.output.messages", json.dumps(
            [{"role": "assistant", "parts": [{"type": "text", "content": text}],
              "finish_reason": finish_reason_name(finish_reason)}], ensure_ascii=False))


def describe_prefill(span: Span, kv: Any) -> None:
    """A `prefill` span's outcome: where the KV waits (llm_mesh.v1.KVTransferParams), or fallback."""
    if kv is not None:
        span.set_attributes({"llm_mesh.pd.outcome": "remote", "llm_mesh.kv.blocks": len(kv.block_ids),
                             "llm_mesh.kv.tokens": kv.num_tokens,
                             "llm_mesh.kv.source_engine_id": kv.engine_id})
    else:
        span.set_attribute("llm_mesh.pd.outcome", "fallback")


def span_attribute(key: str, value: Any) -> None:
    """Set an attribute on the current span (a no-op outside a recorded trace)."""
    trace.get_current_span().set_attribute(key, value)


class GenerateTrace:
    """The worker's `generate` span (one engine request) and, on a decode leg that pulls remote KV,
    its `kv_transfer` child: from the leg's start to the first output, as no engine reports the
    pull's own end (sim models it; vLLM pulls before its first step)."""

    def __init__(self, request: Any, model: str, role: str) -> None:
        leg = ("prefill" if request.remote_decode else
               "decode" if request.remote_prefill is not None else "aggregated")
        self.span = tracer.start_span("generate", attributes={
            "gen_ai.request.model": model, "gen_ai.request.max_tokens": request.sampling.max_tokens,
            "gen_ai.usage.input_tokens": len(request.prompt_token_ids), "llm_mesh.pd.leg": leg,
            "llm_mesh.worker.role": role, "llm_mesh.request_id": request.request_id,
        })
        self.kv_span: Span | None = None
        kv = request.remote_prefill
        if kv is not None and self.span.is_recording():
            attributes = {"llm_mesh.kv.source_engine_id": kv.engine_id,
                          "llm_mesh.kv.blocks": len(kv.block_ids), "llm_mesh.kv.tokens": kv.num_tokens}
            if kv.host:
                attributes["llm_mesh.kv.source"] = f"{kv.host}:{kv.port}"
            self.kv_span = tracer.start_span("kv_transfer", context=trace.set_span_in_context(self.span),
                                             attributes=attributes)

    def output(self, out: Any) -> None:
        """An EngineOutput of the request."""
        if self.kv_span is not None:
            self.kv_span.set_attribute("llm_mesh.kv.cached_tokens", out.cached_prompt_tokens)
            if out.transferred_prompt_tokens:
                self.kv_span.set_attribute("llm_mesh.kv.transferred_tokens", out.transferred_prompt_tokens)
            self.kv_span.end()
            self.kv_span = None
        if out.finish_reason is not None and self.span.is_recording():
            self.span.set_attributes({
                "gen_ai.usage.input_tokens": out.prompt_tokens,
                "gen_ai.usage.output_tokens": out.completion_tokens,
                "gen_ai.usage.cache_read.input_tokens": out.cached_prompt_tokens,
                "gen_ai.response.finish_reasons": [out.finish_reason],
            })
            if out.transferred_prompt_tokens:
                self.span.set_attribute("llm_mesh.kv.transferred_tokens", out.transferred_prompt_tokens)
            if out.kv_transfer is not None:  # a prefill leg: the blocks now wait for the decode worker
                self.span.set_attributes({"llm_mesh.kv.blocks": len(out.kv_transfer.block_ids),
                                          "llm_mesh.kv.tokens": out.kv_transfer.num_tokens})

    def fail(self, exc: BaseException) -> None:
        for s in (self.kv_span, self.span):
            if s is not None:
                fail(s, exc)

    def close(self) -> None:
        for s in (self.kv_span, self.span):
            if s is not None:
                s.end()
        self.kv_span = None
