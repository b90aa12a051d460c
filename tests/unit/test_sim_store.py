"""The simulated KV store on its own and under simulated engines: offload on eviction, loads of
store hits at the link's speed, cross-engine reuse, and the events the scheduler's index sees."""

from __future__ import annotations

import pytest

from scheduler.block_hash import BlockHasher, external_block_hash
from scheduler.index import BlockIndex, Tier
from services.engines.base import EngineRequest, SamplingOptions
from services.engines.sim_model import SimConfig, SimLatency, SimModel, SimOutput
from services.engines.sim_store import SimStore, StoreLink, connect_store_index

LAT = SimLatency(prefill_per_token_s=0.001, step_overhead_s=0.01, itl_s=0.1, batch_slowdown=0.0)
# 1 byte per token at 8e-6 Gb/s = 1000 tokens/s, + 5 ms per load: easy numbers.
LINK = StoreLink(bytes_per_token=1, bandwidth_gbps=8e-6, latency_s=0.005)
BS = 4


def engine(store: SimStore | None, num_blocks: int = 8) -> SimModel:
    return SimModel(SimConfig(block_size=BS, num_blocks=num_blocks, latency=LAT, max_model_len=64), store=store)


def req(rid: str, prompt: list[int], max_tokens: int = 1) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens))


def run(m: SimModel) -> list[SimOutput]:
    out = []
    while (t := m.next_event_time()) is not None:
        out += m.advance(t)
    return out


def first(outs: list[SimOutput], rid: str) -> SimOutput:
    return next(o for o in outs if o.request_id == rid)


def hashes(tokens: list[int]) -> list[bytes]:
    return BlockHasher(BS).hash_blocks(tokens)


def test_store_is_lru_and_its_events_replay_to_its_keys():
    held: set[int] = set()
    events = []

    def on_event(kind, hs):
        events.append((kind, list(hs)))
        (held.update if kind == "stored" else held.difference_update)(hs)

    store = SimStore(3, on_event=on_event)
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    store.put([a, b, c])
    assert store.longest_run([a, b, d]) == 2  # a, b touched: c is now the LRU
    store.put([d])
    assert c not in store and {a, b, d} <= set(store._blocks)
    assert held == {external_block_hash(h) for h in (a, b, d)} and len(store) == 3
    assert events[-1] == ("removed", [external_block_hash(c)])
    store.put([a])  # already held: no event, no count
    assert len(events) == 3 and store.stats.put_blocks == 4 and store.stats.evicted_blocks == 1
    assert store.longest_run([c, a]) == 0  # a run starts at the first block
    assert store.longest_run([a, b], touch=False) == 2 and store.stats.hit_blocks == 2


def test_store_rejects_bad_config():
    with pytest.raises(ValueError):
        SimStore(0)
    with pytest.raises(ValueError):
        SimStore(4, offload="always")
    with pytest.raises(ValueError):
        StoreLink(bandwidth_gbps=0)


def test_evicted_prefix_comes_back_from_the_store_at_link_speed():
    prompt = list(range(100, 116))  # 16 tokens = 4 blocks; the hit cap is 3 blocks (12 tokens)
    other = list(range(200, 232))  # 8 blocks: fills the engine, evicting every block of `prompt`
    results = {}
    for with_store in (False, True):
        store = SimStore(64, link=LINK) if with_store else None
        m = engine(store)
        m.add_request(req("a", prompt), now=0.0)
        run(m)
        m.add_request(req("b", other[:29]), now=10.0)  # 29 tokens: all 8 blocks
        run(m)
        assert m.cached_blocks(prompt) == 0  # evicted from the engine
        m.add_request(req("c", prompt), now=20.0)
        outs = run(m)
        results[with_store] = (first(outs, "c"), m, store)
    cold, _, _ = results[False]
    assert cold.cached_prompt_tokens == 0
    assert cold.time - 20.0 == pytest.approx(0.01 + 16 * 0.001)  # recomputed
    warm, m, store = results[True]
    assert all(h in store for h in hashes(prompt)[:4])  # offloaded when evicted
    assert warm.cached_prompt_tokens == 12  # 3 blocks loaded count as cached, like vLLM's external hits
    # load 12 tokens at 1000 tokens/s + 5 ms, then a prefill step of the 4 tokens left
    assert warm.time - 20.0 == pytest.approx(0.012 + 0.005 + 0.01 + 4 * 0.001)
    assert m.stats.store_loads == 1 and m.stats.store_loaded_tokens == 12
    assert m.stats.prefill_computed_tokens == 16 + 29 + 4


def test_another_engine_reuses_what_one_offloaded_and_keys_it():
    prompt = list(range(100, 116))
    store = SimStore(64, link=LINK, offload="compute")  # every computed block goes to the store
    a, b = engine(store), engine(store)
    events = []
    b.pool.on_kv_event = events.append
    a.add_request(req("x", prompt), now=0.0)
    run(a)
    b.add_request(req("y", prompt), now=1.0)
    assert b.load().waiting == 1  # admitted into a load: it holds blocks and waits
    out = first(run(b), "y")
    assert out.cached_prompt_tokens == 12 and b.stats.store_loads == 1
    assert b.cached_blocks(prompt) == 4  # the loaded 3 and the computed 4th are the engine's own now
    stored = [h for e in events for h in getattr(e, "block_hashes", ())]
    assert [external_block_hash(h) for h in hashes(prompt)] == stored


def test_a_request_aborted_while_loading_frees_everything():
    prompt = list(range(100, 116))
    store = SimStore(64, link=LINK, offload="compute")
    a, b = engine(store), engine(store)
    a.add_request(req("x", prompt), now=0.0)
    run(a)
    b.add_request(req("y", prompt, max_tokens=4), now=1.0)
    b.advance(1.0)  # the load starts
    assert b.finish("y", now=1.001)
    assert run(b) == [] and b.load().waiting == 0 and b.load().kv_cache_usage == 0.0


def test_store_events_reach_the_index_as_a_store_holder():
    index = BlockIndex()
    store = SimStore(64, link=LINK)
    connect_store_index(store, "kvstore-0", "m", index)
    m = engine(store)
    prompt = list(range(100, 116))
    m.add_request(req("a", prompt), now=0.0)
    run(m)
    m.add_request(req("b", list(range(200, 229))), now=5.0)
    run(m)
    ints = [external_block_hash(h) for h in hashes(prompt)]
    match = index.match_prefix("m", ints)["kvstore-0"]
    assert match.blocks == 4 and match.by_tier[Tier.STORE] == 4
