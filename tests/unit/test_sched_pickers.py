"""Pickers: max-score tie-breaks, seeded weighted-random and softmax sampling."""

import collections
import math

import pytest

from scheduler.framework import RequestView, ScoringContext, WorkerState
from scheduler.index import BlockIndex
from scheduler.pickers import MaxScore, RandomPicker, Softmax, WeightedRandom


def setup(n: int = 3, index: BlockIndex | None = None):
    workers = [WorkerState(f"w{i}", "m", 8) for i in range(n)]
    ctx = ScoringContext(RequestView("m", 16, [1], 16), index or BlockIndex(), workers)
    return ctx, workers


def test_max_score_takes_the_highest():
    ctx, workers = setup()
    assert MaxScore().pick(ctx, workers, [0.2, 0.9, 0.5]) == 1


def test_max_score_ties_go_to_the_least_recently_picked():
    ctx, workers = setup()
    workers[0].last_picked, workers[1].last_picked, workers[2].last_picked = 5, 2, 9
    assert MaxScore().pick(ctx, workers, [1.0, 1.0, 1.0]) == 1
    assert MaxScore().pick(ctx, workers, [1.0, 0.5, 1.0]) == 0


def test_max_score_random_ties_are_seeded():
    ctx, workers = setup(4)
    p = MaxScore("random", seed=5)
    seq = [p.pick(ctx, workers, [1, 1, 0, 1]) for _ in range(60)]
    q = MaxScore("random", seed=5)
    assert seq == [q.pick(ctx, workers, [1, 1, 0, 1]) for _ in range(60)]
    assert set(seq) == {0, 1, 3}


def test_smallest_tree_tie_break():
    ix = BlockIndex()
    ix.stored("w0", "m", [1, 2, 3])
    ix.stored("w2", "m", [4])
    ctx, workers = setup(3, ix)
    assert MaxScore("smallest-tree").pick(ctx, workers, [1, 1, 1]) == 1  # w1 holds nothing


def test_weighted_random_is_reproducible_and_proportional():
    ctx, workers = setup()
    scores = [0.0, 1.0, 3.0]
    a = WeightedRandom(seed=11)
    picks = [a.pick(ctx, workers, scores) for _ in range(4000)]
    b = WeightedRandom(seed=11)
    assert picks == [b.pick(ctx, workers, scores) for _ in range(4000)]
    counts = collections.Counter(picks)
    assert counts[0] == 0
    assert counts[2] / 4000 == pytest.approx(0.75, abs=0.03)


def test_weighted_random_with_all_zero_scores_is_uniform():
    ctx, workers = setup()
    picker = WeightedRandom(seed=1)
    counts = collections.Counter(picker.pick(ctx, workers, [0, 0, 0]) for _ in range(3000))
    assert all(c / 3000 == pytest.approx(1 / 3, abs=0.04) for c in counts.values()) and len(counts) == 3


def test_softmax():
    ctx, workers = setup()
    assert Softmax(temperature=0).pick(ctx, workers, [0.1, 0.8, 0.3]) == 1
    p = Softmax(temperature=0.25, seed=2)
    counts = collections.Counter(p.pick(ctx, workers, [0.0, 0.5, 1.0]) for _ in range(5000))
    z = [math.exp(s / 0.25) for s in (0.0, 0.5, 1.0)]
    for i in range(3):
        assert counts[i] / 5000 == pytest.approx(z[i] / sum(z), abs=0.03)


def test_random_picker_ignores_scores():
    ctx, workers = setup()
    picker = RandomPicker(seed=4)
    counts = collections.Counter(picker.pick(ctx, workers, [1.0, 0.0, 0.0]) for _ in range(600))
    assert len(counts) == 3
