"""`llm-mesh scheduler`: the public `Inference` API and the `Scheduler` admin API.

Per request: validate and tokenize once (services.requests), pick a worker
(scheduler.policies over the KV block index), stream Worker.Generate back. The client's deadline becomes
the worker call's deadline; a client that goes away cancels the worker call,
which aborts the engine request.

Prefill/decode (scheduler/disagg.py decides): the decode worker is chosen
first; a remote prefill runs Worker.Generate on the prefill worker with
remote_decode (one token, discarded: the decode leg samples the first token
again from the pulled KV), and the decode leg gets the KV's location in
remote_prefill. A prefill leg that fails or outlasts `--prefill-timeout`
falls back to prefilling on the decode worker: the request still succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from llm_mesh.v1 import (
    inference_pb2, inference_pb2_grpc, membership_pb2, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2,
)
from scheduler.disagg import DisaggDecision, Disaggregator
from scheduler.framework import Policy, RequestView
from scheduler.index import BlockIndex
from scheduler.policies import POLICY_NAMES, policy_by_name
from scheduler.profile import load_profile
from services import __version__
from services.grpc_util import RpcError, abort, make_server, set_serving, stop_event_on_signals
from services.kv_events import KVEventSubscriber
from services.metrics import SchedulerMetrics
from services.membership import DEFAULT_TTL_S, Registration, parse_endpoints
from services.openai_format import chat_chunks, chat_completion, completion, completion_chunks
from services.requests import PreparedRequest, from_chat, from_completion, prepare, DEFAULT_COMPLETION_MAX_TOKENS
from services.tokenizer import ModelTokenizer
from services.worker_pool import WorkerPool

log = logging.getLogger(__name__)

# A prefill leg longer than this is given up: the decode worker prefills instead.
DEFAULT_PREFILL_TIMEOUT_S = 30.0

SERVICE_NAMES = [
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
]


class Router:
    """Holds the tokenizers, the worker pool, the KV block index and the routing
    policy; runs requests.

    The index is fed by every worker's KV event stream (services.kv_events), so
    each scheduler replica holds the same view without talking to the others.
    """

    def __init__(self, pool: WorkerPool, tokenizers: dict[str, ModelTokenizer], policy: Policy,
                 metrics: SchedulerMetrics | None = None, prefill_timeout_s: float = DEFAULT_PREFILL_TIMEOUT_S
                 ) -> None:
        self.pool = pool
        self.tokenizers = tokenizers
        self.policy = policy
        self.disagg = Disaggregator(policy)
        self.prefill_timeout_s = prefill_timeout_s
        self.index = BlockIndex()
        self.kv_events = KVEventSubscriber(pool.directory, self.index)
        self.metrics = metrics or SchedulerMetrics()
        self.metrics.watch_index(lambda: len(self.index), lambda: self.kv_events.feeds)

    async def start(self) -> None:
        await self.pool.start()
        await self.kv_events.start()

    async def stop(self) -> None:
        await self.kv_events.stop()
        await self.pool.stop()

    def prepare(self, request: inference_pb2.GenerateRequest, default_max_tokens: int | None = None) -> PreparedRequest:
        return prepare(request, self.pool.models(), self.tokenizers, default_max_tokens)

    def decide(self, prepared: PreparedRequest, dry_run: bool = False) -> DisaggDecision:
        """Hash the prompt as the engines do; the policy picks the decode worker, the P/D rule
        where the prompt is prefilled (on that worker unless a prefill worker is worth it)."""
        block_size = self.pool.block_size(prepared.model) or 16
        view = RequestView.from_tokens(
            prepared.model, prepared.prompt_token_ids, block_size, session_id=prepared.session_id,
            request_id=prepared.request_id, max_tokens=prepared.sampling.max_tokens, now=time.monotonic())
        return self.disagg.decide(view, self.pool.states(), self.index, dry_run=dry_run)

    async def run(self, prepared: PreparedRequest, context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        pd = self.decide(prepared)
        decision = pd.decode
        self.metrics.decided(decision)
        self.metrics.disaggregated(pd.rule)
        worker = self.pool.workers.get(decision.worker_id) if decision.worker_id else None
        if worker is None:
            reason = decision.reason or f"no live worker serves {prepared.model!r}"
            raise RpcError(grpc.StatusCode.UNAVAILABLE, reason, retry_after_s=1.0)
        prefill_worker = self.pool.workers.get(pd.prefill.worker_id) if pd.prefill is not None else None
        # No await between decide and start: the next decision must see this one (both legs).
        ticket = worker.state.start(0 if prefill_worker else decision.prefill_tokens, decision.request_blocks)
        prefill_ticket = (prefill_worker.state.start(pd.prefill.prefill_tokens, pd.prefill.request_blocks)
                          if prefill_worker is not None else None)
        dispatched = time.monotonic()
        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=f"{prepared.request_id}-{secrets.token_hex(4)}",
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            model=prepared.model,
        )
        if prefill_worker is not None:
            kv = await self._prefill(prefill_worker, prefill_ticket, prepared, worker_request.request_id, context)
            if kv is not None:
                worker_request.remote_prefill.CopyFrom(kv)
        call = worker.stub.Generate(worker_request, timeout=context.time_remaining())
        first, completed = True, False
        try:
            async for out in call:
                response = inference_pb2.GenerateResponse(
                    request_id=prepared.request_id, token_ids=out.token_ids, text=out.text,
                    finish_reason=out.finish_reason,
                )
                if out.HasField("usage"):
                    response.usage.CopyFrom(out.usage)
                    completed = out.finish_reason != sampling_pb2.FINISH_REASON_ABORT
                    self.metrics.finished(out.usage.prompt_tokens, out.usage.cached_prompt_tokens)
                if first:
                    response.worker_id = worker.state.worker_id
                    ticket.first_token(time.monotonic() - dispatched)
                    first = False
                yield response
        except grpc.aio.AioRpcError as exc:
            raise _from_worker_error(exc, worker.state.worker_id) from exc
        finally:
            ticket.finish(time.monotonic() - dispatched, completed=completed)
            call.cancel()  # no-op when finished; aborts the engine request when we are cancelled

    async def _prefill(self, worker, ticket, prepared: PreparedRequest, decode_request_id: str,
                       context: grpc.aio.ServicerContext) -> worker_pb2.KVTransferParams | None:
        """The prefill leg on `worker`: where its KV waits, or None to prefill on the decode worker.

        A client that cancels or whose deadline passes ends the request (the cancel reaches the
        prefill engine, which frees its blocks); any other failure, or a leg longer than
        prefill_timeout_s, falls back to a local prefill."""
        sampling = sampling_pb2.SamplingParams()
        sampling.CopyFrom(prepared.sampling)
        sampling.max_tokens = 1
        request = worker_pb2.WorkerGenerateRequest(
            request_id=f"{decode_request_id}-prefill", prompt_token_ids=prepared.prompt_token_ids,
            sampling=sampling, model=prepared.model, remote_decode=True)
        remaining = context.time_remaining()
        timeout = self.prefill_timeout_s if remaining is None else min(remaining, self.prefill_timeout_s)
        started = time.monotonic()
        call = worker.stub.Generate(request, timeout=timeout)
        kv, failure = None, "no kv_transfer in the prefill leg's reply"
        try:
            async for out in call:
                if out.HasField("kv_transfer"):
                    kv = out.kv_transfer
        except grpc.aio.AioRpcError as exc:
            client_left = context.time_remaining() is not None and context.time_remaining() <= 0
            if exc.code() == grpc.StatusCode.CANCELLED or client_left:
                raise _from_worker_error(exc, worker.state.worker_id) from exc
            failure = f"{exc.code().name}: {exc.details()}"
        finally:
            elapsed = time.monotonic() - started
            if kv is not None:
                ticket.first_token(elapsed)
            ticket.finish(elapsed, completed=kv is not None)
            call.cancel()
        if kv is None:
            log.warning("prefill on %s failed (%s); prefilling on the decode worker", worker.state.worker_id, failure)
            self.metrics.prefill_fallback()
        else:
            self.metrics.prefilled_remotely(elapsed)
        return kv


def _from_worker_error(exc: grpc.aio.AioRpcError, worker_id: str) -> RpcError:
    code = exc.code()
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return RpcError(code, exc.details() or code.name)
    # The worker failed or vanished mid-request: retryable for the client.
    return RpcError(grpc.StatusCode.UNAVAILABLE, f"worker {worker_id} failed: {code.name} {exc.details()}",
                    retry_after_s=1.0)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def _stream(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                      default_max_tokens: int | None = None
                      ) -> AsyncIterator[tuple[PreparedRequest, inference_pb2.GenerateResponse]]:
        prepared = self.router.prepare(request, default_max_tokens)
        async for response in self.router.run(prepared, context):
            yield prepared, response

    async def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            async for _, response in self._stream(request, context):
                yield response
        except RpcError as error:
            await abort(context, error)

    async def CreateChatCompletion(self, request: inference_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> inference_pb2.ChatCompletion:
        try:
            return await chat_completion(self._stream(from_chat(request), context))
        except RpcError as error:
            await abort(context, error)

    async def StreamChatCompletion(self, request: inference_pb2.ChatCompletionRequest,
                                   context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.ChatCompletionChunk]:
        try:
            async for chunk in chat_chunks(self._stream(from_chat(request), context)):
                yield chunk
        except RpcError as error:
            await abort(context, error)

    async def CreateCompletion(self, request: inference_pb2.CompletionRequest,
                               context: grpc.aio.ServicerContext) -> inference_pb2.Completion:
        try:
            return await completion(self._stream(from_completion(request), context, DEFAULT_COMPLETION_MAX_TOKENS))
        except RpcError as error:
            await abort(context, error)

    async def StreamCompletion(self, request: inference_pb2.CompletionRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.Completion]:
        try:
            stream = self._stream(from_completion(request), context, DEFAULT_COMPLETION_MAX_TOKENS)
            async for chunk in completion_chunks(stream):
                yield chunk
        except RpcError as error:
            await abort(context, error)

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        models = self.router.pool.models()
        started = {}
        for w in self.router.pool.workers.values():
            model = w.member.worker.model
            started[model] = min(started.get(model, w.member.started_at), w.member.started_at)
        return inference_pb2.ListModelsResponse(object="list", data=[
            inference_pb2.Model(id=name, object="model", created=started[name], owned_by="llm-mesh",
                                max_model_len=window)
            for name, window in sorted(models.items()) if name in self.router.tokenizers
        ])


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def ListWorkers(self, request: scheduler_pb2.ListWorkersRequest,
                          context: grpc.aio.ServicerContext) -> scheduler_pb2.ListWorkersResponse:
        return scheduler_pb2.ListWorkersResponse(workers=[
            scheduler_pb2.WorkerStatus(
                member=w.member, inflight=w.state.inflight, load=w.load,
                state=scheduler_pb2.WORKER_STATE_READY if w.state.routable else scheduler_pb2.WORKER_STATE_UNAVAILABLE,
            )
            for w in sorted(self.router.pool.workers.values(), key=lambda w: w.member.id)
        ])

    async def Explain(self, request: scheduler_pb2.ExplainRequest,
                      context: grpc.aio.ServicerContext) -> scheduler_pb2.ExplainResponse:
        try:
            prepared = self.router.prepare(request.request)
        except RpcError as error:
            await abort(context, error)
            return scheduler_pb2.ExplainResponse()
        pd = self.router.decide(prepared, dry_run=True)
        decision = pd.decode
        return scheduler_pb2.ExplainResponse(
            chosen_worker_id=decision.worker_id or "", prompt_tokens=len(prepared.prompt_token_ids),
            policy=decision.policy, scores=_scores(decision),
            disaggregation=scheduler_pb2.DisaggregationDecision(
                remote=pd.remote, prefill_worker_id=pd.prefill.worker_id if pd.prefill else "", rule=pd.rule,
                reason=pd.reason, uncached_tokens=pd.uncached_tokens),
            prefill_scores=_scores(pd.prefill) if pd.prefill is not None else [],
        )


def _scores(decision) -> list[scheduler_pb2.WorkerScore]:
    return [scheduler_pb2.WorkerScore(worker_id=s.worker_id, score=s.score, components=s.components,
                                      filtered_reason=s.filtered_reason) for s in decision.worker_scores()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.model_fetch import DEFAULT_MODEL_NAME

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--id", default=None, help="member id (default: scheduler-<port>-<random>)")
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="comma-separated etcd endpoints")
    parser.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S)
    parser.add_argument("--policy", default="ours", choices=POLICY_NAMES,
                        help="routing policy (ours: the TTFT cost model; the others reproduce peers' routers)")
    parser.add_argument("--profile", default=None,
                        help="a routing profile YAML (filters → scorers → picker); overrides --policy")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    parser.add_argument("--prefill-timeout", type=float, default=DEFAULT_PREFILL_TIMEOUT_S,
                        help="seconds a remote prefill may take before the decode worker prefills instead")
    parser.add_argument("--model", action="append", default=None, metavar="NAME=DIR",
                        help=f"a model to serve and its tokenizer directory (repeatable; default "
                             f"{DEFAULT_MODEL_NAME}=<the fetched model>)")


def parse_models(values: list[str] | None) -> dict[str, str]:
    from services.model_fetch import DEFAULT_MODEL_NAME, default_model_dir

    if not values:
        return {DEFAULT_MODEL_NAME: str(default_model_dir())}
    models = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model expects NAME=DIR, got {value!r}")
        models[name] = path
    return models


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(args))
    return 0


async def serve(args: argparse.Namespace) -> None:
    tokenizers = {name: ModelTokenizer(path) for name, path in parse_models(args.model).items()}
    endpoints = parse_endpoints(args.etcd)
    pool = WorkerPool(endpoints)
    policy = load_profile(args.profile) if args.profile else policy_by_name(args.policy)
    router = Router(pool, tokenizers, policy, prefill_timeout_s=args.prefill_timeout)
    if args.metrics_port is not None:
        router.metrics.serve(args.metrics_port, args.host)
    server, health, port = make_server(f"{args.host}:{args.port}", SERVICE_NAMES)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(router), server)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(router), server)
    stop = stop_event_on_signals()
    await router.start()
    await server.start()
    member = membership_pb2.Member(
        id=args.id or f"scheduler-{port}-{secrets.token_hex(3)}", kind=membership_pb2.MEMBER_KIND_SCHEDULER,
        address=f"{args.host}:{port}", started_at=int(time.time()), version=__version__,
    )
    try:
        async with Registration(endpoints, member, ttl=args.lease_ttl) as registration:
            await registration.registered.wait()
            await pool.directory.synced.wait()
            await set_serving(health, SERVICE_NAMES, True)
            log.info("scheduler %s serving at %s:%d (pid %d)", member.id, args.host, port, os.getpid())
            await stop.wait()
            await set_serving(health, SERVICE_NAMES, False)
        await server.stop(grace=5)
    finally:
        with contextlib.suppress(Exception):
            await server.stop(grace=None)
        await router.stop()
