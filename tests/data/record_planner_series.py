"""Record the planner's test fixture: a load series from the discrete-event simulator.

    .venv/bin/python tests/data/record_planner_series.py     # rewrites tests/data/planner_series.json

The Mooncake conversation trace's requests (their sizes and shared prefixes, in trace order) are
re-timed as Poisson arrivals at a rate that holds, ramps, holds high, then drops (PHASES), and
replayed with policy `ours` on a fixed 2 prefill + 4 decode cluster (services/bench/des.py). Each
15 s window becomes one scheduler.planner.LoadSample, built from what a scheduler replica sees:
its routing decisions (uncached tokens at the worker that prefills), the requests' TTFT and TPOT,
and the workers' states at the window's last arrival (queue, running, KV usage, measured speed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import sys
from unittest import mock

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import scheduler.disagg  # noqa: E402
from scheduler.framework import Role  # noqa: E402
from scheduler.planner import LoadSample  # noqa: E402
from scheduler.policies import policy_by_name  # noqa: E402
from services.bench.des import ClusterSpec, RequestResult, percentile, simulate  # noqa: E402
from services.bench.workload import load_trace  # noqa: E402

TRACE = REPO.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
OUT = pathlib.Path(__file__).with_name("planner_series.json")
WINDOW_S = 15.0
# (phase, windows, rate at its start, rate at its end) in requests/s
PHASES = [("steady-low", 8, 3.0, 3.0), ("ramp", 8, 3.0, 10.0), ("steady-high", 6, 10.0, 10.0), ("drop", 12, 1.5, 1.5)]
SPEC = ClusterSpec(workers=0, prefill_workers=4, decode_workers=6)


def rate_at(t: float) -> float:
    start = 0.0
    for _, windows, r0, r1 in PHASES:
        end = start + windows * WINDOW_S
        if t < end:
            return r0 + (r1 - r0) * (t - start) / (end - start)
        start = end
    return 0.0


def arrivals(seed: int = 7) -> list[float]:
    rng, t, out = random.Random(seed), 0.0, []
    horizon = sum(w for _, w, _, _ in PHASES) * WINDOW_S
    while True:
        t += rng.expovariate(rate_at(t))
        if t >= horizon:
            return out
        out.append(t)


@dataclasses.dataclass
class Snapshot:
    now: float
    uncached: int
    prefill_queue: int
    decode_running: int
    kv_utilization: float
    prefill_tokens_per_s: float | None


snapshots: list[Snapshot] = []


class RecordingDisaggregator(scheduler.disagg.Disaggregator):
    """The real decision, plus what a scheduler replica knows at that moment."""

    def decide(self, request, workers, index, *, dry_run=False):
        pd = super().decide(request, workers, index, dry_run=dry_run)
        prefill = [w for w in workers if w.role == Role.PREFILL]
        decode = [w for w in workers if w.role != Role.PREFILL]
        speeds = [w.prefill_tokens_per_s for w in prefill if w.prefill_tokens_per_s]
        uncached = pd.prefill.prefill_tokens if pd.prefill is not None else pd.decode.prefill_tokens
        snapshots.append(Snapshot(
            request.now, uncached, sum(w.waiting for w in prefill), sum(w.running for w in decode),
            sum(w.kv_cache_usage for w in decode) / len(decode), sum(speeds) / len(speeds) if speeds else None))
        return pd


def window_of(t: float) -> int:
    return int(t // WINDOW_S)


def samples(results: list[RequestResult]) -> list[dict]:
    n = sum(w for _, w, _, _ in PHASES)
    phases = [name for name, windows, _, _ in PHASES for _ in range(windows)]
    out = []
    for k in range(n):
        arrived = [(r, s) for r, s in zip(results, snapshots) if window_of(r.arrival_s) == k]
        firsts = [r.ttft for r in results if r.first_token_s is not None and window_of(r.first_token_s) == k]
        tpots = [r.tpot for r in results if r.finish_s is not None and window_of(r.finish_s) == k
                 and r.tpot is not None]
        # Output tokens generated in the window: each request's spread over [first token, finish].
        generated = 0.0
        lo, hi = k * WINDOW_S, (k + 1) * WINDOW_S
        for r in results:
            if r.first_token_s is None or r.finish_s is None:
                continue
            span = max(r.finish_s - r.first_token_s, 1e-9)
            overlap = max(0.0, min(hi, r.finish_s) - max(lo, r.first_token_s))
            generated += r.output_tokens * min(1.0, overlap / span)
        last = arrived[-1][1] if arrived else None
        count = len(arrived)
        sample = LoadSample(
            window_s=WINDOW_S, arrival_rate=count / WINDOW_S,
            prompt_tokens_mean=sum(r.input_tokens for r, _ in arrived) / max(1, count),
            uncached_prompt_tokens_mean=sum(s.uncached for _, s in arrived) / max(1, count),
            output_tokens_mean=sum(r.output_tokens for r, _ in arrived) / max(1, count),
            ttft_p90_s=percentile(firsts, 90) if firsts else None,
            itl_p90_s=percentile(tpots, 90) if tpots else None,
            prefill_queue=last.prefill_queue if last else 0, decode_running=last.decode_running if last else 0,
            kv_utilization=round(last.kv_utilization, 4) if last else 0.0,
            prefill_replicas=SPEC.prefill_workers, decode_replicas=SPEC.decode_workers,
            prefill_tokens_per_s=last.prefill_tokens_per_s if last else None,
            decode_tokens_per_s=generated / WINDOW_S / SPEC.decode_workers)
        row = {key: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
               for key, v in dataclasses.asdict(sample).items()}
        out.append({"phase": phases[k], **row})
    return out


def main() -> None:
    times = arrivals()
    trace = load_trace(TRACE, limit=len(times), max_input_tokens=16_384)
    requests = [dataclasses.replace(r, arrival_s=t) for r, t in zip(trace, times)]
    results: list[RequestResult] = []
    with mock.patch.object(scheduler.disagg, "Disaggregator", RecordingDisaggregator):
        summary = simulate(requests, policy_by_name("ours"), SPEC, results_out=results)
    assert len(snapshots) == len(results), "one snapshot per routed request"
    meta = {"trace": TRACE.name, "cluster": {"prefill": SPEC.prefill_workers, "decode": SPEC.decode_workers},
            "policy": "ours", "window_s": WINDOW_S, "phases": PHASES, "requests": len(requests),
            "ttft_p90_s": round(summary["ttft_p90_s"], 4), "pd_decisions": summary["pd_decisions"]}
    OUT.write_text(json.dumps({"meta": meta, "samples": samples(results)}, indent=1) + "\n")
    print(f"wrote {OUT} ({len(requests)} requests, {len(results)} results)")


if __name__ == "__main__":
    main()
