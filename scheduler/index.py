"""The KV-block index: (model, block hash) → which workers hold the block, in which tier.

Fed by the workers' KV events (stored / removed / cleared, hashes as the
64-bit ints of `block_hash.external_block_hash`), read once per routing
decision by `match_prefix` / `match`: the longest run of leading blocks each
worker holds, for all workers in one walk.

Layout (why it is fast and small in CPython):
- Every (worker, tier) pair owns one *slot*, a bit position. A block is ONE
  dict entry per model, `hash -> int bitmask of the slots holding it`, so a
  block cached on several workers or tiers costs one key, and the masks are
  interned (a handful of distinct masks exist at a time).
- `match_prefix` walks the request's hashes with one dict lookup and one AND
  per block; per-worker bookkeeping happens only where the set of holders
  (or a holder's best tier) changes, which is rare along a prefix. It stops
  at the first block no remaining worker holds. When every holder of the
  first block has a single slot (one tier: the common case), a leaner walk
  only notes where bits drop out (`_match_single`): a system prompt that 60
  of 64 workers hold to different lengths costs ~0.05 ms instead of ~0.3.

Invariants:
- A worker's match is the run of *consecutive* leading blocks it holds in any
  tier; it ends at that worker's first gap, even if it holds later blocks
  (the engine can't use a block whose predecessor it lacks).
- The tier reported for a block is the best (lowest) tier the worker holds it in.
- Models are separate namespaces: the same hash under two models never mixes.
- Holders are opaque ids: workers and KV stores alike (a store holds its blocks in its own
  slot, tier STORE). Which holder's run a worker may use is the matcher's business
  (framework.ScoringContext.matches: its own, then a store's continuation).
- A key lives in exactly one generation (see eviction) and its mask never
  has a live slot's bit unless that (worker, tier) announced the block and
  did not remove/clear it since.
- `len(index)` = live (hash, worker, tier) entries; `num_keys` = distinct
  (model, hash) keys held, live or awaiting cleanup; `num_keys <= max_blocks`
  (a match may pass it by its own blocks until the next turnover). A dropped
  generation's keys are released a few per write, at least as fast as new
  keys arrive, so they never add more than `max_blocks // 2` keys.

Eviction (bounded memory): two generations. Stored and matched keys go to the
young generation; when it reaches `max_blocks // 2` keys, the old generation
is dropped whole and the young one becomes old. So a key that was stored or
matched within the last `max_blocks // 2` key insertions is never evicted,
and a key untouched for `max_blocks` insertions always is: LRU at the
granularity of half the index, with O(1) amortized bookkeeping and no
per-key recency field. Normally the engines' `removed` events keep the index
far below the bound; the bound protects against lost events and huge tiers.

Cost, measured with tracemalloc (`python -m scheduler.index`): 74 bytes per distinct block key
(the 64-bit hash int, its dict slot, shard overhead; masks are interned), whatever the number
of workers and tiers sharing it: 1 M keys ≈ 74 MB, the default bound of 4 M keys ≈ 300 MB.
Ingest ≈ 2 M hashes/s; `match_prefix` ≈ 0.25 µs per matched block. Each generation is split
in 128 dicts by the hash's low bits, so no CPython dict resize stalls the event loop for more
than about a millisecond.

`cleared` and `drop_worker` are O(slots), not O(blocks): the worker's slots
are retired at once (masked out of every read) and their stale bits are
stripped lazily by later writes; a retired slot is reused only after two
generation turnovers (by then no key carries its bit) or after a compaction
sweep, which runs when retired slots outnumber live ones.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence


class Tier(enum.IntEnum):
    """Where a worker holds a block; lower is faster to use."""

    ENGINE = 0  # the engine's own KV cache (GPU memory, or host memory for vLLM on CPU)
    HOST = 1  # the engine's CPU offload tier
    DISK = 2  # local disk tier
    STORE = 3  # a shared KV store's blocks; the store is a holder of its own (scorers/README.md)


NUM_TIERS = len(Tier)
_TIERS = tuple(Tier)
_INTERN_MAX = 1 << 16  # distinct masks remembered for interning before starting over
# Each generation is split into shards by the hash's low bits: CPython resizes (and, under
# insert/delete churn, compacts) a dict all at once, ~70 ms for 1.4 M keys; 128 shards keep
# every such pause under a millisecond up to ~8 M keys. Block hashes are SHA-256 bits: uniform.
SHARDS = 128
SHARD_MASK = SHARDS - 1


@dataclasses.dataclass(slots=True)
class PrefixMatch:
    """A worker's leading run: `blocks` consecutive blocks, `by_tier[t]` of them best held in tier t."""

    blocks: int
    by_tier: list[int]

    def tier(self, tier: Tier) -> int:
        return self.by_tier[tier]


class BlockIndex:
    """(model, block hash) → holders per tier; see the module docstring for semantics and cost."""

    def __init__(self, max_blocks: int = 4_000_000) -> None:
        if max_blocks < 2:
            raise ValueError(f"max_blocks must be >= 2, got {max_blocks}")
        self.max_blocks = max_blocks
        self._gen_cap = max_blocks // 2
        # Generations: model -> SHARDS dicts {hash: slot mask}, a hash in shard hash & SHARD_MASK.
        # A key is in exactly one generation.
        self._young: dict[str, list[dict[int, int]]] = {}
        self._old: dict[str, list[dict[int, int]]] = {}
        self._young_keys = 0
        self._old_keys = 0
        # Live entries per slot, per generation (dropping the old generation drops its column).
        self._young_count: list[int] = []
        self._old_count: list[int] = []
        self._entries = 0
        # Slots.
        self._slot_of: dict[tuple[str, int], int] = {}  # (worker, tier) -> slot, live slots only
        self._owner: list[tuple[str, int] | None] = []  # slot -> (worker, tier); None when free/retired
        self._live = 0  # mask of live slots
        self._worker_bits: dict[str, int] = {}  # worker -> mask of its live slots
        self._worker_slots: dict[str, list[tuple[int, int]]] = {}  # worker -> [(tier, bit)] by tier
        self._multi = 0  # mask of the live slots of workers with more than one (match_prefix's fast path)
        self._free: list[int] = []  # reusable slots
        self._retired: dict[int, int] = {}  # slot -> generation turnovers left before reuse
        self._intern: dict[int, int] = {}
        self._graveyard: list[dict[int, int]] = []  # dropped shards, released a bit per write
        self._gets: dict[str, tuple] = {}  # model -> (young, old, their shards' .get): saves 5 µs a walk
        self.evicted = 0  # entries dropped by the bound (for metrics)

    # ---- writes -------------------------------------------------------------------------

    def stored(self, worker_id: str, model: str, block_hashes: Sequence[int],
               tier: Tier = Tier.ENGINE) -> None:
        """`worker_id` now holds these blocks in `tier` (a KV BlockStored event)."""
        slot = self._slot(worker_id, int(tier))
        bit = 1 << slot
        young = self._young.get(model) or self._young.setdefault(model, _new_shards())
        old = self._old.get(model)
        live, intern = self._live, self._intern
        added = 0
        for h in block_hashes:
            k = h & SHARD_MASK
            shard = young[k]
            v = shard.get(h)
            if v is None:
                if self._young_keys >= self._gen_cap:
                    self._young_count[slot] += added  # these keys are about to become old
                    self._entries += added
                    added = 0
                    self._rotate()
                    young = self._young.setdefault(model, _new_shards())
                    old = self._old.get(model)
                    shard = young[k]
                v = old[k].pop(h, None) if old is not None else None
                if v is None:
                    v = 0
                else:  # back in use: move it to the young generation
                    self._old_keys -= 1
                    v &= live
                    self._promote_counts(v)
                self._young_keys += 1
            elif v & bit:
                continue
            else:
                v &= live
            if not v & bit:
                added += 1
                v |= bit
            shard[h] = intern.setdefault(v, v)
        self._young_count[slot] += added
        self._entries += added
        if len(intern) > _INTERN_MAX:
            intern.clear()
        self._reap(2 * len(block_hashes) + 64)

    def removed(self, worker_id: str, model: str, block_hashes: Sequence[int],
                tier: Tier = Tier.ENGINE) -> None:
        """`worker_id` no longer holds these blocks in `tier` (KV BlockRemoved); unknown ones are ignored."""
        slot = self._slot_of.get((worker_id, int(tier)))
        if slot is None:
            return
        bit = 1 << slot
        keep = self._live & ~bit
        intern = self._intern
        young, old = self._young.get(model), self._old.get(model)
        for h in block_hashes:
            k = h & SHARD_MASK
            for gen, is_young in ((young, True), (old, False)):
                if gen is None:
                    continue
                shard = gen[k]
                v = shard.get(h)
                if v is None:
                    continue
                if v & bit:
                    v &= keep
                    if v:
                        shard[h] = intern.setdefault(v, v)
                    else:
                        del shard[h]
                        if is_young:
                            self._young_keys -= 1
                        else:
                            self._old_keys -= 1
                    (self._young_count if is_young else self._old_count)[slot] -= 1
                    self._entries -= 1
                break  # a key is in one generation only
        self._reap(2 * len(block_hashes) + 64)

    def cleared(self, worker_id: str, tier: Tier | None = None) -> None:
        """All of a worker's blocks are gone, in one tier or in all (AllBlocksCleared, or a resync)."""
        for t in (_TIERS if tier is None else (int(tier),)):
            slot = self._slot_of.pop((worker_id, int(t)), None)
            if slot is not None:
                self._retire(worker_id, slot)
        if len(self._retired) > max(32, len(self._slot_of)):
            self._compact()

    def drop_worker(self, worker_id: str) -> None:
        """The worker left the mesh: forget everything it held."""
        self.cleared(worker_id)
        self._worker_bits.pop(worker_id, None)
        self._worker_slots.pop(worker_id, None)

    # ---- reads --------------------------------------------------------------------------

    def match_prefix(self, model: str, block_hashes: Sequence[int]) -> dict[str, PrefixMatch]:
        """Per worker holding at least the first block: its leading-run length and per-tier counts.

        Touches the matched blocks (they count as recently used for eviction).
        """
        if not block_hashes:
            return {}
        first = self._holders(model, block_hashes[0]) & self._live
        if not first & self._multi:
            return self._match_single(model, block_hashes, first)
        out: dict[str, PrefixMatch] = {}
        for worker, segments in self._walk(model, block_hashes).items():
            by_tier = [0] * NUM_TIERS
            for t, n in segments:
                by_tier[t] += n
            out[worker] = PrefixMatch(sum(by_tier), by_tier)
        return out

    def holders_in_tier(self, tier: Tier) -> list[str]:
        """Holders with a live slot in `tier` (e.g. the KV stores, for Tier.STORE)."""
        return [w for (w, t) in self._slot_of if t == tier]

    def run_from(self, holder: str, model: str, block_hashes: Sequence[int], start: int) -> int:
        """How many consecutive blocks from `block_hashes[start]` on `holder` holds (any tier).

        What an engine can load from a KV store after its own cached run (vLLM's offloading
        connector looks up the blocks past the local hit). Touches nothing."""
        bits = self._worker_bits.get(holder, 0) & self._live
        young, old = self._young.get(model), self._old.get(model)
        if not bits or (young is None and old is None):
            return 0
        n = 0
        for h in block_hashes[start:]:
            k = h & SHARD_MASK
            v = young[k].get(h) if young is not None else None
            if v is None and old is not None:
                v = old[k].get(h)
            if not v or not v & bits:
                break
            n += 1
        return n

    def match(self, model: str, block_hashes: Sequence[int]) -> dict[str, list[Tier]]:
        """Per worker holding at least the first block: the best tier of each of its leading blocks."""
        out: dict[str, list[Tier]] = {}
        for worker, segments in self._walk(model, block_hashes).items():
            tiers: list[Tier] = []
            for t, n in segments:
                tiers += [_TIERS[t]] * n
            out[worker] = tiers
        return out

    def peek(self, model: str, block_hash: int) -> dict[str, Tier]:
        """Who holds one block, best tier each; unlike the matches, not a use (no effect on eviction)."""
        k = block_hash & SHARD_MASK
        v = None
        for gen in (self._young.get(model), self._old.get(model)):
            if gen is not None and (v := gen[k].get(block_hash)) is not None:
                break
        out: dict[str, Tier] = {}
        v = (v or 0) & self._live
        while v:
            low = v & -v
            v ^= low
            worker, tier = self._owner[low.bit_length() - 1]  # type: ignore[misc]
            if worker not in out or tier < out[worker]:
                out[worker] = _TIERS[tier]
        return out

    def blocks_of(self, worker_id: str) -> int:
        """Live entries a worker holds, all tiers and models (its 'tree size')."""
        yc, oc = self._young_count, self._old_count
        slots = [b.bit_length() - 1 for _, b in self._worker_slots.get(worker_id, ())]
        return sum(yc[s] + oc[s] for s in slots)

    def workers(self) -> list[str]:
        """Workers with at least one live slot."""
        return [w for w, bits in self._worker_bits.items() if bits]

    @property
    def num_keys(self) -> int:
        """Distinct (model, hash) keys held (what memory scales with)."""
        return self._young_keys + self._old_keys

    def __len__(self) -> int:
        return self._entries

    # ---- internals ----------------------------------------------------------------------

    def _scan(self, model: str, hashes: Sequence[int], alive: int, prev: int,
              on_change: Callable[[int, int, int], int]) -> tuple[int, int]:
        """The one loop over a request's blocks that both walks share.

        Per block: its holders among `alive` (the slots whose runs go on), `s`. Where `s`
        differs from `prev` (the last block's), `alive = on_change(i, prev, s)` and prev =
        `s & alive`; the walk ends at the first block no slot of `alive` holds (unknown, or
        every run over). Old-generation blocks a running slot holds are promoted (a use).
        Returns (end: the index of the block after the runs, prev: the slots still running there).
        """
        young, old = self._young.get(model), self._old.get(model)
        if young is None and old is None:
            return 0, prev
        ygets, ogets = self._getters(model, young, old)
        promote: list[int] = []
        end = len(hashes)
        for i, h in enumerate(hashes):
            v = ygets[h & SHARD_MASK](h)
            if v is None:
                v = ogets[h & SHARD_MASK](h)
                if v is None:
                    end = i
                    break
                if v & alive:
                    promote.append(h)
            s = v & alive
            if s == prev:
                continue
            if not s:
                end = i
                break
            alive = on_change(i, prev, s)
            prev = s & alive
            if not prev:
                end = i
                break
        if promote:
            self._promote(model, promote)
        return end, prev

    def _walk(self, model: str, hashes: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
        """worker -> [(tier, run length), ...] along the request's leading blocks."""
        owner, worker_bits, worker_slots = self._owner, self._worker_bits, self._worker_slots
        open_seg: dict[str, tuple[int, int]] = {}  # worker -> (tier, start) of its current run
        done: dict[str, list[tuple[int, int]]] = {}
        alive = self._live  # slots of workers still matching

        def on_change(i: int, prev: int, s: int) -> int:
            nonlocal alive
            # Who changed: a holder dropped out (its run ends here) or its best tier changed.
            changed = s if prev < 0 else prev ^ s
            seen: set[str] = set()
            while changed:
                low = changed & -changed
                changed ^= low
                worker = owner[low.bit_length() - 1][0]  # type: ignore[index]
                if worker in seen:
                    continue
                seen.add(worker)
                mine = s & worker_bits[worker]
                seg = open_seg.get(worker)
                if not mine:  # its run ends here
                    alive &= ~worker_bits[worker]
                    if seg is not None:
                        del open_seg[worker]
                        done.setdefault(worker, []).append((seg[0], i - seg[1]))
                    continue
                tier = next(t for t, b in worker_slots[worker] if mine & b)
                if seg is None:
                    open_seg[worker] = (tier, i)  # only on the first block: later, s holds open workers only
                elif seg[0] != tier:
                    done.setdefault(worker, []).append((seg[0], i - seg[1]))
                    open_seg[worker] = (tier, i)
            if prev < 0:  # the first block: from now on, only the workers holding it
                alive = 0
                for worker in open_seg:
                    alive |= worker_bits[worker]
            return alive

        end, _ = self._scan(model, hashes, alive, -1, on_change)
        for worker, (tier, start) in open_seg.items():
            if end > start:
                done.setdefault(worker, []).append((tier, end - start))
        return done

    def _getters(self, model: str, young: list[dict[int, int]] | None, old: list[dict[int, int]] | None
                 ) -> tuple[list, list]:
        """The bound `.get` of each shard of the model's two generations (made once per turnover)."""
        cached = self._gets.get(model)
        if cached is None or cached[0] is not young or cached[1] is not old:
            cached = (young, old, [d.get for d in young] if young is not None else _NO_GETS,
                      [d.get for d in old] if old is not None else _NO_GETS)
            self._gets[model] = cached
        return cached[2], cached[3]

    def _holders(self, model: str, h: int) -> int:
        """The slot mask stored for one block (0 when unknown); no side effects."""
        k = h & SHARD_MASK
        for gen in (self._young.get(model), self._old.get(model)):
            if gen is not None and (v := gen[k].get(h)) is not None:
                return v
        return 0

    def _match_single(self, model: str, hashes: Sequence[int], first: int) -> dict[str, PrefixMatch]:
        """match_prefix when every holder of the first block has one live slot (one tier).

        Then a slot's run is a worker's run, and a run ends where the slot's bit leaves the
        mask: the walk only records the block at which each set of bits drops out, and the
        per-worker work is one PrefixMatch at the end. (The general walk books segments per
        worker at every change: ~5 µs per holder, 0.3 ms for a system prompt that 60 of 64
        workers hold.) Same result as the general walk; touches the matched blocks alike.
        """
        out: dict[str, PrefixMatch] = {}
        if not first:
            return out
        ends: list[tuple[int, int]] = []  # (block index where these slots' runs end, their bits)

        def on_change(i: int, prev: int, s: int) -> int:
            ends.append((i, prev ^ s))
            return s

        end, running = self._scan(model, hashes, first, first, on_change)
        if running:
            ends.append((end, running))
        owner = self._owner
        for n, bits in ends:
            while bits:
                low = bits & -bits
                bits ^= low
                worker, tier = owner[low.bit_length() - 1]  # type: ignore[misc]
                by_tier = [0] * NUM_TIERS
                by_tier[tier] = n
                out[worker] = PrefixMatch(n, by_tier)
        return out

    def _promote(self, model: str, hashes: list[int]) -> None:
        """Move matched keys of the old generation into the young one (they were just used)."""
        old = self._old[model]
        young = self._young.get(model) or self._young.setdefault(model, _new_shards())
        live, intern = self._live, self._intern
        for h in hashes:
            k = h & SHARD_MASK
            v = old[k].pop(h, None)
            if v is None:
                continue
            self._old_keys -= 1
            v &= live
            self._promote_counts(v)
            young[k][h] = intern.setdefault(v, v)
            self._young_keys += 1
        if self._young_keys >= self._gen_cap:  # may pass the cap by one request's blocks until here
            self._rotate()

    def _promote_counts(self, v: int) -> None:
        yc, oc = self._young_count, self._old_count
        while v:
            low = v & -v
            v ^= low
            s = low.bit_length() - 1
            oc[s] -= 1
            yc[s] += 1

    def _rotate(self) -> None:
        """Drop the old generation (evicting its entries); the young one becomes old."""
        dropped = sum(self._old_count)  # retired slots' columns were zeroed when retired
        self._entries -= dropped
        self.evicted += dropped
        for dead in self._graveyard:  # normally long gone (released as fast as keys come in)
            dead.clear()
        self._graveyard = [d for shards in self._old.values() for d in shards if d]
        self._old, self._young = self._young, {}
        self._old_keys, self._young_keys = self._young_keys, 0
        self._old_count, self._young_count = self._young_count, [0] * len(self._young_count)
        for slot in list(self._retired):
            self._retired[slot] -= 1
            if self._retired[slot] <= 0:
                del self._retired[slot]
                self._free.append(slot)
        self._intern.clear()

    def _reap(self, budget: int) -> None:
        """Release up to `budget` keys of dropped generations (freeing 1 M ints at once stalls ~50 ms)."""
        grave = self._graveyard
        while grave and budget > 0:
            gen = grave[-1]
            pop, n = gen.popitem, min(budget, len(gen))
            for _ in range(n):
                pop()
            budget -= n + 1
            if not gen:
                grave.pop()

    def _slot(self, worker_id: str, tier: int) -> int:
        slot = self._slot_of.get((worker_id, tier))
        if slot is not None:
            return slot
        if self._free:
            self._free.sort(reverse=True)  # lowest first: keeps masks short
            slot = self._free.pop()
            self._owner[slot] = (worker_id, tier)
        else:
            slot = len(self._owner)
            self._owner.append((worker_id, tier))
            self._young_count.append(0)
            self._old_count.append(0)
        self._slot_of[(worker_id, tier)] = slot
        bit = 1 << slot
        self._live |= bit
        self._worker_bits[worker_id] = self._worker_bits.get(worker_id, 0) | bit
        slots = self._worker_slots.setdefault(worker_id, [])
        slots.append((tier, bit))
        slots.sort()
        self._set_multi(worker_id)
        return slot

    def _set_multi(self, worker_id: str) -> None:
        bits = self._worker_bits.get(worker_id, 0)
        self._multi &= ~bits
        if bits & (bits - 1):  # two bits or more
            self._multi |= bits

    def _retire(self, worker_id: str, slot: int) -> None:
        bit = 1 << slot
        self._entries -= self._young_count[slot] + self._old_count[slot]
        self._young_count[slot] = self._old_count[slot] = 0
        self._live &= ~bit
        self._worker_bits[worker_id] &= ~bit
        self._worker_slots[worker_id] = [(t, b) for t, b in self._worker_slots[worker_id] if b != bit]
        self._multi &= ~bit
        self._set_multi(worker_id)
        self._owner[slot] = None
        self._retired[slot] = 2  # no key carries the bit after two turnovers

    def _compact(self) -> None:
        """Strip retired slots' bits from every key now (O(keys)); frees all retired slots."""
        live = self._live
        for gens in (self._young, self._old):
            for shards in gens.values():
                for shard in shards:
                    stale = [h for h, v in shard.items() if v & ~live]
                    for h in stale:
                        v = shard[h] & live
                        if v:
                            shard[h] = v
                        else:
                            del shard[h]
                            if gens is self._young:
                                self._young_keys -= 1
                            else:
                                self._old_keys -= 1
        self._free.extend(self._retired)
        self._retired.clear()


def _new_shards() -> list[dict[int, int]]:
    return [{} for _ in range(SHARDS)]


_NO_GETS = [{}.get] * SHARDS


def _measure(n: int = 1_000_000, workers: int = 64) -> None:  # pragma: no cover - a measurement, run by hand
    """Bytes per key (tracemalloc, hash ints included: the index is their only owner) and ingest speed."""
    import random
    import time
    import tracemalloc

    def fill(index: BlockIndex) -> None:
        rng = random.Random(0)
        per = n // workers
        for w in range(workers):
            for _ in range(per // 64):
                index.stored(f"w{w}", "m", [rng.getrandbits(64) for _ in range(64)])

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = BlockIndex(max_blocks=4 * n)
    fill(index)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    keys = index.num_keys
    del index
    index = BlockIndex(max_blocks=4 * n)
    t0 = time.perf_counter()
    fill(index)
    dt = time.perf_counter() - t0
    print(f"{keys} keys, {len(index)} entries, {workers} workers: {used / 1e6:.1f} MB, "
          f"{used / keys:.1f} bytes/key; "
          f"ingest {keys / dt / 1e6:.2f} M hashes/s (hash generation included)")


if __name__ == "__main__":  # pragma: no cover
    _measure()
