"""`llm-mesh kvstore`: the mesh's KV store — kvstore.BlockStore behind the `KVStore` gRPC API,
its RAM region on NIXL, what it holds in etcd and as KV events.

Threads: every BlockStore call runs on ONE dedicated thread (`CoreThread`): the core is not
thread-safe, and its disk I/O must not block the event loop. Each call also drains the core's
KV events and chunk changes, handed to the loop before the call's result (so when an RPC
answers, its events are in the log), and even if the RPC was cancelled meanwhile.

What others see:
- membership: `/llm-mesh/v1/kvstores/<id>` (Member.kvstore) under the store's lease; its NIXL
  record (services/kvstore_nixl.StoreAgent) at membership.nixl_metadata_key(id), same lease;
- chunk records: services/kvstore_chunks.ChunkPublisher mirrors drain_chunk_changes() into
  /llm-mesh/v1/kvchunks/<id>/<model>/<first hash> under the same lease, batched, so a store
  killed -9 loses its records with its lease;
- KV events: `WatchKVEvents` serves a services.kv_event_log.KVEventLog fed with the core's
  events as medium "STORE" (tier KV_TIER_STORE), with the worker's replay/snapshot semantics.

Inputs are validated here (INVALID_ARGUMENT with the field); core errors map as the proto
says: NoSpace → RESOURCE_EXHAUSTED + RetryInfo, LayoutMismatch → FAILED_PRECONDITION,
UnknownId → NOT_FOUND. Readiness (grpc health "" and llm_mesh.v1.KVStore): the core is up
(disk index rebuilt) and the store registered in etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from kvstore import MAX_CHAIN, MAX_LEASE_S, BlockStore
from kvstore.store import DEFAULT_LEASE_S
from kvstore.disk_format import MAX_LAYOUT_BYTES, MAX_MODEL_BYTES
from kvstore.errors import InvalidArgument, KVStoreError, LayoutMismatch, NoSpace, UnknownId
from kvstore.types import REMOVED, STORED, ChunkKey, Event, Stats
from llm_mesh.v1 import kvstore_pb2, kvstore_pb2_grpc, membership_pb2, worker_pb2
from services import __version__, security, tls
from services.engines.base import BlockRemoved, BlockStored
from services.grpc_util import MAX_MESSAGE_BYTES, RpcError, abort, invalid, make_server, run_service, stop_event_on_signals
from services.kv_event_log import DEFAULT_CAPACITY, DEFAULT_HEARTBEAT_S, KVEventLog
from services.kvstore_chunks import ChunkPublisher
from services.kvstore_metrics import KVStoreMetrics
from services.membership import (DEFAULT_TTL_S, EtcdConnection, Registration, etcd_settings, nixl_metadata_key,
                                 parse_endpoints)
from services.readiness import Readiness
from services.tracing import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name
MEDIUM_STORE = "STORE"
MAX_CHAIN_BLOCKS = MAX_CHAIN  # the proto's limits, as the core enforces them
# A block must fit one GetBlocks message with room for its framing.
MAX_BLOCK_BYTES = MAX_MESSAGE_BYTES - 64 * 1024
MAX_ID_CHARS = 128
NO_SPACE_RETRY_S = 1.0
GIB, MIB = 1024**3, 1024**2

T = TypeVar("T")
CoreCall = Callable[[BlockStore, float], T]


# --- the core's thread -------------------------------------------------------------------


class CoreThread:
    """Runs every BlockStore call on one thread; `deliver(events, chunk_changes)` gets what each
    call made the core announce, on the event loop, before the call's awaiter resumes."""

    def __init__(self, deliver: Callable[[list[Event], dict[ChunkKey, list[int]]], None]) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-core")
        self._deliver = deliver
        self._loop: asyncio.AbstractEventLoop | None = None
        self.store: BlockStore | None = None

    async def start(self, build: Callable[[], BlockStore]) -> None:
        """Build the store on the core thread (recovery reads the disk index there)."""
        self._loop = asyncio.get_running_loop()

        def construct(_: Any, now: float) -> None:
            self.store = build()

        await self.call(construct)

    async def call(self, fn: CoreCall[T]) -> T:
        assert self._loop is not None, "start() first"
        return await self._loop.run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: CoreCall[T]) -> T:
        try:
            return fn(self.store, time.monotonic())  # type: ignore[arg-type]
        finally:
            store = self.store
            if store is not None:
                events, chunks = store.drain_events(), store.drain_chunk_changes()
                if events or chunks:
                    # Queued before the future's own completion callback: delivered first.
                    self._loop.call_soon_threadsafe(self._deliver, events, chunks)  # type: ignore[union-attr]

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# --- validation at the edge --------------------------------------------------------------


def check_chain(chain: kvstore_pb2.BlockChain, field: str = "chain") -> tuple[str, str, list[int]]:
    if not chain.model:
        raise invalid(f"{field}.model is required", f"{field}.model")
    if len(chain.model.encode()) > MAX_MODEL_BYTES:
        raise invalid(f"{field}.model is longer than {MAX_MODEL_BYTES} bytes", f"{field}.model")
    if not chain.layout:
        raise invalid(f"{field}.layout is required (blocks are shared only within one layout)", f"{field}.layout")
    if len(chain.layout.encode()) > MAX_LAYOUT_BYTES:
        raise invalid(f"{field}.layout is longer than {MAX_LAYOUT_BYTES} bytes", f"{field}.layout")
    n = len(chain.block_hashes)
    if n == 0:
        raise invalid(f"{field}.block_hashes must not be empty", f"{field}.block_hashes")
    if n > MAX_CHAIN_BLOCKS:
        raise invalid(f"{field}.block_hashes holds {n} blocks; at most {MAX_CHAIN_BLOCKS}", f"{field}.block_hashes")
    return chain.model, chain.layout, list(chain.block_hashes)


def check_lease(lease_s: float, default_s: float) -> float:
    if not math.isfinite(lease_s) or lease_s < 0 or lease_s > MAX_LEASE_S:
        raise invalid(f"lease_s must be in [0, {MAX_LEASE_S:g}] seconds (0: the default)", "lease_s")
    return lease_s or default_s


MAX_POSITION = 1 << 24  # blocks into a sequence: far beyond any context window


def check_position(start: int, message: Any, field: str) -> tuple[int, int | None]:
    """(start_position, parent_block_hash) of a write. A write starting mid-sequence without its
    parent is kept; its first blocks then start a chunk record of their own (kvstore/README.md)."""
    has_parent = message.HasField("parent_block_hash")
    if start >= MAX_POSITION:
        raise invalid(f"{field} must be below {MAX_POSITION}", field)
    if not start and has_parent:
        raise invalid("parent_block_hash must be unset when start_position is 0", "parent_block_hash")
    return start, (message.parent_block_hash if has_parent else None)


def check_id(value: str, field: str) -> str:
    if not value:
        raise invalid(f"{field} is required", field)
    if len(value) > MAX_ID_CHARS:
        raise invalid(f"{field} is longer than {MAX_ID_CHARS} characters", field)
    return value


def core_error(exc: KVStoreError) -> RpcError:
    """The one mapping of core errors to gRPC statuses (see the proto's header)."""
    if isinstance(exc, InvalidArgument):
        return invalid(str(exc), exc.field)
    if isinstance(exc, NoSpace):
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"no room in the store: {exc}",
                        retry_after_s=NO_SPACE_RETRY_S)
    if isinstance(exc, LayoutMismatch):
        return RpcError(grpc.StatusCode.FAILED_PRECONDITION, str(exc), field="block_bytes")
    if isinstance(exc, UnknownId):
        return RpcError(grpc.StatusCode.NOT_FOUND, str(exc))
    return RpcError(grpc.StatusCode.INTERNAL, f"store error: {type(exc).__name__}")


def _slot(s: Any) -> kvstore_pb2.BlockSlot:
    return kvstore_pb2.BlockSlot(block_hash=s.block_hash, offset=s.offset, length=s.length, checksum=s.checksum)


def stats_proto(s: Stats) -> kvstore_pb2.KVStoreStats:
    def tier(t: Any) -> kvstore_pb2.KVStoreTierStats:
        return kvstore_pb2.KVStoreTierStats(blocks=t.blocks, bytes_used=t.bytes_used, bytes_total=t.bytes_total)

    return kvstore_pb2.KVStoreStats(
        ram=tier(s.ram), disk=tier(s.disk), pinned_blocks=s.pinned_blocks, reserved_blocks=s.reserved_blocks,
        hit_blocks=s.hit_blocks, miss_blocks=s.miss_blocks, stored_blocks=s.stored_blocks,
        spilled_blocks=s.spilled_blocks, evicted_blocks=s.evicted_blocks, corrupt_blocks=s.corrupt_blocks)


def kv_events(events: list[Event]) -> list[BlockStored | BlockRemoved]:
    """Core events → the worker's KV event types, medium STORE (tier KV_TIER_STORE), each naming
    its model (a store holds several). Layouts are not in the events: a hash stored under two
    layouts of one model counts once in the log until both are gone."""
    out: list[BlockStored | BlockRemoved] = []
    for e in events:
        if e.kind == STORED:
            out.append(BlockStored(tuple(e.hashes), None, (), 0, MEDIUM_STORE, model=e.model))
        elif e.kind == REMOVED:
            out.append(BlockRemoved(tuple(e.hashes), MEDIUM_STORE, model=e.model))
    return out


# --- the servicer --------------------------------------------------------------------------


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, core: CoreThread, region: memoryview, kv_log: KVEventLog, metrics: KVStoreMetrics,
                 *, default_lease_s: float = DEFAULT_LEASE_S, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
        self.core = core
        self.region = region
        self.kv_log = kv_log
        self.metrics = metrics
        self.default_lease_s = default_lease_s
        self.heartbeat_s = heartbeat_s
        self._write_lengths: dict[str, tuple[int, float]] = {}  # write_id → (block bytes, deadline): NIXL bytes

    async def _answer(self, method: str, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        code = "OK"
        try:
            return await work()
        except (RpcError, KVStoreError) as exc:
            error = exc if isinstance(exc, RpcError) else core_error(exc)
            code = error.code.name
            await abort(context, error)
        finally:
            self.metrics.request(method, code)
        raise AssertionError("unreachable")  # abort raises

    async def Lookup(self, request: kvstore_pb2.LookupRequest, context: grpc.aio.ServicerContext
                     ) -> kvstore_pb2.LookupResponse:
        async def work() -> kvstore_pb2.LookupResponse:
            model, layout, hashes = check_chain(request.chain)
            r = await self.core.call(lambda s, now: s.lookup(model, layout, hashes, now))
            return kvstore_pb2.LookupResponse(blocks=r.blocks, ram_blocks=r.ram_blocks)
        return await self._answer("Lookup", context, work)

    async def ReserveWrite(self, request: kvstore_pb2.ReserveWriteRequest, context: grpc.aio.ServicerContext
                           ) -> kvstore_pb2.ReserveWriteResponse:
        async def work() -> kvstore_pb2.ReserveWriteResponse:
            model, layout, hashes = check_chain(request.chain)
            block_bytes = request.block_bytes
            if block_bytes < 1 or block_bytes > min(MAX_BLOCK_BYTES, len(self.region)):
                raise invalid(f"block_bytes must be in [1, {min(MAX_BLOCK_BYTES, len(self.region))}]", "block_bytes")
            lease_s = check_lease(request.lease_s, self.default_lease_s)
            start, parent = check_position(request.start_position, request, "start_position")
            r = await self.core.call(lambda s, now: s.reserve(model, layout, block_bytes, hashes, lease_s, now,
                                                              start=start, parent=parent))
            if r.write_id:
                self._write_lengths[r.write_id] = (block_bytes, time.monotonic() + r.lease_s)
            return kvstore_pb2.ReserveWriteResponse(write_id=r.write_id, slots=[_slot(s) for s in r.slots],
                                                    lease_s=r.lease_s)
        return await self._answer("ReserveWrite", context, work)

    async def CommitWrite(self, request: kvstore_pb2.CommitWriteRequest, context: grpc.aio.ServicerContext
                          ) -> kvstore_pb2.CommitWriteResponse:
        async def work() -> kvstore_pb2.CommitWriteResponse:
            write_id = check_id(request.write_id, "write_id")
            checksums = list(request.checksums) or None
            r = await self.core.call(lambda s, now: s.commit(write_id, checksums, now))
            length, _ = self._write_lengths.pop(write_id, (0, 0.0))
            self.metrics.moved("nixl", "write", r.committed * length)
            return kvstore_pb2.CommitWriteResponse(committed=r.committed, rejected_block_hashes=r.rejected)
        return await self._answer("CommitWrite", context, work)

    async def AbortWrite(self, request: kvstore_pb2.AbortWriteRequest, context: grpc.aio.ServicerContext
                         ) -> kvstore_pb2.AbortWriteResponse:
        async def work() -> kvstore_pb2.AbortWriteResponse:
            write_id = check_id(request.write_id, "write_id")
            await self.core.call(lambda s, now: s.abort(write_id))
            self._write_lengths.pop(write_id, None)
            return kvstore_pb2.AbortWriteResponse()
        return await self._answer("AbortWrite", context, work)

    async def Pin(self, request: kvstore_pb2.PinRequest, context: grpc.aio.ServicerContext) -> kvstore_pb2.PinResponse:
        async def work() -> kvstore_pb2.PinResponse:
            model, layout, hashes = check_chain(request.chain)
            lease_s = check_lease(request.lease_s, self.default_lease_s)
            r = await self.core.call(lambda s, now: s.pin(model, layout, hashes, lease_s, now))
            self.metrics.moved("nixl", "read", sum(s.length for s in r.slots))
            return kvstore_pb2.PinResponse(pin_id=r.pin_id, slots=[_slot(s) for s in r.slots], lease_s=r.lease_s)
        return await self._answer("Pin", context, work)

    async def Unpin(self, request: kvstore_pb2.UnpinRequest, context: grpc.aio.ServicerContext
                    ) -> kvstore_pb2.UnpinResponse:
        async def work() -> kvstore_pb2.UnpinResponse:
            pin_id = check_id(request.pin_id, "pin_id")
            await self.core.call(lambda s, now: s.unpin(pin_id))
            return kvstore_pb2.UnpinResponse()
        return await self._answer("Unpin", context, work)

    async def PutBlocks(self, request_iterator: AsyncIterator[kvstore_pb2.PutBlocksRequest],
                        context: grpc.aio.ServicerContext) -> kvstore_pb2.PutBlocksResponse:
        async def work() -> kvstore_pb2.PutBlocksResponse:
            return await self._put(request_iterator)
        return await self._answer("PutBlocks", context, work)

    async def _put(self, requests: AsyncIterator[kvstore_pb2.PutBlocksRequest]) -> kvstore_pb2.PutBlocksResponse:
        """The stream is a chain from the sequence start: blocks are written in batches of up to
        PUT_BATCH_BYTES through the same reserve → copy → commit steps as a NIXL writer."""
        model = layout = ""
        first_position, parent = 0, None
        hashes: list[int] = []
        batch: list[kvstore_pb2.PutBlocksRequest] = []
        batch_bytes = 0
        stored, rejected = 0, []
        block_bytes = 0
        async for r in requests:
            if not hashes:
                chain = kvstore_pb2.BlockChain(model=r.model, layout=r.layout, block_hashes=[r.block_hash])
                model, layout, _ = check_chain(chain, "first message")
                first_position, parent = check_position(r.start_position, r, "start_position")
                block_bytes = len(r.data)
                if block_bytes < 1 or block_bytes > min(MAX_BLOCK_BYTES, len(self.region)):
                    raise invalid(f"data must hold 1 to {min(MAX_BLOCK_BYTES, len(self.region))} bytes", "data")
            elif len(r.data) != block_bytes:
                raise invalid(f"block {len(hashes)} holds {len(r.data)} bytes; the stream's blocks hold "
                              f"{block_bytes}", "data")
            if len(hashes) >= MAX_CHAIN_BLOCKS:
                raise invalid(f"at most {MAX_CHAIN_BLOCKS} blocks per stream", "block_hash")
            hashes.append(r.block_hash)
            batch.append(r)
            batch_bytes += block_bytes
            if batch_bytes >= PUT_BATCH_BYTES:
                n, bad = await self._put_batch(model, layout, hashes, batch, first_position, parent)
                stored, batch, batch_bytes = stored + n, [], 0
                rejected += bad
        if not hashes:
            raise invalid("the stream holds no block", "block_hash")
        if batch:
            n, bad = await self._put_batch(model, layout, hashes, batch, first_position, parent)
            stored += n
            rejected += bad
        return kvstore_pb2.PutBlocksResponse(stored=stored, rejected_block_hashes=rejected)

    async def _put_batch(self, model: str, layout: str, chain: list[int], batch: list[kvstore_pb2.PutBlocksRequest],
                         first_position: int, first_parent: int | None) -> tuple[int, list[int]]:
        offset = len(chain) - len(batch)  # the batch's place in the stream
        # Its position in the sequence and the block before it (for the chunk records).
        start = first_position + offset
        parent = chain[offset - 1] if offset else first_parent
        hashes = [r.block_hash for r in batch]
        data = [r.data for r in batch]
        checksums = [r.checksum or None for r in batch]  # 0: not checked on arrival
        result = await self.core.call(lambda s, now: s.put(model, layout, hashes, data, checksums, now,
                                                          start=start, parent=parent))
        self.metrics.moved("grpc", "write", result.stored * len(batch[0].data))
        return result.stored, list(result.rejected)

    async def GetBlocks(self, request: kvstore_pb2.GetBlocksRequest, context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[kvstore_pb2.GetBlocksResponse]:
        code = "OK"
        pin_id = ""
        try:
            model, layout, hashes = check_chain(request.chain)
            pinned = await self.core.call(lambda s, now: s.pin(model, layout, hashes, self.default_lease_s, now))
            pin_id = pinned.pin_id
            for s in pinned.slots:
                # Pinned: the core neither moves nor overwrites these bytes until unpin.
                data = bytes(self.region[s.offset:s.offset + s.length])
                self.metrics.moved("grpc", "read", len(data))
                yield kvstore_pb2.GetBlocksResponse(block_hash=s.block_hash, data=data, checksum=s.checksum)
        except (RpcError, KVStoreError) as exc:
            error = exc if isinstance(exc, RpcError) else core_error(exc)
            code = error.code.name
            await abort(context, error)
        finally:
            self.metrics.request("GetBlocks", code)
            if pin_id:
                await self.core.call(lambda s, now: s.unpin(pin_id))

    async def GetStats(self, request: kvstore_pb2.GetKVStoreStatsRequest, context: grpc.aio.ServicerContext
                       ) -> kvstore_pb2.KVStoreStats:
        async def work() -> kvstore_pb2.KVStoreStats:
            return stats_proto(await self.core.call(lambda s, now: s.stats()))
        return await self._answer("GetStats", context, work)

    async def WatchKVEvents(self, request: worker_pb2.WatchKVEventsRequest, context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[worker_pb2.KVEventBatch]:
        async for batch in self.kv_log.watch(request, self.heartbeat_s):
            yield batch

    def forget_expired_writes(self, now: float) -> None:
        for write_id in [w for w, (_, deadline) in self._write_lengths.items() if deadline < now]:
            del self._write_lengths[write_id]


PUT_BATCH_BYTES = 32 * MIB  # PutBlocks: bytes per core call (bounds the stream's buffering)


# --- the process -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind and advertise")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--id", default=None, help="member id (default: kvstore-<port>-<random>); keep it "
                        "stable across restarts on one --disk-dir")
    parser.add_argument("--etcd", default="127.0.0.1:2379", help="comma-separated etcd endpoints")
    parser.add_argument("--lease-ttl", type=int, default=DEFAULT_TTL_S, help="etcd lease TTL, seconds")
    parser.add_argument("--ram-gib", type=float, default=4.0, help="RAM tier (the NIXL-registered region), GiB")
    parser.add_argument("--ram-mib", type=int, default=None, help="RAM tier in MiB (overrides --ram-gib)")
    parser.add_argument("--disk-dir", default=None, help="directory of the disk tier (none: RAM only)")
    parser.add_argument("--disk-gib", type=float, default=16.0, help="disk tier capacity, GiB")
    parser.add_argument("--disk-mib", type=int, default=None, help="disk tier capacity in MiB (overrides --disk-gib)")
    parser.add_argument("--chunk-blocks", type=int, default=64, help="blocks per etcd chunk record")
    parser.add_argument("--default-lease", type=float, default=DEFAULT_LEASE_S,
                        help="seconds a reservation or pin holds when the caller gives no lease_s")
    parser.add_argument("--nixl", choices=["auto", "on", "off"], default="auto",
                        help="register the RAM region with NIXL (auto: when the nixl package loads)")
    parser.add_argument("--prefault", action="store_true",
                        help="touch the whole RAM tier at start (resident at once; no page faults on first writes)")
    parser.add_argument("--expire-interval", type=float, default=0.5,
                        help="seconds between expiries of lapsed reservations and pins")
    parser.add_argument("--chunk-flush", type=float, default=0.2,
                        help="seconds between batched etcd writes of chunk records")
    parser.add_argument("--drain-seconds", type=float, default=5.0, help="grace for in-flight calls on shutdown")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    parser.add_argument("--kv-events-buffer", type=int, default=DEFAULT_CAPACITY,
                        help="KV events kept for replay; a subscriber further behind gets a snapshot")
    parser.add_argument("--kv-events-heartbeat", type=float, default=DEFAULT_HEARTBEAT_S,
                        help="seconds between heartbeats on an idle KV event stream")
    security.add_arguments(parser, api_keys=False)  # workers and schedulers call it: TLS/mTLS guards it


def run(args: argparse.Namespace) -> int:
    security.configure(args)
    setup_tracing("llm-mesh-kvstore")
    try:
        run_service(serve(args))
    finally:
        shutdown_tracing()
    return 0


def _sizes(args: argparse.Namespace) -> tuple[int, int]:
    ram = args.ram_mib * MIB if args.ram_mib is not None else int(args.ram_gib * GIB)
    disk = args.disk_mib * MIB if args.disk_mib is not None else int(args.disk_gib * GIB)
    if ram < MIB:
        raise SystemExit("the RAM tier needs at least 1 MiB")
    if not 1 <= args.chunk_blocks <= 4096:
        raise SystemExit("--chunk-blocks must be in [1, 4096]")
    if not 0 < args.default_lease <= MAX_LEASE_S:
        raise SystemExit(f"--default-lease must be in (0, {MAX_LEASE_S:g}]")
    return ram, disk if args.disk_dir else 0


def _nixl_agent(mode: str, store_id: str, region: Any) -> Any:
    """The store's NIXL agent with the region registered, or None (gRPC bytes path only)."""
    if mode == "off":
        return None
    from services.kvstore_nixl import StoreAgent

    try:
        return StoreAgent(store_id, region)
    except Exception as exc:  # noqa: BLE001 - no NIXL here: serve the gRPC path, say so
        if mode == "on":
            raise
        log.warning("NIXL unavailable (%s: %s); serving the gRPC bytes path only", type(exc).__name__, exc)
        return None


async def serve(args: argparse.Namespace) -> None:
    from services.kvstore_disk import FileDiskBackend
    from services.kvstore_nixl import Region

    ram_bytes, disk_bytes = _sizes(args)
    endpoints, etcd = parse_endpoints(args.etcd), etcd_settings(args)
    region = Region(ram_bytes, prefault=args.prefault)
    kv_log = KVEventLog(args.kv_events_buffer)
    stats: list[Stats | None] = [None]
    metrics = KVStoreMetrics(lambda: stats[0])
    publisher: ChunkPublisher | None = None
    pending_chunks: dict[ChunkKey, list[int]] = {}

    def deliver(events: list[Event], chunks: dict[ChunkKey, list[int]]) -> None:
        if events:
            kv_log.append(kv_events(events))
        if publisher is not None:
            publisher.apply(chunks)
        else:
            pending_chunks.update(chunks)  # recovered before etcd was reached

    core = CoreThread(deliver)
    server, health, port = make_server(f"{args.host}:{args.port}", [SERVICE_NAME], tls=tls.from_args(args))
    store_id = args.id or f"kvstore-{port}-{secrets.token_hex(3)}"
    agent = _nixl_agent(args.nixl, store_id, region)
    disk = FileDiskBackend(args.disk_dir) if args.disk_dir else None
    readiness = Readiness(health, [SERVICE_NAME])
    await readiness.start()
    stop = stop_event_on_signals()
    try:
        started = time.monotonic()
        await core.start(lambda: BlockStore(region.view, disk, disk_bytes=disk_bytes, chunk_blocks=args.chunk_blocks,
                                            default_lease_s=args.default_lease))
        stats[0] = await core.call(lambda s, now: s.stats())
        log.info("kvstore %s: core up in %.2fs (RAM %d MiB, disk %s): %d blocks in RAM, %d on disk", store_id,
                 time.monotonic() - started, ram_bytes // MIB, f"{disk_bytes // MIB} MiB at {args.disk_dir}"
                 if disk else "none", stats[0].ram.blocks, stats[0].disk.blocks)
        servicer = KVStoreServicer(core, region.view, kv_log, metrics, default_lease_s=args.default_lease,
                                   heartbeat_s=args.kv_events_heartbeat)
        kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, server)
        await server.start()
        if args.metrics_port is not None:
            metrics.serve(args.metrics_port, args.host)
        member = membership_pb2.Member(
            id=store_id, kind=membership_pb2.MEMBER_KIND_KVSTORE, address=f"{args.host}:{port}",
            started_at=int(time.time()), version=__version__,
            kvstore=kvstore_pb2.KVStoreInfo(nixl_metadata_key=nixl_metadata_key(store_id) if agent else "",
                                            ram_bytes=ram_bytes, disk_bytes=disk_bytes,
                                            chunk_blocks=args.chunk_blocks))
        async with Registration(endpoints, member, ttl=args.lease_ttl, etcd=etcd) as registration:
            if agent is not None:
                registration.attach(nixl_metadata_key(store_id),
                                    json_format.MessageToJson(agent.metadata(store_id), indent=None).encode())
            metrics.watch_lease(registration)
            publisher = ChunkPublisher(store_id, EtcdConnection(endpoints, etcd, rpc_max_attempts=1),
                                       lambda: registration.lease_id, args.chunk_flush, metrics)
            publisher.apply(pending_chunks)
            await publisher.start()
            ticker = asyncio.create_task(_tick(core, servicer, stats, args.expire_interval), name="kvstore-expire")
            readiness.ready_when(lambda: registration.ever_registered)
            log.info("kvstore %s serving at %s:%d (pid %d, NIXL %s); ready once registered", store_id, args.host,
                     port, os.getpid(), "on" if agent else "off")
            try:
                await stop.wait()
                await readiness.drain()
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                await publisher.stop()
        log.info("kvstore %s left the mesh; draining", store_id)
        kv_log.close()
        await server.stop(grace=args.drain_seconds)
    finally:
        await readiness.close()
        kv_log.close()
        await server.stop(grace=None)
        core.close()
        if agent is not None:
            agent.close()
        if disk is not None:
            disk.close()


async def _tick(core: CoreThread, servicer: KVStoreServicer, stats: list[Stats | None], interval: float) -> None:
    """Expire lapsed reservations and pins; refresh the stats the metrics read."""
    while True:
        await asyncio.sleep(interval)

        def expire(s: BlockStore, now: float) -> Stats:
            s.expire(now)
            return s.stats()

        stats[0] = await core.call(expire)
        servicer.forget_expired_writes(time.monotonic())
