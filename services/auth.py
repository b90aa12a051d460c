"""API keys (bearer tokens) for the public APIs: the gateway's /v1/* and the scheduler's
gRPC `Inference` and `Scheduler` services. Health, reflection and /metrics stay open.

Keys come from `--api-key-file` (or $LLM_MESH_API_KEYS_FILE): one key per line, blank lines
and `#` comments ignored. Without a file, auth is off. Keys are compared in constant time
against every configured key and never logged.
"""

from __future__ import annotations

import argparse
import hmac
import os
import pathlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

API_KEYS_FILE_ENV = "LLM_MESH_API_KEYS_FILE"
UNAUTHENTICATED_MESSAGE = "missing or invalid API key: send 'authorization: Bearer <key>'"


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys]
        if not self._keys:
            raise ValueError("an API key file must hold at least one key")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ApiKeys:
        try:
            lines = pathlib.Path(path).read_text().splitlines()
        except OSError as exc:
            raise SystemExit(f"cannot read the API key file {path}: {exc.strerror}") from None
        try:
            return cls(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
        except ValueError:
            raise SystemExit(f"{path}: no API key in the file") from None

    def accepts(self, token: str | None) -> bool:
        """Constant time in the key content: every key is compared, whichever matches."""
        if token is None:
            return False
        presented = token.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        return matched

    def accepts_header(self, authorization: str | None) -> bool:
        return self.accepts(bearer_token(authorization))

    def __repr__(self) -> str:  # never the keys themselves
        return f"ApiKeys({len(self._keys)} keys)"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` value (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key-file", default=os.environ.get(API_KEYS_FILE_ENV),
                        help=f"require 'Authorization: Bearer <key>' with one of the keys in this file (one per "
                             f"line; default ${API_KEYS_FILE_ENV}; off when unset)")


def from_args(args: argparse.Namespace) -> ApiKeys | None:
    path = getattr(args, "api_key_file", None)
    return ApiKeys.load(path) if path else None


def client_metadata(path: str | None) -> tuple[tuple[str, str], ...]:
    """For a gRPC client (`llm-mesh top`): the first key of an API key file as bearer metadata."""
    if not path:
        return ()
    return grpc_metadata(f"Bearer {ApiKeys.load(path)._keys[0].decode()}")


def grpc_metadata(authorization: str | None) -> tuple[tuple[str, str], ...]:
    """An HTTP Authorization value as gRPC metadata (the gateway forwards the client's token).
    A value gRPC cannot carry (not printable ASCII) is dropped: it is no valid key either."""
    valid = authorization and authorization.isascii() and authorization.isprintable()
    return (("authorization", authorization),) if valid else ()


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` (full names, e.g. llm_mesh.v1.Inference) without a valid
    bearer token in the `authorization` metadata: UNAUTHENTICATED. Other services pass."""

    def __init__(self, keys: ApiKeys, services: Sequence[str]) -> None:
        self._keys = keys
        self._services = frozenset(services)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        service = details.method.lstrip("/").rpartition("/")[0]
        if handler is None or service not in self._services:
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self._keys.accepts_header(metadata.get("authorization")):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape (and serializers) that aborts without running the method."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + (
        "stream" if handler.response_streaming else "unary")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
