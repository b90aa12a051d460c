"""KVEventSubscriber.stop() returns even when batches arrive back to back.

Regression: with `asyncio.wait_for(call.read(), …)` a cancel that landed as a
read completed was swallowed (Python 3.11's wait_for returns the result), the
follow task kept reading, and stop() waited forever (7 of 20 rounds here).
"""

from __future__ import annotations

import asyncio
import time
import types

import grpc

from llm_mesh.v1 import membership_pb2, worker_pb2, worker_pb2_grpc
from services.kv_events import KVEventSubscriber
from tests.unit.test_kv_event_log import RecordingIndex


class _Flood(worker_pb2_grpc.WorkerServicer):
    """An empty snapshot, then heartbeats as fast as the stream takes them."""

    async def WatchKVEvents(self, request, context):
        yield worker_pb2.KVEventBatch(epoch="e", seq=0, snapshot=True, reset=True)
        while True:
            yield worker_pb2.KVEventBatch(epoch="e", seq=0)
            await asyncio.sleep(0)


async def test_stop_returns_while_batches_keep_arriving() -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(_Flood(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    members = types.SimpleNamespace(members={"w": membership_pb2.Member(address=f"127.0.0.1:{port}")},
                                    add_listener=lambda listener: None)
    try:
        for _ in range(20):
            subscriber = KVEventSubscriber(members, RecordingIndex(strict=False))
            await subscriber.start()
            deadline = time.monotonic() + 5  # a loaded machine can take longer than one sleep to connect
            feed = subscriber.feeds["w"]
            while not (feed.batches > 1 and feed.epoch == "e") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(subscriber.stop())
            done, _ = await asyncio.wait([stopping], timeout=5)
            if not done:  # leave nothing running behind a failed round
                for feed in subscriber.feeds.values():
                    feed.task.cancel()
            assert done, "stop() hung: a cancel was swallowed"
            assert subscriber.feeds["w"].batches > 0 and subscriber.feeds["w"].epoch == "e"
    finally:
        await server.stop(0)
