"""The scheduler's request path: admit, route, run the prefill and decode legs, fail over.

Per request (`Router.run`):
1. Admission (scheduler/admission.py): beyond the capacity of the routable workers the request
   is refused at once — RESOURCE_EXHAUSTED with a RetryInfo hint (HTTP 429 + Retry-After at
   the gateway) — instead of queueing without bound; near capacity, tenants (gRPC metadata
   `x-tenant-id`, the gateway's `X-Tenant-Id` header) over their fair share are refused first.
2. Route (scheduler/disagg.py): the decode worker by the policy, then where to prefill.
3. Prefill leg (remote prefill only): Worker.Generate with remote_decode on the prefill worker;
   its reply names the KV by engine id and block ids, completed with the prefill worker's
   registered side channel. A failed or slow (`prefill_timeout_s`) leg falls back to a prefill
   on the decode worker: the request still succeeds.
4. Decode leg: Worker.Generate on the decode worker, streamed back.

Failover (scheduler/resilience.py). A worker that errors, refuses, vanishes or drains
(UNAVAILABLE, RESOURCE_EXHAUSTED, INTERNAL, UNKNOWN, ABORTED, FAILED_PRECONDITION, and CANCELLED /
DEADLINE_EXCEEDED while the client is still there), or whose engine aborts the request without
the client asking, has its circuit opened (out of routing at
once, not only when its etcd lease expires) and the request goes on elsewhere, up to
`retry.max_attempts` workers, with jittered backoff:
- before the first token: retried from scratch on another worker — the client sees nothing;
- after it (migration): resumed on another worker with the prompt plus every token already
  sent, for the remaining max_tokens, so the stream continues with no token lost or repeated.
  Greedy output is identical to an uninterrupted run; sampled output continues from the same
  context with fresh randomness. The final usage counts the original prompt and every token
  sent. A stop string that would span the junction is not seen by the new engine.
Client errors (INVALID_ARGUMENT), the client's own cancel or deadline, and a request whose
deadline has no room left are never retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

import grpc

from llm_mesh.v1 import inference_pb2, membership_pb2, sampling_pb2, worker_pb2
from scheduler.admission import AdmissionConfig, AdmissionController, capacity
from scheduler.disagg import DisaggDecision, Disaggregator
from scheduler.framework import Policy, RequestView
from scheduler.index import BlockIndex
from scheduler.resilience import RetryPolicy
from services import tracing
from services.grpc_util import RpcError, invalid
from services.kv_events import KVEventSubscriber
from services.metrics import SchedulerMetrics
from services.requests import IDS, PreparedRequest, prepare
from services.router_stats import RequestRecord, RouterStats
from services.tokenizer import ModelTokenizer
from services.worker_pool import PooledWorker, WorkerPool

log = logging.getLogger(__name__)

# A prefill leg longer than this is given up: the decode worker prefills instead.
DEFAULT_PREFILL_TIMEOUT_S = 30.0
TENANT_METADATA_KEY = "x-tenant-id"
MAX_TENANT_LEN = 128

# Worker failures worth another worker (the same request may well succeed elsewhere). CANCELLED
# and DEADLINE_EXCEEDED count only while the client is still there with time left: then they
# came from the worker's side (a server stopping after its drain grace ends its streams so).
_FAILOVER_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
})


@dataclasses.dataclass
class _Progress:
    """What the client has of one request, across the workers that served it."""

    sent: list[int] = dataclasses.field(default_factory=list)  # tokens sent, in order
    first_token_at: float | None = None  # monotonic


class _NoWorker(RpcError):
    """No eligible worker for the request (UNAVAILABLE to the client)."""


class _WorkerFailed(Exception):
    """A worker failed this attempt in a way another worker may not (see _FAILOVER_CODES)."""

    def __init__(self, worker_id: str, code: str, error: RpcError) -> None:
        super().__init__(error.message)
        self.worker_id, self.code, self.error = worker_id, code, error


class Router:
    """Holds the tokenizers, the worker pool, the KV block index and the routing policy; runs
    requests. The index is fed by every worker's KV event stream (services.kv_events), so each
    scheduler replica holds the same view without talking to the others."""

    def __init__(self, pool: WorkerPool, tokenizers: dict[str, ModelTokenizer], policy: Policy,
                 metrics: SchedulerMetrics | None = None, prefill_timeout_s: float = DEFAULT_PREFILL_TIMEOUT_S,
                 retry: RetryPolicy = RetryPolicy(), admission: AdmissionConfig = AdmissionConfig()) -> None:
        self.pool = pool
        self.tokenizers = tokenizers
        self.policy = policy
        self.disagg = Disaggregator(policy)
        self.prefill_timeout_s = prefill_timeout_s
        self.retry = retry
        self.admission = AdmissionController(admission)
        self.index = BlockIndex()
        self.kv_events = KVEventSubscriber(pool.directory, self.index, tls=pool.tls, stores=pool.store_directory)
        self.metrics = metrics or SchedulerMetrics()
        self.stats = RouterStats()  # GetStats and the scaling planner's window
        self.metrics.watch_index(lambda: len(self.index), lambda: self.kv_events.feeds)
        self.metrics.watch_workers(lambda: [(w.member.id, w.state.role.name.lower(), w.load)
                                            for w in list(pool.workers.values())])

    async def start(self) -> None:
        await self.pool.start()
        await self.kv_events.start()

    async def stop(self) -> None:
        await self.kv_events.stop()
        await self.pool.stop()

    def prepare(self, request: inference_pb2.GenerateRequest, default_max_tokens: int | None = None) -> PreparedRequest:
        with tracing.span("tokenize", {"llm_mesh.input": request.WhichOneof("input") or ""}) as span:
            prepared = prepare(request, self.pool.models(), self.tokenizers, default_max_tokens)
            span.set_attribute("llm_mesh.prompt_tokens", len(prepared.prompt_token_ids))
        return prepared

    def decide(self, prepared: PreparedRequest, dry_run: bool = False, prompt: list[int] | None = None,
               exclude: frozenset[str] = frozenset()) -> DisaggDecision:
        """Hash the prompt as the engines do; the policy picks the decode worker, the P/D rule
        where the prompt is prefilled (on that worker unless a prefill worker is worth it).
        `prompt` (a migration: prompt + tokens sent) and `exclude` (workers that failed this
        request) serve failover."""
        prompt = prepared.prompt_token_ids if prompt is None else prompt
        block_size = self.pool.block_size(prepared.model) or 16
        view = RequestView.from_tokens(
            prepared.model, prompt, block_size, session_id=prepared.session_id,
            request_id=prepared.request_id, max_tokens=prepared.sampling.max_tokens, now=time.monotonic(),
            exclude=exclude)
        return self.disagg.decide(view, self.pool.states(), self.index, dry_run=dry_run)

    async def run(self, prepared: PreparedRequest, context: grpc.aio.ServicerContext,
                  record: RequestRecord | None = None) -> AsyncIterator[inference_pb2.GenerateResponse]:
        tenant = _tenant(context)
        refusal = self.admission.try_admit(tenant, capacity(self.pool.states(), prepared.model,
                                                            self.admission.config.queue_factor),
                                           self._mean_request_s(prepared.model))
        if refusal is not None:
            self.metrics.admission_refused()
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.reason, retry_after_s=refusal.retry_after_s)
        try:
            async for response in self._with_failover(prepared, context, record):
                yield response
        finally:
            self.admission.release(tenant)

    def _mean_request_s(self, model: str) -> float | None:
        times = [w.mean_request_s for w in self.pool.states() if w.model == model and w.mean_request_s]
        return sum(times) / len(times) if times else None

    async def _with_failover(self, prepared: PreparedRequest, context: grpc.aio.ServicerContext,
                             record: RequestRecord | None) -> AsyncIterator[inference_pb2.GenerateResponse]:
        progress = _Progress()
        tried: set[str] = set()
        previous: _WorkerFailed | None = None
        for attempt in range(self.retry.max_attempts):
            if attempt:
                await asyncio.sleep(self.retry.backoff_s(attempt))
            if len(progress.sent) >= prepared.sampling.max_tokens:
                # Cut after its last token, before the final message: nothing left to generate.
                prompt_tokens, completion_tokens = len(prepared.prompt_token_ids), len(progress.sent)
                self.metrics.finished(prompt_tokens, 0)
                if record is not None:
                    record.finished(prompt_tokens, 0, completion_tokens,
                                    time.monotonic() - (progress.first_token_at or time.monotonic()))
                yield inference_pb2.GenerateResponse(
                    request_id=prepared.request_id, finish_reason=sampling_pb2.FINISH_REASON_LENGTH,
                    usage=sampling_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                             total_tokens=prompt_tokens + completion_tokens))
                return
            try:
                async for response in self._attempt(prepared, context, record, progress, frozenset(tried), attempt):
                    yield response
                return
            except _NoWorker:
                if previous is not None:  # nowhere left to go: the failure that sent us looking says more
                    raise previous.error from previous
                raise
            except _WorkerFailed as failed:
                previous = failed
                worker = self.pool.workers.get(failed.worker_id)
                if worker is not None:
                    worker.state.circuit.failed(time.monotonic(), failed.code)
                tried.add(failed.worker_id)
                remaining = context.time_remaining()
                last = attempt + 1 >= self.retry.max_attempts or (remaining is not None and remaining <= 0.1)
                kind = "migrate" if progress.sent else "retry"
                log.warning("request %s: worker %s failed (%s) after %d tokens; %s", prepared.request_id,
                            failed.worker_id, failed.error.message, len(progress.sent), "giving up" if last else kind)
                if last:
                    raise failed.error from failed
                self.metrics.failed_over(kind, failed.code)

    async def _attempt(self, prepared: PreparedRequest, context: grpc.aio.ServicerContext,
                       record: RequestRecord | None, progress: _Progress, exclude: frozenset[str], attempt: int
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """One worker's try at the request, resuming after `progress.sent` (appended to as tokens
        go out). Raises _WorkerFailed when another worker should take over."""
        sent = progress.sent
        prompt = prepared.prompt_token_ids + sent
        decide_started = time.perf_counter()
        with tracing.span("route", {"llm_mesh.attempt": attempt}) as span:
            pd = self.decide(prepared, prompt=prompt, exclude=exclude)
            if span.is_recording():
                span.set_attributes(tracing.route_attributes(pd))
        decision = pd.decode
        self.metrics.decided(decision)
        self.metrics.disaggregated(pd.rule)
        if record is not None and attempt == 0:
            uncached = pd.prefill.prefill_tokens if pd.prefill is not None else decision.prefill_tokens
            record.routed(prepared.request_id, prepared.model, decision.worker_id or "", pd.rule,
                          len(prepared.prompt_token_ids), uncached, time.perf_counter() - decide_started)
        worker = self.pool.workers.get(decision.worker_id) if decision.worker_id else None
        if worker is None:
            reason = decision.reason or f"no live worker serves {prepared.model!r}"
            raise _NoWorker(grpc.StatusCode.UNAVAILABLE, reason, retry_after_s=1.0)
        prefill_worker = self.pool.workers.get(pd.prefill.worker_id) if pd.prefill is not None else None
        # No await between decide and start: the next decision must see this one (both legs).
        ticket = worker.state.start(0 if prefill_worker else decision.prefill_tokens, decision.request_blocks)
        prefill_ticket = (prefill_worker.state.start(pd.prefill.prefill_tokens, pd.prefill.request_blocks)
                          if prefill_worker is not None else None)
        dispatched = time.monotonic()
        sampling = sampling_pb2.SamplingParams()
        sampling.CopyFrom(prepared.sampling)
        sampling.max_tokens = prepared.sampling.max_tokens - len(sent)
        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=IDS.attempt_id(prepared.request_id), prompt_token_ids=prompt,
            sampling=sampling, model=prepared.model)
        completed, call, decode = False, None, None
        try:
            if prefill_worker is not None:
                with tracing.span("prefill", {"llm_mesh.worker.id": prefill_worker.state.worker_id}) as span:
                    kv = await self._prefill(prefill_worker, prefill_ticket, prepared, worker_request, context)
                    tracing.describe_prefill(span, kv)
                if kv is not None:
                    worker_request.remote_prefill.CopyFrom(kv)
            decode = tracing.tracer.start_span("decode", attributes={
                "llm_mesh.worker.id": worker.state.worker_id,
                "llm_mesh.pd.kv_pulled": worker_request.HasField("remote_prefill")})
            with tracing.current(decode):  # the worker call is the decode span's child
                call = worker.generate(worker_request, timeout=context.time_remaining())
            first = True
            async for out in call:
                response = inference_pb2.GenerateResponse(
                    request_id=prepared.request_id, token_ids=out.token_ids, text=out.text,
                    finish_reason=out.finish_reason)
                if out.finish_reason == sampling_pb2.FINISH_REASON_ABORT:
                    # Not our cancel (that would have cancelled this generator): the engine gave up.
                    raise _WorkerFailed(worker.state.worker_id, "ABORTED", RpcError(
                        grpc.StatusCode.UNAVAILABLE, f"worker {worker.state.worker_id} aborted the request",
                        retry_after_s=1.0))
                if first:
                    worker.state.circuit.succeeded()
                    ticket.first_token(time.monotonic() - dispatched)
                    if progress.first_token_at is None:
                        progress.first_token_at = time.monotonic()
                        response.worker_id = worker.state.worker_id
                        if record is not None:
                            record.first_token(progress.first_token_at - dispatched)
                    first = False
                if out.HasField("usage"):
                    completed = True
                    usage = _whole_request_usage(out.usage, len(prepared.prompt_token_ids), len(sent) + len(out.token_ids))
                    response.usage.CopyFrom(usage)
                    self.metrics.finished(usage.prompt_tokens, usage.cached_prompt_tokens)
                    tracing.describe_usage(decode, usage, out.finish_reason)
                    if record is not None:
                        record.finished(usage.prompt_tokens, usage.cached_prompt_tokens, usage.completion_tokens,
                                        time.monotonic() - (progress.first_token_at or dispatched))
                sent.extend(out.token_ids)
                yield response
        except grpc.aio.AioRpcError as exc:
            if decode is not None:
                tracing.fail(decode, exc)
            error = _from_worker_error(exc, worker.state.worker_id)
            if exc.code() in _FAILOVER_CODES and not _client_gone(context):
                raise _WorkerFailed(worker.state.worker_id, exc.code().name, error) from exc
            raise error from exc
        finally:
            ticket.finish(time.monotonic() - dispatched, completed=completed)
            if call is not None:
                call.cancel()  # no-op when finished; aborts the engine request when we are cancelled
            if decode is not None:
                decode.end()

    async def _prefill(self, worker: PooledWorker, ticket, prepared: PreparedRequest,  # noqa: ANN001
                       decode_request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
                       ) -> worker_pb2.KVTransferParams | None:
        """The prefill leg on `worker`: where its KV waits, or None to prefill on the decode worker.

        A client that cancels or whose deadline passes ends the request (the cancel reaches the
        prefill engine, which frees its blocks); any other failure, or a leg longer than
        prefill_timeout_s, falls back to a local prefill (and opens the prefill worker's circuit)."""
        sampling = sampling_pb2.SamplingParams()
        sampling.CopyFrom(decode_request.sampling)
        sampling.max_tokens = 1
        request = worker_pb2.WorkerGenerateRequest(
            request_id=f"{decode_request.request_id}-prefill", prompt_token_ids=decode_request.prompt_token_ids,
            sampling=sampling, model=prepared.model, remote_decode=True)
        remaining = context.time_remaining()
        timeout = self.prefill_timeout_s if remaining is None else min(remaining, self.prefill_timeout_s)
        started = time.monotonic()
        call = worker.generate(request, timeout=timeout)
        kv, failure = None, "no kv_transfer in the prefill leg's reply"
        try:
            async for out in call:
                if out.HasField("kv_transfer"):
                    kv = out.kv_transfer
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED or _client_gone(context):
                raise _from_worker_error(exc, worker.state.worker_id) from exc
            failure = f"{exc.code().name}: {exc.details()}"
        finally:
            elapsed = time.monotonic() - started
            if kv is not None:
                ticket.first_token(elapsed)
            ticket.finish(elapsed, completed=kv is not None)
            call.cancel()
        if kv is not None:
            kv, failure = _at_registered_endpoint(kv, worker.member), f"engine {kv.engine_id} is not the registered one"
        if kv is None:
            tracing.span_attribute("llm_mesh.pd.fallback_reason", failure)
            log.warning("prefill on %s failed (%s); prefilling on the decode worker", worker.state.worker_id, failure)
            worker.state.circuit.failed(time.monotonic(), failure.split(":")[0])
            self.metrics.prefill_fallback()
        else:
            worker.state.circuit.succeeded()
            self.metrics.prefilled_remotely(elapsed)
        return kv


def _tenant(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA_KEY:
            tenant = value if isinstance(value, str) else value.decode(errors="replace")
            if len(tenant) > MAX_TENANT_LEN or not tenant.isprintable():
                raise invalid(f"{TENANT_METADATA_KEY} must be at most {MAX_TENANT_LEN} printable characters",
                              TENANT_METADATA_KEY)
            return tenant
    return ""


def _client_gone(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


def _whole_request_usage(usage: sampling_pb2.Usage, prompt_tokens: int, completion_tokens: int
                         ) -> sampling_pb2.Usage:
    """The last attempt's usage restated for the whole request (a migrated attempt's prompt held
    the tokens already sent)."""
    whole = sampling_pb2.Usage()
    whole.CopyFrom(usage)
    whole.prompt_tokens, whole.completion_tokens = prompt_tokens, completion_tokens
    whole.total_tokens = prompt_tokens + completion_tokens
    whole.cached_prompt_tokens = min(usage.cached_prompt_tokens, prompt_tokens)
    return whole


def _at_registered_endpoint(kv: worker_pb2.KVTransferParams, member: membership_pb2.Member
                            ) -> worker_pb2.KVTransferParams | None:
    """The prefill leg's ids completed with where its engine is reached (the prefill worker's
    registered kv_endpoint: published once, so per request only ids travel); None when the
    reply names another engine than the registered one."""
    endpoint = member.worker.kv_endpoint
    if not endpoint.engine_id:
        return kv  # registered without an endpoint (older worker): the reply says it all
    if kv.engine_id != endpoint.engine_id:
        return None
    kv.host, kv.port, kv.tp_size = endpoint.host, endpoint.port, endpoint.tp_size or 1
    return kv


def _from_worker_error(exc: grpc.aio.AioRpcError, worker_id: str) -> RpcError:
    code = exc.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return RpcError(code, exc.details() or code.name)
    # The worker failed or vanished mid-request: retryable for the client.
    return RpcError(grpc.StatusCode.UNAVAILABLE, f"worker {worker_id} failed: {code.name} {exc.details()}",
                    retry_after_s=1.0)

