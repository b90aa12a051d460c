"""The scheduler's live view of the workers: membership from etcd, one gRPC
channel per worker, and load polled from each worker's GetLoad.

Routing state lives in scheduler.framework.WorkerState; this module only keeps it
current. A worker whose etcd key is deleted (lease expired or revoked) is
dropped at once, its channel closed. The KV stores' membership is watched too
(`store_directory`): the router's KVEventSubscriber follows their KV events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc

from llm_mesh.v1 import membership_pb2, worker_pb2, worker_pb2_grpc
from scheduler.framework import Role, WorkerState
from services.grpc_util import CHANNEL_OPTIONS
from services.tracing import client_interceptors
from services.membership import EtcdSettings, MemberDirectory
from services.tls import TlsFiles, open_channel
from services.worker_stream import StreamCall, WorkerStream

log = logging.getLogger(__name__)

# How long in-flight calls to a worker that left etcd may still run (its drain).
LEFT_GRACE_S = 300.0


class PooledWorker:
    def __init__(self, member: membership_pb2.Member, tls: TlsFiles | None = None, use_stream: bool = True) -> None:
        self.member = member
        self.channel = open_channel(member.address, tls, options=CHANNEL_OPTIONS,
                                    interceptors=client_interceptors(member.address))
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        # Generate calls go over one multiplexed stream (services/worker_stream.py) unless off.
        self.stream = WorkerStream(self.stub, member.address) if use_stream else None
        info = member.worker
        self.state = WorkerState(
            worker_id=member.id, model=info.model, max_num_seqs=info.max_num_seqs or 1,
            role=Role(info.role or Role.BOTH), block_size=info.block_size or 16, kv_blocks_total=info.kv_blocks_total,
        )
        self.load = worker_pb2.WorkerLoad()

    def generate(self, request: worker_pb2.WorkerGenerateRequest, timeout: float | None
                 ) -> StreamCall | grpc.aio.UnaryStreamCall:
        """Start Generate on this worker: a request on its stream, or a call of its own."""
        if self.stream is not None:
            return self.stream.generate(request, timeout)
        return self.stub.Generate(request, timeout=timeout)

    async def close(self, grace: float | None = None) -> None:
        if self.stream is not None:
            await self.stream.close(grace)
        await self.channel.close(grace=grace)


DEFAULT_POLL_INTERVAL_S = 1.0  # seconds between GetLoad polls of each worker (scheduler --load-poll-interval)


class WorkerPool:
    def __init__(self, etcd_endpoints: Sequence[str], poll_interval_s: float = DEFAULT_POLL_INTERVAL_S, *,
                 etcd: EtcdSettings | None = None, tls: TlsFiles | None = None, use_stream: bool = True) -> None:
        self.workers: dict[str, PooledWorker] = {}
        self.tls = tls  # client side of the links to workers (services/tls.py)
        self.use_stream = use_stream  # Generate over one GenerateStream per worker (else a call each)
        self.directory = MemberDirectory(etcd_endpoints, membership_pb2.MEMBER_KIND_WORKER, etcd)
        self.directory.add_listener(self._on_member)
        self.store_directory = MemberDirectory(etcd_endpoints, membership_pb2.MEMBER_KIND_KVSTORE, etcd)
        self.poll_interval_s = poll_interval_s
        self._poller: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._departed: set[PooledWorker] = set()  # left etcd; their channels close after LEFT_GRACE_S

    async def start(self) -> None:
        await self.directory.start()
        await self.store_directory.start()
        self._poller = asyncio.create_task(self._poll_loop(), name="worker-load-poller")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.directory.stop()
        await self.store_directory.stop()
        for task in self._closing:
            task.cancel()
        await asyncio.gather(*self._closing, return_exceptions=True)
        await asyncio.gather(*(w.close() for w in [*self.workers.values(), *self._departed]))
        self.workers.clear()
        self._departed.clear()

    def states(self) -> list[WorkerState]:
        return [w.state for w in self.workers.values()]

    def block_size(self, model: str) -> int | None:
        """The KV block size of a model's workers (they must agree: it is the hash granularity)."""
        return next((w.member.worker.block_size for w in self.workers.values()
                     if w.member.worker.model == model and w.member.worker.block_size), None)

    def models(self) -> dict[str, int]:
        """Model name → its context window (the smallest among its workers)."""
        out: dict[str, int] = {}
        for w in self.workers.values():
            info = w.member.worker
            out[info.model] = min(out.get(info.model, info.max_model_len), info.max_model_len)
        return out

    def _on_member(self, member_id: str, member: membership_pb2.Member | None) -> None:
        old = self.workers.pop(member_id, None)
        if member is not None and old is not None and old.member.address == member.address:
            old.member = member  # same process, new record: keep the channel and counters
            self.workers[member_id] = old
            return
        if old is not None:
            log.info("worker %s left (%s)", member_id, old.member.address)
            # Not closed at once: a draining worker revokes its lease first and still streams
            # its in-flight requests (closing the channel would hang them); a dead one's calls
            # have failed already.
            self._departed.add(old)
            task = asyncio.get_running_loop().create_task(old.close(LEFT_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(lambda t, w=old: (self._closing.discard(t), self._departed.discard(w)))
        if member is not None:
            log.info("worker %s joined at %s serving %s", member_id, member.address, member.worker.model)
            self.workers[member_id] = PooledWorker(member, self.tls, self.use_stream)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._poll(w) for w in list(self.workers.values())))
            await asyncio.sleep(self.poll_interval_s)

    async def _poll(self, worker: PooledWorker) -> None:
        asked_at = worker.state.dispatched  # our requests sent before this may be in the answer
        try:
            # At least a second: a short interval must not turn a busy worker's slow answer into no answer.
            load = await worker.stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=max(1.0, self.poll_interval_s))
        except grpc.aio.AioRpcError:
            return  # membership decides liveness; a missed poll keeps the last load
        worker.load = load
        worker.state.report(load.running, load.waiting, load.kv_cache_usage, as_of=asked_at)
