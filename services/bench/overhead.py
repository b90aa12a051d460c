"""`llm-mesh bench overhead`: what the mesh adds on top of the engine.

Runs the same prompts, greedily and one at a time, (1) straight into an
in-process vLLM engine with the worker's settings, then (2) through a real
`llm-mesh up` (gateway → scheduler → worker, SSE streaming) and (3) through the
scheduler's gRPC Generate, and reports TTFT and ITL for each and the ratios.
The phases run one after another so they never compete for the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import tempfile
import time

import grpc
import httpx

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three uses of etcd.",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=12, help="requests per path")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-results/overhead.json"))


def summarize(samples: list[tuple[float, list[float]]]) -> dict[str, float]:
    ttfts = [t for t, _ in samples]
    itls = [gap for _, gaps in samples for gap in gaps]
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_mean_ms": statistics.fmean(ttfts) * 1e3,
        "itl_p50_ms": statistics.median(itls) * 1e3,
        "itl_mean_ms": statistics.fmean(itls) * 1e3,
        "requests": len(samples),
    }


def _timed(start: float, arrivals: list[float]) -> tuple[float, list[float]]:
    return arrivals[0] - start, [b - a for a, b in zip(arrivals, arrivals[1:])]


async def engine_direct(model_dir: str, model: str, n: int, max_tokens: int) -> list[tuple[float, list[float]]]:
    from services.engines.base import EngineRequest, SamplingOptions
    from services.engines.vllm_engine import VllmEngine, VllmSettings
    from services.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer(model_dir)
    engine = VllmEngine(VllmSettings(model_dir=model_dir, model_name=model))
    await engine.start()
    samples = []
    try:
        for i in range(n):
            ids = tokenizer.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
            request = EngineRequest(f"direct-{i}", ids, SamplingOptions(max_tokens=max_tokens, temperature=0))
            start, arrivals = time.perf_counter(), []
            async for out in engine.generate(request):
                if out.token_ids:
                    arrivals.append(time.perf_counter())
            samples.append(_timed(start, arrivals))
    finally:
        await engine.stop()
    return samples


def through_gateway(url: str, model: str, n: int, max_tokens: int) -> list[tuple[float, list[float]]]:
    samples = []
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True}
            start, arrivals = time.perf_counter(), []
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            arrivals.append(time.perf_counter())
            samples.append(_timed(start, arrivals))
    return samples


async def through_grpc(address: str, model: str, n: int, max_tokens: int) -> list[tuple[float, list[float]]]:
    samples = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for i in range(n):
            request = inference_pb2.GenerateRequest(
                model=model, messages=inference_pb2.ChatMessages(
                    messages=[inference_pb2.ChatMessage(role="user", content=PROMPTS[i % len(PROMPTS)])]),
                sampling=sampling_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))
            start, arrivals = time.perf_counter(), []
            async for response in stub.Generate(request):
                if response.token_ids:
                    arrivals.append(time.perf_counter())
            samples.append(_timed(start, arrivals))
    return samples


def run(args: argparse.Namespace) -> int:
    from services.model_fetch import DEFAULT_MODEL_NAME, ensure_model
    from services.procs import Child, free_port, free_port_pair

    model_dir = str(ensure_model())
    model = DEFAULT_MODEL_NAME
    n = args.requests + 1  # the first request of each path warms up and is dropped
    print(f"[1/3] vLLM engine in-process, {args.requests} requests …", flush=True)
    direct = asyncio.run(engine_direct(model_dir, model, n, args.max_tokens))[1:]

    with tempfile.TemporaryDirectory() as tmp:
        gateway_port, scheduler_port, worker_port, etcd_port = free_port(), free_port(), free_port(), free_port_pair()
        up = Child.llm_mesh("up", ["up", "--gateway-port", str(gateway_port), "--scheduler-port", str(scheduler_port),
                                   "--worker-base-port", str(worker_port), "--etcd-port", str(etcd_port),
                                   "--run-dir", tmp], pathlib.Path(tmp))
        up.start()
        try:
            up.wait_ready(lambda: "llm-mesh is up" in up.log_path.read_text(), 400, interval=0.5)
            print(f"[2/3] through the gateway (REST, SSE), {args.requests} requests …", flush=True)
            gateway = through_gateway(f"http://127.0.0.1:{gateway_port}", model, n, args.max_tokens)[1:]
            print(f"[3/3] through the scheduler (gRPC Generate), {args.requests} requests …", flush=True)
            grpc_path = asyncio.run(through_grpc(f"127.0.0.1:{scheduler_port}", model, n, args.max_tokens))[1:]
        finally:
            up.stop()

    results = {"engine_direct": summarize(direct), "gateway_rest": summarize(gateway),
               "scheduler_grpc": summarize(grpc_path), "max_tokens": args.max_tokens}
    base = results["engine_direct"]
    print(f"\n{'path':<16}{'TTFT p50 ms':>13}{'TTFT mean ms':>14}{'ITL p50 ms':>12}{'ITL mean ms':>13}"
          f"{'TTFT ×':>9}{'ITL ×':>8}")
    for name in ("engine_direct", "scheduler_grpc", "gateway_rest"):
        r = results[name]
        r["ttft_ratio"] = r["ttft_p50_ms"] / base["ttft_p50_ms"]
        r["itl_ratio"] = r["itl_p50_ms"] / base["itl_p50_ms"]
        print(f"{name:<16}{r['ttft_p50_ms']:>13.1f}{r['ttft_mean_ms']:>14.1f}{r['itl_p50_ms']:>12.2f}"
              f"{r['itl_mean_ms']:>13.2f}{r['ttft_ratio']:>9.2f}{r['itl_ratio']:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0
