"""gRPC plumbing shared by every service: servers with health and reflection,
errors as status codes with google.rpc details, and stop-on-signal."""

from __future__ import annotations

import asyncio
import gc
import inspect
import signal
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from services import tracing
from services.tls import TlsFiles, server_credentials

# Generous message limits: a 220 KB prompt as token ids is far below this, and a
# limit we set ourselves gives a clear RESOURCE_EXHAUSTED rather than a crash.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def make_server(address: str, service_names: Iterable[str], *, tls: TlsFiles | None = None,
                interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                ) -> tuple[grpc.aio.Server, health.HealthServicer, int]:
    """A grpc.aio server bound to `address` (port 0 picks a free one) with the
    standard health and reflection services. Returns (server, health, port).
    TLS (mTLS with a CA) when `tls` holds a certificate (services/tls.py); `interceptors` run
    after tracing's (e.g. services.auth.ApiKeyInterceptor).

    Health: grpc's servicer answers SERVING for "" from the start; drive it with
    services.readiness.Readiness ("liveness", and readiness only once truly ready).
    """
    server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[
        InputGuard(), *tracing.server_interceptors(), *interceptors])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = server_credentials(tls)
    port = (server.add_insecure_port(address) if credentials is None
            else server.add_secure_port(address, credentials))
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return server, health_servicer, port


class _Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _unpin(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames in `exc`'s tracebacks (and its context's): grpc.aio
    keeps an abort's exception in a reference cycle, which would pin the request (up to
    MAX_MESSAGE_BYTES of it) until the next full garbage collection."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


class InputGuard(grpc.aio.ServerInterceptor):
    """The edge for hostile requests, on every server: a request that is not a valid protobuf
    message (bad wire format, invalid UTF-8 in a string) is INVALID_ARGUMENT (grpc.aio would
    answer UNKNOWN), and a failed call does not keep its request alive (see _unpin)."""

    def __init__(self) -> None:
        # method → (its handler, the guarded one): a registered method's handler is the same object
        # on every call, so it is wrapped once (a new one, e.g. another interceptor's, is wrapped
        # anew). Only methods that have a handler are kept: the set is the server's methods.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        known = self._guarded.get(handler_call_details.method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(handler)
        self._guarded[handler_call_details.method] = (handler, guarded)
        return guarded

    @staticmethod
    def _guard(handler: Any) -> Any:
        if handler.request_deserializer is None:
            return handler
        if handler.request_streaming and not handler.response_streaming:
            return handler  # (client-streaming uploads: KVStore.PutBlocks checks its own messages)
        parse = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            try:
                return parse(raw)
            except DecodeError as exc:
                return _Undecodable(str(exc))

        async def reject(context: grpc.aio.ServicerContext, request: _Undecodable) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request message: {request.reason}")

        def guard_streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        if isinstance(request, _Undecodable):
                            await reject(context, request)
                        yield request
                async for response in behavior(checked(), context):
                    yield response
            return stream_stream

        if handler.request_streaming:
            return handler._replace(request_deserializer=deserialize,
                                    stream_stream=guard_streaming(handler.stream_stream))

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(behavior):
                async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    try:
                        if isinstance(request, _Undecodable):
                            await reject(context, request)
                        async for response in behavior(request, context):
                            yield response
                    except BaseException as exc:
                        _unpin(exc)
                        del request
                        raise
                return stream

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if isinstance(request, _Undecodable):
                        await reject(context, request)
                    return await behavior(request, context)
                except BaseException as exc:
                    _unpin(exc)
                    del request
                    raise
            return unary

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        return handler._replace(request_deserializer=deserialize, **{kind: guard(getattr(handler, kind))})


def status_with_details(code: grpc.StatusCode, message: str, *, field: str | None = None,
                        retry_after_s: float | None = None) -> grpc.Status:
    """A status whose trailers carry google.rpc.Status details: BadRequest naming
    `field` and/or RetryInfo with `retry_after_s`."""
    details: list[any_pb2.Any] = []
    if field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(packed)
    if retry_after_s is not None:
        packed = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)
    return rpc_status.to_status(
        status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details)
    )


class RpcError(Exception):
    """Raised inside servicers; turned into a gRPC status at the edge."""

    def __init__(self, code: grpc.StatusCode, message: str, *, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    def status(self) -> grpc.Status:
        return status_with_details(self.code, self.message, field=self.field, retry_after_s=self.retry_after_s)


def invalid(message: str, field: str | None = None) -> RpcError:
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, message, field=field)


async def abort(context: grpc.aio.ServicerContext, error: RpcError) -> None:
    await context.abort_with_status(error.status())


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine to its end (asyncio.run), then ignore SIGINT/SIGTERM.

    The process is already stopping once `main` returns; without a handler (the loop takes its
    own away when it closes) a second stop signal, e.g. a supervisor's SIGTERM right after ours,
    would end it mid-teardown with -SIGTERM instead of 0. (uvloop was measured here and left out:
    `bench scheduler --only rps` gave the same requests/s and CPU per request on both loops.)"""

    async def until_stopped() -> None:
        try:
            await main
        finally:
            loop, stops = asyncio.get_running_loop(), {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # none lands between the two dispositions
            for sig in stops:
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)

    asyncio.run(until_stopped())


def settle_heap(young_threshold: int = 20_000) -> None:
    """Call once a service has started. What startup allocated (modules, protobuf descriptors,
    tokenizers, the engine) moves to the collector's permanent generation, so full collections
    stop walking it, and the youngest generation is collected every `young_threshold` container
    allocations instead of 700: a request path of asyncio tasks, futures and protobuf wrappers
    allocates that many in a few requests, most dead by the next collection. On the scheduler
    under `bench scheduler --only rps`, collections took 2.1% of its CPU while serving (157 young,
    14 middle, 1 full in 10 s), 0.1% after. (vLLM's API server freezes its startup heap too.)"""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, oldest)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (the process then shuts down cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
