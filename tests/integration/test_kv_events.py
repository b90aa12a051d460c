"""KV events over the wire: `sim` workers as real processes on a real etcd,
several independent subscribers ("scheduler replicas"), each with its own
etcd watch and index. They must end with identical indexes, equal to the
workers' own live sets, through a replay (resume from the last seq), a
snapshot (a subscriber further behind than the worker's replay buffer) and a
worker leaving the mesh. Also: our ZMQ reader against vLLM's real publisher
(replay from its ROUTER; a gap it cannot fill)."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from llm_mesh.v1 import membership_pb2, sampling_pb2, worker_pb2, worker_pb2_grpc
from scheduler.index import BlockIndex, Tier
from services.etcd_server import EtcdServer
from services.membership import MemberDirectory
from services.procs import Child, free_port, grpc_serving
from services.kv_events import KVEventSubscriber
from tests.unit.test_kv_event_log import RecordingIndex
from tests.waiting import until

MODEL = "sim-kv"
BLOCK = 16
BUFFER = 64  # the workers' replay ring, in events: small, so a paused subscriber falls out of it


@pytest.fixture(scope="module")
def kv_mesh(tmp_path_factory):
    """Its own etcd (the session's holds other tests' workers) and two sim workers."""
    tmp = tmp_path_factory.mktemp("kv-events")
    etcd = EtcdServer(tmp / "etcd", free_port(), free_port())
    etcd.start()
    workers: dict[str, tuple[str, Child]] = {}
    try:
        for name in ("kv-w1", "kv-w2"):
            port = free_port()
            child = Child.llm_mesh(name, [
                "worker", "--engine", "sim", "--id", name, "--port", str(port), "--etcd", etcd.endpoint,
                "--model", MODEL, "--model-dir", str(tmp / "no-model"), "--block-size", str(BLOCK),
                "--sim-num-blocks", "48", "--max-num-seqs", "4", "--sim-itl", "0.002",
                "--sim-prefill-per-token", "0.00001", "--kv-events-buffer", str(BUFFER),
                "--kv-events-heartbeat", "0.5", "--kv-events-token-ids", "--lease-ttl", "5",
                "--drain-seconds", "1"], tmp)
            child.start()
            workers[name] = (f"127.0.0.1:{port}", child)
        for name, (address, child) in workers.items():
            child.wait_ready(lambda a=address: grpc_serving(a), 60)
        yield etcd, workers
    finally:
        for _, child in workers.values():
            child.stop()
        etcd.stop()


class Replica:
    """A scheduler replica's KV-event side: its own etcd watch, subscriber and index."""

    def __init__(self, etcd: EtcdServer, index) -> None:
        self.directory = MemberDirectory([etcd.endpoint], membership_pb2.MEMBER_KIND_WORKER)
        self.index = index
        self.subscriber = KVEventSubscriber(self.directory, index, retry_initial_s=0.05, idle_timeout_s=3)

    async def start(self) -> None:
        await self.directory.start()
        await self.subscriber.start()

    async def stop(self) -> None:
        await self.subscriber.stop()
        await self.directory.stop()


async def traffic(workers: dict[str, tuple[str, Child]], n: int, seed: int) -> None:
    """n greedy requests per worker, 4 at a time, sharing a few prefixes; the
    cache (48 blocks) is small enough that they evict each other."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 40000) for _ in range(3 * BLOCK)] for _ in range(5)]

    async def one(stub, i: int) -> None:
        prompt = rng.choice(prefixes) + [rng.randrange(1, 40000) for _ in range(rng.randrange(1, 3 * BLOCK))]
        request = worker_pb2.WorkerGenerateRequest(
            request_id=f"kv-{seed}-{i}", prompt_token_ids=prompt, model=MODEL,
            sampling=sampling_pb2.SamplingParams(max_tokens=rng.randrange(1, 2 * BLOCK), temperature=0))
        async for _ in stub.Generate(request, timeout=30):
            pass

    async def worker_load(address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for start in range(0, n, 4):
                await asyncio.gather(*(one(stub, i) for i in range(start, min(n, start + 4))))

    await asyncio.gather(*(worker_load(address) for address, _ in workers.values()))


async def truth(address: str) -> tuple[str, int, set[int]]:
    """(epoch, seq, live ENGINE blocks) of a worker, from a fresh snapshot."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = worker_pb2_grpc.WorkerStub(channel).WatchKVEvents(worker_pb2.WatchKVEventsRequest())
        blocks: set[int] = set()
        try:
            # read(), not `async for`: cancelling the call inside the iterator's own
            # loop races its aclose() ("asynchronous generator is already running").
            while (batch := await call.read()) is not grpc.aio.EOF:
                if not batch.snapshot:
                    assert not batch.events, "traffic has stopped: nothing after the snapshot"
                    return batch.epoch, batch.seq, blocks
                assert all(e.stored.tier == worker_pb2.KV_TIER_ENGINE for e in batch.events)
                blocks.update(h for e in batch.events for h in e.stored.block_hashes)
        finally:
            call.cancel()
    raise AssertionError("stream ended")


def caught_up(replica: Replica, truths: dict[str, tuple[str, int, set[int]]]) -> bool:
    feeds = replica.subscriber.feeds
    return all(w in feeds and (feeds[w].epoch, feeds[w].seq) == truths[w][:2] for w in truths)


async def test_replicas_converge_through_replay_snapshot_and_a_worker_leaving(kv_mesh):
    etcd, workers = kv_mesh
    a, b, c = Replica(etcd, RecordingIndex()), Replica(etcd, RecordingIndex()), Replica(etcd, BlockIndex())
    for r in (a, b, c):
        await r.start()
    try:
        await until(lambda: all(set(r.subscriber.feeds) == set(workers) for r in (a, b, c)), 10, "feeds")
        await traffic(workers, 12, seed=1)

        # Replay: A drops its streams mid-traffic and resumes from its last seq.
        resume = asyncio.create_task(traffic(workers, 12, seed=2))
        await asyncio.sleep(0.1)
        for w in workers:
            a.subscriber.resubscribe(w)
        # Snapshot: B stops reading while more than its workers' replay buffer happens.
        await b.subscriber.stop()
        await resume
        await traffic(workers, 24, seed=3)
        await b.subscriber.start()

        truths = {w: await truth(address) for w, (address, _) in workers.items()}
        assert all(seq > 2 * BUFFER for _, seq, _ in truths.values()), "the test must overflow the buffer"
        assert all(blocks for _, _, blocks in truths.values())
        for r in (a, b, c):
            await until(lambda r=r: caught_up(r, truths), 10, "replica caught up",
                           lambda r=r: f"{r.subscriber.feeds} vs {[t[:2] for t in truths.values()]}")

        expected = {w: {Tier.ENGINE: blocks} for w, (_, _, blocks) in truths.items()}
        assert a.index.view() == expected
        assert b.index.view() == expected
        for w, (_, _, blocks) in truths.items():  # the real index holds the same, per block
            assert all(w in c.index.match(MODEL, [h]) for h in blocks)
            assert c.index.blocks_of(w) == len(blocks)
        assert len(c.index) == sum(len(b) for _, _, b in truths.values())

        for w in workers:
            fa, fb = a.subscriber.feeds[w], b.subscriber.feeds[w]
            assert fa.streams >= 2 and fa.snapshots == 1, f"A resumed by replay, not a snapshot: {fa}"
            assert fb.streams >= 2 and fb.snapshots == 2, f"B fell out of the buffer: a new snapshot: {fb}"
            assert fa.resyncs == fb.resyncs == 0

        # A worker leaves (SIGTERM revokes its lease): every replica drops its blocks.
        gone = "kv-w2"
        workers[gone][1].stop()
        for r in (a, b, c):
            await until(lambda r=r: gone not in r.subscriber.feeds, 10, "leaver dropped")
        assert set(a.index.view()) == set(b.index.view()) == {"kv-w1"}
        assert c.index.workers() == ["kv-w1"] and c.index.blocks_of(gone) == 0
        assert not any(gone in c.index.match(MODEL, [h]) for h in truths[gone][2])
    finally:
        for r in (a, b, c):
            await r.stop()


async def test_the_wire_protocol_replays_a_recent_seq_and_snapshots_an_old_one(kv_mesh):
    _, workers = kv_mesh
    address = workers["kv-w1"][0]
    if not workers["kv-w1"][1].alive():
        pytest.skip("worker stopped by an earlier test")
    await traffic({"kv-w1": workers["kv-w1"]}, 8, seed=4)
    epoch, seq, _ = await truth(address)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        call = stub.WatchKVEvents(worker_pb2.WatchKVEventsRequest(epoch=epoch, after_seq=seq - 3,
                                                                  include_token_ids=True))
        first = await call.read()
        call.cancel()
        assert not first.snapshot and first.seq == seq and len(first.events) == 3
        # Asked for tokens: every stored block comes with its own (checked over up to half the
        # ring, where the traffic's stores are; the last 3 events may all be removals).
        since = max(1, seq - BUFFER // 2)
        call = stub.WatchKVEvents(worker_pb2.WatchKVEventsRequest(epoch=epoch, after_seq=since,
                                                                  include_token_ids=True))
        ring = await call.read()
        call.cancel()
        assert not ring.snapshot
        stored = [e.stored for e in ring.events if e.WhichOneof("event") == "stored"]
        assert stored and all(len(s.token_ids) == BLOCK * len(s.block_hashes) for s in stored)
        call = stub.WatchKVEvents(worker_pb2.WatchKVEventsRequest(epoch=epoch, after_seq=seq - BUFFER - 5))
        first = await call.read()
        call.cancel()
        assert first.snapshot and first.reset and first.seq == seq


async def test_zmq_reader_fills_gaps_from_vllm_replay_and_clears_what_it_cannot(tmp_path):
    """Against vLLM's own ZmqEventPublisher (no engine needed): messages
    published before the reader's SUB connects are lost on PUB/SUB and must
    come back from the replay ROUTER; beyond its buffer, a clear."""
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    from services.engines.base import AllBlocksCleared, BlockStored
    from services.engines.vllm_engine import ZmqKVEvents

    async def run(directory, published_early: int, buffer_steps: int) -> tuple[ZmqKVEvents, list]:
        directory.mkdir()
        received: list = []
        reader = ZmqKVEvents(str(directory), received.extend)
        publisher = kv_events.ZmqEventPublisher(0, endpoint=reader.endpoint, replay_endpoint=reader.replay_endpoint,
                                                buffer_steps=buffer_steps, topic=ZmqKVEvents.TOPIC)

        def publish(h: int) -> None:
            publisher.publish(kv_events.KVEventBatch(ts=time.time(), events=[kv_events.BlockStored(
                block_hashes=[h], parent_block_hash=None, token_ids=[1, 2], block_size=2, lora_id=None,
                medium="GPU", lora_name=None)]))

        try:
            for h in range(published_early):
                publish(h)
            await asyncio.sleep(0.3)
            reader.start()
            await asyncio.sleep(0.3)  # the SUB has connected
            publish(published_early)
            await until(lambda: any(getattr(e, "block_hashes", None) == (published_early,) for e in received),
                           5, "the live event")
        finally:
            await reader.stop()
            publisher.shutdown()
        return reader, received

    reader, received = await run(tmp_path / "a", 3, buffer_steps=100)
    assert reader.lost == 0
    assert [e.block_hashes for e in received] == [(0,), (1,), (2,), (3,)]
    assert all(isinstance(e, BlockStored) and e.medium == "GPU" and e.token_ids == (1, 2) for e in received)

    reader, received = await run(tmp_path / "b", 8, buffer_steps=5)
    # The 5-message buffer holds 4..8 once the live message 8 is in it: 0..3 are gone.
    assert reader.lost == 4
    assert isinstance(received[0], AllBlocksCleared)
    assert [e.block_hashes for e in received[1:]] == [(h,) for h in range(4, 9)]


def test_a_worker_refuses_a_negative_kv_event_interval():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--engine", "sim",
                           "--kv-events-interval", "-1", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--kv-events-interval must be >= 0.0, got -1.0" in done.stderr
