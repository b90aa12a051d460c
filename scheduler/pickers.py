"""Pickers: choose one worker from the weighted total scores.

- `max-score` (default): the highest total. Ties (within 1e-9) are broken by
  `tie_break`: `lru` (default; the tied worker picked least recently, so equal
  workers take turns instead of one taking a whole burst), `random` (llm-d's
  shuffle; seeded), or `smallest-tree` (fewest blocks in the index, then random:
  Dynamo's rule at temperature 0).
- `weighted-random`: P(worker) ∝ total score (uniform if all are 0). Param `seed`.
- `softmax`: P ∝ exp(total / temperature) (Dynamo's sampler: with its cost
  min-max normalized by the `kv-cost` scorer this is exactly Dynamo's
  exp(-(cost / (max - min)) / T)); temperature 0 is `max-score` with
  `smallest-tree` ties. Params `temperature` (default 0), `seed`.
- `random`: uniform over eligible workers, ignoring scores. Param `seed`.
- `round-robin`: the next eligible worker in id order after the last one it
  picked, ignoring scores (advances only on committed decisions).
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Any

from scheduler.framework import ScoringContext, WorkerState

EPS = 1e-9


def _ties(scores: list[float]) -> list[int]:
    best = max(scores)
    return [i for i, s in enumerate(scores) if s >= best - EPS]


class MaxScore:
    name = "max-score"

    def __init__(self, tie_break: str = "lru", seed: int | None = None) -> None:
        if tie_break not in ("lru", "random", "smallest-tree"):
            raise ValueError(f"tie_break must be lru, random or smallest-tree, got {tie_break!r}")
        self.tie_break = tie_break
        self.rng = random.Random(seed)

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        tied = _ties(scores)
        if len(tied) == 1:
            return tied[0]
        if self.tie_break == "lru":
            return min(tied, key=lambda i: (workers[i].last_picked, workers[i].worker_id))
        if self.tie_break == "smallest-tree":
            sizes = [ctx.index.blocks_of(workers[i].worker_id) for i in tied]
            tied = [i for i, n in zip(tied, sizes) if n == min(sizes)]
        return tied[self.rng.randrange(len(tied))] if len(tied) > 1 else tied[0]


class WeightedRandom:
    name = "weighted-random"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        return _sample(self.rng, [max(0.0, s) for s in scores])


class Softmax:
    name = "softmax"

    def __init__(self, temperature: float = 0.0, seed: int | None = None) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.temperature = temperature
        self.rng = random.Random(seed)
        self._argmax = MaxScore("smallest-tree", seed)
        self._argmax.rng = self.rng

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        if self.temperature == 0:
            return self._argmax.pick(ctx, workers, scores)
        top = max(scores)
        return _sample(self.rng, [math.exp((s - top) / self.temperature) for s in scores])


class RandomPicker:
    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        return self.rng.randrange(len(workers))


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._last: str | None = None

    def pick(self, ctx: ScoringContext, workers: list[WorkerState], scores: list[float]) -> int:
        ids = sorted(w.worker_id for w in workers)
        nxt = ids[bisect.bisect_right(ids, self._last) % len(ids)] if self._last is not None else ids[0]
        return next(i for i, w in enumerate(workers) if w.worker_id == nxt)

    def commit(self, ctx: ScoringContext, chosen: WorkerState) -> None:
        self._last = chosen.worker_id


def _sample(rng: random.Random, weights: list[float]) -> int:
    total = sum(weights)
    if total <= 0:
        return rng.randrange(len(weights))
    x = rng.random() * total
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if x < acc:
            return i
    return max(i for i, w in enumerate(weights) if w > 0)


PICKERS: dict[str, Any] = {p.name: p for p in (MaxScore, WeightedRandom, Softmax, RandomPicker, RoundRobin)}
