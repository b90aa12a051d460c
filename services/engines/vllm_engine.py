"""vLLM in-process (AsyncLLM) behind the Engine interface.

CPU defaults that work on a small machine (see DESIGN.md): eager mode (23 s
start instead of 74 s), a bounded KV cache (`VLLM_CPU_KVCACHE_SPACE`), and an
explicit OMP core binding so two engines on one host don't thrash.

Prefix caching is on with `sha256_cbor` hashing and vLLM's fixed default seed,
so block hashes are process-independent and the scheduler can compute the same
hashes from token ids (scheduler/block_hash.py).

KV events: vLLM's engine core publishes them over ZMQ (PUB bound on an ipc://
socket in a private temp dir, plus its replay ROUTER); `ZmqKVEvents`
subscribes in this process, decodes frames `[topic, seq u64 BE, msgpack
[ts, [events], dp_rank]]`, fills sequence gaps from the replay socket and
hands the events, in order, to the worker's sink. A gap the replay buffer can
no longer fill is reported as AllBlocksCleared: the schedulers then forget
this worker's blocks (a missed hit) rather than keep blocks it may have
evicted (a wrong route).

Prefill/decode (`VllmSettings.role`): a prefill engine runs vLLM's
NixlConnector as `kv_producer`, a decode engine as `kv_consumer` (pull mode:
the decoder READs the prefiller's blocks over NIXL, then notifies it so it
frees them); role "both" has no connector. The prefill leg
(`EngineRequest.remote_decode`) runs with `do_remote_decode` and max_tokens 1;
vLLM keeps its blocks for `kv_lease_s` and its finished output carries the
`kv_transfer_params` that `from_vllm_kv_params` turns into a typed
`KVTransferParams`. The decode leg (`EngineRequest.remote_prefill`) passes
them back with `to_vllm_kv_params`; vLLM pulls only the blocks it does not
already hold in its own prefix cache, recomputes the last prompt token, and
reports every pulled or locally cached prompt token in `num_cached_tokens`
(so `EngineOutput.cached_prompt_tokens` = prompt tokens it did not compute).
Where each prompt token came from (computed / local cache / KV transfer) and
the NIXL transfer stats are kept per engine: `VllmEngine.pd_stats()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import msgspec
import zmq
import zmq.asyncio
from vllm import SamplingParams
from vllm.config.kv_events import KVEventsConfig
from vllm.config.kv_transfer import KVTransferConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from scheduler.block_hash import external_block_hash
from services.engines.base import (AllBlocksCleared, BlockRemoved, BlockStored, Engine, EngineInfo, EngineLoad,
                                   EngineOutput, EngineRequest, KVEndpoint, KVEvent, KVEventSink,
                                   KVTransferParams)
from services.engines.cpu_affinity import deprioritize_idle_spinners, parse_cpu_list, restore_engine_cores
from services.engines.nixl_handshake import fetch_nixl_metadata
from services.membership import EtcdSettings
from services.tls import TlsFiles

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode", "both"]
ROLES: tuple[Role, ...] = ("prefill", "decode", "both")


@dataclasses.dataclass(frozen=True)
class VllmSettings:
    model_dir: str
    model_name: str
    max_model_len: int = 4096
    max_num_seqs: int = 32
    # vLLM's CPU attention backend needs a multiple of 32.
    block_size: int = 32
    kv_cache_gib: int = 2
    # Cap on the engine's KV blocks (vLLM's num_gpu_blocks_override); None: what kv_cache_gib holds.
    kv_blocks: int | None = None
    # VLLM_CPU_OMP_THREADS_BIND: "auto", "all", "nobind" or a core list like "0-1" / "1".
    cpu_cores: str = "auto"
    seed: int = 0
    enforce_eager: bool = True
    # vLLM's dtype. "auto": float32 on a CPU, the model's own (bf16) elsewhere. Measured: on a
    # CPU with AMX (this machine's Sapphire Rapids class), vLLM's bf16 kernels turn SmolLM2's
    # greedy "The capital of France is Paris." into "L'Étoile, la Marseillaise, ..." and make
    # P/D and aggregated outputs differ; float32 holds the dequantized weights exactly.
    dtype: str = "auto"
    # Publish KV events (to the worker's sink) through vLLM's ZMQ publisher.
    kv_events: bool = True
    # P/D: "prefill" (NIXL kv_producer), "decode" (kv_consumer) or "both" (no connector).
    role: Role = "both"
    # vLLM's NIXL side channel (VLLM_NIXL_SIDE_CHANNEL_HOST/PORT): a ZMQ socket where this
    # engine serves its NIXL agent metadata; the decoder fetches the prefiller's once per
    # pair (the "handshake"), then only block ids travel. Every prefill/decode engine on a
    # host needs its own port: the worker's --kv-side-channel-port (default: its gRPC port
    # + 1000). The host is also what a prefill engine advertises in its KV transfer params.
    kv_side_channel_host: str = "127.0.0.1"
    kv_side_channel_port: int = 5600
    # NIXL engine id (None: vLLM draws a uuid at start; read it from `kv_engine_id`).
    kv_engine_id: str | None = None
    # Where the connector stages KV: "cpu" here; on a GPU host, "cuda" moves GPU memory directly.
    kv_buffer_device: str = "cpu"
    # Prefill: seconds vLLM holds prefilled blocks for a decoder that has not pulled them
    # (its kv_lease_duration; a waiting decoder's heartbeats extend it).
    kv_lease_s: int = 30
    # Decode: a failed pull recomputes the prompt locally ("recompute") or fails the request.
    kv_load_failure_policy: Literal["recompute", "fail"] = "recompute"
    # KV offload (services/engines/kv_offload.py): "store" writes computed blocks through to
    # the llm-mesh KV store at `kvstore_address` and loads prefix blocks this engine misses from
    # it (vLLM's OffloadingConnector with our spec); "lmcache" is services/engines/lmcache_backend.py.
    kv_offload: Literal["none", "store", "lmcache"] = "none"
    kvstore_address: str = ""
    # Where the store's NIXL record is (comma-separated etcd endpoints; "" = gRPC bytes only),
    # and the data path: "auto" (NIXL if the store serves it), "nixl" or "grpc".
    kvstore_etcd: str = ""
    kvstore_transport: str = "auto"
    # How the engine's store clients dial the store (the worker's --tls-* files; None: plaintext)
    # and reach etcd for the store's NIXL record (its --etcd-* settings). File paths only.
    kvstore_tls: TlsFiles | None = None
    kvstore_etcd_settings: EtcdSettings | None = None
    # kv_offload "lmcache": the `lmcache server`'s ZMQ endpoint (services/engines/lmcache_backend.py).
    lmcache_url: str = "tcp://127.0.0.1:5555"


def engine_dtype(dtype: str) -> str:
    """The dtype vLLM runs with: `dtype` itself unless "auto", which means float32 on a CPU
    (see VllmSettings.dtype) and vLLM's own choice elsewhere."""
    if dtype != "auto":
        return dtype
    from vllm.platforms import current_platform

    return "float32" if current_platform.is_cpu() else "auto"


class VllmEngine(Engine):
    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self._engine: AsyncLLM | None = None
        self._stats = _LatestStats()
        self._running: set[str] = set()
        self._kv_events: ZmqKVEvents | None = None
        # The NIXL engine id vLLM runs with (prefill/decode roles), once started.
        self.kv_engine_id: str | None = settings.kv_engine_id

    async def start(self) -> EngineInfo:
        s = self.settings
        # vLLM reads these when the engine core process starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = s.cpu_cores
        if s.role != "both":
            os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = s.kv_side_channel_host
            os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(s.kv_side_channel_port)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # Block hashes must not depend on the process: use vLLM's fixed default seed.
        os.environ.pop("PYTHONHASHSEED", None)

        args = AsyncEngineArgs(
            model=s.model_dir,
            served_model_name=[s.model_name],
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            block_size=s.block_size,
            enforce_eager=s.enforce_eager,
            dtype=engine_dtype(s.dtype),
            enable_prefix_caching=True,
            prefix_caching_hash_algo="sha256_cbor",
            seed=s.seed,
            disable_log_stats=False,
            kv_events_config=self._kv_events_config(),
            kv_transfer_config=kv_transfer_config(s),
            num_gpu_blocks_override=s.kv_blocks,
        )
        stats = self._stats
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[lambda cfg, idx: _StatsRecorder(stats)])
        if s.role != "both" or s.kv_offload == "store":
            # vLLM's NIXL connector re-pins the model thread and leaves a busy-polling
            # progress thread on the engine's core (so does the KV store's NIXL link,
            # services/kvstore_nixl.py): undo both (services/engines/cpu_affinity.py).
            cores = parse_cpu_list(s.cpu_cores)
            if cores is not None:
                restore_engine_cores(cores)
            deprioritize_idle_spinners()
        config = self._engine.vllm_config
        if config.kv_transfer_config is not None:
            self.kv_engine_id = config.kv_transfer_config.engine_id
        endpoint = nixl = None
        if s.role != "both":
            assert self.kv_engine_id is not None
            endpoint = KVEndpoint(self.kv_engine_id, s.kv_side_channel_host, s.kv_side_channel_port,
                                  tp_size=config.parallel_config.tensor_parallel_size)
            # Published under the worker's lease, so it is read once here, not per request.
            nixl = await asyncio.to_thread(fetch_nixl_metadata, s.kv_side_channel_host, s.kv_side_channel_port)
        info = EngineInfo(
            model=s.model_name,
            max_model_len=config.model_config.max_model_len,
            block_size=config.cache_config.block_size,
            kv_blocks_total=config.cache_config.num_gpu_blocks or 0,
            max_num_seqs=config.scheduler_config.max_num_seqs,
            kv_endpoint=endpoint,
            nixl_metadata=nixl,
        )
        if self._kv_events is not None:
            self._kv_events.start()
        log.info("vLLM engine ready: %s", info)
        return info

    def _kv_events_config(self) -> KVEventsConfig | None:
        if not self.settings.kv_events:
            return None
        # ipc:// in a private directory: vLLM binds it (a tcp://host endpoint
        # would make its PUB connect), and no port can collide.
        self._kv_events = ZmqKVEvents(tempfile.mkdtemp(prefix="llm-mesh-kv-"), self.emit_kv_events)
        return KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=self._kv_events.endpoint,
                              replay_endpoint=self._kv_events.replay_endpoint, topic=ZmqKVEvents.TOPIC)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        sp = request.sampling
        kv_params = self._kv_transfer_params(request)
        params = SamplingParams(
            # The prefill leg stops after the first token: its KV is what it is for.
            max_tokens=1 if request.remote_decode else sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            seed=sp.seed,
            stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None,
            ignore_eos=sp.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv_params} if kv_params is not None else None,
        )
        assert self._engine is not None, "engine not started"
        prompt_tokens = len(request.prompt_token_ids)
        completion_tokens = 0
        finished = False
        self._running.add(request.request_id)
        try:
            stream = self._engine.generate(
                TokensPrompt(prompt_token_ids=request.prompt_token_ids), params, request.request_id
            )
            async for out in stream:
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                finished = out.finished
                kv_transfer = None
                if out.finished and request.remote_decode and out.kv_transfer_params:
                    kv_transfer = from_vllm_kv_params(out.kv_transfer_params, prompt_tokens)
                yield EngineOutput(
                    token_ids=list(completion.token_ids),
                    text=completion.text,
                    finish_reason=_finish_reason(completion.finish_reason) if out.finished else None,
                    prompt_tokens=prompt_tokens,
                    # On a decode leg: prompt tokens pulled over NIXL count here too (vLLM
                    # reports local prefix hits + external loads), i.e. not computed locally.
                    cached_prompt_tokens=out.num_cached_tokens or 0,
                    completion_tokens=completion_tokens,
                    kv_transfer=kv_transfer,
                )
        finally:
            self._running.discard(request.request_id)
            if not finished:
                # The consumer went away (cancel, deadline): free the engine's slot now.
                await asyncio.shield(self._engine.abort(request.request_id))

    def _kv_transfer_params(self, request: EngineRequest) -> dict[str, Any] | None:
        role = self.settings.role
        if request.remote_decode and request.remote_prefill is not None:
            raise ValueError(f"request {request.request_id}: remote_decode and remote_prefill are exclusive")
        if request.remote_decode:
            if role != "prefill":
                raise ValueError(f"{request.request_id}: remote_decode needs role prefill, not {role}")
            return prefill_leg_kv_params()
        if request.remote_prefill is not None:
            if role != "decode":
                raise ValueError(f"{request.request_id}: remote_prefill needs role decode, not {role}")
            return to_vllm_kv_params(request.remote_prefill)
        return None

    def pd_stats(self) -> PDStats:
        """Where this engine's prompt tokens came from, and its NIXL transfers (lifetime totals)."""
        return dataclasses.replace(self._stats.pd)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._running or self._engine is None:
            return False
        await self._engine.abort(request_id)
        return True

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self._stats.running,
            waiting=self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
            generated_tokens=self._stats.generated_tokens,
            # Per request vLLM reports only local + external hits together (num_cached_tokens).
            cached_prompt_tokens=self._stats.pd.local_cache_prompt_tokens,
            kv_transferred_prompt_tokens=self._stats.pd.kv_transfer_prompt_tokens,
        )

    async def stop(self) -> None:
        if self._kv_events is not None:
            await self._kv_events.stop()
            self._kv_events = None
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


# --- P/D over vLLM's NixlConnector ------------------------------------------------


def kv_transfer_config(s: VllmSettings) -> KVTransferConfig | None:
    """vLLM's KV connector: NixlConnector (pull mode) for a P/D role, the OffloadingConnector
    to the KV store for kv_offload "store", both under vLLM's MultiConnector for a P/D role
    with the store (NIXL first: a decode leg's pulled blocks win over a store load)."""
    if s.kv_offload == "lmcache":
        from services.engines import lmcache_backend
        return lmcache_backend.kv_transfer_config(s)
    if s.kv_offload not in ("none", "store"):
        raise ValueError(f"unknown kv_offload {s.kv_offload!r} (none, store or lmcache)")
    if s.kv_offload == "store" and not s.kvstore_address:
        raise ValueError("kv_offload store needs kvstore_address")
    if s.role not in ROLES:
        raise ValueError(f"unknown role {s.role!r} (one of {', '.join(ROLES)})")
    store = _store_offload_config(s) if s.kv_offload == "store" else None
    if s.role == "both":
        return store
    nixl = _nixl_config(s)
    if store is None:
        return nixl
    connectors = [{"kv_connector": c.kv_connector, "kv_role": c.kv_role, "kv_buffer_device": c.kv_buffer_device,
                   "kv_connector_extra_config": c.kv_connector_extra_config,
                   "kv_load_failure_policy": c.kv_load_failure_policy} for c in (nixl, store)]
    return KVTransferConfig(kv_connector="MultiConnector", kv_role=nixl.kv_role, engine_id=s.kv_engine_id,
                            kv_buffer_device=s.kv_buffer_device, kv_load_failure_policy=s.kv_load_failure_policy,
                            kv_connector_extra_config={"connectors": connectors})


def _store_offload_config(s: VllmSettings) -> KVTransferConfig:
    from services.engines.kv_offload import extra_config
    return KVTransferConfig(kv_connector="OffloadingConnector", kv_role="kv_both", kv_buffer_device="cpu",
                            kv_connector_extra_config=extra_config(
                                s.kvstore_address, s.model_name, etcd=s.kvstore_etcd,
                                transport=s.kvstore_transport, tls=s.kvstore_tls,
                                etcd_settings=s.kvstore_etcd_settings))


def _nixl_config(s: VllmSettings) -> KVTransferConfig:
    extra: dict[str, Any] = {"kv_lease_duration": s.kv_lease_s}
    return KVTransferConfig(
        kv_connector="NixlConnector",
        # kv_producer / kv_consumer, not the deprecated kv_both (nixl/connector.py warns).
        kv_role="kv_producer" if s.role == "prefill" else "kv_consumer",
        kv_buffer_device=s.kv_buffer_device,
        engine_id=s.kv_engine_id,
        kv_connector_extra_config=extra,
        kv_load_failure_policy=s.kv_load_failure_policy,
    )


def prefill_leg_kv_params() -> dict[str, Any]:
    """kv_transfer_params of a prefill leg: compute the prompt, hold its blocks for a decoder."""
    return {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}


def to_vllm_kv_params(p: KVTransferParams) -> dict[str, Any]:
    """The decode leg's kv_transfer_params (what vLLM 0.32's pull scheduler/worker read:
    nixl/pull_scheduler.py get_num_new_matched_tokens/update_state_after_alloc,
    nixl/metadata.py add_new_req_to_recv)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": p.engine_id,
        # One list per KV cache group; a full-attention model has one group.
        "remote_block_ids": [list(p.block_ids)],
        "remote_request_id": p.request_id,
        "remote_host": p.host,
        "remote_port": p.port,
        "tp_size": p.tp_size,
        "remote_num_tokens": p.num_tokens,
    }


def from_vllm_kv_params(d: Mapping[str, Any], num_tokens: int) -> KVTransferParams:
    """A prefill engine's finished-output kv_transfer_params as KVTransferParams.

    vLLM 0.32 (nixl/pull_scheduler.py request_finished) returns remote_block_ids as one
    list per KV cache group; KVTransferParams holds one list, so a model with several
    groups (hybrid attention) is refused rather than silently cut. `num_tokens` (the
    prompt length) stands in when vLLM sends no remote_num_tokens.
    """
    groups = d.get("remote_block_ids") or []
    if groups and all(isinstance(b, int) for b in groups):  # a flat list (older vLLM)
        groups = [groups]
    if len(groups) > 1:
        raise ValueError(f"{len(groups)} KV cache groups: KVTransferParams carries one")
    for key in ("remote_engine_id", "remote_request_id", "remote_host", "remote_port"):
        if d.get(key) is None:
            raise ValueError(f"kv_transfer_params without {key}: {dict(d)}")
    if d.get("dcp_size", 1) != 1 or d.get("pp_size", 1) != 1:
        raise ValueError(f"dcp_size/pp_size > 1 are not carried by KVTransferParams: {dict(d)}")
    return KVTransferParams(
        engine_id=str(d["remote_engine_id"]),
        block_ids=tuple(int(b) for b in (groups[0] if groups else ())),
        host=str(d["remote_host"]),
        port=int(d["remote_port"]),
        request_id=str(d["remote_request_id"]),
        tp_size=int(d.get("tp_size") or 1),
        num_tokens=int(d.get("remote_num_tokens") or num_tokens),
    )


@dataclasses.dataclass
class PDStats:
    """Lifetime totals of one engine: prompt tokens by source, NIXL transfers (vLLM's own stats)."""

    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # prefilled here
    local_cache_prompt_tokens: int = 0  # from this engine's prefix cache
    kv_transfer_prompt_tokens: int = 0  # pulled from a prefill engine over NIXL
    transfers: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0  # NIXL's own xfer duration, summed
    failed_transfers: int = 0
    expired_kv_leases: int = 0  # prefill side: blocks released unpulled
    notifications_after_expiry: int = 0


# --- KV events from vLLM's ZMQ publisher -----------------------------------------
# Our own decoding structs (not vLLM's classes): fields we don't read are
# ignored, so a newer vLLM that adds fields still decodes.


class _Stored(msgspec.Struct, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_BATCH = msgspec.msgpack.Decoder(_Batch)
_EVENT = msgspec.msgpack.Decoder(_Stored | _Removed | _Cleared)


def _hash(h: int | bytes) -> int:
    # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1 (default) sends the int already; else the bytes.
    return h if isinstance(h, int) else external_block_hash(h)


def decode_kv_event_batch(payload: bytes) -> list[KVEvent]:
    """The engine events in one publisher payload (msgpack [ts, [events], dp_rank]).

    An event type this decoder does not know is skipped with a warning.
    """
    events: list[KVEvent] = []
    for raw in _BATCH.decode(payload).events:
        try:
            e = _EVENT.decode(raw)
        except msgspec.ValidationError as exc:
            log.warning("skipping a KV event this build cannot read: %s", exc)
            continue
        if isinstance(e, _Stored):
            events.append(BlockStored(
                block_hashes=tuple(_hash(h) for h in e.block_hashes),
                parent_block_hash=_hash(e.parent_block_hash) if e.parent_block_hash is not None else None,
                token_ids=tuple(e.token_ids), block_size=e.block_size, medium=e.medium))
        elif isinstance(e, _Removed):
            events.append(BlockRemoved(block_hashes=tuple(_hash(h) for h in e.block_hashes), medium=e.medium))
        else:
            events.append(AllBlocksCleared())
    return events


class ZmqKVEvents:
    """Subscribes to vLLM's KV event publisher and feeds a sink, in order, without gaps.

    vLLM numbers publisher messages 0, 1, 2…; a SUB socket may miss some (it
    connects after the publisher started; a full queue drops). A message
    after a gap triggers a replay request (DEALER → the publisher's ROUTER:
    `[b"", start seq]`, answered by `[b"", topic, seq, payload]`… and an
    end marker of seq -1). What the replay cannot fill becomes
    AllBlocksCleared (see the module docstring).
    """

    TOPIC = "kv-events"
    REPLAY_TIMEOUT_S = 2.0
    _END_SEQ = (-1).to_bytes(8, "big", signed=True)

    def __init__(self, directory: str, sink: KVEventSink) -> None:
        self.directory = directory
        self.endpoint = f"ipc://{directory}/events"
        self.replay_endpoint = f"ipc://{directory}/replay"
        self.sink = sink
        self.expected = 0  # next publisher seq
        self.lost = 0  # publisher messages neither received nor replayed
        self._ctx = zmq.asyncio.Context()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="vllm-kv-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._ctx.destroy(linger=0)
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _run(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, self.TOPIC.encode())
        sub.connect(self.endpoint)
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    log.warning("ignoring a KV event message of %d frames", len(frames))
                    continue
                await self.receive(int.from_bytes(frames[1], "big"), frames[2])
        except Exception:
            log.exception("the vLLM KV event reader failed; this worker's events stop here")
            raise
        finally:
            sub.close(linger=0)

    async def receive(self, seq: int, payload: bytes) -> None:
        """Handle publisher message `seq` (filling the gap before it first)."""
        if seq < self.expected:
            return  # already delivered (by a replay)
        if seq > self.expected:
            for replayed_seq, replayed in await self._replay(self.expected, seq):
                if replayed_seq >= self.expected:
                    self._skip_to(replayed_seq)
                    self._deliver(replayed)
                    self.expected = replayed_seq + 1
            self._skip_to(seq)
        self._deliver(payload)
        self.expected = seq + 1

    def _skip_to(self, seq: int) -> None:
        """Messages expected..seq-1 are gone for good: clear, so no evicted block stays announced."""
        if seq > self.expected:
            self.lost += seq - self.expected
            log.warning("lost vLLM KV events %d..%d (not in the replay buffer): clearing this worker's "
                        "announced blocks", self.expected, seq - 1)
            self.sink([AllBlocksCleared()])
            self.expected = seq

    def _deliver(self, payload: bytes) -> None:
        try:
            events = decode_kv_event_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable KV event batch (%s): clearing this worker's announced blocks", exc)
            events = [AllBlocksCleared()]
        if events:
            self.sink(events)

    async def _replay(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        """Publisher messages [start, stop) still in its replay buffer, in order."""
        out: list[tuple[int, bytes]] = []
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.connect(self.replay_endpoint)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(self.REPLAY_TIMEOUT_S * 1000):
                    log.warning("KV event replay timed out")
                    break
                frames = await sock.recv_multipart()
                if len(frames) != 4 or frames[2] == self._END_SEQ:
                    break
                seq = int.from_bytes(frames[2], "big")
                if start <= seq < stop:
                    out.append((seq, frames[3]))
        finally:
            sock.close(linger=0)
        return out


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "abort") else "stop"


@dataclasses.dataclass
class _LatestStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens: int = 0
    pd: PDStats = dataclasses.field(default_factory=PDStats)


class _StatsRecorder(StatLoggerBase):
    """A vLLM stat logger that keeps the engine's latest scheduler stats for GetLoad."""

    def __init__(self, into: _LatestStats) -> None:  # noqa: D107 - vLLM passes (config, index) to factories
        self._into = into

    def record(self, scheduler_stats, iteration_stats, *args, **kwargs) -> None:  # noqa: ANN001
        if scheduler_stats is not None:
            self._into.running = scheduler_stats.num_running_reqs
            self._into.waiting = scheduler_stats.num_waiting_reqs
            self._into.kv_cache_usage = scheduler_stats.kv_cache_usage
            if scheduler_stats.kv_connector_stats:
                _record_transfers(self._into.pd, scheduler_stats.kv_connector_stats)
        if iteration_stats is not None:
            self._into.generated_tokens += iteration_stats.num_generation_tokens
            prompt = iteration_stats.prompt_token_stats
            pd = self._into.pd
            pd.prompt_tokens += prompt.total
            pd.computed_prompt_tokens += prompt.computed
            pd.local_cache_prompt_tokens += prompt.local_cache_hit
            pd.kv_transfer_prompt_tokens += prompt.external_kv_transfer

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, *args, **kwargs) -> None:  # noqa: ANN002
        pass


def _record_transfers(pd: PDStats, data: Mapping[str, Any]) -> None:
    """Add one interval of NixlKVConnectorStats.data (lists of observations) to the totals."""
    durations = data.get("transfer_duration") or []
    pd.transfers += len(durations)
    pd.transfer_seconds += float(sum(durations))
    pd.transfer_bytes += int(sum(data.get("bytes_transferred") or []))
    pd.failed_transfers += len(data.get("num_failed_transfers") or [])
    pd.expired_kv_leases += len(data.get("num_kv_expired_reqs") or [])
    pd.notifications_after_expiry += len(data.get("num_notifications_after_expiry") or [])
