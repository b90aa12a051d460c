"""Live mode of `llm-mesh bench routing`: the same workload through real processes.

Per policy, a fresh mesh: `--workers` sim worker processes (wall-clock
latencies) and one scheduler process running that policy, on one real etcd
that all policies share. The client replays the workload over the public gRPC
`Inference.Generate` (token ids in, so prompts are exactly the trace's), each
request sent at its arrival time. So everything a real deployment pays is in
the numbers: gRPC hops, the KV-event stream's delay, etcd membership, the
scheduler's decision time under load.

Time compression (`--speedup K`): arrivals come K times faster and every sim
latency is K times shorter, so the cluster sits at the same operating point in
1/K of the wall time. The report gives latencies back in trace time (measured
× K): the router's own overhead therefore counts K times over, which makes
the live numbers a conservative view of the router. The mesh's own clocks are
compressed alike, so the scheduler sees the cluster as a real deployment sees
its own: the load poll interval and the KV-event send interval are divided by
K, and so is each time constant of the policy's profile (`compress_time`: a
step overhead, window or TTL divided by K, a default speed multiplied by K).
Left at their trace-time values, the profile constants alone made `ours` and
mooncake misjudge the cluster: simulated with them uncompressed (first 1,000
trace requests at ×1.5, K = 4), ours 4.34 → 4.83 s p90 TTFT, mooncake
6.89 → 5.93 s.

Caches start empty for every policy (fresh workers), as in sim mode.

Each run is checked against the simulator (services/bench/agreement.py): its own worker choices,
replayed in simulated time, with the per-request TTFT error in the report
(`sim_with_these_choices`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import yaml

from scheduler.policies import POLICY_NAMES, policy_spec
from services.bench.agreement import replay_choices
from services.bench.des import ClusterSpec, RequestResult, summarize
from services.bench.workload import WorkloadRequest, prompt_tokens
from services.etcd_server import EtcdServer
from services.kv_event_log import DEFAULT_SEND_INTERVAL_S
from services.procs import Child, free_port, grpc_serving
from services.worker_pool import DEFAULT_POLL_INTERVAL_S

READY_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class LiveOptions:
    speedup: float = 1.0
    # Streams in flight at once; arrivals beyond it wait (and their TTFT grows):
    # bounds the client's own memory, never reached at sane loads.
    max_in_flight: int = 2048
    log_dir: pathlib.Path | None = None
    load_poll_s: float = DEFAULT_POLL_INTERVAL_S  # the scheduler's GetLoad interval, in trace time
    # The scheduler's time per decision, wall clock (a burst's spacing): for the simulator's
    # replay of each run's choices (services/bench/agreement.py), where it is K times longer.
    decision_s: float = 0.002


def worker_argv(spec: ClusterSpec, speedup: float) -> list[str]:
    """A sim worker shaped like one engine of `spec`, its latencies divided by `speedup`."""
    lat = spec.latency
    return ["--engine", "sim", "--block-size", str(spec.block_size), "--max-num-seqs", str(spec.max_num_seqs),
            "--max-model-len", str(spec.max_model_len), "--sim-num-blocks", str(spec.num_blocks),
            # One step may prefill a whole prompt, as in sim mode (des.simulate).
            "--sim-max-prefill-tokens", str(spec.max_model_len), "--sim-eos-probability", "0",
            "--sim-prefill-per-token", repr(lat.prefill_per_token_s / speedup),
            "--sim-step-overhead", repr(lat.step_overhead_s / speedup),
            "--sim-itl", repr(lat.itl_s / speedup), "--sim-batch-slowdown", repr(lat.batch_slowdown),
            "--kv-events-interval", repr(DEFAULT_SEND_INTERVAL_S / speedup)]


def compress_time(spec: Any, speedup: float, key: str = "") -> Any:
    """A policy profile (scheduler.policies.policy_spec) for a cluster `speedup` times faster:
    every duration (a key ending in `_s`) divided by it, every rate (ending in `_per_s`: a number,
    or a mapping of numbers such as per-tier speeds) multiplied by it; the rest unchanged."""
    if isinstance(spec, Mapping):
        if key.endswith("_per_s"):
            return {k: v * speedup if _number(v) else v for k, v in spec.items()}
        return {k: compress_time(v, speedup, k) for k, v in spec.items()}
    if isinstance(spec, list):
        return [compress_time(v, speedup) for v in spec]
    if _number(spec):
        if key.endswith("_per_s"):
            return spec * speedup
        if key.endswith("_s"):
            return spec / speedup
    return spec


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def profile_spec(source: str) -> dict[str, Any]:
    """The profile mapping of a --policies source (services/bench/routing.policy_sources): a built-in
    policy's name, or else a profile file."""
    if source in POLICY_NAMES:
        return policy_spec(source)
    return yaml.safe_load(pathlib.Path(source).read_text())


@contextlib.contextmanager
def live_mesh(etcd: str, policy: str, profile: Mapping[str, Any], spec: ClusterSpec, speedup: float,
              log_dir: pathlib.Path, load_poll_s: float = DEFAULT_POLL_INTERVAL_S) -> Iterator[str]:
    """Sim workers and a scheduler running `profile` (reported as `policy`), which polls their load
    every `load_poll_s` of trace time; yields the scheduler's address. Stops them by pid."""
    children: list[Child] = []
    try:
        addresses = []
        for _ in range(spec.workers):
            port = free_port()
            child = Child.llm_mesh(f"{policy}-worker-{port}", ["worker", "--port", str(port), "--etcd", etcd,
                                                               *worker_argv(spec, speedup)], log_dir)
            child.start()
            children.append(child)
            addresses.append(f"127.0.0.1:{port}")
        for child, address in zip(children, addresses):
            child.wait_ready(lambda a=address: grpc_serving(a), READY_TIMEOUT_S)
        port = free_port()
        compressed = log_dir / f"{policy}-profile.yaml"  # its constants for the compressed cluster
        log_dir.mkdir(parents=True, exist_ok=True)
        compressed.write_text(yaml.safe_dump(compress_time(profile, speedup), sort_keys=False))
        scheduler = Child.llm_mesh(f"{policy}-scheduler", ["scheduler", "--port", str(port), "--etcd", etcd,
                                                           "--profile", str(compressed),
                                                           "--load-poll-interval", repr(load_poll_s / speedup)],
                                   log_dir)
        scheduler.start()
        children.append(scheduler)
        address = f"127.0.0.1:{port}"
        scheduler.wait_ready(lambda: grpc_serving(address), READY_TIMEOUT_S)
        yield address
    finally:
        for child in reversed(children):
            child.stop()


async def wait_for_workers(address: str, count: int, timeout_s: float = 30.0) -> None:
    """Until the scheduler sees all `count` workers (etcd watch) and their KV streams are up."""
    from llm_mesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        while True:
            reply = await stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
            if len(reply.workers) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"scheduler sees {len(reply.workers)} of {count} workers")
            await asyncio.sleep(0.2)


async def replay(address: str, requests: list[WorkloadRequest], prompts: list[list[int]], model: str,
                 options: LiveOptions) -> tuple[list[RequestResult], float, int, list[float]]:
    """Send every request at its (compressed) arrival time; returns (results in trace time, duration in
    trace time, failed count, every inter-token gap in trace time). A failed request keeps finish_s
    None: it counts against the policy. Tokens that arrive in one message (a slow reader gets a
    backlog as one delta) count as gaps of 0 after the first."""
    from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2

    k = options.speedup
    results = [RequestResult(r.arrival_s, "", r.input_tokens, r.output_tokens) for r in requests]
    failures = 0
    gaps: list[float] = []
    gate = asyncio.Semaphore(options.max_in_flight)
    t0_trace = requests[0].arrival_s
    options_ = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(address, options=options_) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        start = time.monotonic()

        def trace_now() -> float:  # wall clock mapped to trace time
            return t0_trace + (time.monotonic() - start) * k

        async def one(i: int) -> None:
            nonlocal failures
            r, out = requests[i], results[i]
            async with gate:
                request = inference_pb2.GenerateRequest(
                    model=model, token_ids=inference_pb2.TokenIds(ids=prompts[i]),
                    session_id=r.session_id,
                    sampling=sampling_pb2.SamplingParams(max_tokens=r.output_tokens, temperature=0,
                                                         ignore_eos=True))
                last = None
                try:
                    async for response in stub.Generate(request):
                        if response.token_ids:
                            now = trace_now()
                            if last is not None:
                                gaps.append(now - last)
                            gaps.extend([0.0] * (len(response.token_ids) - 1))
                            last = now
                        if out.first_token_s is None and response.token_ids:
                            out.first_token_s = last
                            out.worker = response.worker_id
                        if response.HasField("usage"):
                            out.cached_tokens = response.usage.cached_prompt_tokens
                    out.finish_s = trace_now()
                except grpc.aio.AioRpcError:
                    failures += 1
                    out.first_token_s = out.finish_s = None

        tasks = []
        for i, r in enumerate(requests):
            delay = (r.arrival_s - t0_trace) / k - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = (time.monotonic() - start) * k
    return results, duration, failures, gaps


def run_live(requests: list[WorkloadRequest], policies: dict[str, str], spec: ClusterSpec, *, slo_ttft_s: float,
             options: LiveOptions, model: str, progress: Callable[[str], None] = print) -> dict[str, dict]:
    """Each policy on its own fresh live mesh, the same requests; summaries as in sim mode."""
    prompts = [prompt_tokens(r) for r in requests]
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="llm-mesh-live-") as tmp:
        log_dir = options.log_dir or pathlib.Path(tmp) / "logs"
        etcd_server = EtcdServer(pathlib.Path(tmp) / "etcd", free_port(), free_port(), log_path=log_dir / "etcd.log")
        etcd_server.start()
        try:
            for name, source in policies.items():
                t0 = time.perf_counter()
                with live_mesh(etcd_server.endpoint, name, profile_spec(source), spec, options.speedup,
                               log_dir, options.load_poll_s) as address:
                    asyncio.run(wait_for_workers(address, spec.workers))
                    started = time.perf_counter()
                    results, duration, failures, gaps = asyncio.run(
                        replay(address, requests, prompts, model, options))
                    replay_wall = time.perf_counter() - started
                summary = summarize(results, slo_ttft_s, duration, gaps)
                check = replay_choices(requests, results, spec, decision_s=options.decision_s * options.speedup,
                                       load_poll_s=options.load_poll_s)
                summary |= {"ttfts": sorted(r.ttft for r in results), "failed": failures,
                            "wall_s": time.perf_counter() - t0, "replay_wall_s": replay_wall,
                            "sim_with_these_choices": check}
                out[name] = summary
                progress(f"  {name:<13} done in {summary['wall_s']:.1f}s wall "
                         f"(p90 TTFT {summary['ttft_p90_s']:.3f}s, hit {summary['hit_rate']:.3f}, "
                         f"{failures} failed)")
                progress(f"  {'':<13} simulated with the same choices: p90 TTFT {check['ttft_p90_s']:.3f}s, hit "
                         f"{check['hit_rate']:.3f}; per request sim - live {check['ttft_error_mean_s']:+.3f}s "
                         f"mean, |error| p90 {check['ttft_error_abs_p90_s']:.3f}s")
        finally:
            etcd_server.stop()
    return out
