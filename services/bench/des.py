"""Discrete-event simulation of a mesh: the real routing code (scheduler/) in
front of N simulated engines (services/engines/sim_model), in simulated time.

Per arrival: every engine is advanced to the arrival time (so queues, KV usage
and the block index are current), the request's prompt is hashed exactly as
the engines hash it, the policy decides, and the request joins that engine.
The router decides one request at a time (`decision_s` each, default 0): a
burst of arrivals (the conversation trace stamps ~10 requests with the same
time) reaches the engines `decision_s` apart, as from the live scheduler, so
a request sent to an engine in mid-step waits only with those that came before
that step ended; with 0 the whole burst lands at once, and all of it sent to
one engine in mid-step shares that engine's next prefill step.
Between arrivals the clock jumps to the next engine event. Engines' KV events
feed the block index as they happen (a live mesh adds the event stream's
latency; `event_delay_s` is not modelled yet). The engines' load (running,
waiting, KV usage) reaches the router every `load_poll_s`, for all engines at
once, as the scheduler's GetLoad poll does (--load-poll-interval); with 0 it is
current after every engine event. The router's own counts (its dispatches,
first tokens, finishes) are always current, as live.

Topology (`ClusterSpec`): `workers` aggregated engines (Role.BOTH, today's
default), plus optionally `prefill_workers` and `decode_workers`. Every request
goes through scheduler.disagg.Disaggregator (with no prefill worker it is the
policy's decision, unchanged). A remote one runs its prompt on the prefill
engine (max_tokens=1); when that token is out, the request joins the decode
engine with `remote_kv=True`: it pulls the KV it lacks (`ClusterSpec.kv_transfer`)
and decodes every output token there, as llm-d's decode side does (the
prefill's token is not forwarded).

KV store (`ClusterSpec.kvstore_blocks` > 0): one SimStore (services/engines/sim_store.py)
shared by every engine, announcing its blocks into the same index as holder `KVSTORE_ID`
(tier STORE), as the real store's WatchKVEvents does; engines offload to it and load from it.

Latencies reported: TTFT = arrival → first token at the decode engine;
ITL = every gap between consecutive tokens of a request, pooled over all
requests (what `vllm bench serve` reports as ITL, so one stalled step shows in
the tail); TPOT = per request (finish − first token) / (output tokens − 1).
"""

from __future__ import annotations

import dataclasses
import heapq
import array
import collections
import math
import statistics
from collections.abc import Sequence

from scheduler.block_hash import BlockHasher, external_block_hash
from scheduler.framework import Role
from services.bench.workload import WorkloadRequest, prompt_tokens
from services.engines.base import EngineRequest, SamplingOptions
from services.engines.sim_model import KVTransfer, SimConfig, SimLatency, SimModel, Vocabulary
from services.engines.sim_store import SimStore, StoreLink, connect_store_index

KVSTORE_ID = "kvstore-0"  # the simulated store's holder id in the block index


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    workers: int = 8                # aggregated engines (prefill and decode on each)
    block_size: int = 32
    num_blocks: int = 4096          # per engine: 131k tokens at block size 32
    max_num_seqs: int = 64
    max_model_len: int = 131_072
    latency: SimLatency = SimLatency()
    prefill_workers: int = 0        # P/D: prefill-only engines
    decode_workers: int = 0         # P/D: decode engines (prefill locally when the rule says so)
    kv_transfer: KVTransfer = KVTransfer()
    kvstore_blocks: int = 0         # the shared KV store's capacity in blocks (0: no store)
    kvstore_offload: str = "evict"  # what engines write to it: evicted blocks, or every computed one
    kvstore_link: StoreLink = StoreLink()

    @property
    def total_workers(self) -> int:
        return self.workers + self.prefill_workers + self.decode_workers

    def worker_roles(self) -> list[tuple[str, Role]]:
        """(worker id, role) of every engine: w.. aggregated, p.. prefill, d.. decode."""
        return ([(f"w{i:02d}", Role.BOTH) for i in range(self.workers)]
                + [(f"p{i:02d}", Role.PREFILL) for i in range(self.prefill_workers)]
                + [(f"d{i:02d}", Role.DECODE) for i in range(self.decode_workers)])


@dataclasses.dataclass
class RequestResult:
    arrival_s: float
    worker: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    prefill_worker: str = ""  # set when the prompt was prefilled remotely (P/D)

    @property
    def ttft(self) -> float:
        return (self.first_token_s or math.inf) - self.arrival_s

    @property
    def tpot(self) -> float | None:
        """Mean inter-token latency of this request; None with fewer than 2 tokens or unfinished."""
        if self.finish_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return (self.finish_s or math.inf) - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def summarize(results: list[RequestResult], slo_ttft_s: float, duration_s: float,
              itl_gaps: Sequence[float] | None = None) -> dict[str, float]:
    """The run's numbers. `itl_gaps`: every inter-token gap, when the driver tracked them
    (else the ITL keys are NaN; TPOT comes from the results alone)."""
    done = [r for r in results if r.finish_s is not None]
    ttft = [r.ttft for r in done]
    e2e = [r.e2e for r in done]
    tpot = [t for t in (r.tpot for r in done) if t is not None]
    gaps = sorted(itl_gaps) if itl_gaps else []
    per_worker: dict[str, int] = {}
    for r in results:
        per_worker[r.worker] = per_worker.get(r.worker, 0) + r.input_tokens - r.cached_tokens
    loads = list(per_worker.values()) or [0]
    prompt = sum(r.input_tokens for r in done) or 1
    return {
        "requests": len(results),
        "completed": len(done),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "e2e_mean_s": statistics.fmean(e2e) if e2e else math.nan,
        "e2e_p90_s": percentile(e2e, 90),
        "output_tok_per_s": sum(r.output_tokens for r in done) / max(duration_s, 1e-9),
        "hit_rate": sum(r.cached_tokens for r in done) / prompt,
        # Uncached prompt tokens (the real work) of the busiest worker over the mean.
        "imbalance": max(loads) / max(1e-9, statistics.fmean(loads)),
        "slo_attainment": sum(t <= slo_ttft_s for t in ttft) / max(1, len(results)),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "pd_remote": sum(1 for r in results if r.prefill_worker),
    }


class _Hasher:
    """Prompt → external block hashes, memoized by chunk-id prefix: the trace's
    shared prefixes are hashed once, not once per request and policy."""

    def __init__(self, block_size: int, chunk: int) -> None:
        assert chunk % block_size == 0, "a trace chunk must hold whole KV blocks"
        self.hasher = BlockHasher(block_size)
        self.per_chunk = chunk // block_size
        self.block_size = block_size
        # chunk-id prefix -> (ints, raw hashes) of that chunk's blocks; raw kept for the engines.
        self._memo: dict[tuple[int, ...], tuple[list[int], list[bytes]]] = {}

    def hashes(self, request: WorkloadRequest, tokens: list[int]) -> list[int]:
        return self.hashes_both(request, tokens)[0]

    def hashes_both(self, request: WorkloadRequest, tokens: list[int]) -> tuple[list[int], list[bytes]]:
        """(external int hashes, raw hashes) of every full block of `tokens` (the request's prompt)."""
        full = len(tokens) // self.block_size
        out: list[int] = []
        out_raw: list[bytes] = []
        parent: bytes | None = None
        chunk_len = self.per_chunk * self.block_size
        for k, _ in enumerate(request.chunk_ids):
            start = k * self.per_chunk
            if start >= full:
                break
            blocks = min(self.per_chunk, full - start)
            key = request.chunk_ids[: k + 1] if blocks == self.per_chunk else None
            memo = self._memo.get(key) if key is not None else None
            if memo is not None:
                ints, raw = memo
            else:
                piece = tokens[k * chunk_len: k * chunk_len + blocks * self.block_size]
                raw = self.hasher.hash_blocks(piece, parent)
                ints = [external_block_hash(h) for h in raw]
                if key is not None:
                    self._memo[key] = (ints, raw)
            parent = raw[-1]
            out.extend(ints)
            out_raw.extend(raw)
        if len(out) < full:  # padding past the trace's chunks: unique, not memoized
            tail = tokens[len(out) * self.block_size: full * self.block_size]
            raw = self.hasher.hash_blocks(tail, parent)
            out.extend(external_block_hash(h) for h in raw)
            out_raw.extend(raw)
        return out, out_raw


class _PresetHasher:
    """The engine's BlockHasher, handed the prompt's hashes the router already computed, so a
    prompt is hashed once per run rather than once more per engine admission. `hash_blocks` of
    the prompt returns the preset (a copy: the engine appends generated blocks to it); anything
    else is computed."""

    def __init__(self, inner: BlockHasher) -> None:
        self.inner = inner
        self.block_size = inner.block_size
        self.preset: list[bytes] | None = None

    def hash_block(self, parent: bytes | None, block_token_ids) -> bytes:
        return self.inner.hash_block(parent, block_token_ids)

    def hash_blocks(self, token_ids, parent: bytes | None = None) -> list[bytes]:
        preset, self.preset = self.preset, None
        if preset is not None and parent is None and len(preset) == len(token_ids) // self.block_size:
            return list(preset)
        return self.inner.hash_blocks(token_ids, parent)


@dataclasses.dataclass
class _Live:
    result: RequestResult
    ticket: object  # scheduler.framework.Ticket
    dispatched_s: float
    last_token_s: float = 0.0


@dataclasses.dataclass
class _PrefillLeg:
    """A remote prefill in flight: once its token is out, `request` joins `decode_worker`."""

    ticket: object  # the prefill worker's Ticket
    dispatched_s: float
    decode_worker: str
    request: EngineRequest
    raw_hashes: list[bytes]


def arrival_order(requests: Sequence[WorkloadRequest]) -> list[int]:
    """The order `simulate` decides `requests` in (and lists its results in): by arrival, ties in
    list order."""
    return sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)


def simulate(requests: list[WorkloadRequest], policy, spec: ClusterSpec, *, model: str = "bench",
             chunk: int = 512, slo_ttft_s: float = 2.0, hasher: _Hasher | None = None,
             share_hashes: bool = True, results_out: list[RequestResult] | None = None,
             decision_s: float = 0.0, load_poll_s: float = 0.0) -> dict:
    """Replay `requests` through `policy` (the decode choice; scheduler.disagg adds the P/D rule)
    on the cluster's simulated engines; returns the summary, with `pd_decisions` (rule → count).
    `decision_s`: the router's time per decision (the module docstring); TTFT counts from arrival.
    `load_poll_s`: how old the engines' reported load is (the module docstring); 0: always current."""
    if not (math.isfinite(decision_s) and decision_s >= 0):
        raise ValueError(f"decision_s must be >= 0, got {decision_s}")
    if not (math.isfinite(load_poll_s) and load_poll_s >= 0):
        raise ValueError(f"load_poll_s must be >= 0, got {load_poll_s}")
    from scheduler.disagg import Disaggregator
    from scheduler.framework import RequestView, WorkerState
    from scheduler.index import BlockIndex

    index = BlockIndex()
    disagg = Disaggregator(policy)
    hasher = hasher or _Hasher(spec.block_size, chunk)
    config = SimConfig(model=model, block_size=spec.block_size, num_blocks=spec.num_blocks,
                       max_num_seqs=spec.max_num_seqs, max_model_len=spec.max_model_len,
                       max_prefill_tokens=spec.max_model_len, latency=spec.latency,
                       kv_transfer=spec.kv_transfer)
    engines: dict[str, SimModel] = {}
    states: dict[str, WorkerState] = {}
    store = None
    if spec.kvstore_blocks:
        store = SimStore(spec.kvstore_blocks, offload=spec.kvstore_offload, link=spec.kvstore_link)
        connect_store_index(store, KVSTORE_ID, model, index)
    for worker_id, role in spec.worker_roles():
        engines[worker_id] = SimModel(config, Vocabulary(49_152), store=store)
        if share_hashes:
            assert engines[worker_id].hasher.seed == hasher.hasher.seed, "router and engines must hash alike"
            engines[worker_id].hasher = _PresetHasher(engines[worker_id].hasher)
        connect_index(engines[worker_id], worker_id, model, index)
        states[worker_id] = WorkerState(worker_id=worker_id, model=model, max_num_seqs=spec.max_num_seqs,
                                        role=role, block_size=spec.block_size,
                                        kv_blocks_total=spec.num_blocks)
    live: dict[str, _Live] = {}  # decode legs (and aggregated requests)
    prefilling: dict[str, _PrefillLeg] = {}  # remote prefill legs, by request id
    results: list[RequestResult] = []
    itl_gaps = array.array("d")
    rules: collections.Counter[str] = collections.Counter()
    pending = [requests[i] for i in arrival_order(requests)]
    engine_events: list[tuple[float, str]] = []  # (next event time, worker) — lazily invalidated
    next_at: dict[str, float | None] = {w: None for w in engines}

    def schedule(worker_id: str) -> None:
        t = engines[worker_id].next_event_time()
        next_at[worker_id] = t
        if t is not None:
            heapq.heappush(engine_events, (t, worker_id))

    def add(worker_id: str, request: EngineRequest, raw_hashes: list[bytes], now: float,
            remote_kv: bool = False) -> bool:
        """Queue `request` on the engine; False if it can never run there."""
        if share_hashes:
            engines[worker_id].hasher.preset = raw_hashes
        try:
            engines[worker_id].add_request(request, now, remote_kv=remote_kv)
        except ValueError:
            return False
        finally:
            schedule(worker_id)
        return True

    def fail(request_id: str) -> None:
        entry = live.pop(request_id)
        entry.ticket.finish(completed=False)

    def prefill_done(out) -> None:
        leg = prefilling.get(out.request_id)
        if leg is None or out.finish_reason is None:  # (its one token is also its last)
            return
        del prefilling[out.request_id]
        leg.ticket.finish(out.time - leg.dispatched_s)
        if not add(leg.decode_worker, leg.request, leg.raw_hashes, out.time, remote_kv=True):
            fail(out.request_id)

    def run_engine(worker_id: str, now: float) -> None:
        prefill_engine = states[worker_id].role == Role.PREFILL
        for out in engines[worker_id].advance(now):
            if prefill_engine:
                prefill_done(out)
                continue
            entry = live.get(out.request_id)
            if entry is None:
                continue
            r = entry.result
            if r.first_token_s is None:
                r.first_token_s = out.time
                r.cached_tokens = out.cached_prompt_tokens
                entry.ticket.first_token(out.time - entry.dispatched_s)
            else:
                itl_gaps.append(out.time - entry.last_token_s)
            entry.last_token_s = out.time
            if out.finish_reason is not None:
                r.finish_s = out.time
                entry.ticket.finish(out.time - entry.dispatched_s)
                del live[out.request_id]
        if not load_poll_s:
            report(worker_id)
        schedule(worker_id)

    def report(worker_id: str) -> None:
        load = engines[worker_id].load()
        states[worker_id].report(load.running, load.waiting, load.kv_cache_usage)

    i = 0
    now = 0.0
    router_free = -math.inf  # when the router is done deciding the previous request
    next_poll = pending[0].arrival_s if load_poll_s and pending else math.inf
    while i < len(pending) or engine_events:
        # A request is decided (and reaches its engine) once the router is free: a burst of
        # arrivals reaches the engines `decision_s` apart, as from the live scheduler.
        arrival = max(pending[i].arrival_s, router_free + decision_s) if i < len(pending) else math.inf
        while engine_events and engine_events[0][0] <= arrival or next_poll <= arrival < math.inf:
            if next_poll <= arrival and not (engine_events and engine_events[0][0] <= next_poll):
                # The scheduler polls every engine's load at once; engine events due by then come first.
                for worker_id in engines:
                    report(worker_id)
                next_poll += load_poll_s
                continue
            t, worker_id = heapq.heappop(engine_events)
            if next_at[worker_id] != t:
                continue  # superseded
            now = t
            run_engine(worker_id, now)
        if i >= len(pending):
            continue
        now = router_free = arrival
        request = pending[i]
        i += 1
        for worker_id in engines:  # bring every engine (and the index) up to `now`
            if next_at[worker_id] is not None and next_at[worker_id] <= now:
                run_engine(worker_id, now)
        tokens = prompt_tokens(request, chunk)
        block_hashes, raw_hashes = hasher.hashes_both(request, tokens)
        view = RequestView(model=model, prompt_tokens=len(tokens), block_hashes=block_hashes,
                           block_size=spec.block_size, session_id=request.session_id, request_id=f"r{i}",
                           max_tokens=request.output_tokens, now=now)
        pd = disagg.decide(view, list(states.values()), index)
        rules[pd.rule] += 1
        decision, worker_id = pd.decode, pd.decode_worker
        if worker_id is None:  # rejected (e.g. an SLO-aware policy): counts as a miss
            results.append(RequestResult(request.arrival_s, "", request.input_tokens, request.output_tokens))
            continue
        result = RequestResult(request.arrival_s, worker_id, request.input_tokens, request.output_tokens)
        results.append(result)
        ticket = states[worker_id].start(pd.decode_prefill_tokens, decision.request_blocks)
        live[view.request_id] = _Live(result, ticket, now)
        engine_request = EngineRequest(view.request_id, tokens, SamplingOptions(
            max_tokens=request.output_tokens, temperature=0, ignore_eos=True))
        if pd.prefill is None:
            if not add(worker_id, engine_request, raw_hashes, now):  # too long for the engine: failed
                fail(view.request_id)
            continue
        prefill_id = pd.prefill.worker_id
        result.prefill_worker = prefill_id
        prefill_ticket = states[prefill_id].start(pd.prefill.prefill_tokens, decision.request_blocks)
        prefilling[view.request_id] = _PrefillLeg(prefill_ticket, now, worker_id, engine_request, raw_hashes)
        one_token = dataclasses.replace(engine_request, sampling=dataclasses.replace(
            engine_request.sampling, max_tokens=1))
        if not add(prefill_id, one_token, raw_hashes, now):
            del prefilling[view.request_id]
            prefill_ticket.finish(completed=False)
            fail(view.request_id)
    if results_out is not None:  # per-request results for callers that window them (tests/data/)
        results_out.extend(results)
    duration = max((r.finish_s or 0.0) for r in results) - min(r.arrival_s for r in results) if results else 0.0
    return summarize(results, slo_ttft_s, duration, itl_gaps) | {
        "ttfts": sorted(r.ttft for r in results), "pd_decisions": dict(rules),
        "engine_stats": _engine_stats(engines),
        **({"kvstore": dataclasses.asdict(store.stats) | {"blocks": len(store)}} if store is not None else {})}


def _engine_stats(engines: dict[str, SimModel]) -> dict[str, dict[str, int]]:
    """Per engine role prefix (w, p, d): summed prompt compute and KV pulls."""
    out: dict[str, dict[str, int]] = {}
    for worker_id, engine in engines.items():
        s = out.setdefault(worker_id[0], collections.Counter())
        st = engine.stats
        s.update({"engines": 1, "prefill_computed_tokens": st.prefill_computed_tokens,
                  "remote_prefills": st.remote_prefills, "kv_pulled_bytes": st.kv_pulled_bytes,
                  "prefill_steps": st.prefill_steps, "decode_steps": st.decode_steps,
                  "preemptions": st.preemptions, "store_loads": st.store_loads,
                  "store_loaded_tokens": st.store_loaded_tokens})
    return {k: dict(v) for k, v in out.items()}


def connect_index(engine: SimModel, worker_id: str, model: str, index) -> None:
    """Feed the engine's KV events into the index, as the live mesh's event stream does.

    The engine sends one BlockRemoved per block holding a hash; like the
    worker's event log (services/kv_event_log.py) references are counted per
    hash, so the index forgets a hash only when its last block goes.
    """
    from services.engines.base import BlockRemoved, BlockStored

    refs: dict[int, int] = {}

    def on_event(event) -> None:
        if isinstance(event, BlockStored):
            new = []
            for h in event.block_hashes:
                n = refs.get(h, 0)
                refs[h] = n + 1
                if n == 0:
                    new.append(h)
            if new:
                index.stored(worker_id, model, new)
        elif isinstance(event, BlockRemoved):
            gone = []
            for h in event.block_hashes:
                n = refs.get(h, 0) - 1
                if n <= 0:
                    refs.pop(h, None)
                    if n == 0:
                        gone.append(h)
                else:
                    refs[h] = n
            if gone:
                index.removed(worker_id, model, gone)
        else:  # AllBlocksCleared
            refs.clear()
            index.cleared(worker_id)

    engine.pool.on_kv_event = on_event
