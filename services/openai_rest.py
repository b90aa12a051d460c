"""OpenAI's REST shapes for the gateway: errors, request bodies → protos, protos → JSON.

Pure translation, no I/O beyond reading the request body: services/gateway.py
serves it. See the gateway's docstring for what is checked here and what is
left to the scheduler.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2, status_pb2
from starlette.requests import Request
from starlette.responses import JSONResponse

from llm_mesh.v1 import inference_pb2

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
    from_scheduler = False
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        from_scheduler = True
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
    message = exc.details() or exc.code().name
    if status == 503 and not from_scheduler:
        # The channel's own error names internal addresses: not for untrusted clients.
        message, retry = "the scheduler is unavailable; retry shortly", 1.0
    return ApiError(status, message, param=param, code=code,
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
        req.stop.append(_string(stop, "stop"))
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
class Envelope:
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


def chat_completion_json(msg: inference_pb2.ChatCompletion, env: Envelope) -> dict[str, Any]:
    out = env.fill(msg, "chat.completion")
    out["choices"] = [{"index": c.index, "message": {"role": c.message.role or "assistant",
                                                     "content": c.message.content},
                       "logprobs": None, "finish_reason": c.finish_reason or None} for c in msg.choices]
    out["usage"] = usage_json(msg.usage)
    return out


def chat_chunk_json(msg: inference_pb2.ChatCompletionChunk, env: Envelope) -> dict[str, Any]:
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


def completion_json(msg: inference_pb2.Completion, env: Envelope) -> dict[str, Any]:
    out = env.fill(msg, "text_completion")
    out["choices"] = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason or None}
                      for c in msg.choices]
    return out


def models_json(msg: inference_pb2.ListModelsResponse) -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by or "llm-mesh",
         "max_model_len": m.max_model_len} for m in msg.data]}
