"""BlockIndex semantics: stored/removed/cleared/drop_worker, tiers, longest prefix, models, the bound."""

import random

import pytest

from scheduler.index import BlockIndex, PrefixMatch, Tier

E, H, D, S = Tier.ENGINE, Tier.HOST, Tier.DISK, Tier.STORE


def test_longest_prefix_per_worker_in_one_lookup():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2, 3, 4])
    ix.stored("b", "m", [1, 2])
    ix.stored("c", "m", [2, 3, 4])  # lacks the first block: no prefix at all
    assert ix.match("m", [1, 2, 3, 4, 5]) == {"a": [E, E, E, E], "b": [E, E]}
    assert ix.match_prefix("m", [1, 2, 3]) == {"a": PrefixMatch(3, [3, 0, 0, 0]),
                                               "b": PrefixMatch(2, [2, 0, 0, 0])}


def test_prefix_stops_at_the_first_gap_even_if_later_blocks_are_held():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2, 4, 5])
    ix.stored("b", "m", [1, 2, 3, 4, 5])
    assert {w: len(t) for w, t in ix.match("m", [1, 2, 3, 4, 5]).items()} == {"a": 2, "b": 5}
    assert ix.match("m", [9, 1, 2]) == {}
    assert ix.match("m", []) == {}


def test_best_tier_of_each_block():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2, 3], H)
    ix.stored("a", "m", [1], E)
    ix.stored("a", "m", [3, 4], D)
    ix.stored("a", "m", [5], S)
    assert ix.match("m", [1, 2, 3, 4, 5, 6]) == {"a": [E, H, H, D, S]}
    assert ix.match_prefix("m", [1, 2, 3, 4, 5]) == {"a": PrefixMatch(5, [1, 2, 1, 1])}


def test_models_are_separate_namespaces():
    ix = BlockIndex()
    ix.stored("a", "m1", [1, 2])
    ix.stored("b", "m2", [1, 2, 3])
    assert ix.match("m1", [1, 2, 3]) == {"a": [E, E]}
    assert ix.match("m2", [1, 2, 3]) == {"b": [E, E, E]}
    assert ix.match("m3", [1]) == {}
    ix.removed("b", "m1", [1])  # b holds nothing of m1: no effect
    assert ix.match("m1", [1, 2]) == {"a": [E, E]}


def test_len_counts_hash_worker_tier_entries():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2])
    ix.stored("a", "m", [1, 2])  # repeated event: no new entries
    ix.stored("b", "m", [1])
    ix.stored("a", "m", [1], H)
    assert len(ix) == 4 and ix.num_keys == 2
    assert ix.blocks_of("a") == 3 and ix.blocks_of("b") == 1 and ix.blocks_of("zz") == 0


def test_removed_shortens_the_run_and_ignores_unknown_blocks():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2, 3])
    ix.stored("a", "m", [2], H)
    ix.removed("a", "m", [2])  # engine copy gone, host copy stays
    assert ix.match("m", [1, 2, 3]) == {"a": [E, H, E]}
    ix.removed("a", "m", [2], H)
    assert ix.match("m", [1, 2, 3]) == {"a": [E]}
    ix.removed("a", "m", [42, 43])
    ix.removed("nobody", "m", [1])
    assert len(ix) == 2 and ix.num_keys == 2


def test_cleared_one_tier_or_all_and_restore_afterwards():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2])
    ix.stored("a", "m", [1, 2, 3], H)
    ix.stored("b", "m", [1, 2])
    ix.cleared("a", H)
    assert ix.match("m", [1, 2, 3]) == {"a": [E, E], "b": [E, E]}
    assert len(ix) == 4
    ix.cleared("a")
    assert ix.match("m", [1, 2, 3]) == {"b": [E, E]}
    assert len(ix) == 2
    ix.stored("a", "m", [1], H)  # the worker comes back: its old blocks must not reappear
    assert ix.match("m", [1, 2, 3]) == {"a": [H], "b": [E, E]}
    assert len(ix) == 3


def test_drop_worker_forgets_it():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2])
    ix.stored("a", "m", [1], D)
    ix.stored("b", "m", [1])
    ix.drop_worker("a")
    assert ix.match("m", [1, 2]) == {"b": [E]}
    assert ix.workers() == ["b"] and len(ix) == 1 and ix.blocks_of("a") == 0


def test_bound_evicts_least_recently_stored():
    ix = BlockIndex(max_blocks=8)  # generations of 4 keys
    for h in range(100):
        ix.stored("a", "m", [h])
        assert ix.num_keys <= 8
    held = {h for h in range(100) if ix.peek("m", h)}
    assert {96, 97, 98, 99} <= held  # the last max_blocks/2 stored are always kept
    assert held <= set(range(92, 100))  # nothing older than max_blocks insertions survives
    assert len(ix) == len(held) and ix.evicted == 100 - len(held)


def test_matching_a_block_keeps_it_alive():
    ix = BlockIndex(max_blocks=8)
    ix.stored("a", "m", [1000])
    for h in range(40):
        ix.stored("a", "m", [h])
        assert ix.match("m", [1000]) == {"a": [E]}  # used all along: never evicted
    ix.stored("a", "m", [2000])
    for h in range(40, 60):
        ix.stored("a", "m", [h])
    assert ix.match("m", [2000]) == {}  # not used: evicted


def test_peek_is_not_a_use():
    ix = BlockIndex(max_blocks=4)
    ix.stored("a", "m", [1])
    ix.stored("b", "m", [1], H)
    ix.stored("b", "m", [1], D)
    assert ix.peek("m", 1) == {"a": E, "b": H}
    for h in range(2, 5):  # generations of 2 keys: survives 3 newer keys...
        ix.stored("a", "m", [h])
        assert ix.peek("m", 1)
    ix.stored("a", "m", [5])  # ...and peeking didn't count as a use
    assert ix.peek("m", 1) == {} and ix.peek("m", 99) == {}


def test_max_blocks_must_hold_something():
    with pytest.raises(ValueError):
        BlockIndex(max_blocks=1)


def _reference_match(held: set[tuple[str, int, int]], model_hashes: list[int]) -> dict[str, PrefixMatch]:
    workers = {w for w, _, _ in held}
    out = {}
    for w in workers:
        by_tier = [0, 0, 0, 0]
        n = 0
        for h in model_hashes:
            tiers = [t for t in range(4) if (w, t, h) in held]
            if not tiers:
                break
            by_tier[min(tiers)] += 1
            n += 1
        if n:
            out[w] = PrefixMatch(n, by_tier)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("engine_only", [0, 6, 12])
def test_random_operations_agree_with_a_brute_force_model(seed, engine_only):
    """Churn (stores, removes, clears, workers leaving, returning) vs a set of (worker, tier, hash).

    The first `engine_only` workers use one tier only: a prefix whose first block only they
    hold takes match_prefix's single-slot walk, the others the general one."""
    rng = random.Random(seed)
    ix = BlockIndex()
    held: set[tuple[str, int, int]] = set()
    workers = [f"w{i}" for i in range(12)]
    chains = [[rng.getrandbits(64) for _ in range(12)] for _ in range(4)]
    for step in range(1500):
        op = rng.random()
        w = rng.choice(workers)
        t = Tier.ENGINE if int(w[1:]) < engine_only else rng.choice(list(Tier))
        chain = rng.choice(chains)
        blocks = chain[: rng.randrange(1, len(chain) + 1)]
        if op < 0.5:
            ix.stored(w, "m", blocks, t)
            held |= {(w, int(t), h) for h in blocks}
        elif op < 0.85:
            some = rng.sample(blocks, rng.randrange(1, len(blocks) + 1))
            ix.removed(w, "m", some, t)
            held -= {(w, int(t), h) for h in some}
        elif op < 0.93:
            ix.cleared(w, t)
            held = {e for e in held if e[:2] != (w, int(t))}
        else:
            ix.drop_worker(w)
            held = {e for e in held if e[0] != w}
        if step % 25 == 0:
            for c in chains:
                assert ix.match_prefix("m", c) == _reference_match(held, c)
            assert len(ix) == len(held)
    for c in chains:
        expected = _reference_match(held, c)
        assert ix.match_prefix("m", c) == expected
        lengths = {w: len(tiers) for w, tiers in ix.match("m", c).items()}
        assert lengths == {w: m.blocks for w, m in expected.items()}


def test_a_reused_slot_never_inherits_old_blocks():
    ix = BlockIndex(max_blocks=8)
    ix.stored("a", "m", [1, 2])
    ix.stored("b", "m", [1])
    ix.cleared("a")  # a's slot retires; key 1 still carries its stale bit
    for h in range(100, 120):  # several generation turnovers, key 1 kept alive by use
        ix.stored("b", "m", [h])
        assert ix.match("m", [1]) == {"b": [E]}
    ix.stored("c", "m", [7])  # takes the lowest free slot: a's old one
    assert ix.peek("m", 1) == {"b": E}
    assert ix.match("m", [1, 2]) == {"b": [E]}
    assert ix.blocks_of("c") == 1


def test_many_workers_coming_and_going_keep_masks_small():
    ix = BlockIndex()
    for i in range(500):  # pods restart with new ids
        ix.stored(f"pod-{i}", "m", [i, i + 1])
        ix.drop_worker(f"pod-{i}")
    ix.stored("last", "m", [1])
    assert ix.peek("m", 1) == {"last": E}
    assert max(ix._slot_of.values()) < 64  # retired slots were compacted and reused


def test_run_from_counts_a_holders_blocks_from_any_position():
    ix = BlockIndex()
    ix.stored("store", "m", [3, 4, 5], Tier.STORE)
    ix.stored("store", "m", [7])
    assert ix.holders_in_tier(Tier.STORE) == ["store"]
    assert ix.run_from("store", "m", [1, 2, 3, 4, 5, 6, 7], 2) == 3
    assert ix.run_from("store", "m", [1, 2, 3, 4, 5, 6, 7], 0) == 0  # it lacks block 0
    assert ix.run_from("store", "m", [1, 2, 3, 4, 5, 6, 7], 6) == 1
    assert ix.run_from("store", "other", [3, 4], 0) == 0
    assert ix.run_from("nobody", "m", [3, 4], 0) == 0
    ix.cleared("store", Tier.STORE)
    assert ix.holders_in_tier(Tier.STORE) == [] and ix.run_from("store", "m", [3, 4, 5], 0) == 0
    assert ix.run_from("store", "m", [7], 0) == 1  # its ENGINE-tier slot is still live


def test_single_slot_walk_equals_the_general_walk_on_a_shared_system_prompt():
    """60 of 64 workers hold a prompt's head and drop out at different blocks (the case the
    single-slot walk exists for); the general walk, forced by a second tier elsewhere, agrees."""
    rng = random.Random(7)
    chain = [rng.getrandbits(64) for _ in range(200)]
    fast, general = BlockIndex(), BlockIndex()
    for i in range(60):
        run = chain[: rng.randrange(1, 201)]
        fast.stored(f"w{i}", "m", run)
        general.stored(f"w{i}", "m", run)
    general.stored("w0", "m", chain[:1], Tier.HOST)  # w0 now has two slots: the general walk
    fast.stored("w60", "m", [rng.getrandbits(64)], Tier.HOST)  # a 2-tier worker not on the prefix
    general.stored("w60", "m", [rng.getrandbits(64)], Tier.HOST)
    assert fast._multi == 0 or not (fast._holders("m", chain[0]) & fast._multi)
    assert general._holders("m", chain[0]) & general._multi
    got, want = fast.match_prefix("m", chain), general.match_prefix("m", chain)
    assert got == want and len(got) == 60
    assert sorted({m.blocks for m in got.values()}) != [200]  # runs of many lengths


def test_a_worker_back_to_one_tier_takes_the_single_slot_walk_again():
    ix = BlockIndex()
    ix.stored("a", "m", [1, 2], Tier.ENGINE)
    assert ix._multi == 0
    ix.stored("a", "m", [3], Tier.HOST)
    assert ix._multi == ix._worker_bits["a"]  # two slots: the general walk
    ix.cleared("a", Tier.HOST)
    assert ix._multi == 0
    ix.stored("b", "m", [1], Tier.DISK)  # may reuse no retired slot yet; one slot each
    assert ix._multi == 0
    assert ix.match_prefix("m", [1, 2, 3]) == {"a": PrefixMatch(2, [2, 0, 0, 0]),
                                               "b": PrefixMatch(1, [0, 0, 1, 0])}
