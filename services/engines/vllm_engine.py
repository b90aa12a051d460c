"""vLLM in-process (AsyncLLM) behind the Engine interface.

CPU defaults that work on a small machine (see DESIGN.md): eager mode (23 s
start instead of 74 s), a bounded KV cache (`VLLM_CPU_KVCACHE_SPACE`), and an
explicit OMP core binding so two engines on one host don't thrash.

Prefix caching is on with `sha256_cbor` hashing and vLLM's fixed default seed,
so block hashes are process-independent and the scheduler can compute the same
hashes from token ids (scheduler/block_hash.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from services.engines.base import Engine, EngineInfo, EngineLoad, EngineOutput, EngineRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VllmSettings:
    model_dir: str
    model_name: str
    max_model_len: int = 4096
    max_num_seqs: int = 32
    # vLLM's CPU attention backend needs a multiple of 32.
    block_size: int = 32
    kv_cache_gib: int = 2
    # VLLM_CPU_OMP_THREADS_BIND: "auto", "all", "nobind" or a core list like "0-1" / "1".
    cpu_cores: str = "auto"
    seed: int = 0
    enforce_eager: bool = True


class VllmEngine(Engine):
    def __init__(self, settings: VllmSettings) -> None:
        self.settings = settings
        self._engine: AsyncLLM | None = None
        self._stats = _LatestStats()
        self._running: set[str] = set()

    async def start(self) -> EngineInfo:
        s = self.settings
        # vLLM reads these when the engine core process starts.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = s.cpu_cores
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # Block hashes must not depend on the process: use vLLM's fixed default seed.
        os.environ.pop("PYTHONHASHSEED", None)

        args = AsyncEngineArgs(
            model=s.model_dir,
            served_model_name=[s.model_name],
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            block_size=s.block_size,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=True,
            prefix_caching_hash_algo="sha256_cbor",
            seed=s.seed,
            disable_log_stats=False,
        )
        stats = self._stats
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[lambda cfg, idx: _StatsRecorder(stats)])
        config = self._engine.vllm_config
        info = EngineInfo(
            model=s.model_name,
            max_model_len=config.model_config.max_model_len,
            block_size=config.cache_config.block_size,
            kv_blocks_total=config.cache_config.num_gpu_blocks or 0,
            max_num_seqs=config.scheduler_config.max_num_seqs,
        )
        log.info("vLLM engine ready: %s", info)
        return info

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        sp = request.sampling
        params = SamplingParams(
            max_tokens=sp.max_tokens,
            temperature=sp.temperature,
            top_p=sp.top_p,
            seed=sp.seed,
            stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None,
            ignore_eos=sp.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        assert self._engine is not None, "engine not started"
        prompt_tokens = len(request.prompt_token_ids)
        completion_tokens = 0
        finished = False
        self._running.add(request.request_id)
        try:
            stream = self._engine.generate(
                TokensPrompt(prompt_token_ids=request.prompt_token_ids), params, request.request_id
            )
            async for out in stream:
                completion = out.outputs[0]
                completion_tokens += len(completion.token_ids)
                finished = out.finished
                yield EngineOutput(
                    token_ids=list(completion.token_ids),
                    text=completion.text,
                    finish_reason=_finish_reason(completion.finish_reason) if out.finished else None,
                    prompt_tokens=prompt_tokens,
                    cached_prompt_tokens=out.num_cached_tokens or 0,
                    completion_tokens=completion_tokens,
                )
        finally:
            self._running.discard(request.request_id)
            if not finished:
                # The consumer went away (cancel, deadline): free the engine's slot now.
                await asyncio.shield(self._engine.abort(request.request_id))

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._running or self._engine is None:
            return False
        await self._engine.abort(request_id)
        return True

    def load(self) -> EngineLoad:
        return EngineLoad(
            running=self._stats.running,
            waiting=self._stats.waiting,
            kv_cache_usage=self._stats.kv_cache_usage,
            generated_tokens=self._stats.generated_tokens,
        )

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


def _finish_reason(reason: str | None) -> str:
    return reason if reason in ("stop", "length", "abort") else "stop"


@dataclasses.dataclass
class _LatestStats:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens: int = 0


class _StatsRecorder(StatLoggerBase):
    """A vLLM stat logger that keeps the engine's latest scheduler stats for GetLoad."""

    def __init__(self, into: _LatestStats) -> None:  # noqa: D107 - vLLM passes (config, index) to factories
        self._into = into

    def record(self, scheduler_stats, iteration_stats, *args, **kwargs) -> None:  # noqa: ANN001
        if scheduler_stats is not None:
            self._into.running = scheduler_stats.num_running_reqs
            self._into.waiting = scheduler_stats.num_waiting_reqs
            self._into.kv_cache_usage = scheduler_stats.kv_cache_usage
        if iteration_stats is not None:
            self._into.generated_tokens += iteration_stats.num_generation_tokens

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, *args, **kwargs) -> None:  # noqa: ANN002
        pass
