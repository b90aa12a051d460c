"""`llm-mesh top`: a live view of the mesh from the admin API of one or more scheduler replicas.

    llm-mesh top --scheduler 127.0.0.1:50051 [--scheduler HOST:PORT ...] [--interval 2]
    llm-mesh top --once        # one frame as plain text, then exit (scripts, notes)

Per refresh it calls Scheduler.ListWorkers, GetStats and GetScalingPlan on every replica;
`render()` turns what came back into the frame (a pure function of it, for tests).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import time
from collections.abc import Sequence

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from llm_mesh.v1 import membership_pb2, scheduler_pb2, scheduler_pb2_grpc
from services import auth, tls

STATES = {scheduler_pb2.WORKER_STATE_READY: "ready", scheduler_pb2.WORKER_STATE_UNAVAILABLE: "unavailable"}
MAX_ERRORS_SHOWN = 10


@dataclasses.dataclass
class Snapshot:
    """What one scheduler replica answered (None where a call failed; `error` says why)."""

    address: str
    workers: scheduler_pb2.ListWorkersResponse | None = None
    stats: scheduler_pb2.SchedulerStats | None = None
    plan: scheduler_pb2.ScalingPlan | None = None
    error: str = ""


async def fetch(address: str, timeout_s: float = 3.0, tls_files: tls.TlsFiles | None = None,
                metadata: tuple[tuple[str, str], ...] = ()) -> Snapshot:
    snap = Snapshot(address)
    try:
        async with tls.open_channel(address, tls_files) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            snap.workers, snap.stats, snap.plan = await asyncio.gather(
                stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=timeout_s, metadata=metadata),
                stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=timeout_s, metadata=metadata),
                stub.GetScalingPlan(scheduler_pb2.GetScalingPlanRequest(), timeout=timeout_s, metadata=metadata))
    except grpc.aio.AioRpcError as exc:
        snap.error = f"{exc.code().name}: {exc.details()}"
    return snap


async def fetch_all(addresses: Sequence[str], tls_files: tls.TlsFiles | None = None,
                    metadata: tuple[tuple[str, str], ...] = ()) -> list[Snapshot]:
    return list(await asyncio.gather(*(fetch(a, tls_files=tls_files, metadata=metadata) for a in addresses)))


def _role_name(role: int) -> str:
    """prefill | decode | both (an unset role is an aggregated worker, as the scheduler reads it)."""
    if role not in membership_pb2.WorkerRole.values() or role == membership_pb2.WORKER_ROLE_UNSPECIFIED:
        return "both" if role == membership_pb2.WORKER_ROLE_UNSPECIFIED else str(role)
    return membership_pb2.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower()


def _ago(unix_ms: int, now_s: float) -> str:
    return f"{max(0.0, now_s - unix_ms / 1000):.0f}s ago"


def render(snapshots: Sequence[Snapshot], now_s: float | None = None) -> Group:
    """The frame: workers, requests and P/D decisions, routing latency, scaling plan, errors."""
    now_s = time.time() if now_s is None else now_s
    parts: list = [Text(f"llm-mesh top  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(now_s))} UTC", style="bold")]
    for s in snapshots:
        if s.error:
            parts.append(Text(f"scheduler {s.address}: unreachable ({s.error})", style="red"))
        elif s.stats is not None:
            parts.append(Text(f"scheduler {s.address}  id {s.stats.scheduler_id or '?'}  policy {s.stats.policy}  "
                              f"up {s.stats.uptime_s:.0f}s"))
    parts += [_workers(snapshots), _requests(snapshots), _plans(snapshots), _errors(snapshots, now_s)]
    return Group(*parts)


def _workers(snapshots: Sequence[Snapshot]) -> Table:
    table = Table(title="Workers", title_justify="left")
    for col in ("id", "role", "address", "state", "in-flight", "waiting", "running", "KV", "prefix hit"):
        table.add_column(col, justify="left" if col in ("id", "role", "address", "state") else "right")
    merged: dict[str, tuple[scheduler_pb2.WorkerStatus, int]] = {}
    for s in snapshots:
        for w in s.workers.workers if s.workers is not None else []:
            _, inflight = merged.get(w.member.id, (w, 0))
            merged[w.member.id] = (w, inflight + w.inflight)  # in-flight: every replica's own requests
    for worker_id in sorted(merged):
        w, inflight = merged[worker_id]
        load = w.load
        hit = f"{load.cached_prompt_tokens / load.prompt_tokens:.0%}" if load.prompt_tokens else "-"
        table.add_row(worker_id, _role_name(w.member.worker.role), w.member.address, STATES.get(w.state, "?"),
                      str(inflight), str(load.waiting), str(load.running), f"{load.kv_cache_usage:.0%}", hit)
    if not merged:
        table.add_row("(no workers)", *[""] * 8)
    return table


def _requests(snapshots: Sequence[Snapshot]) -> Table:
    table = Table(title="Requests and routing", title_justify="left")
    for col in ("scheduler", "requests by outcome", "P/D decisions by rule", "routing p50 / p99", "prefix hit"):
        table.add_column(col)
    for s in snapshots:
        if s.stats is None:
            continue
        st = s.stats
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(st.requests_by_outcome.items())) or "none"
        rules = ", ".join(f"{k} {v}" for k, v in sorted(st.pd_decisions_by_rule.items())) or "none"
        latency = (f"{st.routing_decision_p50_s * 1e3:.2f} / {st.routing_decision_p99_s * 1e3:.2f} ms "
                   f"({st.routing_decisions_in_window} in {st.routing_window_s:.0f}s)")
        table.add_row(s.address, outcomes, rules, latency, f"{st.prefix_hit_ratio:.1%}")
    return table


def _plans(snapshots: Sequence[Snapshot]) -> Table:
    table = Table(title="Scaling plan", title_justify="left")
    for col in ("scheduler", "role", "observed", "desired", "bounds", "why"):
        table.add_column(col)
    for s in snapshots:
        plan = s.plan
        if plan is None:
            continue
        if not plan.computed_at_unix_ms:
            table.add_row(s.address, "-", "", "", "", f"first plan after a {plan.window_s:.0f}s window")
            continue
        for r in plan.roles:
            table.add_row(s.address, r.role, str(r.observed_replicas), str(r.desired_replicas),
                          f"{r.min_replicas}-{r.max_replicas}", r.reason)
    return table


def _errors(snapshots: Sequence[Snapshot], now_s: float) -> Table:
    table = Table(title="Recent errors", title_justify="left")
    for col in ("when", "scheduler", "code", "worker", "message"):
        table.add_column(col)
    errors = sorted(((e, s.address) for s in snapshots if s.stats is not None for e in s.stats.recent_errors),
                    key=lambda pair: pair[0].time_unix_ms)[-MAX_ERRORS_SHOWN:]
    for e, address in errors:
        table.add_row(_ago(e.time_unix_ms, now_s), address, e.code, e.worker_id or "-", e.message)
    if not errors:
        table.add_row("none", "", "", "", "")
    return table


def render_text(snapshots: Sequence[Snapshot], width: int = 160, now_s: float | None = None) -> str:
    """The frame as plain text (no colours, no terminal needed)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(render(snapshots, now_s))
    return console.file.getvalue()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", action="append", default=None, metavar="HOST:PORT",
                        help="a scheduler replica's address (repeatable; default 127.0.0.1:50051)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    parser.add_argument("--once", action="store_true", help="print one frame as plain text and exit")
    parser.add_argument("--width", type=int, default=160, help="columns of the --once frame")
    parser.add_argument("--api-key-file", default=os.environ.get(auth.API_KEYS_FILE_ENV),
                        help="send the first key of this file as the bearer token (a scheduler with API keys)")
    tls.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    addresses = args.scheduler or ["127.0.0.1:50051"]
    credentials = tls.from_args(args), auth.client_metadata(args.api_key_file)
    if args.once:
        snapshots = asyncio.run(fetch_all(addresses, *credentials))
        print(render_text(snapshots, args.width), end="")
        return 1 if all(s.error for s in snapshots) else 0
    try:
        asyncio.run(_live(addresses, args.interval, *credentials))
    except KeyboardInterrupt:
        pass
    return 0


async def _live(addresses: Sequence[str], interval_s: float, tls_files: tls.TlsFiles | None,
                metadata: tuple[tuple[str, str], ...]) -> None:
    with Live(render(await fetch_all(addresses, tls_files, metadata)), auto_refresh=False, screen=False) as live:
        while True:
            await asyncio.sleep(interval_s)
            live.update(render(await fetch_all(addresses, tls_files, metadata)), refresh=True)
