"""The KV store's data plane over NIXL: the store's RAM region registered with its agent, and
the client side that READs/WRITEs block slots of that region from/to local memory.

Store side (`llm-mesh kvstore`): `Region` is the RAM tier's bytes (one zero-filled numpy
buffer: its address does not move, so NIXL can register it once); `StoreAgent` registers it
and describes it as a `NixlAgentMetadata` (raw agent metadata + the region's address and
size), which the service keeps in etcd under its lease at membership.nixl_metadata_key(id).

Client side (`NixlStoreLink`): an agent with the caller's local memory registered; it adds a
store's agent from that record and posts transfers of (local address, slot offset, length)
triples. A writer WRITEs into ReserveWrite's slots, waits for DONE, then commits; a reader
pins, READs, then unpins. Offsets are relative to the store's region and checked against
its size before anything is posted.

NIXL's bindings are imported only inside these classes: never in a pytest process (they abort
it once grpc_tools/torch are loaded); tests run this module as a subprocess
(`python -m services.kvstore_nixl roundtrip|throughput …`).

`measure_throughput` times the store's paths on the same bytes — NIXL WRITE (reserve → WRITE
→ commit) and READ (pin → READ → unpin), the gRPC fallback (PutBlocks, GetBlocks) and a local
memcpy — with every destination verified, for `llm-mesh bench kvstore`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.types import checksum
from llm_mesh.v1 import membership_pb2

DRAM = "DRAM"
log = logging.getLogger(__name__)


class Region:
    """`nbytes` of zeroed memory at a fixed address (calloc'd: pages are touched only when used)."""

    def __init__(self, nbytes: int, prefault: bool = False) -> None:
        """`prefault`: touch every page now, so the first write into a slot (a NIXL WRITE from a
        peer, a copy) does not pay the page fault; costs the whole size in resident memory at once."""
        if nbytes < 1:
            raise ValueError("region size must be positive")
        self.array = np.zeros(nbytes, np.uint8)
        if prefault:
            self.array[::4096] = 0
        self.view = memoryview(self.array).cast("B")
        self.address = int(self.array.ctypes.data)
        self.nbytes = nbytes


# How often the store's agent is progressed (it posts nothing; peers' connection set-up waits
# for it at most this long, their transfers — CMA on one host — not at all).
PUMP_INTERVAL_S = 0.001


def _new_agent(name: str, thread_safe: bool = False) -> Any:
    """A UCX agent without NIXL's progress thread: the nixl API gives that thread no delay, so it
    polls without pause on its core (an idle store burned ~60% of one, mostly in sched_yield), and
    at SCHED_IDLE it starves under load (35 MB engine loads took 1.5 s and 3.6 s in 2 of 8,
    against 13 of 13 under 80 ms without it; vLLM's agents: services/engines/vllm_plugin.py).
    A client's link progresses by its own polls; the store's agent by `StoreAgent`'s pump.
    `thread_safe`: NIXL's strict locking (the store's agent is used from two threads)."""
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    sync = nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT if thread_safe else None
    return nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"], sync_mode=sync))


class StoreAgent:
    """The store's NIXL agent with its RAM region registered (passive: peers READ/WRITE it)."""

    def __init__(self, store_id: str, region: Region) -> None:
        self.name = f"kvstore-{store_id}-{os.getpid()}"
        self.region = region
        self.agent = _new_agent(self.name, thread_safe=True)
        self._registered = self.agent.register_memory([(region.address, region.nbytes, 0, "")], DRAM)
        # Passive, yet peers' connection requests need its worker progressed: a sleeping pump.
        self._stopping = threading.Event()
        self._pump = threading.Thread(target=self._progress, name="nixl-pump", daemon=True)
        self._pump.start()

    def _progress(self) -> None:
        while not self._stopping.wait(PUMP_INTERVAL_S):
            self.agent.get_new_notifs()  # progresses the UCX worker (the store expects no notifications)

    def metadata(self, store_id: str) -> membership_pb2.NixlAgentMetadata:
        blob = self.agent.get_agent_metadata()
        return membership_pb2.NixlAgentMetadata(
            engine_id=store_id, agent_metadata=blob, agent_metadata_bytes=len(blob),
            region_address=self.region.address, region_bytes=self.region.nbytes)

    def close(self) -> None:
        self._stopping.set()
        self._pump.join(timeout=5)
        self.agent.deregister_memory(self._registered)


@dataclasses.dataclass(frozen=True)
class StorePeer:
    """A store added to a link: its agent's name there and its region."""

    name: str
    region_address: int
    region_bytes: int


class NixlStoreLink:
    """One process's NIXL agent for talking to KV stores. `local` is the caller's memory that
    transfers read from / land in: (address, bytes) ranges, registered once here (e.g. an
    engine's KV tensors on CPU). Not thread-safe: use it from one thread."""

    def __init__(self, name: str, local: Sequence[tuple[int, int]]) -> None:
        self.agent = _new_agent(f"{name}-{os.getpid()}")
        self._local = [(int(a), int(n)) for a, n in local]
        self._registered = self.agent.register_memory([(a, n, 0, "") for a, n in self._local], DRAM)
        self._peers: dict[str, StorePeer] = {}

    def add_store(self, metadata: membership_pb2.NixlAgentMetadata) -> StorePeer:
        """Add a store's agent (from its etcd record); idempotent per store agent."""
        if not metadata.agent_metadata or not metadata.region_bytes:
            raise ValueError("not a KV store's NIXL record (no agent_metadata / region)")
        key = hashlib.sha256(metadata.agent_metadata).hexdigest()  # a restarted store has a new agent
        if key not in self._peers:
            name = self.agent.add_remote_agent(metadata.agent_metadata)
            name = name.decode() if isinstance(name, bytes) else name
            self._peers[key] = StorePeer(name, metadata.region_address, metadata.region_bytes)
        return self._peers[key]

    def remove_store(self, peer: StorePeer) -> None:
        """Forget a store's agent (it left the mesh, or restarted with a new one)."""
        for key, known in list(self._peers.items()):
            if known == peer:
                del self._peers[key]
                self.agent.remove_remote_agent(peer.name)

    def _check_local(self, address: int, length: int) -> None:
        if not any(a <= address and address + length <= a + n for a, n in self._local):
            raise ValueError(f"local range {address:#x}+{length} is outside the registered memory")

    def start(self, op: str, peer: StorePeer, transfers: Sequence[tuple[int, int, int]]) -> Any:
        """Post `op` ("READ": store → local, "WRITE": local → store) of (local address, slot
        offset, length) triples; returns a handle for `poll`/`wait`."""
        if op not in ("READ", "WRITE"):
            raise ValueError(f"op must be READ or WRITE, not {op!r}")
        if not transfers:
            raise ValueError("nothing to transfer")
        for address, offset, length in transfers:
            if length < 1 or offset < 0 or offset + length > peer.region_bytes:
                raise ValueError(f"slot {offset}+{length} is outside the store's region ({peer.region_bytes} B)")
            self._check_local(address, length)
        local = self.agent.get_xfer_descs([(a, n, 0) for a, _, n in transfers], DRAM)
        remote = self.agent.get_xfer_descs([(peer.region_address + o, n, 0) for _, o, n in transfers], DRAM)
        handle = self.agent.initialize_xfer(op, local, remote, peer.name)
        state = self.agent.transfer(handle)
        if state == "ERR":
            self.agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL {op} failed to start")
        return handle

    def poll(self, handle: Any) -> bool:
        """True once the transfer is done (the handle is then released); raises on failure."""
        state = self.agent.check_xfer_state(handle)
        if state == "PROC":
            return False
        self.agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL transfer ended in state {state}")
        return True

    def wait(self, handle: Any, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.poll(handle):
            if time.monotonic() > deadline:
                self.agent.release_xfer_handle(handle)
                raise TimeoutError("NIXL transfer did not finish")

    def transfer(self, op: str, peer: StorePeer, transfers: Sequence[tuple[int, int, int]],
                 timeout_s: float = 30.0) -> None:
        """`start` + `wait`: blocks this thread until the bytes moved."""
        self.wait(self.start(op, peer, transfers), timeout_s)

    def close(self) -> None:
        self.agent.deregister_memory(self._registered)


# --- the client flows, as a process (tests and `bench kvstore` run these) ------------------


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Deterministic bytes: a test process and its subprocess derive the same blocks from a seed."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def chain(seed: int, blocks: int) -> list[int]:
    """`blocks` distinct 64-bit block hashes from a seed (a stand-in for a prompt's chain)."""
    return [int(h) for h in np.random.default_rng(seed + 1).integers(1, 2**63, blocks, dtype=np.int64)]


def _connect(address: str, etcd: list[str], store_id: str) -> tuple[Any, membership_pb2.NixlAgentMetadata]:
    from services.kvstore_client import KVStoreClient, store_nixl_metadata

    metadata = store_nixl_metadata(etcd, store_id)
    if metadata is None:
        raise SystemExit(f"store {store_id} publishes no NIXL metadata in etcd")
    return KVStoreClient(address), metadata


def roundtrip(address: str, etcd: list[str], store_id: str, model: str, layout: str, block_bytes: int,
              blocks: int, seed: int) -> dict[str, Any]:
    """WRITE `blocks` blocks of pattern(seed) into reserved slots, commit, pin them, READ them
    back into other memory: what landed and what came back, compared byte for byte."""
    client, metadata = _connect(address, etcd, store_id)
    total = block_bytes * blocks
    src = pattern(total, seed)
    dst = np.zeros(total, np.uint8)
    link = NixlStoreLink("kvstore-roundtrip", [(src.ctypes.data, total), (dst.ctypes.data, total)])
    try:
        peer = link.add_store(metadata)
        hashes = chain(seed, blocks)
        reservation = client.reserve(model, layout, block_bytes, hashes)
        index = {h: i for i, h in enumerate(hashes)}
        link.transfer("WRITE", peer, [(src.ctypes.data + index[s.block_hash] * block_bytes, s.offset, s.length)
                                      for s in reservation.slots])
        crcs = [checksum(src[index[s.block_hash] * block_bytes:][:block_bytes]) for s in reservation.slots]
        committed, rejected = client.commit(reservation.write_id, crcs)
        pin = client.pin(model, layout, hashes)
        link.transfer("READ", peer, [(dst.ctypes.data + i * block_bytes, s.offset, s.length)
                                     for i, s in enumerate(pin.slots)])
        checksums_ok = all(s.checksum == checksum(dst[i * block_bytes:][:block_bytes])
                           for i, s in enumerate(pin.slots))
        client.unpin(pin.pin_id)
        return {"reserved": len(reservation.slots), "committed": committed, "rejected": rejected,
                "pinned": len(pin.slots), "read_equal": bool(np.array_equal(src, dst)),
                "checksums_ok": checksums_ok, "hashes": hashes}
    finally:
        link.close()
        client.close()


def measure_throughput(address: str, etcd: Sequence[str], store_id: str, *, block_bytes: int = 256 * 1024,
                       blocks: int = 64, iterations: int = 5, warmup: int = 1, model: str = "bench",
                       layout: str | None = None, seed: int = 7) -> dict[str, Any]:
    """Store throughput on one live store, each path on the same `blocks` × `block_bytes`:
    nixl_write (ReserveWrite → NIXL WRITE → CommitWrite), nixl_read (Pin → NIXL READ → Unpin),
    nixl_write_xfer / nixl_read_xfer (the transfers alone), grpc_put (PutBlocks), grpc_get
    (GetBlocks), memcpy (one local copy of the bytes). Every
    iteration writes a fresh chain (already stored blocks are skipped by the store) and every
    read is checked against what was written. Median/p90 ms and GB/s (services/bench/nixl.stats).
    Run it in a process that may load NIXL (not pytest)."""
    from services.bench.nixl import stats

    layout = layout or f"bench-{block_bytes}"  # a layout's block size is fixed by its first write
    client, metadata = _connect(address, list(etcd), store_id)
    total = block_bytes * blocks
    src = pattern(total, seed)
    dst = np.zeros(total, np.uint8)
    link = NixlStoreLink("kvstore-bench", [(src.ctypes.data, total), (dst.ctypes.data, total)])
    paths = ("nixl_write", "nixl_read", "nixl_write_xfer", "nixl_read_xfer", "grpc_put", "grpc_get", "memcpy")
    times: dict[str, list[float]] = {k: [] for k in paths}
    verified = True
    blocks_view = [src[i * block_bytes:(i + 1) * block_bytes] for i in range(blocks)]
    crcs = [checksum(b) for b in blocks_view]
    try:
        peer = link.add_store(metadata)
        for it in range(warmup + iterations):
            keep = it >= warmup
            hashes = chain(seed * 1000 + 2 * it, blocks)
            start = time.perf_counter()
            reservation = client.reserve(model, layout, block_bytes, hashes)
            xfer = time.perf_counter()
            link.transfer("WRITE", peer, [(src.ctypes.data + i * block_bytes, s.offset, s.length)
                                          for i, s in enumerate(reservation.slots)])
            write_xfer_s = time.perf_counter() - xfer
            committed, _ = client.commit(reservation.write_id, crcs[:len(reservation.slots)])
            write_s = time.perf_counter() - start
            dst[:] = 0
            start = time.perf_counter()
            pin = client.pin(model, layout, hashes)
            xfer = time.perf_counter()
            link.transfer("READ", peer, [(dst.ctypes.data + i * block_bytes, s.offset, s.length)
                                         for i, s in enumerate(pin.slots)])
            read_xfer_s = time.perf_counter() - xfer
            client.unpin(pin.pin_id)
            read_s = time.perf_counter() - start
            verified &= committed == blocks and len(pin.slots) == blocks and np.array_equal(src, dst)
            grpc_hashes = chain(seed * 1000 + 2 * it + 1, blocks)
            start = time.perf_counter()
            stored, _ = client.put(model, layout, list(zip(grpc_hashes, blocks_view)))
            put_s = time.perf_counter() - start
            start = time.perf_counter()
            got = client.get(model, layout, grpc_hashes)
            get_s = time.perf_counter() - start
            verified &= stored == blocks and [d for _, d in got] == [b.tobytes() for b in blocks_view]
            start = time.perf_counter()
            np.copyto(dst, src)
            copy_s = time.perf_counter() - start
            if keep:
                for name, seconds in (("nixl_write", write_s), ("nixl_read", read_s),
                                      ("nixl_write_xfer", write_xfer_s), ("nixl_read_xfer", read_xfer_s),
                                      ("grpc_put", put_s), ("grpc_get", get_s), ("memcpy", copy_s)):
                    times[name].append(seconds)
    finally:
        link.close()
        client.close()
    return {"block_bytes": block_bytes, "blocks": blocks, "total_bytes": total, "verified": bool(verified),
            **{name: stats(seconds, total) for name, seconds in times.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.kvstore_nixl",
                                     description="KV store NIXL client flows (JSON on stdout)")
    parser.add_argument("flow", choices=["roundtrip", "throughput"])
    parser.add_argument("--address", required=True, help="the store's gRPC host:port")
    parser.add_argument("--etcd", required=True, help="comma-separated etcd endpoints")
    parser.add_argument("--store-id", required=True)
    parser.add_argument("--model", default="m")
    parser.add_argument("--layout", default=None, help="default: layout-a (roundtrip), bench-<block bytes>")
    parser.add_argument("--block-bytes", type=int, default=64 * 1024)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    etcd = [e for e in args.etcd.split(",") if e]
    if args.flow == "roundtrip":
        result = roundtrip(args.address, etcd, args.store_id, args.model, args.layout or "layout-a", args.block_bytes,
                           args.blocks, args.seed)
    else:
        result = measure_throughput(args.address, etcd, args.store_id, block_bytes=args.block_bytes,
                                    blocks=args.blocks, iterations=args.iterations, warmup=args.warmup,
                                    model=args.model, layout=args.layout, seed=args.seed)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
