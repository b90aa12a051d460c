"""The subscriber's handling of KV stores without a network: stores come from their own member
directory, are holders of their own in the index (tier STORE), and their events name the model."""

from __future__ import annotations

from llm_mesh.v1 import kvstore_pb2, membership_pb2, worker_pb2
from scheduler.index import BlockIndex, Tier
from services.kv_events import KVEventSubscriber, WorkerFeed


class Members:
    """A MemberSource by hand: `members` and the listeners a directory would call."""

    def __init__(self) -> None:
        self.members: dict[str, membership_pb2.Member] = {}
        self.listeners = []

    def add_listener(self, listener) -> None:
        self.listeners.append(listener)

    def put(self, member: membership_pb2.Member | None, member_id: str) -> None:
        if member is None:
            self.members.pop(member_id, None)
        else:
            self.members[member_id] = member
        for listener in self.listeners:
            listener(member_id, member)


def store_member(member_id: str, address: str = "127.0.0.1:1") -> membership_pb2.Member:
    return membership_pb2.Member(id=member_id, kind=membership_pb2.MEMBER_KIND_KVSTORE, address=address,
                                 kvstore=kvstore_pb2.KVStoreInfo(ram_bytes=1 << 20, chunk_blocks=64))


def worker_member(member_id: str, model: str = "m") -> membership_pb2.Member:
    return membership_pb2.Member(id=member_id, kind=membership_pb2.MEMBER_KIND_WORKER, address="127.0.0.1:2",
                                 worker=membership_pb2.WorkerInfo(model=model, block_size=16))


def stored(hashes, model: str = "", tier=worker_pb2.KV_TIER_STORE) -> worker_pb2.KVEvent:
    return worker_pb2.KVEvent(stored=worker_pb2.BlockStored(block_hashes=hashes, tier=tier, model=model))


def removed(hashes, model: str = "", tier=worker_pb2.KV_TIER_STORE) -> worker_pb2.KVEvent:
    return worker_pb2.KVEvent(removed=worker_pb2.BlockRemoved(block_hashes=hashes, tier=tier, model=model))


def test_store_events_are_indexed_under_the_model_they_name():
    index = BlockIndex()
    feed = WorkerFeed("kvstore-1", "-", "", kvstore=True)
    sub = KVEventSubscriber(None, index)  # type: ignore[arg-type]
    sub._apply_events(feed, [stored([1, 2, 3], "m"), stored([1, 2], "other"), stored([9]),  # no model
                             removed([3], "m")])
    assert index.match_prefix("m", [1, 2, 3])["kvstore-1"].by_tier == [0, 0, 0, 2]
    assert index.match_prefix("other", [1, 2])["kvstore-1"].by_tier == [0, 0, 0, 2]
    assert index.match_prefix("", [9]) == {} and feed.unattributed == 1 and feed.events == 4


def test_a_workers_events_keep_its_own_model_unless_they_name_one():
    index = BlockIndex()
    feed = WorkerFeed("w", "-", "m")
    KVEventSubscriber(None, index)._apply_events(  # type: ignore[arg-type]
        feed, [stored([1, 2], tier=worker_pb2.KV_TIER_ENGINE), stored([5], "n", worker_pb2.KV_TIER_HOST)])
    assert index.match_prefix("m", [1, 2])["w"].by_tier == [2, 0, 0, 0]
    assert index.match_prefix("n", [5])["w"].by_tier == [0, 1, 0, 0] and feed.unattributed == 0


def test_stores_join_and_leave_through_their_own_directory():
    workers, stores = Members(), Members()
    index = BlockIndex()
    sub = KVEventSubscriber(workers, index, stores=stores)
    stores.members["kvstore-1"] = store_member("kvstore-1")
    workers.members["w"] = worker_member("w")
    sub.members.add_listener(sub._on_member)  # what start() does, without opening streams
    stores.add_listener(sub._on_store)
    for member_id, member in stores.members.items():
        sub._on_store(member_id, member)
    for member_id, member in workers.members.items():
        sub._on_member(member_id, member)
    assert sub.feeds["kvstore-1"].kvstore and sub.feeds["kvstore-1"].model == ""
    assert not sub.feeds["w"].kvstore and sub.feeds["w"].model == "m"
    index.stored("kvstore-1", "m", [1, 2], Tier.STORE)
    stores.put(store_member("kvstore-1"), "kvstore-1")  # same process, record updated: kept
    assert index.match_prefix("m", [1, 2])["kvstore-1"].blocks == 2
    stores.put(store_member("kvstore-1", "127.0.0.1:9"), "kvstore-1")  # another process: dropped
    assert "kvstore-1" not in index.match_prefix("m", [1, 2]) and "kvstore-1" in sub.feeds
    index.stored("kvstore-1", "m", [1, 2], Tier.STORE)
    stores.put(None, "kvstore-1")  # gone: its blocks leave the index
    assert index.match_prefix("m", [1, 2]) == {} and "kvstore-1" not in sub.feeds
    assert "w" in sub.feeds


def test_the_event_log_keeps_models_apart_and_names_them_in_snapshots():
    from services.engines.base import BlockRemoved, BlockStored
    from services.kv_event_log import KVEventLog

    log = KVEventLog(16)
    log.append([BlockStored((1, 2), None, (), 0, "STORE", model="a"),
                BlockStored((1,), None, (), 0, "STORE", model="b"),  # same hash, other model: announced
                BlockRemoved((2,), "STORE", model="b")])  # b never held 2: nothing to announce
    events = log.read(0)
    assert [(e.stored.model, list(e.stored.block_hashes)) for e in events] == [("a", [1, 2]), ("b", [1])]
    _, snap = log.snapshot()
    assert sorted((e.stored.model, tuple(e.stored.block_hashes), e.stored.tier) for e in snap) == [
        ("a", (1, 2), worker_pb2.KV_TIER_STORE), ("b", (1,), worker_pb2.KV_TIER_STORE)]
    log.append([BlockRemoved((1,), "STORE", model="a")])
    assert log.read(2)[0].removed.model == "a" and log.live_blocks() == {worker_pb2.KV_TIER_STORE: {1, 2}}
