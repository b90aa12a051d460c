"""KV events without a network: the worker's log (set semantics, numbering,
replay, snapshots), the sim engine's events against its own cache, and the
subscriber's gap/reset handling on hand-built batches."""

from __future__ import annotations

import asyncio
import random

import pytest

from llm_mesh.v1 import worker_pb2
from scheduler.block_hash import BlockHasher, external_block_hash
from scheduler.index import BlockIndex, Tier
from services.engines.base import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest, SamplingOptions
from services.engines.sim_model import SimConfig, SimLatency, SimModel
from services.kv_event_log import MAX_BATCH_EVENTS, KVEventLog, tier_of_medium
from services.kv_events import KVEventSubscriber, OutOfSync, WorkerFeed


class RecordingIndex:
    """The BlockIndex API over plain sets, strict about the stream's set
    semantics: storing a held hash or removing an unknown one fails."""

    def __init__(self, strict: bool = True) -> None:
        self.blocks: dict[str, dict[Tier, set[int]]] = {}
        self.models: dict[str, str] = {}
        self.strict = strict

    def stored(self, worker_id, model, block_hashes, tier=Tier.ENGINE) -> None:
        held = self.blocks.setdefault(worker_id, {}).setdefault(Tier(tier), set())
        self.models[worker_id] = model
        for h in block_hashes:
            assert not (self.strict and h in held), f"{h:x} stored twice on {worker_id}"
            held.add(h)

    def removed(self, worker_id, model, block_hashes, tier=Tier.ENGINE) -> None:
        held = self.blocks.get(worker_id, {}).get(Tier(tier), set())
        for h in block_hashes:
            assert not self.strict or h in held, f"{h:x} removed but not held on {worker_id}"
            held.discard(h)

    def cleared(self, worker_id, tier=None) -> None:
        tiers = self.blocks.get(worker_id, {})
        if tier is None:
            tiers.clear()
        else:
            tiers.pop(Tier(tier), None)

    def drop_worker(self, worker_id) -> None:
        self.blocks.pop(worker_id, None)

    def match(self, model, block_hashes):  # not used by the subscriber
        raise NotImplementedError

    def view(self) -> dict[str, dict[Tier, set[int]]]:
        return {w: {t: set(h) for t, h in tiers.items() if h} for w, tiers in self.blocks.items()
                if any(tiers.values())}


def apply(index: RecordingIndex, events, worker: str = "w") -> None:
    """Apply protobuf events as the subscriber does."""
    feed = WorkerFeed(worker, "-", "m")
    KVEventSubscriber(None, index)._apply_events(feed, events)  # type: ignore[arg-type]


def stored(hashes, parent=None, tokens=(), bs=2, medium=None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), bs, medium)


# --- the worker's log ----------------------------------------------------------------


def test_engine_events_become_set_transitions():
    log = KVEventLog(keep_token_ids=True)
    log.append([stored([1, 2, 3], tokens=[10, 11, 20, 21, 30, 31])])
    # 2 and 3 are held again (vLLM: a second block with the same hash), 4 is new.
    log.append([stored([2, 3, 4], parent=1, tokens=[20, 21, 30, 31, 40, 41])])
    events = log.read(0, with_tokens=True)
    assert [list(e.stored.block_hashes) for e in events] == [[1, 2, 3], [4]]
    assert events[1].stored.parent_block_hash == 3 and list(events[1].stored.token_ids) == [40, 41]
    assert not events[0].stored.HasField("parent_block_hash")
    # Removing one of two blocks holding 2 changes nothing; the second removal does.
    log.append([BlockRemoved((2,))])
    assert log.seq == 2
    log.append([BlockRemoved((2, 99))])  # 99 was never announced: ignored
    assert log.seq == 3 and list(log.read(2)[0].removed.block_hashes) == [2]
    assert log.live_blocks() == {worker_pb2.KV_TIER_ENGINE: {1, 3, 4}}


def test_a_store_with_held_blocks_in_the_middle_splits_into_runs_with_their_parents():
    log = KVEventLog(keep_token_ids=True)
    log.append([stored([2])])
    log.append([stored([1, 2, 3, 4], parent=7, tokens=[10, 11, 20, 21, 30, 31, 40, 41])])
    runs = [(list(e.stored.block_hashes), e.stored.parent_block_hash if e.stored.HasField("parent_block_hash")
             else None, list(e.stored.token_ids)) for e in log.read(1, with_tokens=True)]
    assert runs == [([1], 7, [10, 11]), ([3, 4], 2, [30, 31, 40, 41])]
    # Without the subscriber's opt-in, tokens stay home; without the worker's, they are not kept.
    assert all(not e.stored.token_ids for e in log.read(1))
    lean = KVEventLog()
    lean.append([stored([1, 2], tokens=[10, 11, 20, 21])])
    assert not lean.read(0, with_tokens=True)[0].stored.token_ids


def test_tiers_are_separate_and_clear_can_target_one():
    log = KVEventLog()
    log.append([stored([1]), stored([1], medium="CPU"), stored([5], medium="STORAGE")])
    assert log.live_blocks() == {worker_pb2.KV_TIER_ENGINE: {1}, worker_pb2.KV_TIER_HOST: {1},
                                 worker_pb2.KV_TIER_DISK: {5}}
    log.append([AllBlocksCleared("CPU")])
    assert log.read(3)[0].cleared.tier == worker_pb2.KV_TIER_HOST
    assert set(log.live_blocks()) == {worker_pb2.KV_TIER_ENGINE, worker_pb2.KV_TIER_DISK}
    log.append([AllBlocksCleared()])
    assert log.read(4)[0].cleared.tier == worker_pb2.KV_TIER_UNSPECIFIED and log.live_blocks() == {}


def test_medium_to_tier():
    assert tier_of_medium(None) == tier_of_medium("GPU") == tier_of_medium("gpu") == worker_pb2.KV_TIER_ENGINE
    assert tier_of_medium("CPU") == worker_pb2.KV_TIER_HOST
    assert tier_of_medium("STORAGE") == tier_of_medium("DISK") == worker_pb2.KV_TIER_DISK
    assert tier_of_medium("SOMETHING_NEW") == worker_pb2.KV_TIER_DISK  # never credited above what we know


def test_the_ring_replays_only_what_it_still_has():
    log = KVEventLog(capacity=4)
    for h in range(6):
        log.append([stored([h])])
    assert log.seq == 6 and log.oldest_seq == 3
    assert log.read(1) is None  # event 2 is gone
    assert [e.stored.block_hashes[0] for e in log.read(2)] == [2, 3, 4, 5]
    assert log.read(6) == [] and log.read(7) is None  # ahead of the log: another epoch
    assert len(log.read(2, limit=3)) == 3


async def collect(log: KVEventLog, request: worker_pb2.WatchKVEventsRequest, n: int) -> list:
    out = []
    async for batch in log.watch(request, heartbeat_s=0.05):
        out.append(batch)
        if len(out) == n:
            break
    return out


async def test_watch_snapshots_a_new_subscriber_then_streams_deltas():
    log = KVEventLog(block_size=2)
    log.append([stored([1, 2]), BlockRemoved((1,))])
    first, end = await collect(log, worker_pb2.WatchKVEventsRequest(), 2)
    assert first.snapshot and first.reset and first.seq == 2 and first.epoch == log.epoch
    assert list(first.events[0].stored.block_hashes) == [2] and first.events[0].stored.block_size == 2
    assert not end.snapshot and end.seq == 2 and not end.events  # completes the snapshot
    # Resuming at seq 1 of this epoch replays event 2; then a heartbeat.
    replay, heartbeat = await collect(log, worker_pb2.WatchKVEventsRequest(epoch=log.epoch, after_seq=1), 2)
    assert not replay.snapshot and replay.seq == 2 and len(replay.events) == 1
    assert heartbeat.seq == 2 and not heartbeat.events
    # Another epoch's position means nothing here: a snapshot.
    other, = await collect(log, worker_pb2.WatchKVEventsRequest(epoch="old", after_seq=1), 1)
    assert other.reset


async def test_a_subscriber_too_far_behind_gets_a_snapshot_in_stream():
    log = KVEventLog(capacity=8)
    log.append([stored([0])])
    stream = log.watch(worker_pb2.WatchKVEventsRequest(epoch=log.epoch, after_seq=0), heartbeat_s=10)
    assert (await anext(stream)).seq == 1
    for h in range(1, 21):  # the subscriber reads nothing meanwhile: 20 events > the ring
        log.append([stored([h])])
    batch = await anext(stream)
    assert batch.snapshot and batch.reset and batch.seq == 21
    assert set(batch.events[0].stored.block_hashes) == set(range(21))
    log.append([BlockRemoved((3,))])
    end = await anext(stream)
    assert not end.snapshot and end.seq == 22 and list(end.events[0].removed.block_hashes) == [3]
    log.close()
    assert await anext(stream, None) is None


async def test_a_steady_flow_of_events_goes_out_once_per_interval_and_a_backlog_at_once():
    loop, interval = asyncio.get_running_loop(), 0.5
    log = KVEventLog(send_interval_s=interval)
    stream = log.watch(worker_pb2.WatchKVEventsRequest(epoch=log.epoch, after_seq=0), heartbeat_s=10)
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)  # the stream is idle, waiting for an event
    t0 = loop.time()
    log.append([stored([0])])
    first = await reading
    assert first.seq == 1 and loop.time() - t0 < interval / 2  # after a quiet spell: at once
    for h in range(1, 6):  # more keep coming
        log.append([stored([h])])
    second = await anext(stream)
    assert loop.time() - t0 >= interval  # waited out the interval since the first...
    assert [e.stored.block_hashes[0] for e in second.events] == [1, 2, 3, 4, 5] and second.seq == 6  # ...with all
    log.append([stored([h]) for h in range(6, 6 + MAX_BATCH_EVENTS + 10)])
    full = await anext(stream)  # (after the interval since the second)
    t1 = loop.time()
    rest = await anext(stream)
    assert len(full.events) == MAX_BATCH_EVENTS and len(rest.events) == 10
    assert loop.time() - t1 < interval / 2  # a backlog: the next message without waiting
    assert rest.seq == 6 + MAX_BATCH_EVENTS + 10
    log.close()


def test_send_interval_must_not_be_negative():
    with pytest.raises(ValueError, match="send_interval_s"):
        KVEventLog(send_interval_s=-1)


def sim_requests(seed: int, n: int, block_size: int) -> list[EngineRequest]:
    """Requests sharing prefixes: 4 system prompts × random tails."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1, 4000) for _ in range(5 * block_size)] for _ in range(4)]
    return [EngineRequest(f"r{i}", rng.choice(systems) + [rng.randrange(1, 4000) for _ in range(rng.randrange(1, 90))],
                          SamplingOptions(max_tokens=rng.randrange(1, 40), temperature=0))
            for i in range(n)]


def test_sim_events_replayed_from_empty_are_exactly_its_cache():
    """Under eviction and preemption pressure, the log and every subscriber
    (strict set semantics) end with the engine's own prefix cache."""
    log = KVEventLog(capacity=1 << 20, keep_token_ids=True)
    model = SimModel(SimConfig(block_size=4, num_blocks=96, max_num_seqs=6, latency=SimLatency()),
                     on_kv_event=lambda e: log.append([e]))
    for i, request in enumerate(sim_requests(0, 120, 4)):
        model.add_request(request, now=i * 0.01)
        model.advance(i * 0.01)
    while (t := model.next_event_time()) is not None:
        model.advance(t)
    assert model.stats.blocks_evicted > 50 and model.stats.preemptions > 0  # the test exercises both
    truth = {external_block_hash(h) for h in model.pool._cached}
    assert log.live_blocks() == {worker_pb2.KV_TIER_ENGINE: truth}
    replica = RecordingIndex()
    apply(replica, log.read(0, limit=log.seq))
    assert replica.view() == {"w": {Tier.ENGINE: truth}}
    # A stored event's hashes are the chained hashes of its tokens.
    hasher = BlockHasher(4)
    for event in log.read(0, limit=log.seq, with_tokens=True):
        if event.WhichOneof("event") == "stored" and not event.stored.HasField("parent_block_hash"):
            tokens = list(event.stored.token_ids)
            assert [external_block_hash(h) for h in hasher.hash_blocks(tokens)] == list(event.stored.block_hashes)
    # A reset of an idle engine clears everything, as vLLM's does.
    assert model.reset_prefix_cache() and log.live_blocks() == {}


# --- the subscriber's bookkeeping ---------------------------------------------------


def batch(epoch: str, seq: int, events=(), snapshot=False, reset=False) -> worker_pb2.KVEventBatch:
    return worker_pb2.KVEventBatch(epoch=epoch, seq=seq, events=list(events), snapshot=snapshot, reset=reset)


def ev_stored(*hashes: int) -> worker_pb2.KVEvent:
    return worker_pb2.KVEvent(stored=worker_pb2.BlockStored(block_hashes=hashes, tier=worker_pb2.KV_TIER_ENGINE))


def test_subscriber_applies_a_snapshot_then_checks_every_delta_continues_it():
    index = RecordingIndex()
    sub = KVEventSubscriber(None, index)  # type: ignore[arg-type]
    feed = WorkerFeed("w", "-", "m")
    index.stored("w", "m", [99])  # stale knowledge: the reset must wipe it
    sub._apply(feed, batch("e1", 5, [ev_stored(1, 2)], snapshot=True, reset=True))
    assert (feed.epoch, feed.seq, feed.pending) == ("", 0, ("e1", 5))  # not resumable until complete
    sub._apply(feed, batch("e1", 5, [ev_stored(3)], snapshot=True))
    sub._apply(feed, batch("e1", 6, [ev_stored(4)]))
    assert (feed.epoch, feed.seq, feed.pending) == ("e1", 6, None)
    assert index.view() == {"w": {Tier.ENGINE: {1, 2, 3, 4}}}
    with pytest.raises(OutOfSync):  # events 7..7 missing
        sub._apply(feed, batch("e1", 9, [ev_stored(5), ev_stored(6)]))
    with pytest.raises(OutOfSync):  # a restarted worker's numbering
        sub._apply(feed, batch("e2", 7, [ev_stored(5)]))
    with pytest.raises(OutOfSync):  # a snapshot piece without its reset
        sub._apply(feed, batch("e1", 6, [ev_stored(5)], snapshot=True))
    assert index.view() == {"w": {Tier.ENGINE: {1, 2, 3, 4}}} and feed.seq == 6  # nothing half-applied
    sub._apply(feed, batch("e1", 6))  # heartbeat
    sub._apply(feed, batch("e1", 8, [ev_stored(5), worker_pb2.KVEvent(
        cleared=worker_pb2.AllBlocksCleared(tier=worker_pb2.KV_TIER_UNSPECIFIED))]))
    assert index.view() == {} and feed.seq == 8 and feed.events == 5


def test_subscriber_feeds_the_real_block_index():
    index = BlockIndex()
    sub = KVEventSubscriber(None, index)  # type: ignore[arg-type]
    feed = WorkerFeed("w", "-", "m")
    sub._apply(feed, batch("e", 0, [], snapshot=True, reset=True))
    sub._apply(feed, batch("e", 2, [ev_stored(1, 2, 3), worker_pb2.KVEvent(stored=worker_pb2.BlockStored(
        block_hashes=[4], tier=worker_pb2.KV_TIER_HOST))]))
    assert index.match("m", [1, 2, 3, 4]) == {"w": [Tier.ENGINE] * 3 + [Tier.HOST]}
    sub._apply(feed, batch("e", 3, [worker_pb2.KVEvent(removed=worker_pb2.BlockRemoved(
        block_hashes=[2], tier=worker_pb2.KV_TIER_ENGINE))]))
    assert index.match("m", [1, 2, 3]) == {"w": [Tier.ENGINE]}


async def test_subscriber_follows_membership_and_drops_leavers():
    class Directory:
        def __init__(self):
            self.members, self.listeners = {}, []

        def add_listener(self, listener):
            self.listeners.append(listener)

    from llm_mesh.v1 import membership_pb2

    directory, index = Directory(), RecordingIndex()
    member = membership_pb2.Member(id="w1", address="127.0.0.1:1", worker=membership_pb2.WorkerInfo(model="m"))
    directory.members["w1"] = member
    sub = KVEventSubscriber(directory, index, retry_initial_s=10)
    await sub.start()
    assert set(sub.feeds) == {"w1"} and sub.feeds["w1"].task is not None
    index.stored("w1", "m", [1])
    task = sub.feeds["w1"].task
    directory.listeners[0]("w1", member)  # same record again: nothing changes
    assert sub.feeds["w1"].task is task
    directory.listeners[0]("w1", None)
    assert sub.feeds == {} and index.view() == {}
    await asyncio.sleep(0)
    assert task.cancelled() or task.done()
    await sub.stop()
