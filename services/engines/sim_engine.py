"""The simulated engine in real time: `SimModel` behind the `Engine` interface.

One driver task owns the model: it runs it up to the loop's clock
(`loop.time()` *is* the model's clock), hands each token to its request's
stream, and sleeps until the model's next event (a step's end) or until a
request arrives. So every token is delivered at its modelled time, give or take
event-loop jitter, and the timing of a whole mesh of sim workers follows the
latency model.

Text, per request (`_TextStream`), as vLLM's detokenizer does it:
- with a model directory holding tokenizer.json, tokens are decoded
  incrementally with `tokenizers.decoders.DecodeStream` primed with the prompt;
  a token that ends inside a UTF-8 sequence adds no text until the character
  completes; without one, token `i` renders as "<i>";
- stop strings are matched on the text; the text is cut before the stop
  string, the request ends with "stop" and its blocks are freed at once;
  the last `max(len(stop)) - 1` characters are held back while streaming so a
  stop string split across tokens is never partly sent;
- a token that stops the request by id (stop_token_ids, EOS) is returned in
  `token_ids` but adds no text.

P/D: a prefill leg (`remote_decode`) runs as any request (one token) and its
last output says where its KV is (`KVTransferParams`: this engine's id and the
prompt's block ids); a decode leg (`remote_prefill`) joins the model as a
remote request (sim_model's "Remote prefill": it pulls the blocks it lacks, at
the modelled `--sim-kv-*` link speed, and computes none of the prompt). No
bytes move between sim workers: only the time a pull takes is modelled.

KV events: the model's BlockPool reports every cache change as it happens
(sim_model); they go straight to the worker's sink, so a sim worker's event
stream is what a vLLM worker's would be for the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import pathlib
import secrets
from collections.abc import AsyncIterator

from scheduler.block_hash import DEFAULT_SEED
from services.engines.base import (Engine, EngineInfo, EngineLoad, EngineOutput, EngineRequest, FinishReason,
                                   KVEndpoint, KVTransferParams)
from services.engines.sim_model import KVTransfer, SimConfig, SimLatency, SimModel, SimOutput, Vocabulary

log = logging.getLogger(__name__)

# SmolLM2's vocabulary size: the id range used when there is no tokenizer.
DEFAULT_VOCAB_SIZE = 49152


_PRIME_TOKENS = 8  # vLLM primes its detokenizer with 5 (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class _TextStream:
    """Incremental detokenization and stop-string matching for one request."""

    def __init__(self, tokenizer: object | None, prompt: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._decoder = None
        if tokenizer is not None:
            from tokenizers.decoders import DecodeStream

            # Primed with the prompt's tail so the first output token decodes in context; like
            # vLLM's incremental detokenizer, a few tokens of context are enough (a whole long
            # prompt would be decoded again for nothing on every request).
            self._decoder = DecodeStream(ids=prompt[-_PRIME_TOKENS:], skip_special_tokens=True)
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all output text so far, cut at a stop string
        self._sent = 0  # len of text already returned

    def add(self, token_id: int, decode: bool = True) -> bool:
        """Append one token; True if it completed a stop string."""
        if not decode:
            return False
        if self._decoder is not None:
            piece = self._decoder.step(self._tokenizer, token_id) or ""
        else:
            piece = f"<{token_id}>"
        if not piece:
            return False
        searched_from = max(0, len(self.text) - self._hold)
        self.text += piece
        # Earliest-ending match wins, as in vLLM's check_stop_strings.
        best: tuple[int, int] | None = None
        for s in self._stop:
            i = self.text.find(s, searched_from)
            if i != -1 and (best is None or i + len(s) < best[1]):
                best = (i, i + len(s))
        if best is None:
            return False
        self.text = self.text[:best[0]]
        return True

    def delta(self, finished: bool) -> str:
        """The text not yet returned, minus the held-back tail unless finished."""
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._hold)
        out, self._sent = self.text[self._sent:end], end
        return out


class _Stream:
    def __init__(self, request: EngineRequest, text: _TextStream) -> None:
        self.request = request
        self.text = text
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.prompt_tokens = len(request.prompt_token_ids)
        self.cached_prompt_tokens = 0
        self.completion_tokens = 0

    def final(self, reason: FinishReason) -> EngineOutput:
        return EngineOutput([], "", reason, self.prompt_tokens, self.cached_prompt_tokens, self.completion_tokens)


class SimEngine(Engine):
    """A simulated engine serving `model` (see the module docstring and sim_model)."""

    def __init__(self, model: str = "sim", model_dir: str | pathlib.Path | None = None, *,
                 block_size: int = 16, num_blocks: int = 8192, max_num_seqs: int = 32,
                 max_model_len: int = 4096, max_prefill_tokens: int = 8192,
                 latency: SimLatency = SimLatency(), eos_probability: float = 0.0,
                 hash_seed: str = DEFAULT_SEED, kv_transfer: KVTransfer = KVTransfer()) -> None:
        self.config = SimConfig(model=model, block_size=block_size, num_blocks=num_blocks,
                                max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                max_prefill_tokens=max_prefill_tokens, eos_probability=eos_probability,
                                hash_seed=hash_seed, latency=latency, kv_transfer=kv_transfer)
        self.engine_id = f"sim-{secrets.token_hex(6)}"  # names this engine in KVTransferParams
        self.model_dir = pathlib.Path(model_dir) if model_dir is not None else None
        self.tokenizer: object | None = None
        self.sim: SimModel | None = None  # the model (exposed for tests and stats)
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._driver: asyncio.Task[None] | None = None

    async def start(self) -> EngineInfo:
        self.tokenizer, vocab = await asyncio.to_thread(load_vocabulary, self.model_dir)
        # KV events leave the model as it changes, on this loop's thread.
        self.sim = SimModel(self.config, vocab, on_kv_event=lambda event: self.emit_kv_events((event,)))
        self._driver = asyncio.create_task(self._drive(), name="sim-engine-driver")
        # No side channel: a sim decode engine only times the pull, so the id is the endpoint.
        return dataclasses.replace(self.sim.info, kv_endpoint=KVEndpoint(self.engine_id))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        stream = self._submit(request)
        try:
            while True:
                out = await stream.queue.get()
                # A slow consumer gets the backlog as one delta, like vLLM's DELTA outputs.
                while out.finish_reason is None and not stream.queue.empty():
                    out = _merge(out, stream.queue.get_nowait())
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            # Closed or cancelled before the end: the request must stop in the model.
            if self._streams.get(request.request_id) is stream:
                self._end(request.request_id)

    async def abort(self, request_id: str) -> bool:
        stream = self._end(request_id)
        if stream is None:
            return False
        stream.queue.put_nowait(stream.final("abort"))
        return True

    def load(self) -> EngineLoad:
        if self.sim is None:
            return EngineLoad(running=0, waiting=0, kv_cache_usage=0.0)
        return self.sim.load()

    async def stop(self) -> None:
        for request_id in list(self._streams):
            await self.abort(request_id)
        if self._timer is not None:
            self._timer.cancel()
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
            self._driver = None

    # --- internals -----------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _sync(self) -> SimModel:
        """Run the model up to now and deliver what it produced; before every change to it."""
        if self.sim is None or self._driver is None:
            raise RuntimeError("the sim engine is not started")
        self._dispatch(self.sim.advance(self._now()))
        return self.sim

    def _submit(self, request: EngineRequest) -> _Stream:
        sim = self._sync()
        if request.request_id in self._streams:
            raise ValueError(f"request {request.request_id!r} is already running")
        remote = request.remote_prefill is not None
        sim.add_request(request, self._now(), remote_kv=remote)  # ValueError if it can never run
        stream = _Stream(request, _TextStream(self.tokenizer, request.prompt_token_ids, request.sampling.stop))
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def _end(self, request_id: str) -> _Stream | None:
        """Stop a request in the model and forget its stream (no final output)."""
        if self.sim is None or self._driver is None:
            return self._streams.pop(request_id, None)
        sim = self._sync()
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            sim.finish(request_id, self._now())
            self._wake.set()  # the next step changes: replan the timer
        return stream

    def _kv_location(self, request: EngineRequest) -> KVTransferParams:
        """Where a finished prefill leg's KV is: this engine and the prompt's blocks.

        The ids are the prompt's block positions: sim decode engines pull no bytes (the model
        only times the pull), so they never dereference them."""
        blocks = len(request.prompt_token_ids) // self.config.block_size
        return KVTransferParams(engine_id=self.engine_id, block_ids=tuple(range(blocks)),
                                request_id=request.request_id, num_tokens=len(request.prompt_token_ids))

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.sim is not None
        try:
            while True:
                self._wake.clear()
                self._dispatch(self.sim.advance(loop.time()))
                when = self.sim.next_event_time()
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = loop.call_at(when, self._wake.set) if when is not None else None
                await self._wake.wait()
        except Exception:
            # A bug here would leave every stream waiting forever: end them instead.
            log.exception("sim engine driver failed; aborting all requests")
            for request_id, stream in list(self._streams.items()):
                del self._streams[request_id]
                stream.queue.put_nowait(stream.final("abort"))
            raise

    def _dispatch(self, outputs: list[SimOutput]) -> None:
        for o in outputs:
            stream = self._streams.get(o.request_id)
            if stream is None:  # ended meanwhile (abort, stop string)
                continue
            finish = o.finish_reason
            # A stop by token id (stop_token_ids, EOS) keeps the token but not its text.
            if stream.text.add(o.token_id, decode=finish != "stop"):
                finish = "stop"
                assert self.sim is not None
                self.sim.finish(o.request_id, o.time)
            stream.cached_prompt_tokens = o.cached_prompt_tokens
            stream.completion_tokens = o.completion_tokens
            out = EngineOutput([o.token_id], stream.text.delta(finish is not None), finish, o.prompt_tokens,
                               o.cached_prompt_tokens, o.completion_tokens)
            request = stream.request
            if request.remote_prefill is not None:  # pulled whatever it did not hold
                out.transferred_prompt_tokens = o.prompt_tokens - o.cached_prompt_tokens
            if finish is not None and request.remote_decode:
                out.kv_transfer = self._kv_location(request)
            stream.queue.put_nowait(out)
            if finish is not None:
                del self._streams[o.request_id]


def _merge(a: EngineOutput, b: EngineOutput) -> EngineOutput:
    return EngineOutput(a.token_ids + b.token_ids, a.text + b.text, b.finish_reason, b.prompt_tokens,
                        b.cached_prompt_tokens, b.completion_tokens, b.transferred_prompt_tokens, b.kv_transfer)


def load_vocabulary(model_dir: pathlib.Path | None) -> tuple[object | None, Vocabulary]:
    """(tokenizer or None, the ids the simulator may produce) for a model directory.

    Without a usable tokenizer.json: no tokenizer and ids [0, 49152).
    """
    path = model_dir / "tokenizer.json" if model_dir is not None else None
    if path is None or not path.is_file():
        if model_dir is not None:
            log.warning("no tokenizer.json in %s: the sim engine renders token ids as text", model_dir)
        return None, Vocabulary(DEFAULT_VOCAB_SIZE)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    eos_ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((model_dir / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        if eos is not None:
            eos_ids = eos if isinstance(eos, list) else [eos]
            break
    special.update(eos_ids)
    return tokenizer, Vocabulary(tokenizer.get_vocab_size(with_added_tokens=True), frozenset(special),
                                 eos_ids[0] if eos_ids else None)


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's --sim-* flags (the sizes it shares with vLLM come from its own flags)."""
    d, lat = SimConfig(), SimLatency()
    g = parser.add_argument_group("sim engine (--engine sim)")
    g.add_argument("--sim-prefill-per-token", type=float, default=lat.prefill_per_token_s,
                   help="seconds of prefill per uncached prompt token")
    g.add_argument("--sim-step-overhead", type=float, default=lat.step_overhead_s,
                   help="fixed seconds of every prefill step")
    g.add_argument("--sim-itl", type=float, default=lat.itl_s, help="seconds per decode step at batch 1")
    g.add_argument("--sim-batch-slowdown", type=float, default=lat.batch_slowdown,
                   help="fraction of --sim-itl added per extra running request")
    g.add_argument("--sim-num-blocks", type=int, default=d.num_blocks, help="KV cache size in blocks")
    g.add_argument("--sim-max-prefill-tokens", type=int, default=d.max_prefill_tokens,
                   help="uncached prompt tokens per prefill step")
    g.add_argument("--sim-eos-probability", type=float, default=d.eos_probability,
                   help="chance per token of a simulated EOS (0: run to max_tokens)")
    add_kv_transfer_arguments(g, "sim-")
    g.add_argument("--sim-hash-seed", default=DEFAULT_SEED,
                   help="block hash root seed (vLLM's default; must match the scheduler)")


def add_kv_transfer_arguments(group: argparse._ArgumentGroup, prefix: str = "") -> None:
    """The modelled KV pull's flags (`--<prefix>kv-bandwidth-gbps`, `-bytes-per-token`, `-latency-ms`):
    the sim worker's (prefix "sim-") and `bench routing`'s (no prefix)."""
    kv = KVTransfer()
    group.add_argument(f"--{prefix}kv-bandwidth-gbps", type=float, default=kv.bandwidth_gbps,
                       help="P/D: KV pull bandwidth into a decode worker, gigabits/s (400 = 50 GB/s)")
    group.add_argument(f"--{prefix}kv-bytes-per-token", type=int, default=kv.bytes_per_token,
                       help="P/D: KV bytes per token (default: Llama-3-8B bf16, 128 KiB)")
    group.add_argument(f"--{prefix}kv-latency-ms", type=float, default=kv.latency_s * 1e3,
                       help="P/D: fixed latency of one KV pull")


def kv_transfer_from_args(args: argparse.Namespace, prefix: str = "") -> KVTransfer:
    """The KVTransfer of the flags add_kv_transfer_arguments(…, prefix) added."""
    p = prefix.replace("-", "_")
    return KVTransfer(bytes_per_token=getattr(args, f"{p}kv_bytes_per_token"),
                      bandwidth_gbps=getattr(args, f"{p}kv_bandwidth_gbps"),
                      latency_s=getattr(args, f"{p}kv_latency_ms") / 1e3)


def build_sim_engine(args: argparse.Namespace) -> SimEngine:
    """A SimEngine from the worker's parsed flags."""
    return SimEngine(
        model=args.model, model_dir=args.model_dir, block_size=args.block_size, num_blocks=args.sim_num_blocks,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_prefill_tokens=args.sim_max_prefill_tokens, eos_probability=args.sim_eos_probability,
        hash_seed=args.sim_hash_seed,
        latency=SimLatency(prefill_per_token_s=args.sim_prefill_per_token, step_overhead_s=args.sim_step_overhead,
                           itl_s=args.sim_itl, batch_slowdown=args.sim_batch_slowdown),
        kv_transfer=kv_transfer_from_args(args, "sim-"),
    )
