"""Validate a public request and turn it into token ids plus resolved sampling.

This is the one place the mesh checks what a client sent (gRPC directly, or
REST through the gateway, which only checks JSON syntax and types). Every
failure is an RpcError naming the field and, for lengths, the token counts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import secrets

import grpc

from llm_mesh.v1 import inference_pb2, sampling_pb2
from services.grpc_util import RpcError, invalid
from services.tokenizer import CHAT_ROLES, ModelTokenizer, TemplateError

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 1024
MAX_ID_CHARS = 256  # model, request_id, session_id (OpenAI `user`): ids, not payloads
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Ids:
    """Request ids without a getrandom syscall per request (uuid4 and secrets make one each): 64
    random bits per process, drawn again in a forked child, then a counter. Unique in a process
    by the counter, across processes as uuid4 would be."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix, self._count = secrets.token_hex(8), itertools.count(1)

    def request_id(self) -> str:
        """32 hex characters, like uuid4().hex."""
        return f"{self._prefix}{next(self._count):016x}"

    def attempt_id(self, request_id: str) -> str:
        """A worker call's id for one try at `request_id`: distinct for every try, and from the
        same client id sent through another scheduler replica to the same engine."""
        return f"{request_id}-{self._prefix[:8]}{next(self._count):x}"


IDS = _Ids()


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: sampling_pb2.SamplingParams  # max_tokens always set
    session_id: str


def show(value: str, limit: int = 64) -> str:
    """`value` quoted for an error message, cut to `limit` characters (errors never echo big inputs)."""
    return repr(value if len(value) <= limit else value[:limit] + "…")


def check_ids(request: inference_pb2.GenerateRequest) -> None:
    for name in ("model", "request_id", "session_id"):
        if len(getattr(request, name)) > MAX_ID_CHARS:
            raise invalid(f"{name} must be at most {MAX_ID_CHARS} characters", name)


def resolve_model(requested: str, served: dict[str, int], tokenizers: dict[str, ModelTokenizer]) -> str:
    """The model to use: NOT_FOUND if unknown, UNAVAILABLE if no live worker serves it."""
    if not requested:
        if len(tokenizers) == 1:
            return next(iter(tokenizers))
        raise invalid("model is required", "model")
    if requested not in tokenizers:
        known = ", ".join(sorted(tokenizers)) or "none"
        raise RpcError(grpc.StatusCode.NOT_FOUND, f"model {show(requested)} does not exist (served: {known})",
                       field="model")
    if requested not in served:
        raise RpcError(grpc.StatusCode.UNAVAILABLE, f"no live worker serves model {show(requested)}", retry_after_s=1.0)
    return requested


def check_sampling(params: sampling_pb2.SamplingParams, prefix: str = "") -> None:
    if params.HasField("temperature") and not (math.isfinite(params.temperature) and 0 <= params.temperature <= 2):
        raise invalid(f"temperature must be in [0, 2], got {params.temperature}", prefix + "temperature")
    if params.HasField("top_p") and not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise invalid(f"top_p must be in (0, 1], got {params.top_p}", prefix + "top_p")
    if params.HasField("max_tokens") and params.max_tokens < 1:
        raise invalid("max_tokens must be at least 1", prefix + "max_tokens")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(params.stop)}", prefix + "stop")
    for s in params.stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise invalid(f"each stop sequence must have 1..{MAX_STOP_CHARS} characters", prefix + "stop")


def resolve_max_tokens(params: sampling_pb2.SamplingParams, prompt_tokens: int, context_window: int,
                       default: int | None) -> None:
    """Check the prompt fits and set max_tokens (default: the rest of the window)."""
    if prompt_tokens >= context_window:
        raise invalid(
            f"the prompt is {prompt_tokens} tokens, but the model's context window is {context_window} tokens "
            f"(room for at least one generated token is needed)", "prompt")
    room = context_window - prompt_tokens
    if params.HasField("max_tokens"):
        if params.max_tokens > room:
            raise invalid(
                f"max_tokens ({params.max_tokens}) + prompt ({prompt_tokens} tokens) exceeds the context window "
                f"of {context_window} tokens; at most {room} can be generated", "max_tokens")
    else:
        params.max_tokens = min(room, default) if default else room


def tokenize_input(request: inference_pb2.GenerateRequest, tokenizer: ModelTokenizer) -> list[int]:
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("one of prompt, messages or token_ids is required", "input")
    if which == "prompt":
        if not request.prompt:
            raise invalid("prompt must not be empty", "prompt")
        return tokenizer.encode(request.prompt)
    if which == "token_ids":
        ids = list(request.token_ids.ids)
        if not ids:
            raise invalid("token_ids must not be empty", "token_ids")
        bad = next((t for t in ids if t >= tokenizer.vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary (size {tokenizer.vocab_size})", "token_ids")
        return ids
    messages = request.messages.messages
    if not messages:
        raise invalid("messages must not be empty", "messages")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {show(m.role)}",
                          f"messages[{i}].role")
    turns = [{"role": m.role, "content": m.content} | ({"name": m.name} if m.name else {}) for m in messages]
    try:
        return tokenizer.encode_chat(turns)
    except TemplateError as exc:
        raise invalid(str(exc), "messages") from exc


def prepare(request: inference_pb2.GenerateRequest, served: dict[str, int], tokenizers: dict[str, ModelTokenizer],
            default_max_tokens: int | None = None) -> PreparedRequest:
    check_ids(request)
    model = resolve_model(request.model, served, tokenizers)
    sampling = sampling_pb2.SamplingParams()
    sampling.CopyFrom(request.sampling)
    check_sampling(sampling)
    token_ids = tokenize_input(request, tokenizers[model])
    resolve_max_tokens(sampling, len(token_ids), served[model], default_max_tokens)
    return PreparedRequest(
        request_id=request.request_id or IDS.request_id(),
        model=model,
        prompt_token_ids=token_ids,
        sampling=sampling,
        session_id=request.session_id,
    )


def _sampling_from_openai(r: inference_pb2.ChatCompletionRequest | inference_pb2.CompletionRequest
                          ) -> sampling_pb2.SamplingParams:
    if len(r.user) > MAX_ID_CHARS:
        raise invalid(f"user must be at most {MAX_ID_CHARS} characters", "user")
    if r.HasField("n") and r.n != 1:
        raise invalid(f"only n=1 is supported, got {r.n}", "n")
    params = sampling_pb2.SamplingParams(stop=list(r.stop))
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if r.HasField(name):
            setattr(params, name, getattr(r, name))
    return params


def from_chat(r: inference_pb2.ChatCompletionRequest) -> inference_pb2.GenerateRequest:
    if not r.model:
        raise invalid("model is required", "model")
    return inference_pb2.GenerateRequest(
        model=r.model, messages=inference_pb2.ChatMessages(messages=r.messages),
        sampling=_sampling_from_openai(r), session_id=r.user,
    )


def from_completion(r: inference_pb2.CompletionRequest) -> inference_pb2.GenerateRequest:
    if not r.model:
        raise invalid("model is required", "model")
    return inference_pb2.GenerateRequest(
        model=r.model, prompt=r.prompt, sampling=_sampling_from_openai(r), session_id=r.user,
    )
