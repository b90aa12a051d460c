"""`llm-mesh worker`: one inference engine behind the internal `Worker` gRPC API.

Lifecycle: bind the port (health "liveness" SERVING, readiness — "" and
llm_mesh.v1.Worker — NOT_SERVING) → load the engine → register in etcd →
SERVING while the lease lives (services/readiness.py) → on SIGTERM/SIGINT: NOT_SERVING, revoke the lease
(schedulers stop routing here at once), end the KV event streams, let in-flight
calls finish for `--drain-seconds`, stop the engine.

KV events: the engine's cache changes go to a `KVEventLog` (services/
kv_event_log.py) from the moment the engine starts; `WatchKVEvents` serves it
to every scheduler replica (replay from a seq, or a snapshot, then deltas).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from llm_mesh.v1 import membership_pb2, sampling_pb2, worker_pb2, worker_pb2_grpc
from services import __version__, security, tls, worker_stream
from services.engines.base import Engine, EngineInfo, EngineRequest, KVTransferParams, SamplingOptions
from services.grpc_util import RpcError, abort, invalid, make_server, run_service, settle_heap, stop_event_on_signals
from services.kv_event_log import DEFAULT_CAPACITY, DEFAULT_HEARTBEAT_S, DEFAULT_SEND_INTERVAL_S, KVEventLog
from services.readiness import Readiness
from services.requests import check_sampling, show
from services.worker_metrics import WorkerMetrics
from services.membership import DEFAULT_TTL_S, Registration, etcd_settings, nixl_metadata_key, parse_endpoints
from services.tracing import GenerateTrace, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
_FINISH = {
    "stop": sampling_pb2.FINISH_REASON_STOP,
    "length": sampling_pb2.FINISH_REASON_LENGTH,
    "abort": sampling_pb2.FINISH_REASON_ABORT,
}
ROLES = {
    "prefill": membership_pb2.WORKER_ROLE_PREFILL,
    "decode": membership_pb2.WORKER_ROLE_DECODE,
    "both": membership_pb2.WORKER_ROLE_BOTH,
}


def kv_params_from_proto(p: worker_pb2.KVTransferParams) -> KVTransferParams:
    return KVTransferParams(engine_id=p.engine_id, block_ids=tuple(p.block_ids), host=p.host, port=p.port,
                            request_id=p.request_id, tp_size=p.tp_size or 1, num_tokens=p.num_tokens)


def kv_params_to_proto(p: KVTransferParams) -> worker_pb2.KVTransferParams:
    """A prefill leg's KV location as it travels: ids only. Where the engine's side channel is
    (host, port, tp_size) is in this worker's registered kv_endpoint; the scheduler adds it."""
    return worker_pb2.KVTransferParams(engine_id=p.engine_id, block_ids=p.block_ids, request_id=p.request_id,
                                       num_tokens=p.num_tokens)


def sampling_options(params: sampling_pb2.SamplingParams) -> SamplingOptions:
    """Proto → engine options. The scheduler has validated ranges and set max_tokens."""
    return SamplingOptions(
        max_tokens=params.max_tokens,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Runs requests on the engine, keeps lifetime counters for GetLoad, and
    serves the engine's KV events (it installs the log as the engine's sink)."""

    def __init__(self, engine: Engine, kv_log: KVEventLog | None = None,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S, role: str = "both") -> None:
        self.engine = engine
        self.role = role  # a key of ROLES: which P/D legs this worker takes
        self.info: EngineInfo | None = None  # set once the engine is loaded
        self.counters = worker_pb2.WorkerLoad()
        self.kv_log = kv_log if kv_log is not None else KVEventLog()
        self.heartbeat_s = heartbeat_s
        self.draining = asyncio.Event()  # set when the worker leaves: GenerateStreams end once idle
        engine.set_kv_event_sink(self.kv_log.append)

    async def Generate(
        self, request: worker_pb2.WorkerGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        try:
            async for response in self._generate(request):
                yield response
        except RpcError as error:
            await abort(context, error)

    async def GenerateStream(
        self, request_iterator: AsyncIterator[worker_pb2.GenerateStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateStreamResponse]:
        async for batch in worker_stream.serve(request_iterator, self._generate, self.draining):
            yield batch

    async def _generate(self, request: worker_pb2.WorkerGenerateRequest
                        ) -> AsyncIterator[worker_pb2.WorkerGenerateResponse]:
        """One request, as both Generate and GenerateStream run it; a failure raises RpcError.
        Closing the generator early (cancel, deadline) aborts the engine request."""
        engine_request = self._validate(request)
        self.counters.prompt_tokens += len(engine_request.prompt_token_ids)
        traced = GenerateTrace(engine_request, self.info.model, self.role)
        outputs = self.engine.generate(engine_request)
        finish = None
        try:
            async for out in outputs:
                traced.output(out)
                response = worker_pb2.WorkerGenerateResponse(token_ids=out.token_ids, text=out.text)
                if out.finish_reason is not None:
                    finish = out.finish_reason
                    response.finish_reason = _FINISH[finish]
                    response.usage.prompt_tokens = out.prompt_tokens
                    response.usage.completion_tokens = out.completion_tokens
                    response.usage.total_tokens = out.prompt_tokens + out.completion_tokens
                    response.usage.cached_prompt_tokens = out.cached_prompt_tokens
                    self.counters.cached_prompt_tokens += out.cached_prompt_tokens
                    self.counters.kv_transferred_prompt_tokens += out.transferred_prompt_tokens
                    if out.kv_transfer is not None:
                        response.kv_transfer.CopyFrom(kv_params_to_proto(out.kv_transfer))
                yield response
        except ValueError as exc:  # the engine rejected the input (e.g. token id out of vocabulary)
            traced.fail(exc)
            raise invalid(str(exc), "prompt_token_ids") from exc
        finally:
            traced.close()
            # Closing the engine's generator aborts the engine request when the
            # caller went away (cancel, deadline) before it finished.
            await outputs.aclose()
            self.counters.requests_finished += 1
            if finish in (None, "abort"):
                self.counters.requests_aborted += 1

    def _validate(self, request: worker_pb2.WorkerGenerateRequest) -> EngineRequest:
        if self.info is None:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "engine is still loading")
        if not request.request_id:
            raise invalid("request_id is required", "request_id")
        if request.model and request.model != self.info.model:
            raise RpcError(grpc.StatusCode.NOT_FOUND,
                           f"this worker serves {self.info.model!r}, not {show(request.model)}", field="model")
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise invalid("prompt_token_ids must not be empty", "prompt_token_ids")
        max_tokens = request.sampling.max_tokens
        if max_tokens < 1:
            raise invalid("sampling.max_tokens must be at least 1", "sampling.max_tokens")
        check_sampling(request.sampling, "sampling.")  # as the scheduler does: NaN never reaches an engine
        if len(prompt) + max_tokens > self.info.max_model_len:
            raise invalid(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context window "
                f"({self.info.max_model_len} tokens)", "prompt_token_ids")
        remote_prefill = None
        if request.remote_decode:
            if self.role != "prefill":
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"remote_decode needs a prefill worker; this one is {self.role}", field="remote_decode")
            if max_tokens != 1:
                raise invalid("a prefill leg (remote_decode) generates exactly 1 token: max_tokens must be 1",
                              "sampling.max_tokens")
        if request.HasField("remote_prefill"):
            if self.role != "decode":
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"remote_prefill needs a decode worker; this one is {self.role}", field="remote_prefill")
            if request.remote_decode:
                raise invalid("remote_decode and remote_prefill exclude each other", "remote_prefill")
            p = request.remote_prefill
            if not p.engine_id:
                raise invalid("remote_prefill.engine_id is required", "remote_prefill.engine_id")
            # An engine with a side channel of its own (vLLM NIXL) pulls through the prefiller's.
            own = self.info.kv_endpoint if self.info is not None else None
            if own is not None and own.host and not (p.host and p.port):
                raise invalid("remote_prefill.host and .port (the prefill engine's side channel) are required",
                              "remote_prefill.host")
            if p.num_tokens > len(prompt):
                raise invalid(f"remote_prefill holds {p.num_tokens} tokens, more than the prompt's {len(prompt)}",
                              "remote_prefill.num_tokens")
            remote_prefill = kv_params_from_proto(p)
        return EngineRequest(request.request_id, prompt, sampling_options(request.sampling),
                             remote_decode=request.remote_decode, remote_prefill=remote_prefill)

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(aborted=await self.engine.abort(request.request_id))

    async def WatchKVEvents(self, request: worker_pb2.WatchKVEventsRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.KVEventBatch]:
        async for batch in self.kv_log.watch(request, self.heartbeat_s):
            yield batch

    async def GetLoad(self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> worker_pb2.WorkerLoad:
        load = worker_pb2.WorkerLoad()
        load.CopyFrom(self.counters)
        now = self.engine.load()
        load.running, load.waiting, load.kv_cache_usage = now.running, now.waiting, now.kv_cache_usage
        load.generated_tokens = now.generated_tokens
        if now.cached_prompt_tokens is not None:
            load.cached_prompt_tokens = now.cached_prompt_tokens
        if now.kv_transferred_prompt_tokens is not None:
            load.kv_transferred_prompt_tokens = now.kv_transferred_prompt_tokens
        if self.info is not None:
            load.kv_blocks_total = self.info.kv_blocks_total
        return load


def publish_kv_endpoint(member: membership_pb2.Member, info: EngineInfo) -> tuple[str, bytes] | None:
    """Put the engine's KV endpoint in `member`; returns the (key, value) of its NIXL agent
    metadata to keep under the same lease, if the engine has any."""
    if info.kv_endpoint is None:
        return None
    e = info.kv_endpoint
    member.worker.kv_endpoint.CopyFrom(membership_pb2.KVEndpoint(engine_id=e.engine_id, host=e.host, port=e.port,
                                                                 tp_size=e.tp_size))
    if info.nixl_metadata is None:
        return None
    n = info.nixl_metadata
    member.worker.nixl_metadata_key = key = nixl_metadata_key(member.id)
    value = membership_pb2.NixlAgentMetadata(
        engine_id=n.engine_id, connector_version=n.connector_version, compatibility_hash=n.compatibility_hash,
        handshake_payload=n.handshake_payload, agent_metadata_bytes=n.agent_metadata_bytes, num_blocks=n.num_blocks)
    return key, json_format.MessageToJson(value, indent=None).encode()


def build_engine(args: argparse.Namespace) -> Engine:
    if args.engine == "vllm":
        from services.engines.vllm_engine import VllmEngine, VllmSettings

        return VllmEngine(VllmSettings(
            model_dir=str(args.model_dir), model_name=args.model, max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs, block_size=args.block_size, kv_cache_gib=args.kv_cache_gib,
            dtype=args.dtype, cpu_cores=args.cpu_cores, role=args.role, kv_side_channel_host=args.host,
            # Every P/D engine on a host needs its own NIXL side-channel port.
            kv_side_channel_port=args.kv_side_channel_port or args.port + 1000,
            kv_lease_s=args.kv_lease_s, kv_blocks=args.kv_blocks,
            kv_offload=args.kv_offload, kvstore_address=args.kvstore or "", kvstore_etcd=args.etcd,
            kvstore_transport=args.kvstore_transport, lmcache_url=args.lmcache_url,
            # The store is a mesh process: the engine dials it, and reads its etcd record, as the worker does.
            kvstore_tls=tls.from_args(args), kvstore_etcd_settings=etcd_settings(args),
        ))
    from services.engines.sim_engine import build_sim_engine

    return build_sim_engine(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from services.engines.sim_engine import add_sim_arguments
    from services.model_fetch import DEFAULT_MODEL_NAME, default_model_dir

    parser.add_argument("--role", choices=sorted(ROLES), default="both")
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name served (as clients pass it)")
    parser.add_argument("--model-dir", default=None, help="HF model directory (default: the fetched model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--id", default=None, help="member id (default: worker-<port>-<random>)")
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="comma-separated etcd endpoints")
    parser.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S, help="etcd lease TTL, seconds")
    parser.add_argument("--drain-seconds", type=float, default=5.0, help="grace for in-flight calls on shutdown")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics on this port (vLLM's vllm:* names, whatever the engine)")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=32, help="tokens per KV block (vLLM on CPU: a multiple of 32)")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM CPU KV cache size")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="vLLM: weights and KV dtype (auto: float32 on a CPU, where bf16 kernels change "
                             "this model's greedy answers; the model's own elsewhere)")
    parser.add_argument("--cpu-cores", default="auto",
                        help="vLLM OMP core binding (VLLM_CPU_OMP_THREADS_BIND), e.g. 0 or 1 or 0-1")
    parser.add_argument("--kv-side-channel-port", type=int, default=None,
                        help="vLLM P/D: port of this engine's NIXL side channel (default: --port + 1000)")
    parser.add_argument("--kv-lease-s", type=int, default=30,
                        help="vLLM prefill: seconds prefilled KV waits for a decode worker that never pulls it "
                             "(a waiting decoder's heartbeats extend it); bounds what a failed decode leg holds")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="vLLM: cap the engine's KV cache at this many blocks (default: what --kv-cache-gib holds)")
    parser.add_argument("--kv-offload", choices=["none", "store", "lmcache"], default="none",
                        help="vLLM: offload KV blocks to the llm-mesh KV store (store) or LMCache (lmcache), and "
                             "load prefix blocks the engine misses from there")
    parser.add_argument("--kvstore", default=None,
                        help="KV store address host:port for --kv-offload store (default: a store registered in etcd)")
    parser.add_argument("--kvstore-transport", choices=["auto", "nixl", "grpc"], default="auto",
                        help="KV store data path: NIXL when the store serves it (auto), NIXL only, or gRPC bytes")
    parser.add_argument("--lmcache-url", default="tcp://127.0.0.1:5555",
                        help="--kv-offload lmcache: the `lmcache server`'s ZMQ endpoint tcp://HOST:PORT "
                             "(`llm-mesh up` starts one and passes it)")
    parser.add_argument("--kv-events-buffer", type=int, default=DEFAULT_CAPACITY,
                        help="KV events kept for replay; a scheduler further behind gets a snapshot")
    parser.add_argument("--kv-events-token-ids", action="store_true",
                        help="keep stored blocks' token ids for subscribers that ask (memory: the replay "
                             "buffer then holds every prompt token)")
    parser.add_argument("--kv-events-heartbeat", type=float, default=DEFAULT_HEARTBEAT_S,
                        help="seconds between heartbeats on an idle KV event stream")
    parser.add_argument("--kv-events-interval", type=float, default=DEFAULT_SEND_INTERVAL_S,
                        help="at most one KV event message per subscriber per this many seconds while events keep "
                             "coming (0: one per engine batch of events)")
    add_sim_arguments(parser)
    security.add_arguments(parser, api_keys=False)  # only the scheduler calls a worker: TLS/mTLS guards it
    parser.set_defaults(model_dir_default=default_model_dir)


def run(args: argparse.Namespace) -> int:
    if args.model_dir is None:
        args.model_dir = str(args.model_dir_default())
    security.configure(args)
    setup_tracing("llm-mesh-worker")
    try:
        run_service(serve(args))
    finally:
        shutdown_tracing()  # after SIGTERM too: serve returns once drained
    return 0


async def discover_kvstore(args: argparse.Namespace, wait_s: float = 60.0) -> str:
    """The address of a KV store registered in etcd (the lowest member id: every worker of a
    mesh picks the same one, so they share blocks), waiting up to `wait_s` for one to appear."""
    from services.kvstore_client import alist_stores

    deadline = time.monotonic() + wait_s
    while True:
        try:
            stores = await alist_stores(args.etcd, etcd_settings(args))
        except Exception as exc:  # noqa: BLE001 - etcd not up yet: retried until the deadline
            log.warning("listing KV stores in etcd failed: %s", exc)
            stores = {}
        if stores:
            return stores[min(stores)].address
        if time.monotonic() > deadline:
            raise SystemExit(f"--kv-offload store: no --kvstore given and no KV store registered in etcd "
                             f"{args.etcd} after {wait_s:.0f}s")
        await asyncio.sleep(1.0)


# Numeric flags and their lower bounds: (flag, minimum, the minimum itself allowed). Checked at startup
# so a bad value ends the worker with a message instead of a traceback (or, for the sim latencies,
# instead of a worker that runs with a negative clock).
_BOUNDS = (("lease_ttl", 1, True), ("drain_seconds", 0.0, True), ("max_model_len", 1, True),
           ("max_num_seqs", 1, True), ("block_size", 1, True), ("kv_cache_gib", 1, True),
           ("kv_lease_s", 1, True), ("kv_blocks", 1, True),
           ("kv_events_buffer", 1, True), ("kv_events_heartbeat", 0.0, False), ("kv_events_interval", 0.0, True),
           ("sim_prefill_per_token", 0.0, True), ("sim_step_overhead", 0.0, True), ("sim_itl", 0.0, True),
           ("sim_batch_slowdown", 0.0, True), ("sim_num_blocks", 1, True), ("sim_max_prefill_tokens", 1, True),
           ("sim_eos_probability", 0.0, True))


def check_args(args: argparse.Namespace) -> None:
    """SystemExit naming the first numeric flag out of its range (None: not given, its default)."""
    for name, low, inclusive in _BOUNDS:
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise SystemExit(f"{flag} must be {'>=' if inclusive else '>'} {low}, got {value}")
    if getattr(args, "sim_eos_probability", 0.0) > 1:
        raise SystemExit(f"--sim-eos-probability must be <= 1, got {args.sim_eos_probability}")


async def serve(args: argparse.Namespace) -> None:
    check_args(args)
    if args.engine != "vllm" and args.kv_offload != "none":
        # The sim engine's store lives in the simulator (`bench routing --kvstore-blocks`).
        raise SystemExit(f"--kv-offload {args.kv_offload} is for the vllm engine, not {args.engine}")
    if args.engine == "vllm" and args.kv_offload == "store" and not args.kvstore:
        args.kvstore = await discover_kvstore(args)
        log.info("KV offload to the store at %s (from etcd)", args.kvstore)
    engine = build_engine(args)
    kv_log = KVEventLog(args.kv_events_buffer, keep_token_ids=args.kv_events_token_ids,
                        send_interval_s=args.kv_events_interval)
    metrics = WorkerMetrics(kv_log) if args.metrics_port is not None else None
    if metrics is not None and args.engine != "vllm":  # vLLM registers its own vllm:* metrics
        engine = metrics.vllm_compatible(engine)
    servicer = WorkerServicer(engine, kv_log, args.kv_events_heartbeat, role=args.role)
    server, health, port = make_server(f"{args.host}:{args.port}", [SERVICE_NAME], tls=tls.from_args(args))
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    readiness = Readiness(health, [SERVICE_NAME])
    await readiness.start()  # "liveness" now; ready once the engine is loaded and the lease held
    await server.start()
    if metrics is not None:
        metrics.serve(args.metrics_port, args.host)
    stop = stop_event_on_signals()
    member_id = args.id or f"worker-{port}-{secrets.token_hex(3)}"
    log.info("worker %s loading %s engine", member_id, args.engine)
    try:
        servicer.info = info = await engine.start()
        servicer.kv_log.block_size = info.block_size
        settle_heap()
        member = membership_pb2.Member(
            id=member_id, kind=membership_pb2.MEMBER_KIND_WORKER, address=f"{args.host}:{port}",
            started_at=int(time.time()), version=__version__,
            worker=membership_pb2.WorkerInfo(
                role=ROLES[args.role], model=info.model, engine=args.engine, max_model_len=info.max_model_len,
                block_size=info.block_size, kv_blocks_total=info.kv_blocks_total, max_num_seqs=info.max_num_seqs,
            ),
        )
        kv_attachment = publish_kv_endpoint(member, info) if args.role != "both" else None
        async with Registration(parse_endpoints(args.etcd), member, ttl=args.lease_ttl,
                                etcd=etcd_settings(args)) as registration:
            if kv_attachment is not None:
                registration.attach(*kv_attachment)
            if metrics is not None:
                metrics.watch_lease(registration)
            readiness.ready_when(lambda: registration.ever_registered)
            # No wait for the lease here: SIGTERM must work even while etcd is unreachable.
            log.info("worker %s serving %s at %s:%d (pid %d); ready once registered", member_id, info.model,
                     args.host, port, os.getpid())
            await stop.wait()
            await readiness.drain()
        log.info("worker %s left the mesh; draining", member_id)
        # Event streams and GenerateStreams never end by themselves: they must not hold up the drain.
        servicer.kv_log.close()
        servicer.draining.set()
        await server.stop(grace=args.drain_seconds)
    finally:
        await readiness.close()
        servicer.kv_log.close()
        await server.stop(grace=None)
        await engine.stop()
