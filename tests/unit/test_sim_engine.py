"""SimEngine: the Engine contract in real time (abort, close, stop strings, text) on small latencies."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from services.engines.base import EngineOutput, EngineRequest, SamplingOptions
from services.engines.sim_engine import SimEngine, _TextStream, add_sim_arguments, build_sim_engine
from services.engines.sim_model import SimLatency
from services.model_fetch import default_model_dir

FAST = SimLatency(prefill_per_token_s=1e-5, step_overhead_s=0.001, itl_s=0.002, batch_slowdown=0.1)
MODEL_DIR = default_model_dir()
needs_tokenizer = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").is_file(),
    reason=f"no tokenizer at {MODEL_DIR}: run `llm-mesh model fetch` first")


@contextlib.asynccontextmanager
async def engine(**kw) -> AsyncIterator[SimEngine]:
    kw.setdefault("latency", FAST)
    e = SimEngine("sim-test", **kw)
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


def req(rid: str, prompt: list[int], max_tokens: int = 8, **sampling) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens, **sampling))


async def collect(e: SimEngine, r: EngineRequest) -> list[EngineOutput]:
    return [o async for o in e.generate(r)]


def joined(outs: list[EngineOutput]) -> tuple[list[int], str]:
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


async def test_generate_streams_to_a_final_output():
    async with engine(block_size=4) as e:
        t0 = time.monotonic()
        outs = await collect(e, req("a", list(range(10)), max_tokens=20))
        elapsed = time.monotonic() - t0
        tokens, text = joined(outs)
        assert len(tokens) == 20 and [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
        assert outs[-1].finish_reason == "length"
        assert (outs[-1].prompt_tokens, outs[-1].completion_tokens) == (10, 20)
        assert text == "".join(f"<{t}>" for t in tokens)  # no tokenizer: ids rendered
        # Loose: tokens are paced by the model (prefill + 19 decode steps of 2 ms).
        assert elapsed >= 0.9 * (0.001 + 10e-5 + 19 * 0.002)
        assert e.load().running == 0 and e.load().generated_tokens == 20


async def test_repeated_prompt_reports_cached_tokens():
    async with engine(block_size=16) as e:
        prompt = list(range(500, 550))
        first = await collect(e, req("a", prompt, max_tokens=2))
        second = await collect(e, req("b", prompt, max_tokens=2))
        assert first[-1].cached_prompt_tokens == 0 and second[-1].cached_prompt_tokens == 48
        assert e.sim is not None and e.sim.stats.cached_prompt_tokens == 48


async def test_seed_makes_tokens_reproducible():
    async with engine() as e:
        a, b, c = await asyncio.gather(*(collect(e, req(rid, [1, 2, 3], max_tokens=12, seed=seed))
                                         for rid, seed in (("a", 5), ("b", 5), ("c", 6))))
        assert joined(a) == joined(b) and joined(a)[0] != joined(c)[0]


async def test_closing_the_generator_aborts_the_request():
    async with engine(block_size=4, num_blocks=512) as e:
        gen = e.generate(req("long", list(range(30)), max_tokens=1000))
        got = [await anext(gen), await anext(gen)]
        assert e.load().running == 1 and e.load().kv_cache_usage > 0
        await gen.aclose()
        load = e.load()
        assert (load.running, load.waiting, load.kv_cache_usage) == (0, 0, 0.0)
        made = load.generated_tokens
        await asyncio.sleep(0.03)  # 15 steps' worth: nothing more is generated
        assert e.load().generated_tokens == made < 1000
        assert all(o.finish_reason is None for o in got)
        assert await e.abort("long") is False


async def test_cancelling_the_consumer_aborts_the_request():
    async with engine() as e:
        seen = asyncio.Event()

        async def consume() -> None:
            async for _ in e.generate(req("c", [1, 2, 3], max_tokens=1000)):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert e.load().running == 0
        made = e.load().generated_tokens
        await asyncio.sleep(0.02)
        assert e.load().generated_tokens == made


async def test_abort_ends_the_stream_with_abort():
    async with engine() as e:
        gen = e.generate(req("x", [1, 2, 3], max_tokens=1000))
        first = await anext(gen)
        assert await e.abort("x") is True
        rest = [o async for o in gen]
        assert rest[-1].finish_reason == "abort" and rest[-1].token_ids == []
        assert first.finish_reason is None and len(joined([first] + rest)[0]) < 1000
        assert e.load().running == 0 and e.load().kv_cache_usage == 0.0
        assert await e.abort("x") is False


async def test_max_num_seqs_queues_requests():
    async with engine(max_num_seqs=1) as e:
        gens = [e.generate(req(f"r{i}", [i, i, i], max_tokens=5)) for i in range(3)]
        first = await anext(gens[0])
        # r0 runs; start r1 and r2 too: they wait for the single slot.
        tasks = [asyncio.create_task(collect_rest(g)) for g in gens[1:]]
        await asyncio.sleep(0)
        assert (e.load().running, e.load().waiting) == (1, 2)
        rest0 = await collect_rest(gens[0])
        outs = await asyncio.gather(*tasks)
        assert len(joined([first] + rest0)[0]) == 5 and all(len(joined(o)[0]) == 5 for o in outs)
        # One slot: each request got its own prefill step, one after the other.
        assert e.sim is not None and e.sim.stats.prefill_steps == 3


async def collect_rest(gen: AsyncIterator[EngineOutput]) -> list[EngineOutput]:
    return [o async for o in gen]


async def test_stop_string_is_cut_and_frees_the_request():
    async with engine(block_size=4) as e:
        tokens, _ = joined(await collect(e, req("a", [9, 9, 9], max_tokens=10, seed=3)))
        # A stop string spanning tokens 2 and 3: "<t1><t2><t3>" contains "t2><t3".
        stop = f"{tokens[1]}><{tokens[2]}"
        outs = await collect(e, req("b", [9, 9, 9], max_tokens=10, seed=3, stop=(stop, "never")))
        got, text = joined(outs)
        assert outs[-1].finish_reason == "stop" and got == tokens[:3]
        assert text == f"<{tokens[0]}><"
        assert all(stop[:3] not in o.text for o in outs)  # never partly streamed
        assert e.load().running == 0 and e.load().kv_cache_usage == 0.0


async def test_stop_token_id_keeps_the_token_but_not_its_text():
    async with engine() as e:
        tokens, _ = joined(await collect(e, req("a", [4, 4], max_tokens=10, seed=1)))
        outs = await collect(e, req("b", [4, 4], max_tokens=10, seed=1, stop_token_ids=(tokens[2],)))
        assert joined(outs) == (tokens[:3], f"<{tokens[0]}><{tokens[1]}>")
        assert outs[-1].finish_reason == "stop"


async def test_rejects_a_request_that_cannot_fit():
    async with engine(max_model_len=64) as e:
        with pytest.raises(ValueError):
            await collect(e, req("big", [1] * 60, max_tokens=10))
        with pytest.raises(RuntimeError):
            await collect(SimEngine(), req("x", [1]))  # not started


def test_text_stream_holds_back_what_could_start_a_stop_string():
    stream = _TextStream(None, [1], stop=("xyz",))
    stream.add(1)
    assert stream.delta(finished=False) == "<"  # "<1>" minus the 2 held-back characters
    stream.add(2)
    assert stream.delta(finished=False) == "1><"
    assert stream.delta(finished=True) == "2>"
    assert stream.text == "<1><2>"


@needs_tokenizer
def test_text_stream_with_the_real_tokenizer_handles_split_utf8():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = "héllo 世界 🦙!"
    ids = tok.encode(text).ids
    stream = _TextStream(tok, tok.encode("Say:").ids, stop=())
    deltas = []
    for i in ids:
        stream.add(i)
        deltas.append(stream.delta(finished=False))
    assert "".join(deltas) == text
    assert "" in deltas  # bytes of 世/界/🦙 arrive in pieces: no text until the character completes
    assert all("\ufffd" not in d for d in deltas)


@needs_tokenizer
async def test_real_tokenizer_text_and_stop_strings():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    async with engine(model_dir=MODEL_DIR) as e:
        prompt = tok.encode("The capital of France is").ids
        outs = await collect(e, req("a", prompt, max_tokens=40, seed=11))
        tokens, text = joined(outs)
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        assert not special & set(tokens)
        assert text == tok.decode(tokens, skip_special_tokens=True) and len(text) > 40
        stop = text[20:24]
        cut = await collect(e, req("b", prompt, max_tokens=40, seed=11, stop=(stop,)))
        assert cut[-1].finish_reason == "stop"
        assert joined(cut)[1] == text[:text.index(stop)]
        assert len(joined(cut)[0]) < 40


def test_worker_flags_build_an_engine():
    parser = argparse.ArgumentParser()
    # The worker's own flags that the sim engine reads.
    parser.add_argument("--model", default="m")
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=4096)
    add_sim_arguments(parser)
    args = parser.parse_args(["--sim-itl", "0.005", "--sim-prefill-per-token", "0.00002", "--sim-num-blocks", "100",
                              "--max-num-seqs", "3"])
    e = build_sim_engine(args)
    c = e.config
    assert (c.model, c.block_size, c.num_blocks, c.max_num_seqs, c.max_model_len) == ("m", 32, 100, 3, 4096)
    assert (c.latency.itl_s, c.latency.prefill_per_token_s) == (0.005, 0.00002)
    assert c.latency.batch_slowdown == SimLatency().batch_slowdown and c.hash_seed == "vllm-none-hash"


async def test_greedy_output_depends_on_the_context_alone():
    """A request resumed elsewhere with prompt + the tokens already sent (migration) continues
    exactly as the uninterrupted run, like a real model's greedy decoding."""
    prompt = list(range(300, 337))
    async with engine(block_size=4) as e:
        whole, _ = joined(await collect(e, req("whole", prompt, 20, temperature=0.0)))
    async with engine(block_size=4) as other:  # another engine: nothing cached
        for cut in (1, 7, 12):
            rest, _ = joined(await collect(other, req(f"resumed-{cut}", prompt + whole[:cut], 20 - cut,
                                                        temperature=0.0)))
            assert rest == whole[cut:], cut
        sampled, _ = joined(await collect(other, req("sampled", prompt, 20, temperature=1.0, seed=3)))
    assert sampled != whole
