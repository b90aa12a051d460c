"""`llm-mesh kvstore` as a real process on a real etcd: the gRPC control plane and bytes path,
KV events with tier STORE, chunk records under the store's lease, kill -9 and restart on the
same disk tier, a corrupted block file, validation errors. (NIXL: test_kvstore_nixl.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import time
import urllib.request
import zlib
from collections.abc import Iterator

import grpc
import pytest
from etcd3aio import prefix_range_end
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvstore import disk_format
from llm_mesh.v1 import kvstore_pb2, membership_pb2, worker_pb2
from services.etcd_server import EtcdServer
from services.kvstore_client import AsyncKVStoreClient, KVStoreClient, list_stores
from services.kvstore_nixl import chain, pattern
from services.kvstore_chunks import decode_chunk
from services.kvstore_service import SERVICE_NAME
from services.membership import EtcdConnection, kvchunk_prefix
from services.procs import Child, free_port, grpc_serving
from services.tls import TlsFiles
from tests.waiting import until_sync

MODEL, LAYOUT = "m", "layout-a"
BLOCK = 64 * 1024  # 64 blocks fill the 4 MiB RAM tier


class Store:
    """One `llm-mesh kvstore` child; `restart()` runs a new process with the same id and disk."""

    def __init__(self, tmp_path: pathlib.Path, etcd: EtcdServer, name: str, *extra: str, disk: bool = True) -> None:
        self.id = f"{name}-{free_port()}"
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.disk_dir = tmp_path / f"{name}-disk"
        self.args = ["kvstore", "--port", str(self.port), "--id", self.id, "--etcd", etcd.endpoint,
                     "--ram-mib", "4", "--lease-ttl", "2", "--nixl", "off", "--metrics-port", str(self.metrics_port),
                     "--kv-events-heartbeat", "0.5", *extra]
        if disk:
            self.args += ["--disk-dir", str(self.disk_dir), "--disk-mib", "64"]
        self.tmp_path, self.starts = tmp_path, 0
        self.child: Child | None = None

    def start(self) -> Store:
        self.starts += 1
        self.child = Child.llm_mesh(f"{self.id}-{self.starts}", self.args, self.tmp_path)
        self.child.start()
        self.child.wait_ready(lambda: grpc_serving(self.address), timeout=60)
        return self

    def client(self) -> KVStoreClient:
        return KVStoreClient(self.address)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
        assert values, f"{name} not exported"
        return sum(values)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


@pytest.fixture
def stores(tmp_path: pathlib.Path, etcd: EtcdServer) -> Iterator[list[Store]]:
    started: list[Store] = []
    yield started
    for store in started:
        store.stop()


def new_store(stores: list[Store], tmp_path: pathlib.Path, etcd: EtcdServer, name: str, *extra: str,
              disk: bool = True) -> Store:
    store = Store(tmp_path, etcd, name, *extra, disk=disk)
    stores.append(store)
    return store.start()


def blocks_of(seed: int, n: int, block_bytes: int = BLOCK) -> list[tuple[int, bytes]]:
    data = pattern(n * block_bytes, seed).tobytes()
    return list(zip(chain(seed, n), (data[i * block_bytes:(i + 1) * block_bytes] for i in range(n))))


def etcd_prefix(etcd: EtcdServer, prefix: str, leases: bool = False) -> dict[str, bytes] | dict[str, int]:
    """The keys under `prefix` → their values (or, with `leases`, the lease each is attached to)."""
    async def read() -> dict:
        connection = EtcdConnection([etcd.endpoint])
        await connection.connect()
        try:
            r = await connection.client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()), timeout=5)
            return {kv.key.decode(): kv.lease if leases else kv.value for kv in r.kvs}
        finally:
            await connection.close()
    return asyncio.run(read())


def status_details(exc: grpc.RpcError) -> tuple[list[str], float | None]:
    """(BadRequest fields, RetryInfo seconds) from the error's trailers."""
    status = rpc_status.from_call(exc)
    fields, retry = [], None
    for detail in status.details if status is not None else ():
        bad, info = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
        elif detail.Unpack(info):
            retry = info.retry_delay.ToNanoseconds() / 1e9
    return fields, retry


# ---------------------------------------------------------------- the control plane


def test_put_lookup_pin_get_and_reserve_commit(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-basic")
    assert grpc_serving(store.address) and store.metric("llm_mesh_etcd_lease_healthy") == 1
    members = list_stores(etcd.endpoint)
    info = members[store.id].kvstore
    assert members[store.id].address == store.address and members[store.id].kind == membership_pb2.MEMBER_KIND_KVSTORE
    assert (info.ram_bytes, info.disk_bytes, info.chunk_blocks, info.nixl_metadata_key) == (4 << 20, 64 << 20, 64, "")
    blocks = blocks_of(1, 10)
    hashes = [h for h, _ in blocks]
    with store.client() as c:
        assert c.lookup(MODEL, LAYOUT, hashes) == (0, 0)
        assert c.put(MODEL, LAYOUT, blocks[:6]) == (6, [])
        assert c.put(MODEL, LAYOUT, blocks) == (4, [])  # the first 6 are already stored
        assert c.lookup(MODEL, LAYOUT, hashes + [12345]) == (10, 10)
        assert c.lookup(MODEL, "other-layout", hashes) == (0, 0)
        pin = c.pin(MODEL, LAYOUT, hashes[:4] + [999] + hashes[4:])  # the run ends at the unknown block
        assert [s.block_hash for s in pin.slots] == hashes[:4] and pin.pin_id and pin.lease_s == 30
        assert [s.checksum for s in pin.slots] == [zlib.crc32(d) for _, d in blocks[:4]]
        assert all(s.length == BLOCK for s in pin.slots) and len({s.offset for s in pin.slots}) == 4
        c.unpin(pin.pin_id)
        c.unpin(pin.pin_id)  # idempotent
        assert c.get(MODEL, LAYOUT, hashes) == blocks
        # A writer's checksum that the landed bytes do not match: rejected, never stored.
        more = blocks_of(2, 3)
        reservation = c.reserve(MODEL, LAYOUT, BLOCK, hashes + [h for h, _ in more], lease_s=5)
        assert [s.block_hash for s in reservation.slots] == [h for h, _ in more] and reservation.lease_s == 5
        committed, rejected = c.commit(reservation.write_id, [zlib.crc32(d) for _, d in more])
        assert (committed, rejected) == (0, [h for h, _ in more])  # nothing was written into the slots
        assert c.lookup(MODEL, LAYOUT, hashes + [h for h, _ in more]) == (10, 10)
        with pytest.raises(grpc.RpcError) as err:
            c.commit(reservation.write_id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        aborted = c.reserve(MODEL, LAYOUT, BLOCK, [h for h, _ in more])
        c.abort(aborted.write_id)
        c.abort(aborted.write_id)  # idempotent
        stats = c.stats()
    assert stats.ram.blocks == 10 and stats.ram.bytes_used == 10 * BLOCK and stats.stored_blocks == 10
    assert stats.ram.bytes_total == 4 << 20 and stats.disk.bytes_total == 64 << 20
    assert stats.reserved_blocks == 0 and stats.pinned_blocks == 0 and stats.hit_blocks >= 24
    until_sync(lambda: store.metric("llm_mesh_kvstore_stored_blocks_total") == 10, 3,
               "stats refreshed for /metrics")
    assert store.metric('llm_mesh_kvstore_transfer_bytes_total{op="write",path="grpc"}') == 10 * BLOCK
    assert store.metric('llm_mesh_kvstore_requests_total{code="NOT_FOUND",method="CommitWrite"}') == 1


async def test_kv_events_announce_stored_and_removed_with_tier_store(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-events", disk=False)  # RAM only: eviction removes
    client = AsyncKVStoreClient(store.address)
    live: set[int] = set()
    removed: set[int] = set()
    tiers: set[int] = set()

    async def follow() -> None:
        async for batch in client.watch_kv_events():
            if batch.reset:
                live.clear()
            for e in batch.events:
                kind = e.WhichOneof("event")
                if kind == "stored":
                    assert e.stored.model == MODEL
                    tiers.add(e.stored.tier)
                    live.update(e.stored.block_hashes)
                elif kind == "removed":
                    assert e.removed.model == MODEL
                    tiers.add(e.removed.tier)
                    live.difference_update(e.removed.block_hashes)
                    removed.update(e.removed.block_hashes)

    watcher = asyncio.create_task(follow())
    try:
        first, second = blocks_of(3, 40), blocks_of(4, 40)  # 80 blocks > the 64 that fit
        assert await client.put(MODEL, LAYOUT, first) == (40, [])
        await _eventually(lambda: live == {h for h, _ in first}, "the stored blocks announced")
        assert await client.put(MODEL, LAYOUT, second) == (40, [])
        await _eventually(lambda: len(removed) == 16, "16 evicted blocks announced removed")
        assert removed < {h for h, _ in first}  # the least recently used went first
        assert live == {h for h, _ in first + second} - removed
        assert tiers == {worker_pb2.KV_TIER_STORE}
        # A new subscriber gets the same live set as a snapshot.
        snapshot: set[int] = set()
        async for batch in client.watch_kv_events():
            for e in batch.events:
                assert e.stored.tier == worker_pb2.KV_TIER_STORE and e.stored.model == MODEL
                snapshot.update(e.stored.block_hashes)
            if not batch.snapshot:
                break
        assert snapshot == live
        assert (await client.stats()).evicted_blocks == 16
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.close()


async def _eventually(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- etcd records and lifetimes


def test_chunk_records_in_etcd_vanish_with_the_lease_after_kill_9(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-chunks", "--chunk-blocks", "4", disk=False)
    blocks = blocks_of(5, 10)
    hashes = [h for h, _ in blocks]
    with store.client() as c:
        assert c.put(MODEL, LAYOUT, blocks) == (10, [])
    prefix = kvchunk_prefix(store.id)
    until_sync(lambda: len(etcd_prefix(etcd, prefix)) == 3, 5, "3 chunk records")
    records = {k: decode_chunk(v) for k, v in etcd_prefix(etcd, prefix).items()}
    assert sorted(records) == sorted(f"{prefix}{MODEL}/{h:016x}" for h in (hashes[0], hashes[4], hashes[8]))
    assert {tuple(r.block_hashes) for r in records.values()} == {tuple(hashes[0:4]), tuple(hashes[4:8]),
                                                                 tuple(hashes[8:10])}
    assert all(r.store_id == store.id and r.model == MODEL and r.layout == LAYOUT for r in records.values())
    assert store.metric("llm_mesh_kvstore_chunk_records") == 3
    store.child.signal(signal.SIGKILL)
    # No revoke: etcd drops the lease (TTL 2 s) and every key under it.
    took = until_sync(lambda: not etcd_prefix(etcd, prefix), 8, "chunk records gone with the lease")
    assert took > 0.5, "gone before the lease could lapse: something deleted them"
    assert store.id not in list_stores(etcd.endpoint)


def test_a_write_of_a_prefix_tail_joins_the_aligned_chunk_records(stores, tmp_path, etcd) -> None:
    """A writer that offloads only blocks 2..5 of a sequence (0..1 already stored) says where they
    start: the store's chunks stay aligned to the sequence, not to the write."""
    store = new_store(stores, tmp_path, etcd, "kvs-tail", "--chunk-blocks", "4", disk=False)
    blocks = blocks_of(6, 6)
    hashes = [h for h, _ in blocks]
    with store.client() as c:
        assert c.put(MODEL, LAYOUT, blocks[:2]) == (2, [])
        reservation = c.reserve(MODEL, LAYOUT, BLOCK, hashes[2:4], start=2, parent=hashes[1])
        assert [s.block_hash for s in reservation.slots] == hashes[2:4]
        c.abort(reservation.write_id)
        assert c.put(MODEL, LAYOUT, blocks[2:], start=2, parent=hashes[1]) == (4, [])
        assert c.lookup(MODEL, LAYOUT, hashes) == (6, 6)
        with pytest.raises(grpc.RpcError) as err:
            c.stub.ReserveWrite(kvstore_pb2.ReserveWriteRequest(
                chain=kvstore_pb2.BlockChain(model=MODEL, layout=LAYOUT, block_hashes=hashes[:1]),
                block_bytes=BLOCK, parent_block_hash=7), timeout=5)
        assert status_details(err.value)[0] == ["parent_block_hash"]
        with pytest.raises(grpc.RpcError) as err:
            c.put(MODEL, LAYOUT, blocks[:1], start=1 << 24, parent=1)
        assert status_details(err.value)[0] == ["start_position"]
    prefix = kvchunk_prefix(store.id)
    until_sync(lambda: len(etcd_prefix(etcd, prefix)) == 2, 5, "2 chunk records")
    records = {k: decode_chunk(v) for k, v in etcd_prefix(etcd, prefix).items()}
    assert {k: tuple(r.block_hashes) for k, r in records.items()} == {
        f"{prefix}{MODEL}/{hashes[0]:016x}": tuple(hashes[0:4]), f"{prefix}{MODEL}/{hashes[4]:016x}": tuple(hashes[4:6])}


def test_chunk_records_are_written_again_when_the_lease_lapsed_in_an_etcd_outage(stores, tmp_path) -> None:
    server = EtcdServer(tmp_path / "etcd-outage", free_port(), free_port())
    server.start()
    try:
        store = new_store(stores, tmp_path, server, "kvs-outage", "--chunk-blocks", "4", disk=False)
        with store.client() as c:
            assert c.put(MODEL, LAYOUT, blocks_of(8, 8)) == (8, [])
        prefix = kvchunk_prefix(store.id)
        until_sync(lambda: len(etcd_prefix(server, prefix)) == 2, 5, "2 chunk records")
        (first_lease,) = set(etcd_prefix(server, prefix, leases=True).values())
        server.pause()  # etcd hangs longer than the 2 s TTL: the lease lapses, taking the records along
        time.sleep(4)
        server.resume()
        until_sync(lambda: (lambda leases: len(leases) == 2 and first_lease not in leases.values())(
            etcd_prefix(server, prefix, leases=True)), 15, "the records under the new lease")
        assert {tuple(decode_chunk(v).block_hashes) for v in etcd_prefix(server, prefix).values()} == {
            tuple(chain(8, 8)[:4]), tuple(chain(8, 8)[4:])}
        # A clean stop revokes the lease: the records go at once, not after the TTL.
        store.child.signal(signal.SIGTERM)
        assert until_sync(lambda: not etcd_prefix(server, prefix), 5, "records revoked") < 1.5
    finally:
        store.stop()
        server.stop()


def test_kill_9_restart_serves_spilled_blocks_and_a_corrupt_file_is_a_miss(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-disk")
    spilled, newer = blocks_of(6, 40), blocks_of(7, 64)  # the second chain fills RAM: the first spills
    with store.client() as c:
        assert c.put(MODEL, LAYOUT, spilled) == (40, [])
        assert c.put(MODEL, LAYOUT, newer) == (64, [])
        stats = c.stats()
    assert stats.spilled_blocks == 40 and stats.disk.blocks == 40 and stats.ram.blocks == 64
    store.child.signal(signal.SIGKILL)
    store.child.process.wait()
    store.start()  # same id, same --disk-dir
    hashes = [h for h, _ in spilled]
    with store.client() as c:
        assert c.lookup(MODEL, LAYOUT, hashes) == (40, 0)  # on disk only: RAM died with the process
        assert c.lookup(MODEL, LAYOUT, [h for h, _ in newer]) == (0, 0)
        assert c.get(MODEL, LAYOUT, hashes[:20]) == spilled[:20]  # read back across the restart
        # Bit rot in a block that is on disk only: its data no longer matches its CRC.
        (path,) = store.disk_dir.rglob(disk_format.file_name(MODEL, LAYOUT, hashes[30]))
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
        got = c.get(MODEL, LAYOUT, hashes)
        assert got == spilled[:30], "the corrupt block must end the run, never be served"
        assert c.stats().corrupt_blocks == 1
        assert c.lookup(MODEL, LAYOUT, hashes) == (30, 30)  # dropped from the store
        assert not path.exists()
    until_sync(lambda: store.metric("llm_mesh_kvstore_corrupt_blocks_total") == 1, 3,
               "corrupt counted in /metrics")
    # The restarted store announced what it recovered, and rewrote its chunk records.
    def recorded() -> list[int]:
        return [h for v in etcd_prefix(etcd, kvchunk_prefix(store.id)).values() for h in decode_chunk(v).block_hashes]
    until_sync(lambda: recorded() == hashes[:30] + hashes[31:], 3,
               "the chunk record without the corrupt block")


# ---------------------------------------------------------------- validation


def test_invalid_requests_name_the_field_and_errors_follow_the_proto(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-errors", disk=False)
    chain_ok = kvstore_pb2.BlockChain(model=MODEL, layout=LAYOUT, block_hashes=[1, 2])
    with store.client() as c:
        s = c.stub
        cases = [
            (s.Lookup, kvstore_pb2.LookupRequest(), "chain.model"),
            (s.Lookup, kvstore_pb2.LookupRequest(chain=kvstore_pb2.BlockChain(model=MODEL, block_hashes=[1])),
             "chain.layout"),
            (s.Lookup, kvstore_pb2.LookupRequest(chain=kvstore_pb2.BlockChain(model=MODEL, layout=LAYOUT)),
             "chain.block_hashes"),
            (s.Lookup, kvstore_pb2.LookupRequest(chain=kvstore_pb2.BlockChain(
                model=MODEL, layout=LAYOUT, block_hashes=range(65537))), "chain.block_hashes"),
            (s.Lookup, kvstore_pb2.LookupRequest(chain=kvstore_pb2.BlockChain(
                model="x" * 600, layout=LAYOUT, block_hashes=[1])), "chain.model"),
            (s.ReserveWrite, kvstore_pb2.ReserveWriteRequest(chain=chain_ok), "block_bytes"),
            (s.ReserveWrite, kvstore_pb2.ReserveWriteRequest(chain=chain_ok, block_bytes=5 << 20), "block_bytes"),
            (s.ReserveWrite, kvstore_pb2.ReserveWriteRequest(chain=chain_ok, block_bytes=8, lease_s=601), "lease_s"),
            (s.ReserveWrite, kvstore_pb2.ReserveWriteRequest(chain=chain_ok, block_bytes=8, lease_s=-1), "lease_s"),
            (s.Pin, kvstore_pb2.PinRequest(chain=chain_ok, lease_s=float("nan")), "lease_s"),
            (s.CommitWrite, kvstore_pb2.CommitWriteRequest(), "write_id"),
            (s.Unpin, kvstore_pb2.UnpinRequest(pin_id="p" * 200), "pin_id"),
        ]
        for method, request, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                method(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value.details())
            assert status_details(err.value)[0] == [field], (field, err.value.details())
        # Bytes path: the stream's blocks must all have the first one's length.
        with pytest.raises(grpc.RpcError) as err:
            c.put(MODEL, LAYOUT, [(1, b"a" * 16), (2, b"b" * 8)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and status_details(err.value)[0] == ["data"]
        with pytest.raises(grpc.RpcError) as err:
            c.put("", LAYOUT, [(1, b"a")])
        assert status_details(err.value)[0] == ["first message.model"]
        # A block whose bytes do not match the checksum sent with them: rejected, not stored.
        damaged = kvstore_pb2.PutBlocksRequest(model=MODEL, layout=LAYOUT, block_hash=7, data=b"x" * 16,
                                               checksum=zlib.crc32(b"y" * 16))
        assert list(s.PutBlocks(iter([damaged]), timeout=5).rejected_block_hashes) == [7]
        assert c.lookup(MODEL, LAYOUT, [7]) == (0, 0)
        # A layout's block size is fixed by its first write.
        assert c.put(MODEL, LAYOUT, [(1, b"a" * 16)]) == (1, [])
        with pytest.raises(grpc.RpcError) as err:
            c.reserve(MODEL, LAYOUT, 32, [1, 2])
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # A checksum list that does not match the slots.
        reservation = c.reserve(MODEL, LAYOUT, 16, [1, 2, 3])
        with pytest.raises(grpc.RpcError) as err:
            c.commit(reservation.write_id, [1])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and status_details(err.value)[0] == ["checksums"]
        c.abort(reservation.write_id)
        with pytest.raises(grpc.RpcError) as err:
            c.commit("w-unknown")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # Everything reserved: no room, with a retry hint.
        full = c.reserve("m2", LAYOUT, BLOCK, chain(9, 64))
        assert len(full.slots) == 64  # the 16-byte block was evicted to make room
        with pytest.raises(grpc.RpcError) as err:
            c.reserve("m2", LAYOUT, BLOCK, chain(10, 4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status_details(err.value)[1] == pytest.approx(1.0)
        c.abort(full.write_id)
        assert len(c.reserve("m2", LAYOUT, BLOCK, chain(10, 4)).slots) == 4  # room again
    assert grpc_serving(store.address), "bad input must not hurt the store"
    assert SERVICE_NAME == "llm_mesh.v1.KVStore"


def test_mtls_store_serves_trusted_clients_only(stores, tmp_path, etcd) -> None:
    from tests.integration.test_security import Ca, tls_flags

    ca = Ca(tmp_path, "kvs-ca")
    mesh = TlsFiles(*ca.issue("kvs-mesh", server=True), ca.path)
    client_files = TlsFiles(*ca.issue("kvs-client", server=False), ca.path)
    store = Store(tmp_path, etcd, "kvs-tls", *tls_flags(mesh), disk=False)
    stores.append(store)
    store.child = Child.llm_mesh(store.id, store.args, tmp_path)
    store.child.start()
    store.child.wait_ready(lambda: grpc_serving(store.address, tls=client_files), timeout=60)
    blocks = blocks_of(12, 3)
    with KVStoreClient(store.address, tls=client_files) as c:
        assert c.put(MODEL, LAYOUT, blocks) == (3, [])
        assert c.get(MODEL, LAYOUT, [h for h, _ in blocks]) == blocks
    with KVStoreClient(store.address, tls=TlsFiles(ca=ca.path), timeout_s=3) as c, pytest.raises(grpc.RpcError) as err:
        c.lookup(MODEL, LAYOUT, [1])  # trusts the store, presents no certificate
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with KVStoreClient(store.address, timeout_s=3) as c, pytest.raises(grpc.RpcError):
        c.lookup(MODEL, LAYOUT, [1])  # plaintext


async def test_async_client_reserves_and_aborts_a_write(stores, tmp_path, etcd) -> None:
    store = new_store(stores, tmp_path, etcd, "kvs-async-write", disk=False)
    client = AsyncKVStoreClient(store.address)
    try:
        hashes = chain(71, 3)
        reservation = await client.reserve(MODEL, LAYOUT, BLOCK, hashes)
        assert [s.block_hash for s in reservation.slots] == hashes and reservation.write_id
        assert (await client.stats()).reserved_blocks == 3
        await client.abort(reservation.write_id)
        assert (await client.stats()).reserved_blocks == 0
    finally:
        await client.close()
