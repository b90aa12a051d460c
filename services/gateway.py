"""`llm-mesh gateway`: OpenAI-compatible REST over the scheduler's gRPC `Inference` service.

The gateway is a thin shell for untrusted HTTP clients. It does only what JSON
can get wrong and protobuf cannot express; everything semantic is decided once,
by the scheduler, so gRPC and REST clients get the same answers.

What the gateway checks (each failure is a 4xx in OpenAI's error shape, never a 5xx):
- body size while reading (not only Content-Length) → 413;
- UTF-8 → 400; JSON syntax (NaN/Infinity are not JSON) → 400; top level an object → 400;
- the type of every field it forwards → 400 naming the field (`param`), plus the
  ranges of the wire types (max_tokens and n fit uint32, seed fits int64).
OpenAI variants accepted: `stop` as a string or a list of strings; message
`content` as a string or a list of `{"type": "text", "text": ...}` parts (joined
with "\\n", as vLLM does; any other part type → 400); `max_completion_tokens` as
an alias of `max_tokens` (both given and different → 400); `prompt` as a string
or a one-element list of strings; null for any optional field means "not given".

Unknown fields are ignored, as the scheduler's gRPC side ignores unknown proto
fields: a client written for a newer OpenAI API keeps working, and a sampling
option llm-mesh does not implement (e.g. `logprobs`, `presence_penalty`) has no
effect rather than failing the request.

Left to the scheduler (its gRPC status becomes the HTTP status): empty messages,
roles, max_tokens <= 0 or beyond the context window, prompt length, sampling
ranges, n != 1, more than 4 stops, unknown model. Mapping: INVALID_ARGUMENT 400,
UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
CANCELLED 499, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500; a
google.rpc.RetryInfo on a 429 or 503 becomes Retry-After (whole seconds, rounded
up). A google.rpc.BadRequest field violation becomes the error's `param`.

Streaming: the first chunk is awaited before the 200 is sent, so an error the
scheduler raises up front is a real HTTP status; an error after that is an SSE
`data: {"error": ...}` event followed by `data: [DONE]`. A client that
disconnects cancels the gRPC call, so the scheduler aborts the engine request.

Auth (`--api-key-file`, services/auth.py): /v1/* then needs `Authorization: Bearer <key>`, else
401 with `WWW-Authenticate: Bearer`; the header is forwarded to the scheduler as gRPC metadata.
Health and metrics stay open.

Health: `/health/live` is 200 while the process serves HTTP; `/health/ready` is 200 only
while the scheduler's gRPC health says SERVING for llm_mesh.v1.Inference (it is not without
a routable worker), else 503; `/health` (kept as it was) is 200 when the scheduler answers
ListModels. Metrics (`--metrics-port`): services/gateway_metrics.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc
from services import auth, security, tls, tracing
from services.gateway_metrics import GatewayMetrics
from services.grpc_util import CHANNEL_OPTIONS, run_service
from services.openai_rest import (
    ApiError, Envelope, chat_chunk_json, chat_completion_json, chat_request, completion_json, completion_request,
    from_rpc_error, models_json, read_json_object, usage_json,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
HEALTH_TIMEOUT_S = 2.0
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


# ---------------------------------------------------------------- the app


def _forwarded(request: Request) -> tuple[tuple[str, str], ...]:
    """The headers the scheduler acts on, as gRPC metadata: Authorization (the client's API key:
    a scheduler with --api-key-file checks it too) and X-Tenant-Id (admission fairness; the
    scheduler validates it)."""
    credentials = auth.grpc_metadata(request.headers.get("authorization"))
    tenant = request.headers.get("x-tenant-id")
    if tenant is None:
        return credentials
    if not (tenant.isascii() and tenant.isprintable()) or len(tenant) > 128:
        raise ApiError(400, "X-Tenant-Id must be at most 128 printable ASCII characters", param="X-Tenant-Id")
    return (*credentials, ("x-tenant-id", tenant))


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Scheduler:
    """The gRPC channel, opened lazily inside the serving event loop."""

    def __init__(self, target: str, tls_files: tls.TlsFiles | None = None) -> None:
        self.target = target
        self.tls = tls_files
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceStub | None = None

    @property
    def stub(self) -> inference_pb2_grpc.InferenceStub:
        if self._stub is None:
            self._channel = tls.open_channel(self.target, self.tls, options=CHANNEL_OPTIONS,
                                             interceptors=tracing.client_interceptors(self.target))
            self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        return self._stub

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        self.stub  # opens the channel
        return health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


class _SseResponse(StreamingResponse):
    """An SSE stream that cancels its gRPC call however it ends, even if the
    client leaves before the body generator ever starts."""

    def __init__(self, body: AsyncIterator[bytes], call: Any) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._call = call

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._call.cancel()


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, call: Any, step: Awaitable[Any]) -> Any:
    """Await `step` of a gRPC call, cancelling the call if the client goes away first."""
    result = asyncio.ensure_future(step)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            call.cancel()
            result.cancel()
    if result.cancelled():
        raise ApiError(499, "client closed the request", code="cancelled")
    return result.result()


def build_app(scheduler_target: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              request_timeout: float | None = None, *, api_keys: auth.ApiKeys | None = None,
              tls_files: tls.TlsFiles | None = None) -> Starlette:
    """The gateway as an ASGI app talking to the scheduler at `scheduler_target` (host:port).
    With `api_keys`, /v1/* needs `Authorization: Bearer <key>` (401 otherwise)."""
    scheduler = _Scheduler(scheduler_target, tls_files)

    async def _stream(request: Request, call: Any, to_json: Callable[[Any, Envelope], dict[str, Any]],
                      env: Envelope, include_usage: bool) -> Response:
        try:
            first = await _unless_disconnected(request, call, call.read())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

        def events(msg: Any) -> list[bytes]:
            out = to_json(msg, env)
            if include_usage:
                out["usage"] = None
            events = [_sse(out)]
            if include_usage and msg.HasField("usage"):
                events.append(_sse(env.fill(msg, out["object"]) | {"choices": [], "usage": usage_json(msg.usage)}))
            return events

        async def body() -> AsyncIterator[bytes]:
            try:
                msg = first
                while msg is not grpc.aio.EOF:
                    for event in events(msg):
                        yield event
                    msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                yield _sse(from_rpc_error(exc).body())
            finally:  # normal end, error, or the client went away (task cancelled / generator closed)
                call.cancel()
            yield _sse("[DONE]")

        if first is grpc.aio.EOF:
            raise ApiError(502, "the scheduler ended the stream without a response", code="empty_stream")
        return _SseResponse(body(), call)

    async def chat_completions(request: Request) -> Response:
        req, options = chat_request(await read_json_object(request, max_body_bytes))
        env = Envelope("chatcmpl", req.model)
        if options.stream:
            call = scheduler.stub.StreamChatCompletion(req, timeout=request_timeout, metadata=_forwarded(request))
            return await _stream(request, call, chat_chunk_json, env, options.include_usage)
        call = scheduler.stub.CreateChatCompletion(req, timeout=request_timeout, metadata=_forwarded(request))
        msg = await _unless_disconnected(request, call, call)
        return JSONResponse(chat_completion_json(msg, env))

    async def completions(request: Request) -> Response:
        req, options = completion_request(await read_json_object(request, max_body_bytes))
        env = Envelope("cmpl", req.model)
        if options.stream:
            call = scheduler.stub.StreamCompletion(req, timeout=request_timeout, metadata=_forwarded(request))
            return await _stream(request, call, completion_json, env, options.include_usage)
        call = scheduler.stub.CreateCompletion(req, timeout=request_timeout, metadata=_forwarded(request))
        msg = await _unless_disconnected(request, call, call)
        out = completion_json(msg, env)
        out["usage"] = usage_json(msg.usage)
        return JSONResponse(out)

    async def models(request: Request) -> Response:
        call = scheduler.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=request_timeout,
                                         metadata=_forwarded(request))
        return JSONResponse(models_json(await _unless_disconnected(request, call, call)))

    async def health(request: Request) -> Response:
        try:
            await scheduler.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            # A scheduler that wants an API key (the gateway holds none: it forwards the client's) answered.
            if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
                return JSONResponse({"status": "unavailable", "reason": f"scheduler: {exc.code().name}"},
                                    status_code=503)
        return JSONResponse({"status": "ok"})

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        """Ready while the scheduler's gRPC health says SERVING for the Inference service
        (it is only with a routable worker: services/readiness.py)."""
        try:
            reply = await scheduler.health.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE),
                                                 timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"status": "unavailable", "reason": f"scheduler: {exc.code().name}"},
                                status_code=503)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            return JSONResponse({"status": "unavailable", "reason": f"scheduler: {status}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if api_keys is not None and not api_keys.accepts_header(request.headers.get("authorization")):
                error = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            try:
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except grpc.aio.AioRpcError as exc:
                return from_rpc_error(exc).response()
        return endpoint

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        error = ApiError(exc.status_code, message, code="not_found" if exc.status_code == 404 else
                         "method_not_allowed" if exc.status_code == 405 else None)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("gateway error on %s %s", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal gateway error", code="internal").response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await scheduler.close()

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
    ]
    middleware = ([Middleware(tracing.HttpTracingMiddleware, routes=[r.path for r in routes])]
                  if tracing.enabled() else [])
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--scheduler", default="127.0.0.1:50051",
                        help="host:port of the scheduler's gRPC Inference service (default 127.0.0.1:50051)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest accepted request body (default {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds before a request's gRPC call is cut off (default: none)")
    parser.add_argument("--etcd", default=None,
                        help="comma-separated etcd endpoints; when given the gateway registers itself")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    security.add_arguments(parser, api_keys=True)


class _QuietServer:
    """uvicorn, with signals handled here so shutdown continues past serve()
    (uvicorn would re-raise the signal and skip the lease revocation)."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        self.server = Server(config)

    def stop(self) -> None:
        self.server.force_exit = self.server.should_exit  # a second signal skips the graceful wait
        self.server.should_exit = True


async def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    app = build_app(args.scheduler, args.max_body_bytes, args.request_timeout, api_keys=auth.from_args(args),
                    tls_files=tls.from_args(args))
    metrics = None
    if args.metrics_port is not None:
        metrics = GatewayMetrics([route.path for route in app.routes])
        app = metrics.wrap(app)
        metrics.serve(args.metrics_port, args.host)
    quiet = _QuietServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                        timeout_graceful_shutdown=10))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, quiet.stop)
    serving = asyncio.create_task(quiet.server.serve())
    while not quiet.server.started and not serving.done():
        await asyncio.sleep(0.05)
    async with contextlib.AsyncExitStack() as stack:
        if args.etcd and quiet.server.started:  # advertise only once the port is listening
            from llm_mesh.v1 import membership_pb2
            from services import membership

            member = membership_pb2.Member(
                id=f"gateway-{args.port}-{secrets.token_hex(3)}", kind=membership_pb2.MEMBER_KIND_GATEWAY,
                address=f"{args.host}:{args.port}", started_at=int(time.time()), version=_version())
            registration = membership.Registration(membership.parse_endpoints(args.etcd), member,
                                                   etcd=membership.etcd_settings(args))
            await stack.enter_async_context(registration)
            if metrics is not None:
                metrics.watch_lease(registration)
        await serving


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-mesh")
    except PackageNotFoundError:
        return "0+unknown"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    security.configure(args)
    tracing.setup_tracing("llm-mesh-gateway")
    try:
        run_service(_serve(args))
    finally:
        tracing.shutdown_tracing()  # after SIGTERM too: _serve returns once uvicorn has stopped
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
