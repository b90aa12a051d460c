"""LMCache as a KV offload backend: a real `lmcache server` and real vLLM engines on CPU.

The server tests (no vLLM) check its lifecycle as `llm-mesh up` drives it: healthy, empty,
stopped by pid, its shared-memory pool (its RAM tier) gone, also after a kill -9; and which
workers make `up` start one. The vLLM tests: `llm-mesh up --kv-offload lmcache` starts the
server, its worker stores a prompt's chunks there, SIGTERM stops it; and
(services/engines/lmcache_backend.py `bench_ttft`) one engine with `kv_offload="lmcache"` and a small KV cache (72 blocks): a
1,600-token prompt, two other prompts that evict it from the engine, then the prompt again.
Asserted: the second run loads every full LMCache chunk of it (6 × 256 tokens) from the
server, finds nothing in the engine's own cache (it was evicted), computes only the rest,
produces the same greedy tokens, and starts sooner; then a second, fresh engine (another
worker) on the same server loads the same chunks.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import time

import pytest

from services.engines import lmcache_backend
from services.engines.lmcache_backend import LMCacheServer, LMCacheServerSettings, kv_transfer_config, parse_url
from services.engines.vllm_engine import VllmSettings
from services.procs import free_port, http_ok

PROMPT_TOKENS = 1600


def test_settings_and_urls_are_validated():
    assert parse_url("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    for bad in ("127.0.0.1:5555", "tcp://127.0.0.1", "tcp://h:0", "tcp://h:99999", "http://h:1"):
        with pytest.raises(ValueError):
            parse_url(bad)
    for bad in (dict(port=0), dict(port=7000, http_port=7000), dict(l1_size_gb=0), dict(chunk_size=100),
                dict(eviction_policy="FIFO"), dict(shm_name="a/b")):
        with pytest.raises(ValueError):
            LMCacheServerSettings(**bad)
    with pytest.raises(ValueError, match="unknown key"):
        LMCacheServerSettings.from_mapping({"prot": 1})
    assert LMCacheServerSettings(port=6000).shm == "llm-mesh-lmcache-6000"
    argv = lmcache_backend.server_argv(LMCacheServerSettings(port=6000, shm_name=""))
    assert "--shm-name" not in argv and argv[argv.index("--port") + 1] == "6000"


def test_kv_transfer_config_names_the_server():
    s = VllmSettings(model_dir="/m", model_name="m", kv_offload="lmcache", lmcache_url="tcp://127.0.0.1:6123")
    config = kv_transfer_config(s)
    assert config.kv_connector == "LMCacheMPConnector" and config.kv_role == "kv_both"
    assert config.kv_connector_extra_config["lmcache.mp.host"] == "tcp://127.0.0.1"
    assert config.kv_connector_extra_config["lmcache.mp.port"] == 6123
    with pytest.raises(ValueError, match="role both"):
        kv_transfer_config(VllmSettings(model_dir="/m", model_name="m", kv_offload="lmcache", role="prefill"))
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        kv_transfer_config(VllmSettings(model_dir="/m", model_name="m", kv_offload="lmcache", lmcache_url="x"))


def test_up_starts_a_server_only_for_lmcache_workers(tmp_path: pathlib.Path):
    from services import up

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args(["--kv-offload", "lmcache", "--lmcache-port", "6100"])
    config = up.topology(args)
    s = up.lmcache_settings(config, args)
    assert (s.host, s.port, s.http_port) == ("127.0.0.1", 6100, 6101)
    argv = up.worker_children(config["workers"], args, "127.0.0.1:2379", tmp_path, lmcache_url=s.url)[0][0].argv
    assert argv[argv.index("--kv-offload") + 1] == "lmcache"
    assert argv[argv.index("--lmcache-url") + 1] == "tcp://127.0.0.1:6100"
    plain = parser.parse_args([])
    assert up.lmcache_settings(up.topology(plain), plain) is None
    config = {"workers": [{"engine": "vllm", "kv_offload": "lmcache"}, {"engine": "sim"}],
              "lmcache": {"port": 7000, "l1_size_gb": 2}}
    assert up.lmcache_settings(config, plain) == LMCacheServerSettings(port=7000, http_port=7001, l1_size_gb=2)
    with pytest.raises(SystemExit, match="unknown key"):
        up.lmcache_settings({**config, "lmcache": {"l1_gb": 2}}, plain)
    with pytest.raises(SystemExit, match="vLLM workers only"):
        up.lmcache_settings({"workers": [{"engine": "sim", "kv_offload": "lmcache"}]}, plain)


def test_server_starts_healthy_and_stops_clean(tmp_path: pathlib.Path):
    s = LMCacheServerSettings(port=free_port(), http_port=free_port(), l1_size_gb=0.25)
    shm = s.shm_path
    shm.write_bytes(b"stale")  # what a killed server leaves: start must not trip over it
    server = LMCacheServer(s, tmp_path / "lmcache.log")
    server.start()
    try:
        assert server.healthy()
        status = server.status()
        assert status["is_healthy"] and status["chunk_size"] == s.chunk_size
        assert server.stored_chunks() == 0 and server.stored_bytes() == 0
        assert shm.stat().st_size == 256 << 20  # its RAM tier is the shared-memory pool, made anew
    finally:
        server.stop()
    assert not server.child.alive()
    assert not http_ok(f"{s.http_url}/healthcheck")
    assert not shm.exists()
    assert port_free(s.port)


def test_a_killed_server_leaves_no_pool(tmp_path: pathlib.Path):
    s = LMCacheServerSettings(port=free_port(), http_port=free_port(), l1_size_gb=0.125)
    server = LMCacheServer(s, tmp_path / "lmcache.log")
    server.start()
    try:
        server.child.kill()  # SIGKILL: lmcache cannot unlink its pool
        assert s.shm_path.exists()
    finally:
        server.stop()
    assert not s.shm_path.exists() and port_free(s.port)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def prompts(model_dir) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    words = ("river mountain lantern orbit copper violet harbor meadow signal quartz ember canyon "
             "thistle beacon glacier falcon prism tundra willow cobalt").split()

    def text(k: int) -> list[int]:
        t = " ".join(f"{words[(i + k) % 20]} {words[(i * 7 + k) % 20]} {words[(i * 3) % 20]}." for i in range(800))
        ids = tok(t)["input_ids"][:PROMPT_TOKENS]
        assert len(ids) == PROMPT_TOKENS
        return ids

    return {"prompt": text(0), "evict0": text(5), "evict1": text(11)}


@pytest.mark.vllm
def test_evicted_prompt_comes_back_from_lmcache(model_dir, prompts, tmp_path: pathlib.Path):
    r = lmcache_backend.bench_ttft(model_dir, prompts["prompt"], [prompts["evict0"], prompts["evict1"]],
                                   tmp_path, cpu_cores="0", kv_blocks=72, other_worker=True)
    chunked = PROMPT_TOKENS // 256 * 256
    assert r.prompt_tokens == PROMPT_TOKENS
    assert r.hit_local_tokens == 0, "the evicting prompts did not evict the prompt from the engine"
    assert r.hit_lmcache_tokens == chunked, r
    assert r.hit_computed_tokens == PROMPT_TOKENS - chunked, r
    assert r.same_output, r
    assert r.hit_ttft_s < r.recompute_ttft_s, r
    assert r.stored_bytes > 0
    assert r.other_worker_lmcache_tokens == chunked, r


@pytest.mark.vllm
def test_up_starts_and_stops_the_lmcache_server(model_dir, tmp_path: pathlib.Path):
    """`llm-mesh up --kv-offload lmcache`: the server is up before the worker, the worker's
    connector stores a long prompt's chunks in it, and SIGTERM to `up` stops it (by pid)."""
    import re
    import signal

    import httpx

    from services.procs import Child, free_port_pair

    gateway, lmcache_port = free_port(), free_port_pair()
    up = Child.llm_mesh("up", [
        "up", "--kv-offload", "lmcache", "--lmcache-port", str(lmcache_port), "--gateway-port", str(gateway),
        "--scheduler-port", str(free_port()), "--worker-base-port", str(free_port()),
        "--etcd-port", str(free_port_pair()), "--run-dir", str(tmp_path / "run")], tmp_path, env={"COLUMNS": "200"})
    up.start()
    try:
        up.wait_ready(lambda: "llm-mesh is up" in up.log_path.read_text(), 400, interval=0.5)
        pid = int(re.search(r"lmcache\s+tcp://\S+\s+\(pid (\d+)\)", up.log_path.read_text())[1])
        server = LMCacheServer(LMCacheServerSettings(port=lmcache_port, http_port=lmcache_port + 1), tmp_path / "x")
        assert server.healthy() and server.stored_chunks() == 0
        words = "river mountain lantern orbit copper violet harbor meadow signal quartz".split()
        prompt = " ".join(words[(i * 7) % 10] for i in range(700))  # > 2 chunks of 256 tokens
        r = httpx.post(f"http://127.0.0.1:{gateway}/v1/completions", timeout=120,
                       json={"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 30
        while server.stored_chunks() < 2:
            assert time.monotonic() < deadline, "the worker stored nothing in the lmcache server up started"
            time.sleep(0.2)
        up.signal(signal.SIGTERM)
        up.process.wait(120)
        assert up.process.returncode == 0, up.tail()
        assert re.search(r"stopped lmcache \(exit", up.log_path.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not server.healthy() and port_free(lmcache_port)
        assert not server.settings.shm_path.exists()
    finally:
        up.stop()
