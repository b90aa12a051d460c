"""The simulation model on its own clock: KV cache, prefix hits, batching, latency, tokens."""

from __future__ import annotations

import dataclasses

import pytest

from services.engines.base import EngineRequest, SamplingOptions
from services.engines.sim_model import SimConfig, SimLatency, SimModel, SimOutput, Vocabulary

LAT = SimLatency(prefill_per_token_s=0.001, step_overhead_s=0.01, itl_s=0.1, batch_slowdown=0.5)


def model(**kw) -> SimModel:
    kw.setdefault("latency", LAT)
    return SimModel(SimConfig(**kw))


def req(rid: str, prompt: list[int], max_tokens: int = 4, **sampling) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens, **sampling))


def run(m: SimModel) -> list[SimOutput]:
    """Advance event by event until idle."""
    out = []
    while (t := m.next_event_time()) is not None:
        out += m.advance(t)
    return out


def of(outputs: list[SimOutput], rid: str) -> list[SimOutput]:
    return [o for o in outputs if o.request_id == rid]


def test_single_request_timing_and_counts():
    m = model(block_size=4)
    m.add_request(req("a", list(range(10)), max_tokens=3), now=1.0)
    outs = run(m)
    assert [o.token_id is not None for o in outs] == [True] * 3
    # prefill: 0.01 + 10 * 0.001; then two decode steps of 0.1 at batch 1
    assert [o.time for o in outs] == pytest.approx([1.02, 1.12, 1.22])
    assert [o.finish_reason for o in outs] == [None, None, "length"]
    assert [o.completion_tokens for o in outs] == [1, 2, 3]
    assert outs[-1].prompt_tokens == 10 and outs[-1].cached_prompt_tokens == 0
    assert m.load().running == 0 and m.load().kv_cache_usage == 0.0 and m.load().generated_tokens == 3


def test_repeated_prompt_hits_the_prefix_cache():
    m = model(block_size=16)
    prompt = list(range(100, 150))  # 3 full blocks + 2 tokens
    m.add_request(req("a", prompt, max_tokens=1), now=0.0)
    first = run(m)[-1]
    m.add_request(req("b", prompt, max_tokens=1), now=10.0)
    second = run(m)[-1]
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens == 48
    # TTFT is the prefill of the 2 uncached tokens only.
    assert first.time == pytest.approx(0.01 + 50 * 0.001)
    assert second.time - 10.0 == pytest.approx(0.01 + 2 * 0.001)
    # A prompt sharing only the first block hits only that block.
    m.add_request(req("c", prompt[:16] + [7] * 34, max_tokens=1), now=20.0)
    assert run(m)[-1].cached_prompt_tokens == 16
    assert m.stats.cached_prompt_tokens == 64


def test_a_fully_cached_prompt_still_recomputes_its_last_block():
    # vLLM caps a hit at (n - 1) // block_size blocks: the last token's logits are needed.
    m = model(block_size=16)
    prompt = list(range(32))
    for i, now in enumerate((0.0, 5.0)):
        m.add_request(req(f"r{i}", prompt, max_tokens=1), now=now)
        last = run(m)[-1]
    assert last.cached_prompt_tokens == 16


def test_generated_tokens_are_cached_too():
    # The next turn of a conversation (prompt + answer + more) hits the answer's blocks as well.
    m = model(block_size=4)
    prompt = list(range(1000, 1008))
    m.add_request(req("turn1", prompt, max_tokens=9), now=0.0)
    answer = [o.token_id for o in run(m)]
    m.add_request(req("turn2", prompt + answer + [5, 6, 7], max_tokens=1), now=10.0)
    # 8 prompt + 8 of the 9 answer tokens have KV (the last sampled token was never fed).
    assert run(m)[-1].cached_prompt_tokens == 16


def test_lru_eviction_when_blocks_run_out():
    m = model(block_size=4, num_blocks=8)
    a, b, c = list(range(0, 12)), list(range(100, 112)), list(range(200, 216))
    for rid, prompt, now in (("a", a, 0.0), ("b", b, 1.0)):
        m.add_request(req(rid, prompt, max_tokens=1), now=now)
        run(m)
    assert (m.cached_blocks(a), m.cached_blocks(b)) == (3, 3)
    assert m.load().kv_cache_usage == 0.0  # cached but unreferenced blocks are free
    m.add_request(req("c", c, max_tokens=1), now=2.0)  # needs 4 of the 2 never-used + 6 cached blocks
    run(m)
    # The least recently used (a) loses blocks, its tail first; b is untouched.
    assert (m.cached_blocks(a), m.cached_blocks(b), m.cached_blocks(c)) == (1, 3, 4)
    assert m.stats.blocks_evicted == 2
    # A hit refreshes recency: after using a again, b is the next victim.
    m.add_request(req("a2", a, max_tokens=1), now=3.0)
    run(m)
    m.add_request(req("d", list(range(300, 312)), max_tokens=1), now=4.0)
    run(m)
    assert m.cached_blocks(a) == 3 and m.cached_blocks(b) < 3


def test_batching_slows_each_step_by_the_configured_factor():
    m = model(block_size=16)
    m.add_request(req("solo", [1] * 10, max_tokens=3), now=0.0)
    solo = run(m)
    assert solo[2].time - solo[1].time == pytest.approx(0.1)
    for i in range(4):
        m.add_request(req(f"r{i}", [2, i] * 5, max_tokens=3), now=10.0)
    outs = run(m)
    # All four arrived together: one prefill step, then decode steps of 4.
    assert [o.time for o in outs if o.completion_tokens == 1] == pytest.approx([10.0 + 0.01 + 40 * 0.001] * 4)
    r0 = of(outs, "r0")
    assert r0[2].time - r0[1].time == pytest.approx(0.1 * (1 + 0.5 * 3))
    assert m.stats.prefill_steps == 2


def test_max_num_seqs_queues_the_rest():
    m = model(block_size=16, max_num_seqs=2)
    for i in range(3):
        m.add_request(req(f"r{i}", [i] * 8, max_tokens=2), now=0.0)
    assert (m.load().running, m.load().waiting) == (0, 3)
    first = m.advance(0.0)
    assert first == [] and (m.load().running, m.load().waiting) == (2, 1)
    outs = run(m)
    r1_done = of(outs, "r1")[-1].time
    r2 = of(outs, "r2")
    assert len(r2) == 2 and r2[0].time > r1_done  # admitted only after a slot freed
    assert r2[0].time == pytest.approx(r1_done + 0.01 + 8 * 0.001)


def test_admission_waits_for_kv_blocks():
    m = model(block_size=4, num_blocks=5)
    m.add_request(req("big", list(range(16)), max_tokens=4), now=0.0)  # 4 blocks now, 5 at the end
    m.add_request(req("next", list(range(50, 58)), max_tokens=1), now=0.0)  # needs 2
    m.advance(0.0)
    assert (m.load().running, m.load().waiting) == (1, 1)
    outs = run(m)
    assert of(outs, "next")[0].time > of(outs, "big")[-1].time


def test_preemption_when_decode_runs_out_of_blocks():
    cfg = dict(block_size=4, num_blocks=6)
    m = model(**cfg)
    m.add_request(req("a", list(range(8)), max_tokens=12), now=0.0)
    m.add_request(req("b", list(range(100, 108)), max_tokens=12), now=0.0)
    outs = run(m)
    assert m.stats.preemptions >= 1
    # Preemption changes timing, never the tokens.
    for rid, prompt in (("a", list(range(8))), ("b", list(range(100, 108)))):
        alone = model(**cfg)
        alone.add_request(req(rid, prompt, max_tokens=12), now=0.0)
        assert [o.token_id for o in of(outs, rid)] == [o.token_id for o in run(alone)]
        assert of(outs, rid)[-1].finish_reason == "length" and of(outs, rid)[-1].completion_tokens == 12
    assert m.load().kv_cache_usage == 0.0


def test_abort_frees_blocks_and_stops_tokens():
    m = model(block_size=4, num_blocks=32)
    m.add_request(req("a", list(range(20)), max_tokens=50), now=0.0)
    # Prefill ends at 0.03, decodes at 0.13 … 0.43; the step feeding token 5 (25 tokens of KV) runs.
    assert len(m.advance(0.5)) == 5
    assert m.load().running == 1 and m.load().kv_cache_usage == pytest.approx(7 / 32)
    made = m.stats.generated_tokens
    assert m.abort("a", now=0.5) is True
    assert m.load().running == 0 and m.load().kv_cache_usage == 0.0
    assert run(m) == [] and m.stats.generated_tokens == made
    assert m.abort("a", now=1.0) is False
    # Aborting a waiting request removes it from the queue.
    m2 = model(max_num_seqs=1)
    m2.add_request(req("x", [1, 2, 3], max_tokens=5), now=0.0)
    m2.add_request(req("y", [1, 2, 3], max_tokens=5), now=0.0)
    m2.advance(0.0)
    assert m2.abort("y", now=0.0) and m2.load().waiting == 0
    assert {o.request_id for o in run(m2)} == {"x"}


def test_abort_during_a_step_drops_its_token():
    m = model()
    m.add_request(req("a", [1, 2, 3], max_tokens=5), now=0.0)
    m.add_request(req("b", [4, 5, 6], max_tokens=5), now=0.0)
    m.advance(0.0)  # the prefill step is in flight
    m.abort("a", now=0.001)
    outs = run(m)
    assert of(outs, "a") == [] and len(of(outs, "b")) == 5


def test_tokens_are_reproducible_and_never_special():
    vocab = Vocabulary(1000, special_ids=frozenset(range(10)), eos_token_id=999)

    def tokens(rid: str, **sampling) -> list[int]:
        m = SimModel(SimConfig(latency=LAT), vocab)
        m.add_request(req(rid, [5, 6, 7, 8], max_tokens=40, **sampling), now=0.0)
        return [o.token_id for o in run(m)]

    seeded = tokens("x", seed=7)
    assert seeded == tokens("y", seed=7)  # a seed makes the id irrelevant
    assert seeded != tokens("x", seed=8)
    assert tokens("x") == tokens("x") and tokens("x") != tokens("y")
    assert tokens("x", temperature=0.0) == tokens("y", temperature=0.0)  # greedy: the prompt decides
    assert all(10 <= t < 999 for t in seeded + tokens("z"))
    assert len(set(seeded)) > 30


def test_stop_token_ids_and_simulated_eos():
    vocab = Vocabulary(1000, eos_token_id=0)
    m = SimModel(SimConfig(latency=LAT), vocab)
    m.add_request(req("a", [1, 2], max_tokens=10, seed=1), now=0.0)
    full = [o.token_id for o in run(m)]
    m.add_request(req("b", [1, 2], max_tokens=10, seed=1, stop_token_ids=(full[3],)), now=5.0)
    outs = run(m)
    assert [o.token_id for o in outs] == full[:4] and outs[-1].finish_reason == "stop"

    eos = SimModel(SimConfig(latency=LAT, eos_probability=1.0), vocab)
    eos.add_request(req("e", [1, 2], max_tokens=10), now=0.0)
    eos.add_request(req("i", [1, 2], max_tokens=10, ignore_eos=True), now=0.0)
    outs = run(eos)
    assert [(o.token_id, o.finish_reason) for o in of(outs, "e")] == [(0, "stop")]
    assert len(of(outs, "i")) == 10 and 0 not in [o.token_id for o in of(outs, "i")]


def test_rejects_requests_that_can_never_run():
    m = model(block_size=4, num_blocks=4, max_model_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        m.add_request(req("long", [1] * 90, max_tokens=20), now=0.0)
    with pytest.raises(ValueError, match="KV blocks"):
        m.add_request(req("big", [1] * 14, max_tokens=4), now=0.0)
    m.add_request(req("ok", [1] * 14, max_tokens=2), now=0.0)
    with pytest.raises(ValueError, match="already"):
        m.add_request(req("ok", [1], max_tokens=1), now=0.0)


def test_info_reports_the_config():
    info = SimModel(SimConfig(model="m", block_size=32, num_blocks=10, max_num_seqs=3, max_model_len=99)).info
    assert dataclasses.astuple(info) == ("m", 99, 32, 10, 3, None, None)
