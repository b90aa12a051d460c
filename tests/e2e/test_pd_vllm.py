"""End to end: prefill/decode over vLLM's NixlConnector with two real engines on the real model.

A prefill engine (kv_producer, core 0) and a decode engine (kv_consumer, core 1), each a
`VllmEngine` in its own process (tests/e2e/pd_engine_proc.py) with its own NIXL side channel
port; first, an aggregated engine (role both) gives the reference outputs. Asserted: greedy
P/D output equals the aggregated output; the decode engine computes no prompt tokens for a
remotely prefilled request (vLLM's prompt-token sources: all from the KV transfer or its own
prefix cache); shared-prefix requests (the decode engine already holds the prefix) complete
without a stall, and the prefiller is told every pull is done (its blocks are freed at once,
not after the lease expires).
"""

from __future__ import annotations

import time

import pytest

from services.procs import free_port
from tests.e2e.pd_engine_proc import PDEngineProc

pytestmark = pytest.mark.vllm

MAX_TOKENS = 12
STALL_S = 10.0  # a decode leg on this machine takes well under 1 s; the stall took 31 s


@pytest.fixture(scope="module")
def prompts(model_dir) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = ("river mountain lantern orbit copper violet harbor meadow signal quartz ember canyon "
             "thistle beacon glacier falcon prism tundra willow cobalt").split()
    text = " ".join(f"{words[i % 20]} {words[(i * 7) % 20]} {words[(i * 3) % 20]}." for i in range(1500))
    ids = tok(text)["input_ids"]

    def suffix(k: int, n: int) -> list[int]:
        text = f" Question {k}: " + " ".join(words[(k * 5 + j * 3) % 20] for j in range(n))
        return tok(text)["input_ids"][:n]

    shared = ids[:640]  # 20 full blocks of 32
    return {
        "short": ids[1000:1300],
        "long": ids[:1000],
        # Sharing a 640-token prefix, each with its own tail; none a block multiple.
        "shared0": shared + suffix(0, 75),
        "shared1": shared + suffix(1, 110),
        "shared2": shared + suffix(2, 47),
    }


def _settings(model_dir, role: str, core: str, port: int) -> dict:
    return dict(model_dir=str(model_dir), model_name="SmolLM2-135M-Instruct", max_model_len=2048,
                max_num_seqs=4, kv_cache_gib=1, cpu_cores=core, kv_events=False, role=role,
                kv_side_channel_port=port)


@pytest.fixture(scope="module")
def aggregated(model_dir, prompts, tmp_path_factory) -> dict[str, list[int]]:
    log = tmp_path_factory.mktemp("pd") / "agg.log"
    engine = PDEngineProc(_settings(model_dir, "both", "0", free_port()), log)
    try:
        engine.wait_ready()
        return {name: engine.call(op="generate", request_id=f"agg-{name}", prompt=p,
                                  max_tokens=MAX_TOKENS)["token_ids"]
                for name, p in prompts.items()}
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def pd_pair(model_dir, aggregated, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pd")
    prefill = PDEngineProc(_settings(model_dir, "prefill", "0", free_port()), logs / "prefill.log")
    decode = PDEngineProc(_settings(model_dir, "decode", "1", free_port()), logs / "decode.log")
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


def run_pd(prefill: PDEngineProc, decode: PDEngineProc, name: str, prompt: list[int]) -> tuple[dict, dict]:
    a = prefill.call(op="generate", request_id=f"p-{name}", prompt=prompt, max_tokens=1, remote_decode=True)
    assert a["kv_transfer"] is not None, a
    assert a["kv_transfer"]["num_tokens"] == len(prompt)
    assert len(a["kv_transfer"]["block_ids"]) == -(-len(prompt) // prefill.info["block_size"])
    b = decode.call(op="generate", request_id=f"d-{name}", prompt=prompt, max_tokens=MAX_TOKENS,
                    remote_prefill=a["kv_transfer"])
    return a, b


def wait_blocks_freed(prefill: PDEngineProc, timeout: float = 5.0) -> float:
    """The prefiller frees a request's blocks when the decoder's pull notification arrives."""
    start = time.monotonic()
    while prefill.call(op="load")["kv_cache_usage"] > 0:
        assert time.monotonic() - start < timeout, "the prefiller still holds blocks: no pull notification"
        time.sleep(0.05)
    return time.monotonic() - start


def test_pd_output_equals_aggregated_and_decode_computes_no_prompt(pd_pair, prompts, aggregated):
    prefill, decode = pd_pair
    for name in ("short", "long"):
        before = decode.call(op="stats")
        _, b = run_pd(prefill, decode, name, prompts[name])
        after = decode.call(op="stats")
        assert b["token_ids"] == aggregated[name], name
        # Every prompt token came from the transfer (vLLM recomputes only the last one to sample).
        assert b["cached_prompt_tokens"] == b["prompt_tokens"] == len(prompts[name])
        assert after["computed_prompt_tokens"] == before["computed_prompt_tokens"], name
        assert after["kv_transfer_prompt_tokens"] - before["kv_transfer_prompt_tokens"] == len(prompts[name])
        assert after["transfers"] > before["transfers"] and after["transfer_bytes"] > before["transfer_bytes"]
        wait_blocks_freed(prefill)


def test_shared_prefix_requests_do_not_stall(pd_pair, prompts, aggregated):
    prefill, decode = pd_pair
    for name in ("shared0", "shared1", "shared2"):
        before = decode.call(op="stats")
        _, b = run_pd(prefill, decode, name, prompts[name])
        after = decode.call(op="stats")
        assert b["e2e_s"] < STALL_S, f"{name}: decode leg took {b['e2e_s']:.1f}s"
        assert b["token_ids"] == aggregated[name], name
        assert b["cached_prompt_tokens"] == len(prompts[name])
        assert after["computed_prompt_tokens"] == before["computed_prompt_tokens"], name
        if name != "shared0":
            # The decode engine held the shared prefix itself and pulled only the rest.
            assert after["local_cache_prompt_tokens"] - before["local_cache_prompt_tokens"] >= 640, name
        wait_blocks_freed(prefill)
    assert prefill.call(op="stats")["expired_kv_leases"] == 0
