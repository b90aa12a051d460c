"""A simulated inference engine: paged KV cache, prefix cache, continuous batching.

Pure: no I/O, no asyncio, no wall clock. Every mutator takes the current time
`now` (float seconds, non-decreasing); `advance(now)` runs the model up to
`now` and returns the tokens produced, each stamped with the modelled time it
was produced at. `next_event_time()` says when to call `advance` next, so a
real-time driver (sim_engine) sleeps until then and a discrete-event benchmark
jumps there.

The engine runs one *step* at a time, like vLLM without chunked prefill:
- a step either prefills newly admitted requests (and samples their first
  token) or decodes one token for every running request;
- a step's duration is fixed when it starts (`SimLatency`); requests arriving
  during a step join a later one; tokens appear at the step's end;
- prefill has priority: a step prefills whenever the head of the FIFO waiting
  queue can be admitted, i.e. fewer than `max_num_seqs` run and the KV cache
  has the blocks for its tokens (FCFS: a head that doesn't fit blocks the rest).

KV cache (`BlockPool`, after vllm/v1/core/block_pool.py):
- a request holding `n` tokens (prompt + generated) holds ceil(n / block_size)
  blocks; every full block is keyed by its chained hash (scheduler/block_hash),
  prompt and generated blocks alike, exactly as vLLM keys them, so the hit a
  request gets here is the hit vLLM would report;
- a hit is the longest run of cached full blocks from the start, capped like
  vLLM's at (n - 1) // block_size blocks (the last token is always recomputed,
  its logits are needed);
- blocks are ref-counted; a block whose count drops to 0 stays cached and goes
  to the tail of the free queue; a new block is taken from the head (LRU), and
  taking a cached one evicts its hash. A request's blocks are freed tail
  first, so the end of a prompt is evicted before its shared beginning;
- KV events, as vLLM's BlockPool emits them, go to `on_kv_event` in the
  order the cache changed: one `BlockStored` per run of newly keyed
  consecutive blocks of a sequence (hashes as 64-bit ints, parent, tokens),
  one `BlockRemoved` per evicted block, `AllBlocksCleared` on a reset;
- when a decode step lacks a block, the most recently admitted request is
  preempted (blocks freed, back to the front of the waiting queue; it resumes
  by prefilling prompt + generated tokens, mostly cache hits).

So a prefill step stalls every running decode on the engine for its whole
duration (mixed prefill/decode batches are not modelled): the ITL tail that
prefill/decode disaggregation removes.

Remote prefill (P/D, `add_request(..., remote_kv=True)`, after vLLM's
NixlConnector on the decode side): the prompt's KV was computed on a prefill
engine. At admission (same FIFO queue, a sequence slot and the blocks for the
whole prompt) the engine takes its own cached leading blocks, allocates the
rest and pulls their KV (`KVTransfer`: fixed latency + bytes / bandwidth; pulls
into one engine share its link in FIFO order, the latency overlaps). The
request holds its blocks and a slot meanwhile and counts as waiting; when the
pull lands, the pulled blocks are keyed (BlockStored, as vLLM caches received
blocks) and the request joins the next decode step, which recomputes the last
prompt token and samples the first output token. It runs no prefill step: the
engine computes none of its prompt (`SimStats.prefill_computed_tokens`). A
remote request that is preempted later recomputes locally, as in vLLM. (The
prefill engine frees its copy when its one token is out; vLLM holds it until
the pull is done, a few ms: not modelled.)

KV store (`SimModel(..., store=SimStore)`, services/engines/sim_store.py, after vLLM's
offloading connector against `llm-mesh kvstore`): blocks the pool evicts (or, with
`offload="compute"`, every newly keyed block) are written to the shared store. At admission a
local prefill takes its own cached leading blocks, then the run of blocks the store holds
right after them (up to the same cap); it allocates the blocks for the whole prompt and loads
the store's run over its link (`StoreLink`; loads of one engine share its link in FIFO order),
holding its blocks and a slot meanwhile (counted as waiting, like vLLM's
WAITING_FOR_REMOTE_KVS). When the load lands it joins the next prefill step with only the
tokens after the loaded ones to compute; the loaded tokens count as cached
(`cached_prompt_tokens`, as vLLM counts externally computed tokens). Without a store the engine
behaves exactly as before.

Tokens are real ids of the vocabulary, never a special one, and a pure
function of (request key, position): the request key is the prompt alone for
greedy requests (temperature 0), else (seed, prompt) when a seed is given,
else (request id, prompt). So a run is reproducible, and independent of
timing, batching and preemption.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import enum
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence

from scheduler.block_hash import DEFAULT_SEED, BlockHasher, external_block_hash
from services.engines.base import (AllBlocksCleared, BlockRemoved, BlockStored, EngineInfo, EngineLoad,
                                   EngineRequest, FinishReason, KVEvent)
from services.engines.sim_link import KVLink
from services.engines.sim_store import SimStore


@dataclasses.dataclass(frozen=True)
class SimLatency:
    """How long steps take. Defaults: roughly an 8B model on one H100 under vLLM.

    - prefill: `step_overhead_s + prefill_per_token_s * uncached prompt tokens`
      (10k tokens/s; cached tokens are free, like a real prefix-cache hit);
    - decode: `itl_s * (1 + batch_slowdown * (running - 1))` (8 ms per token
      alone; decode is memory-bound, so 32 running requests only make each
      step ~1.5x slower: that is why batching pays).
    """

    prefill_per_token_s: float = 1e-4
    step_overhead_s: float = 0.002  # scheduling, sampling and launch cost of a prefill step
    itl_s: float = 0.008  # decode step at batch 1, its fixed overhead included
    batch_slowdown: float = 0.015  # fraction of itl_s added per extra running request

    def prefill_time(self, uncached_tokens: int) -> float:
        return self.step_overhead_s + self.prefill_per_token_s * uncached_tokens

    def decode_time(self, batch: int) -> float:
        return self.itl_s * (1.0 + self.batch_slowdown * (batch - 1))


@dataclasses.dataclass(frozen=True)
class KVTransfer(KVLink):
    """How long pulling a remote prefill's KV takes. Default: a 400 Gb/s RDMA NIC (50 GB/s), so
    an 8k-token prompt (1 GiB) takes ~22 ms against ~0.8 s to prefill it."""


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Sizes and behaviour of one simulated engine."""

    model: str = "sim"
    block_size: int = 16
    # 8192 x 16 = 131k tokens of KV, about what an 8B model leaves on an H100.
    num_blocks: int = 8192
    max_num_seqs: int = 32
    max_model_len: int = 4096
    # Uncached prompt tokens one prefill step may take (vLLM's max_num_batched_tokens);
    # a single longer prompt still goes alone.
    max_prefill_tokens: int = 8192
    # Chance per generated token of a simulated EOS (finish "stop", unless the
    # request sets ignore_eos). 0: requests run to max_tokens, which is what
    # benchmarks want (output lengths come from the workload).
    eos_probability: float = 0.0
    hash_seed: str = DEFAULT_SEED
    latency: SimLatency = SimLatency()
    kv_transfer: KVTransfer = KVTransfer()  # pulls of remote prefills' KV


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token ids the simulator may produce: [0, size) minus the special ids."""

    size: int
    special_ids: frozenset[int] = frozenset()
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        excluded = set(self.special_ids)
        if self.eos_token_id is not None:
            excluded.add(self.eos_token_id)
        allowed = tuple(i for i in range(self.size) if i not in excluded)
        if not allowed:
            raise ValueError("the vocabulary has no ordinary token")
        object.__setattr__(self, "_allowed", allowed)

    def request_key(self, request: EngineRequest) -> bytes:
        """What a sampled request's draws are a function of: its seed (else its id) and its prompt.
        (blake2b over the raw ids: a sha256 over CBOR of the prompt cost the sim worker ~4% of its
        CPU per request.)"""
        s = request.sampling
        who = "greedy" if s.temperature == 0 else (f"seed:{s.seed}" if s.seed is not None
                                                    else f"id:{request.request_id}")
        return hashlib.blake2b(f"llm-mesh-sim|{who}|".encode() + array.array("I", request.prompt_token_ids).tobytes(),
                               digest_size=32).digest()

    def draw(self, key: bytes, position: int) -> tuple[int, float]:
        """(token id, uniform in [0, 1) for the EOS draw) at output `position`."""
        return self._pick(hashlib.blake2b(key + position.to_bytes(8, "little"), digest_size=16).digest())

    def draw_greedy(self, last_block_hash: bytes | None, tail: Sequence[int]) -> tuple[int, float]:
        """Greedy: a function of the context alone — the hash of its last full KV block and the
        tokens after it — as a real model's argmax is. A request resumed on another engine with
        prompt + the tokens already sent (migration) continues with exactly the same tokens."""
        context = (last_block_hash or b"") + b"|" + array.array("I", tail).tobytes()
        return self._pick(hashlib.blake2b(context, digest_size=16).digest())

    def _pick(self, d: bytes) -> tuple[int, float]:
        allowed: tuple[int, ...] = self._allowed  # type: ignore[attr-defined]
        return (allowed[int.from_bytes(d[:8], "little") % len(allowed)],
                int.from_bytes(d[8:], "little") / 2.0**64)


@dataclasses.dataclass(frozen=True)
class SimOutput:
    """One token of one request, produced at modelled time `time`."""

    request_id: str
    token_id: int
    time: float
    finish_reason: FinishReason | None
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass
class SimStats:
    """Lifetime counters (monotonic)."""

    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # first admission only, like vLLM's num_cached_tokens
    prefill_computed_tokens: int = 0  # tokens run through prefill steps (recomputation included)
    remote_prefills: int = 0  # requests admitted with their KV pulled from a prefill engine
    kv_pulled_tokens: int = 0
    kv_pulled_bytes: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    blocks_stored: int = 0
    blocks_evicted: int = 0
    store_loads: int = 0  # admissions that loaded blocks from the KV store
    store_loaded_tokens: int = 0


class BlockPool:
    """Ref-counted KV blocks with a hash-keyed prefix cache and an LRU free queue.

    Invariants: a block is in `_free` iff its ref count is 0; `_cached[h] == b`
    iff `_hash[b] == h` (one block per hash: a duplicate stays unkeyed); the
    events sent to `on_kv_event` replayed from empty give exactly the keys of
    `_cached` (as external ints).
    """

    def __init__(self, num_blocks: int, stats: SimStats, *, block_size: int = 16,
                 on_kv_event: Callable[[KVEvent], None] | None = None,
                 on_evict: Callable[[list[bytes]], None] | None = None,
                 on_keyed: Callable[[list[bytes]], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.on_kv_event = on_kv_event
        self.on_evict = on_evict  # hashes evicted by one allocate (offload to a KV store)
        self.on_keyed = on_keyed  # hashes newly keyed by one cache_run
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self._stats = stats

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated (unreferenced, cached or not)."""
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def longest_hit(self, hashes: Sequence[bytes]) -> list[int]:
        hit: list[int] = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def num_unreferenced(self, blocks: Iterable[int]) -> int:
        return sum(1 for b in blocks if self._ref[b] == 0)

    def touch(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"need {n} blocks, {len(self._free)} free")
        blocks, evicted = [], []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                self._evict(b)
                evicted.append(h)
            self._ref[b] = 1
            blocks.append(b)
        if evicted and self.on_evict is not None:
            self.on_evict(evicted)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        # Tail first: the blocks of a sequence's end are the least likely to be
        # shared, so they should be the first evicted.
        for b in reversed(blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def cache(self, block: int, block_hash: bytes, parent: bytes | None, token_ids: Sequence[int]) -> None:
        """Key a full block by its hash (no-op if that hash is already cached)."""
        self.cache_run([block], [block_hash], parent, token_ids)

    def cache_run(self, blocks: Sequence[int], hashes: Sequence[bytes], parent: bytes | None,
                  token_ids: Sequence[int]) -> None:
        """Key consecutive full blocks of one sequence; `parent` is the hash
        before the first, `token_ids` their tokens (block_size each).

        Blocks whose hash is already cached stay unkeyed; each run of newly
        keyed blocks is announced as one BlockStored, like vLLM's
        cache_full_blocks.
        """
        run_start, prev = -1, parent
        newly: list[bytes] = []
        for i, (block, block_hash) in enumerate(zip(blocks, hashes)):
            keyed = block_hash not in self._cached and self._hash[block] is None
            if keyed:
                self._cached[block_hash] = block
                self._hash[block] = block_hash
                self._stats.blocks_stored += 1
                newly.append(block_hash)
                if run_start < 0:
                    run_start, run_parent = i, prev
            elif run_start >= 0:
                self._stored(hashes[run_start:i], run_parent, token_ids, run_start)
                run_start = -1
            prev = block_hash
        if run_start >= 0:
            self._stored(hashes[run_start:len(blocks)], run_parent, token_ids, run_start)
        if newly and self.on_keyed is not None:
            self.on_keyed(newly)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash, as vLLM's reset_prefix_cache: only when no
        block is in use (else False and nothing changes)."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        if self.on_kv_event is not None:
            self.on_kv_event(AllBlocksCleared())
        return True

    def _stored(self, hashes: Sequence[bytes], parent: bytes | None, token_ids: Sequence[int], first: int) -> None:
        if self.on_kv_event is None:
            return
        bs = self.block_size
        self.on_kv_event(BlockStored(
            block_hashes=tuple(external_block_hash(h) for h in hashes),
            parent_block_hash=external_block_hash(parent) if parent is not None else None,
            token_ids=tuple(token_ids[first * bs:(first + len(hashes)) * bs]),
            block_size=bs,
        ))

    def _evict(self, block: int) -> None:
        block_hash = self._hash[block]
        assert block_hash is not None
        del self._cached[block_hash]
        self._hash[block] = None
        self._stats.blocks_evicted += 1
        if self.on_kv_event is not None:
            self.on_kv_event(BlockRemoved(block_hashes=(external_block_hash(block_hash),)))


class _State(enum.Enum):
    WAITING = "waiting"
    RECEIVING = "receiving"  # remote KV being pulled; holds its blocks and a slot
    LOADING = "loading"  # KV store blocks being loaded; holds its blocks and a slot
    LOADED = "loaded"  # store blocks landed: waits for a prefill step of the rest
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class _Seq:
    request: EngineRequest
    key: bytes
    tokens: list[int]  # prompt + generated
    block_hashes: list[bytes]  # of every full block of `tokens`
    state: _State = _State.WAITING
    blocks: list[int] = dataclasses.field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already keyed in the pool
    cached_prompt_tokens: int | None = None  # set at first admission
    remote_kv: bool = False  # its prompt's KV is pulled from a prefill engine, not computed
    kv_ready_at: float = 0.0  # RECEIVING / LOADING: when the pull or load lands
    uncached: int = 0  # LOADING / LOADED: prompt tokens left to compute after the load

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.prompt_len


@dataclasses.dataclass(eq=False)
class _Step:
    prefill: bool
    start: float
    end: float
    seqs: list[_Seq]


class SimModel:
    """The simulated engine (see the module docstring)."""

    def __init__(self, config: SimConfig = SimConfig(), vocab: Vocabulary = Vocabulary(49152),
                 on_kv_event: Callable[[KVEvent], None] | None = None, store: SimStore | None = None) -> None:
        if config.num_blocks < 1 or config.max_num_seqs < 1 or config.max_prefill_tokens < 1:
            raise ValueError("num_blocks, max_num_seqs and max_prefill_tokens must be positive")
        self.config = config
        self.vocab = vocab
        self.hasher = BlockHasher(config.block_size, config.hash_seed)
        self.stats = SimStats()
        self.store = store
        self.pool = BlockPool(config.num_blocks, self.stats, block_size=config.block_size, on_kv_event=on_kv_event)
        if store is not None:
            if store.offload == "evict":
                self.pool.on_evict = store.put
            else:
                self.pool.on_keyed = store.put
        self._loading: list[_Seq] = []  # store loads in flight
        self._loaded: list[_Seq] = []  # store loads landed, waiting for their prefill step
        self._store_link_free_at = 0.0
        self._seqs: dict[str, _Seq] = {}
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []  # admission order: the tail is preempted first
        self._receiving: list[_Seq] = []  # remote KV pulls in flight
        self._link_free_at = 0.0  # the KV link is busy with earlier pulls until then
        self._wake_at: float | None = None  # idle with pulls in flight: the next landing
        self._step: _Step | None = None
        self._clock = 0.0  # the model has been run up to here
        self._outbox: list[SimOutput] = []

    # --- public API -------------------------------------------------------

    @property
    def info(self) -> EngineInfo:
        c = self.config
        return EngineInfo(model=c.model, max_model_len=c.max_model_len, block_size=c.block_size,
                          kv_blocks_total=c.num_blocks, max_num_seqs=c.max_num_seqs)

    def load(self) -> EngineLoad:
        return EngineLoad(running=len(self._running), waiting=len(self._waiting) + len(self._receiving)
                          + len(self._loading) + len(self._loaded),
                          kv_cache_usage=self.pool.usage(), generated_tokens=self.stats.generated_tokens)

    def add_request(self, request: EngineRequest, now: float, *, remote_kv: bool = False) -> None:
        """Queue a request arriving at `now`; ValueError if it can never run.

        `remote_kv`: its prompt was prefilled on another engine; this one pulls the KV it
        lacks and only decodes (the module docstring's "Remote prefill")."""
        c = self.config
        if request.request_id in self._seqs:
            raise ValueError(f"request {request.request_id!r} is already running")
        prompt = list(request.prompt_token_ids)
        if not prompt or request.sampling.max_tokens < 1:
            raise ValueError("a request needs a prompt and max_tokens >= 1")
        total = len(prompt) + request.sampling.max_tokens
        if total > c.max_model_len:
            raise ValueError(f"prompt + max_tokens = {total} exceeds max_model_len {c.max_model_len}")
        # Else it could never get its blocks, even alone.
        if math.ceil(total / c.block_size) > c.num_blocks:
            raise ValueError(f"{total} tokens need more than the {c.num_blocks} KV blocks")
        self._run_until(now, inclusive=False)
        seq = _Seq(request, self.vocab.request_key(request), prompt, self.hasher.hash_blocks(prompt),
                   remote_kv=remote_kv)
        self._seqs[request.request_id] = seq
        self._waiting.append(seq)
        self._wake_at = None
        self.stats.prompt_tokens += len(prompt)

    def finish(self, request_id: str, now: float) -> bool:
        """End a request now (abort, or a stop string seen by the caller): its
        blocks are freed at once and it produces nothing more. False if unknown
        or already finished."""
        self._run_until(now, inclusive=False)
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        if seq.state is _State.WAITING:
            self._waiting.remove(seq)
        elif seq.state is _State.RECEIVING:
            self._receiving.remove(seq)
        elif seq.state is _State.LOADING:
            self._loading.remove(seq)
        elif seq.state is _State.LOADED:
            self._loaded.remove(seq)
        else:
            self._running.remove(seq)
        self._release(seq)
        return True

    abort = finish

    def advance(self, now: float) -> list[SimOutput]:
        """Run the model up to `now` (inclusive); the tokens produced since the last call."""
        self._run_until(now, inclusive=True)
        out, self._outbox = self._outbox, []
        return out

    def next_event_time(self) -> float | None:
        """When `advance` has something to do next; None when idle."""
        if self._step is not None:
            return self._step.end
        if self._busy():
            return self._wake_at if self._wake_at is not None else self._clock
        return None

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (AllBlocksCleared); False while any block is in use."""
        return self.pool.reset_prefix_cache()

    def cached_blocks(self, token_ids: Sequence[int]) -> int:
        """How many leading full blocks of `token_ids` are cached now (for tests and scorers)."""
        return len(self.pool.longest_hit(self.hasher.hash_blocks(token_ids)))

    # --- the event loop ----------------------------------------------------

    def _run_until(self, t: float, inclusive: bool) -> None:
        # Events at exactly `t` run only when inclusive, so that requests
        # arriving together at `t` share the step that starts at `t`.
        def due(when: float) -> bool:
            return when < t or (inclusive and when <= t)

        while True:
            if self._step is None:
                if not self._busy() or not due(self._clock):
                    break
                # Work-conserving: a step starts as soon as the last one ends or work arrives.
                step = self._form_step(self._clock)
                if step is None:
                    # add_request rejects what could never be admitted into an idle engine, so
                    # only pulls or loads in flight can leave it idle: sleep until the first lands.
                    assert self._receiving or self._loading, "idle engine with a request it cannot admit"
                    landing = min(s.kv_ready_at for s in self._receiving + self._loading)
                    if not due(landing):
                        self._wake_at = landing
                        break
                    self._clock = landing
                    continue
                self._step, self._wake_at = step, None
            if not due(self._step.end):
                break
            step, self._step = self._step, None
            self._clock = step.end
            self._complete(step)
        self._clock = max(self._clock, t)

    def _busy(self) -> bool:
        return bool(self._waiting or self._running or self._receiving or self._loading or self._loaded)

    def _form_step(self, start: float) -> _Step | None:
        self._land_pulls(start)
        self._land_loads(start)
        admitted, uncached = self._admit(start)
        if admitted:
            self.stats.prefill_steps += 1
            self.stats.prefill_computed_tokens += uncached
            return _Step(True, start, start + self.config.latency.prefill_time(uncached), admitted)
        if not self._running:
            return None
        batch = self._schedule_decode()
        self.stats.decode_steps += 1
        return _Step(False, start, start + self.config.latency.decode_time(len(batch)), batch)

    def _admit(self, now: float) -> tuple[list[_Seq], int]:
        """Admit from the head of the queue: local prefills (returned, with their uncached
        tokens) for this step, remote ones straight into RECEIVING (their pull starts now)."""
        c, bs = self.config, self.config.block_size
        admitted: list[_Seq] = []
        total_uncached = 0
        while self._loaded:  # they hold their blocks and slot already: first in line
            seq = self._loaded[0]
            if admitted and total_uncached + seq.uncached > c.max_prefill_tokens:
                return admitted, total_uncached
            self._loaded.pop(0)
            seq.state = _State.RUNNING
            self._cache_full_blocks(seq)
            self._running.append(seq)
            admitted.append(seq)
            total_uncached += seq.uncached
        while self._waiting and self._seqs_holding_slots() < c.max_num_seqs:
            seq = self._waiting[0]
            n = len(seq.tokens)
            # A local prefill must compute its last token (its logits); a remote one has all its KV.
            cap = n // bs if seq.remote_kv else (n - 1) // bs
            hit = self.pool.longest_hit(seq.block_hashes[:cap])
            stored = 0  # blocks right after the engine's own run that the KV store holds
            if self.store is not None and not seq.remote_kv and len(hit) < cap:
                stored = self.store.longest_run(seq.block_hashes[len(hit):cap], touch=False)
            new_blocks = math.ceil(n / bs) - len(hit)
            # Hit blocks that sit in the free queue stop being allocatable once touched.
            if new_blocks > self.pool.num_free - self.pool.num_unreferenced(hit):
                break
            uncached = n - (len(hit) + stored) * bs
            if not seq.remote_kv and admitted and total_uncached + uncached > c.max_prefill_tokens:
                break
            self._waiting.popleft()
            self.pool.touch(hit)
            if stored:  # touched before allocating: the allocation's evictions must not take them
                self.store.longest_run(seq.block_hashes[len(hit):len(hit) + stored])  # type: ignore[union-attr]
            seq.blocks = hit + self.pool.allocate(new_blocks)
            seq.num_cached_blocks = len(hit)
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = (len(hit) + stored) * bs
                self.stats.cached_prompt_tokens += seq.cached_prompt_tokens
            if seq.remote_kv:
                self._start_pull(seq, uncached, now)
                continue
            if stored:
                self._start_load(seq, stored * bs, uncached, now)
                continue
            seq.state = _State.RUNNING
            self._cache_full_blocks(seq)
            self._running.append(seq)
            admitted.append(seq)
            total_uncached += uncached
        return admitted, total_uncached

    def _start_pull(self, seq: _Seq, tokens: int, now: float) -> None:
        transfer = self.config.kv_transfer
        start = max(now, self._link_free_at)
        self._link_free_at = start + transfer.wire_time(tokens)
        seq.kv_ready_at = self._link_free_at + transfer.latency_s
        seq.state = _State.RECEIVING
        self._receiving.append(seq)
        self.stats.remote_prefills += 1
        self.stats.kv_pulled_tokens += tokens
        self.stats.kv_pulled_bytes += tokens * transfer.bytes_per_token

    def _seqs_holding_slots(self) -> int:
        return len(self._running) + len(self._receiving) + len(self._loading) + len(self._loaded)

    def _start_load(self, seq: _Seq, tokens: int, uncached: int, now: float) -> None:
        link = self.store.link  # type: ignore[union-attr]
        start = max(now, self._store_link_free_at)
        self._store_link_free_at = start + link.wire_time(tokens)
        seq.kv_ready_at = self._store_link_free_at + link.latency_s
        seq.uncached = uncached
        seq.state = _State.LOADING
        self._loading.append(seq)
        self.stats.store_loads += 1
        self.stats.store_loaded_tokens += tokens

    def _land_loads(self, now: float) -> None:
        """Store loads done by `now` wait for the next prefill step, in landing order."""
        if not self._loading:
            return
        landed = sorted((s for s in self._loading if s.kv_ready_at <= now), key=lambda s: s.kv_ready_at)
        for seq in landed:
            self._loading.remove(seq)
            seq.state = _State.LOADED
            self._loaded.append(seq)

    def _land_pulls(self, now: float) -> None:
        """Pulls done by `now`: their blocks are keyed and they join the running batch."""
        if not self._receiving:
            return
        landed = [s for s in self._receiving if s.kv_ready_at <= now]
        for seq in sorted(landed, key=lambda s: s.kv_ready_at):
            self._receiving.remove(seq)
            seq.state = _State.RUNNING
            self._cache_full_blocks(seq)
            self._running.append(seq)

    def _schedule_decode(self) -> list[_Seq]:
        """Give every running request the block for the token it feeds; preempt if short."""
        bs = self.config.block_size
        i = 0
        while i < len(self._running):
            seq = self._running[i]
            need = math.ceil(len(seq.tokens) / bs) - len(seq.blocks)
            while need > self.pool.num_free and seq.state is _State.RUNNING:
                self._preempt(self._running[-1])
            if seq.state is not _State.RUNNING:  # it was the tail itself
                break
            seq.blocks += self.pool.allocate(need)
            self._cache_full_blocks(seq)
            i += 1
        return list(self._running)

    def _preempt(self, seq: _Seq) -> None:
        self._running.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_cached_blocks = [], 0
        seq.state = _State.WAITING
        seq.remote_kv = False  # its pulled KV is gone: it recomputes, as vLLM does
        self._waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _cache_full_blocks(self, seq: _Seq) -> None:
        # Keyed when scheduled, as vLLM does (its KV is written during this step).
        bs, first, upto = self.config.block_size, seq.num_cached_blocks, min(len(seq.block_hashes), len(seq.blocks))
        if first < upto:
            self.pool.cache_run(seq.blocks[first:upto], seq.block_hashes[first:upto],
                                seq.block_hashes[first - 1] if first else None, seq.tokens[first * bs:upto * bs])
        seq.num_cached_blocks = max(seq.num_cached_blocks, upto)

    def _complete(self, step: _Step) -> None:
        for seq in step.seqs:
            if seq.state is not _State.RUNNING:  # finished or preempted meanwhile
                continue
            token, finish = self._sample(seq)
            seq.tokens.append(token)
            if len(seq.tokens) % self.config.block_size == 0:
                parent = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes.append(self.hasher.hash_block(parent, seq.tokens[-self.config.block_size:]))
            self.stats.generated_tokens += 1
            self._outbox.append(SimOutput(
                seq.request.request_id, token, step.end, finish, seq.prompt_len,
                seq.cached_prompt_tokens or 0, seq.num_generated))
            if finish is not None:
                self._running.remove(seq)
                self._release(seq)

    def _sample(self, seq: _Seq) -> tuple[int, FinishReason | None]:
        s = seq.request.sampling
        if s.temperature == 0:
            full = len(seq.block_hashes) * self.config.block_size
            token, eos_draw = self.vocab.draw_greedy(seq.block_hashes[-1] if seq.block_hashes else None,
                                                     seq.tokens[full:])
        else:
            token, eos_draw = self.vocab.draw(seq.key, seq.num_generated)
        # vLLM's check_stop order: EOS, stop token ids, then length.
        if (self.config.eos_probability > 0 and not s.ignore_eos and self.vocab.eos_token_id is not None
                and eos_draw < self.config.eos_probability):
            return self.vocab.eos_token_id, "stop"
        if token in s.stop_token_ids:
            return token, "stop"
        if seq.num_generated + 1 >= s.max_tokens or len(seq.tokens) + 1 >= self.config.max_model_len:
            return token, "length"
        return token, None

    def _release(self, seq: _Seq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.state = _State.FINISHED
        del self._seqs[seq.request.request_id]
