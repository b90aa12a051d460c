"""vLLM KV offloading to the llm-mesh KV store: an outside `OffloadingSpec` (vLLM 0.32).

vLLM's OffloadingConnector loads it by name from `kv_connector_extra_config`
(`spec_name`, `spec_module_path`; see `extra_config`). vLLM then writes every
computed prompt block through to the store as it is computed (its "chunk level"
policy), so a block the engine later evicts is already there, and before it
computes a prompt it asks the store for the blocks its own prefix cache misses.
Another worker with the same model and layout finds the blocks this one stored.

Two halves (scheduler side in vLLM's engine core, worker side in its worker process):
- `StoreManager` (scheduler side). vLLM calls `lookup` per block inside the
  scheduler step, so it never waits on the network: an unknown block answers
  RETRY and is queued; at the step's end (`on_schedule_end`) the queued blocks of a
  request go to the store in one Pin on a background thread; the pinned leading
  run answers HIT from then on, the rest MISS. The pin holds the blocks in the
  store's RAM until the request's loads are done (then Unpin), so a block vLLM
  was told is there is there when the worker reads it.
- `StoreWorker` (worker side). Stores and loads run on one background thread,
  loads first (stores go in slices, so a load waits for one slice at most): a
  store moves the engine's KV blocks (host memory on CPU) into the store, a load
  writes pinned blocks into the engine blocks vLLM allocated. Over NIXL when the
  store publishes its agent (the engine's KV memory registered with an agent of
  ours), else over the gRPC bytes path. vLLM does not reuse a block being stored
  until the job completes (its jobs_to_flush fence, the only place `wait`
  blocks), nor schedule a request being loaded.

Keys: vLLM's offload key is (block hash, KV group); with `blocks_per_chunk` 1 and
one KV group, one offloaded block is one engine block, keyed in the store by
`external_block_hash` (the low 64 bits of vLLM's sha256_cbor hash): the same
64-bit hashes the scheduler and KV events use. Blocks are shared only between
engines with the same `layout` (dtype, layers, KV heads, head size, block size,
bytes per block) and model name. A store block is the engine block's per-layer
pages concatenated in vLLM's tensor order, whichever path wrote it.

Failures: a store that cannot be reached answers MISS (the engine recomputes) and
drops stores. A store that does not answer in time (a lookup within
`kvstore_lookup_timeout_s`, 1 s; a write call within `kvstore_write_timeout_s`, 2 s)
counts as unreachable, and each half then keeps off it for a cool-down (a circuit, the
same one the scheduler keeps per worker: 1 s, doubling to 30 s while it stays silent):
lookups answer MISS at once and stores are dropped, so a stalled store costs one
request one timeout, not every request a wait (seen here: a store unanswered for
5–15 s around an engine's start queued each new request's lookup behind the last one's
10 s deadline). Every block read is checked against the store's CRC-32 before vLLM
uses it. vLLM 0.32's OffloadingConnector has no way to report a failed load (it
asserts success), so a load that fails after its pin (the store died mid-read)
is read again over gRPC, twice, and then fails the engine step: loud, never
wrong tokens.

Positions: vLLM hands a request's blocks over in steps, not from position 0. Each
block's position comes from vLLM's per-request key positions (its end token), and
each store write says where its run starts (ReserveWrite/PutBlocks
start_position, with the hash before it when this engine knows it), so the
store's etcd chunk records stay aligned to the sequence.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import pathlib
import queue
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any

import grpc
import numpy as np
import torch

from kvstore.types import checksum
from scheduler.block_hash import external_block_hash
from scheduler.resilience import Circuit
from services.kvstore_client import KVStoreClient, Pin, Slot
from services.membership import EtcdSettings
from services.tls import TlsFiles
from vllm.v1.kv_offload.base import (CanonicalKVCaches, GPULoadStoreSpec, LoadStoreSpec, LookupResult,
                                     OffloadingManager, OffloadingSpec, OffloadingWorker, OffloadKey,
                                     OffloadPolicy, PrepareStoreOutput, ReqContext, RequestOffloadingContext,
                                     ScheduleEndContext, TransferResult, get_offload_block_hash)
from vllm.v1.kv_offload.config import OffloadingConfig

# Under "vllm.": the engine core process configures only vLLM's loggers.
log = logging.getLogger(f"vllm.llm_mesh.{__name__}")

SPEC_NAME = "MeshKVStoreSpec"
DEFAULT_PIN_LEASE_S = 120.0
# A lookup (Pin) is an index walk in the store's RAM (milliseconds): one that takes a second
# waits longer than a hit saves on short prompts. Write calls (reserve, commit, an 8-block put)
# get twice that. Loads keep the client's 10 s: vLLM cannot be told a load failed.
DEFAULT_LOOKUP_TIMEOUT_S = 1.0
DEFAULT_WRITE_TIMEOUT_S = 2.0
# Hashes this engine stored, so a block is not put twice (bounded, oldest forgotten first).
_STORED_MEMORY = 200_000
# A store job moves this many blocks at a time, so a load that arrives meanwhile waits for one
# slice (~6 MB for SmolLM2), not for a whole prompt's write-through.
STORE_SLICE_BLOCKS = 8
# What a store that does not answer looks like to a client (its circuit opens on these).
_UNANSWERED = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE})


def _unanswered(exc: Exception) -> bool:
    """Whether `exc` says the store did not answer (deadline, unreachable)."""
    return isinstance(exc, grpc.RpcError) and exc.code() in _UNANSWERED  # type: ignore[attr-defined]


def _brief(exc: Exception) -> str:
    """An RPC error as its code and details (grpc's str() of one spans lines), others as str()."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return str(exc)


TRANSPORTS = ("auto", "nixl", "grpc")

# Where extra_config keeps the TLS files and etcd settings, and the fields each may hold.
TLS_KEY, ETCD_SETTINGS_KEY = "kvstore_tls", "kvstore_etcd_settings"
_TLS_FIELDS = tuple(f.name for f in dataclasses.fields(TlsFiles))
_ETCD_FIELDS = tuple(f.name for f in dataclasses.fields(EtcdSettings))
_NOT_FILES = ("server_name", "user")


def extra_config(address: str, model: str, *, etcd: str = "", transport: str = "auto",
                 pin_lease_s: float = DEFAULT_PIN_LEASE_S, tls: TlsFiles | None = None,
                 etcd_settings: EtcdSettings | None = None, lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> dict[str, Any]:
    """`kv_connector_extra_config` of an OffloadingConnector that offloads to the store at
    `address`. `etcd` (comma-separated endpoints) is where the store's NIXL record is found;
    without it, or with transport "grpc", blocks move over the gRPC bytes path. `tls`: the
    files the engine's clients dial the store with; `etcd_settings`: etcd TLS/auth for the
    NIXL record lookup. Both travel as file paths (the engine's processes read them), never
    as secrets; `connection_settings` turns them back into TlsFiles/EtcdSettings."""
    config: dict[str, Any] = {
        "spec_name": SPEC_NAME, "spec_module_path": __name__, "blocks_per_chunk": 1,
        "kvstore_address": address, "kvstore_model": model, "kvstore_etcd": etcd,
        "kvstore_transport": transport, "kvstore_pin_lease_s": pin_lease_s,
        "kvstore_lookup_timeout_s": lookup_timeout_s, "kvstore_write_timeout_s": write_timeout_s}
    if tls is not None and tls.client_enabled:
        config[TLS_KEY] = _set_fields(tls)
    if etcd_settings is not None and (etcd_fields := _set_fields(etcd_settings)):
        config[ETCD_SETTINGS_KEY] = etcd_fields
    return config


def _set_fields(settings: TlsFiles | EtcdSettings) -> dict[str, str]:
    return {name: value for name, value in dataclasses.asdict(settings).items() if value}


def connection_settings(extra: Mapping[str, Any]) -> tuple[TlsFiles | None, EtcdSettings | None]:
    """The TLS files (None: plaintext) and etcd settings (None: plaintext, no auth) in an
    `extra_config` dict: the one place both halves of the spec get them. A ValueError names
    the offending key: an unknown field, a value that is not a path, a missing file, or a
    half of a pair (cert without key; etcd cert without CA; etcd user without password file)."""
    tls_fields = _fields(extra, TLS_KEY, _TLS_FIELDS)
    etcd_fields = _fields(extra, ETCD_SETTINGS_KEY, _ETCD_FIELDS)
    if bool(tls_fields.get("cert")) != bool(tls_fields.get("key")):
        raise ValueError(f"{SPEC_NAME}: {TLS_KEY}.cert and {TLS_KEY}.key go together")
    if tls_fields and not (tls_fields.get("cert") or tls_fields.get("ca")):
        raise ValueError(f"{SPEC_NAME}: {TLS_KEY} needs a ca or a cert")
    if (etcd_fields.get("cert") or etcd_fields.get("key")) and not etcd_fields.get("ca"):
        raise ValueError(f"{SPEC_NAME}: {ETCD_SETTINGS_KEY}.cert/.key need {ETCD_SETTINGS_KEY}.ca")
    if etcd_fields.get("user") and not etcd_fields.get("password_file"):
        raise ValueError(f"{SPEC_NAME}: {ETCD_SETTINGS_KEY}.user needs {ETCD_SETTINGS_KEY}.password_file")
    return (TlsFiles(**tls_fields) if tls_fields else None,
            EtcdSettings(**etcd_fields) if etcd_fields else None)


def _fields(extra: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    value = extra.get(key) or {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{SPEC_NAME}: {key} must be a mapping of {', '.join(allowed)}, "
                         f"not {type(value).__name__}")
    for name, item in value.items():
        if name not in allowed:
            raise ValueError(f"{SPEC_NAME}: unknown key {key}.{name} (known: {', '.join(allowed)})")
        if not isinstance(item, str):
            raise ValueError(f"{SPEC_NAME}: {key}.{name} must be a string, not {type(item).__name__}")
        if item and name not in _NOT_FILES and not pathlib.Path(item).is_file():
            raise ValueError(f"{SPEC_NAME}: {key}.{name}: file not found: {item}")
    return {name: item for name, item in value.items() if item}


def store_nixl_record(address: str, etcd: str, etcd_settings: EtcdSettings | None = None) -> Any:
    """The NIXL record (membership_pb2.NixlAgentMetadata) of the store registered at `address`,
    read from etcd with `etcd_settings`; LookupError when it has none."""
    from services.kvstore_client import list_stores, store_nixl_metadata

    stores = [m for m in list_stores(etcd, etcd_settings).values() if m.address == address]
    metadata = store_nixl_metadata(etcd, stores[0].id, etcd_settings) if stores else None
    if metadata is None:
        raise LookupError(f"no NIXL record of the store at {address} in etcd")
    return metadata


def block_hash_of(key: OffloadKey) -> int:
    return external_block_hash(get_offload_block_hash(key))


def layout_of(config: OffloadingConfig) -> str:
    """The KV layout name: engines share blocks only when every field matches.

    KV heads and head size come from the model's config.json (both sides of vLLM build
    the spec, and only the worker side has a current vLLM config); the bytes per block
    separate layouts even where they are unknown ("?").
    """
    group = config.groups[0]
    heads, head_size = _attention_shape(config.model.name)
    return (f"vllm;dtype={config.model.dtype};layers={len(group.layer_names)};kv_heads={heads};"
            f"head_size={head_size};block={group.tokens_per_block};bytes={config.worker_kv_bytes_per_block};"
            f"tp={config.parallel.tp_size}")


def _attention_shape(model: str) -> tuple[str, str]:
    try:
        hf = json.loads((pathlib.Path(model) / "config.json").read_text())
        heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        head_size = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return str(heads), str(head_size)
    except (OSError, KeyError, TypeError, ValueError):
        return "?", "?"


@dataclasses.dataclass
class StoreBlocks(LoadStoreSpec):
    """Where offloaded blocks live: their store hashes in order (and pinned slots for a load)."""

    hashes: tuple[int, ...]
    slots: tuple[Slot, ...] = ()
    # Stores: each block's position in its sequence and the hash before it (None: unknown).
    positions: tuple[int, ...] = ()
    parents: tuple[int | None, ...] = ()

    def runs(self) -> list[tuple[int, int, int | None]]:
        """(first index, count, parent hash) of each run of consecutive positions; the whole job
        as one run from position 0 when positions are unknown."""
        if not self.positions:
            return [(0, len(self.hashes), None)]
        out: list[tuple[int, int, int | None]] = []
        for i, pos in enumerate(self.positions):
            if out and pos == self.positions[i - 1] + 1:
                first, n, parent = out[-1]
                out[-1] = (first, n + 1, parent)
            else:
                out.append((i, 1, self.parents[i]))
        return out


# --- scheduler side ------------------------------------------------------------


@dataclasses.dataclass
class _Request:
    queued: list[int] = dataclasses.field(default_factory=list)  # asked, not yet sent to the store
    sent: set[int] = dataclasses.field(default_factory=set)  # asked of the store, answer pending
    in_flight: bool = False
    held: dict[int, Slot | None] = dataclasses.field(default_factory=dict)  # hash -> slot (None: a miss)
    pins: list[str] = dataclasses.field(default_factory=list)
    at: dict[int, int] = dataclasses.field(default_factory=dict)  # position -> hash, of blocks seen
    loads: int = 0  # load jobs not yet complete
    finished: bool = False


class StoreManager(OffloadingManager):
    """Tracks, per request, which of its blocks the store holds (pinned); see the module docstring."""

    def __init__(self, client: KVStoreClient, model: str, layout: str, pin_lease_s: float,
                 block_tokens: int, lookup_timeout_s: float = DEFAULT_LOOKUP_TIMEOUT_S) -> None:
        self._client, self._model, self._layout = client, model, layout
        self._pin_lease_s = pin_lease_s
        self._lookup_timeout_s = lookup_timeout_s
        # Set and cleared on the lookup thread only; the engine's thread reads it (allows).
        self.circuit = Circuit()
        self._block_tokens = block_tokens
        self._requests: dict[str, _Request] = {}
        self._stored: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._calls: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._results: queue.Queue[tuple[str, list[int], Pin | None]] = queue.Queue()
        self._in_flight = 0
        self._last_error = 0.0
        self._thread = threading.Thread(target=self._run, name="kvstore-lookup", daemon=True)
        self._thread.start()

    # Background thread: the only place the scheduler side touches the network.
    def _run(self) -> None:
        while True:
            op, arg = self._calls.get()
            if op == "stop":
                return
            try:
                if op == "pin":
                    req_id, hashes = arg
                    self._results.put((req_id, hashes, self._pin(hashes)))
                elif op == "unpin" and self.circuit.allows(time.monotonic()):
                    # (In the cool-down the pin is left to its lease: the store frees it then.)
                    self._client.unpin(arg, timeout_s=self._lookup_timeout_s)
            except Exception as exc:  # noqa: BLE001
                if _unanswered(exc):
                    self.circuit.failed(time.monotonic(), exc.code().name)  # type: ignore[attr-defined]
                self._warn(f"KV store {op} failed: {_brief(exc)}")

    def _pin(self, hashes: list[int]) -> Pin | None:
        """The store's pin of the leading run of `hashes` it holds; None (a miss) when it fails
        to answer, and without asking while it is in its cool-down since."""
        if not self.circuit.allows(time.monotonic()):
            return None
        try:
            pinned = self._client.pin(self._model, self._layout, hashes, self._pin_lease_s,
                                      timeout_s=self._lookup_timeout_s)
        except Exception as exc:  # noqa: BLE001 - an unreachable store is a miss
            self.circuit.failed(time.monotonic(), type(exc).__name__)
            self._warn(f"KV store lookup failed ({_brief(exc)}); lookups are misses for the next "
                       f"{self.circuit.cooldown_s:.0f} s")
            return None
        self.circuit.succeeded()
        return pinned

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_error > 10.0:
            self._last_error = now
            log.warning(message)

    def _drain(self) -> None:
        while True:
            try:
                req_id, hashes, pinned = self._results.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            req = self._requests.get(req_id)
            slots = pinned.slots if pinned is not None else ()
            if req is None or req.finished:
                if pinned is not None and pinned.pin_id:
                    self._calls.put(("unpin", pinned.pin_id))
                continue
            req.in_flight = False
            req.sent.difference_update(hashes)
            if pinned is not None and pinned.pin_id:
                req.pins.append(pinned.pin_id)
            for i, h in enumerate(hashes):
                req.held[h] = slots[i] if i < len(slots) and slots[i].block_hash == h else None

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        self._drain()
        req = self._requests.setdefault(req_context.req_id, _Request())
        h = block_hash_of(key)
        if h in req.held:
            return LookupResult.HIT if req.held[h] is not None else LookupResult.MISS
        if h not in req.sent and h not in req.queued:
            req.queued.append(h)
        return LookupResult.RETRY

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._drain()
        cooling = not self.circuit.allows(time.monotonic())
        for req_id, req in self._requests.items():
            if req.queued and cooling:  # the store failed to answer lately: a miss, at once
                req.held.update(dict.fromkeys(req.queued))
                req.queued = []
            elif req.queued and not req.in_flight and not req.finished:
                req.in_flight = True
                self._in_flight += 1
                self._calls.put(("pin", (req_id, req.queued)))
                req.sent.update(req.queued)
                req.queued = []

    def has_pending_work(self) -> bool:
        # Keep the engine stepping while a lookup is out, so the waiting request is retried.
        return self._in_flight > 0

    def prepare_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> LoadStoreSpec:
        req = self._requests[req_context.req_id]
        hashes = tuple(block_hash_of(k) for k in keys)
        slots = tuple(req.held[h] for h in hashes)
        assert all(s is not None for s in slots), "vLLM loads only blocks lookup answered HIT"
        req.loads += 1
        return StoreBlocks(hashes, slots)  # type: ignore[arg-type]

    def complete_load(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        req = self._requests.get(req_context.req_id)
        if req is not None:
            req.loads -= 1
            self._release_if_done(req_context.req_id, req)

    def prepare_store(self, keys: Collection[OffloadKey], req_context: ReqContext) -> PrepareStoreOutput | None:
        # Not setdefault: vLLM may store a request's last blocks after on_request_finished, and an
        # entry made then would never be dropped.
        req = self._requests.get(req_context.req_id) or _Request()
        placed = [(self._position(k, req_context), k) for k in keys]
        for pos, k in placed:
            if pos is not None:
                req.at[pos] = block_hash_of(k)
        todo = [(pos, k) for pos, k in placed if (h := block_hash_of(k)) not in self._stored
                and req.held.get(h) is None]
        if all(pos is not None for pos, _ in todo):
            todo.sort(key=lambda t: t[0])  # type: ignore[arg-type, return-value]
            positions = tuple(pos for pos, _ in todo)
            parents = tuple(req.at.get(pos - 1) if pos else None for pos, _ in todo)  # type: ignore[operator]
        else:  # vLLM did not place them: one run, as given
            positions, parents = (), ()
        hashes = tuple(block_hash_of(k) for _, k in todo)
        return PrepareStoreOutput(keys_to_store=[k for _, k in todo], evicted_keys=[],
                                  store_spec=StoreBlocks(hashes, positions=positions, parents=parents))  # type: ignore[arg-type]

    def _position(self, key: OffloadKey, req_context: ReqContext) -> int | None:
        """The block's position in its sequence (vLLM records each key's end token)."""
        end = req_context.get_offload_key_position(key)
        return end // self._block_tokens - 1 if end else None

    def complete_store(self, keys: Collection[OffloadKey], req_context: ReqContext, success: bool = True) -> None:
        for k in keys:
            self._stored[block_hash_of(k)] = None
        while len(self._stored) > _STORED_MEMORY:
            self._stored.popitem(last=False)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        self._requests.setdefault(req_context.req_id, _Request())
        return RequestOffloadingContext(policy=OffloadPolicy.CHUNK_LEVEL)

    def on_request_finished(self, req_context: ReqContext) -> None:
        req = self._requests.get(req_context.req_id)
        if req is not None:
            req.finished = True
            self._release_if_done(req_context.req_id, req)

    def _release_if_done(self, req_id: str, req: _Request) -> None:
        """Unpin once the request is finished and no load of it still reads the pinned blocks."""
        if req.finished and req.loads <= 0:
            for pin_id in req.pins:
                self._calls.put(("unpin", pin_id))
            req.pins = []
            if not req.in_flight:
                del self._requests[req_id]

    def reset_cache(self) -> None:
        self._stored.clear()

    def shutdown(self) -> None:
        for req in self._requests.values():
            for pin_id in req.pins:
                self._calls.put(("unpin", pin_id))
        self._calls.put(("stop", None))
        self._thread.join(timeout=5)
        self._client.close()


# --- worker side ---------------------------------------------------------------


class _NixlPath:
    """NIXL to one store: the engine's KV tensors registered with an agent, the store's agent
    added from its etcd record. Blocks move as one (engine page, slot range) transfer per layer
    tensor: a store block is the engine block's pages concatenated in tensor order (the same
    bytes the gRPC path sends). Used from the transfer thread only (NIXL links are not
    thread-safe)."""

    def __init__(self, tensors: list[torch.Tensor], metadata: Any) -> None:
        from services.kvstore_nixl import NixlStoreLink

        self._tensors = tensors
        # Register whole allocations (vLLM carves the layers' KV out of one), not one range per
        # layer: fewer registrations, and each transfer's bounds check scans fewer ranges.
        ranges = {}
        for t in tensors:
            storage = t.untyped_storage()
            ranges[storage.data_ptr()] = storage.nbytes()
        self.link = NixlStoreLink("vllm-kv", sorted(ranges.items()))
        self.peer = self.link.add_store(metadata)

    def move(self, op: str, block_ids: list[int], slots: list[Slot]) -> None:
        transfers = []
        for b, slot in zip(block_ids, slots):
            offset = slot.offset
            for t in self._tensors:
                transfers.append((t.data_ptr() + b * t.stride(0), offset, t.shape[1]))
                offset += t.shape[1]
        self.link.transfer(op, self.peer, transfers)

    def close(self) -> None:
        self.link.close()


class StoreWorker(OffloadingWorker):
    """Moves blocks between the engine's KV tensors (host memory) and the store, off the engine step.

    One thread runs the jobs, loads before stores (a waiting request's TTFT must not queue
    behind write-through traffic). Data path: NIXL when the store publishes its agent in etcd
    (`transport` "auto" or "nixl"), else the gRPC bytes path; a NIXL failure falls back to
    gRPC for that job. Every block read is checked against the store's CRC-32 before the job
    reports done.
    """

    def __init__(self, kv_caches: CanonicalKVCaches, client: KVStoreClient, model: str, layout: str,
                 transport: str = "auto", etcd: str = "", etcd_settings: EtcdSettings | None = None,
                 write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S) -> None:
        self._tensors: list[torch.Tensor] = [t.tensor for t in kv_caches.tensors]
        for t in self._tensors:
            if t.device.type != "cpu" or t.dim() != 2 or t.dtype != torch.int8 or t.stride(1) != 1:
                raise ValueError(f"KV tensor {t.shape} {t.dtype} on {t.device}: host int8 (blocks, page) expected")
        self.block_bytes = sum(t.shape[1] for t in self._tensors)
        self._client, self._model, self._layout = client, model, layout
        self._transport, self._etcd, self._etcd_settings = transport, etcd, etcd_settings
        self._write_timeout_s = write_timeout_s
        self.circuit = Circuit()  # of the writes: stores are dropped while it is open
        self.dropped_blocks = 0  # stores dropped, unanswered or in the cool-down after
        self._nixl: _NixlPath | None = None
        self.path = "grpc"  # what the jobs use ("nixl" once connected)
        self._loads: collections.deque[tuple[int, list[int], StoreBlocks]] = collections.deque()
        self._stores: collections.deque[tuple[int, list[int], StoreBlocks]] = collections.deque()
        self._stopping = False
        self._finished: list[TransferResult] = []
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kvstore-transfers", daemon=True)
        self._thread.start()

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        assert isinstance(dst_spec, StoreBlocks)
        return self._submit(self._stores, job_id, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        assert isinstance(src_spec, StoreBlocks)
        return self._submit(self._loads, job_id, dst_spec, src_spec)

    def _submit(self, jobs: collections.deque, job_id: int, engine: GPULoadStoreSpec, blocks: StoreBlocks) -> bool:
        block_ids = np.asarray(engine.block_ids).tolist()
        if len(block_ids) != len(blocks.hashes):
            raise ValueError(f"job {job_id}: {len(block_ids)} engine blocks for {len(blocks.hashes)} hashes")
        with self._cond:
            self._pending.add(job_id)
            jobs.append((job_id, block_ids, blocks))
            self._cond.notify_all()
        return True

    def _block(self, block_id: int) -> bytes:
        return b"".join(t[block_id].numpy().tobytes() for t in self._tensors)

    def _crc(self, block_id: int) -> int:
        crc = 0
        for t in self._tensors:
            crc = checksum(t[block_id].numpy(), crc)
        return crc

    def _write_block(self, block_id: int, data: bytes) -> None:
        if len(data) != self.block_bytes:
            raise ValueError(f"block of {len(data)} bytes, this engine's are {self.block_bytes}")
        src = torch.frombuffer(bytearray(data), dtype=torch.int8)
        offset = 0
        for t in self._tensors:
            page = t.shape[1]
            t[block_id].copy_(src[offset:offset + page])
            offset += page

    def _connect(self) -> None:
        """Use NIXL if asked and the store publishes its agent; else stay on gRPC."""
        if self._transport == "grpc" or not self._etcd:
            log.info("KV store data path: %s", self.path)
            return
        try:
            metadata = store_nixl_record(self._client.address, self._etcd, self._etcd_settings)
            self._nixl = _NixlPath(self._tensors, metadata)
            self.path = "nixl"
        except Exception as exc:  # noqa: BLE001
            if self._transport == "nixl":
                raise
            log.warning("KV store: NIXL unavailable (%s); using the gRPC bytes path", exc)
        log.info("KV store data path: %s", self.path)

    def _run(self) -> None:
        self._connect()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._loads or self._stores or self._stopping)
                if self._stopping:
                    return
                is_load = bool(self._loads)
                job = (self._loads or self._stores).popleft()
            if is_load:
                self._run_load(*job)
            else:
                self._run_store(*job)

    def _run_load(self, job_id: int, block_ids: list[int], blocks: StoreBlocks) -> None:
        started = time.perf_counter()
        ok = self._load(job_id, block_ids, blocks)
        elapsed = time.perf_counter() - started
        log.debug("KV store: load job %d, %d blocks in %.1f ms (%s)", job_id, len(block_ids), elapsed * 1e3, self.path)
        self._finish(TransferResult(job_id, ok, len(block_ids) * self.block_bytes, elapsed))

    def _run_store(self, job_id: int, block_ids: list[int], blocks: StoreBlocks) -> None:
        """Over NIXL: one reservation, WRITEs in slices of STORE_SLICE_BLOCKS, one commit; over
        gRPC: one PutBlocks per slice. Any load that arrives meanwhile runs between two slices.
        A dropped store is a later miss, never an engine error: the job always succeeds."""
        started = time.perf_counter()
        for first, n, parent in blocks.runs():
            start = blocks.positions[first] if blocks.positions else 0
            run_ids, run_hashes = block_ids[first:first + n], blocks.hashes[first:first + n]
            if self._nixl is None or not self._store_nixl(job_id, run_ids, run_hashes, start, parent):
                for i in range(0, n, STORE_SLICE_BLOCKS):
                    self._put(job_id, run_ids[i:i + STORE_SLICE_BLOCKS], run_hashes[i:i + STORE_SLICE_BLOCKS],
                              start + i, run_hashes[i - 1] if i else parent)
                    self._loads_first()
        self._finish(TransferResult(job_id, True, len(block_ids) * self.block_bytes, time.perf_counter() - started))

    def _loads_first(self) -> None:
        while True:
            with self._cond:
                if not self._loads or self._stopping:
                    return
                load = self._loads.popleft()
            self._run_load(*load)

    def _finish(self, result: TransferResult) -> None:
        with self._cond:
            self._finished.append(result)
            self._pending.discard(result.job_id)
            self._cond.notify_all()

    def _cooling(self, blocks: int) -> bool:
        """True (and the blocks counted as dropped) while the store is in its cool-down."""
        if self.circuit.allows(time.monotonic()):
            return False
        self.dropped_blocks += blocks
        return True

    def _dropped_unanswered(self, job_id: int, blocks: int, exc: Exception) -> bool:
        """True, with the circuit opened, when `exc` says the store did not answer: then no
        other path is tried, the blocks are dropped."""
        if not _unanswered(exc):
            return False
        self.circuit.failed(time.monotonic(), exc.code().name)  # type: ignore[attr-defined]
        self.dropped_blocks += blocks
        log.warning("KV store: store job %d (%d blocks) dropped, the store did not answer (%s); stores are "
                    "dropped for the next %.0f s", job_id, blocks, _brief(exc), self.circuit.cooldown_s)
        return True

    def _store_nixl(self, job_id: int, block_ids: list[int], hashes: tuple[int, ...], start: int,
                    parent: int | None) -> bool:
        """Stores one run over NIXL; False when gRPC should try (a NIXL failure), True when done:
        stored, or dropped (the store did not answer, or is in its cool-down since)."""
        if self._cooling(len(block_ids)):
            return True
        write_id = ""
        timeout = self._write_timeout_s
        try:
            reservation = self._client.reserve(self._model, self._layout, self.block_bytes, hashes,
                                               start=start, parent=parent, timeout_s=timeout)
            write_id = reservation.write_id
            engine_block = dict(zip(hashes, block_ids))
            slots = list(reservation.slots)  # blocks the store already holds are left out
            checksums: list[int] = []
            for i in range(0, len(slots), STORE_SLICE_BLOCKS):
                part = slots[i:i + STORE_SLICE_BLOCKS]
                self._nixl.move("WRITE", [engine_block[s.block_hash] for s in part], part)  # type: ignore[union-attr]
                checksums += [self._crc(engine_block[s.block_hash]) for s in part]
                self._loads_first()
            if slots:
                # The writer's checksums, from the engine's copy: the store rejects a slot whose
                # landed bytes differ. A store that checksummed whatever its slot held at commit
                # would, for a WRITE not yet visible there, certify the slot's old bytes, and a
                # reader's check would then pass on wrong KV (seen: garbage tokens from a hit).
                _, rejected = self._client.commit(write_id, checksums, timeout_s=timeout)
                if rejected:
                    log.warning("KV store: %d of %d blocks of store job %d rejected at commit (their bytes had "
                                "not landed); they stay unstored", len(rejected), len(slots), job_id)
            elif write_id:  # nothing to write (all stored already): an empty reservation may have no id
                self._client.abort(write_id, timeout_s=timeout)
            self.circuit.succeeded()
            return True
        except Exception as exc:  # noqa: BLE001
            # A store that did not answer would not answer the abort either: that would hold this
            # thread (and the loads queued behind it) for a second deadline. Its reservation lapses
            # with its lease on the store.
            if write_id and not _unanswered(exc):
                with contextlib.suppress(Exception):
                    self._client.abort(write_id, timeout_s=timeout)
            if self._dropped_unanswered(job_id, len(block_ids), exc):
                return True
            log.warning("KV store: NIXL store job %d failed (%s); trying gRPC", job_id, exc)
            return False

    def _put(self, job_id: int, block_ids: list[int], hashes: tuple[int, ...], start: int,
             parent: int | None) -> None:
        if self._cooling(len(block_ids)):
            return
        try:
            _, rejected = self._client.put(self._model, self._layout,
                                           ((h, self._block(b)) for h, b in zip(hashes, block_ids)),
                                           start=start, parent=parent, timeout_s=self._write_timeout_s)
            self.circuit.succeeded()
            if rejected:
                log.warning("KV store: %d blocks of store job %d rejected (checksum)", len(rejected), job_id)
        except Exception as exc:  # noqa: BLE001
            if not self._dropped_unanswered(job_id, len(block_ids), exc):
                log.warning("KV store: store job %d (%d blocks) dropped: %s", job_id, len(block_ids), exc)

    def _load(self, job_id: int, block_ids: list[int], blocks: StoreBlocks) -> bool:
        if self._nixl is not None and len(blocks.slots) == len(block_ids):
            try:
                self._nixl.move("READ", block_ids, list(blocks.slots))
                bad = [s.block_hash for b, s in zip(block_ids, blocks.slots) if self._crc(b) != s.checksum]
                if not bad:
                    return True
                log.error("KV store: load job %d: %d blocks read over NIXL fail their checksum; "
                          "reading them over gRPC", job_id, len(bad))
            except Exception as exc:  # noqa: BLE001
                log.error("KV store: NIXL load job %d failed (%s); trying gRPC", job_id, exc)
        for attempt in (1, 2):
            try:
                got = self._client.get(self._model, self._layout, blocks.hashes)
                if [h for h, _ in got] != list(blocks.hashes):
                    raise LookupError(f"store returned {len(got)} of {len(blocks.hashes)} pinned blocks")
                for b, (_, data) in zip(block_ids, got):
                    self._write_block(b, data)
                return True
            except Exception as exc:  # noqa: BLE001
                log.error("KV store: load job %d attempt %d failed: %s", job_id, attempt, exc)
        return False

    def get_finished(self) -> list[TransferResult]:
        with self._cond:
            done, self._finished = self._finished, []
        return done

    def wait(self, job_ids: set[int]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not (self._pending & job_ids))

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        if self._nixl is not None:
            self._nixl.close()
        self._client.close()


# --- the spec vLLM loads -----------------------------------------------------


class MeshKVStoreSpec(OffloadingSpec):
    """Offloads to the llm-mesh KV store named in kv_connector_extra_config (see `extra_config`)."""

    def __init__(self, config: OffloadingConfig) -> None:
        super().__init__(config)
        if self.blocks_per_chunk != 1:
            raise ValueError(f"{SPEC_NAME}: blocks_per_chunk must be 1 (one store block per engine block)")
        if len(config.groups) != 1:
            raise ValueError(f"{SPEC_NAME}: one KV cache group supported, not {len(config.groups)}")
        if config.groups[0].tokens_per_block != self.tokens_per_hash:
            raise ValueError(f"{SPEC_NAME}: block size {config.groups[0].tokens_per_block} != hash block size "
                             f"{self.tokens_per_hash}")
        if config.parallel.world_size != 1:
            raise ValueError(f"{SPEC_NAME}: one worker per engine supported, not {config.parallel.world_size}")
        extra = self.extra_config
        self.address = str(extra["kvstore_address"])
        self.model = str(extra["kvstore_model"])
        self.pin_lease_s = float(extra.get("kvstore_pin_lease_s", DEFAULT_PIN_LEASE_S))
        self.lookup_timeout_s = float(extra.get("kvstore_lookup_timeout_s", DEFAULT_LOOKUP_TIMEOUT_S))
        self.write_timeout_s = float(extra.get("kvstore_write_timeout_s", DEFAULT_WRITE_TIMEOUT_S))
        if not (self.lookup_timeout_s > 0 and self.write_timeout_s > 0):
            raise ValueError(f"{SPEC_NAME}: kvstore_lookup_timeout_s and kvstore_write_timeout_s must be > 0")
        self.transport = str(extra.get("kvstore_transport", "auto"))
        if self.transport not in TRANSPORTS:
            raise ValueError(f"{SPEC_NAME}: kvstore_transport {self.transport!r} (one of {', '.join(TRANSPORTS)})")
        self.etcd = str(extra.get("kvstore_etcd", ""))
        self.tls, self.etcd_settings = connection_settings(extra)
        self.layout = layout_of(config)
        self._manager: StoreManager | None = None
        self._worker: StoreWorker | None = None

    def get_manager(self) -> OffloadingManager:
        if self._manager is None:
            self._manager = StoreManager(self.store_client(), self.model, self.layout, self.pin_lease_s,
                                         self.tokens_per_hash, lookup_timeout_s=self.lookup_timeout_s)
            log.info("KV offload to the store at %s (%s), layout %s", self.address,
                     "TLS" if self.tls is not None else "plaintext", self.layout)
        return self._manager

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        if self._worker is None:
            self._worker = StoreWorker(kv_caches, self.store_client(), self.model, self.layout,
                                       transport=self.transport, etcd=self.etcd,
                                       etcd_settings=self.etcd_settings, write_timeout_s=self.write_timeout_s)
        return self._worker

    def store_client(self) -> KVStoreClient:
        """A client of the store with the TLS files from extra_config (each half, in its own
        process, dials its own)."""
        return KVStoreClient(self.address, tls=self.tls)
