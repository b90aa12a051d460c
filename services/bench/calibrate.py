"""`llm-mesh bench calibrate`: fit the `sim` engine's latency model to the real
vLLM engine on this machine.

Measures (in-process AsyncLLM, the worker's settings):
- prefill: time to the first token of unique prompts (no prefix hit) of
  several lengths, max_tokens=1 → least-squares line
  `step_overhead_s + prefill_per_token_s * tokens`;
- decode: mean inter-token gap with `b` concurrent greedy requests →
  `itl_s * (1 + batch_slowdown * (b - 1))`, fitted on b = 1..16.
Prints the fit and the residuals, writes JSON with the SimLatency fields.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import time

PREFILL_LENGTHS = [64, 256, 512, 1024, 2048, 3000]
BATCHES = [1, 2, 4, 8, 16]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3, help="prompts per length")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("bench-results/calibration.json"))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


async def measure(repeats: int, decode_tokens: int) -> dict:
    from services.engines.base import EngineRequest, SamplingOptions
    from services.engines.vllm_engine import VllmEngine, VllmSettings
    from services.model_fetch import DEFAULT_MODEL_NAME, ensure_model

    engine = VllmEngine(VllmSettings(model_dir=str(ensure_model()), model_name=DEFAULT_MODEL_NAME))
    await engine.start()
    rng = random.Random(7)
    counter = 0

    async def run(tokens: int, max_tokens: int) -> list[float]:
        nonlocal counter
        counter += 1
        prompt = [rng.randrange(200, 49000) for _ in range(tokens)]  # unique: no prefix hit
        request = EngineRequest(f"cal-{counter}", prompt,
                                SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        start, arrivals = time.perf_counter(), []
        async for out in engine.generate(request):
            arrivals.extend([time.perf_counter()] * len(out.token_ids))
        return [start, *arrivals]

    try:
        await run(32, 4)  # warm-up
        prefill = {n: [] for n in PREFILL_LENGTHS}
        for n in PREFILL_LENGTHS:
            for _ in range(repeats):
                times = await run(n, 1)
                prefill[n].append(times[1] - times[0])
        decode = {}
        for b in BATCHES:
            runs = await asyncio.gather(*[run(16, decode_tokens) for _ in range(b)])
            # Steady-state gaps only: skip the prefill and the first decode step.
            gaps = [t2 - t1 for times in runs for t1, t2 in zip(times[3:], times[4:])]
            decode[b] = statistics.median(gaps)
    finally:
        await engine.stop()
    return {"prefill_s": {n: statistics.median(v) for n, v in prefill.items()}, "itl_s": decode}


def run(args: argparse.Namespace) -> int:
    measured = asyncio.run(measure(args.repeats, args.decode_tokens))
    lengths = list(measured["prefill_s"])
    overhead, per_token = fit_line(lengths, [measured["prefill_s"][n] for n in lengths])
    batches = list(measured["itl_s"])
    itl1, slope = fit_line(batches, [measured["itl_s"][b] for b in batches])
    itl_at_1 = itl1 + slope
    fit = {"prefill_per_token_s": per_token, "step_overhead_s": max(0.0, overhead), "itl_s": itl_at_1,
           "batch_slowdown": slope / itl_at_1}
    print(f"{'prompt tokens':>14}{'TTFT ms':>10}{'fit ms':>9}")
    for n in lengths:
        print(f"{n:>14}{measured['prefill_s'][n] * 1e3:>10.1f}{(overhead + per_token * n) * 1e3:>9.1f}")
    print(f"\n{'batch':>14}{'ITL ms':>10}{'fit ms':>9}")
    for b in batches:
        print(f"{b:>14}{measured['itl_s'][b] * 1e3:>10.2f}{itl_at_1 * (1 + fit['batch_slowdown'] * (b - 1)) * 1e3:>9.2f}")
    print("\nSimLatency(" + ", ".join(f"{k}={v:.3g}" for k, v in fit.items()) + ")")
    print(f"→ {1 / per_token:,.0f} prefill tokens/s on this machine")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"measured": measured, "sim_latency": fit}, indent=2))
    print(f"wrote {args.json}")
    return 0
