"""LMCache as the second KV offload backend (`llm-mesh worker --kv-offload lmcache`).

vLLM's `LMCacheMPConnector` (in the engine) talks over ZMQ to one `lmcache server`
process that holds the offloaded KV in its own RAM (its "L1"). This module owns both
ends: the connector's `KVTransferConfig` (`kv_transfer_config`) and the server's command
line and lifecycle (`LMCacheServer`, started and stopped by `llm-mesh up` and the tests).

Facts this rests on (DESIGN.md; measured on this CPU-only machine):
- LMCache's in-process `LMCacheConnectorV1` does not work on CPU; server mode does, with
  `--supported-transfer-mode auto` and `--eviction-policy LRU`. The engine then moves KV
  to and from the server itself ("engine-driven" transfer): through a POSIX shared-memory
  pool when the server has `--shm-name` (1,536 tokens of SmolLM2 retrieved in ~0.02 s),
  else pickled over ZMQ (~0.5 s for the same). So the server always gets one, named after
  its port: its RAM tier is that segment (/dev/shm/lmcache_l1_pool_<name>, `l1_size_gb`
  big). lmcache unlinks it on a clean stop and a stale one at start; `LMCacheServer.stop`
  unlinks what a killed server left.
- `lmcache==0.5.6` is installed with `--no-deps` (Makefile): its declared pins (protobuf<7,
  numpy<=2.2.6, opentelemetry<=1.40, cupy/cuda-python, CUDA torch) conflict with this
  venv, but the code paths used here import and run with our versions. The one exception,
  its OpenTelemetry Prometheus exporter, is not installed: the server runs with
  `--disable-observability` (we read its state from its HTTP `/status` instead).
- LMCache stores whole chunks (`chunk_size` tokens, a multiple of the engine's block
  size): a prompt's last partial chunk is always recomputed.

Invariants:
- A worker with `--kv-offload lmcache` never starts without a reachable server: vLLM's
  connector fails the engine start when the server does not answer within
  `mq_timeout_s` (`llm-mesh up` starts the server first and waits for its health check).
- Hits are exact: LMCache keys chunks by the model and a hash of every token before and
  in the chunk, so what it returns is the KV of the same prefix (greedy output is
  unchanged; tests/e2e/test_lmcache_vllm.py checks it).
- Usage telemetry is off (`LMCACHE_TRACK_USAGE=false`, `DO_NOT_TRACK=1`): only loopback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from services.procs import Child, http_ok

if TYPE_CHECKING:
    from vllm.config.kv_transfer import KVTransferConfig

    from services.engines.vllm_engine import VllmSettings

LMCACHE_VERSION = "0.5.6"
CONNECTOR = "LMCacheMPConnector"
# The environment of the server and of every engine process that runs the connector.
ENV = {"LMCACHE_TRACK_USAGE": "false", "DO_NOT_TRACK": "1", "LMCACHE_DISABLE_BANNER": "1"}
READY_TIMEOUT_S = 60.0

_URL = re.compile(r"^tcp://(?P<host>[^:/\s]+):(?P<port>\d{1,5})$")

EvictionPolicy = Literal["LRU", "ARC"]


def parse_url(url: str) -> tuple[str, int]:
    """`tcp://HOST:PORT` (the server's ZMQ endpoint) → (host, port); ValueError otherwise."""
    m = _URL.match(url)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"lmcache url {url!r}: expected tcp://HOST:PORT")
    return m["host"], int(m["port"])


def install_hint() -> str | None:
    """None when lmcache is installed here; else what to do (for a clear startup error).
    Looked up, not imported: importing lmcache loads torch (seconds, in `llm-mesh up` too)."""
    if importlib.util.find_spec("lmcache") is None:
        return (f"--kv-offload lmcache needs lmcache=={LMCACHE_VERSION} in this environment ({sys.executable}); "
                f"`make setup` installs it (pip install --no-deps lmcache=={LMCACHE_VERSION})")
    return None


# --- the engine side: vLLM's connector -----------------------------------------------------


def kv_transfer_config(settings: VllmSettings, *, mq_timeout_s: float = 30.0) -> KVTransferConfig:
    """vLLM's KV connector for `--kv-offload lmcache`: LMCacheMPConnector → `settings.lmcache_url`.

    Role kv_both: the engine stores every full prompt chunk it computes and loads the
    longest stored prefix it lacks. Only an aggregated engine (role "both"): a P/D engine
    already runs the NixlConnector, and the two would need vLLM's MultiConnector.
    """
    from vllm.config.kv_transfer import KVTransferConfig

    if settings.role != "both":
        raise ValueError(f"--kv-offload lmcache needs role both, not {settings.role!r}")
    host, port = parse_url(settings.lmcache_url)
    hint = install_hint()
    if hint is not None:
        raise RuntimeError(hint)
    os.environ.update(ENV)  # read by lmcache in the engine core process vLLM starts next
    return KVTransferConfig(
        kv_connector=CONNECTOR,
        kv_role="kv_both",
        kv_connector_extra_config={
            "lmcache.mp.host": f"tcp://{host}",
            "lmcache.mp.port": port,
            # Server unreachable → the engine start fails after this long (lmcache's default: 300 s).
            "lmcache.mp.mq_timeout": mq_timeout_s,
        },
    )


# --- the server ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LMCacheServerSettings:
    host: str = "127.0.0.1"
    port: int = 5555  # ZMQ requests (what workers' --lmcache-url names)
    http_port: int = 5556  # its HTTP API: /healthcheck, /status (lmcache's default 8080 is too common)
    l1_size_gb: float = 1.0  # its RAM tier
    # Tokens per stored chunk: a multiple of the engines' block size (32 here).
    chunk_size: int = 256
    eviction_policy: EvictionPolicy = "LRU"
    max_workers: int = 1  # server threads per pool; one engine per core here
    # The shared-memory pool engines and server exchange KV through ("" → pickled over ZMQ).
    shm_name: str | None = None  # None: llm-mesh-lmcache-<port>

    def __post_init__(self) -> None:
        for name in ("port", "http_port"):
            value = getattr(self, name)
            if not 0 < value < 65536:
                raise ValueError(f"lmcache {name} {value}: not a TCP port")
        if self.port == self.http_port:
            raise ValueError(f"lmcache port and http_port are both {self.port}")
        if not self.l1_size_gb > 0:
            raise ValueError(f"lmcache l1_size_gb {self.l1_size_gb}: must be > 0")
        if self.chunk_size <= 0 or self.chunk_size % 32:
            raise ValueError(f"lmcache chunk_size {self.chunk_size}: a positive multiple of 32 (the block size)")
        if self.eviction_policy not in ("LRU", "ARC"):
            raise ValueError(f"lmcache eviction_policy {self.eviction_policy!r}: LRU or ARC")
        if self.max_workers < 1:
            raise ValueError(f"lmcache max_workers {self.max_workers}: must be >= 1")
        if self.shm_name and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.shm_name):
            raise ValueError(f"lmcache shm_name {self.shm_name!r}: letters, digits, '.', '_', '-' only")

    @property
    def shm(self) -> str:
        """The shared-memory pool's name ("" = none)."""
        return f"llm-mesh-lmcache-{self.port}" if self.shm_name is None else self.shm_name

    @property
    def shm_path(self) -> pathlib.Path | None:
        """Where the pool lives (lmcache prefixes the name: v1/multiprocess/engine_context.py)."""
        return pathlib.Path("/dev/shm", f"lmcache_l1_pool_{self.shm}") if self.shm else None

    @property
    def url(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @classmethod
    def from_mapping(cls, spec: dict[str, Any]) -> LMCacheServerSettings:
        """From a topology's `lmcache:` section; unknown keys are an error (a typo must not
        silently fall back to a default)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise ValueError(f"lmcache: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
        return cls(**spec)


def server_argv(s: LMCacheServerSettings) -> list[str]:
    """The `lmcache server` command line, on this interpreter (its venv holds lmcache)."""
    return [sys.executable, "-m", "lmcache.cli.main", "server",
            "--host", s.host, "--port", str(s.port),
            "--http-host", s.host, "--http-port", str(s.http_port),
            "--l1-size-gb", str(s.l1_size_gb), "--chunk-size", str(s.chunk_size),
            "--supported-transfer-mode", "auto", "--eviction-policy", s.eviction_policy,
            "--max-workers", str(s.max_workers),
            *(["--shm-name", s.shm] if s.shm else []),
            "--disable-observability"]


class LMCacheServer:
    """One `lmcache server` child process: start, wait until healthy, read its status, stop (by pid)."""

    def __init__(self, settings: LMCacheServerSettings, log_path: pathlib.Path, name: str = "lmcache") -> None:
        self.settings = settings
        self.child = Child(name, server_argv(settings), log_path, env=dict(ENV))

    @property
    def url(self) -> str:
        return self.settings.url

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Start and wait for /healthcheck (the ZMQ server is up before the HTTP API answers)."""
        hint = install_hint()
        if hint is not None:
            raise RuntimeError(hint)
        self.child.start()
        try:
            self.child.wait_ready(self.healthy, timeout)
        except BaseException:
            self.child.stop()
            raise

    def healthy(self) -> bool:
        return http_ok(f"{self.settings.http_url}/healthcheck")

    def status(self) -> dict[str, Any]:
        """The server's /status (chunk counts, L1 bytes used), parsed."""
        with urllib.request.urlopen(f"{self.settings.http_url}/status", timeout=5.0) as response:
            return json.loads(response.read())

    def stored_bytes(self) -> int:
        """Bytes of KV the server's RAM tier holds now."""
        return int(self.status()["storage_manager"]["l1_managers"]["_default"]["memory_used_bytes"])

    def stored_chunks(self) -> int:
        return int(self.status()["storage_manager"]["l1_managers"]["_default"]["total_object_count"])

    def stop(self, grace: float = 15.0) -> int | None:
        code = self.child.stop(grace)
        path = self.settings.shm_path
        if path is not None:  # a clean stop has unlinked it; a killed server could not
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Its uvicorn re-raises SIGTERM after a clean shutdown ("MPCacheServer closed" in the log).
        return 0 if code == -signal.SIGTERM else code

    def __enter__(self) -> LMCacheServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()



# --- TTFT: recompute vs an LMCache hit (for `llm-mesh bench kvstore` and the tests) ---------


@dataclasses.dataclass(frozen=True)
class LMCacheTTFT:
    """One prompt on a real vLLM engine with `--kv-offload lmcache` (greedy, max_tokens 1..)."""

    prompt_tokens: int
    recompute_ttft_s: float  # first run: nothing cached anywhere, the engine computes it all
    hit_ttft_s: float  # after the engine evicted it: the prefix comes back from LMCache
    hit_lmcache_tokens: int  # prompt tokens the hit loaded from LMCache (whole chunks)
    hit_computed_tokens: int  # … and computed (the last partial chunk)
    hit_local_tokens: int  # … and found in the engine's own cache (0: it was evicted)
    same_output: bool  # the hit's greedy tokens equal the recompute's
    stored_bytes: int  # what the server's RAM tier held after the runs
    # A second, fresh engine (another worker) on the same server: None unless asked for.
    other_worker_ttft_s: float | None = None
    other_worker_lmcache_tokens: int | None = None


def bench_ttft(model_dir: str | pathlib.Path, prompt: list[int], evict_prompts: list[list[int]],
               log_dir: pathlib.Path, *, model_name: str = "SmolLM2-135M-Instruct", cpu_cores: str = "auto",
               kv_blocks: int = 72, max_model_len: int = 2048, max_tokens: int = 8, other_worker: bool = False,
               server: LMCacheServerSettings | None = None) -> LMCacheTTFT:
    """TTFT of `prompt` recomputed vs loaded from LMCache, on real engines (one at a time).

    Starts an `lmcache server` (fresh ports unless `server` is given) and one engine
    process with `kv_blocks` KV blocks (so `evict_prompts`, run after `prompt`, evict it
    from the engine: together they must need more than `kv_blocks` blocks), then runs
    `prompt` (recompute), the evicting prompts, and `prompt` again (the hit). With
    `other_worker`, a second fresh engine on the same server then runs `prompt` once.
    Everything started here is stopped here, by pid.
    """
    from services.engines.engine_proc import PDEngineProc
    from services.procs import free_port

    s = server or LMCacheServerSettings(port=free_port(), http_port=free_port(), l1_size_gb=1.0)
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(model_dir=str(model_dir), model_name=model_name, max_model_len=max_model_len,
                    max_num_seqs=4, kv_cache_gib=1, kv_blocks=kv_blocks, cpu_cores=cpu_cores, kv_events=False,
                    kv_offload="lmcache", lmcache_url=s.url)
    chunks = len(prompt) // s.chunk_size
    with LMCacheServer(s, log_dir / "lmcache-server.log") as lmc:
        engine = PDEngineProc(settings, log_dir / "lmcache-engine-a.log", env=ENV)
        try:
            engine.wait_ready()
            # Warm-up: shorter than a chunk, so LMCache stores nothing of it.
            engine.call(op="generate", request_id="warm", prompt=prompt[::-1][:s.chunk_size // 2], max_tokens=1)
            first = engine.call(op="generate", request_id="recompute", prompt=prompt, max_tokens=max_tokens)
            _wait(lambda: lmc.stored_chunks() >= chunks, 30.0, "LMCache never stored the prompt's chunks")
            for i, p in enumerate(evict_prompts):
                engine.call(op="generate", request_id=f"evict-{i}", prompt=p, max_tokens=1)
            before = engine.call(op="stats")
            hit = engine.call(op="generate", request_id="hit", prompt=prompt, max_tokens=max_tokens)
            after = engine.call(op="stats")
        finally:
            engine.stop()
        other_ttft = other_tokens = None
        if other_worker:
            engine = PDEngineProc(settings, log_dir / "lmcache-engine-b.log", env=ENV)
            try:
                engine.wait_ready()
                engine.call(op="generate", request_id="warm", prompt=prompt[::-1][:s.chunk_size // 2], max_tokens=1)
                b0 = engine.call(op="stats")
                other = engine.call(op="generate", request_id="other", prompt=prompt, max_tokens=max_tokens)
                other_ttft = other["ttft_s"]
                other_tokens = engine.call(op="stats")["kv_transfer_prompt_tokens"] - b0["kv_transfer_prompt_tokens"]
            finally:
                engine.stop()
        stored = lmc.stored_bytes()
    delta = {k: after[k] - before[k] for k in ("kv_transfer_prompt_tokens", "computed_prompt_tokens",
                                                "local_cache_prompt_tokens")}
    return LMCacheTTFT(
        prompt_tokens=len(prompt), recompute_ttft_s=first["ttft_s"], hit_ttft_s=hit["ttft_s"],
        hit_lmcache_tokens=delta["kv_transfer_prompt_tokens"], hit_computed_tokens=delta["computed_prompt_tokens"],
        hit_local_tokens=delta["local_cache_prompt_tokens"], same_output=hit["token_ids"] == first["token_ids"],
        stored_bytes=stored, other_worker_ttft_s=other_ttft, other_worker_lmcache_tokens=other_tokens)


def _wait(ready: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)
