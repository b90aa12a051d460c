"""BlockStore: the KV store's blocks, tiers, leases and integrity, with no I/O of its own.

Blocks are keyed by (model, layout, chained block hash). A layout's blocks all have
one size (`block_bytes`, fixed by its first write). A block the store *holds* is in
RAM, on disk, or both (a block read back from disk keeps its disk copy, so evicting
it again costs no write). Reserved blocks (being written) are not held yet: lookups
and pins do not see them until commit.

RAM tier: the caller's `region` (so the service can register it with NIXL), carved
by kvstore.alloc into slabs per block size; every RAM block is one contiguous slot.
Disk tier: files through a DiskBackend (kvstore.disk_format encodes them), at most
`disk_bytes` of files in all.

Invariants (`check_invariants()` asserts them; the property test drives random calls):
- RAM slots never overlap; the allocator's used bytes == (held RAM blocks + reserved
  slots) * their block_bytes <= len(region); disk bytes used == sum of the files' sizes
  <= disk_bytes.
- A pinned or reserved slot is never evicted or reused; NoSpace is raised instead.
- Eviction order: the RAM LRU holds exactly the unpinned RAM blocks, per block size;
  to free a slot of size S the least recently used block of size S goes first, else
  the least recently used block of any size (until a slab of S can be carved). An
  evicted RAM block spills to disk (when there is a disk tier and it is not on disk
  yet); the disk has its own LRU, and a block dropped from disk while not in RAM
  leaves the store ("removed" event, evicted_blocks).
- Every held block has a CRC-32. The writer's checksums are compared with the region's
  bytes at commit; a disk file's data is checked on every read; RAM bytes are checked
  again before they are spilled. A block that fails is dropped, counted in
  corrupt_blocks, and never returned.
- Leases: every reservation and pin has a deadline; any call given `now` first frees
  those whose deadline <= now (`expire`). A stale write_id / pin_id is UnknownId.
- Events: "stored" when a block becomes held, "removed" when it leaves both tiers;
  a spill or read-back is not an event. Chunk records group a chain's blocks by
  position // chunk_blocks; see `drain_chunk_changes`.

NOT thread-safe: the service calls it from one thread. Time is passed in (`now`,
monotonic seconds). Disk calls are synchronous (a spill is one file write + fsync).
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence

from kvstore import disk_format as fmt
from kvstore.alloc import RegionAllocator
from kvstore.errors import InvalidArgument, LayoutMismatch, NoSpace, UnknownId
from kvstore.types import (
    REMOVED,
    STORED,
    Buffer,
    ChunkKey,
    CommitResult,
    DiskBackend,
    Event,
    LookupResult,
    PinResult,
    PutResult,
    Reservation,
    Slot,
    Stats,
    TierStats,
    checksum,
)

MAX_CHAIN = 65536  # blocks per call (BlockChain.block_hashes)
MAX_LEASE_S = 600.0
DEFAULT_LEASE_S = 30.0
DEFAULT_CHUNK_BLOCKS = 64
DEFAULT_SLAB_BYTES = 4 << 20
DEFAULT_MAX_PINS = 65536
_U64 = 1 << 64
_U32 = 1 << 32


class _Layout:
    """One (model, layout): its block size, held blocks, in-flight reservations and chunks."""

    __slots__ = ("model", "layout", "block_bytes", "tag", "blocks", "reserving", "chunks")

    def __init__(self, model: str, layout: str, block_bytes: int) -> None:
        self.model = model
        self.layout = layout
        self.block_bytes = block_bytes
        self.tag = fmt.layout_tag(model, layout)
        self.blocks: dict[int, _Block] = {}  # hash -> held block
        self.reserving: dict[int, str] = {}  # hash -> write_id reserving it
        self.chunks: dict[int, set[int]] = {}  # chunk key -> held hashes


class _Block:
    """A held block. offset < 0: not in RAM; disk_size == 0: not on disk."""

    __slots__ = ("lay", "hash", "position", "chunk", "checksum", "offset", "disk_size", "pins", "tick")

    def __init__(self, lay: _Layout, h: int, position: int, chunk: int, crc: int, offset: int,
                 disk_size: int) -> None:
        self.lay = lay
        self.hash = h
        self.position = position
        self.chunk = chunk
        self.checksum = crc
        self.offset = offset
        self.disk_size = disk_size
        self.pins = 0
        self.tick = 0  # recency: the store's use counter when it last entered/moved in its RAM LRU


class _Reservation:
    __slots__ = ("write_id", "lay", "entries", "deadline", "lease_s")

    def __init__(self, write_id: str, lay: _Layout, deadline: float, lease_s: float) -> None:
        self.write_id = write_id
        self.lay = lay
        self.entries: list[tuple[int, int, int, int]] = []  # (hash, position, chunk key, offset)
        self.deadline = deadline
        self.lease_s = lease_s


class _Pin:
    __slots__ = ("pin_id", "blocks", "deadline")

    def __init__(self, pin_id: str, blocks: list[_Block], deadline: float) -> None:
        self.pin_id = pin_id
        self.blocks = blocks
        self.deadline = deadline


class RecoveryReport:
    """What the constructor found on disk: blocks indexed, and files deleted as torn/garbage."""

    __slots__ = ("blocks", "bytes", "dropped_files", "over_capacity")

    def __init__(self) -> None:
        self.blocks = 0
        self.bytes = 0
        self.dropped_files = 0
        self.over_capacity = 0

    def __repr__(self) -> str:
        return (f"RecoveryReport(blocks={self.blocks}, bytes={self.bytes}, "
                f"dropped_files={self.dropped_files}, over_capacity={self.over_capacity})")


class BlockStore:
    """The KV store core. See the module docstring for the invariants."""

    def __init__(
        self,
        region: Buffer,
        disk: DiskBackend | None = None,
        *,
        disk_bytes: int = 0,
        chunk_blocks: int = DEFAULT_CHUNK_BLOCKS,
        default_lease_s: float = DEFAULT_LEASE_S,
        max_lease_s: float = MAX_LEASE_S,
        slab_bytes: int = DEFAULT_SLAB_BYTES,
        max_pins: int = DEFAULT_MAX_PINS,
        id_prefix: str | None = None,
    ) -> None:
        """Index an empty RAM tier over `region` and, with `disk`, rebuild the disk index from its files.

        Blocks found on disk come back held (disk only) and are announced as "stored" events
        and chunk changes; torn, garbage or foreign files are deleted (see `recovery`).
        """
        view = memoryview(region)
        if view.readonly:
            raise InvalidArgument("region", "read-only")
        if not view.contiguous:
            raise InvalidArgument("region", "not contiguous")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if len(view) < 1:
            raise InvalidArgument("region", "empty")
        if disk is not None and (not _is_int(disk_bytes) or disk_bytes < 1):
            raise InvalidArgument("disk_bytes", "a disk tier needs disk_bytes >= 1")
        if not _is_int(chunk_blocks) or chunk_blocks < 1:
            raise InvalidArgument("chunk_blocks", "must be >= 1")
        if not _is_int(slab_bytes) or slab_bytes < 1:
            raise InvalidArgument("slab_bytes", "must be >= 1")
        if not _is_int(max_pins) or max_pins < 1:
            raise InvalidArgument("max_pins", "must be >= 1")
        if not (_is_real(max_lease_s) and 0 < max_lease_s < math.inf):
            raise InvalidArgument("max_lease_s", "must be positive and finite")
        if not (_is_real(default_lease_s) and 0 < default_lease_s <= max_lease_s):
            raise InvalidArgument("default_lease_s", f"must be in (0, {max_lease_s}]")
        self._region = view
        self._disk = disk
        self._disk_total = disk_bytes if disk is not None else 0
        self.chunk_blocks = chunk_blocks
        self.default_lease_s = float(default_lease_s)
        self.max_lease_s = float(max_lease_s)
        self.max_pins = max_pins
        self._ids = id_prefix if id_prefix is not None else secrets.token_hex(4)
        self._next_id = 0
        self._ram = RegionAllocator(len(view), slab_bytes)
        self._layouts: dict[tuple[str, str], _Layout] = {}
        self._ram_lru: dict[int, OrderedDict[_Block, None]] = {}  # block_bytes -> unpinned RAM blocks
        self._disk_lru: OrderedDict[_Block, None] = OrderedDict()
        self._reservations: dict[str, _Reservation] = {}
        self._pins: dict[str, _Pin] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (deadline, seq, id), lazily cleaned
        self._events: list[Event] = []
        self._dirty_chunks: set[tuple[str, str, int]] = set()
        # usage and counters
        self._keep: _Layout | None = None
        self._tick = 0
        self._ram_blocks = 0
        self._ram_held_bytes = 0
        self._disk_blocks = 0
        self._disk_used = 0
        self._pinned = 0
        self._reserved = 0
        self._hits = self._misses = self._stored = self._spilled = 0
        self._evicted = self._corrupt = self._disk_errors = 0
        self.recovery = RecoveryReport()
        if disk is not None:
            self._recover()

    # ------------------------------------------------------------------ reads
    def lookup(self, model: str, layout: str, hashes: Sequence[int], now: float) -> LookupResult:
        """The longest leading run of `hashes` held (RAM or disk), and how many of it are in RAM."""
        _check_names(model, layout)
        _check_chain(hashes)
        self.expire(now)
        lay = self._layouts.get((model, layout))
        run = ram = 0
        if lay is not None:
            blocks = lay.blocks
            for h in hashes:
                b = blocks.get(h)
                if b is None:
                    break
                run += 1
                ram += b.offset >= 0
        self._hits += run
        self._misses += len(hashes) - run
        return LookupResult(run, ram)

    def pin(self, model: str, layout: str, hashes: Sequence[int], lease_s: float, now: float) -> PinResult:
        """Pin the leading held run of `hashes` in RAM for reading until `unpin` or the lease ends.

        Disk blocks are read back into RAM first (evicting unpinned LRU blocks); their data is
        checked, and a corrupt one is deleted, counted, and ends the run (a miss). The run also
        ends at a block for which no RAM slot can be freed; NoSpace only if that is the first.
        """
        _check_names(model, layout)
        _check_chain(hashes)
        lease = self._lease(lease_s)
        self.expire(now)
        if len(self._pins) >= self.max_pins:
            raise NoSpace(f"{len(self._pins)} pins held (max_pins)")
        lay = self._layouts.get((model, layout))
        pinned: list[_Block] = []
        no_space = False
        if lay is not None:
            run: list[_Block] = []
            for h in hashes:
                b = lay.blocks.get(h)
                if b is None:
                    break
                run.append(b)
            # Pin the run's RAM blocks first, so reading its disk blocks back does not evict them;
            # if RAM is too small for that, they are let go (the leading blocks matter most).
            held = [b.offset >= 0 for b in run]
            for b, pre in zip(run, held):
                if pre:
                    self._pin_block(b)
            for i, b in enumerate(run):
                if held[i]:
                    pinned.append(b)
                    continue
                status = "gone"
                if lay.blocks.get(b.hash) is b:  # an earlier read-back may have pushed it out
                    status = self._promote(b) if b.offset < 0 else "ok"
                    if status == "nospace" and any(held[i + 1:]):
                        self._release_prepinned(run, held, i + 1)
                        status = self._promote(b)
                if status != "ok":
                    no_space = status == "nospace"
                    self._release_prepinned(run, held, i + 1)
                    break
                self._pin_block(b)
                pinned.append(b)
        self._hits += len(pinned)
        self._misses += len(hashes) - len(pinned)
        if not pinned:
            if no_space:
                raise NoSpace("every RAM block is pinned or reserved")
            return PinResult("", [], lease)
        pin_id = self._new_id("p")
        self._pins[pin_id] = _Pin(pin_id, pinned, now + lease)
        heapq.heappush(self._deadlines, (now + lease, self._next_id, pin_id))
        bb = lay.block_bytes  # type: ignore[union-attr]
        return PinResult(pin_id, [Slot(b.hash, b.offset, bb, b.checksum) for b in pinned], lease)

    def _release_prepinned(self, run: list[_Block], held: list[bool], start: int) -> None:
        for j in range(start, len(run)):
            if held[j]:
                held[j] = False
                self._unpin_block(run[j])

    def unpin(self, pin_id: str) -> None:
        """Release a pin (idempotent: unknown or expired ids are ignored)."""
        pin = self._pins.pop(pin_id, None)
        if pin is not None:
            for b in pin.blocks:
                self._unpin_block(b)

    def read_pinned(self, pin_id: str) -> list[memoryview]:
        """Views of the pinned blocks' bytes in the region, in slot order (valid until unpin)."""
        pin = self._pins.get(pin_id)
        if pin is None:
            raise UnknownId(f"pin_id {pin_id!r}")
        reg = self._region
        return [reg[b.offset:b.offset + b.lay.block_bytes] for b in pin.blocks]

    # ----------------------------------------------------------------- writes
    def reserve(
        self, model: str, layout: str, block_bytes: int, hashes: Sequence[int], lease_s: float, now: float,
        *, start: int = 0, parent: int | None = None,
    ) -> Reservation:
        """Reserve RAM slots for the blocks of `hashes` not yet held nor reserved, in chain order.

        `hashes` are consecutive blocks of one sequence, `hashes[0]` at position `start` (0: from
        the sequence start). A write that starts inside a chunk should name `parent`, the hash at
        position start - 1: if the store holds it, the new blocks join its chunk record (else they
        start a record keyed by hashes[0]). Unpinned LRU blocks are evicted (spilled) to make room;
        if RAM runs out part-way the slots cover a leading part of the blocks to write, and NoSpace
        is raised only when no slot at all could be had. LayoutMismatch if block_bytes differs from
        the layout's. An empty reservation (nothing to write) has write_id "".
        """
        _check_names(model, layout)
        _check_chain(hashes)
        _check_start(start, len(hashes))
        if parent is not None and (not _is_int(parent) or not 0 <= parent < _U64 or start == 0):
            raise InvalidArgument("parent", "a uint64, only with start > 0")
        if not _is_int(block_bytes) or block_bytes < 1 or block_bytes >= _U32:
            raise InvalidArgument("block_bytes", "must be in [1, 2^32)")
        if block_bytes > len(self._region):
            raise InvalidArgument("block_bytes", f"larger than the RAM tier ({len(self._region)} bytes)")
        lease = self._lease(lease_s)
        self.expire(now)
        lay = self._layouts.get((model, layout))
        if lay is None:
            lay = self._layouts[(model, layout)] = _Layout(model, layout, block_bytes)
        elif lay.block_bytes != block_bytes:
            raise LayoutMismatch(model, layout, block_bytes, lay.block_bytes)
        for h in hashes:  # the chain's held blocks become most recent: this write evicts them last
            b = lay.blocks.get(h)
            if b is not None:
                self._touch(b)
        write_id = self._new_id("w")
        res = _Reservation(write_id, lay, now + lease, lease)
        wanted = False
        cb = self.chunk_blocks
        first_chunk = hashes[0]  # key of the chunk holding position `start`
        if start % cb and parent is not None:
            pb = lay.blocks.get(parent)
            if pb is not None and pb.position == start - 1:
                first_chunk = pb.chunk
        self._keep = lay  # evictions below may empty the layout; it must stay registered
        try:
            for i, h in enumerate(hashes):
                if h in lay.blocks or h in lay.reserving:
                    continue
                wanted = True
                off = self._alloc(block_bytes)
                if off is None:
                    break
                pos = start + i
                c = pos // cb * cb - start
                chunk = hashes[c] if c > 0 else first_chunk
                res.entries.append((h, pos, chunk, off))
                lay.reserving[h] = write_id
        finally:
            self._keep = None
        self._reserved += len(res.entries)
        if not res.entries:
            self._maybe_drop_layout(lay)
            if wanted:
                raise NoSpace("every RAM block is pinned or reserved")
            return Reservation("", [], lease)
        self._reservations[write_id] = res
        heapq.heappush(self._deadlines, (res.deadline, self._next_id, write_id))
        return Reservation(write_id, [Slot(h, off, block_bytes) for h, _, _, off in res.entries], lease)

    def commit(self, write_id: str, checksums: Sequence[int] | None, now: float) -> CommitResult:
        """Publish a reservation's slots: each becomes held unless its bytes fail the writer's checksum.

        `checksums`: CRC-32 per slot, in slot order, from the writer's own copy; None: take the
        region's bytes as they are. UnknownId if the reservation is unknown, finished or expired.
        """
        self.expire(now)
        if write_id == "":
            return CommitResult(0, [])
        res = self._reservations.get(write_id)
        if res is None:
            raise UnknownId(f"write_id {write_id!r}")
        if checksums is not None:
            if len(checksums) != len(res.entries):
                raise InvalidArgument("checksums", f"{len(checksums)} given for {len(res.entries)} slots")
            for c in checksums:
                if not _is_int(c) or not 0 <= c < _U32:
                    raise InvalidArgument("checksums", "each must be a uint32")
        del self._reservations[write_id]
        return self._commit(res, checksums)

    def abort(self, write_id: str) -> None:
        """Give a reservation's slots back unwritten (idempotent)."""
        res = self._reservations.pop(write_id, None)
        if res is not None:
            self._release(res)

    def put(
        self, model: str, layout: str, hashes: Sequence[int], data: Sequence[Buffer],
        checksums: Sequence[int | None] | None, now: float, *, start: int = 0, parent: int | None = None,
    ) -> PutResult:
        """The bytes path: store blocks given with their bytes (reserve + copy + commit in one call).

        All `data` have one length (the layout's block_bytes). `checksums[i]` None (or all None)
        means "not checked". Blocks already held or reserved are skipped (not counted in `stored`).
        """
        _check_chain(hashes)
        if len(data) != len(hashes):
            raise InvalidArgument("data", f"{len(data)} blocks for {len(hashes)} hashes")
        try:
            sizes = {memoryview(d).nbytes for d in data}
        except TypeError as e:
            raise InvalidArgument("data", "each block must be bytes-like") from e
        if len(sizes) != 1:
            raise InvalidArgument("data", "blocks of different sizes")
        if checksums is not None:
            if len(checksums) != len(hashes):
                raise InvalidArgument("checksums", f"{len(checksums)} given for {len(hashes)} blocks")
            for c in checksums:
                if c is not None and (not _is_int(c) or not 0 <= c < _U32):
                    raise InvalidArgument("checksums", "each must be a uint32 or None")
        block_bytes = sizes.pop()
        if block_bytes < 1:
            raise InvalidArgument("data", "empty blocks")
        r = self.reserve(model, layout, block_bytes, hashes, self.default_lease_s, now,
                         start=start, parent=parent)
        if not r.write_id:
            return PutResult(0, [])
        res = self._reservations.pop(r.write_id)
        index = {h: i for i, h in enumerate(hashes)}
        expected: list[int | None] = []
        for h, _, _, off in res.entries:
            i = index[h]
            self._region[off:off + block_bytes] = memoryview(data[i]).cast("B")
            expected.append(None if checksums is None else checksums[i])
        c = self._commit(res, expected)
        return PutResult(c.committed, c.rejected)

    # ----------------------------------------------------------------- leases
    def expire(self, now: float) -> int:
        """Free the reservations and pins whose lease ended (deadline <= now); how many were freed."""
        if not _is_real(now) or math.isnan(now):
            raise InvalidArgument("now", "must be a number")
        n = 0
        dl = self._deadlines
        live = len(self._reservations) + len(self._pins)
        if len(dl) > 4 * live + 1024:  # drop entries of leases that ended early (unpin/commit/abort)
            dl = self._deadlines = [e for e in dl if self._lease_live(e)]
            heapq.heapify(dl)
        while dl and dl[0][0] <= now:
            deadline, _, ident = heapq.heappop(dl)
            res = self._reservations.get(ident)
            if res is not None and res.deadline == deadline:
                del self._reservations[ident]
                self._release(res)
                n += 1
                continue
            pin = self._pins.get(ident)
            if pin is not None and pin.deadline == deadline:
                self.unpin(ident)
                n += 1
        return n

    def _lease_live(self, entry: tuple[float, int, str]) -> bool:
        deadline, _, ident = entry
        held = self._reservations.get(ident) or self._pins.get(ident)
        return held is not None and held.deadline == deadline

    # ----------------------------------------------------------------- status
    def stats(self) -> Stats:
        """Tier usage now and counters since construction (KVStoreStats)."""
        return Stats(
            ram=TierStats(self._ram_blocks, self._ram_held_bytes, len(self._region)),
            disk=TierStats(self._disk_blocks, self._disk_used, self._disk_total),
            pinned_blocks=self._pinned,
            reserved_blocks=self._reserved,
            hit_blocks=self._hits,
            miss_blocks=self._misses,
            stored_blocks=self._stored,
            spilled_blocks=self._spilled,
            evicted_blocks=self._evicted,
            corrupt_blocks=self._corrupt,
            disk_errors=self._disk_errors,
        )

    def drain_events(self) -> list[Event]:
        """Events since the last drain, in order; consecutive ones of a kind and layout are merged."""
        ev, self._events = self._events, []
        return ev

    def drain_chunk_changes(self) -> dict[ChunkKey, list[int]]:
        """Chunks whose held blocks changed since the last drain: their held hashes now, in chain order.

        A chunk is the blocks of a chain at positions [k*chunk_blocks, (k+1)*chunk_blocks), keyed
        by the hash at position k*chunk_blocks -- or, for a write that starts inside a chunk, by
        its first block there (the store does not know the earlier hashes). An empty list: the
        chunk is gone (delete its record).
        """
        out: dict[ChunkKey, list[int]] = {}
        for model, layout, key in self._dirty_chunks:
            lay = self._layouts.get((model, layout))
            held = lay.chunks.get(key) if lay is not None else None
            if held:
                blocks = lay.blocks  # type: ignore[union-attr]
                out[ChunkKey(model, layout, key)] = sorted(held, key=lambda h: blocks[h].position)
            else:
                out[ChunkKey(model, layout, key)] = []
        self._dirty_chunks = set()
        return out

    def block_bytes(self, model: str, layout: str) -> int | None:
        """The layout's block size, or None while the store has no block of it."""
        lay = self._layouts.get((model, layout))
        return lay.block_bytes if lay is not None else None

    @property
    def region(self) -> memoryview:
        """The RAM tier's bytes (the caller's region)."""
        return self._region

    # --------------------------------------------------------------- internals
    def _new_id(self, kind: str) -> str:
        self._next_id += 1
        return f"{kind}-{self._ids}-{self._next_id}"

    def _lease(self, lease_s: float) -> float:
        if not _is_real(lease_s) or math.isnan(lease_s) or lease_s < 0 or lease_s > self.max_lease_s:
            raise InvalidArgument("lease_s", f"must be in [0, {self.max_lease_s}] (0: default)")
        return float(lease_s) if lease_s > 0 else self.default_lease_s

    def _commit(self, res: _Reservation, expected: Sequence[int | None] | None) -> CommitResult:
        lay, bb, reg = res.lay, res.lay.block_bytes, self._region
        committed, rejected = 0, []
        self._reserved -= len(res.entries)
        for i, (h, pos, chunk, off) in enumerate(res.entries):
            del lay.reserving[h]
            crc = checksum(reg[off:off + bb])
            want = None if expected is None else expected[i]
            if h in lay.blocks or (want is not None and want != crc):
                self._ram.free(off, bb)
                if h not in lay.blocks:
                    rejected.append(h)
                continue
            b = _Block(lay, h, pos, chunk, crc, off, 0)
            self._add_held(b)
            self._ram_blocks += 1
            self._ram_held_bytes += bb
            self._lru_push(b)
            committed += 1
        self._stored += committed
        self._maybe_drop_layout(lay)
        return CommitResult(committed, rejected)

    def _release(self, res: _Reservation) -> None:
        lay, bb = res.lay, res.lay.block_bytes
        for h, _, _, off in res.entries:
            del lay.reserving[h]
            self._ram.free(off, bb)
        self._reserved -= len(res.entries)
        self._maybe_drop_layout(lay)

    def _maybe_drop_layout(self, lay: _Layout) -> None:
        if lay is self._keep:
            return
        if not lay.blocks and not lay.reserving and self._layouts.get((lay.model, lay.layout)) is lay:
            del self._layouts[(lay.model, lay.layout)]

    def _lru(self, block_bytes: int) -> OrderedDict[_Block, None]:
        lru = self._ram_lru.get(block_bytes)
        if lru is None:
            lru = self._ram_lru[block_bytes] = OrderedDict()
        return lru

    def _lru_push(self, b: _Block) -> None:
        """Make an unpinned RAM block the most recently used of its size."""
        self._tick += 1
        b.tick = self._tick
        lru = self._lru(b.lay.block_bytes)
        lru[b] = None
        lru.move_to_end(b)

    def _touch(self, b: _Block) -> None:
        if b.offset >= 0 and b.pins == 0:
            self._lru_push(b)
        if b.disk_size:
            self._disk_lru.move_to_end(b)

    def _lru_remove(self, b: _Block) -> None:
        lru = self._ram_lru[b.lay.block_bytes]
        del lru[b]
        if not lru:  # sizes come and go with layouts: keep no empty LRUs
            del self._ram_lru[b.lay.block_bytes]

    def _pin_block(self, b: _Block) -> None:
        if b.pins == 0:
            self._lru_remove(b)
            self._pinned += 1
        b.pins += 1
        if b.disk_size:
            self._disk_lru.move_to_end(b)

    def _unpin_block(self, b: _Block) -> None:
        b.pins -= 1
        if b.pins == 0:
            self._pinned -= 1
            self._lru_push(b)

    def _add_held(self, b: _Block) -> None:
        lay = b.lay
        lay.blocks[b.hash] = b
        lay.chunks.setdefault(b.chunk, set()).add(b.hash)
        self._dirty_chunks.add((lay.model, lay.layout, b.chunk))
        self._emit(STORED, lay, b.hash)

    def _forget(self, b: _Block) -> None:
        """The block leaves the store (it is in neither tier any more)."""
        lay = b.lay
        del lay.blocks[b.hash]
        held = lay.chunks[b.chunk]
        held.discard(b.hash)
        if not held:
            del lay.chunks[b.chunk]
        self._dirty_chunks.add((lay.model, lay.layout, b.chunk))
        self._emit(REMOVED, lay, b.hash)
        self._maybe_drop_layout(lay)

    def _emit(self, kind: str, lay: _Layout, h: int) -> None:
        ev = self._events
        if ev and ev[-1].kind == kind and ev[-1].model == lay.model and ev[-1].layout == lay.layout:
            ev[-1].hashes.append(h)
        else:
            ev.append(Event(kind, lay.model, lay.layout, [h]))

    # RAM tier -------------------------------------------------------------
    def _alloc(self, block_bytes: int) -> int | None:
        """A free RAM slot of this size, evicting unpinned LRU blocks as needed; None if impossible."""
        while True:
            off = self._ram.alloc(block_bytes)
            if off is not None:
                return off
            victim = self._ram_victim(block_bytes)
            if victim is None:
                return None
            self._evict_from_ram(victim)

    def _ram_victim(self, block_bytes: int) -> _Block | None:
        lru = self._ram_lru.get(block_bytes)
        if lru:
            return next(iter(lru))
        # No evictable block of this size: take the least recently used one of any size
        # (once a slab's last slot is freed, its bytes can be carved into a slab of this size).
        best: _Block | None = None
        for lru in self._ram_lru.values():
            if lru:
                head = next(iter(lru))
                if best is None or head.tick < best.tick:
                    best = head
        return best

    def _evict_from_ram(self, b: _Block) -> None:
        bb = b.lay.block_bytes
        self._lru_remove(b)
        status = "ok" if b.disk_size else ("nodisk" if self._disk is None else self._spill(b))
        self._ram.free(b.offset, bb)
        b.offset = -1
        self._ram_blocks -= 1
        self._ram_held_bytes -= bb
        if status != "ok":
            if status != "corrupt":
                self._evicted += 1
            self._forget(b)

    def _promote(self, b: _Block) -> str:
        """Read a disk-only block back into a RAM slot: "ok", "corrupt" (dropped) or "nospace"."""
        bb = b.lay.block_bytes
        del self._disk_lru[b]  # out of reach of the disk evictions the allocation may cause
        off = self._alloc(bb)
        self._disk_lru[b] = None
        if off is None:
            return "nospace"
        data = self._read_disk(b)
        if data is None:
            self._ram.free(off, bb)
            return "corrupt"
        self._region[off:off + bb] = data
        b.offset = off
        self._ram_blocks += 1
        self._ram_held_bytes += bb
        self._lru_push(b)
        return "ok"

    # disk tier ------------------------------------------------------------
    def _name(self, b: _Block) -> str:
        return fmt.file_name(b.lay.model, b.lay.layout, b.hash, b.lay.tag)

    def _spill(self, b: _Block) -> str:
        """Write a RAM block to disk: "ok", "corrupt" (its RAM bytes fail the checksum) or "full"."""
        lay = b.lay
        data = self._region[b.offset:b.offset + lay.block_bytes]
        if checksum(data) != b.checksum:
            self._corrupt += 1
            return "corrupt"
        header = fmt.encode_header(fmt.BlockHeader(lay.model, lay.layout, b.hash, b.position, b.chunk,
                                                   lay.block_bytes, b.checksum))
        size = len(header) + lay.block_bytes
        if size > self._disk_total:
            return "full"
        while self._disk_used + size > self._disk_total:
            if not self._disk_lru:  # the rest is a block being read back
                return "full"
            self._drop_disk_copy(next(iter(self._disk_lru)), evicted=True)
        try:
            self._disk.write(self._name(b), [header, data])  # type: ignore[union-attr]
        except OSError:
            self._disk_errors += 1
            return "full"
        b.disk_size = size
        self._disk_used += size
        self._disk_blocks += 1
        self._disk_lru[b] = None
        self._spilled += 1
        return "ok"

    def _drop_disk_copy(self, b: _Block, *, evicted: bool) -> None:
        try:
            self._disk.delete(self._name(b))  # type: ignore[union-attr]
        except OSError:
            self._disk_errors += 1
        del self._disk_lru[b]
        self._disk_used -= b.disk_size
        self._disk_blocks -= 1
        b.disk_size = 0
        if b.offset < 0:
            if evicted:
                self._evicted += 1
            self._forget(b)

    def _read_disk(self, b: _Block) -> bytes | memoryview | None:
        """A disk block's data if its file is intact; else the file is deleted, counted, and None."""
        lay = b.lay
        try:
            raw = self._disk.read(self._name(b))  # type: ignore[union-attr]
        except OSError:
            raw = None
            self._disk_errors += 1
        ok = False
        if raw is None:  # the file went away behind the store's back
            self._disk_errors += 1
            self._drop_disk_copy(b, evicted=False)
            return None
        if raw is not None:
            try:
                h, hl = fmt.decode_header(raw)
                ok = (h.model == lay.model and h.layout == lay.layout and h.block_hash == b.hash
                      and h.length == lay.block_bytes and h.checksum == b.checksum
                      and len(raw) == hl + h.length and checksum(memoryview(raw)[hl:]) == b.checksum)
            except fmt.FormatError:
                ok = False
        if ok:
            return memoryview(raw)[hl:]  # type: ignore[index]
        self._corrupt += 1
        self._drop_disk_copy(b, evicted=False)
        return None

    def _recover(self) -> None:
        """Index the disk's block files (oldest first = LRU order); delete what cannot be trusted.

        A file is kept only if its header decodes (magic, version, header CRC), its name is the
        one its header implies, and its size is exactly header + length (not torn). Data CRCs
        are checked when a block is read, not here, so a restart reads ~100 bytes per block.
        A layout's block size is the one most of its files have (ties: the newest file's).
        """
        disk, rep = self._disk, self.recovery
        assert disk is not None
        good: list[tuple[str, int, fmt.BlockHeader]] = []
        votes: dict[tuple[str, str], dict[int, tuple[int, int]]] = {}  # layout -> length -> (files, newest)
        for name, size in disk.scan():
            try:
                raw = disk.read(name, fmt.MAX_HEADER_BYTES)
            except OSError:
                self._disk_errors += 1
                continue
            if raw is None:
                continue
            try:
                hdr, hl = fmt.decode_header(raw)
            except fmt.FormatError:
                hdr = None
            if (hdr is not None and _names_ok(hdr.model, hdr.layout) and 0 < hdr.length <= len(self._region)
                    and size == hl + hdr.length
                    and name == fmt.file_name(hdr.model, hdr.layout, hdr.block_hash)):
                good.append((name, size, hdr))
                v = votes.setdefault((hdr.model, hdr.layout), {})
                v[hdr.length] = (v.get(hdr.length, (0, 0))[0] + 1, len(good))
            else:
                self._drop_file(name)
        sizes = {key: max(v, key=lambda n: v[n]) for key, v in votes.items()}
        for name, size, hdr in good:
            key = (hdr.model, hdr.layout)
            if hdr.length != sizes[key]:
                self._drop_file(name)
                continue
            lay = self._layouts.get(key)
            if lay is None:
                lay = self._layouts[key] = _Layout(hdr.model, hdr.layout, hdr.length)
            b = _Block(lay, hdr.block_hash, hdr.position, hdr.chunk_key, hdr.checksum, -1, size)
            self._add_held(b)
            self._disk_lru[b] = None
            self._disk_used += size
            self._disk_blocks += 1
            rep.blocks += 1
            rep.bytes += size
        while self._disk_used > self._disk_total:  # disk_bytes shrank since the files were written
            rep.over_capacity += 1
            self._drop_disk_copy(next(iter(self._disk_lru)), evicted=True)

    def _drop_file(self, name: str) -> None:
        self.recovery.dropped_files += 1
        try:
            self._disk.delete(name)  # type: ignore[union-attr]
        except (OSError, ValueError):
            self._disk_errors += 1

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Assert every invariant of the module docstring (tests; O(blocks))."""
        self._ram.check()
        ram_blocks = ram_bytes = disk_blocks = disk_bytes = pinned = 0
        slots: list[tuple[int, int]] = []
        for lay in self._layouts.values():
            assert lay.blocks or lay.reserving, "empty layout kept"
            bb = lay.block_bytes
            chunks: dict[int, set[int]] = {}
            for h, b in lay.blocks.items():
                assert b.hash == h and b.lay is lay
                assert b.offset >= 0 or b.disk_size > 0, "held block in no tier"
                assert h not in lay.reserving, "held block also reserved"
                chunks.setdefault(b.chunk, set()).add(h)
                if b.offset >= 0:
                    ram_blocks += 1
                    ram_bytes += bb
                    slots.append((b.offset, bb))
                    in_lru = b in self._ram_lru.get(bb, {})
                    assert in_lru == (b.pins == 0), "RAM LRU must hold exactly the unpinned RAM blocks"
                else:
                    assert b.pins == 0, "pinned block not in RAM"
                    assert all(b not in lru for lru in self._ram_lru.values())
                pinned += b.pins > 0
                if b.disk_size:
                    disk_blocks += 1
                    disk_bytes += b.disk_size
                    assert b in self._disk_lru
            assert chunks == lay.chunks, "chunk index out of date"
        reserved = 0
        for res in self._reservations.values():
            for h, _, _, off in res.entries:
                assert res.lay.reserving.get(h) == res.write_id
                slots.append((off, res.lay.block_bytes))
                reserved += 1
        assert sum(len(lay.reserving) for lay in self._layouts.values()) == reserved
        slots.sort()
        for (a, n), (c, _) in zip(slots, slots[1:]):
            assert a + n <= c, "overlapping RAM slots"
        assert all(0 <= a and a + n <= len(self._region) for a, n in slots)
        assert self._ram.bytes_used == sum(n for _, n in slots), "allocator bytes != held + reserved"
        assert (ram_blocks, ram_bytes) == (self._ram_blocks, self._ram_held_bytes)
        assert (disk_blocks, disk_bytes) == (self._disk_blocks, self._disk_used) == (
            len(self._disk_lru), sum(b.disk_size for b in self._disk_lru))
        assert self._disk_used <= self._disk_total
        assert pinned == self._pinned and reserved == self._reserved
        assert sum(len(lru) for lru in self._ram_lru.values()) == ram_blocks - pinned
        for lru in self._ram_lru.values():
            assert lru, "empty LRU kept"
            ticks = [b.tick for b in lru]
            assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks), "LRU out of recency order"
        for pin in self._pins.values():
            for b in pin.blocks:
                assert b.pins > 0 and b.offset >= 0 and b.lay.blocks.get(b.hash) is b, "pinned block evicted"


# --------------------------------------------------------------- validation
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _names_ok(model: object, layout: object) -> bool:
    try:
        _check_names(model, layout)  # type: ignore[arg-type]
    except InvalidArgument:
        return False
    return True


def _check_names(model: str, layout: str) -> None:
    limits = (("model", model, fmt.MAX_MODEL_BYTES), ("layout", layout, fmt.MAX_LAYOUT_BYTES))
    for field, value, limit in limits:
        if not isinstance(value, str) or not value:
            raise InvalidArgument(field, "must be a non-empty string")
        try:
            n = len(value.encode())
        except UnicodeEncodeError as e:
            raise InvalidArgument(field, "not valid UTF-8") from e
        if n > limit:
            raise InvalidArgument(field, f"longer than {limit} bytes")


def _check_chain(hashes: Sequence[int]) -> None:
    if isinstance(hashes, (str, bytes)) or not isinstance(hashes, Sequence):
        raise InvalidArgument("hashes", "must be a sequence of block hashes")
    n = len(hashes)
    if n == 0:
        raise InvalidArgument("hashes", "empty chain")
    if n > MAX_CHAIN:
        raise InvalidArgument("hashes", f"{n} blocks, at most {MAX_CHAIN}")
    for h in hashes:
        if not _is_int(h) or not 0 <= h < _U64:
            raise InvalidArgument("hashes", f"not a uint64: {h!r}")
    if len(set(hashes)) != n:
        raise InvalidArgument("hashes", "repeated block hash in one chain")


def _check_start(start: int, n: int) -> None:
    if not _is_int(start) or start < 0 or start + n > _U32:
        raise InvalidArgument("start", "must be a position in [0, 2^32 - len(hashes)]")
