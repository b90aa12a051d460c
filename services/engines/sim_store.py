"""A simulated KV store shared by simulated engines (services/engines/sim_model.py).

Pure: no I/O, no clock. What it models of the real store (`llm-mesh kvstore`):
- one bounded pool of KV blocks, keyed by the engines' chained block hashes, shared by
  every engine attached to it, LRU-evicted (a lookup or a write touches a block);
- engines write blocks to it (`put`): on eviction from their own cache (`offload="evict"`,
  a write-back victim cache: the store then holds what the engines lost) or as soon as a
  block is computed (`offload="compute"`, what vLLM's offloading connector does: the store
  also serves other engines' fresh prefixes);
- an engine takes the run of blocks that continues its own cached prefix (`longest_run`)
  and loads it over its link to the store (`StoreLink`: latency + bytes / bandwidth) instead
  of recomputing it;
- it announces what it holds as KV events, tier STORE, under its own holder id, so the
  scheduler's block index covers it (`on_event(kind, hashes)`, kind "stored"/"removed",
  hashes as 64-bit ints), exactly as the real store's WatchKVEvents stream.
Not modelled: the store's own bandwidth limit (each engine's link is its bottleneck), the
disk tier, pins (a block being loaded cannot be evicted here: loads are instant to reserve).

Invariant: replaying the events from empty gives exactly the keys held (`len(store)` of them,
never more than `capacity_blocks`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

from scheduler.block_hash import external_block_hash
from services.engines.sim_link import KVLink

OFFLOAD_MODES = ("evict", "compute")


@dataclasses.dataclass(frozen=True)
class StoreLink(KVLink):
    """An engine's link to the store. 80 Gb/s (10 GB/s: a NIXL READ from the store's RAM pool
    measured 7-12 GB/s here, DESIGN.md) + 1 ms (pin, handshake, completion): ~76k tokens/s of
    128 KiB, so a store hit costs ~1/8 of a recompute at 10k tokens/s."""

    bandwidth_gbps: float = 80.0


@dataclasses.dataclass
class SimStoreStats:
    put_blocks: int = 0  # blocks newly stored
    hit_blocks: int = 0  # blocks handed to engines by longest_run
    evicted_blocks: int = 0


class SimStore:
    """The shared block pool (see the module docstring)."""

    def __init__(self, capacity_blocks: int, *, offload: str = "evict", link: StoreLink = StoreLink(),
                 on_event: Callable[[str, list[int]], None] | None = None) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
        self.capacity_blocks = capacity_blocks
        self.offload = offload
        self.link = link
        self.on_event = on_event
        self.stats = SimStoreStats()
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._blocks

    def put(self, hashes: Sequence[bytes]) -> None:
        """Store blocks (raw hashes); ones already held are only touched."""
        blocks, new = self._blocks, []
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
                continue
            blocks[h] = None
            new.append(h)
        if not new:
            return
        self.stats.put_blocks += len(new)
        evicted = []
        while len(blocks) > self.capacity_blocks:
            victim, _ = blocks.popitem(last=False)
            evicted.append(victim)
        self.stats.evicted_blocks += len(evicted)
        if self.on_event is not None:
            gone = set(evicted)
            stored = [external_block_hash(h) for h in new if h not in gone]
            if stored:
                self.on_event("stored", stored)
            fresh = set(new)
            removed = [external_block_hash(h) for h in evicted if h not in fresh]
            if removed:
                self.on_event("removed", removed)

    def longest_run(self, hashes: Sequence[bytes], *, touch: bool = True) -> int:
        """How many leading `hashes` the store holds. `touch`: a load (they become most recently
        used and count as hits); False: a look that changes nothing."""
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        if touch:
            for h in hashes[:n]:
                blocks.move_to_end(h)
            self.stats.hit_blocks += n
        return n


def connect_store_index(store: SimStore, store_id: str, model: str, index) -> None:
    """Feed the store's events into a scheduler.index.BlockIndex as holder `store_id`, tier STORE."""
    from scheduler.index import Tier

    def on_event(kind: str, hashes: list[int]) -> None:
        if kind == "stored":
            index.stored(store_id, model, hashes, Tier.STORE)
        else:
            index.removed(store_id, model, hashes, Tier.STORE)

    store.on_event = on_event
