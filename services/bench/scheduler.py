"""`llm-mesh bench scheduler`: what one scheduler replica costs and sustains.

Four measurements, one run, each against its target (docs: issue 3, item 7):

1. decide   — routing-decision latency (p50/p99/max) of `ours` and every peer
              policy, 64 workers and 1,000,000 indexed blocks, prompts of 128,
              1,024 and ~3,400 blocks (a ~220 KB prompt at 16 tokens/block).
              Target: p99 <= 1 ms.
2. tokenize — a 220 KB prompt through the real model tokenizer, then the
              vLLM-exact block hashing (RequestView.from_tokens: sha256 over
              CBOR per block), p50 of a few runs. Target: <= 50 ms together.
3. ingest   — KV events/s into a BlockIndex: pure apply of decoded events, and
              through a real gRPC WatchKVEvents stream (KVEventLog server →
              KVEventSubscriber). Target: >= 100,000 events/s.
4. rps      — requests/s of ONE real scheduler process with zero-latency `sim`
              worker processes on a real etcd, driven by several client
              processes, each with many concurrent gRPC Generate streams
              (token_ids input, so tokenization is not measured; max_tokens=1).
              `--worker-calls stream,unary` measures the scheduler's two ways of
              calling workers in a row. Target: >= 1,000 requests/s.

Every process started here is stopped by its pid, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

SECTIONS = ("decide", "tokenize", "ingest", "rps")
TARGETS = {
    "decide_p99_ms": 1.0,
    "tokenize_hash_ms": 50.0,
    "ingest_events_per_s": 100_000.0,
    "requests_per_s": 1_000.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (of {','.join(SECTIONS)})")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-results/scheduler.json"))
    parser.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("decide")
    g.add_argument("--workers", type=int, default=64)
    g.add_argument("--blocks", type=int, default=1_000_000, help="distinct block hashes in the index")
    g.add_argument("--prompt-blocks", default="128,1024,3400", help="comma-separated prompt sizes, in blocks")
    g.add_argument("--decisions", type=int, default=1000, help="decisions per policy and size (a third above 2k blocks)")
    g.add_argument("--policies", default=None, help="comma-separated (default: every policy)")
    g = parser.add_argument_group("tokenize")
    g.add_argument("--prompt-kb", type=float, default=220.0)
    g.add_argument("--tokenize-runs", type=int, default=5)
    g.add_argument("--hash-block-size", type=int, default=32, help="tokens per block (the worker's default)")
    g = parser.add_argument_group("ingest")
    g.add_argument("--events", type=int, default=200_000)
    g = parser.add_argument_group("rps")
    g.add_argument("--sim-workers", type=int, default=2)
    g.add_argument("--clients", type=int, default=2, help="client processes")
    g.add_argument("--concurrency", type=int, default=32,
                   help="concurrent Generate streams per client process. The default keeps the 2 x 32 in flight "
                        "within the 2 sim workers' admission capacity (2 x ceil(32 x 1.5) = 96): past it the "
                        "surplus is refused (RESOURCE_EXHAUSTED), which measures admission, not routing")
    g.add_argument("--duration", type=float, default=15.0, help="measured seconds (after --warmup)")
    g.add_argument("--warmup", type=float, default=2.0)
    g.add_argument("--prompt-tokens", type=int, default=256, help="token_ids per request")
    g.add_argument("--worker-calls", default="stream",
                   help="comma-separated: stream (the default: one GenerateStream per worker), unary "
                        "(a Worker.Generate call per request); several run in a row, the first is the result")


# ---- helpers ------------------------------------------------------------------------------


def _pct(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _lat_summary(seconds: list[float]) -> dict[str, float]:
    s = sorted(seconds)
    return {"p50_ms": _pct(s, 0.5) * 1e3, "p99_ms": _pct(s, 0.99) * 1e3, "max_ms": s[-1] * 1e3, "n": len(s)}


# ---- 1. routing decision latency ----------------------------------------------------------


def build_index(num_workers: int, num_blocks: int, rng: random.Random):
    """An index of ~num_blocks distinct hashes held by 1–3 of num_workers each, in chains
    of 32–256 blocks that often share a head with an earlier chain (multi-tenant prefixes)."""
    from scheduler.index import BlockIndex

    index = BlockIndex()
    chains: list[list[int]] = []
    while index.num_keys < num_blocks:
        length = rng.choice([32, 64, 128, 256])
        chain = [rng.getrandbits(64) for _ in range(length)]
        if chains and rng.random() < 0.5:
            base = rng.choice(chains)
            k = rng.randrange(1, len(base))
            chain = base[:k] + chain[: length - k]
        for h in rng.sample(range(num_workers), rng.choice([1, 1, 2, 3])):
            index.stored(f"w{h}", "m", chain)
        chains.append(chain)
    return index, chains


def bench_decide(args: argparse.Namespace) -> dict:
    from scheduler.framework import RequestView, WorkerState
    from scheduler.policies import POLICY_NAMES, policy_by_name

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    index, chains = build_index(args.workers, args.blocks, rng)
    built_s = time.perf_counter() - t0
    print(f"  index: {index.num_keys:,} keys, {len(index):,} entries, built in {built_s:.1f}s", flush=True)
    workers = [WorkerState(f"w{i}", "m", 32, kv_blocks_total=8192, reported_running=rng.randrange(32),
                           reported_waiting=rng.randrange(4), kv_cache_usage=rng.random())
               for i in range(args.workers)]
    policies = args.policies.split(",") if args.policies else list(POLICY_NAMES)
    sizes = [int(x) for x in args.prompt_blocks.split(",")]
    block_size = 16  # ~3,400 blocks of 16 tokens ≈ a 220 KB prompt
    rows = []
    for nblocks in sizes:
        count = args.decisions if nblocks < 2000 else max(1, args.decisions // 3)
        views = []
        for _ in range(count):
            chain = rng.choice(chains)
            k = rng.randrange(0, min(len(chain), nblocks) + 1)  # a cached head of k blocks, then new ones
            hashes = chain[:k] + [rng.getrandbits(64) for _ in range(nblocks - k)]
            views.append(RequestView("m", nblocks * block_size + 5, hashes, block_size,
                                     session_id=f"s{rng.randrange(1000)}"))
        for name in policies:
            policy = policy_by_name(name, seed=args.seed)
            policy.decide(views[0], workers, index)  # warm up
            lat, cpu = [], []
            gc.disable()
            try:
                for view in views:
                    c, t = time.thread_time(), time.perf_counter()
                    policy.decide(view, workers, index)
                    lat.append(time.perf_counter() - t)
                    cpu.append(time.thread_time() - c)
            finally:
                gc.enable()
            # The target is on wall time. CPU time beside it tells the code's cost from the time a
            # shared machine takes the core away (steal, preemption) in the same decisions.
            cpu_summary = _lat_summary(cpu)
            row = {"policy": name, "prompt_blocks": nblocks, **_lat_summary(lat),
                   "cpu_p50_ms": cpu_summary["p50_ms"], "cpu_p99_ms": cpu_summary["p99_ms"]}
            rows.append(row)
            print(f"  {nblocks:5d} blocks  {name:13s} p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
                  f"max {row['max_ms']:.2f} ms  (CPU p99 {row['cpu_p99_ms']:.3f} ms)", flush=True)
    worst = max(rows, key=lambda r: r["p99_ms"])
    ours = [r for r in rows if r["policy"] == "ours"]
    ours_p99 = max((r["p99_ms"] for r in ours), default=float("nan"))
    return {"workers": args.workers, "index_keys": index.num_keys, "index_entries": len(index),
            "index_build_s": built_s, "block_size": block_size, "rows": rows,
            "ours_worst_p99_ms": ours_p99, "all_worst_p99_ms": worst["p99_ms"],
            "all_worst": f"{worst['policy']}@{worst['prompt_blocks']}"}


# ---- 2. tokenize + hash a 220 KB prompt ---------------------------------------------------


def make_prompt(kb: float, rng: random.Random) -> str:
    """~kb KB of English-like text: varied words and punctuation, no long exact repeats."""
    words = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
             "have an they you were her she there been one all we their has would when if so no will more "
             "cache scheduler worker token prefix block routing latency request model memory engine index "
             "distributed inference mesh replica event stream policy score hash prompt decode prefill").split()
    target = int(kb * 1024)
    parts, size = [], 0
    while size < target:
        n = rng.randrange(6, 20)
        sentence = " ".join(rng.choice(words) for _ in range(n)).capitalize() + rng.choice([". ", "? ", "! ", ".\n"])
        if rng.random() < 0.1:
            sentence += f"Item {rng.randrange(10**6)}: "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:target]


def bench_tokenize(args: argparse.Namespace) -> dict:
    from scheduler.framework import RequestView
    from services.model_fetch import default_model_dir, ensure_model
    from services.tokenizer import ModelTokenizer

    tokenizer = ModelTokenizer(ensure_model(default_model_dir()))
    text = make_prompt(args.prompt_kb, random.Random(args.seed))
    tok_s, hash_s, total_s = [], [], []
    ids: list[int] = []
    view = None
    tokenizer.encode(text[:1000])  # warm up
    for _ in range(max(1, args.tokenize_runs)):
        t0 = time.perf_counter()
        ids = tokenizer.encode(text)
        t1 = time.perf_counter()
        view = RequestView.from_tokens("m", ids, args.hash_block_size)
        t2 = time.perf_counter()
        tok_s.append(t1 - t0)
        hash_s.append(t2 - t1)
        total_s.append(t2 - t0)
    assert view is not None
    out = {"prompt_bytes": len(text.encode()), "tokens": len(ids), "blocks": len(view.block_hashes),
           "block_size": args.hash_block_size, "runs": len(total_s),
           "tokenize_p50_ms": statistics.median(tok_s) * 1e3,
           "hash_p50_ms": statistics.median(hash_s) * 1e3,
           "total_p50_ms": statistics.median(total_s) * 1e3}
    out["hash_us_per_block"] = out["hash_p50_ms"] * 1e3 / max(1, out["blocks"])
    out["dominant"] = "hash" if out["hash_p50_ms"] > out["tokenize_p50_ms"] else "tokenize"
    print(f"  {out['prompt_bytes']:,} B → {out['tokens']:,} tokens → {out['blocks']:,} blocks: tokenize "
          f"{out['tokenize_p50_ms']:.1f} ms, hash {out['hash_p50_ms']:.1f} ms "
          f"({out['hash_us_per_block']:.1f} µs/block), total {out['total_p50_ms']:.1f} ms", flush=True)
    return out


# ---- 3. KV event ingest ---------------------------------------------------------------------


def _fill_log(log, n: int, rng: random.Random) -> None:
    """n events, ~55 % stored (one block each) and ~45 % removed, at most 50k live blocks."""
    from services.engines.base import BlockRemoved, BlockStored

    live: list[int] = []
    while log.seq < n:
        if len(live) > 50_000 or (live and rng.random() < 0.45):
            log.append([BlockRemoved((live.pop(rng.randrange(len(live))),))])
        else:
            h = rng.getrandbits(64)
            live.append(h)
            log.append([BlockStored((h,), None, (), 32)])


async def _ingest(n: int, seed: int) -> dict:
    import grpc

    from llm_mesh.v1 import membership_pb2, worker_pb2, worker_pb2_grpc
    from scheduler.index import BlockIndex
    from services.grpc_util import CHANNEL_OPTIONS
    from services.kv_event_log import KVEventLog
    from services.kv_events import KVEventSubscriber, WorkerFeed

    log = KVEventLog(capacity=n + 10)
    t = time.perf_counter()
    _fill_log(log, n, random.Random(seed))
    append_s = time.perf_counter() - t
    events = log.read(0, limit=n)
    assert events is not None and len(events) == n

    # (a) pure apply: decoded protos → index, in batches of 512 as a stream delivers them
    index = BlockIndex()
    sub = KVEventSubscriber(None, index)  # type: ignore[arg-type]
    feed = WorkerFeed("w", "-", "m", epoch="e")
    t = time.perf_counter()
    for i in range(0, n, 512):
        sub._apply(feed, worker_pb2.KVEventBatch(epoch="e", seq=min(n, i + 512), events=events[i:i + 512]))
    apply_s = time.perf_counter() - t
    assert feed.seq == n

    # (b) a real WatchKVEvents stream replaying the whole ring from seq 0
    class Servicer(worker_pb2_grpc.WorkerServicer):
        async def WatchKVEvents(self, request, context):
            async for batch in log.watch(request, 60):
                yield batch

    class Members:
        def __init__(self, address: str) -> None:
            self.members = {"w": membership_pb2.Member(id="w", address=address,
                                                       worker=membership_pb2.WorkerInfo(model="m"))}

        def add_listener(self, listener) -> None:
            pass

    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    index2 = BlockIndex()
    sub2 = KVEventSubscriber(Members(f"127.0.0.1:{port}"), index2, idle_timeout_s=60)
    try:
        await sub2.start()
        f = sub2.feeds["w"]
        f.epoch, f.seq = log.epoch, 0  # before the follow task first runs: a pure replay of n events
        t = time.perf_counter()
        deadline = t + 120
        while f.seq < n and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)
        grpc_s = time.perf_counter() - t
        if f.seq < n:
            raise RuntimeError(f"gRPC ingest stalled at {f.seq}/{n} events")
    finally:
        await sub2.stop()
        await server.stop(None)
    return {"events": n, "log_append_per_s": n / append_s, "apply_per_s": n / apply_s,
            "grpc_per_s": n / grpc_s, "grpc_messages": f.batches, "index_entries": len(index2),
            "apply_index_entries": len(index)}


def bench_ingest(args: argparse.Namespace) -> dict:
    out = asyncio.run(_ingest(args.events, args.seed))
    print(f"  {out['events']:,} events: pure apply {out['apply_per_s']:,.0f}/s, gRPC stream+decode+apply "
          f"{out['grpc_per_s']:,.0f}/s ({out['grpc_messages']} messages); log.append {out['log_append_per_s']:,.0f}/s",
          flush=True)
    return out


# ---- 4. requests/s through one real scheduler process --------------------------------------


def _client_main(address: str, model: str, concurrency: int, warmup: float, duration: float,
                 prompt_tokens: int, vocab: int, seed: int, start_at: float, result_queue) -> None:
    """One client process: `concurrency` coroutines, each looping Generate(max_tokens=1)."""
    result_queue.put(asyncio.run(_client(address, model, concurrency, warmup, duration, prompt_tokens, vocab,
                                         seed, start_at)))


async def _client(address: str, model: str, concurrency: int, warmup: float, duration: float,
                  prompt_tokens: int, vocab: int, seed: int, start_at: float) -> dict:
    import grpc

    from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2
    from services.grpc_util import CHANNEL_OPTIONS

    rng = random.Random(seed)
    # 32 shared system prompts of half the length + a unique tail: realistic prefix reuse. A tail
    # is a slice at a random offset of one long random sequence: as unique as drawing its tokens
    # one by one, which cost the client ~50 µs per request of the CPU it shares with the scheduler.
    tail_len = prompt_tokens - prompt_tokens // 2
    heads = [[rng.randrange(1, vocab) for _ in range(prompt_tokens // 2)] for _ in range(32)]
    tails = [rng.randrange(1, vocab) for _ in range(1 << 18)]
    while time.time() < start_at:
        await asyncio.sleep(0.01)
    t_measure = time.perf_counter() + warmup
    t_end = t_measure + duration
    cpu_at_measure: float | None = None
    lat: list[float] = []
    done = errors = 0
    error_kinds: dict[str, int] = {}

    async def loop(stub) -> None:
        nonlocal done, errors, cpu_at_measure
        while True:
            now = time.perf_counter()
            if now >= t_end:
                return
            if cpu_at_measure is None and now >= t_measure:
                cpu_at_measure = time.process_time()
            at = rng.randrange(len(tails) - tail_len)
            ids = rng.choice(heads) + tails[at:at + tail_len]
            request = inference_pb2.GenerateRequest(model=model, token_ids=inference_pb2.TokenIds(ids=ids),
                                                    sampling=sampling_pb2.SamplingParams(max_tokens=1))
            t = time.perf_counter()
            try:
                async for _ in stub.Generate(request, timeout=30):
                    pass
            except grpc.aio.AioRpcError as exc:
                if t >= t_measure:
                    errors += 1
                    error_kinds[exc.code().name] = error_kinds.get(exc.code().name, 0) + 1
                continue
            end = time.perf_counter()
            if t >= t_measure and end <= t_end:
                done += 1
                lat.append(end - t)

    # A few channels per process so one HTTP/2 connection is not the limit.
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(4)]
    try:
        stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
        await asyncio.gather(*(loop(stubs[i % len(stubs)]) for i in range(concurrency)))
        cpu_s = time.process_time() - (cpu_at_measure or 0.0)
    finally:
        for c in channels:
            await c.close()
    return {"done": done, "errors": errors, "error_kinds": error_kinds, "latencies": lat, "cpu_s": cpu_s}


def _cpu_seconds(pid: int) -> float:
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def bench_rps(args: argparse.Namespace) -> dict:
    """One run per --worker-calls mode, in a row; the first is the result, the others beside it."""
    modes = [m.strip() for m in args.worker_calls.split(",") if m.strip()]
    if not modes or any(m not in WORKER_CALLS for m in modes):
        raise SystemExit(f"--worker-calls: comma-separated {'/'.join(WORKER_CALLS)}, got {args.worker_calls!r}")
    runs = {}
    for mode in modes:
        print(f"  worker calls: {mode} ({WORKER_CALLS[mode]})", flush=True)
        runs[mode] = _rps_run(args, mode)
    out = dict(runs[modes[0]])
    if len(runs) > 1:
        out["by_worker_calls"] = runs
    return out


# How the scheduler calls the workers (scheduler --no-worker-stream selects the second).
WORKER_CALLS = {"stream": "one Worker.GenerateStream per worker, requests multiplexed on it",
                "unary": "one Worker.Generate call per request"}


def _rps_run(args: argparse.Namespace, worker_calls: str) -> dict:
    from services.etcd_server import EtcdServer
    from services.model_fetch import DEFAULT_MODEL_NAME, default_model_dir, ensure_model
    from services.procs import Child, free_port, grpc_serving
    from services.tokenizer import ModelTokenizer

    model_dir = ensure_model(default_model_dir())
    vocab = ModelTokenizer(model_dir).vocab_size
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="llm-mesh-bench-scheduler-"))
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    children: list[Child] = []
    ctx = multiprocessing.get_context("spawn")
    clients: list = []
    try:
        etcd.start()
        sim = ["--engine", "sim", "--sim-itl", "0", "--sim-prefill-per-token", "0", "--sim-step-overhead", "0"]
        for _ in range(args.sim_workers):
            port = free_port()
            child = Child.llm_mesh(f"worker-{port}", ["worker", "--port", str(port), "--etcd", etcd.endpoint, *sim],
                                   tmp)
            child.start()
            children.append(child)
            child.wait_ready(lambda a=f"127.0.0.1:{port}": grpc_serving(a), 60)
        port = free_port()
        address = f"127.0.0.1:{port}"
        scheduler = Child.llm_mesh("scheduler", ["scheduler", "--port", str(port), "--etcd", etcd.endpoint,
                                                 "--model", f"{DEFAULT_MODEL_NAME}={model_dir}",
                                                 *(["--no-worker-stream"] if worker_calls == "unary" else [])], tmp)
        scheduler.start()
        children.append(scheduler)
        scheduler.wait_ready(lambda: grpc_serving(address), 60)
        _wait_routable(address, DEFAULT_MODEL_NAME, vocab)

        queue = ctx.Queue()
        start_at = time.time() + 3.0  # every client starts together, after its imports
        for i in range(args.clients):
            p = ctx.Process(target=_client_main, args=(address, DEFAULT_MODEL_NAME, args.concurrency, args.warmup,
                                                       args.duration, args.prompt_tokens, vocab, args.seed + i,
                                                       start_at, queue), daemon=True)
            p.start()
            clients.append(p)
        while time.time() < start_at + args.warmup:
            time.sleep(0.01)
        workers = children[:-1]
        cpu0, w0 = _cpu_seconds(scheduler.pid), time.perf_counter()
        workers_cpu0 = sum(_cpu_seconds(w.pid) for w in workers)
        results = [queue.get(timeout=args.warmup + args.duration + 120) for _ in clients]
        cpu_s = _cpu_seconds(scheduler.pid) - cpu0
        workers_cpu_s = sum(_cpu_seconds(w.pid) for w in workers) - workers_cpu0
        window = min(time.perf_counter() - w0, args.duration)
        for p in clients:
            p.join(10)
    finally:
        for p in clients:
            if p.is_alive():
                p.terminate()  # by its pid
                p.join(5)
        for child in reversed(children):
            child.stop()
        etcd.stop()
    lat = [x for r in results for x in r["latencies"]]
    done = sum(r["done"] for r in results)
    errors = sum(r["errors"] for r in results)
    kinds: dict[str, int] = {}
    for r in results:
        for k, v in r["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    out = {"worker_calls": worker_calls, "sim_workers": args.sim_workers, "clients": args.clients, "concurrency_per_client": args.concurrency,
           "in_flight": args.clients * args.concurrency, "duration_s": args.duration,
           "input": f"token_ids ({args.prompt_tokens} tokens, half a shared head of 32), max_tokens=1",
           "completed": done, "errors": errors, "error_kinds": kinds,
           "requests_per_s": done / args.duration,
           "scheduler_cpu_s": cpu_s, "scheduler_cpu_util": cpu_s / window if window > 0 else float("nan"),
           # CPU the scheduler process spent per completed request, and the rate one whole core would allow
           "scheduler_cpu_ms_per_request": cpu_s * 1e3 / done if done else float("nan"),
           "one_core_ceiling_per_s": done / cpu_s if cpu_s > 0 else float("nan"),
           # what shares the machine with it: the load generator and the sim workers
           "clients_cpu_ms_per_request": sum(r["cpu_s"] for r in results) * 1e3 / done if done else float("nan"),
           "workers_cpu_ms_per_request": workers_cpu_s * 1e3 / done if done else float("nan"),
           "cores": os.cpu_count()}
    if lat:
        out.update({f"latency_{k}": v for k, v in _lat_summary(lat).items() if k != "n"})
    print(f"  {done:,} requests in {args.duration:.0f}s = {out['requests_per_s']:,.0f}/s, errors {errors} {kinds}, "
          f"p50 {out.get('latency_p50_ms', float('nan')):.1f} ms, p99 {out.get('latency_p99_ms', float('nan')):.1f} ms, "
          f"scheduler CPU {out['scheduler_cpu_util']:.0%} of one core, "
          f"{out['scheduler_cpu_ms_per_request']:.2f} ms CPU/request (one full core: "
          f"{out['one_core_ceiling_per_s']:,.0f} req/s); clients {out['clients_cpu_ms_per_request']:.2f}, "
          f"workers {out['workers_cpu_ms_per_request']:.2f} ms CPU/request", flush=True)
    return out


def _wait_routable(address: str, model: str, vocab: int, timeout: float = 30.0) -> None:
    """Until a Generate succeeds: the scheduler has found the workers in etcd."""
    import grpc

    from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while True:
            request = inference_pb2.GenerateRequest(model=model, token_ids=inference_pb2.TokenIds(ids=[1, 2, 3]),
                                                    sampling=sampling_pb2.SamplingParams(max_tokens=1))
            try:
                list(stub.Generate(request, timeout=5))
                return
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# ---- the table --------------------------------------------------------------------------------


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, measured, target, met) per target."""
    rows = []
    if "decide" in results:
        d = results["decide"]
        for label, value in (("decide p99, ours (worst size)", d["ours_worst_p99_ms"]),
                             (f"decide p99, all policies (worst: {d['all_worst']})", d["all_worst_p99_ms"])):
            rows.append((label, f"{value:.3f} ms", f"<= {TARGETS['decide_p99_ms']:.0f} ms",
                         _met(value <= TARGETS["decide_p99_ms"])))
    if "tokenize" in results:
        t = results["tokenize"]
        rows.append((f"tokenize+hash {t['prompt_bytes'] // 1024} KB (tok {t['tokenize_p50_ms']:.1f} + "
                     f"hash {t['hash_p50_ms']:.1f})", f"{t['total_p50_ms']:.1f} ms",
                     f"<= {TARGETS['tokenize_hash_ms']:.0f} ms", _met(t["total_p50_ms"] <= TARGETS["tokenize_hash_ms"])))
    if "ingest" in results:
        i = results["ingest"]
        for label, value in (("KV ingest, pure apply", i["apply_per_s"]), ("KV ingest, gRPC stream", i["grpc_per_s"])):
            rows.append((label, f"{value:,.0f} ev/s", f">= {TARGETS['ingest_events_per_s']:,.0f} ev/s",
                         _met(value >= TARGETS["ingest_events_per_s"])))
    if "rps" in results:
        r = results["rps"]
        rows.append((f"requests/s, 1 scheduler (p50 {r.get('latency_p50_ms', float('nan')):.1f} / "
                     f"p99 {r.get('latency_p99_ms', float('nan')):.1f} ms)", f"{r['requests_per_s']:,.0f} req/s",
                     f">= {TARGETS['requests_per_s']:,.0f} req/s",
                     _met(r["requests_per_s"] >= TARGETS["requests_per_s"] and r["errors"] == 0)))
    return rows


def _met(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def print_table(results: dict) -> None:
    if "decide" in results:
        d = results["decide"]
        print(f"\nRouting decision latency ({d['workers']} workers, {d['index_keys']:,} indexed blocks, "
              f"{d['index_entries']:,} (block, worker) entries)")
        print(f"{'policy':14s} {'blocks':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'CPU p99':>8s}")
        for r in d["rows"]:
            print(f"{r['policy']:14s} {r['prompt_blocks']:6d} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                  f"{r['max_ms']:8.3f} {r['cpu_p99_ms']:8.3f}")
    rows = summary_rows(results)
    width = max(len(r[0]) for r in rows) if rows else 10
    print(f"\n{'metric':{width}s}  {'measured':>16s}  {'target':>18s}  met")
    for metric, measured, target, met in rows:
        print(f"{metric:{width}s}  {measured:>16s}  {target:>18s}  {met}")


def run(args: argparse.Namespace) -> int:
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"unknown sections: {sorted(unknown)} (choose from {SECTIONS})", file=sys.stderr)
        return 2
    runners = {"decide": bench_decide, "tokenize": bench_tokenize, "ingest": bench_ingest, "rps": bench_rps}
    results: dict = {}
    for name in SECTIONS:
        if name in sections:
            print(f"[{name}]", flush=True)
            t = time.perf_counter()
            results[name] = runners[name](args)
            results[name]["section_s"] = time.perf_counter() - t
    print_table(results)
    results["summary"] = [dict(zip(("metric", "measured", "target", "met"), r)) for r in summary_rows(results)]
    results["targets"] = TARGETS
    results["command"] = " ".join(["llm-mesh", *sys.argv[1:]]) if sys.argv else ""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")
    return 0
