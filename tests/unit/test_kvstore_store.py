"""kvstore.BlockStore: tiers, LRU, pins and leases, checksums at commit, events and chunks,
input validation. Disk tiers are real directories (services/kvstore_disk.FileDiskBackend)."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Sequence

import pytest

from kvstore import (
    MAX_CHAIN,
    REMOVED,
    STORED,
    BlockStore,
    ChunkKey,
    InvalidArgument,
    LayoutMismatch,
    NoSpace,
    UnknownId,
    checksum,
)
from kvstore import disk_format as fmt
from services.kvstore_disk import FileDiskBackend

M, L = "model-a", "layout-1"


def data_for(h: int, bb: int) -> bytes:
    """Distinct bytes per block hash, so a block served from the wrong slot is caught."""
    seed = h.to_bytes(8, "little")
    return (seed * (bb // 8 + 1))[:bb]


def file_size(bb: int, model: str = M, layout: str = L) -> int:
    return len(fmt.encode_header(fmt.BlockHeader(model, layout, 0, 0, 0, bb, 0))) + bb


def make(ram_blocks: int, bb: int, tmp_path=None, disk_blocks: int = 0, **kw) -> BlockStore:
    """A store whose RAM holds exactly `ram_blocks` blocks of `bb` bytes (one slab per block)."""
    region = bytearray(ram_blocks * bb)
    if tmp_path is None:
        return BlockStore(region, slab_bytes=bb, **kw)
    disk = FileDiskBackend(tmp_path / "disk", fsync=False)
    return BlockStore(region, disk, disk_bytes=disk_blocks * file_size(bb), slab_bytes=bb, **kw)


def write(store: BlockStore, hashes: Sequence[int], bb: int, now: float = 0.0, *, model: str = M,
          layout: str = L, start: int = 0, parent: int | None = None,
          bad: Sequence[int] = ()) -> tuple[int, list[int]]:
    """Reserve, fill each slot with data_for(hash), commit with the writer's checksums."""
    r = store.reserve(model, layout, bb, hashes, 0, now, start=start, parent=parent)
    sums = []
    for s in r.slots:
        d = data_for(s.block_hash, bb)
        sums.append(checksum(d))
        if s.block_hash in bad:  # the bytes that land differ from the writer's copy
            d = bytes(b ^ 0xFF for b in d)
        store.region[s.offset:s.offset + s.length] = d
    c = store.commit(r.write_id, sums, now)
    return c.committed, c.rejected


def read(store: BlockStore, hashes: Sequence[int], now: float = 0.0, *, model: str = M,
         layout: str = L) -> list[int]:
    """Pin, check every served block's bytes and checksum, unpin; the hashes served."""
    p = store.pin(model, layout, hashes, 0, now)
    views = store.read_pinned(p.pin_id) if p.pin_id else []
    for s, v in zip(p.slots, views, strict=True):
        assert bytes(v) == data_for(s.block_hash, s.length), f"block {s.block_hash} served wrong bytes"
        assert checksum(v) == s.checksum
    store.unpin(p.pin_id)
    return [s.block_hash for s in p.slots]


def test_ram_hit_serves_the_written_bytes() -> None:
    s = make(8, 64)
    assert write(s, [11, 12, 13], 64) == (3, [])
    assert s.lookup(M, L, [11, 12, 13, 14], 0.0) == (3, 3)
    assert s.lookup(M, L, [12, 13], 0.0) == (2, 2)  # any run of held blocks
    assert s.lookup(M, "other-layout", [11], 0.0) == (0, 0)
    assert read(s, [11, 12, 13, 14]) == [11, 12, 13]
    st = s.stats()
    assert (st.ram.blocks, st.ram.bytes_used, st.ram.bytes_total) == (3, 192, 512)
    assert st.stored_blocks == 3 and st.pinned_blocks == 0 and st.reserved_blocks == 0
    s.check_invariants()


def test_eviction_spills_to_disk_and_a_disk_hit_reads_back_to_ram(tmp_path) -> None:
    s = make(4, 100, tmp_path, disk_blocks=8)
    write(s, [1, 2, 3, 4], 100)
    write(s, [5, 6], 100)  # RAM holds 4: the two least recently used spill
    assert s.lookup(M, L, [1, 2, 3, 4], 0.0) == (4, 2)
    st = s.stats()
    assert (st.ram.blocks, st.disk.blocks, st.spilled_blocks, st.evicted_blocks) == (4, 2, 2, 0)
    assert st.disk.bytes_used == 2 * file_size(100)
    assert s.drain_events()[-1].kind == STORED  # a spill is not an event
    assert read(s, [1, 2, 3, 4]) == [1, 2, 3, 4]  # 1 and 2 come back from disk, verified
    # Reading them back evicted 5 and 6 (the LRU), never 3 or 4 of the chain being pinned.
    assert s.lookup(M, L, [1, 2, 3, 4], 0.0) == (4, 4)
    assert s.lookup(M, L, [5, 6], 0.0) == (2, 0)
    assert s.stats().spilled_blocks == 4
    write(s, [7, 8], 100)  # evicts 1 and 2, which kept their disk copies: no write
    st = s.stats()
    assert st.spilled_blocks == 4 and st.disk.blocks == 4
    assert s.lookup(M, L, [1, 2, 3, 4], 0.0) == (4, 2)
    assert read(s, [5, 6, 7, 8]) == [5, 6, 7, 8]
    s.check_invariants()


def test_lru_evicts_the_least_recently_used_block() -> None:
    s = make(3, 32)
    write(s, [1], 32)
    write(s, [2], 32)
    write(s, [3], 32)
    read(s, [1])  # 1 is now the most recent; 2 is the least
    s.drain_events()
    write(s, [4], 32)
    assert s.drain_events() == [(REMOVED, M, L, [2]), (STORED, M, L, [4])]
    write(s, [5], 32)
    assert s.lookup(M, L, [3], 0.0).blocks == 0  # then 3
    assert [s.lookup(M, L, [h], 0.0).blocks for h in (1, 4, 5)] == [1, 1, 1]
    assert s.stats().evicted_blocks == 2
    s.check_invariants()


def test_a_write_touches_its_own_chain_before_evicting() -> None:
    s = make(4, 32)
    write(s, [1, 2], 32)
    write(s, [9, 10], 32)
    s.drain_events()
    write(s, [1, 2, 3], 32)  # extends chain 1,2: the other chain's oldest block goes, not 1
    assert s.drain_events() == [(REMOVED, M, L, [9]), (STORED, M, L, [3])]


def test_pinned_blocks_are_never_evicted_and_no_space_when_all_are_pinned(tmp_path) -> None:
    s = make(2, 50, tmp_path, disk_blocks=4)
    write(s, [1, 2], 50)
    p = s.pin(M, L, [1, 2], 0, 0.0)
    assert [x.block_hash for x in p.slots] == [1, 2] and s.stats().pinned_blocks == 2
    with pytest.raises(NoSpace):
        s.reserve(M, L, 50, [3], 0, 0.0)
    with pytest.raises(NoSpace):
        s.put(M, L, [3], [data_for(3, 50)], None, 0.0)
    assert bytes(s.read_pinned(p.pin_id)[0]) == data_for(1, 50)
    p2 = s.pin(M, L, [1], 0, 0.0)  # pins count: 1 stays pinned while p2 holds it
    s.unpin(p.pin_id)
    s.unpin(p.pin_id)  # idempotent
    assert write(s, [3], 50) == (1, [])  # 2 (unpinned) goes to disk, 1 (pinned by p2) stays
    assert s.lookup(M, L, [1], 0.0).ram_blocks == 1 and s.lookup(M, L, [2], 0.0) == (1, 0)
    s.unpin(p2.pin_id)
    s.check_invariants()


def test_reserved_slots_are_not_evicted() -> None:
    s = make(2, 16)
    r = s.reserve(M, L, 16, [1, 2], 0, 0.0)
    assert len(r.slots) == 2 and s.stats().reserved_blocks == 2
    with pytest.raises(NoSpace):
        s.reserve(M, L, 16, [3], 0, 0.0)
    # Another writer of the same blocks is told they are taken (no slots), not NoSpace.
    assert s.reserve(M, L, 16, [1, 2], 0, 0.0).slots == []
    assert s.lookup(M, L, [1], 0.0).blocks == 0  # reserved is not held
    s.abort(r.write_id)
    s.abort(r.write_id)
    assert len(s.reserve(M, L, 16, [3], 0, 0.0).slots) == 1


def test_a_partial_reservation_covers_the_leading_blocks() -> None:
    s = make(3, 16)
    p_write = write(s, [1], 16)
    assert p_write == (1, [])
    pin = s.pin(M, L, [1], 0, 0.0)
    r = s.reserve(M, L, 16, [1, 2, 3, 4, 5], 0, 0.0)  # 1 held; two free slots for 2..5
    assert [x.block_hash for x in r.slots] == [2, 3]
    s.unpin(pin.pin_id)


def test_pin_lease_expires() -> None:
    s = make(1, 16)
    write(s, [1], 16)
    p = s.pin(M, L, [1], 5.0, 100.0)
    assert p.lease_s == 5.0
    with pytest.raises(NoSpace):
        s.reserve(M, L, 16, [2], 0, 104.9)
    assert s.stats().pinned_blocks == 1
    assert len(s.reserve(M, L, 16, [2], 0, 105.0).slots) == 1  # the pin ended at 105: 1 evicted
    assert s.stats().pinned_blocks == 0
    with pytest.raises(UnknownId):
        s.read_pinned(p.pin_id)
    s.unpin(p.pin_id)  # a stale unpin is harmless
    s.check_invariants()


def test_reservation_lease_expires_and_frees_its_slots() -> None:
    s = make(2, 16, default_lease_s=2.0)
    r = s.reserve(M, L, 16, [1, 2], 0, 10.0)
    assert r.lease_s == 2.0
    assert s.expire(11.9) == 0
    with pytest.raises(UnknownId):
        s.commit(r.write_id, None, 12.0)  # expired at 12.0: commit itself sees it
    st = s.stats()
    assert st.reserved_blocks == 0 and st.ram.blocks == 0
    assert len(s.reserve(M, L, 16, [1, 2], 0, 12.0).slots) == 2
    s.check_invariants()


def test_expire_returns_how_many_leases_ended() -> None:
    s = make(4, 16)
    write(s, [1], 16)
    s.pin(M, L, [1], 1.0, 0.0)
    s.pin(M, L, [1], 3.0, 0.0)
    s.reserve(M, L, 16, [2], 2.0, 0.0)
    assert s.expire(0.5) == 0
    assert s.expire(2.0) == 2
    assert s.stats().pinned_blocks == 1
    assert s.expire(3.0) == 1
    assert s.stats().pinned_blocks == 0


def test_lease_bookkeeping_stays_bounded_when_leases_end_early() -> None:
    s = make(2, 8)
    write(s, [1], 8)
    for _ in range(5000):
        s.unpin(s.pin(M, L, [1], 600.0, 0.0).pin_id)
    assert len(s._deadlines) < 2000  # noqa: SLF001 - stale deadlines are compacted away
    p = s.pin(M, L, [1], 1.0, 0.0)
    assert s.expire(1.0) == 1 and p.pin_id not in s._pins  # noqa: SLF001


def test_commit_with_a_wrong_checksum_rejects_that_block() -> None:
    s = make(4, 40)
    assert write(s, [1, 2, 3], 40, bad=[2]) == (2, [2])
    assert s.lookup(M, L, [1, 2, 3], 0.0) == (1, 1)  # the run stops at the rejected block
    assert s.lookup(M, L, [3], 0.0) == (1, 1)
    st = s.stats()
    assert st.ram.blocks == 2 and st.stored_blocks == 2
    assert write(s, [2], 40) == (1, [])  # its slot was freed; a good rewrite succeeds
    assert read(s, [1, 2, 3]) == [1, 2, 3]
    s.check_invariants()


def test_commit_without_checksums_takes_what_landed() -> None:
    s = make(2, 24)
    r = s.reserve(M, L, 24, [5], 0, 0.0)
    s.region[r.slots[0].offset:r.slots[0].offset + 24] = b"z" * 24
    assert s.commit(r.write_id, None, 0.0) == (1, [])
    assert s.pin(M, L, [5], 0, 0.0).slots[0].checksum == checksum(b"z" * 24)


def test_commit_unknown_twice_and_empty_ids() -> None:
    s = make(2, 8)
    with pytest.raises(UnknownId):
        s.commit("w-nope-1", None, 0.0)
    r = s.reserve(M, L, 8, [1], 0, 0.0)
    with pytest.raises(InvalidArgument) as e:
        s.commit(r.write_id, [1, 2], 0.0)  # one slot, two checksums
    assert e.value.field == "checksums"
    s.commit(r.write_id, None, 0.0)  # the bad call did not consume the reservation
    with pytest.raises(UnknownId):
        s.commit(r.write_id, None, 0.0)
    assert s.reserve(M, L, 8, [1], 0, 0.0).write_id == ""  # nothing to write
    assert s.commit("", None, 0.0) == (0, [])
    s.abort("")


def test_ids_from_another_store_instance_are_unknown() -> None:
    a, b = make(2, 8), make(2, 8)
    r = a.reserve(M, L, 8, [1], 0, 0.0)
    b.reserve(M, L, 8, [1], 0, 0.0)
    with pytest.raises(UnknownId):  # a restarted store never takes an old writer's commit
        b.commit(r.write_id, None, 0.0)


def test_layout_mismatch() -> None:
    s = make(4, 64)
    write(s, [1], 32)
    with pytest.raises(LayoutMismatch) as e:
        s.reserve(M, L, 64, [2], 0, 0.0)
    assert (e.value.block_bytes, e.value.expected) == (64, 32)
    with pytest.raises(LayoutMismatch):
        s.put(M, L, [2], [b"x" * 33], None, 0.0)
    write(s, [2], 64, layout="layout-2")  # another layout, another size, same region
    write(s, [2], 16, model="model-b")
    assert s.block_bytes(M, L) == 32 and s.block_bytes(M, "layout-2") == 64
    s.check_invariants()


def test_block_sizes_share_the_region_through_slabs() -> None:
    s = BlockStore(bytearray(1024), slab_bytes=256)
    write(s, list(range(1, 9)), 128, layout="big")  # 4 slabs of 2 x 128 fill the region
    assert s.stats().ram.blocks == 8
    assert write(s, [100, 101, 102], 64, layout="small") == (3, [])  # a whole big slab is freed
    assert s.lookup(M, "big", list(range(1, 9)), 0.0).blocks == 0  # 1, 2 (its oldest) went first
    assert s.lookup(M, "big", list(range(3, 9)), 0.0).blocks == 6
    assert read(s, [100, 101, 102], layout="small") == [100, 101, 102]
    assert read(s, list(range(3, 9)), layout="big") == list(range(3, 9))
    s.check_invariants()


def test_put_is_the_bytes_path() -> None:
    s = make(4, 16)
    blocks = [data_for(h, 16) for h in (1, 2, 3)]
    sums = [checksum(blocks[0]), None, checksum(b"something else")]
    assert s.put(M, L, [1, 2, 3], blocks, sums, 0.0) == (2, [3])
    assert s.put(M, L, [1, 2], blocks[:2], None, 0.0) == (0, [])  # already stored
    assert read(s, [1, 2, 3]) == [1, 2]
    assert s.stats().stored_blocks == 2
    s.check_invariants()


def test_events_and_chunk_changes() -> None:
    s = make(5, 8, chunk_blocks=2)
    hashes = [10, 11, 12, 13, 14]
    write(s, hashes, 8)
    assert s.drain_events() == [(STORED, M, L, hashes)]
    assert s.drain_chunk_changes() == {
        ChunkKey(M, L, 10): [10, 11], ChunkKey(M, L, 12): [12, 13], ChunkKey(M, L, 14): [14]}
    assert s.drain_events() == [] and s.drain_chunk_changes() == {}
    read(s, [10, 11, 12, 13])  # 14 is now the least recently used
    write(s, [20], 8)  # evicts 14: chunk 14 is gone
    assert s.drain_events() == [(REMOVED, M, L, [14]), (STORED, M, L, [20])]
    assert s.drain_chunk_changes() == {ChunkKey(M, L, 14): [], ChunkKey(M, L, 20): [20]}
    write(s, [21], 8)  # evicts 10 (LRU): chunk 10 keeps 11
    assert s.drain_chunk_changes() == {ChunkKey(M, L, 10): [11], ChunkKey(M, L, 21): [21]}


def test_a_write_that_starts_inside_a_chunk() -> None:
    s = make(12, 8, chunk_blocks=4)
    write(s, [30, 31, 32, 33, 34], 8, start=2)  # positions 2..6: chunks [0,4) and [4,8)
    assert s.drain_chunk_changes() == {ChunkKey(M, L, 30): [30, 31], ChunkKey(M, L, 32): [32, 33, 34]}
    # Block by block, naming the parent: every block joins its chunk's one record.
    for pos, h in enumerate([40, 41, 42, 43, 44, 45]):
        write(s, [h], 8, start=pos, parent=None if pos == 0 else 40 + pos - 1)
    assert s.drain_chunk_changes() == {ChunkKey(M, L, 40): [40, 41, 42, 43], ChunkKey(M, L, 44): [44, 45]}
    write(s, [51], 8, start=1, parent=50)  # a parent the store does not hold: a record of its own
    assert s.drain_chunk_changes() == {ChunkKey(M, L, 51): [51]}
    with pytest.raises(InvalidArgument) as e:
        s.reserve(M, L, 8, [60], 0, 0.0, parent=59)  # start 0 has no parent
    assert e.value.field == "parent"


@pytest.mark.parametrize("hashes, why", [
    ([], "empty chain"),
    (list(range(MAX_CHAIN + 1)), "at most"),
    ([-1], "uint64"),
    ([1 << 64], "uint64"),
    ([True], "uint64"),
    ([1.0], "uint64"),
    ([1, 2, 1], "repeated"),
    ("abc", "sequence"),
])
def test_chains_are_validated(hashes, why) -> None:
    s = make(2, 8)
    for call in (lambda: s.lookup(M, L, hashes, 0.0), lambda: s.pin(M, L, hashes, 0, 0.0),
                 lambda: s.reserve(M, L, 8, hashes, 0, 0.0)):
        with pytest.raises(InvalidArgument) as e:
            call()
        assert e.value.field == "hashes" and why in e.value.reason


def test_a_chain_of_max_length_is_accepted() -> None:
    s = BlockStore(bytearray(MAX_CHAIN), slab_bytes=1 << 16)
    hashes = list(range(1 << 40, (1 << 40) + MAX_CHAIN))
    assert len(s.reserve(M, L, 1, hashes, 0, 0.0).slots) == MAX_CHAIN


@pytest.mark.parametrize("field, call", [
    ("block_bytes", lambda s: s.reserve(M, L, 0, [1], 0, 0.0)),
    ("block_bytes", lambda s: s.reserve(M, L, -5, [1], 0, 0.0)),
    ("block_bytes", lambda s: s.reserve(M, L, 10_000, [1], 0, 0.0)),  # larger than the region
    ("lease_s", lambda s: s.reserve(M, L, 8, [1], -1.0, 0.0)),
    ("lease_s", lambda s: s.pin(M, L, [1], math.nan, 0.0)),
    ("lease_s", lambda s: s.pin(M, L, [1], math.inf, 0.0)),
    ("lease_s", lambda s: s.pin(M, L, [1], 600.5, 0.0)),
    ("lease_s", lambda s: s.pin(M, L, [1], "5", 0.0)),
    ("now", lambda s: s.lookup(M, L, [1], math.nan)),
    ("model", lambda s: s.lookup("", L, [1], 0.0)),
    ("model", lambda s: s.lookup(None, L, [1], 0.0)),
    ("layout", lambda s: s.lookup(M, "x" * 5000, [1], 0.0)),
    ("layout", lambda s: s.lookup(M, "\udc80", [1], 0.0)),
    ("start", lambda s: s.reserve(M, L, 8, [1], 0, 0.0, start=-1)),
    ("data", lambda s: s.put(M, L, [1, 2], [b"a" * 8], None, 0.0)),
    ("data", lambda s: s.put(M, L, [1, 2], [b"a" * 8, b"b" * 7], None, 0.0)),
    ("data", lambda s: s.put(M, L, [1], [b""], None, 0.0)),
    ("data", lambda s: s.put(M, L, [1], [12345], None, 0.0)),
    ("checksums", lambda s: s.put(M, L, [1], [b"a" * 8], [1 << 32], 0.0)),
])
def test_inputs_are_validated(field, call) -> None:
    s = make(2, 8)
    with pytest.raises(InvalidArgument) as e:
        call(s)
    assert e.value.field == field
    s.check_invariants()
    assert s.stats().reserved_blocks == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"region": bytes(8)}, "region"),
    ({"region": bytearray(0)}, "region"),
    ({"chunk_blocks": 0}, "chunk_blocks"),
    ({"default_lease_s": 0}, "default_lease_s"),
    ({"default_lease_s": 700}, "default_lease_s"),
    ({"slab_bytes": 0}, "slab_bytes"),
])
def test_constructor_is_validated(kwargs, field) -> None:
    kwargs = {"region": bytearray(64), **kwargs}
    with pytest.raises(InvalidArgument) as e:
        BlockStore(**kwargs)
    assert e.value.field == field


def test_disk_tier_needs_a_size(tmp_path) -> None:
    with FileDiskBackend(tmp_path) as disk, pytest.raises(InvalidArgument) as e:
        BlockStore(bytearray(64), disk)
    assert e.value.field == "disk_bytes"


def test_pins_are_bounded() -> None:
    s = make(2, 8, max_pins=2)
    write(s, [1], 8)
    s.pin(M, L, [1], 0, 0.0)
    s.pin(M, L, [1], 0, 0.0)
    with pytest.raises(NoSpace):
        s.pin(M, L, [1], 0, 0.0)
    assert s.pin(M, L, [1], 0, 31.0).pin_id  # the first two expired (30 s default)


def test_misses_and_hits_are_counted() -> None:
    s = make(4, 8)
    write(s, [1, 2], 8)
    s.lookup(M, L, [1, 2, 3, 4], 0.0)
    assert s.pin(M, L, [5, 1], 0, 0.0).pin_id == ""  # the first block is missing: nothing pinned
    st = s.stats()
    assert (st.hit_blocks, st.miss_blocks) == (2, 4)


def test_bookkeeping_memory_per_block_is_bounded() -> None:
    # kvstore/README.md states ~400 bytes per held RAM block (the index's Python objects,
    # hash ints included); 20,000 one-byte blocks so the region itself is negligible.
    n = 20_000
    s = BlockStore(bytearray(n), slab_bytes=4096)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    hashes = [(1 << 63) + i * 7919 for i in range(n)]
    for i in range(0, n, 1000):
        r = s.reserve(M, L, 1, hashes[i:i + 1000], 0, 0.0, start=i)
        s.commit(r.write_id, None, 0.0)
    del hashes, r
    s.drain_events()
    s.drain_chunk_changes()
    per_block = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    assert s.stats().ram.blocks == n
    assert 200 < per_block < 512, per_block
