"""The scheduler's block hashes agree with a real vLLM engine's.

One real vLLM worker process (prefix caching, sha256_cbor, block size 32) on
the real model; its KV events travel the whole way: vLLM's ZMQ publisher →
the worker's reader and log → `Worker.WatchKVEvents`. The hashes it announces
for a ~200-token prompt must be `external_block_hash` of
`BlockHasher(32).hash_blocks(prompt)`; a second prompt sharing the prefix
must announce only its new blocks, chained to the shared ones.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from llm_mesh.v1 import sampling_pb2, worker_pb2, worker_pb2_grpc
from scheduler.block_hash import BlockHasher, external_block_hash
from services.procs import Child, free_port, grpc_serving

pytestmark = pytest.mark.vllm

BLOCK = 32


@pytest.fixture(scope="module")
def vllm_worker(etcd, model_dir, tmp_path_factory):
    port = free_port()
    child = Child.llm_mesh("vllm-hash-worker", [
        "worker", "--engine", "vllm", "--port", str(port), "--etcd", etcd.endpoint, "--model-dir", str(model_dir),
        "--block-size", str(BLOCK), "--max-model-len", "1024", "--max-num-seqs", "4", "--kv-cache-gib", "1",
        "--drain-seconds", "1", "--kv-events-token-ids"], tmp_path_factory.mktemp("vllm-hashes"))
    started = time.monotonic()
    child.start()
    try:
        child.wait_ready(lambda: grpc_serving(f"127.0.0.1:{port}"), 300, interval=0.5)
    except BaseException:
        child.stop()
        raise
    print(f"vLLM worker ready in {time.monotonic() - started:.1f}s")
    yield f"127.0.0.1:{port}"
    child.stop()


async def generate(stub: worker_pb2_grpc.WorkerStub, request_id: str, prompt: list[int]) -> int:
    """Run a greedy 2-token request; its cached prompt tokens."""
    request = worker_pb2.WorkerGenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                                               sampling=sampling_pb2.SamplingParams(max_tokens=2, temperature=0))
    last = None
    async for last in stub.Generate(request, timeout=120):
        pass
    assert last is not None and last.finish_reason
    return last.usage.cached_prompt_tokens


class Events:
    """The stream read by a task into a queue (cancelling a grpc.aio read would cancel the call)."""

    def __init__(self, call) -> None:
        self.call = call
        self.queue: asyncio.Queue[worker_pb2.KVEventBatch] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for batch in self.call:
            await self.queue.put(batch)

    async def stored_until_quiet(self, quiet_s: float = 1.5) -> list[worker_pb2.BlockStored]:
        """BlockStored events until none came for `quiet_s` (vLLM publishes a
        step's events just after the step)."""
        out: list[worker_pb2.BlockStored] = []
        while True:
            try:
                batch = await asyncio.wait_for(self.queue.get(), quiet_s)
            except asyncio.TimeoutError:
                return out
            out += [e.stored for e in batch.events if e.WhichOneof("event") == "stored"]

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def flat(events: list[worker_pb2.BlockStored]) -> list[int]:
    return [h for e in events for h in e.block_hashes]


async def test_vllm_kv_event_hashes_equal_the_scheduler_hashes(vllm_worker):
    rng = random.Random(7)
    prompt = [rng.randrange(1000, 40000) for _ in range(200)]  # 6 full blocks + 8 tokens
    expected = [external_block_hash(h) for h in BlockHasher(BLOCK).hash_blocks(prompt)]
    assert len(expected) == 6

    async with grpc.aio.insecure_channel(vllm_worker) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        stream = Events(stub.WatchKVEvents(worker_pb2.WatchKVEventsRequest(include_token_ids=True)))
        first = await stream.queue.get()
        assert first.snapshot and first.reset and not first.events  # a fresh engine holds nothing
        await stream.stored_until_quiet(0.5)  # the end of the snapshot

        assert await generate(stub, "hash-1", prompt) == 0
        events = await stream.stored_until_quiet()
        # The prompt's 6 full blocks; 200 + 2 generated tokens fill no 7th block.
        assert flat(events) == expected
        assert not events[0].HasField("parent_block_hash")
        assert [t for e in events for t in e.token_ids] == prompt[:6 * BLOCK]
        assert all(e.block_size == BLOCK and e.tier == worker_pb2.KV_TIER_ENGINE for e in events)

        # Shares 5 blocks: only the 6th (and 7th) block of this prompt are new.
        second = prompt[:5 * BLOCK] + [rng.randrange(1000, 40000) for _ in range(70)]
        second_hashes = [external_block_hash(h) for h in BlockHasher(BLOCK).hash_blocks(second)]
        assert await generate(stub, "hash-2", second) == 5 * BLOCK
        events = await stream.stored_until_quiet()
        assert flat(events) == second_hashes[5:] and len(second_hashes) == 7
        assert events[0].parent_block_hash == expected[4]
        assert not set(flat(events)) & set(expected[:5])
        await stream.close()
