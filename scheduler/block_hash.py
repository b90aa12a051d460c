"""KV-block hashes computed exactly as vLLM v1 computes them (`sha256_cbor`).

The scheduler hashes a prompt's token ids into the same block hashes the
engines use for prefix caching and announce in their KV events, so "which
worker already holds this prefix" is a dictionary lookup, not a guess.

vLLM 0.32 (vllm/v1/core/kv_cache_utils.py, vllm/utils/hashing.py):

    NONE_HASH  = sha256(cbor(seed))                       # the root
    hash(b_i)  = sha256(cbor([hash(b_{i-1}) or NONE_HASH, [tokens of b_i], None]))

where `cbor` is `cbor2.dumps(obj, canonical=True)` (a tuple encodes as a CBOR
array) and the trailing `None` is the block's extra keys (LoRA name,
multimodal hashes, cache_salt), which llm-mesh never uses.

Invariants:
- Only full blocks of `block_size` tokens are hashed; a trailing partial block
  has no hash (vLLM never caches it).
- Chained: a block's hash covers the whole prefix up to and including the
  block, so equal hashes mean equal prefixes, and the hashes of a prompt are a
  prefix of the hashes of any longer prompt that starts with it.
- Process- and language-independent given the seed: canonical CBOR + SHA-256,
  no Python `hash()`, no pickle.

Configuring vLLM to match (the worker's vllm_engine does this):
- `--enable-prefix-caching --prefix-caching-hash-algo sha256_cbor` (the
  default algo `sha256` pickles, which is not reproducible outside Python);
- the same `--block-size` as the `BlockHasher`;
- PYTHONHASHSEED *unset* in the engine's environment: vLLM then derives the
  root from the fixed seed "vllm-none-hash" (`DEFAULT_NONE_HASH_SEED`). If it
  is set, vLLM uses its value (a string, e.g. "0") as the seed, and the
  scheduler must be given the same one (see `resolve_seed`).
- KV events carry these hashes as ints by default
  (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1): the low 64 bits, big-endian; see
  `external_block_hash`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import cbor2

# vllm.v1.core.kv_cache_utils.DEFAULT_NONE_HASH_SEED (vLLM 0.32): the root seed
# for cryptographic hash algorithms when PYTHONHASHSEED is not set.
DEFAULT_SEED = "vllm-none-hash"


def sha256_cbor(obj: Any) -> bytes:
    """vllm.utils.hashing.sha256_cbor: SHA-256 of the canonical CBOR encoding."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def resolve_seed(pythonhashseed: str | None) -> str:
    """The root seed vLLM resolves for `sha256_cbor`, given the engine's PYTHONHASHSEED.

    Pass `os.environ.get("PYTHONHASHSEED")` of the *engine's* environment.
    PYTHONHASHSEED wins when set (any string, used verbatim); otherwise the fixed
    default. (For xxhash vLLM would pick a random per-process seed instead:
    never use xxhash with llm-mesh.)
    """
    return pythonhashseed if pythonhashseed is not None else DEFAULT_SEED


def external_block_hash(block_hash: bytes) -> int:
    """The int form of a hash in vLLM KV events (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, the default)."""
    return int.from_bytes(block_hash, "big") & ((1 << 64) - 1)


class BlockHasher:
    """Chained block hashes for one block size and seed.

    `root` is vLLM's NONE_HASH: the parent of the first block. Immutable: share one per (block
    size, seed) with `hasher_for`.
    """

    def __init__(self, block_size: int, seed: str = DEFAULT_SEED) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.seed = seed
        self.root: bytes = sha256_cbor(seed)

    def hash_block(self, parent: bytes | None, block_token_ids: Sequence[int]) -> bytes:
        """The hash of one full block whose prefix ends in `parent` (None: the first block)."""
        if len(block_token_ids) != self.block_size:
            raise ValueError(f"a block has {self.block_size} tokens, got {len(block_token_ids)}")
        return self.hash_blocks(block_token_ids, parent)[0]

    def hash_blocks(self, token_ids: Sequence[int], parent: bytes | None = None) -> list[bytes]:
        """Hashes of every full block of `token_ids`, chained from `parent`.

        `parent` is the hash of the block just before `token_ids[0]` (None when
        `token_ids` starts the sequence), so hashing a sequence in pieces of
        whole blocks gives the same result as hashing it at once.
        """
        bs, root = self.block_size, self.root
        hashes: list[bytes] = []
        for start in range(0, len(token_ids) - bs + 1, bs):
            # vLLM: `if not parent_block_hash: parent_block_hash = NONE_HASH`. (A list slice encodes
            # as the same CBOR array as vLLM's tuple: no copy.)
            parent = sha256_cbor((parent or root, token_ids[start:start + bs], None))
            hashes.append(parent)
        return hashes


@functools.lru_cache(maxsize=64)
def hasher_for(block_size: int, seed: str = DEFAULT_SEED) -> BlockHasher:
    """The shared BlockHasher of a block size and seed (its root is itself a hash to compute)."""
    return BlockHasher(block_size, seed)
