"""`llm-mesh scheduler`: the public `Inference` API and the `Scheduler` admin API.

Per request: validate and tokenize once (services.requests), pick a worker
(scheduler.routing), stream Worker.Generate back. The client's deadline becomes
the worker call's deadline; a client that goes away cancels the worker call,
which aborts the engine request.
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
from scheduler.routing import LeastLoaded
from services import __version__
from services.grpc_util import RpcError, abort, make_server, set_serving, stop_event_on_signals
from services.membership import DEFAULT_TTL_S, Registration, parse_endpoints
from services.openai_format import chat_chunks, chat_completion, completion, completion_chunks
from services.requests import PreparedRequest, from_chat, from_completion, prepare, DEFAULT_COMPLETION_MAX_TOKENS
from services.tokenizer import ModelTokenizer
from services.worker_pool import WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
]


class Router:
    """Holds the tokenizers, the worker pool and the routing policy; runs requests."""

    def __init__(self, pool: WorkerPool, tokenizers: dict[str, ModelTokenizer]) -> None:
        self.pool = pool
        self.tokenizers = tokenizers
        self.policy = LeastLoaded()

    def prepare(self, request: inference_pb2.GenerateRequest, default_max_tokens: int | None = None) -> PreparedRequest:
        return prepare(request, self.pool.models(), self.tokenizers, default_max_tokens)

    async def run(self, prepared: PreparedRequest, context: grpc.aio.ServicerContext
                  ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        chosen = self.policy.pick(self.pool.states(), prepared.model)
        if chosen is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"no live worker serves {prepared.model!r}", retry_after_s=1.0)
        worker = self.pool.workers[chosen.worker_id]
        worker_request = worker_pb2.WorkerGenerateRequest(
            request_id=f"{prepared.request_id}-{secrets.token_hex(4)}",
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            model=prepared.model,
        )
        call = worker.stub.Generate(worker_request, timeout=context.time_remaining())
        chosen.inflight += 1
        first = True
        try:
            async for out in call:
                response = inference_pb2.GenerateResponse(
                    request_id=prepared.request_id, token_ids=out.token_ids, text=out.text,
                    finish_reason=out.finish_reason,
                )
                if out.HasField("usage"):
                    response.usage.CopyFrom(out.usage)
                if first:
                    response.worker_id = chosen.worker_id
                    first = False
                yield response
        except grpc.aio.AioRpcError as exc:
            raise _from_worker_error(exc, chosen.worker_id) from exc
        finally:
            chosen.inflight -= 1
            call.cancel()  # no-op when finished; aborts the engine request when we are cancelled


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
        states = self.router.pool.states()
        scores = self.router.policy.score(states, prepared.model)
        eligible = [s for s in scores if not s.filtered_reason]
        chosen = max(eligible, key=lambda s: s.score).worker_id if eligible else ""
        return scheduler_pb2.ExplainResponse(
            chosen_worker_id=chosen, prompt_tokens=len(prepared.prompt_token_ids), policy=self.router.policy.name,
            scores=[scheduler_pb2.WorkerScore(worker_id=s.worker_id, score=s.score, components=s.components,
                                              filtered_reason=s.filtered_reason) for s in scores],
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.model_fetch import DEFAULT_MODEL_NAME

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--id", default=None, help="member id (default: scheduler-<port>-<random>)")
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="comma-separated etcd endpoints")
    parser.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S)
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
    router = Router(pool, tokenizers)
    server, health, port = make_server(f"{args.host}:{args.port}", SERVICE_NAMES)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(router), server)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(router), server)
    stop = stop_event_on_signals()
    await pool.start()
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
        await pool.stop()
