"""The disk tier: services/kvstore_disk.FileDiskBackend on real directories, the block file
format, corrupt files as misses, restart recovery, torn writes, and a kill -9 mid-spill."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from kvstore import REMOVED, STORED, BlockStore, ChunkKey
from kvstore import disk_format as fmt
from services.kvstore_disk import DirectoryLocked, FileDiskBackend
from services.procs import Child
from tests.unit.test_kvstore_store import L, M, file_size, read, write


def files(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def block_file(root: Path, h: int, model: str = M, layout: str = L) -> Path:
    return files(root)[fmt.file_name(model, layout, h)]


def spilled_store(tmp_path: Path, n: int = 6, ram: int = 2, bb: int = 64, disk_blocks: int = 16, **kw):
    """A store with a chain 1..n written; all but the last `ram` blocks spilled to disk."""
    s = BlockStore(bytearray(ram * bb), FileDiskBackend(tmp_path / "disk", fsync=False),
                   disk_bytes=disk_blocks * file_size(bb), slab_bytes=bb, **kw)
    for h in range(1, n + 1):
        write(s, list(range(1, h + 1)), bb)  # the chain so far; held blocks are skipped
    assert s.lookup(M, L, list(range(1, n + 1)), 0.0) == (n, ram)
    return s


def reopen(tmp_path: Path, s: BlockStore | None, ram: int = 8, bb: int = 64, disk_blocks: int = 16, **kw):
    if s is not None:
        s._disk.close()  # noqa: SLF001 - a stopped store releases its directory lock
    return BlockStore(bytearray(ram * bb), FileDiskBackend(tmp_path / "disk", fsync=False),
                      disk_bytes=disk_blocks * file_size(bb), slab_bytes=bb, **kw)


# ------------------------------------------------------------------------- backend
def test_backend_writes_atomically_reads_scans_deletes(tmp_path) -> None:
    with FileDiskBackend(tmp_path) as d:
        d.write("a-1.kvb", [b"hello ", memoryview(b"world")])
        d.write("b-2.kvb", b"x" * 10)
        assert d.read("a-1.kvb") == b"hello world"
        assert d.read("a-1.kvb", 5) == b"hello"
        assert d.read("missing.kvb") is None
        d.write("a-1.kvb", b"new")  # replaces
        assert d.read("a-1.kvb") == b"new"
        assert sorted(d.scan()) == [("a-1.kvb", 3), ("b-2.kvb", 10)]
        assert not [p for p in tmp_path.rglob("*.tmp")]
        d.delete("b-2.kvb")
        d.delete("b-2.kvb")  # idempotent
        assert list(d.scan()) == [("a-1.kvb", 3)]


def test_backend_scan_is_oldest_first(tmp_path) -> None:
    with FileDiskBackend(tmp_path) as d:
        for i, name in enumerate(["c.kvb", "a.kvb", "b.kvb"]):
            d.write(name, b"x")
            os.utime(d.path(name), ns=(10**18 + i, 10**18 + i))
        assert [n for n, _ in d.scan()] == ["c.kvb", "a.kvb", "b.kvb"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x.kvb.tmp", ".lock", "é.kvb", "a" * 201])
def test_backend_rejects_bad_names(tmp_path, name) -> None:
    with FileDiskBackend(tmp_path) as d, pytest.raises(ValueError):
        d.write(name, b"x")


def test_backend_scan_deletes_leftovers_and_leaves_foreign_files(tmp_path) -> None:
    with FileDiskBackend(tmp_path) as d:
        d.write("a.kvb", b"x")
        sub = d.path("a.kvb").parent
        (sub / "a.kvb.tmp").write_bytes(b"half")  # an interrupted write
        (sub / "misplaced.kvb").write_bytes(b"x") if d.path("misplaced.kvb").parent != sub else None
        (tmp_path / "README").write_text("not ours")
        (tmp_path / "zz").mkdir()
        (tmp_path / "zz" / "keep").write_text("not ours")
        assert [n for n, _ in d.scan()] == ["a.kvb"]
        assert not (sub / "a.kvb.tmp").exists() and not (sub / "misplaced.kvb").exists()
        assert (tmp_path / "README").exists() and (tmp_path / "zz" / "keep").exists()


def test_one_store_per_directory(tmp_path) -> None:
    d = FileDiskBackend(tmp_path)
    with pytest.raises(DirectoryLocked):
        FileDiskBackend(tmp_path)
    d.close()
    FileDiskBackend(tmp_path).close()


# -------------------------------------------------------------------------- format
def test_disk_format_round_trip_and_rejects_damage() -> None:
    h = fmt.BlockHeader("mödel", "lay", (1 << 64) - 1, 7, 12345, 4096, 0xDEADBEEF)
    raw = fmt.encode_header(h)
    assert fmt.decode_header(raw + b"data") == (h, len(raw))
    for bad in (raw[:10], b"XXXX" + raw[4:], raw[:-1] + bytes([raw[-1] ^ 1]),
                raw[:20] + bytes([raw[20] ^ 1]) + raw[21:]):
        with pytest.raises(fmt.FormatError):
            fmt.decode_header(bad)
    assert fmt.file_name("m", "a", 255) != fmt.file_name("m", "b", 255)
    assert fmt.file_name("m", "a", 255).endswith("-00000000000000ff.kvb")


# ------------------------------------------------------------------ integrity
def test_a_corrupt_block_file_is_a_miss_and_counted(tmp_path) -> None:
    s = spilled_store(tmp_path)
    root = tmp_path / "disk"
    path = block_file(root, 2)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # one bit of the data
    path.write_bytes(raw)
    s.drain_events()
    assert read(s, [1, 2, 3, 4, 5, 6]) == [1]  # 2 is never served; the run ends there
    st = s.stats()
    assert st.corrupt_blocks == 1
    assert not path.exists()
    assert s.drain_events() == [(REMOVED, M, L, [2])]
    assert s.lookup(M, L, [1, 2], 0.0) == (1, 1)
    assert read(s, [3, 4]) == [3, 4] and read(s, [5, 6]) == [5, 6]  # the rest is intact (RAM: 2)
    s.check_invariants()


def test_a_corrupt_header_is_a_miss_and_counted(tmp_path) -> None:
    s = spilled_store(tmp_path)
    path = block_file(tmp_path / "disk", 1)
    raw = bytearray(path.read_bytes())
    raw[9] ^= 0x01  # inside the block hash
    path.write_bytes(raw)
    assert read(s, [1, 2]) == []
    assert s.stats().corrupt_blocks == 1 and not path.exists()


def test_a_deleted_block_file_is_a_miss(tmp_path) -> None:
    s = spilled_store(tmp_path)
    block_file(tmp_path / "disk", 1).unlink()
    assert read(s, [1, 2]) == []
    assert s.stats().disk_errors == 1 and s.lookup(M, L, [1], 0.0).blocks == 0
    s.check_invariants()


def test_ram_bytes_damaged_after_commit_are_not_spilled(tmp_path) -> None:
    # e.g. a writer whose reservation expired writes into a slot that now holds another block
    s = BlockStore(bytearray(64), FileDiskBackend(tmp_path, fsync=False), disk_bytes=4 * file_size(64),
                   slab_bytes=64)
    write(s, [1], 64)
    s.region[0:4] = b"oops"
    s.drain_events()
    write(s, [2], 64)  # evicts 1: its bytes fail the checksum, so it is dropped, not spilled
    assert s.drain_events() == [(REMOVED, M, L, [1]), (STORED, M, L, [2])]
    st = s.stats()
    assert (st.corrupt_blocks, st.spilled_blocks, st.disk.blocks) == (1, 0, 0)


# -------------------------------------------------------------------- capacity
def test_a_full_disk_drops_its_least_recently_used_block(tmp_path) -> None:
    s = BlockStore(bytearray(32), FileDiskBackend(tmp_path, fsync=False), disk_bytes=2 * file_size(32),
                   slab_bytes=32)
    for h in (1, 2, 3):
        write(s, [h], 32)
    s.drain_events()
    write(s, [4], 32)  # 3 spills; the disk holds 2 blocks, so 1 (its LRU) leaves the store
    assert s.drain_events() == [(REMOVED, M, L, [1]), (STORED, M, L, [4])]
    st = s.stats()
    assert (st.evicted_blocks, st.disk.blocks, st.disk.bytes_used) == (1, 2, 2 * file_size(32))
    assert len(files(tmp_path)) == 2
    assert [s.lookup(M, L, [h], 0.0).blocks for h in (1, 2, 3, 4)] == [0, 1, 1, 1]
    s.check_invariants()


def test_a_block_larger_than_the_disk_is_dropped(tmp_path) -> None:
    s = BlockStore(bytearray(100), FileDiskBackend(tmp_path), disk_bytes=100, slab_bytes=100)
    write(s, [1], 100)
    write(s, [2], 100)
    assert s.lookup(M, L, [1], 0.0).blocks == 0 and s.stats().evicted_blocks == 1


# -------------------------------------------------------------------- restart
def test_restart_rebuilds_the_disk_index(tmp_path) -> None:
    s = spilled_store(tmp_path, chunk_blocks=2)
    s.drain_chunk_changes()
    s2 = reopen(tmp_path, s, chunk_blocks=2)
    assert (s2.recovery.blocks, s2.recovery.dropped_files) == (4, 0)
    assert s2.lookup(M, L, [1, 2, 3, 4, 5, 6], 0.0) == (4, 0)  # RAM died with the process
    assert s2.drain_events() == [(STORED, M, L, [1, 2, 3, 4])]
    assert s2.drain_chunk_changes() == {ChunkKey(M, L, 1): [1, 2], ChunkKey(M, L, 3): [3, 4]}
    st = s2.stats()
    assert (st.disk.blocks, st.disk.bytes_used, st.ram.blocks) == (4, 4 * file_size(64), 0)
    assert read(s2, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert s2.block_bytes(M, L) == 64
    s2.check_invariants()


def test_torn_and_garbage_files_are_ignored_and_deleted(tmp_path) -> None:
    s = spilled_store(tmp_path, n=8)  # 1..6 on disk
    root = tmp_path / "disk"
    truncated, extended, renamed = block_file(root, 1), block_file(root, 2), block_file(root, 3)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    extended.write_bytes(extended.read_bytes() + b"!")
    garbage = FileDiskBackend.path(s._disk, fmt.file_name(M, L, 99))  # noqa: SLF001
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(os.urandom(200))
    moved = FileDiskBackend.path(s._disk, fmt.file_name(M, L, 98))  # noqa: SLF001
    moved.parent.mkdir(exist_ok=True)
    renamed.rename(moved)  # a valid file under another block's name
    wrong_size = FileDiskBackend.path(s._disk, fmt.file_name(M, L, 97))  # noqa: SLF001
    hdr = fmt.encode_header(fmt.BlockHeader(M, L, 97, 0, 97, 32, fmt.checksum(b"y" * 32)))
    wrong_size.parent.mkdir(exist_ok=True)
    wrong_size.write_bytes(hdr + b"y" * 32)  # a valid block of another size for the same layout
    os.utime(wrong_size, ns=(1, 1))  # ... written last in mtime order would not matter either way
    leftover = block_file(root, 4).with_name(block_file(root, 4).name + ".tmp")
    leftover.write_bytes(b"half a write")
    s2 = reopen(tmp_path, s)
    rep = s2.recovery
    assert (rep.blocks, rep.dropped_files) == (3, 5), rep  # 4, 5, 6 survive
    left = files(root)
    assert sorted(left) == sorted(fmt.file_name(M, L, h) for h in (4, 5, 6))
    assert s2.lookup(M, L, [1], 0.0).blocks == 0
    assert read(s2, [4, 5, 6]) == [4, 5, 6]
    s2.check_invariants()


def test_recovery_respects_a_smaller_disk(tmp_path) -> None:
    s = spilled_store(tmp_path)
    for i, h in enumerate((1, 2, 3, 4)):  # mtime order = LRU order
        os.utime(block_file(tmp_path / "disk", h), ns=(10**18 + i, 10**18 + i))
    s2 = reopen(tmp_path, s, disk_blocks=2)
    assert (s2.recovery.blocks, s2.recovery.over_capacity) == (4, 2)
    assert [s2.lookup(M, L, [h], 0.0).blocks for h in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert s2.drain_events() == [(STORED, M, L, [1, 2, 3, 4]), (REMOVED, M, L, [1, 2])]
    s2.check_invariants()


_WRITER = r"""
import sys, time
from kvstore import BlockStore, checksum
from services.kvstore_disk import FileDiskBackend
from tests.unit.test_kvstore_store import data_for, file_size
bb = 4096
s = BlockStore(bytearray(4 * bb), FileDiskBackend(sys.argv[1], fsync=True), disk_bytes=10**9, slab_bytes=bb)
h = 1
while True:
    r = s.reserve("model-a", "layout-1", bb, [h], 0, time.monotonic(), start=h - 1)
    for x in r.slots:
        s.region[x.offset:x.offset + bb] = data_for(x.block_hash, bb)
    s.commit(r.write_id, [checksum(data_for(h, bb))], time.monotonic())
    h += 1
"""


def test_kill_9_mid_spill_leaves_only_whole_blocks(tmp_path) -> None:
    root = tmp_path / "disk"
    child = Child("kvstore-writer", [sys.executable, "-c", _WRITER, str(root)], tmp_path / "writer.log",
                  env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    child.start()
    try:
        child.wait_ready(lambda: root.exists() and len(files(root)) >= 40, timeout=60, interval=0.05)
        time.sleep(0.05)
    finally:
        child.kill()  # SIGKILL, wherever it was: mid-write, mid-fsync, mid-rename
    s = BlockStore(bytearray(4 * 4096), FileDiskBackend(root), disk_bytes=10**9, slab_bytes=4096)
    n = s.recovery.blocks
    assert n >= 40
    hashes = list(range(1, n + 1))  # spilled in order: the disk holds exactly blocks 1..n
    assert s.lookup(M, L, hashes, 0.0) == (n, 0)
    assert not list(root.rglob("*.tmp"))
    for i in range(0, n, 4):
        assert read(s, hashes[i:i + 4]) == hashes[i:i + 4]
    assert s.stats().corrupt_blocks == 0


def test_a_failing_disk_write_drops_the_block_and_counts_it(tmp_path) -> None:
    disk = FileDiskBackend(tmp_path, fsync=False)
    s = BlockStore(bytearray(32), disk, disk_bytes=8 * file_size(32), slab_bytes=32)
    write(s, [1], 32)
    disk.path(fmt.file_name(M, L, 1)).parent.write_bytes(b"")  # its subdirectory is a file: write fails
    s.drain_events()
    write(s, [2], 32)
    assert s.drain_events() == [(REMOVED, M, L, [1]), (STORED, M, L, [2])]
    st = s.stats()
    assert (st.disk_errors, st.evicted_blocks, st.spilled_blocks, st.disk.blocks) == (1, 1, 0, 0)
    s.check_invariants()
