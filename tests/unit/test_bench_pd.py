"""`bench pd`'s own logic without engines: unique prompts, output comparison, the summary."""

from __future__ import annotations

from services.bench import pd


def test_prompts_are_unique_from_the_first_block_and_random_within() -> None:
    prompts = pd.make_prompts([256, 2000], 3, nonce=7)
    assert {k: len(v) for k, v in prompts.items()} == {(n, t): n for n in (256, 2000) for t in range(3)}
    first_blocks = {tuple(p[:32]) for p in prompts.values()}
    assert len(first_blocks) == len(prompts)  # no request can hit another's cached prefix
    assert all(len(set(p)) > len(p) // 2 for p in prompts.values())
    assert pd.make_prompts([256], 1, nonce=8)[(256, 0)] != prompts[(256, 0)]


def test_first_divergence() -> None:
    assert pd.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert pd.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert pd.first_divergence([1, 2], [1, 2, 3]) == 2


def test_summary_ratios_and_equality() -> None:
    agg = {(256, 0): {"ttft_s": 0.2, "itl_s": 0.04, "e2e_s": 1.0, "token_ids": [1, 2]}}
    run = {"prefill_s": 0.2, "ttft_s": 0.3, "itl_s": 0.05, "e2e_s": 1.2, "token_ids": [1, 2], "transfers": 1,
           "transfer_bytes": 6_000_000, "transfer_s": 0.002, "transfer_gbps": 3.0, "failed_transfers": 0,
           "decode_computed_prompt_tokens": 0, "prefill_blocks_freed": True}
    (row,) = pd.summarize([256], 1, agg, {(256, 0): run})
    assert row["e2e_ratio"] == 1.2 / 1.0 and row["ttft_ratio"] == 0.3 / 0.2
    assert row["outputs_equal"] == 1 and row["transfer_bytes"] == 6_000_000
