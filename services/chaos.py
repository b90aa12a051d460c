"""`llm-mesh chaos`: faults injected into a live mesh under load; does anything get lost?

Starts its own mesh on loopback (services/local_mesh.py: a real etcd, `--schedulers` replicas,
`--workers` sim workers whose streams last seconds), computes a reference output for every
prompt of the load on the undisturbed mesh, then runs a steady greedy load while it injects the
`--faults` schedule, one fault after another:

- kill-worker     SIGKILL a worker; a replacement starts `--replace-after` s later;
- drain-worker    SIGTERM a worker (it drains for its --drain-seconds, the scheduler migrates the
                  rest); replaced likewise;
- kill-scheduler  SIGKILL a scheduler replica (needs --schedulers ≥ 2); restarted on the same
                  ports `--replace-after` s later;
- etcd-stop       stop etcd (SIGTERM) for `--etcd-outage` s, then start it again on its data;
- etcd-pause      SIGSTOP etcd for as long (it hangs instead of refusing);
- kill-kvstore    SIGKILL the KV store (started when the schedule has this fault, seeded with the
                  load's prompt blocks so every scheduler's index holds store entries); restarted
                  `--replace-after` s later with the same id and disk tier (it comes back with
                  what its disk held). The sim workers do not load from it: this fault tests that
                  the schedulers keep routing while a store dies, vanishes and returns.
A fault may carry its own duration: `etcd-stop:8`, `kill-worker:2`.

The load generator is a platform client of every scheduler replica: a request that fails before
its first token with UNAVAILABLE or RESOURCE_EXHAUSTED is retried on the next replica with
exponential backoff ("retried by the client"); a stream cut after its first token (its scheduler
died) is resumed the way the scheduler migrates one: on another replica, with the prompt plus
every token received as the prompt, for the remaining max_tokens ("resumed by the client";
`--no-client-resume` counts it as failed instead). Every completed stream is compared token for
token with the reference: the sim engine's greedy output depends only on the context, so any
difference is a token lost, repeated or wrong.

Report (a rich table, and JSON with --out): requests sent / succeeded / failed (by gRPC code,
before or after the first token), retried and migrated by the mesh (every replica's
llm_mesh_failovers_total{kind}), retried and resumed by the client, token mismatches, and TTFT
p50/p99 before / during / after each fault (by the request's send time; "during" runs from the
fault to the end of its recovery: replacement serving, etcd healthy). Exit code 1 when a request
failed or a stream differs from its reference.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import difflib
import itertools
import json
import pathlib
import random
import signal
import tempfile
import time
import urllib.request
from typing import Any

import grpc

from services.etcd_server import EtcdServer
from services.engines.sim_model import SimConfig
from services.local_mesh import SIM_ARGS, Mesh, SchedulerReplica, start_mesh
from services.procs import Child, free_port, free_port_pair

FAULT_KINDS = ("kill-worker", "drain-worker", "kill-scheduler", "etcd-stop", "etcd-pause", "kill-kvstore")
STORE_ID = "chaos-kvstore"
STORE_BLOCK_BYTES = 64 * 1024  # with a 1 MiB RAM tier, the seeded blocks mostly live on disk
DEFAULT_FAULTS = "kill-worker,kill-scheduler,etcd-stop,drain-worker"
RESTART_TIMEOUT_S = 120.0  # a scheduler loads its tokenizer: ~40 s on 2 busy cores
CLIENT_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]  # a restarted replica is found again fast


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    duration_s: float  # etcd: the outage; workers, schedulers: the delay before the replacement


def parse_faults(spec: str, etcd_outage_s: float, replace_after_s: float) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        kind, _, duration = item.partition(":")
        if kind not in FAULT_KINDS:
            raise SystemExit(f"unknown fault {kind!r} (one of {', '.join(FAULT_KINDS)})")
        default = etcd_outage_s if kind.startswith("etcd") else replace_after_s
        faults.append(Fault(kind, float(duration) if duration else default))
    return faults


@dataclasses.dataclass
class Outcome:
    """One client request, across the scheduler replicas that served it."""

    prompt: int  # index into the prompt set
    sent_at: float  # seconds since the load started
    tokens: list[int] = dataclasses.field(default_factory=list)
    first_token_at: float | None = None
    done_at: float | None = None
    code: str | None = None  # final gRPC code of a failed request
    failed_after_first_token: bool = False
    client_retries: int = 0
    client_resumes: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at


class LoadClient:
    """A platform client of the scheduler replicas: greedy token-id requests, retry before the first
    token on another replica with backoff, and (if `resume`) resume a stream cut after it."""

    def __init__(self, addresses: list[str], model: str, max_tokens: int, *, attempts: int, timeout_s: float,
                 resume: bool) -> None:
        self.channels = {a: grpc.aio.insecure_channel(a, options=_CHANNEL_OPTIONS) for a in addresses}
        self.model, self.max_tokens, self.attempts, self.timeout_s, self.resume = (
            model, max_tokens, attempts, timeout_s, resume)
        self._next = itertools.count()
        self._down_until: dict[str, float] = {}

    def _pick(self, avoid: str | None) -> str:
        """Round-robin, skipping replicas that failed a moment ago (and the one that just did)."""
        now = time.monotonic()
        addresses = list(self.channels)
        start = next(self._next)
        ordered = [addresses[(start + i) % len(addresses)] for i in range(len(addresses))]
        up = [a for a in ordered if self._down_until.get(a, 0) <= now and a != avoid]
        return (up or [a for a in ordered if a != avoid] or ordered)[0]

    async def generate(self, prompt: list[int], outcome: Outcome, t0: float) -> None:
        from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, sampling_pb2

        deadline = time.monotonic() + self.timeout_s
        tokens, address = outcome.tokens, None
        for attempt in itertools.count():
            address = self._pick(address)
            request = inference_pb2.GenerateRequest(
                model=self.model, token_ids=inference_pb2.TokenIds(ids=prompt + tokens),
                sampling=sampling_pb2.SamplingParams(max_tokens=self.max_tokens - len(tokens), temperature=0,
                                                     ignore_eos=True))
            try:
                stub = inference_pb2_grpc.InferenceStub(self.channels[address])
                async for response in stub.Generate(request, timeout=deadline - time.monotonic()):
                    if response.token_ids and outcome.first_token_at is None:
                        outcome.first_token_at = time.monotonic() - t0
                    tokens.extend(response.token_ids)
                break
            except grpc.aio.AioRpcError as exc:
                self._down_until[address] = time.monotonic() + 1.0
                if len(tokens) >= self.max_tokens:  # cut after the last token, before the final message
                    break
                retry = (exc.code() in CLIENT_RETRY_CODES and attempt + 1 < self.attempts
                         and (self.resume or not tokens) and time.monotonic() < deadline - 1)
                if not retry:
                    outcome.code, outcome.failed_after_first_token = exc.code().name, bool(tokens)
                    break
                if tokens:
                    outcome.client_resumes += 1
                else:
                    outcome.client_retries += 1
                await asyncio.sleep(min(2.0, 0.1 * 2 ** attempt) * random.uniform(0.5, 1.0))
        outcome.done_at = time.monotonic() - t0

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()


class FailoverCounters:
    """llm_mesh_failovers_total{kind} summed over every scheduler process that ever ran: each is
    scraped every second and before it is killed, so a dead replica's counts are kept."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, float]] = {}  # scheduler pid → kind → count
        self.baseline: dict[int, dict[str, float]] = {}

    async def scrape(self, replica: SchedulerReplica) -> None:
        try:
            counts = await asyncio.to_thread(_failovers, replica.metrics_url)
        except OSError:
            return  # down: keep its last counts
        self.latest[replica.child.pid] = counts

    def mark_baseline(self) -> None:
        self.baseline = {pid: dict(counts) for pid, counts in self.latest.items()}

    def totals(self) -> dict[str, int]:
        out = {"retry": 0, "migrate": 0}
        for pid, counts in self.latest.items():
            for kind, value in counts.items():
                out[kind] = out.get(kind, 0) + int(value - self.baseline.get(pid, {}).get(kind, 0))
        return out


def _failovers(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=2) as reply:
        text = reply.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_mesh_failovers_total":
                counts[sample.labels["kind"]] = counts.get(sample.labels["kind"], 0) + sample.value
    return counts


@dataclasses.dataclass
class StoreHandle:
    """The chaos mesh's KV store: what a restart after kill-kvstore reuses."""

    address: str
    child: Child
    port: int
    disk_dir: pathlib.Path


def store_blocks(address: str) -> int:
    """Blocks the store holds (RAM + disk)."""
    from services.kvstore_client import KVStoreClient

    with KVStoreClient(address) as client:
        stats = client.stats()
    return stats.ram.blocks + stats.disk.blocks


def seed_store(address: str, model: str, prompts: list[list[int]], block_size: int) -> int:
    """Put every full block of the load's prompts (hashed as the schedulers hash them) into the
    store; returns blocks stored."""
    from scheduler.block_hash import BlockHasher, external_block_hash
    from services.kvstore_client import KVStoreClient

    hasher = BlockHasher(block_size)
    stored = 0
    with KVStoreClient(address) as client:
        for prompt in prompts:
            hashes = [external_block_hash(h) for h in hasher.hash_blocks(prompt)]
            stored += client.put(model, "chaos-seed", [(h, bytes(STORE_BLOCK_BYTES)) for h in hashes])[0]
    return stored


@dataclasses.dataclass
class Chaos:
    """The mesh, its etcd and what the faults need to replace what they break."""

    mesh: Mesh
    etcd: EtcdServer
    worker_args: list[str]
    lease_ttl: int
    counters: FailoverCounters
    rng: random.Random
    t0: float = 0.0
    kvstore: StoreHandle | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def inject(self, fault: Fault) -> dict[str, Any]:
        """Run one fault to the end of its recovery; returns what happened, times since the load start."""
        before = await self.failovers()
        record: dict[str, Any] = {"kind": fault.kind, "duration_s": fault.duration_s, "start_s": self.now()}
        if fault.kind in ("kill-worker", "drain-worker"):
            address = self.rng.choice(sorted(self.mesh.workers))
            child = self.mesh.workers.pop(address)
            record["target"] = child.name
            if fault.kind == "kill-worker":
                child.signal(signal.SIGKILL)
                await asyncio.sleep(fault.duration_s)
            else:
                # SIGTERM: the worker leaves etcd, drains, exits; the replacement comes meanwhile.
                child.signal(signal.SIGTERM)
                exited = asyncio.create_task(asyncio.to_thread(child.process.wait, 60))
                await asyncio.sleep(fault.duration_s)
            _, new = await asyncio.to_thread(self.mesh.start_worker, self.worker_args, self.lease_ttl,
                                             RESTART_TIMEOUT_S)
            record["replacement"] = new.name
            if fault.kind == "drain-worker":
                record["exit_code"] = await exited
        elif fault.kind == "kill-scheduler":
            replica = self.rng.choice(self.mesh.schedulers)
            record["target"] = replica.child.name
            await self.counters.scrape(replica)  # its counts die with it
            # Not scraped again: its restart serves the same metrics port, counting from 0.
            self.mesh.schedulers.remove(replica)
            replica.child.signal(signal.SIGKILL)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(self.mesh.start_scheduler, replica.port, replica.metrics_port,
                                    RESTART_TIMEOUT_S)
        elif fault.kind == "kill-kvstore":
            store = self.kvstore
            assert store is not None, "run() starts the store when the schedule kills it"
            record["target"] = store.child.name
            record["store_blocks_before"] = await asyncio.to_thread(store_blocks, store.address)
            store.child.signal(signal.SIGKILL)
            await asyncio.sleep(fault.duration_s)
            _, store.child = await asyncio.to_thread(self.mesh.start_kvstore, STORE_ID, store.disk_dir, store.port,
                                                     self.lease_ttl, RESTART_TIMEOUT_S, 1)
            record["replacement"] = store.child.name
            record["store_blocks_after"] = await asyncio.to_thread(store_blocks, store.address)
        elif fault.kind == "etcd-stop":
            record["target"] = "etcd"
            await asyncio.to_thread(self.etcd.stop)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(self.etcd.start)
        else:  # etcd-pause
            record["target"] = "etcd"
            self.etcd.pause()
            await asyncio.sleep(fault.duration_s)
            self.etcd.resume()
        record["end_s"] = self.now()
        after = await self.failovers()
        record["mesh_failovers"] = {kind: after[kind] - before.get(kind, 0) for kind in after}
        return record

    async def failovers(self) -> dict[str, int]:
        await asyncio.gather(*(self.counters.scrape(r) for r in list(self.mesh.schedulers)))
        return self.counters.totals()


def prompts_for(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, 40000) for _ in range(length)] for _ in range(count)]


async def _reference(client: LoadClient, prompts: list[list[int]], concurrency: int) -> list[list[int]]:
    """Each prompt's greedy output on the undisturbed mesh."""
    gate = asyncio.Semaphore(concurrency)
    outcomes = [Outcome(i, 0.0) for i in range(len(prompts))]

    async def one(i: int) -> None:
        async with gate:
            await client.generate(prompts[i], outcomes[i], time.monotonic())

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    bad = [o for o in outcomes if o.code or len(o.tokens) != client.max_tokens]
    if bad:
        raise RuntimeError(f"reference run failed before any fault: {len(bad)} of {len(prompts)} "
                           f"requests (first: {bad[0].code}, {len(bad[0].tokens)} tokens)")
    return [o.tokens for o in outcomes]


async def drive(chaos: Chaos, client: LoadClient, prompts: list[list[int]], faults: list[Fault],
                opts: argparse.Namespace
                ) -> tuple[list[Outcome], list[dict[str, Any]], list[list[int]], float]:
    """Reference, then load with the faults; returns (outcomes, fault records, reference, load seconds)."""
    from services.bench.live import wait_for_workers

    for replica in chaos.mesh.schedulers:
        await wait_for_workers(replica.address, len(chaos.mesh.workers))
    reference = await _reference(client, prompts, opts.concurrency)
    for replica in chaos.mesh.schedulers:
        await chaos.counters.scrape(replica)
    chaos.counters.mark_baseline()

    outcomes: list[Outcome] = []
    stop = asyncio.Event()
    chaos.t0 = time.monotonic()
    order = itertools.count()

    async def request() -> None:
        outcome = Outcome(next(order) % len(prompts), chaos.now())
        outcomes.append(outcome)
        await client.generate(prompts[outcome.prompt], outcome, chaos.t0)

    async def closed_loop() -> None:
        while not stop.is_set():
            await request()

    async def open_loop() -> None:  # arrivals at --rate, at most --concurrency in flight
        gate, tasks = asyncio.Semaphore(opts.concurrency), []

        async def gated() -> None:
            async with gate:
                await request()

        while not stop.is_set():
            tasks.append(asyncio.create_task(gated()))
            await asyncio.sleep(1 / opts.rate)
        await asyncio.gather(*tasks)

    async def scraper() -> None:
        while not stop.is_set():
            await asyncio.gather(*(chaos.counters.scrape(r) for r in list(chaos.mesh.schedulers)))
            await asyncio.sleep(1.0)

    load = ([asyncio.create_task(open_loop())] if opts.rate > 0 else
            [asyncio.create_task(closed_loop()) for _ in range(opts.concurrency)])
    scraping = asyncio.create_task(scraper())
    records = []
    try:
        await asyncio.sleep(opts.warmup)
        for i, fault in enumerate(faults):
            if i:
                await asyncio.sleep(opts.fault_gap)
            records.append(await chaos.inject(fault))
        await asyncio.sleep(opts.settle)
    finally:
        stop.set()
        await asyncio.gather(*load)
        duration = chaos.now()
        await scraping
        await asyncio.gather(*(chaos.counters.scrape(r) for r in chaos.mesh.schedulers))
    return outcomes, records, reference, duration


def _percentiles(values: list[float]) -> dict[str, Any]:
    values = sorted(values)

    def pct(q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None

    return {"n": len(values), "p50_s": pct(0.50), "p99_s": pct(0.99)}


def build_report(outcomes: list[Outcome], records: list[dict[str, Any]], reference: list[list[int]],
                 counters: FailoverCounters, duration_s: float, config: dict[str, Any]) -> dict[str, Any]:
    failed = [o for o in outcomes if o.code]
    by_code: dict[str, int] = {}
    for o in failed:
        by_code[o.code] = by_code.get(o.code, 0) + 1
    mismatched, missing, extra = 0, 0, 0
    for o in outcomes:
        if o.code:
            continue
        expected = reference[o.prompt]
        if o.tokens != expected:
            mismatched += 1
            diff = difflib.SequenceMatcher(a=expected, b=o.tokens, autojunk=False)
            for tag, i1, i2, j1, j2 in diff.get_opcodes():
                if tag in ("delete", "replace"):
                    missing += i2 - i1
                if tag in ("insert", "replace"):
                    extra += j2 - j1
    mesh = counters.totals()

    def ttft(start: float, end: float) -> dict[str, Any]:
        return _percentiles([o.ttft for o in outcomes if start <= o.sent_at < end and o.ttft is not None])

    faults = []
    for i, r in enumerate(records):
        before_start = records[i - 1]["end_s"] if i else 0.0
        after_end = records[i + 1]["start_s"] if i + 1 < len(records) else duration_s
        faults.append({**r, "ttft": {"before": ttft(before_start, r["start_s"]),
                                     "during": ttft(r["start_s"], r["end_s"]),
                                     "after": ttft(r["end_s"], after_end)}})
    return {
        "config": config,
        "load_duration_s": round(duration_s, 1),
        "requests": {
            "sent": len(outcomes),
            "succeeded": len(outcomes) - len(failed),
            "failed": len(failed),
            "failed_by_code": by_code,
            "failed_after_first_token": sum(o.failed_after_first_token for o in failed),
            "retried_by_mesh": mesh.get("retry", 0),
            "migrated_by_mesh": mesh.get("migrate", 0),
            "retried_by_client": sum(o.client_retries for o in outcomes),
            "resumed_by_client": sum(o.client_resumes for o in outcomes),
        },
        "tokens": {"streams_checked": len(outcomes) - len(failed), "streams_mismatched": mismatched,
                   "missing": missing, "extra": extra},
        "ttft_overall": _percentiles([o.ttft for o in outcomes if o.ttft is not None]),
        "faults": faults,
    }


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log or a pipe: no wrapping
    r, t = report["requests"], report["tokens"]
    summary = Table(title=f"llm-mesh chaos — {report['load_duration_s']} s of load", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    failed = ", ".join(f"{code} {n}" for code, n in sorted(r["failed_by_code"].items())) or "-"
    for label, value in [
        ("requests sent", r["sent"]), ("succeeded", r["succeeded"]),
        ("failed (by gRPC code)", f"{r['failed']} ({failed})"),
        ("  of them after the first token", r["failed_after_first_token"]),
        ("retried by the mesh (before the first token)", r["retried_by_mesh"]),
        ("migrated by the mesh (mid-stream)", r["migrated_by_mesh"]),
        ("retried by the client (other replica)", r["retried_by_client"]),
        ("resumed by the client (stream cut mid-way)", r["resumed_by_client"]),
        ("streams ≠ reference (of checked)", f"{t['streams_mismatched']} (of {t['streams_checked']})"),
        ("tokens missing / extra", f"{t['missing']} / {t['extra']}"),
        ("TTFT p50 / p99 overall", _pair(report["ttft_overall"])),
    ]:
        summary.add_row(label, str(value))
    console.print(summary)
    faults = Table(title="Faults: mesh failovers from the fault to its recovery; "
                         "TTFT p50 / p99 s (requests) by send time")
    for column in ("fault", "target", "at s", "recovered s", "retried/migrated", "before", "during", "after"):
        faults.add_column(column, justify="left" if column in ("fault", "target") else "right")
    for f in report["faults"]:
        moved = f"{f['mesh_failovers'].get('retry', 0)} / {f['mesh_failovers'].get('migrate', 0)}"
        faults.add_row(f["kind"], f.get("target", ""), f"{f['start_s']:.1f}",
                       f"{f['end_s'] - f['start_s']:.1f}", moved,
                       *(_pair(f["ttft"][w]) for w in ("before", "during", "after")))
    console.print(faults)


def _pair(p: dict[str, Any]) -> str:
    if not p["n"]:
        return "-"
    return f"{p['p50_s']:.3f} / {p['p99_s']:.3f} ({p['n']})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--faults", default=DEFAULT_FAULTS,
                        help=f"comma-separated KIND[:SECONDS], run one after another; KIND one of "
                             f"{', '.join(FAULT_KINDS)}; SECONDS: etcd outage, or delay before a killed or "
                             f"drained process (or the KV store) is replaced. Default: {DEFAULT_FAULTS}")
    parser.add_argument("--etcd-outage", type=float, default=20.0,
                        help="default etcd-stop/etcd-pause length, s")
    parser.add_argument("--replace-after", type=float, default=5.0,
                        help="default delay before a killed/drained worker or scheduler is replaced, s")
    parser.add_argument("--warmup", type=float, default=8.0, help="load before the first fault, s")
    parser.add_argument("--fault-gap", type=float, default=10.0,
                        help="load between one fault's recovery and the next, s")
    parser.add_argument("--settle", type=float, default=10.0, help="load after the last fault's recovery, s")
    parser.add_argument("--workers", type=int, default=4, help="sim workers")
    parser.add_argument("--schedulers", type=int, default=2,
                        help="scheduler replicas (kill-scheduler needs 2)")
    parser.add_argument("--concurrency", type=int, default=20, help="streams in flight")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s, at most --concurrency in flight (default 0: closed loop, "
                             "each stream followed by the next)")
    parser.add_argument("--max-tokens", type=int, default=120)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts the load cycles through")
    parser.add_argument("--sim-itl", type=float, default=0.02, help="sim workers' seconds per token")
    parser.add_argument("--drain-seconds", type=float, default=1.0, help="workers' drain grace on SIGTERM")
    parser.add_argument("--lease-ttl", type=int, default=10)
    parser.add_argument("--client-attempts", type=int, default=8,
                        help="client tries per request, all replicas")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--no-client-resume", action="store_true",
                        help="a stream cut after its first token fails instead of being resumed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=pathlib.Path, default=None,
                        help="process logs (default: a new temp dir)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the JSON report here")


def run(args: argparse.Namespace) -> int:
    from services.model_fetch import default_model_dir, ensure_model

    faults = parse_faults(args.faults, args.etcd_outage, args.replace_after)
    if any(f.kind == "kill-scheduler" for f in faults) and args.schedulers < 2:
        raise SystemExit("kill-scheduler needs --schedulers 2 or more (the client fails over to another one)")
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix="llm-mesh-chaos-"))
    print(f"logs in {log_dir}")
    worker_args = [*SIM_ARGS, "--sim-itl", str(args.sim_itl), "--drain-seconds", str(args.drain_seconds),
                   "--max-num-seqs", "64", "--sim-eos-probability", "0"]
    port = free_port_pair()
    etcd = EtcdServer(log_dir / "etcd-data", port, port + 1, log_path=log_dir / "etcd.log")
    etcd.start()
    mesh = None
    try:
        mesh = start_mesh(etcd, log_dir, ensure_model(default_model_dir()), [worker_args] * args.workers,
                          lease_ttl=args.lease_ttl, schedulers=args.schedulers)
        chaos = Chaos(mesh, etcd, worker_args, args.lease_ttl, FailoverCounters(), random.Random(args.seed))
        prompts = prompts_for(args.prompts, args.prompt_tokens, args.seed)
        if any(f.kind == "kill-kvstore" for f in faults):
            store_port = free_port()
            disk_dir = log_dir / "kvstore-disk"
            address, child = mesh.start_kvstore(STORE_ID, disk_dir, store_port, args.lease_ttl, ram_mib=1)
            chaos.kvstore = StoreHandle(address, child, store_port, disk_dir)
            print(f"KV store {address}: {seed_store(address, mesh.model, prompts, SimConfig().block_size)} blocks seeded")

        async def main() -> tuple[list[Outcome], list[dict[str, Any]], list[list[int]], float]:
            client = LoadClient([s.address for s in mesh.schedulers], mesh.model, args.max_tokens,
                                attempts=args.client_attempts, timeout_s=args.request_timeout,
                                resume=not args.no_client_resume)
            try:
                return await drive(chaos, client, prompts, faults, args)
            finally:
                await client.close()

        outcomes, records, reference, duration = asyncio.run(main())
    finally:
        if mesh is not None:
            mesh.stop()
        etcd.stop()
    config = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()
              if k not in ("run", "command") and not callable(v)}
    report = build_report(outcomes, records, reference, chaos.counters, duration, config)
    print_report(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if report["requests"]["failed"] == 0 and report["tokens"]["streams_mismatched"] == 0 else 1
