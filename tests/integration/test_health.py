"""Health and readiness with the standard clients (grpc.health.v1 Check/Watch, server
reflection, HTTP probes) against real processes and a real etcd:
- "liveness" is SERVING as soon as a server runs (also while its lease is lost);
- readiness ("" and the services' own names) is SERVING only when the process can serve:
  a worker once registered (and still while an etcd outage outlasts its lease: the mesh
  keeps serving from its last view), a scheduler while it knows a routable worker;
- SIGTERM makes readiness NOT_SERVING before the server stops."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from etcd3aio import Etcd3Client, prefix_range_end
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from llm_mesh.v1 import membership_pb2, worker_pb2, worker_pb2_grpc
from services.etcd_server import EtcdServer
from services.gateway import build_app
from services.membership import kind_prefix
from services.procs import Child
from services.readiness import LIVENESS
from tests.conftest import SIM_ARGS, free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WORKER = "llm_mesh.v1.Worker"
INFERENCE = "llm_mesh.v1.Inference"
SCHEDULER = "llm_mesh.v1.Scheduler"


async def check(address: str, service: str) -> int | None:
    """The Check status, or None while nothing answers."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.aio.AioRpcError:
            return None
    return reply.status


async def until(address: str, service: str, status: int, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await check(address, service)) != status:
        assert asyncio.get_running_loop().time() < deadline, f"{address} {service!r}: {got}, not {status}"
        await asyncio.sleep(0.1)


class Watch:
    """One Health.Watch stream; `next()` is the next status it announces."""

    def __init__(self, channel: grpc.aio.Channel, service: str) -> None:
        self.call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service))

    async def next(self, timeout: float) -> int:
        reply = await asyncio.wait_for(self.call.read(), timeout)
        assert reply is not grpc.aio.EOF, "the Watch stream ended"
        return reply.status


def start_worker(etcd: str, log_dir, *extra: str) -> tuple[str, Child]:
    port = free_port()
    child = Child.llm_mesh(f"worker-{port}", ["worker", *SIM_ARGS, "--port", str(port), "--etcd", etcd,
                                              "--drain-seconds", "3", *extra], log_dir)
    child.start()
    return f"127.0.0.1:{port}", child


@pytest.fixture
async def etcd(tmp_path) -> AsyncIterator[EtcdServer]:
    """Not started: each test decides when."""
    server = EtcdServer(tmp_path / "etcd", free_port(), free_port())
    yield server
    server.stop()


async def engine_loaded(address: str, timeout: float) -> None:
    """Until GetLoad reports the engine's KV blocks (0 while it loads)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        while not (await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.GetLoadRequest())).kv_blocks_total:
            assert asyncio.get_running_loop().time() < deadline, "the engine did not load"
            await asyncio.sleep(0.1)


async def registered(endpoint: str, prefix: str, timeout: float) -> None:
    """Until a member is registered under `prefix`."""
    client = Etcd3Client([endpoint])
    await client.connect()
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while not (await client.kv.get(prefix, range_end=prefix_range_end(prefix.encode()), timeout=5)).kvs:
            assert asyncio.get_running_loop().time() < deadline, f"nothing registered under {prefix}"
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def reflected_methods(address: str, service: str) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert service in set(db.get_services())
        return {m.name for m in DescriptorPool(db).FindServiceByName(service).methods}


async def test_worker_ready_only_while_registered(etcd, tmp_path) -> None:
    # etcd answers nothing (stopped, sockets open; a refused port would put the client in
    # gRPC's reconnect backoff instead): the worker loads its engine but cannot register.
    etcd.start()
    etcd.pause()
    address, worker = start_worker(etcd.endpoint, tmp_path, "--lease-ttl", "2")
    try:
        try:
            await until(address, LIVENESS, SERVING, 60)
            await engine_loaded(address, 60)  # only the lease is missing now
            assert await check(address, "") == NOT_SERVING
            assert await check(address, WORKER) == NOT_SERVING
        finally:
            etcd.resume()
        assert {"Generate", "Abort", "GetLoad", "WatchKVEvents"} <= reflected_methods(address, WORKER)
        async with grpc.aio.insecure_channel(address) as channel:
            watch = Watch(channel, WORKER)
            first = await watch.next(5)
            if first == NOT_SERVING:
                assert await watch.next(10) == SERVING
            assert await check(address, "") == SERVING
            assert await check(address, "") == SERVING

            # An etcd outage longer than the TTL (2 s): the worker stays ready — the mesh serves
            # from its last known view — and registers again when etcd is back.
            etcd.pause()
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await watch.next(5)  # no change announced (the timeout ends this stream)
                assert await check(address, WORKER) == SERVING
            finally:
                etcd.resume()
            await registered(etcd.endpoint, "/llm-mesh/v1/workers/", 15)
            watch = Watch(channel, WORKER)
            assert await watch.next(5) == SERVING

            worker.signal(signal.SIGTERM)
            assert await watch.next(5) == NOT_SERVING  # on an open stream, before the server stops
        # It exits by itself, cleanly: stop() would send a second SIGTERM, which after the event
        # loop has closed (its handlers gone) ends the process with -15 during its last teardown.
        assert await asyncio.to_thread(worker.process.wait, 30) == 0, worker.tail()
    finally:
        assert worker.stop() == 0, worker.tail()


async def test_scheduler_ready_only_with_a_routable_worker(etcd, tmp_path, model_dir) -> None:
    from services.model_fetch import DEFAULT_MODEL_NAME

    etcd.start()
    port = free_port()
    address = f"127.0.0.1:{port}"
    scheduler = Child.llm_mesh("scheduler", ["scheduler", "--port", str(port), "--etcd", etcd.endpoint,
                                             "--model", f"{DEFAULT_MODEL_NAME}={model_dir}"], tmp_path)
    scheduler.start()
    # Forking while this process runs gRPC calls can crash the child (grpc fork handlers):
    # start the workers now, frozen (SIGSTOP) before they register; SIGCONT lets one join.
    workers = [start_worker(etcd.endpoint, tmp_path)[1] for _ in range(2)]
    for worker in workers:
        worker.signal(signal.SIGSTOP)
    first, second = workers
    app = build_app(address)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as gateway, \
                grpc.aio.insecure_channel(address) as channel:
            await until(address, LIVENESS, SERVING, 60)
            await registered(etcd.endpoint, kind_prefix(membership_pb2.MEMBER_KIND_SCHEDULER), 10)
            await asyncio.sleep(0.5)  # a readiness interval: no worker is what keeps it unready
            for name in ("", INFERENCE, SCHEDULER):
                assert await check(address, name) == NOT_SERVING, name
            assert {"Generate", "CreateChatCompletion", "StreamChatCompletion", "ListModels"} <= \
                reflected_methods(address, INFERENCE)
            assert {"ListWorkers", "Explain"} <= reflected_methods(address, SCHEDULER)
            assert (await gateway.get("/health/live")).status_code == 200
            not_ready = await gateway.get("/health/ready")
            assert not_ready.status_code == 503 and "NOT_SERVING" in not_ready.json()["reason"]
            assert (await gateway.get("/health")).status_code == 200  # unchanged: the scheduler answers

            watch = Watch(channel, INFERENCE)
            assert await watch.next(5) == NOT_SERVING
            first.signal(signal.SIGCONT)
            assert await watch.next(60) == SERVING
            assert await check(address, "") == SERVING
            assert (await gateway.get("/health/ready")).status_code == 200

            first.signal(signal.SIGTERM)  # its lease is revoked: the scheduler has no worker left
            assert await watch.next(10) == NOT_SERVING
            second.signal(signal.SIGCONT)
            assert await watch.next(60) == SERVING

            scheduler.signal(signal.SIGTERM)
            assert await watch.next(5) == NOT_SERVING  # before the server stops
            assert scheduler.process.wait(15) == 0, scheduler.tail()
            gone = await gateway.get("/health/ready")
            assert gone.status_code == 503 and "UNAVAILABLE" in gone.json()["reason"]
            assert (await gateway.get("/health/live")).status_code == 200
    finally:
        for child in [scheduler, *workers]:
            child.signal(signal.SIGCONT)
            child.stop()


async def test_stop_signals_repeated_until_exit_still_exit_cleanly(etcd, tmp_path) -> None:
    """A supervisor may signal again while a process winds down (Kubernetes and `llm-mesh up`
    both can): SIGTERM every 5 ms until the worker exits, through its drain, its loop's close and
    its last teardown. Without a handler after the loop closes, one of them ends it with -15."""
    etcd.start()
    address, worker = start_worker(etcd.endpoint, tmp_path, "--drain-seconds", "0.5")
    try:
        await until(address, "", SERVING, 60)
        sent = 0
        while worker.process.poll() is None:
            worker.signal(signal.SIGTERM)
            sent += 1
            await asyncio.sleep(0.005)
            assert sent < 6000, "the worker did not exit within 30 s"
        assert sent > 1
        assert worker.process.returncode == 0, worker.tail()
    finally:
        worker.stop()
