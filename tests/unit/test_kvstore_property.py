"""Random operation sequences on a BlockStore with a real disk tier keep its invariants:
byte accounting, no overlapping RAM slots, pinned blocks never evicted nor overwritten, and
no block ever served with bytes other than the ones written for it (even after a disk file
is damaged or the store restarts)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvstore import BlockStore, NoSpace, UnknownId, checksum
from services.kvstore_disk import FileDiskBackend
from tests.unit.test_kvstore_store import M, data_for, file_size

LAYOUTS = {"a": 16, "b": 24}  # two block sizes share the region through slabs
chains = st.lists(st.integers(1, 12), min_size=1, max_size=5, unique=True)
layouts = st.sampled_from(sorted(LAYOUTS))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-prop-"))
        self.now = 0.0
        self.writes: dict[str, tuple[str, dict[int, bool]]] = {}  # write_id -> (layout, hash -> bad bytes?)
        self.pins: dict[str, tuple[str, list]] = {}
        self.store = self._open()

    def _open(self) -> BlockStore:
        disk = FileDiskBackend(self.dir, fsync=False)
        return BlockStore(bytearray(144), disk, disk_bytes=5 * file_size(24, M, "b"), slab_bytes=48,
                          chunk_blocks=2, default_lease_s=5.0)

    def teardown(self) -> None:
        self.store._disk.close()  # noqa: SLF001
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(layout=layouts, hashes=chains, bad=st.sets(st.integers(1, 12), max_size=2),
          lease=st.sampled_from([0.0, 1.0, 3.0]), start=st.integers(0, 3))
    def reserve(self, layout, hashes, bad, lease, start) -> None:
        bb = LAYOUTS[layout]
        try:
            r = self.store.reserve(M, layout, bb, hashes, lease, self.now, start=start)
        except NoSpace:
            return
        written = {}
        for s in r.slots:
            d = data_for(s.block_hash, bb)
            if s.block_hash in bad:
                d = bytes(x ^ 0x5A for x in d)
            self.store.region[s.offset:s.offset + bb] = d
            written[s.block_hash] = s.block_hash in bad
        if r.write_id:
            self.writes[r.write_id] = (layout, written)

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def commit(self, data) -> None:
        wid = data.draw(st.sampled_from(sorted(self.writes)))
        layout, written = self.writes.pop(wid)
        sums = [checksum(data_for(h, LAYOUTS[layout])) for h in written]
        try:
            c = self.store.commit(wid, sums, self.now)
        except UnknownId:
            return  # its lease ended
        assert sorted(c.rejected) == sorted(h for h, b in written.items() if b)
        assert c.committed == len(written) - len(c.rejected)

    @precondition(lambda self: self.writes)
    @rule(data=st.data())
    def abort(self, data) -> None:
        wid = data.draw(st.sampled_from(sorted(self.writes)))
        del self.writes[wid]
        self.store.abort(wid)

    @rule(layout=layouts, hashes=chains)
    def put(self, layout, hashes) -> None:
        bb = LAYOUTS[layout]
        try:
            self.store.put(M, layout, hashes, [data_for(h, bb) for h in hashes], None, self.now)
        except NoSpace:
            pass

    @rule(layout=layouts, hashes=chains, lease=st.sampled_from([0.0, 1.0, 3.0]))
    def pin(self, layout, hashes, lease) -> None:
        try:
            p = self.store.pin(M, layout, hashes, lease, self.now)
        except NoSpace:
            return
        assert [s.block_hash for s in p.slots] == hashes[:len(p.slots)]
        if p.pin_id:
            self.pins[p.pin_id] = (layout, p.slots)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data) -> None:
        pid = data.draw(st.sampled_from(sorted(self.pins)))
        del self.pins[pid]
        self.store.unpin(pid)

    @rule(layout=layouts, hashes=chains)
    def lookup(self, layout, hashes) -> None:
        blocks, ram = self.store.lookup(M, layout, hashes, self.now)
        assert 0 <= ram <= blocks <= len(hashes)

    @rule(dt=st.sampled_from([0.5, 2.0, 6.0]))
    def advance(self, dt) -> None:
        self.now += dt
        self.store.expire(self.now)
        self.pins = {k: v for k, v in self.pins.items() if k in self.store._pins}  # noqa: SLF001

    @rule(data=st.data())
    def damage_a_disk_file(self, data) -> None:
        paths = sorted(p for p in self.dir.rglob("*.kvb"))
        if paths:
            p = data.draw(st.sampled_from(paths))
            raw = bytearray(p.read_bytes())
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0x01
            p.write_bytes(raw)

    @rule()
    def restart(self) -> None:
        self.store._disk.close()  # noqa: SLF001
        self.store = self._open()
        self.writes.clear()
        self.pins.clear()

    @invariant()
    def invariants_hold(self) -> None:
        self.store.check_invariants()
        st_ = self.store.stats()
        assert st_.ram.bytes_used <= st_.ram.bytes_total and st_.disk.bytes_used <= st_.disk.bytes_total

    @invariant()
    def pinned_blocks_keep_their_bytes(self) -> None:
        for pid, (layout, slots) in self.pins.items():
            views = self.store.read_pinned(pid)
            for s, v in zip(slots, views, strict=True):
                assert bytes(v) == data_for(s.block_hash, LAYOUTS[layout]), "a pinned block changed"
                assert checksum(v) == s.checksum


StoreMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestStoreMachine = StoreMachine.TestCase
