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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc
from services.grpc_util import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
HEALTH_TIMEOUT_S = 2.0
_UINT32_MAX = 2**32 - 1
_INT64_RANGE = (-(2**63), 2**63 - 1)

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 499: "request_cancelled", 500: "server_error", 502: "server_error",
    503: "service_unavailable", 504: "timeout_error",
}


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error returned to the client as OpenAI's `{"error": {...}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None, code: str = "invalid_type") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    """Map a scheduler status (and its google.rpc details) to an HTTP error."""
    status = _GRPC_TO_HTTP.get(exc.code(), 500)
    param, code, retry = None, exc.code().name.lower(), None
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        try:
            details = status_pb2.Status.FromString(value).details
        except pb_message.DecodeError:
            break
        for any_detail in details:
            bad, hint = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
            if any_detail.Unpack(bad) and bad.field_violations:
                param = bad.field_violations[0].field or None
                code = bad.field_violations[0].reason or code
            elif any_detail.Unpack(hint):
                retry = hint.retry_delay.ToTimedelta().total_seconds()
    return ApiError(status, exc.details() or exc.code().name, param=param, code=code,
                    retry_after_s=retry if status in (429, 503) else None)


# ---------------------------------------------------------------- request body → proto


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, enforcing `limit` bytes while reading."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"request body is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(value, dict):
        raise invalid(f"request body must be a JSON object, got {_json_type(value)}", None, "invalid_json")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _string(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise invalid(f"{param} must be a string, got {_json_type(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param} contains an unpaired surrogate (not valid Unicode)", param) from None
    return value


def _integer(value: object, param: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{param} must be an integer, got {_json_type(value)}", param)
    if not lo <= value <= hi:
        raise invalid(f"{param} must be between {lo} and {hi}, got {value}", param, "out_of_range")
    return value


def _number(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{param} must be a number, got {_json_type(value)}", param)
    return float(value)


def _boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{param} must be a boolean, got {_json_type(value)}", param)
    return value


def _content(value: object, param: str) -> str:
    """A message's content: a string, or a list of text parts joined by newlines."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _string(value, param)
    if not isinstance(value, list):
        raise invalid(f"{param} must be a string or an array of text parts, got {_json_type(value)}", param)
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"{where} must be an object, got {_json_type(part)}", where)
        kind = part.get("type")
        if kind != "text":
            raise invalid(f"{where}.type must be \"text\" (only text content is supported), got {kind!r}",
                          f"{where}.type", "unsupported_content_type")
        texts.append(_string(part.get("text"), f"{where}.text"))
    return "\n".join(texts)


@dataclass(frozen=True)
class StreamOptions:
    stream: bool
    include_usage: bool


def _stream_options(body: dict[str, Any]) -> StreamOptions:
    stream = body.get("stream")
    stream = False if stream is None else _boolean(stream, "stream")
    options = body.get("stream_options")
    if options is None:
        return StreamOptions(stream, False)
    if not isinstance(options, dict):
        raise invalid(f"stream_options must be an object, got {_json_type(options)}", "stream_options")
    if not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
    include = options.get("include_usage")
    return StreamOptions(True, False if include is None else _boolean(include, "stream_options.include_usage"))


def _fill_common(body: dict[str, Any], req: inference_pb2.ChatCompletionRequest | inference_pb2.CompletionRequest,
                 ) -> None:
    """Fields shared by both OpenAI requests; null means not given."""
    if body.get("model") is not None:
        req.model = _string(body["model"], "model")
    limits = {}
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            limits[name] = _integer(body[name], name, 0, _UINT32_MAX)
    if len(set(limits.values())) > 1:
        raise invalid("max_tokens and max_completion_tokens differ; give one", "max_completion_tokens",
                      "invalid_value")
    if limits:
        req.max_tokens = next(iter(limits.values()))
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            setattr(req, name, _number(body[name], name))
    if body.get("seed") is not None:
        req.seed = _integer(body["seed"], "seed", *_INT64_RANGE)
    if body.get("n") is not None:
        req.n = _integer(body["n"], "n", 0, _UINT32_MAX)
    if body.get("user") is not None:
        req.user = _string(body["user"], "user")
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop.append(stop)
    elif isinstance(stop, list):
        req.stop.extend(_string(s, f"stop[{i}]") for i, s in enumerate(stop))
    elif stop is not None:
        raise invalid(f"stop must be a string or an array of strings, got {_json_type(stop)}", "stop")


def chat_request(body: dict[str, Any]) -> tuple[inference_pb2.ChatCompletionRequest, StreamOptions]:
    options = _stream_options(body)
    req = inference_pb2.ChatCompletionRequest(stream=options.stream)
    _fill_common(body, req)
    messages = body.get("messages")
    if messages is not None and not isinstance(messages, list):
        raise invalid(f"messages must be an array, got {_json_type(messages)}", "messages")
    for i, m in enumerate(messages or ()):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object, got {_json_type(m)}", where)
        msg = req.messages.add(role=_string(m.get("role"), f"{where}.role"),
                               content=_content(m.get("content"), f"{where}.content"))
        if m.get("name") is not None:
            msg.name = _string(m["name"], f"{where}.name")
    return req, options


def completion_request(body: dict[str, Any]) -> tuple[inference_pb2.CompletionRequest, StreamOptions]:
    options = _stream_options(body)
    req = inference_pb2.CompletionRequest(stream=options.stream)
    _fill_common(body, req)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is not None:
        if not isinstance(prompt, str):
            raise invalid(f"prompt must be a string (batches and token ids are not supported), "
                          f"got {_json_type(prompt)}", "prompt")
        req.prompt = _string(prompt, "prompt")
    return req, options


# ---------------------------------------------------------------- proto → OpenAI JSON


def usage_json(usage: Any) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens}}


@dataclass
class _Envelope:
    """id/created/model of one response, kept identical across its chunks."""

    prefix: str
    model: str
    id: str = ""
    created: int = 0

    def fill(self, msg: Any, obj: str) -> dict[str, Any]:
        self.id = self.id or msg.id or f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = self.created or msg.created or int(time.time())
        self.model = msg.model or self.model
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def chat_completion_json(msg: inference_pb2.ChatCompletion, env: _Envelope) -> dict[str, Any]:
    out = env.fill(msg, "chat.completion")
    out["choices"] = [{"index": c.index, "message": {"role": c.message.role or "assistant",
                                                     "content": c.message.content},
                       "logprobs": None, "finish_reason": c.finish_reason or None} for c in msg.choices]
    out["usage"] = usage_json(msg.usage)
    return out


def chat_chunk_json(msg: inference_pb2.ChatCompletionChunk, env: _Envelope) -> dict[str, Any]:
    out = env.fill(msg, "chat.completion.chunk")
    choices = []
    for c in msg.choices:
        delta: dict[str, str] = {}
        if c.delta.role:
            delta = {"role": c.delta.role, "content": c.delta.content}
        elif c.delta.content:
            delta = {"content": c.delta.content}
        choices.append({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": c.finish_reason or None})
    out["choices"] = choices
    return out


def completion_json(msg: inference_pb2.Completion, env: _Envelope) -> dict[str, Any]:
    out = env.fill(msg, "text_completion")
    out["choices"] = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason or None}
                      for c in msg.choices]
    return out


def models_json(msg: inference_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by or "llm-mesh",
         "max_model_len": m.max_model_len} for m in msg.data]}


# ---------------------------------------------------------------- the app


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _Scheduler:
    """The gRPC channel, opened lazily inside the serving event loop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._stub: inference_pb2_grpc.InferenceStub | None = None

    @property
    def stub(self) -> inference_pb2_grpc.InferenceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        return self._stub

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
              request_timeout: float | None = None) -> Starlette:
    """The gateway as an ASGI app talking to the scheduler at `scheduler_target` (host:port)."""
    scheduler = _Scheduler(scheduler_target)

    async def _stream(request: Request, call: Any, to_json: Callable[[Any, _Envelope], dict[str, Any]],
                      env: _Envelope, include_usage: bool) -> Response:
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
        env = _Envelope("chatcmpl", req.model)
        if options.stream:
            call = scheduler.stub.StreamChatCompletion(req, timeout=request_timeout)
            return await _stream(request, call, chat_chunk_json, env, options.include_usage)
        call = scheduler.stub.CreateChatCompletion(req, timeout=request_timeout)
        msg = await _unless_disconnected(request, call, call)
        return JSONResponse(chat_completion_json(msg, env))

    async def completions(request: Request) -> Response:
        req, options = completion_request(await read_json_object(request, max_body_bytes))
        env = _Envelope("cmpl", req.model)
        if options.stream:
            call = scheduler.stub.StreamCompletion(req, timeout=request_timeout)
            return await _stream(request, call, completion_json, env, options.include_usage)
        call = scheduler.stub.CreateCompletion(req, timeout=request_timeout)
        msg = await _unless_disconnected(request, call, call)
        out = completion_json(msg, env)
        out["usage"] = usage_json(msg.usage)
        return JSONResponse(out)

    async def models(request: Request) -> Response:
        call = scheduler.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=request_timeout)
        return JSONResponse(models_json(await _unless_disconnected(request, call, call)))

    async def health(request: Request) -> Response:
        try:
            await scheduler.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            return JSONResponse({"status": "unavailable", "reason": f"scheduler: {exc.code().name}"},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
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
    ]
    return Starlette(routes=routes, lifespan=lifespan,
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

    app = build_app(args.scheduler, args.max_body_bytes, args.request_timeout)
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
            await stack.enter_async_context(membership.Registration(membership.parse_endpoints(args.etcd), member))
        await serving


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-mesh")
    except PackageNotFoundError:
        return "0+unknown"


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
