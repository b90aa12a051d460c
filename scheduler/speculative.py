"""Speculative prefixes: what this replica just routed, until the workers' KV events catch up.

A worker announces a prompt's blocks only once it has prefilled them, which
under load is seconds after the request was routed. Meanwhile a burst of
requests sharing that prefix would look uncached everywhere and be spread
over several workers, each recomputing it. So the policy records each routed
request's blocks here for its worker, and scoring takes, per worker, the
longer of the index's run and this one (counted as engine-tier blocks).

Layout, chosen so recording and matching cost a few microseconds even for
3,000-block prompts:
- block hash → (worker, routed at), last writer wins, written with one
  C-level `dict.update` per request;
- only sampled block positions (and the prompt's last block) are recorded
  and looked up. Hashes are chained, so "block i was routed to w" implies w
  was sent blocks 0..i: a worker's run is 1 + the last sampled position it
  owns before the first unknown one. The samples are one fixed sequence for
  every prompt length (so a short prompt and a long one sharing its head hit
  the same positions): every `stride`-th block for the first 64 samples, then
  the step doubles every 64 samples up to `max_stride`. A 3,400-block prompt
  records ~240 positions instead of 850. The price is granularity: a run
  ending at block i is under-counted by fewer than the step there (4 blocks
  in the first 256, at most `max_stride`: ~1% of a prompt that long); a
  worker that lost a block to a later writer loses part of its credit;
- two generations per model, like the index: when the young one reaches
  `max_blocks // 2` entries the old one is dropped (released a little per
  record, never all at once). Each generation is sharded by the hash's low
  bits like the index (`scheduler.index.SHARDS`): one dict of 131k entries
  resized inside `record` for up to 5.6 ms, the decision's whole p99 budget.
Entries count for `ttl_s` after routing (by `RequestView.now`; with no clock
only the size bound applies).
"""

from __future__ import annotations

import bisect
import math

from scheduler.framework import RequestView
from scheduler.index import SHARD_MASK, SHARDS

_Shard = dict[int, tuple[str, float]]  # block hash -> (worker, routed at)

_SAMPLES_PER_STEP = 64  # samples at each step size before it doubles
_EMPTY_GETS = [{}.get] * SHARDS  # a generation with nothing in it


class _Table:
    """One model's entries in one generation: SHARDS dicts and their bound `get`s (made once)."""

    __slots__ = ("shards", "gets")

    def __init__(self, shards: list[_Shard] | None = None) -> None:
        self.shards = shards if shards is not None else [{} for _ in range(SHARDS)]
        self.gets = [shard.get for shard in self.shards]


class SpeculativePrefixes:
    def __init__(self, ttl_s: float = 20.0, max_blocks: int = 131_072, stride: int = 4,
                 max_stride: int = 32) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_blocks < 2 or stride < 1 or max_stride < stride:
            raise ValueError(f"need max_blocks >= 2 and 1 <= stride <= max_stride, "
                             f"got {max_blocks}, {stride}, {max_stride}")
        self.ttl_s = ttl_s
        self.stride = stride
        self.max_stride = max_stride
        self._samples: list[int] = []  # the fixed sample sequence, extended on demand
        self._cap = max_blocks // 2
        self._young: dict[str, _Table] = {}
        self._old: dict[str, _Table] = {}
        self._young_len = 0
        self._graveyard: list[_Shard] = []  # shards being released

    def _positions(self, n: int) -> list[int]:
        """The sampled positions below n, plus n - 1 (the prompt's last block)."""
        samples = self._samples
        if not samples or samples[-1] < n:
            self._extend(n)
        pos = samples[:bisect.bisect_left(samples, n)]
        if n and (not pos or pos[-1] != n - 1):
            pos.append(n - 1)
        return pos

    def _extend(self, n: int) -> None:
        samples = self._samples
        while not samples or samples[-1] < n:
            step = min(self.max_stride, self.stride << (len(samples) // _SAMPLES_PER_STEP))
            samples.append((samples[-1] if samples else -1) + step)

    def match(self, request: RequestView) -> dict[str, int]:
        """Worker id → leading blocks of this prompt it was recently sent (1 + a sampled position)."""
        hashes = request.block_hashes
        young, old = self._young.get(request.model), self._old.get(request.model)
        if not hashes or (not young and not old):
            return {}
        cutoff = -math.inf if request.now is None else request.now - self.ttl_s
        yget = young.gets if young else _EMPTY_GETS
        oget = old.gets if old else _EMPTY_GETS
        run: dict[str, int] = {}
        mask = SHARD_MASK
        for i in self._positions(len(hashes)):
            h = hashes[i]
            v = yget[h & mask](h) or oget[h & mask](h)
            if v is None or v[1] < cutoff:
                break
            run[v[0]] = i + 1
        return run

    def record(self, request: RequestView, worker_id: str) -> None:
        hashes = request.block_hashes
        if not hashes:
            return
        if self._young_len >= self._cap:
            self._graveyard.extend(shard for table in self._old.values() for shard in table.shards if shard)
            self._old, self._young, self._young_len = self._young, {}, 0
        young = self._young.get(request.model)
        if young is None:
            young = self._young[request.model] = _Table()
        table = young.shards
        stamp = (worker_id, -math.inf if request.now is None else request.now)  # one tuple for all blocks
        known = 0
        positions = self._positions(len(hashes))
        mask = SHARD_MASK
        for i in positions:
            h = hashes[i]
            shard = table[h & mask]
            known += h in shard
            shard[h] = stamp
        added = len(positions) - known
        self._young_len += added
        self._reap(added + 16)

    def forget_worker(self, worker_id: str) -> None:
        for gen in (self._young, self._old):
            for model, table in gen.items():
                gen[model] = _Table([{h: v for h, v in shard.items() if v[0] != worker_id}
                                     for shard in table.shards])
        self._young_len = sum(len(shard) for table in self._young.values() for shard in table.shards)

    def __len__(self) -> int:
        return sum(len(shard) for gen in (self._young, self._old) for table in gen.values()
                   for shard in table.shards)

    def _reap(self, budget: int) -> None:
        grave = self._graveyard
        while grave and budget > 0:
            table = grave[-1]
            pop, n = table.popitem, min(budget, len(table))
            for _ in range(n):
                pop()
            budget -= n + 1
            if not table:
                grave.pop()
