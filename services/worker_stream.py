"""Worker.GenerateStream, both ends: many Generate calls multiplexed over one stream per worker.

Why: a Generate call costs the scheduler and the worker far more in gRPC machinery (call set-up,
metadata, status, the completion-queue round trips) than the request's own work; with short
requests it is most of their CPU (`llm-mesh bench scheduler --only rps`). On one long-lived
stream a request is a message each way, and messages batch whatever is ready.

The contract (worker.proto): each request behaves exactly as a Generate call would — the same
validation, the same responses, the same status on failure (StreamedResponse.error, a
google.rpc.Status with its details), cancel aborts the engine request, a deadline
(timeout_ms) ends it with DEADLINE_EXCEEDED. An error ends that request only. When the stream
ends or breaks, the worker aborts every request still on it and the scheduler fails each of
them with UNAVAILABLE (the router's failover takes them elsewhere).

- `serve` is the worker's half: it runs `generate` (the servicer's Generate logic) once per
  started request, each in its own task, and writes their responses in batches.
- `WorkerStream` is the scheduler's half: `generate()` returns a `StreamCall`, used like a
  grpc.aio unary-stream call (async iteration, `cancel()`, `grpc.aio.AioRpcError` on failure),
  so the router treats both alike. A worker without GenerateStream (UNIMPLEMENTED: an older
  version during a rolling upgrade) gets unary Generate calls from then on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.rpc import status_pb2

from llm_mesh.v1 import worker_pb2, worker_pb2_grpc
from services import tracing
from services.grpc_util import RpcError, invalid

log = logging.getLogger(__name__)

Generate = Callable[[worker_pb2.WorkerGenerateRequest], AsyncIterator[worker_pb2.WorkerGenerateResponse]]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _status(error: RpcError) -> status_pb2.Status:
    return status_pb2.Status.FromString(
        dict(error.status().trailing_metadata)[_STATUS_DETAILS_KEY])


# ---------------------------------------------------------------- the worker's half


async def serve(requests: AsyncIterator[worker_pb2.GenerateStreamRequest], generate: Generate,
                draining: asyncio.Event) -> AsyncIterator[worker_pb2.GenerateStreamResponse]:
    """The worker's side of one stream: start each request as it arrives, cancel on request,
    yield batches of responses until the caller half-closes and every request has ended. When
    the caller goes away (the generator is closed), every request still running is aborted.
    Once `draining` is set (the worker is leaving), new requests fail with UNAVAILABLE and the
    stream ends as soon as the running ones have: a stream never ends by itself, so it must not
    hold up the worker's drain."""
    outbox: list[worker_pb2.StreamedResponse] = []
    wake = asyncio.Event()
    drained = asyncio.ensure_future(draining.wait())
    drained.add_done_callback(lambda _: wake.set())
    running: dict[str, asyncio.Task[None]] = {}
    cancelled: set[str] = set()  # ended by a cancel message (their CANCELLED is reported)

    def emit(response: worker_pb2.StreamedResponse) -> None:
        outbox.append(response)
        wake.set()

    def fail(request_id: str, error: RpcError) -> None:
        emit(worker_pb2.StreamedResponse(request_id=request_id, error=_status(error)))

    async def run(started: worker_pb2.StreamedRequest) -> None:
        request_id = started.request.request_id
        timeout = started.timeout_ms / 1000 if started.timeout_ms else None
        with tracing.stream_server_span(GENERATE_METHOD, dict(started.trace_context)) as span:
            try:
                async with asyncio.timeout(timeout):
                    async for response in generate(started.request):
                        emit(worker_pb2.StreamedResponse(request_id=request_id, response=response))
            except RpcError as error:
                tracing.record_error(span, error.code, error.message)
                fail(request_id, error)
            except TimeoutError:
                tracing.record_error(span, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                fail(request_id, RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            except asyncio.CancelledError:
                if request_id not in cancelled:
                    raise  # the stream is going away: nobody to tell
                tracing.record_error(span, grpc.StatusCode.CANCELLED, "cancelled")
                fail(request_id, RpcError(grpc.StatusCode.CANCELLED, "Cancelled"))
            except Exception as exc:  # a bug: that request fails as Generate's would (UNKNOWN)
                log.exception("request %s failed", request_id)
                tracing.record_error(span, grpc.StatusCode.UNKNOWN, type(exc).__name__)
                fail(request_id, RpcError(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"))
            finally:
                running.pop(request_id, None)
                cancelled.discard(request_id)
                wake.set()

    async def read() -> None:
        try:
            async for batch in requests:
                for started in batch.start:
                    request_id = started.request.request_id
                    if draining.is_set():
                        fail(request_id, RpcError(grpc.StatusCode.UNAVAILABLE, "the worker is draining",
                                                  retry_after_s=1.0))
                    elif not request_id:
                        fail("", invalid("request.request_id is required", "start.request.request_id"))
                    elif request_id in running:
                        fail(request_id, invalid(f"request {request_id!r} is already running on this stream",
                                                 "start.request.request_id"))
                    else:
                        running[request_id] = asyncio.create_task(run(started))
                for request_id in batch.cancel_request_ids:
                    task = running.get(request_id)
                    if task is not None and not task.done():
                        cancelled.add(request_id)
                        task.cancel()
        finally:
            wake.set()

    reader = asyncio.create_task(read())
    try:
        while True:
            await wake.wait()
            wake.clear()
            if outbox:
                batch, outbox[:] = list(outbox), []
                yield worker_pb2.GenerateStreamResponse(responses=batch)
            if reader.done() and reader.exception() is not None:
                reader.result()  # the caller's stream failed (or a message was malformed): end it with that
            if not running and not outbox:
                if reader.done():
                    return
                if draining.is_set():
                    return
    finally:
        drained.cancel()
        reader.cancel()
        tasks = [reader, *running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


GENERATE_METHOD = "/llm_mesh.v1.Worker/Generate"  # each streamed request is traced as this call


# ---------------------------------------------------------------- the scheduler's half


def _aio_error(code: grpc.StatusCode, message: str, status: status_pb2.Status | None = None
               ) -> grpc.aio.AioRpcError:
    trailing = (grpc.aio.Metadata((_STATUS_DETAILS_KEY, status.SerializeToString()))
                if status is not None and status.details else grpc.aio.Metadata())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class StreamCall:
    """One request on a WorkerStream, used like a grpc.aio unary-stream call: iterate its
    responses; a failure raises grpc.aio.AioRpcError (the code and message Generate would end
    with); `cancel()` aborts it on the worker (a no-op once it ended)."""

    def __init__(self, stream: WorkerStream, started: worker_pb2.StreamedRequest, timeout: float | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        """`started` holds the request (the caller fills in the rest): the StreamedRequest as it will
        go out, kept for a fallback to a plain call."""
        self._stream = stream
        self.started = started
        self.request_id = started.request.request_id
        # What the stream delivered, and the reader waiting for it: a deque and a bare future on the
        # stream's loop, not an asyncio.Queue (a loop lookup and a waiter list on every request).
        self._items: collections.deque[worker_pb2.StreamedResponse | grpc.aio.AioRpcError] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = loop
        self._ended = self._cancelled = False
        self._fallback: grpc.aio.UnaryStreamCall | None = None  # the worker has no GenerateStream
        self._span = tracing.stream_client_span(GENERATE_METHOD, stream.target)
        context = tracing.inject(self._span)
        if context:
            started.trace_context.update(context)
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        if timeout is not None:
            started.timeout_ms = min(max(1, int(timeout * 1000)), 2**32 - 1)
            self._deadline = time.monotonic() + timeout
            self._timer = loop.call_later(max(0.0, timeout), self._expire)

    def __aiter__(self) -> StreamCall:
        return self

    async def __anext__(self) -> worker_pb2.WorkerGenerateResponse:
        if self._fallback is not None:
            return await self._fallback.__aiter__().__anext__()
        if self._cancelled:
            raise asyncio.CancelledError  # as a cancelled grpc.aio call
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if isinstance(item, grpc.aio.AioRpcError):
            if item.code() == grpc.StatusCode.UNIMPLEMENTED:  # an older worker: a plain call instead
                self._stream.unary_only = True
                self._end(grpc.StatusCode.OK, "")
                remaining = None if self._deadline is None else max(0.001, self._deadline - time.monotonic())
                self._fallback = self._stream.stub.Generate(self.started.request, timeout=remaining)
                return await self.__anext__()
            self._end(item.code(), item.details() or "")
            raise item
        if item.HasField("error"):
            code = _CODES.get(item.error.code, grpc.StatusCode.UNKNOWN)
            self._end(code, item.error.message)
            raise _aio_error(code, item.error.message, item.error)
        if item.response.finish_reason:
            self._end(grpc.StatusCode.OK, "")
        return item.response

    def cancel(self) -> bool:
        if self._fallback is not None:
            return self._fallback.cancel()
        if self._ended:
            return False
        self._stream._cancel(self.request_id)
        self._end(grpc.StatusCode.CANCELLED, "Cancelled")
        self._cancelled = True
        return True

    def _expire(self) -> None:
        if not self._ended:
            self._stream._cancel(self.request_id)
            self._deliver(_aio_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _deliver(self, item: worker_pb2.StreamedResponse | grpc.aio.AioRpcError) -> None:
        if not self._ended:
            self._items.append(item)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _end(self, code: grpc.StatusCode, message: str) -> None:
        if self._ended:
            return
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
        self._stream._forget(self)
        tracing.end_client_span(self._span, code, message)


class WorkerStream:
    """The scheduler's one GenerateStream to a worker, opened on first use and again after it
    breaks. Starts and cancels made in one event-loop turn go out as one message."""

    def __init__(self, stub: worker_pb2_grpc.WorkerStub, target: str) -> None:
        self.stub = stub
        self.target = target
        self.unary_only = False  # the worker answered UNIMPLEMENTED: plain Generate calls from now on
        self._call: grpc.aio.StreamStreamCall | None = None
        self._calls: dict[str, StreamCall] = {}
        self._outgoing = worker_pb2.GenerateStreamRequest()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: asyncio.Event | None = None  # set when the last call ends (close waits for it)
        self._loop: asyncio.AbstractEventLoop | None = None  # the one its calls run on (set by the first)

    def generate(self, request: worker_pb2.WorkerGenerateRequest, timeout: float | None = None
                 ) -> StreamCall | grpc.aio.UnaryStreamCall:
        if self.unary_only:
            return self.stub.Generate(request, timeout=timeout)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if request.request_id in self._calls:  # the worker would refuse it; fail it here, alike
            call = StreamCall(self, worker_pb2.StreamedRequest(request=request), timeout, self._loop)
            call._deliver(_aio_error(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"request {call.request_id!r} is already running on this stream"))
            return call
        started = self._outgoing.start.add()  # built in the next message: one copy of the request
        started.request.CopyFrom(request)
        call = StreamCall(self, started, timeout, self._loop)
        self._calls[call.request_id] = call
        self._open()
        self._wake.set()
        return call

    async def close(self, grace: float | None = None) -> None:
        """End the stream (the worker aborts what still runs on it) once its requests have ended
        or `grace` seconds have passed; those still in flight then fail."""
        if grace and self._calls:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._call is not None:
            self._call.cancel()
            self._call = None
        self._fail_all(grpc.StatusCode.UNAVAILABLE, f"stream to worker {self.target} closed")

    def _open(self) -> None:
        if self._call is not None:
            return
        call = self.stub.GenerateStream()
        self._call = call
        self._tasks = [asyncio.create_task(self._write(call)), asyncio.create_task(self._read(call))]

    def _cancel(self, request_id: str) -> None:
        if self._call is not None:
            self._outgoing.cancel_request_ids.append(request_id)
            self._wake.set()

    def _forget(self, call: StreamCall) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
        if not self._calls and self._idle is not None:
            self._idle.set()

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._outgoing.start or self._outgoing.cancel_request_ids:
                    batch, self._outgoing = self._outgoing, worker_pb2.GenerateStreamRequest()
                    await call.write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call ended under us: the read side fails the requests
            log.debug("stream to %s: write failed: %r", self.target, exc)

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        code, message = grpc.StatusCode.UNAVAILABLE, f"stream to worker {self.target} ended"
        try:
            async for batch in call:
                for response in batch.responses:
                    target = self._calls.get(response.request_id)
                    if target is not None:
                        target._deliver(response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code() if exc.code() == grpc.StatusCode.UNIMPLEMENTED else grpc.StatusCode.UNAVAILABLE
            message = f"stream to worker {self.target} broke: {exc.code().name} {exc.details()}"
        except asyncio.CancelledError:
            raise
        finally:
            if self._call is call:
                self._call = None
                for task in self._tasks:
                    if task is not asyncio.current_task():
                        task.cancel()
                self._tasks = []
                self._outgoing = worker_pb2.GenerateStreamRequest()
        self._fail_all(code, message)

    def _fail_all(self, code: grpc.StatusCode, message: str) -> None:
        calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call._deliver(_aio_error(code, message))
