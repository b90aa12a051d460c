"""Clients of a KV store (`llm-mesh kvstore`): its gRPC control plane and bytes path, and where
to find stores in etcd.

- `KVStoreClient`: synchronous (grpc's blocking channel), for a vLLM engine process's own
  threads (offloading workers) and tools; safe to share between threads.
- `AsyncKVStoreClient`: the same calls on grpc.aio, plus `watch_kv_events` (schedulers).
- `list_stores` / `store_nixl_metadata`: the live stores' member records and NIXL records,
  read from etcd (sync wrappers run their own event loop on a helper thread, so they work
  from any thread, even one that runs a loop).

The data plane over NIXL is services/kvstore_nixl.NixlStoreLink: reserve here → WRITE there →
commit here; pin here → READ there → unpin here. Errors are grpc.RpcError with the codes the
proto names (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION).
`get` verifies every block's CRC-32 on arrival and stops at the first that fails.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence

import grpc
from google.protobuf import json_format

from kvstore.types import checksum
from llm_mesh.v1 import kvstore_pb2, kvstore_pb2_grpc, membership_pb2, worker_pb2
from services.grpc_util import CHANNEL_OPTIONS
from services.membership import (EtcdConnection, EtcdSettings, decode, kind_prefix, nixl_metadata_key,
                                 parse_endpoints)
from services.tls import TlsFiles, channel_credentials, channel_options, open_channel

DEFAULT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Slot:
    """A block's place in the store's NIXL region (checksum 0 in reservations)."""

    block_hash: int
    offset: int
    length: int
    checksum: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Reservation:
    write_id: str
    slots: tuple[Slot, ...]
    lease_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class Pin:
    pin_id: str  # "" when nothing was pinned
    slots: tuple[Slot, ...]
    lease_s: float


def _chain(model: str, layout: str, hashes: Iterable[int]) -> kvstore_pb2.BlockChain:
    return kvstore_pb2.BlockChain(model=model, layout=layout, block_hashes=list(hashes))


def _slots(slots: Iterable[kvstore_pb2.BlockSlot]) -> tuple[Slot, ...]:
    return tuple(Slot(s.block_hash, s.offset, s.length, s.checksum) for s in slots)


def _put_messages(model: str, layout: str, blocks: Iterable[tuple[int, bytes | memoryview]],
                  with_checksums: bool, start: int = 0, parent: int | None = None
                  ) -> Iterator[kvstore_pb2.PutBlocksRequest]:
    first = True
    for block_hash, data in blocks:
        data = bytes(data)
        request = kvstore_pb2.PutBlocksRequest(block_hash=block_hash, data=data,
                                               checksum=checksum(data) if with_checksums else 0)
        if first:
            request.model, request.layout, request.start_position, first = model, layout, start, False
            if parent is not None:
                request.parent_block_hash = parent
        yield request


def _verified(responses: Iterable[kvstore_pb2.GetBlocksResponse]) -> list[tuple[int, bytes]]:
    out = []
    for r in responses:
        if checksum(r.data) != r.checksum:
            break  # damaged in flight: the run ends here (as a corrupt block ends it in the store)
        out.append((r.block_hash, r.data))
    return out


class KVStoreClient:
    """Blocking calls to one store at `address` (host:port)."""

    def __init__(self, address: str, tls: TlsFiles | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        credentials = channel_credentials(tls)
        options = channel_options(tls, CHANNEL_OPTIONS)
        self._channel = (grpc.insecure_channel(address, options=options) if credentials is None
                         else grpc.secure_channel(address, credentials, options=options))
        self.stub = kvstore_pb2_grpc.KVStoreStub(self._channel)
        self.address = address
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def lookup(self, model: str, layout: str, hashes: Sequence[int]) -> tuple[int, int]:
        """(blocks, ram_blocks): the leading run of `hashes` the store holds, and how much of it is in RAM."""
        r = self.stub.Lookup(kvstore_pb2.LookupRequest(chain=_chain(model, layout, hashes)), timeout=self.timeout_s)
        return r.blocks, r.ram_blocks

    def reserve(self, model: str, layout: str, block_bytes: int, hashes: Sequence[int],
                lease_s: float = 0.0, *, start: int = 0,
                parent: int | None = None, timeout_s: float | None = None) -> Reservation:
        """Slots for `hashes`, which start at position `start` of their sequence (`parent`: the
        hash before them, required when start > 0) — so the store's chunk records stay aligned."""
        r = self.stub.ReserveWrite(kvstore_pb2.ReserveWriteRequest(
            chain=_chain(model, layout, hashes), block_bytes=block_bytes, lease_s=lease_s,
            start_position=start, parent_block_hash=parent), timeout=timeout_s or self.timeout_s)
        return Reservation(r.write_id, _slots(r.slots), r.lease_s)

    def commit(self, write_id: str, checksums: Sequence[int] | None = None,
               timeout_s: float | None = None) -> tuple[int, list[int]]:
        """(committed, rejected block hashes). `checksums`: CRC-32 per slot from the writer's copy."""
        r = self.stub.CommitWrite(kvstore_pb2.CommitWriteRequest(write_id=write_id, checksums=checksums or []),
                                  timeout=timeout_s or self.timeout_s)
        return r.committed, list(r.rejected_block_hashes)

    def abort(self, write_id: str, timeout_s: float | None = None) -> None:
        self.stub.AbortWrite(kvstore_pb2.AbortWriteRequest(write_id=write_id), timeout=timeout_s or self.timeout_s)

    def pin(self, model: str, layout: str, hashes: Sequence[int], lease_s: float = 0.0,
            timeout_s: float | None = None) -> Pin:
        r = self.stub.Pin(kvstore_pb2.PinRequest(chain=_chain(model, layout, hashes), lease_s=lease_s),
                          timeout=timeout_s or self.timeout_s)
        return Pin(r.pin_id, _slots(r.slots), r.lease_s)

    def unpin(self, pin_id: str, timeout_s: float | None = None) -> None:
        self.stub.Unpin(kvstore_pb2.UnpinRequest(pin_id=pin_id), timeout=timeout_s or self.timeout_s)

    def put(self, model: str, layout: str, blocks: Iterable[tuple[int, bytes | memoryview]],
            with_checksums: bool = True, *, start: int = 0, parent: int | None = None,
            timeout_s: float | None = None) -> tuple[int, list[int]]:
        """The gRPC bytes path: (hash, bytes) blocks in chain order, the first at position `start` of
        its sequence (`parent`: the hash before it). Returns (newly stored, rejected block hashes)."""
        r = self.stub.PutBlocks(_put_messages(model, layout, blocks, with_checksums, start, parent),
                                timeout=timeout_s or self.timeout_s)
        return r.stored, list(r.rejected_block_hashes)

    def get(self, model: str, layout: str, hashes: Sequence[int]) -> list[tuple[int, bytes]]:
        """The leading stored run of `hashes` with its bytes (each CRC-checked here)."""
        return _verified(self.stub.GetBlocks(kvstore_pb2.GetBlocksRequest(chain=_chain(model, layout, hashes)),
                                             timeout=self.timeout_s))

    def stats(self) -> kvstore_pb2.KVStoreStats:
        return self.stub.GetStats(kvstore_pb2.GetKVStoreStatsRequest(), timeout=self.timeout_s)


class AsyncKVStoreClient:
    """The same calls on grpc.aio (one event loop), plus the store's KV event stream."""

    def __init__(self, address: str, tls: TlsFiles | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._channel = open_channel(address, tls, options=CHANNEL_OPTIONS)
        self.stub = kvstore_pb2_grpc.KVStoreStub(self._channel)
        self.address = address
        self.timeout_s = timeout_s

    async def close(self) -> None:
        await self._channel.close()

    async def lookup(self, model: str, layout: str, hashes: Sequence[int]) -> tuple[int, int]:
        r = await self.stub.Lookup(kvstore_pb2.LookupRequest(chain=_chain(model, layout, hashes)),
                                   timeout=self.timeout_s)
        return r.blocks, r.ram_blocks

    async def reserve(self, model: str, layout: str, block_bytes: int, hashes: Sequence[int],
                      lease_s: float = 0.0, *, start: int = 0,
                      parent: int | None = None) -> Reservation:
        """Slots for `hashes`, which start at position `start` of their sequence (`parent`: the
        hash before them, required when start > 0) — so the store's chunk records stay aligned."""
        r = await self.stub.ReserveWrite(kvstore_pb2.ReserveWriteRequest(
            chain=_chain(model, layout, hashes), block_bytes=block_bytes, lease_s=lease_s,
            start_position=start, parent_block_hash=parent), timeout=self.timeout_s)
        return Reservation(r.write_id, _slots(r.slots), r.lease_s)

    async def commit(self, write_id: str, checksums: Sequence[int] | None = None) -> tuple[int, list[int]]:
        r = await self.stub.CommitWrite(kvstore_pb2.CommitWriteRequest(write_id=write_id, checksums=checksums or []),
                                        timeout=self.timeout_s)
        return r.committed, list(r.rejected_block_hashes)

    async def abort(self, write_id: str) -> None:
        await self.stub.AbortWrite(kvstore_pb2.AbortWriteRequest(write_id=write_id), timeout=self.timeout_s)

    async def pin(self, model: str, layout: str, hashes: Sequence[int], lease_s: float = 0.0) -> Pin:
        r = await self.stub.Pin(kvstore_pb2.PinRequest(chain=_chain(model, layout, hashes), lease_s=lease_s),
                                timeout=self.timeout_s)
        return Pin(r.pin_id, _slots(r.slots), r.lease_s)

    async def unpin(self, pin_id: str) -> None:
        await self.stub.Unpin(kvstore_pb2.UnpinRequest(pin_id=pin_id), timeout=self.timeout_s)

    async def put(self, model: str, layout: str, blocks: Iterable[tuple[int, bytes | memoryview]],
                  with_checksums: bool = True, *, start: int = 0, parent: int | None = None
                  ) -> tuple[int, list[int]]:
        async def messages() -> AsyncIterator[kvstore_pb2.PutBlocksRequest]:
            for m in _put_messages(model, layout, blocks, with_checksums, start, parent):
                yield m

        r = await self.stub.PutBlocks(messages(), timeout=self.timeout_s)
        return r.stored, list(r.rejected_block_hashes)

    async def get(self, model: str, layout: str, hashes: Sequence[int]) -> list[tuple[int, bytes]]:
        call = self.stub.GetBlocks(kvstore_pb2.GetBlocksRequest(chain=_chain(model, layout, hashes)),
                                   timeout=self.timeout_s)
        return _verified([r async for r in call])

    async def stats(self) -> kvstore_pb2.KVStoreStats:
        return await self.stub.GetStats(kvstore_pb2.GetKVStoreStatsRequest(), timeout=self.timeout_s)

    def watch_kv_events(self, epoch: str = "", after_seq: int = 0) -> AsyncIterator[worker_pb2.KVEventBatch]:
        """The store's KV event stream (tier KV_TIER_STORE), as Worker.WatchKVEvents: no deadline."""
        return self.stub.WatchKVEvents(worker_pb2.WatchKVEventsRequest(epoch=epoch, after_seq=after_seq))


# --- finding stores in etcd -----------------------------------------------------------------


async def alist_stores(etcd: str | Sequence[str], settings: EtcdSettings | None = None
                       ) -> dict[str, membership_pb2.Member]:
    """The KV stores registered now: id → Member (Member.kvstore set)."""
    from etcd3aio import prefix_range_end

    connection = EtcdConnection(parse_endpoints(etcd), settings, rpc_max_attempts=1)
    await connection.connect()
    try:
        prefix = kind_prefix(membership_pb2.MEMBER_KIND_KVSTORE)
        response = await connection.client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()), timeout=5)
        members = [decode(kv.value) for kv in response.kvs]
        return {m.id: m for m in members}
    finally:
        await connection.close()


async def astore_nixl_metadata(etcd: str | Sequence[str], store_id: str, settings: EtcdSettings | None = None
                               ) -> membership_pb2.NixlAgentMetadata | None:
    """The store's NIXL record (agent metadata + region), or None if it publishes none."""
    connection = EtcdConnection(parse_endpoints(etcd), settings, rpc_max_attempts=1)
    await connection.connect()
    try:
        response = await connection.client.kv.get(nixl_metadata_key(store_id), timeout=5)
    finally:
        await connection.close()
    if not response.kvs:
        return None
    return json_format.Parse(response.kvs[0].value, membership_pb2.NixlAgentMetadata(), ignore_unknown_fields=True)


def _run_on_helper_thread(coroutine: object) -> object:
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-etcd") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def list_stores(etcd: str | Sequence[str], settings: EtcdSettings | None = None) -> dict[str, membership_pb2.Member]:
    return _run_on_helper_thread(alist_stores(etcd, settings))  # type: ignore[return-value]


def store_nixl_metadata(etcd: str | Sequence[str], store_id: str, settings: EtcdSettings | None = None
                        ) -> membership_pb2.NixlAgentMetadata | None:
    return _run_on_helper_thread(astore_nixl_metadata(etcd, store_id, settings))  # type: ignore[return-value]
