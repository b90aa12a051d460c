"""`llm-mesh up`: the whole mesh on one machine, from one command.

Starts etcd, the workers, a scheduler and the gateway as child processes (in
that order, each waited for until healthy), prints the endpoints, and on
Ctrl-C / SIGTERM stops them in reverse order — members first, so their leases
are revoked while etcd still runs — then etcd. Children also die with `up` if
it is killed outright (PR_SET_PDEATHSIG), so nothing is orphaned.

Topology: flags for the common cases, or `--config topology.yaml`:

    etcd: {port: 2379}            # or {endpoints: "host:2379,..."} for an external etcd
    scheduler: {port: 50051}
    gateway: {port: 8000}
    workers:
      - {engine: vllm, role: both, cpu_cores: "auto"}
      - {engine: sim, count: 2}
      - {engine: sim, role: prefill}   # P/D: prefill-only (the others then decode: role: decode)
    # extra args for a worker: {engine: sim, args: ["--sim-itl", "0.02"]}

LMCache (`--kv-offload lmcache`, or `kv_offload: lmcache` on a vLLM worker): `up` then starts
one `lmcache server` before the workers (every such worker uses it, so they share its
chunks) and stops it after them; its settings (services/engines/lmcache_backend.py
LMCacheServerSettings) from an optional section:

    lmcache: {port: 5555, http_port: 5556, l1_size_gb: 1.0}

KV store (`--kv-offload store`, or `kv_offload: store` on a vLLM worker): `up` starts one
`llm-mesh kvstore` after etcd and before the workers, and each such worker offloads to it
(services/engines/kv_offload.py); it stops after them. Its flags from an optional section:

    kvstore: {port: 50071, ram_gib: 4, disk_dir: /var/tmp/llm-mesh-kv, disk_gib: 16, prefault: true}
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import signal
import threading
from typing import Any

import yaml
from rich.console import Console

from services import security, tls
from services.engines.lmcache_backend import LMCacheServer, LMCacheServerSettings
from services.etcd_server import EtcdServer
from services.membership import etcd_settings
from services.procs import Child, grpc_serving, http_ok

console = Console(highlight=False)

VLLM_READY_TIMEOUT_S = 300.0
PROCESS_READY_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=pathlib.Path, help="topology YAML (see `llm-mesh up --help`)")
    parser.add_argument("--engine", choices=["vllm", "sim"], default="vllm", help="engine of the default workers")
    parser.add_argument("--workers", type=int, default=1, help="number of default workers")
    parser.add_argument("--prefill-workers", type=int, default=0,
                        help="P/D: this many more workers as prefill-only, and the --workers ones as decode")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--scheduler-port", type=int, default=50051)
    parser.add_argument("--worker-base-port", type=int, default=50061)
    parser.add_argument("--etcd-port", type=int, default=2379)
    parser.add_argument("--etcd", default=None, help="use this external etcd (host:port,...) instead of starting one")
    parser.add_argument("--lease-ttl", type=int, default=10)
    parser.add_argument("--kv-offload", choices=["none", "store", "lmcache"], default="none",
                        help="KV offload of the default vLLM workers: store starts an `llm-mesh kvstore` for them, "
                             "lmcache an `lmcache server`")
    parser.add_argument("--kvstore-port", type=int, default=50071,
                        help="the KV store's port, unless the topology's kvstore: section says otherwise")
    parser.add_argument("--lmcache-port", type=int, default=5555,
                        help="the lmcache server's ZMQ port (its HTTP API on +1), unless the topology's "
                             "lmcache: section says otherwise")
    parser.add_argument("--metrics-base-port", type=int, default=None,
                        help="serve Prometheus /metrics: the scheduler on this port, the gateway on +1, "
                             "worker i on +2+i (default: off)")
    parser.add_argument("--run-dir", type=pathlib.Path, default=None,
                        help="logs and etcd data (default: $LLM_MESH_HOME/run)")
    security.add_arguments(parser, api_keys=True)  # passed on to every child (workers: no API keys)


def topology(args: argparse.Namespace) -> dict[str, Any]:
    if args.config:
        config = yaml.safe_load(args.config.read_text()) or {}
        if not isinstance(config, dict):
            raise SystemExit(f"{args.config}: expected a mapping at the top level")
    else:
        if args.prefill_workers:
            config = {"workers": [{"engine": args.engine, "role": "prefill", "count": args.prefill_workers},
                                  {"engine": args.engine, "role": "decode", "count": args.workers}]}
        else:
            config = {"workers": [{"engine": args.engine, "count": args.workers}]}
        if args.kv_offload != "none":
            for spec in config["workers"]:
                spec["kv_offload"] = args.kv_offload
    config.setdefault("etcd", {"endpoints": args.etcd} if args.etcd else {"port": args.etcd_port})
    config.setdefault("scheduler", {"port": args.scheduler_port})
    config.setdefault("gateway", {"port": args.gateway_port})
    return config


def offloads_to(config: dict[str, Any], backend: str) -> bool:
    """Whether a worker of the topology has kv_offload `backend` (only vLLM workers may)."""
    users = [w for w in config["workers"] if w.get("kv_offload") == backend]
    if any(w.get("engine", "vllm") != "vllm" for w in users):
        raise SystemExit(f"kv_offload: {backend} is for vLLM workers only")
    return bool(users)


def lmcache_settings(config: dict[str, Any], args: argparse.Namespace) -> LMCacheServerSettings | None:
    """The lmcache server to start: None when no worker has kv_offload lmcache."""
    if not offloads_to(config, "lmcache"):
        return None
    spec = dict(config.get("lmcache") or {})
    spec.setdefault("host", args.host)
    spec.setdefault("port", args.lmcache_port)
    spec.setdefault("http_port", int(spec["port"]) + 1)
    try:
        return LMCacheServerSettings.from_mapping(spec)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"lmcache: {exc}") from exc


def kvstore_child(config: dict[str, Any], args: argparse.Namespace, etcd: str,
                  log_dir: pathlib.Path) -> tuple[Child, str] | None:
    """The KV store to start (child, address): None when no worker has kv_offload store."""
    if not offloads_to(config, "store"):
        return None
    spec = dict(config.get("kvstore") or {})
    port = int(spec.pop("port", args.kvstore_port))
    argv = ["kvstore", "--host", args.host, "--port", str(port), "--etcd", etcd, "--lease-ttl", str(args.lease_ttl),
            *security_args(args, api_keys=False)]
    for key in ("ram_gib", "disk_dir", "disk_gib", "nixl"):
        if key in spec:
            argv += [f"--{key.replace('_', '-')}", str(spec.pop(key))]
    if spec.pop("prefault", False):  # the RAM tier resident at start: NIXL WRITEs skip first-touch faults
        argv.append("--prefault")
    if spec:
        raise SystemExit(f"kvstore: unknown keys {', '.join(sorted(spec))} "
                         "(port, ram_gib, disk_dir, disk_gib, nixl, prefault)")
    return Child.llm_mesh("kvstore", argv, log_dir), f"{args.host}:{port}"


def worker_children(workers: list[dict[str, Any]], args: argparse.Namespace, etcd: str,
                    log_dir: pathlib.Path, lmcache_url: str | None = None,
                    kvstore: str | None = None) -> list[tuple[Child, str, bool]]:
    """(child, address, is_vllm) for every worker of the topology."""
    cores = os.cpu_count() or 1
    vllm_count = sum(w.get("count", 1) for w in workers if w.get("engine", "vllm") == "vllm")
    out = []
    port = args.worker_base_port
    vllm_index = 0
    for spec in workers:
        for _ in range(int(spec.get("count", 1))):
            engine = spec.get("engine", "vllm")
            argv = ["worker", "--engine", engine, "--role", spec.get("role", "both"), "--host", args.host,
                    "--port", str(port), "--etcd", etcd, "--lease-ttl", str(args.lease_ttl),
                    *security_args(args, api_keys=False)]
            if engine == "vllm":
                # Several engines on one host must each own their cores (DESIGN.md).
                default_cores = "auto" if vllm_count == 1 else str(vllm_index % cores)
                argv += ["--cpu-cores", str(spec.get("cpu_cores", default_cores))]
                vllm_index += 1
            if spec.get("kv_offload") == "lmcache":
                assert lmcache_url is not None, "lmcache_settings() starts the server first"
                argv += ["--kv-offload", "lmcache", "--lmcache-url", lmcache_url]
            if spec.get("kv_offload") == "store":
                assert kvstore is not None, "kvstore_child() starts the store first"
                argv += ["--kv-offload", "store", "--kvstore", kvstore]
            argv += metrics_port_args(args, 2 + port - args.worker_base_port)
            argv += [str(a) for a in spec.get("args", [])]
            name = f"worker-{port}"
            out.append((Child.llm_mesh(name, argv, log_dir), f"{args.host}:{port}", engine == "vllm"))
            port += 1
    return out


def security_args(args: argparse.Namespace, *, api_keys: bool) -> list[str]:
    """This command's TLS, etcd, API-key and content-logging flags, for a child."""
    out = [*tls.cli_args(tls.from_args(args)), *etcd_settings(args).cli_args()]
    if api_keys and args.api_key_file:
        out += ["--api-key-file", args.api_key_file]
    return out + (["--log-content"] if args.log_content else [])


def metrics_port_args(args: argparse.Namespace, offset: int) -> list[str]:
    """`--metrics-port` for the child `offset` ports above --metrics-base-port, if set."""
    return [] if args.metrics_base_port is None else ["--metrics-port", str(args.metrics_base_port + offset)]


def run(args: argparse.Namespace) -> int:
    from services.model_fetch import default_model_dir

    config = topology(args)
    if etcd_settings(args).cli_args() and "endpoints" not in config["etcd"]:
        raise SystemExit("--etcd-ca/--etcd-cert/--etcd-user… are for an external etcd: give --etcd too")
    probe_tls = tls.from_args(args)
    home = pathlib.Path(os.environ.get("LLM_MESH_HOME", pathlib.Path.home() / ".cache" / "llm-mesh"))
    run_dir = args.run_dir or home / "run"
    log_dir = run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    etcd_server = None
    lmcache_server: LMCacheServer | None = None
    started: list[Child] = []
    try:
        if "endpoints" in config["etcd"]:
            etcd = str(config["etcd"]["endpoints"])
        else:
            port = int(config["etcd"]["port"])
            # The embedded etcd is ephemeral: stale members of a previous run would
            # linger until their leases expired.
            shutil.rmtree(run_dir / "etcd-data", ignore_errors=True)
            etcd_server = EtcdServer(run_dir / "etcd-data", port, port + 1, host=args.host,
                                     log_path=log_dir / "etcd.log")
            with console.status("starting etcd"):
                etcd_server.start()
            etcd = etcd_server.endpoint
            console.print(f"[green]✓[/] etcd          {etcd}  (pid {etcd_server.process.pid})")

        if any(w.get("engine", "vllm") == "vllm" for w in config["workers"]) and not (
                default_model_dir() / ".llm-mesh-complete").exists():
            raise SystemExit("the model is not fetched yet: run `llm-mesh model fetch` (make run does it)")

        lmcache = lmcache_settings(config, args)
        if lmcache is not None:
            lmcache_server = LMCacheServer(lmcache, log_dir / "lmcache.log")
            with console.status("starting the lmcache server"):
                lmcache_server.start()
            console.print(f"[green]✓[/] lmcache       {lmcache.url}  (pid {lmcache_server.child.pid})")

        store = kvstore_child(config, args, etcd, log_dir)
        if store is not None:  # before the workers (they offload to it), stopped after them
            store_child, store_address = store
            store_child.start()
            started.append(store_child)
            with console.status("starting the KV store"):
                store_child.wait_ready(lambda: stop.is_set() or grpc_serving(store_address, tls=probe_tls),
                                       PROCESS_READY_TIMEOUT_S)
            console.print(f"[green]✓[/] kvstore       {store_address}  (pid {store_child.pid})")

        workers = worker_children(config["workers"], args, etcd, log_dir,
                                  lmcache_url=lmcache.url if lmcache is not None else None,
                                  kvstore=store[1] if store is not None else None)
        for child, _, _ in workers:
            child.start()
            started.append(child)
        for child, address, is_vllm in workers:
            with console.status(f"loading {child.name} ({'vLLM' if is_vllm else 'sim'}) …"):
                child.wait_ready(lambda a=address: stop.is_set() or grpc_serving(a, tls=probe_tls),
                                 VLLM_READY_TIMEOUT_S if is_vllm else PROCESS_READY_TIMEOUT_S)
            if stop.is_set():
                return 130
            console.print(f"[green]✓[/] {child.name:<13} {address}  (pid {child.pid})")

        scheduler_address = f"{args.host}:{config['scheduler']['port']}"
        scheduler = Child.llm_mesh("scheduler", ["scheduler", "--host", args.host, "--port",
                                                 str(config["scheduler"]["port"]), "--etcd", etcd,
                                                 "--lease-ttl", str(args.lease_ttl),
                                                 *security_args(args, api_keys=True),
                                                 *metrics_port_args(args, 0)], log_dir)
        scheduler.start()
        started.append(scheduler)
        with console.status("starting the scheduler"):
            scheduler.wait_ready(lambda: stop.is_set() or grpc_serving(scheduler_address, tls=probe_tls),
                                 PROCESS_READY_TIMEOUT_S)
        console.print(f"[green]✓[/] scheduler     {scheduler_address}  (pid {scheduler.pid})")

        gateway_url = f"http://{args.host}:{config['gateway']['port']}"
        gateway = Child.llm_mesh("gateway", ["gateway", "--host", args.host, "--port", str(config["gateway"]["port"]),
                                             "--scheduler", scheduler_address, "--etcd", etcd,
                                             *security_args(args, api_keys=True),
                                             *metrics_port_args(args, 1)], log_dir)
        gateway.start()
        started.append(gateway)
        with console.status("starting the gateway"):
            gateway.wait_ready(lambda: stop.is_set() or http_ok(f"{gateway_url}/health"), PROCESS_READY_TIMEOUT_S)
        console.print(f"[green]✓[/] gateway       {gateway_url}  (pid {gateway.pid})")

        console.print(f"\n[bold]llm-mesh is up.[/] Logs in {log_dir}. Ctrl-C stops everything.\n"
                      f"  OpenAI REST   {gateway_url}/v1  (chat/completions, completions, models)\n"
                      f"  gRPC          {scheduler_address}  (llm_mesh.v1.Inference, llm_mesh.v1.Scheduler)\n"
                      f"  etcd          {etcd}\n"
                      f"  try: curl {gateway_url}/v1/chat/completions -H 'Content-Type: application/json' "
                      f"-d '{{\"model\":\"SmolLM2-135M-Instruct\",\"messages\":[{{\"role\":\"user\","
                      f"\"content\":\"What is the capital of France?\"}}]}}'")
        if args.metrics_base_port is not None:
            console.print(f"  metrics       http://{args.host}:{args.metrics_base_port}/metrics (scheduler; "
                          f"the gateway on +1, worker i on +2+i)")
        while not stop.wait(1.0):
            dead = [c for c in [*started, *([lmcache_server.child] if lmcache_server else [])] if not c.alive()]
            if dead:
                console.print(f"[red]✗[/] {dead[0].name} exited ({dead[0].process.returncode}):\n{dead[0].tail()}")
                return 1
        return 0
    finally:
        console.print("stopping …")
        for child in reversed(started):
            code = child.stop()
            console.print(f"  stopped {child.name} (exit {code})")
        if lmcache_server is not None:  # after its workers, whose connectors talk to it until they stop
            console.print(f"  stopped lmcache (exit {lmcache_server.stop()})")
        if etcd_server is not None:
            etcd_server.stop()
            console.print("  stopped etcd")
