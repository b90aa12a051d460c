"""`llm-mesh bench nixl`: NIXL between two processes vs memcpy vs gRPC, on this host.

An initiator (this process) and a target (a child process), each with a NIXL agent
on the UCX backend (progress thread on: without it the passive side never
connects). Metadata travels over a multiprocessing pipe, both ways. For each
case (one block of a given size, or many fixed-size blocks scattered through a
larger region, as KV blocks are) the initiator times READs and WRITEs of the
same descriptors: the transfer handle is built once, then posted N times after
a warm-up, each time polled to DONE. Baselines in the same run and on the same
bytes: one contiguous memcpy (numpy copyto into a preallocated buffer, this
process), and gRPC to a grpc.aio server in the target process (loopback, our
CHANNEL_OPTIONS): unary bytes and a client stream of 1 MiB chunks, the server
copying what it receives into its buffer. Both agents' progress threads poll
without pause; while a baseline runs they get SCHED_IDLE, so each path is measured
at its best rather than the baselines paying for NIXL's polling.

Every path is verified: before a case the destination is filled with a
different pattern than the source, and after the timed iterations the
destination's checksum (CRC-32 over the blocks in order, computed where the
bytes landed) must equal the source's, so no number can come from a no-op.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing as mp
import os
import pathlib
import statistics
import threading
import time
import zlib
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from services.engines.cpu_affinity import busy_threads, set_idle_priority

KIB, MIB = 1024, 1024 * 1024
DEFAULT_SIZES = "16K,256K,1M,4M,16M,64M"
DEFAULT_BLOCKS = "1024x16K,256x256K"
GRPC_CHUNK = 1 * MIB
# The targets, for transfers of at least TARGET_MIN_BYTES.
TARGET_MIN_BYTES = 1 * MIB
TARGET_VS_GRPC = 5.0
TARGET_VS_MEMCPY = 0.40
_UNARY = "/llmmesh.bench.Sink/Put"
_STREAM = "/llmmesh.bench.Sink/PutStream"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def human(n: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    block_bytes: int
    blocks: int
    # Block i goes from local slot local_slots[i] to remote slot remote_slots[i] (in block units).
    local_slots: tuple[int, ...]
    remote_slots: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.blocks

    def region_bytes(self) -> int:
        return (max(max(self.local_slots), max(self.remote_slots)) + 1) * self.block_bytes


def make_cases(sizes: list[int], blocks: list[tuple[int, int]], seed: int = 0) -> list[Case]:
    """Single-block cases, then scattered multi-block ones (random slots in a region twice the size)."""
    rng = np.random.default_rng(seed)
    cases = [Case(human(s), s, 1, (0,), (0,)) for s in sizes]
    for count, size in blocks:
        local = tuple(int(x) for x in rng.choice(2 * count, count, replace=False))
        remote = tuple(int(x) for x in rng.choice(2 * count, count, replace=False))
        cases.append(Case(f"{count} × {human(size)}", size, count, local, remote))
    return cases


def slices(buf: np.ndarray, block_bytes: int, slots: tuple[int, ...]) -> list[np.ndarray]:
    return [buf[s * block_bytes:(s + 1) * block_bytes] for s in slots]


def checksum(buf: np.ndarray, block_bytes: int, slots: tuple[int, ...]) -> int:
    crc = 0
    for view in slices(buf, block_bytes, slots):
        crc = zlib.crc32(view, crc)
    return crc


def fill(buf: np.ndarray, nbytes: int, seed: int) -> None:
    buf[:nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _agent(name: str) -> Any:
    from nixl._api import nixl_agent, nixl_agent_config

    # Progress thread on: the target is passive (posts nothing) and must still accept UCX connections.
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))


# --- the target process ---------------------------------------------------------


def _grpc_server(buf: np.ndarray) -> tuple[threading.Thread, int, asyncio.AbstractEventLoop, asyncio.Event]:
    """A grpc.aio server on loopback that copies what it receives into `buf` from offset 0."""
    import grpc

    from services.grpc_util import CHANNEL_OPTIONS

    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def put(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        buf[:len(request)] = np.frombuffer(request, np.uint8)
        return b""

    async def put_stream(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        offset = 0
        async for chunk in requests:
            buf[offset:offset + len(chunk)] = np.frombuffer(chunk, np.uint8)
            offset += len(chunk)
        return offset.to_bytes(8, "little")

    async def serve() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handlers = {
            "Put": grpc.unary_unary_rpc_method_handler(put),
            "PutStream": grpc.stream_unary_rpc_method_handler(put_stream),
        }
        service = grpc.method_handlers_generic_handler("llmmesh.bench.Sink", handlers)
        server.add_generic_rpc_handlers([service])
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["stop"] = asyncio.Event()
        holder["loop"] = asyncio.get_running_loop()
        ready.set()
        await holder["stop"].wait()
        await server.stop(1)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="bench-grpc", daemon=True)
    thread.start()
    ready.wait()
    return thread, holder["port"], holder["loop"], holder["stop"]


def _target_main(conn: Connection, region_bytes: int) -> None:
    buf = np.zeros(region_bytes, np.uint8)
    agent = _agent(f"bench-target-{os.getpid()}")
    agent.register_memory([(buf.ctypes.data, region_bytes, 0, "")], "DRAM")
    thread, port, loop, stop = _grpc_server(buf)
    conn.send({"metadata": agent.get_agent_metadata(), "addr": buf.ctypes.data, "grpc_port": port})
    agent.add_remote_agent(conn.recv()["metadata"])
    try:
        while True:
            op, *arg = conn.recv()
            if op == "quit":
                break
            if op == "fill":
                fill(buf, arg[0], arg[1])
                conn.send(None)
            elif op == "checksum":
                conn.send(checksum(buf, arg[0], tuple(arg[1])))
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)


# --- the initiator (this process) ---------------------------------------------------


def stats(seconds: list[float], nbytes: int) -> dict[str, float]:
    """Median and p90 time; GB/s (10^9 bytes/s) at each (p90 time = the slow tail's throughput)."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    median = statistics.median(ordered)
    return {"median_ms": median * 1e3, "p90_ms": p90 * 1e3,
            "gbps_median": nbytes / median / 1e9, "gbps_p90": nbytes / p90 / 1e9, "iterations": len(seconds)}


class Initiator:
    def __init__(self, region_bytes: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_target_main, args=(child_conn, region_bytes),
                                name="bench-nixl-target")
        self.proc.start()
        self.region_bytes = region_bytes
        self.buf = np.zeros(region_bytes, np.uint8)
        self.copy_dst = np.zeros(region_bytes, np.uint8)
        self.agent = _agent(f"bench-initiator-{os.getpid()}")
        self.agent.register_memory([(self.buf.ctypes.data, region_bytes, 0, "")], "DRAM")
        hello = self.conn.recv()
        self.remote_name = self.agent.add_remote_agent(hello["metadata"])
        self.remote_addr, self.grpc_port = hello["addr"], hello["grpc_port"]
        self.conn.send({"metadata": self.agent.get_agent_metadata()})
        # Both agents' UCX progress threads poll without pause: while a baseline runs they get
        # SCHED_IDLE, so memcpy and gRPC don't pay for NIXL's polling (each path at its best).
        self.progress_threads = busy_threads([os.getpid(), self.proc.pid], sample_s=0.5, busy_fraction=0.1)

    def baseline_phase(self, on: bool) -> None:
        set_idle_priority([tid for _, tid, _ in self.progress_threads], idle=on)

    def _target(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        return self.conn.recv()

    def close(self) -> None:
        try:
            self.conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.terminate()  # our child, by its handle
            self.proc.join(5)

    def _prepare(self, case: Case, source_is_local: bool, seed: int) -> int:
        """Fill source and destination with different patterns; return the source's checksum."""
        n = case.region_bytes()
        if source_is_local:
            fill(self.buf, n, seed)
            self._target("fill", n, seed + 1)
            return checksum(self.buf, case.block_bytes, case.local_slots)
        self._target("fill", n, seed)
        fill(self.buf, n, seed + 1)
        return self._target("checksum", case.block_bytes, list(case.remote_slots))

    def nixl(self, case: Case, op: str, warmup: int, iterations: int, seed: int) -> dict[str, Any]:
        expected = self._prepare(case, source_is_local=(op == "WRITE"), seed=seed)
        bs = case.block_bytes
        local_addr = self.buf.ctypes.data
        local = self.agent.get_xfer_descs([(local_addr + s * bs, bs, 0) for s in case.local_slots], "DRAM")
        remote = self.agent.get_xfer_descs([(self.remote_addr + s * bs, bs, 0) for s in case.remote_slots],
                                           "DRAM")
        handle = self.agent.initialize_xfer(op, local, remote, self.remote_name)
        times = []
        try:
            for i in range(warmup + iterations):
                start = time.perf_counter()
                state = self.agent.transfer(handle)
                while state == "PROC":
                    state = self.agent.check_xfer_state(handle)
                elapsed = time.perf_counter() - start
                if state != "DONE":
                    raise RuntimeError(f"NIXL {op} {case.name}: transfer state {state}")
                if i >= warmup:
                    times.append(elapsed)
        finally:
            self.agent.release_xfer_handle(handle)
        got = (self._target("checksum", bs, list(case.remote_slots)) if op == "WRITE"
               else checksum(self.buf, bs, case.local_slots))
        return {**stats(times, case.total_bytes), "verified": got == expected}

    def memcpy(self, case: Case, warmup: int, iterations: int, seed: int) -> dict[str, Any]:
        n = case.total_bytes
        fill(self.buf, n, seed)
        self.copy_dst[:n] = 0
        src, dst = self.buf[:n], self.copy_dst[:n]
        times = []
        for i in range(warmup + iterations):
            start = time.perf_counter()
            np.copyto(dst, src)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        return {**stats(times, n), "verified": zlib.crc32(dst) == zlib.crc32(src)}

    async def grpc(self, case: Case, streaming: bool, warmup: int, iterations: int, seed: int,
                   max_message: int) -> dict[str, Any] | None:
        import grpc

        from services.grpc_util import CHANNEL_OPTIONS

        n = case.total_bytes
        if not streaming and n >= max_message:
            return None  # over our message limit (CHANNEL_OPTIONS): a unary call cannot carry it
        fill(self.buf, n, seed)
        self._target("fill", n, seed + 1)
        payload = self.buf[:n].tobytes()
        chunks = [payload[o:o + GRPC_CHUNK] for o in range(0, n, GRPC_CHUNK)]
        times = []
        address = f"127.0.0.1:{self.grpc_port}"
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            unary = channel.unary_unary(_UNARY)
            stream = channel.stream_unary(_STREAM)

            async def send_chunks() -> Any:
                for chunk in chunks:
                    yield chunk

            for i in range(warmup + iterations):
                start = time.perf_counter()
                if streaming:
                    await stream(send_chunks())
                else:
                    await unary(payload)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
        verified = self._target("checksum", n, [0]) == zlib.crc32(payload)
        return {**stats(times, n), "verified": verified}


def run_bench(sizes: list[int], blocks: list[tuple[int, int]], warmup: int, iterations: int,
              with_grpc: bool = True) -> dict[str, Any]:
    """Run every case on every path; the result is what `--out` writes."""
    from services.grpc_util import MAX_MESSAGE_BYTES

    cases = make_cases(sizes, blocks)
    init = Initiator(max(c.region_bytes() for c in cases))
    rows = []
    try:
        for k, case in enumerate(cases):
            seed = 1000 * k
            row: dict[str, Any] = {"case": case.name, "block_bytes": case.block_bytes, "blocks": case.blocks,
                                   "total_bytes": case.total_bytes}
            row["nixl_read"] = init.nixl(case, "READ", warmup, iterations, seed)
            row["nixl_write"] = init.nixl(case, "WRITE", warmup, iterations, seed + 10)
            init.baseline_phase(True)
            row["memcpy"] = init.memcpy(case, warmup, iterations, seed + 20)
            if with_grpc:
                row["grpc_unary"] = asyncio.run(init.grpc(case, False, warmup, iterations, seed + 30,
                                                          MAX_MESSAGE_BYTES))
                row["grpc_stream"] = asyncio.run(init.grpc(case, True, warmup, iterations, seed + 40,
                                                           MAX_MESSAGE_BYTES))
            init.baseline_phase(False)
            _ratios(row)
            rows.append(row)
            print(f"  {case.name:<16} done", flush=True)
    finally:
        init.close()
    return {"warmup": warmup, "iterations": iterations, "grpc_chunk_bytes": GRPC_CHUNK,
            "progress_threads_busy": [round(b, 2) for _, _, b in init.progress_threads],
            "targets": {"min_bytes": TARGET_MIN_BYTES, "nixl_vs_grpc": TARGET_VS_GRPC,
                        "nixl_vs_memcpy": TARGET_VS_MEMCPY},
            "cases": rows, "verdict": _verdict(rows)}


def _ratios(row: dict[str, Any]) -> None:
    """NIXL/gRPC against the faster gRPC path, NIXL/memcpy; per op, at median GB/s."""
    grpc_paths = [row[k]["gbps_median"] for k in ("grpc_unary", "grpc_stream") if row.get(k)]
    best_grpc = max(grpc_paths) if grpc_paths else None
    for op in ("nixl_read", "nixl_write"):
        gbps = row[op]["gbps_median"]
        row[op]["vs_memcpy"] = gbps / row["memcpy"]["gbps_median"]
        row[op]["vs_grpc"] = gbps / best_grpc if best_grpc else None


def _verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    big = [r for r in rows if r["total_bytes"] >= TARGET_MIN_BYTES]
    out: dict[str, Any] = {}
    for op in ("nixl_read", "nixl_write"):
        vs_grpc = [r[op]["vs_grpc"] for r in big if r[op]["vs_grpc"] is not None]
        vs_memcpy = [r[op]["vs_memcpy"] for r in big]
        out[op] = {
            "min_vs_grpc": min(vs_grpc) if vs_grpc else None,
            "min_vs_memcpy": min(vs_memcpy) if vs_memcpy else None,
            "grpc_target_holds": bool(vs_grpc) and min(vs_grpc) >= TARGET_VS_GRPC,
            "memcpy_target_holds": bool(vs_memcpy) and min(vs_memcpy) >= TARGET_VS_MEMCPY,
            "cases_missing_a_target": [
                r["case"] for r in big if r[op]["vs_memcpy"] < TARGET_VS_MEMCPY
                or (r[op]["vs_grpc"] is not None and r[op]["vs_grpc"] < TARGET_VS_GRPC)],
        }
    out["all_verified"] = all(r[k]["verified"] for r in rows for k in
                              ("nixl_read", "nixl_write", "memcpy", "grpc_unary", "grpc_stream") if r.get(k))
    return out


def print_table(result: dict[str, Any]) -> None:
    def g(d: dict[str, Any] | None) -> str:
        return f"{d['gbps_median']:6.2f}/{d['gbps_p90']:<6.2f}" if d else f"{'n/a':^13}"

    def x(v: float | None) -> str:
        return f"{v:6.1f}×" if v is not None else "    n/a"

    print(f"\nGB/s as median/p90 of {result['iterations']} iterations (after {result['warmup']} warm-up); "
          "ratios at the median; gRPC = the faster of unary and stream")
    print(f"{'case':<16}{'NIXL READ':>14}{'NIXL WRITE':>14}{'memcpy':>14}{'gRPC unary':>14}"
          f"{'gRPC stream':>14}"
          f"{'R/gRPC':>8}{'W/gRPC':>8}{'R/mem':>7}{'W/mem':>7}  ok")
    for r in result["cases"]:
        ok = all(r[k]["verified"] for k in ("nixl_read", "nixl_write", "memcpy", "grpc_unary", "grpc_stream")
                 if r.get(k))
        print(f"{r['case']:<16}{g(r['nixl_read']):>14}{g(r['nixl_write']):>14}{g(r['memcpy']):>14}"
              f"{g(r.get('grpc_unary')):>14}{g(r.get('grpc_stream')):>14}"
              f"{x(r['nixl_read']['vs_grpc']):>8}{x(r['nixl_write']['vs_grpc']):>8}"
              f"{r['nixl_read']['vs_memcpy']:>6.0%} {r['nixl_write']['vs_memcpy']:>6.0%}"
              f"  {'yes' if ok else 'NO'}")
    v = result["verdict"]
    print(f"\ntargets for transfers ≥ {human(TARGET_MIN_BYTES)}: NIXL ≥ {TARGET_VS_GRPC:g}× gRPC, "
          f"≥ {TARGET_VS_MEMCPY:.0%} of memcpy")
    for op, label in (("nixl_read", "READ"), ("nixl_write", "WRITE")):
        o = v[op]
        print(f"  {label:<5}  vs gRPC: min {x(o['min_vs_grpc']).strip()} → "
              f"{'holds' if o['grpc_target_holds'] else 'does NOT hold'};  vs memcpy: min "
              f"{o['min_vs_memcpy']:.0%} → {'holds' if o['memcpy_target_holds'] else 'does NOT hold'}"
              if o["min_vs_memcpy"] is not None else f"  {label}: no case ≥ {human(TARGET_MIN_BYTES)}")
        if o["cases_missing_a_target"]:
            print(f"         missed by: {', '.join(o['cases_missing_a_target'])}")
    print(f"  every destination verified by checksum: {'yes' if v['all_verified'] else 'NO'}")
    print(f"  NIXL progress threads found busy-polling (fraction of a core, idle): "
          f"{result['progress_threads_busy']} — SCHED_IDLE while memcpy/gRPC run")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="single-block sizes, e.g. 16K,1M,64M")
    parser.add_argument("--blocks", default=DEFAULT_BLOCKS,
                        help="scattered multi-block cases COUNTxSIZE, e.g. 1024x16K,256x256K ('' for none)")
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per path and case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-grpc", action="store_true", help="skip the gRPC baseline")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench-results/nixl.json"))


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    specs = [b.lower().split("x") for b in args.blocks.split(",") if b.strip()]
    blocks = [(int(count), parse_size(size)) for count, size in specs]
    print(f"NIXL (UCX) initiator ↔ target process, {len(sizes) + len(blocks)} cases …", flush=True)
    result = run_bench(sizes, blocks, args.warmup, args.iterations, with_grpc=not args.no_grpc)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0 if result["verdict"]["all_verified"] else 1
