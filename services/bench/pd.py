"""`llm-mesh bench pd`: prefill/decode on two real vLLM engines vs one aggregated engine.

Phase 1, aggregated: one engine (role both) on the prefill core runs every prompt.
Phase 2, P/D: a prefill engine (NixlConnector kv_producer) on its core and a decode
engine (kv_consumer) on another; each prompt is prefilled (max_tokens 1,
do_remote_decode), then decoded with the returned KV transfer params (the decoder
pulls the blocks over NIXL). The phases run one after another so they never compete
for the cores. Each engine is a `VllmEngine` in its own process
(services/engines/engine_proc.py) and first serves a warm-up request (for the
decoder, that includes the one-time NIXL handshake), which is not measured.

Every trial's prompt is fresh random token ids (a per-run nonce, the length and the
trial seed the generator), so no request hits a prefix cached by an earlier one.
Greedy decoding with ignore_eos: P/D output must equal the aggregated output.

Measured per prompt: prefill time on the prefiller (its leg's engine-side latency),
the KV transfer as the decoder's NIXL stats report it (bytes, seconds, GB/s), TTFT
(P/D: from sending the prefill leg to the decoder's first token), ITL (mean gap
after the first token) and E2E (client wall time, both legs for P/D).

On CPU, vLLM's NIXL connector re-pins its worker's model thread to the last core of
the NUMA node, and the NIXL agent's progress thread busy-polls on the engine's core;
`VllmEngine` undoes the first (services/engines/cpu_affinity.py), our vLLM plugin the
second (services/engines/vllm_plugin.py: no progress thread). The table shows where
each engine's worker main thread may run and how many threads got SCHED_IDLE (0: none spins);
`--keep-nixl-pinning` / `--keep-nixl-spin` leave vLLM's behaviour to measure its cost.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import time
from typing import Any

from services.engines.cpu_affinity import KEEP_PINNING_ENV, KEEP_SPIN_ENV, descendants, thread_affinities
from services.engines.engine_proc import PDEngineProc

MODEL_NAME = "SmolLM2-135M-Instruct"
TARGET_LENGTH = 2000
TARGET_E2E_RATIO = 1.3
# SmolLM2's vocabulary is 49152 ids; stay clear of the special tokens at the low end.
_TOKEN_RANGE = (100, 49000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default="256,500,1000,2000", help="prompt lengths in tokens")
    parser.add_argument("--trials", type=int, default=2, help="prompts per length (each one unique)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--prefill-core", default="0", help="cores of the prefill (and aggregated) engine")
    parser.add_argument("--decode-core", default="1", help="cores of the decode engine")
    parser.add_argument("--keep-nixl-pinning", action="store_true",
                        help="leave vLLM's NIXL thread re-pinning in place (to measure its cost)")
    parser.add_argument("--keep-nixl-spin", action="store_true",
                        help="keep vLLM's NIXL progress thread, busy-polling at normal priority (its cost)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/pd.json"))


def make_prompts(lengths: list[int], trials: int, nonce: int) -> dict[tuple[int, int], list[int]]:
    """(length, trial) → unique random token ids (unique from the first block on: no prefix hits)."""
    prompts = {}
    for n in lengths:
        for t in range(trials):
            rng = random.Random(f"{nonce}-{n}-{t}")
            prompts[(n, t)] = [rng.randrange(*_TOKEN_RANGE) for _ in range(n)]
    return prompts


def _settings(model_dir: str, role: str, cores: str, max_model_len: int) -> dict[str, Any]:
    from services.procs import free_port

    return dict(model_dir=model_dir, model_name=MODEL_NAME, max_model_len=max_model_len, max_num_seqs=4,
                kv_cache_gib=1, cpu_cores=cores, kv_events=False, role=role, kv_side_channel_port=free_port())


def worker_threads(engine: PDEngineProc) -> dict[str, Any]:
    """Where the engine's vLLM worker threads may run: its main (model) thread, and all of them."""
    for pid in descendants(engine.proc.pid):
        try:
            comm = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("VLLM::Worker"):
            threads = thread_affinities(pid)
            by_cores: dict[str, int] = {}
            for cores in threads.values():
                key = ",".join(map(str, sorted(cores)))
                by_cores[key] = by_cores.get(key, 0) + 1
            main = threads.get(pid)
            idle = sum(1 for tid in threads if _sched_idle(tid))
            return {"pid": pid, "main_thread_cores": sorted(main) if main else None,
                    "threads_by_cores": by_cores, "sched_idle_threads": idle}
    return {}


def _sched_idle(tid: int) -> bool:
    try:
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    except OSError:
        return False


def _timed_generate(engine: PDEngineProc, **cmd: Any) -> dict[str, Any]:
    start = time.perf_counter()
    reply = engine.call(op="generate", **cmd)
    reply["wall_s"] = time.perf_counter() - start
    return reply


def _itl(reply: dict[str, Any]) -> float | None:
    n = len(reply["token_ids"])
    return (reply["e2e_s"] - reply["ttft_s"]) / (n - 1) if n > 1 and reply["ttft_s"] is not None else None


def _warm_up(engine: PDEngineProc, name: str, max_tokens: int) -> None:
    prompt = make_prompts([64], 1, nonce=random.getrandbits(32))[(64, 0)]
    engine.call(op="generate", request_id=f"warm-{name}", prompt=prompt, max_tokens=max_tokens)


def run_aggregated(engine: PDEngineProc, prompts: dict[tuple[int, int], list[int]],
                   max_tokens: int) -> dict[tuple[int, int], dict[str, Any]]:
    out = {}
    for (n, t), prompt in prompts.items():
        r = _timed_generate(engine, request_id=f"agg-{n}-{t}", prompt=prompt, max_tokens=max_tokens)
        out[(n, t)] = {"ttft_s": r["ttft_s"], "itl_s": _itl(r), "e2e_s": r["wall_s"],
                       "token_ids": r["token_ids"]}
    return out


def _wait_blocks_freed(prefill: PDEngineProc, timeout: float = 10.0) -> bool:
    """The prefiller frees a request's blocks when the decoder's pull notification arrives."""
    deadline = time.monotonic() + timeout
    while prefill.call(op="load")["kv_cache_usage"] > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def run_pd(prefill: PDEngineProc, decode: PDEngineProc, prompts: dict[tuple[int, int], list[int]],
           max_tokens: int) -> dict[tuple[int, int], dict[str, Any]]:
    out = {}
    for (n, t), prompt in prompts.items():
        before = decode.call(op="stats")
        start = time.perf_counter()
        a = prefill.call(op="generate", request_id=f"p-{n}-{t}", prompt=prompt, max_tokens=1,
                         remote_decode=True)
        decode_sent = time.perf_counter()
        if a["kv_transfer"] is None:
            raise RuntimeError(f"prefill leg of {n} tokens returned no KV transfer params")
        b = decode.call(op="generate", request_id=f"d-{n}-{t}", prompt=prompt, max_tokens=max_tokens,
                        remote_prefill=a["kv_transfer"])
        e2e = time.perf_counter() - start
        after = decode.call(op="stats")
        transfer_bytes = after["transfer_bytes"] - before["transfer_bytes"]
        transfer_s = after["transfer_seconds"] - before["transfer_seconds"]
        out[(n, t)] = {
            "prefill_s": a["e2e_s"],
            "prefill_leg_token": a["token_ids"][0] if a["token_ids"] else None,
            "ttft_s": (decode_sent - start) + b["ttft_s"],
            "itl_s": _itl(b), "e2e_s": e2e, "token_ids": b["token_ids"],
            "transfers": after["transfers"] - before["transfers"],
            "transfer_bytes": transfer_bytes, "transfer_s": transfer_s,
            "transfer_gbps": transfer_bytes / transfer_s / 1e9 if transfer_s > 0 else None,
            "failed_transfers": after["failed_transfers"] - before["failed_transfers"],
            "decode_computed_prompt_tokens": (after["computed_prompt_tokens"]
                                              - before["computed_prompt_tokens"]),
            "prefill_blocks_freed": _wait_blocks_freed(prefill),
        }
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first output token where two greedy outputs differ (None: equal)."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _request_record(agg: dict[str, Any], pd: dict[str, Any]) -> dict[str, Any]:
    return {
        "aggregated": {k: v for k, v in agg.items() if k != "token_ids"},
        "pd": {k: v for k, v in pd.items() if k != "token_ids"},
        "first_divergence": first_divergence(agg["token_ids"], pd["token_ids"]),
        # The first output token: aggregated, the prefill leg's own, the decoder's.
        "first_tokens": [agg["token_ids"][0], pd["prefill_leg_token"], pd["token_ids"][0]],
    }


def summarize(lengths: list[int], trials: int, agg: dict, pd: dict) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        keys = [(n, t) for t in range(trials)]
        a, p = [agg[k] for k in keys], [pd[k] for k in keys]
        row: dict[str, Any] = {"prompt_tokens": n, "trials": trials}
        for name, src in (("agg", a), ("pd", p)):
            for metric in ("ttft_s", "itl_s", "e2e_s"):
                row[f"{name}_{metric}"] = _median([r[metric] for r in src])
        for metric in ("prefill_s", "transfer_s", "transfer_gbps"):
            row[metric] = _median([r[metric] for r in p])
        row["transfer_bytes"] = _median([r["transfer_bytes"] for r in p])
        row["e2e_ratio"] = row["pd_e2e_s"] / row["agg_e2e_s"]
        row["ttft_ratio"] = row["pd_ttft_s"] / row["agg_ttft_s"]
        both_itl = row["pd_itl_s"] and row["agg_itl_s"]
        row["itl_ratio"] = row["pd_itl_s"] / row["agg_itl_s"] if both_itl else None
        row["outputs_equal"] = sum(agg[k]["token_ids"] == pd[k]["token_ids"] for k in keys)
        row["decode_computed_prompt_tokens"] = max(r["decode_computed_prompt_tokens"] for r in p)
        row["failed_transfers"] = sum(r["failed_transfers"] for r in p)
        rows.append(row)
    return rows


def print_table(result: dict[str, Any]) -> None:
    def ms(v: float | None) -> str:
        return f"{v * 1e3:.0f}" if v is not None else "n/a"

    print(f"\nmedians of {result['trials']} unique prompt(s) per length, {result['max_tokens']} tokens out, "
          "greedy; P/D TTFT/E2E include both legs")
    print(f"{'prompt':>6}{'prefill ms':>11}{'KV ms':>7}{'KV MB':>7}{'KV GB/s':>8}"
          f"{'TTFT agg':>10}{'TTFT P/D':>10}{'ITL agg':>9}{'ITL P/D':>9}{'E2E agg':>9}{'E2E P/D':>9}"
          f"{'E2E ×':>7}{'TTFT ×':>8}{'ITL ×':>7}{'same out':>9}")
    for r in result["rows"]:
        gbps = f"{r['transfer_gbps']:.2f}" if r["transfer_gbps"] is not None else "n/a"
        itl_x = f"{r['itl_ratio']:.2f}" if r["itl_ratio"] is not None else "n/a"
        print(f"{r['prompt_tokens']:>6}{ms(r['prefill_s']):>11}{r['transfer_s'] * 1e3:>7.1f}"
              f"{r['transfer_bytes'] / 1e6:>7.1f}{gbps:>8}"
              f"{ms(r['agg_ttft_s']):>10}{ms(r['pd_ttft_s']):>10}"
              f"{ms(r['agg_itl_s']):>9}{ms(r['pd_itl_s']):>9}"
              f"{ms(r['agg_e2e_s']):>9}{ms(r['pd_e2e_s']):>9}{r['e2e_ratio']:>7.2f}{r['ttft_ratio']:>8.2f}"
              f"{itl_x:>7}{r['outputs_equal']:>5}/{r['trials']}")
    for role, info in result["worker_threads"].items():
        print(f"  {role:<10} worker main thread on cores {info.get('main_thread_cores')}, "
              f"threads by cores {info.get('threads_by_cores')}, SCHED_IDLE {info.get('sched_idle_threads')}")
    v = result["verdict"]
    if v["e2e_ratio"] is None:
        print(f"\nno {TARGET_LENGTH}-token prompts measured: the E2E target was not checked")
    else:
        print(f"\nP/D E2E ≤ {TARGET_E2E_RATIO}× aggregated for {TARGET_LENGTH}-token prompts: "
              f"{v['e2e_ratio']:.2f}× → {'holds' if v['holds'] else 'does NOT hold'}"
              f"{' (vLLM NIXL pinning kept)' if result['keep_nixl_pinning'] else ''}"
              f"{' (NIXL progress thread spinning at normal priority)' if result['keep_nixl_spin'] else ''}")
    print(f"greedy P/D output equal to aggregated: {v['outputs_equal']}/{v['requests']}")


def run(args: argparse.Namespace) -> int:
    from services.model_fetch import ensure_model

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    model_dir = str(ensure_model())
    max_model_len = max(2048, max(lengths) + args.max_tokens + 64)
    prompts = make_prompts(lengths, args.trials, nonce=random.getrandbits(32))
    pd_env = {**({KEEP_PINNING_ENV: "1"} if args.keep_nixl_pinning else {}),
              **({KEEP_SPIN_ENV: "1"} if args.keep_nixl_spin else {})}
    logs = args.out.parent / "pd-logs"  # the engines' logs, kept for a look after a failure
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print(f"[1/2] aggregated engine on core {args.prefill_core}: {len(prompts)} prompts …", flush=True)
    agg_engine = PDEngineProc(_settings(model_dir, "both", args.prefill_core, max_model_len),
                              logs / "aggregated.log")
    try:
        agg_engine.wait_ready()
        _warm_up(agg_engine, "agg", args.max_tokens)
        threads = {"aggregated": worker_threads(agg_engine)}
        agg = run_aggregated(agg_engine, prompts, args.max_tokens)
    finally:
        agg_engine.stop()

    print(f"[2/2] P/D: prefill engine on core {args.prefill_core}, decode engine on core "
          f"{args.decode_core} …", flush=True)
    prefill = PDEngineProc(_settings(model_dir, "prefill", args.prefill_core, max_model_len),
                           logs / "prefill.log", env=pd_env)
    decode = PDEngineProc(_settings(model_dir, "decode", args.decode_core, max_model_len),
                          logs / "decode.log", env=pd_env)
    try:
        prefill.wait_ready()
        decode.wait_ready()
        threads |= {"prefill": worker_threads(prefill), "decode": worker_threads(decode)}
        # The decoder's first pull from this prefiller includes the NIXL handshake: not measured.
        run_pd(prefill, decode, make_prompts([64], 1, nonce=random.getrandbits(32)), args.max_tokens)
        pd = run_pd(prefill, decode, prompts, args.max_tokens)
    finally:
        prefill.stop()
        decode.stop()

    rows = summarize(lengths, args.trials, agg, pd)
    target = next((r for r in rows if r["prompt_tokens"] == TARGET_LENGTH), None)
    equal = sum(r["outputs_equal"] for r in rows)
    result = {
        "max_tokens": args.max_tokens, "trials": args.trials, "lengths": lengths,
        "cores": {"prefill": args.prefill_core, "decode": args.decode_core, "aggregated": args.prefill_core},
        "keep_nixl_pinning": args.keep_nixl_pinning, "keep_nixl_spin": args.keep_nixl_spin,
        "worker_threads": threads, "rows": rows,
        "requests": {f"{n}-{t}": _request_record(agg[(n, t)], pd[(n, t)]) for n, t in prompts},
        "verdict": {"e2e_ratio": target["e2e_ratio"] if target else None,
                    "holds": bool(target and target["e2e_ratio"] <= TARGET_E2E_RATIO),
                    "outputs_equal": equal, "requests": len(prompts)},
        "wall_s": time.perf_counter() - started,
    }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0 if equal == len(prompts) else 1
