"""A KV store's chunk records in etcd: `/llm-mesh/v1/kvchunks/<store id>/<model>/<first block
hash, 16 hex>` → llm_mesh.v1.KVStoreChunk (protobuf JSON, like every record of the mesh), under
the store's lease, so a dead store's records vanish with it.

`ChunkPublisher` mirrors the core's drain_chunk_changes() (services/kvstore_service.py hands
them over on the event loop): changes are batched (one etcd txn of up to ETCD_TXN_OPS puts and
deletes per flush interval) so etcd is not written per block, and every record is written again
under a new lease (a lapsed lease took them all along).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from google.protobuf import json_format

from kvstore.types import ChunkKey
from llm_mesh.v1 import kvstore_pb2
from services.kvstore_metrics import KVStoreMetrics
from services.membership import EtcdConnection, kvchunk_key

log = logging.getLogger(__name__)

ETCD_TXN_OPS = 128  # etcd's default --max-txn-ops
LEASE_CHECK_S = 1.0  # how often a changed lease or a failed write is looked at without new changes


def encode_chunk(store_id: str, key: ChunkKey, hashes: list[int]) -> bytes:
    record = kvstore_pb2.KVStoreChunk(store_id=store_id, model=key.model, layout=key.layout, block_hashes=hashes)
    return json_format.MessageToJson(record, indent=None).encode()


def decode_chunk(value: bytes) -> kvstore_pb2.KVStoreChunk:
    return json_format.Parse(value, kvstore_pb2.KVStoreChunk(), ignore_unknown_fields=True)


class ChunkPublisher:
    """Keeps etcd's chunk records of this store equal to the core's chunks, under `lease()`.

    `apply` (on the loop) records what changed; a flush every `flush_s` writes the changed
    keys (puts and deletes) in transactions of at most ETCD_TXN_OPS ops. When the lease
    changes (a lapsed lease took every record with it) all records are written again. On an
    etcd error the keys stay dirty and the next flush retries them.

    Two layouts of one model whose chunks start at the same hash share a key (the key names
    the model, not the layout): the latest write wins there."""

    def __init__(self, store_id: str, connection: EtcdConnection, lease: Callable[[], int | None],
                 flush_s: float = 0.2, metrics: KVStoreMetrics | None = None) -> None:
        self.store_id = store_id
        self._etcd = connection
        self._lease = lease
        self.flush_s = flush_s
        self._metrics = metrics
        self.records: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._written_lease: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def apply(self, changes: dict[ChunkKey, list[int]]) -> None:
        for key, hashes in changes.items():
            etcd_key = kvchunk_key(self.store_id, key.model, key.first_hash)
            if hashes:
                self.records[etcd_key] = encode_chunk(self.store_id, key, list(hashes))
            else:
                self.records.pop(etcd_key, None)
            self._dirty.add(etcd_key)
        if self._metrics is not None:
            self._metrics.chunk_records.set(len(self.records))
        self._wake.set()

    async def start(self) -> None:
        await self._etcd.connect()
        self._task = asyncio.create_task(self._run(), name="kvstore-chunks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._etcd.close()

    async def _run(self) -> None:
        while True:
            # Woken by changes; and every LEASE_CHECK_S anyway: a new lease (re-registration after
            # a lapse) or keys left dirty by a failed flush need a write without any new change.
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(LEASE_CHECK_S):
                    await self._wake.wait()
            self._wake.clear()
            lease = self._lease()
            if lease is not None:
                if lease != self._written_lease:
                    self._dirty |= set(self.records)
                try:
                    await self.flush(lease)
                    self._written_lease = lease
                except Exception as exc:  # noqa: BLE001 - etcd down, lease gone: retried in LEASE_CHECK_S
                    log.warning("writing chunk records failed (%s); retrying", type(exc).__name__)
            await asyncio.sleep(self.flush_s)  # batches what changes meanwhile into the next flush

    async def flush(self, lease: int) -> None:
        kv = self._etcd.client.kv
        while self._dirty:
            batch = [self._dirty.pop() for _ in range(min(ETCD_TXN_OPS, len(self._dirty)))]
            ops = [kv.txn_op_put(k, self.records[k], lease=lease) if k in self.records else kv.txn_op_delete(k)
                   for k in batch]
            try:
                await kv.txn([], ops, timeout=5.0)
            except BaseException:
                self._dirty.update(batch)
                raise
            if self._metrics is not None:
                self._metrics.chunk_writes.inc(len(ops))
