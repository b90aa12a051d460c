"""`llm-mesh scheduler`: the public `Inference` API and the `Scheduler` admin API.

Per request: validate and tokenize once (services.requests), then services/router.py admits,
routes (the decode worker, then where to prefill), runs the prefill and decode legs and fails
over to another worker when one fails. The client's deadline becomes every worker call's
deadline; a client that goes away cancels the worker calls, which abort the engine requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, membership_pb2, sampling_pb2, scheduler_pb2, scheduler_pb2_grpc
from scheduler.admission import AdmissionConfig
from scheduler.framework import Role
from scheduler.planner import PlannerConfig
from scheduler.policies import POLICY_NAMES, policy_by_name
from scheduler.profile import ProfileError, load_profile
from scheduler.resilience import RetryPolicy
from services import __version__, auth, security, tls, tracing
from services.grpc_util import RpcError, abort, make_server, run_service, settle_heap, stop_event_on_signals
from services.membership import DEFAULT_TTL_S, Registration, etcd_settings, parse_endpoints
from services.metrics import watch_lease
from services.openai_format import chat_chunks, chat_completion, completion, completion_chunks
from services.planner_loop import DEFAULT_WINDOW_S as DEFAULT_PLANNER_WINDOW_S, PlannerLoop
from services.readiness import Readiness
from services.requests import DEFAULT_COMPLETION_MAX_TOKENS, PreparedRequest, from_chat, from_completion
from services.router import DEFAULT_PREFILL_TIMEOUT_S, Router
from services.tokenizer import ModelTokenizer
from services.worker_pool import DEFAULT_POLL_INTERVAL_S, WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
]


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def _stream(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                      default_max_tokens: int | None = None
                      ) -> AsyncIterator[tuple[PreparedRequest, inference_pb2.GenerateResponse]]:
        # Timed from before tokenization: TTFT as the client sees it (services/metrics.RequestClock).
        served = request.model if request.model in self.router.tokenizers else ""
        with self.router.stats.recording(request.model) as record, self.router.metrics.request(served) as clock:
            traced = tracing.RequestTrace(request)  # GenAI attributes on the Inference server span
            prepared = self.router.prepare(request, default_max_tokens)
            traced.prepared(prepared)
            logged_text: list[str] | None = [] if security.log_content() else None
            async for response in self.router.run(prepared, context, record):
                traced.response(response)
                if logged_text is not None:
                    logged_text.append(response.text)
                if response.token_ids:
                    clock.tokens()
                if response.HasField("usage"):
                    clock.finished_ok = response.finish_reason != sampling_pb2.FINISH_REASON_ABORT
                yield prepared, response
            if logged_text is not None:  # --log-content only (services/security.py)
                prompt = self.router.tokenizers[prepared.model].decode(prepared.prompt_token_ids)
                log.info("request %s content: prompt %r; completion %r", prepared.request_id, prompt,
                         "".join(logged_text))

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
    def __init__(self, router: Router, planner: PlannerLoop | None = None) -> None:
        self.router = router
        self.planner = planner

    async def GetScalingPlan(self, request: scheduler_pb2.GetScalingPlanRequest,
                             context: grpc.aio.ServicerContext) -> scheduler_pb2.ScalingPlan:
        return self.planner.to_proto() if self.planner is not None else scheduler_pb2.ScalingPlan()

    async def GetStats(self, request: scheduler_pb2.GetStatsRequest,
                       context: grpc.aio.ServicerContext) -> scheduler_pb2.SchedulerStats:
        return self.router.stats.to_proto(getattr(self.router.policy, "name", type(self.router.policy).__name__))

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
    rows = []
    for s in decision.worker_scores():
        row = scheduler_pb2.WorkerScore(worker_id=s.worker_id, score=s.score, components=s.components,
                                        filtered_reason=s.filtered_reason)
        if s.prefix_by_tier:  # eligible: its own blocks by tier, then the KV store's continuation
            engine, host, disk, store = s.prefix_by_tier
            row.prefix_blocks.CopyFrom(scheduler_pb2.PrefixBlocks(engine=engine, host=host, disk=disk, store=store))
        rows.append(row)
    return rows


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
    parser.add_argument("--planner-window", type=float, default=DEFAULT_PLANNER_WINDOW_S,
                        help="seconds of load per scaling-plan decision (scheduler/PLANNER.md)")
    parser.add_argument("--load-poll-interval", type=float, default=DEFAULT_POLL_INTERVAL_S,
                        help="seconds between polls of each worker's load (GetLoad: waiting, running, KV usage)")
    parser.add_argument("--prefill-timeout", type=float, default=DEFAULT_PREFILL_TIMEOUT_S,
                        help="seconds a remote prefill may take before the decode worker prefills instead")
    parser.add_argument("--max-attempts", type=int, default=RetryPolicy.max_attempts,
                        help="workers a request may try when one fails (failover before the first token, "
                             "migration after it); 1 = no failover")
    parser.add_argument("--admission-queue-factor", type=float, default=AdmissionConfig.queue_factor,
                        help="requests admitted per worker beyond a full batch, as a fraction of max_num_seqs; "
                             "beyond that: RESOURCE_EXHAUSTED / HTTP 429 with a retry hint")
    parser.add_argument("--no-admission", action="store_true", help="admit every request (no 429s)")
    parser.add_argument("--no-worker-stream", action="store_true",
                        help="one Worker.Generate call per request instead of one GenerateStream per worker")
    parser.add_argument("--model", action="append", default=None, metavar="NAME=DIR",
                        help=f"a model to serve and its tokenizer directory (repeatable; default "
                             f"{DEFAULT_MODEL_NAME}=<the fetched model>)")
    security.add_arguments(parser, api_keys=True)


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
    security.configure(args)
    tracing.setup_tracing("llm-mesh-scheduler")
    try:
        run_service(serve(args))
    finally:
        tracing.shutdown_tracing()  # after SIGTERM too: serve returns once drained
    return 0


def ready_to_route(pool: WorkerPool) -> bool:
    """Readiness of a scheduler beyond its own lease: the worker view is synced from etcd and
    holds a routable worker that takes whole requests (not prefill-only). With none, every
    request would fail UNAVAILABLE: the replica is not ready (and is again once one joins)."""
    return pool.directory.synced.is_set() and any(
        w.state.routable and w.state.role != Role.PREFILL for w in list(pool.workers.values()))


async def serve(args: argparse.Namespace) -> None:
    tokenizers = {name: ModelTokenizer(path) for name, path in parse_models(args.model).items()}
    endpoints = parse_endpoints(args.etcd)
    tls_files, etcd = tls.from_args(args), etcd_settings(args)
    if not (0 < args.load_poll_interval < math.inf):
        raise SystemExit(f"--load-poll-interval must be > 0 seconds, got {args.load_poll_interval}")
    pool = WorkerPool(endpoints, args.load_poll_interval, etcd=etcd, tls=tls_files,
                      use_stream=not args.no_worker_stream)
    try:
        policy = load_profile(args.profile) if args.profile else policy_by_name(args.policy)
    except ProfileError as exc:
        raise SystemExit(f"--profile: {exc}") from None
    router = Router(pool, tokenizers, policy, prefill_timeout_s=args.prefill_timeout,
                    retry=RetryPolicy(max_attempts=args.max_attempts),
                    admission=AdmissionConfig(queue_factor=args.admission_queue_factor, enabled=not args.no_admission))
    if args.metrics_port is not None:
        router.metrics.serve(args.metrics_port, args.host)
    api_keys = auth.from_args(args)
    interceptors = [auth.ApiKeyInterceptor(api_keys, SERVICE_NAMES)] if api_keys else []
    server, health, port = make_server(f"{args.host}:{args.port}", SERVICE_NAMES, tls=tls_files,
                                       interceptors=interceptors)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(router), server)
    planner = PlannerLoop(router.stats, pool, getattr(policy, "planner", None) or PlannerConfig(),
                          router.metrics.registry, args.planner_window)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(SchedulerServicer(router, planner), server)
    stop = stop_event_on_signals()
    readiness = Readiness(health, SERVICE_NAMES)
    await readiness.start()
    await router.start()
    await server.start()
    member = membership_pb2.Member(
        id=args.id or f"scheduler-{port}-{secrets.token_hex(3)}", kind=membership_pb2.MEMBER_KIND_SCHEDULER,
        address=f"{args.host}:{port}", started_at=int(time.time()), version=__version__,
    )
    router.stats.scheduler_id = member.id
    planner.start()
    settle_heap()
    try:
        async with Registration(endpoints, member, ttl=args.lease_ttl, etcd=etcd) as registration:
            watch_lease(router.metrics.registry, registration)
            readiness.ready_when(lambda: registration.ever_registered and ready_to_route(pool))
            # No wait for the lease here: SIGTERM must work even while etcd is unreachable.
            log.info("scheduler %s at %s:%d (pid %d), policy %s; ready once registered with a routable worker",
                     member.id, args.host, port, os.getpid(), policy.name)
            await stop.wait()
            await readiness.drain()
        await server.stop(grace=5)
    finally:
        await readiness.close()
        with contextlib.suppress(Exception):
            await server.stop(grace=None)
        await planner.stop()
        await router.stop()
