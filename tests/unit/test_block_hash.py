"""Our block hashes must be byte-identical to vLLM's (sha256_cbor), checked against vLLM's own code."""

from __future__ import annotations

import random

import pytest

from scheduler.block_hash import DEFAULT_SEED, BlockHasher, external_block_hash, resolve_seed, sha256_cbor

kv = pytest.importorskip("vllm.v1.core.kv_cache_utils", reason="vLLM is not installed")
from vllm.utils.hashing import sha256_cbor as vllm_sha256_cbor  # noqa: E402


@pytest.fixture
def vllm_none_hash(monkeypatch: pytest.MonkeyPatch):
    """vLLM's NONE_HASH as its engine core would initialize it (PYTHONHASHSEED unset)."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    kv.init_none_hash(vllm_sha256_cbor)
    yield kv.NONE_HASH
    kv.init_none_hash(vllm_sha256_cbor)


def vllm_chain(block_size: int, tokens: list[int]) -> list[bytes]:
    hashes, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = kv.hash_block_tokens(vllm_sha256_cbor, parent, tokens[start:start + block_size])
        hashes.append(parent)
    return hashes


def test_default_seed_and_root_match_vllm(vllm_none_hash):
    assert DEFAULT_SEED == kv.DEFAULT_NONE_HASH_SEED
    assert BlockHasher(16).root == vllm_none_hash
    assert sha256_cbor([1, (2, 3), None]) == vllm_sha256_cbor([1, (2, 3), None])


@pytest.mark.parametrize("block_size", [1, 16, 32, 64])
def test_chained_hashes_match_vllm(vllm_none_hash, block_size):
    rng = random.Random(block_size)
    tokens = [rng.randrange(0, 152_000) for _ in range(5 * block_size + block_size // 2)]
    ours = BlockHasher(block_size).hash_blocks(tokens)
    assert len(ours) == 5  # the partial trailing block has no hash
    assert ours == vllm_chain(block_size, tokens)


def test_matches_vllm_request_block_hasher_with_output_tokens(vllm_none_hash):
    """The path vLLM really uses: a Request's block hashes, growing with generated tokens."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    prompt, generated = list(range(1000, 1050)), [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    request = Request("r", prompt, SamplingParams(max_tokens=20), None,
                      block_hasher=kv.get_request_block_hasher(16, vllm_sha256_cbor))
    hasher = BlockHasher(16)
    assert request.block_hashes == hasher.hash_blocks(prompt)
    request.append_output_token_ids(generated)
    assert len(request.block_hashes) == 4
    assert request.block_hashes == hasher.hash_blocks(prompt + generated)


def test_chain_is_a_prefix_property_and_resumable():
    hasher = BlockHasher(4)
    tokens = list(range(20))
    full = hasher.hash_blocks(tokens)
    assert hasher.hash_blocks(tokens[:9]) == full[:2]
    assert hasher.hash_blocks(tokens[8:], parent=full[1]) == full[2:]
    # A change in block 0 changes every later hash: a hash covers the whole prefix.
    changed = hasher.hash_blocks([99] + tokens[1:])
    assert all(a != b for a, b in zip(changed, full))
    assert hasher.hash_blocks(tokens[:3]) == []


def test_seed_resolution_follows_vllm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    kv.init_none_hash(vllm_sha256_cbor)
    try:
        seed = resolve_seed("1234")
        assert seed == kv.get_none_hash_seed() == "1234"
        hasher = BlockHasher(16, seed)
        assert hasher.root == kv.NONE_HASH
        tokens = list(range(40))
        assert hasher.hash_blocks(tokens) == vllm_chain(16, tokens)
        assert hasher.hash_blocks(tokens) != BlockHasher(16).hash_blocks(tokens)
    finally:
        monkeypatch.delenv("PYTHONHASHSEED")
        kv.init_none_hash(vllm_sha256_cbor)
    assert resolve_seed(None) == kv.get_none_hash_seed() == DEFAULT_SEED


def test_external_hash_matches_vllm_kv_events(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1")  # vLLM's default
    h = BlockHasher(16).hash_blocks(list(range(16)))[0]
    assert external_block_hash(h) == kv.maybe_convert_block_hash(h) == int.from_bytes(h[-8:], "big")


def test_rejects_bad_block_sizes():
    with pytest.raises(ValueError):
        BlockHasher(0)
    with pytest.raises(ValueError):
        BlockHasher(4).hash_block(None, [1, 2, 3])
