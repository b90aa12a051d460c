"""The scheduler's side of `Worker.WatchKVEvents` and `KVStore.WatchKVEvents`:
every live worker's and KV store's KV events, applied to this replica's `BlockIndex`.

Each scheduler replica runs its own `KVEventSubscriber`; replicas share
nothing, yet hold the same index, because each applies the same per-worker
stream (active-active, no leader). Wiring (services/scheduler_service.py):

    subscriber = KVEventSubscriber(pool.directory, index, stores=pool.store_directory)
    await pool.start(); await subscriber.start()
    ...
    await subscriber.stop(); await pool.stop()

Per worker (membership from etcd decides who is live):
- one task holds one stream, resuming from the last (epoch, seq) it applied;
  the worker replays what it missed or, when that is gone, sends a snapshot
  (reset → `index.cleared(worker)`, then its live blocks);
- every delta is checked: same epoch and first seq = last applied + 1. A gap,
  an unknown epoch or a snapshot piece out of place ends the stream and the
  task re-subscribes from the last applied position (so the worker replays or
  resyncs): the index never applies an event twice or skips one;
- a lost stream is retried with exponential backoff and jitter; a stream
  silent for `idle_timeout_s` (the worker heartbeats every ~2 s) counts as lost;
- a worker that leaves the mesh (its etcd key deleted) has its task cancelled
  and its entries dropped (`index.drop_worker`). A record under the same id
  with another address or model is another process: dropped, then followed
  afresh.

KV stores (etcd kind MEMBER_KIND_KVSTORE, `stores`) are followed exactly like
workers, through the same stream semantics: each store is a holder of its own in
the index (its member id; tier KV_TIER_STORE in its events), and since a store
holds several models its events name theirs (BlockStored.model /
BlockRemoved.model); a store event without a model is skipped (counted in
`WorkerFeed.unattributed`), never guessed. A worker's events may leave the
model empty: it is the worker's WorkerInfo.model. Member ids are unique across
kinds (a store and a worker never share one).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from llm_mesh.v1 import kvstore_pb2_grpc, membership_pb2, worker_pb2, worker_pb2_grpc
from scheduler.index import Tier
from services.grpc_util import CHANNEL_OPTIONS
from services.tls import TlsFiles, open_channel

log = logging.getLogger(__name__)

# KVTier (proto) → Tier (index). UNSPECIFIED is never sent for stored/removed
# (read as ENGINE); a tier this build does not know yet is read as DISK, the
# cheapest a hit is credited at: never over-promise a hit.
_TIERS = {
    worker_pb2.KV_TIER_UNSPECIFIED: Tier.ENGINE,
    worker_pb2.KV_TIER_ENGINE: Tier.ENGINE,
    worker_pb2.KV_TIER_HOST: Tier.HOST,
    worker_pb2.KV_TIER_DISK: Tier.DISK,
    worker_pb2.KV_TIER_STORE: Tier.STORE,
}


def index_tier(tier: int) -> Tier:
    """A proto KVTier as the index's Tier."""
    return _TIERS.get(tier, Tier.DISK)


class BlockIndexLike(Protocol):
    """What the subscriber needs of scheduler.index.BlockIndex."""

    def stored(self, worker_id: str, model: str, block_hashes: Sequence[int],
               tier: Tier = Tier.ENGINE) -> None: ...
    def removed(self, worker_id: str, model: str, block_hashes: Sequence[int],
                tier: Tier = Tier.ENGINE) -> None: ...
    def cleared(self, worker_id: str, tier: Tier | None = None) -> None: ...
    def drop_worker(self, worker_id: str) -> None: ...


class MemberSource(Protocol):
    """Live members: services.membership.MemberDirectory (WorkerPool.directory, .store_directory)."""

    members: dict[str, membership_pb2.Member]

    def add_listener(self, listener: Callable[[str, membership_pb2.Member | None], None]) -> None: ...


class OutOfSync(Exception):
    """A batch that does not continue what was applied: re-subscribe."""


@dataclasses.dataclass
class WorkerFeed:
    """One worker's stream position and counters (read them for metrics/tests).

    Invariant: the index holds exactly the worker's live set at (epoch, seq)
    whenever `epoch` is set; while a snapshot is being applied `epoch` is ""
    (a broken stream then resyncs from scratch) and `pending` holds its
    (epoch, seq).
    """

    worker_id: str  # the holder id in the index: a worker's or a KV store's member id
    address: str
    model: str  # the worker's model; "" for a KV store (its events name theirs)
    epoch: str = ""
    seq: int = 0
    pending: tuple[str, int] | None = None
    snapshots: int = 0  # snapshots started (the first subscription is one)
    resyncs: int = 0  # out-of-sync batches seen
    streams: int = 0  # streams opened (more than 1: resumed or resynced)
    events: int = 0  # events applied
    batches: int = 0  # messages received, heartbeats included
    kvstore: bool = False  # a KV store's feed (KVStore.WatchKVEvents)
    unattributed: int = 0  # events skipped: no model in the event nor the feed
    task: asyncio.Task[None] | None = dataclasses.field(default=None, repr=False)
    call: grpc.aio.UnaryStreamCall | None = dataclasses.field(default=None, repr=False)


class KVEventSubscriber:
    """Follows the KV event stream of every live worker (and KV store) into one index (see the
    module docstring)."""

    def __init__(self, members: MemberSource, index: BlockIndexLike, *, retry_initial_s: float = 0.1,
                 retry_max_s: float = 5.0, idle_timeout_s: float = 10.0,
                 include_token_ids: bool = False, tls: TlsFiles | None = None,
                 stores: MemberSource | None = None) -> None:
        self.members = members
        self.stores = stores
        self.tls = tls
        self.index = index
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.idle_timeout_s = idle_timeout_s
        self.include_token_ids = include_token_ids
        self.feeds: dict[str, WorkerFeed] = {}
        self._listening = False
        self._running = False

    async def start(self) -> None:
        """Follow every worker known now and every one that joins later."""
        self._running = True
        if not self._listening:
            self.members.add_listener(self._on_member)
            if self.stores is not None:
                self.stores.add_listener(self._on_store)
            self._listening = True
        for member_id, member in list(self.members.members.items()):
            self._on_member(member_id, member)
        for member_id, member in list(self.stores.members.items()) if self.stores is not None else ():
            self._on_store(member_id, member)
        for feed in self.feeds.values():  # after a stop(): resume where each feed was
            self._ensure_task(feed)

    async def stop(self) -> None:
        """Close every stream. Feeds keep their position: `start` resumes them."""
        self._running = False
        tasks = [f.task for f in self.feeds.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def resubscribe(self, worker_id: str) -> None:
        """Drop the current stream of one worker and resume from the last applied event."""
        feed = self.feeds.get(worker_id)
        if feed is not None and feed.call is not None:
            feed.call.cancel()

    # --- membership ----------------------------------------------------------

    def _on_store(self, member_id: str, member: membership_pb2.Member | None) -> None:
        self._on_member(member_id, member, kvstore=True)

    def _on_member(self, member_id: str, member: membership_pb2.Member | None, kvstore: bool = False) -> None:
        old = self.feeds.get(member_id)
        model = "" if kvstore else member.worker.model if member is not None else ""
        if member is not None and old is not None and (old.address, old.model, old.kvstore) == (
                member.address, model, kvstore):
            return  # same process, updated record
        if old is not None:
            # Gone, or another process under the same id: its cache is not ours to keep.
            del self.feeds[member_id]
            if old.task is not None:
                old.task.cancel()
            self.index.drop_worker(member_id)
            log.info("KV events: %s %s left (%s); its blocks dropped", "KV store" if old.kvstore else "worker",
                     member_id, old.address)
        if member is not None:
            feed = WorkerFeed(member_id, member.address, model, kvstore=kvstore)
            self.feeds[member_id] = feed
            self._ensure_task(feed)

    def _ensure_task(self, feed: WorkerFeed) -> None:
        if self._running and (feed.task is None or feed.task.done()):
            feed.task = asyncio.get_running_loop().create_task(self._follow(feed),
                                                               name=f"kv-events-{feed.worker_id}")

    # --- one worker ------------------------------------------------------------

    async def _follow(self, feed: WorkerFeed) -> None:
        delay = self.retry_initial_s
        async with open_channel(feed.address, self.tls, options=CHANNEL_OPTIONS) as channel:
            stub = (kvstore_pb2_grpc.KVStoreStub(channel) if feed.kvstore
                    else worker_pb2_grpc.WorkerStub(channel))
            while True:
                feed.streams += 1
                feed.pending = None  # a snapshot cut short: epoch is "", so the worker sends a new one
                request = worker_pb2.WatchKVEventsRequest(epoch=feed.epoch, after_seq=feed.seq,
                                                          include_token_ids=self.include_token_ids)
                feed.call = call = stub.WatchKVEvents(request)
                try:
                    while True:
                        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
                        # lands as the read completes, and stop() would then wait forever.
                        async with asyncio.timeout(self.idle_timeout_s):
                            batch = await call.read()
                        if batch is grpc.aio.EOF:
                            break
                        self._apply(feed, batch)
                        delay = self.retry_initial_s
                except OutOfSync as exc:
                    feed.resyncs += 1
                    log.warning("KV events of %s out of sync (%s); re-subscribing", feed.worker_id, exc)
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # stop() or the worker left
                    # Our own call.cancel() (resubscribe): grpc.aio reads raise CancelledError.
                    delay = 0.0
                except asyncio.TimeoutError:
                    log.warning("KV events of %s silent for %.0fs; reconnecting", feed.worker_id,
                                self.idle_timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        delay = self.retry_max_s  # an older worker: it has no events to give
                    if exc.code() != grpc.StatusCode.CANCELLED:  # CANCELLED: resubscribe()
                        log.info("KV events of %s: stream lost (%s)", feed.worker_id, exc.code().name)
                finally:
                    call.cancel()
                    feed.call = None
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(max(delay, self.retry_initial_s) * 2, self.retry_max_s)

    def _apply(self, feed: WorkerFeed, batch: worker_pb2.KVEventBatch) -> None:
        """Apply one message; OutOfSync (nothing applied) if it does not continue the feed."""
        feed.batches += 1
        if batch.snapshot:
            if batch.reset:
                self.index.cleared(feed.worker_id)
                feed.epoch, feed.seq, feed.pending = "", 0, (batch.epoch, batch.seq)
                feed.snapshots += 1
            elif feed.pending != (batch.epoch, batch.seq):
                raise OutOfSync("snapshot piece without its reset")
        else:
            if feed.pending is not None:  # the first delta completes the snapshot
                (feed.epoch, feed.seq), feed.pending = feed.pending, None
            if batch.epoch != feed.epoch:
                raise OutOfSync(f"epoch {batch.epoch!r}, expected {feed.epoch!r}")
            if batch.seq - len(batch.events) != feed.seq:
                first = batch.seq - len(batch.events) + 1
                raise OutOfSync(f"batch starts at {first}, expected {feed.seq + 1}")
            feed.seq = batch.seq
        self._apply_events(feed, batch.events)

    def _apply_events(self, feed: WorkerFeed, events: Sequence[worker_pb2.KVEvent]) -> None:
        index, worker_id, model = self.index, feed.worker_id, feed.model
        for event in events:
            kind = event.WhichOneof("event")
            if kind == "stored":
                stored = event.stored
                m = stored.model or model
                if not m:
                    feed.unattributed += 1
                    continue
                index.stored(worker_id, m, list(stored.block_hashes), index_tier(stored.tier))
            elif kind == "removed":
                removed = event.removed
                m = removed.model or model
                if not m:
                    feed.unattributed += 1
                    continue
                index.removed(worker_id, m, list(removed.block_hashes), index_tier(removed.tier))
            elif kind == "cleared":
                tier = event.cleared.tier
                index.cleared(worker_id, None if tier == worker_pb2.KV_TIER_UNSPECIFIED else index_tier(tier))
        feed.events += len(events)
