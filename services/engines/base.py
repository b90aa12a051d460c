"""The one interface every inference engine implements.

The worker service only talks to an `Engine`; vLLM and the simulator are
interchangeable behind it, so everything above a worker (scheduler, gateway,
benchmarks) cannot tell them apart.

Contract of `Engine.generate`:
- yields `EngineOutput` deltas; the last one has `finish_reason` set, and
  nothing is yielded after it;
- if the consumer stops iterating (the async generator is closed or its task
  cancelled), the engine aborts the request and frees its KV blocks;
- `abort(request_id)` ends a running request: its stream yields a last output
  with finish_reason "abort" (or simply ends if it was already being closed).

KV events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`, after vLLM's
vllm/distributed/kv_events.py): an engine that caches prefixes reports every
change to its cache, in the order it happened, to the sink the worker sets
with `set_kv_event_sink` before `start`. The worker numbers them and serves
them to the schedulers (services/kv_events.py). Engines call the sink on the
worker's event loop thread. An engine that reports nothing needs no code: the
default keeps the sink and never calls it.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Sampling for one request; `max_tokens` is always resolved by the scheduler."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class KVTransferParams:
    """Where a remotely prefilled prompt's KV waits to be pulled: vLLM NixlConnector's
    `kv_transfer_params` as a typed value (llm_mesh.v1.KVTransferParams on the wire).

    The prefill engine fills it on its last output; the decode engine pulls `block_ids`
    from `engine_id` (reached at host:port, the prefill worker's NIXL side channel) and
    computes none of the prompt. The prefill engine holds the blocks until the pull is
    done (or until its own expiry): only ids travel per request, never the bytes.
    """

    engine_id: str
    block_ids: tuple[int, ...]
    host: str = ""
    port: int = 0
    request_id: str = ""  # the prefill engine's request that holds the blocks
    tp_size: int = 1
    num_tokens: int = 0  # prompt tokens the blocks hold


@dataclasses.dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    # Prefill leg of P/D: compute the prompt's KV and hold it for a decode worker to pull
    # (the scheduler sends max_tokens 1); the last output carries `kv_transfer`.
    remote_decode: bool = False
    # Decode leg of P/D: pull the prompt's KV from here instead of computing it.
    remote_prefill: KVTransferParams | None = None


@dataclasses.dataclass
class EngineOutput:
    """A delta of one request's generation."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    # Filled on the last output (and may be on earlier ones).
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    # Decode leg of P/D (request.remote_prefill): prompt tokens whose KV was pulled, not computed.
    transferred_prompt_tokens: int = 0
    # Prefill leg of P/D (request.remote_decode), last output: where the KV waits.
    kv_transfer: KVTransferParams | None = None


@dataclasses.dataclass(frozen=True)
class KVEndpoint:
    """Where decode engines pull this engine's prefilled KV (its NIXL side channel). Published
    once in the worker's membership record; a prefill leg's KVTransferParams then carry only
    the engine id and block ids, and the scheduler completes them from this."""

    engine_id: str
    host: str = ""
    port: int = 0
    tp_size: int = 1


@dataclasses.dataclass(frozen=True)
class NixlMetadata:
    """An engine's NIXL agent metadata as its side channel serves it to a decoder's handshake
    (vLLM's NixlHandshakePayload, msgpack), with the facts a reader checks before using it."""

    engine_id: str
    connector_version: int
    compatibility_hash: str
    handshake_payload: bytes = dataclasses.field(repr=False)  # ~2.5 KB here
    agent_metadata_bytes: int = 0
    num_blocks: int = 0


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    """Static facts about an engine, published in the worker's membership record."""

    model: str
    max_model_len: int
    block_size: int
    kv_blocks_total: int
    max_num_seqs: int
    # P/D roles: where the engine's KV is pulled from, and its NIXL agent metadata.
    kv_endpoint: KVEndpoint | None = None
    nixl_metadata: NixlMetadata | None = None


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """The engine's load right now."""

    running: int
    waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, [0, 1]
    # Lifetime count of tokens the engine itself generated (not what was
    # delivered): proves an aborted request really stopped in the engine.
    generated_tokens: int = 0
    # Lifetime prompt tokens from the engine's prefix cache and pulled over NIXL, when the
    # engine counts them itself (vLLM: its prompt-token sources); None: the worker sums
    # them from the outputs (EngineOutput.cached_prompt_tokens / transferred_prompt_tokens).
    cached_prompt_tokens: int | None = None
    kv_transferred_prompt_tokens: int | None = None


# Where blocks are, in vLLM's words (BlockStored.medium). None: the engine's own
# cache. The worker maps media to tiers (services/kv_events.tier_of_medium).
MEDIUM_ENGINE: str | None = None
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"


@dataclasses.dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks of one sequence became cached.

    `block_hashes` are consecutive blocks in order, as 64-bit ints
    (scheduler.block_hash.external_block_hash); `parent_block_hash` is the
    hash of the block before the first (None: the first starts the sequence);
    `token_ids` holds `block_size` tokens per block, concatenated.
    The same hash may be stored again while held (vLLM may hold two blocks
    with one hash): the worker counts references.
    """

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None = MEDIUM_ENGINE
    model: str = ""  # set by holders of several models (a KV store); "" = the worker's model


@dataclasses.dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks were evicted (one event per block holding the hash)."""

    block_hashes: tuple[int, ...]
    medium: str | None = MEDIUM_ENGINE
    model: str = ""  # as BlockStored.model


@dataclasses.dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every cached block is gone (`medium` None: in every tier)."""

    medium: str | None = None


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
# Receives events in order; must not block (it runs on the event loop).
KVEventSink = Callable[[Sequence[KVEvent]], None]


class Engine(abc.ABC):
    """An inference engine serving one model from token ids."""

    kv_event_sink: KVEventSink | None = None

    def set_kv_event_sink(self, sink: KVEventSink | None) -> None:
        """Report KV events to `sink` from now on (call before `start`).

        Default: remember it; an engine that caches nothing never calls it.
        """
        self.kv_event_sink = sink

    def emit_kv_events(self, events: Sequence[KVEvent]) -> None:
        """Hand events to the sink, if any (for engine implementations)."""
        if events and self.kv_event_sink is not None:
            self.kv_event_sink(events)

    @abc.abstractmethod
    async def start(self) -> EngineInfo:
        """Load the model and get ready to serve; returns the engine's facts."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run one request, yielding deltas (see the module docstring)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False if it was not running."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """Current load (cheap: called for every GetLoad)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Abort everything and release the engine's resources."""
