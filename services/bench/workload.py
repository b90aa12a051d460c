"""Workloads for the routing benchmark: the Mooncake conversation trace, a
synthetic shared-prefix multi-tenant generator and a long/short prompt mix, in one shape.

A request is described by `chunk_ids`: one id per `chunk_tokens`-token piece of
its prompt (the trace's `hash_ids`, 512 tokens each). Equal ids at equal
positions mean equal content, so equal id prefixes are shareable KV cache. The
token ids of a chunk are a pure function of its id, so prompts — and therefore
their vLLM block hashes — are reproducible without storing 144 M tokens.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random

import numpy as np

CHUNK_TOKENS = 512
# Ordinary text ids of SmolLM2's vocabulary (0..~100 are special/byte tokens).
_TOKEN_LO, _TOKEN_HI = 200, 49_000


@dataclasses.dataclass(frozen=True)
class WorkloadRequest:
    arrival_s: float
    chunk_ids: tuple[int, ...]
    input_tokens: int
    output_tokens: int
    session_id: str = ""


def chunk_tokens(chunk_id: int, n: int = CHUNK_TOKENS) -> list[int]:
    """The first `n` token ids of a chunk (deterministic in the id)."""
    return np.random.default_rng(chunk_id).integers(_TOKEN_LO, _TOKEN_HI, n).tolist()


def prompt_tokens(request: WorkloadRequest, chunk: int = CHUNK_TOKENS) -> list[int]:
    tokens: list[int] = []
    for chunk_id in request.chunk_ids:
        tokens.extend(chunk_tokens(chunk_id, chunk))
        if len(tokens) >= request.input_tokens:
            break
    if len(tokens) < request.input_tokens:  # the trace's last chunk may be missing: pad uniquely
        pad = np.random.default_rng([*request.chunk_ids, request.input_tokens])
        tokens.extend(pad.integers(_TOKEN_LO, _TOKEN_HI, request.input_tokens - len(tokens)).tolist())
    return tokens[: request.input_tokens]


def load_trace(path: pathlib.Path, limit: int | None = None, time_scale: float = 1.0,
               max_input_tokens: int | None = None) -> list[WorkloadRequest]:
    """The Mooncake trace; `time_scale` > 1 compresses time (more load).

    Requests longer than `max_input_tokens` (the engines' context) are dropped,
    as a real deployment would reject them.
    """
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if max_input_tokens and row["input_length"] + row["output_length"] > max_input_tokens:
                continue
            out.append(WorkloadRequest(
                arrival_s=row["timestamp"] / 1000.0 / time_scale,
                chunk_ids=tuple(row["hash_ids"]),
                input_tokens=row["input_length"],
                output_tokens=max(1, row["output_length"]),
                # Conversations share their first chunk id: use it as the session key.
                session_id=f"s{row['hash_ids'][0]}" if row["hash_ids"] else "",
            ))
            if limit and len(out) >= limit:
                break
    return out


def shared_prefix(tenants: int = 150, prefix_tokens: int = 6144, suffix_tokens: int = 512,
                  output_tokens: int = 128, rate_per_s: float = 20.0, requests: int = 3000,
                  seed: int = 0) -> list[WorkloadRequest]:
    """llm-d's multi-tenant shape: each tenant has a long system prefix, every
    request adds a unique suffix; Poisson arrivals; tenants drawn uniformly."""
    rng = random.Random(seed)
    prefix_chunks = -(-prefix_tokens // CHUNK_TOKENS)
    suffix_chunks = -(-suffix_tokens // CHUNK_TOKENS)
    next_unique = tenants * prefix_chunks
    t = 0.0
    out = []
    for _ in range(requests):
        t += rng.expovariate(rate_per_s)
        tenant = rng.randrange(tenants)
        ids = tuple(range(tenant * prefix_chunks, (tenant + 1) * prefix_chunks))
        ids += tuple(range(next_unique, next_unique + suffix_chunks))
        next_unique += suffix_chunks
        out.append(WorkloadRequest(t, ids, prefix_tokens + suffix_tokens, output_tokens, f"tenant-{tenant}"))
    return out


def long_short_mix(long_fraction: float = 0.1, long_tokens: int = 8192, short_tokens: int = 128,
                   output_tokens: int = 128, rate_per_s: float = 20.0, requests: int = 3000,
                   seed: int = 0) -> list[WorkloadRequest]:
    """Short chat turns with document-sized prompts mixed in (the P/D case): each request is
    long with probability `long_fraction`; every prompt is unique (no shared prefix, so the
    prefill work is all real); Poisson arrivals."""
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    rng = random.Random(seed)
    next_chunk = 0
    t = 0.0
    out = []
    for _ in range(requests):
        t += rng.expovariate(rate_per_s)
        n = long_tokens if rng.random() < long_fraction else short_tokens
        chunks = -(-n // CHUNK_TOKENS)
        out.append(WorkloadRequest(t, tuple(range(next_chunk, next_chunk + chunks)), n, output_tokens))
        next_chunk += chunks
    return out
