"""Membership against a real etcd: leases, revocation, expiry, watches, and a
worker killed with SIGKILL leaving the scheduler's routing within the TTL."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc

from llm_mesh.v1 import inference_pb2, inference_pb2_grpc, membership_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.etcd_server import EtcdServer
from services.membership import MemberDirectory, Registration
from tests.conftest import SIM_ARGS, free_port, start_mesh
from tests.waiting import until


def worker_member(member_id: str) -> membership_pb2.Member:
    return membership_pb2.Member(id=member_id, kind=membership_pb2.MEMBER_KIND_WORKER, address="127.0.0.1:1",
                                 worker=membership_pb2.WorkerInfo(model="m", max_model_len=100))


async def test_register_watch_and_revoke_on_exit(etcd):
    directory = MemberDirectory([etcd.endpoint], membership_pb2.MEMBER_KIND_WORKER)
    seen = []
    # The session's etcd also holds other tests' workers: watch only ours.
    directory.add_listener(lambda member_id, member: member_id == "reg-a" and seen.append((member_id, member is not None)))
    await directory.start()
    try:
        async with Registration([etcd.endpoint], worker_member("reg-a"), ttl=5) as registration:
            await registration.registered.wait()
            await until(lambda: "reg-a" in directory.members, 2)
            assert directory.members["reg-a"].worker.model == "m"
        # Revoked on a clean exit: gone at once, not after the 5 s TTL (3 s leaves a loaded machine
        # room and is still well short of the TTL).
        assert await until(lambda: "reg-a" not in directory.members, 3.0) < 3.0
        assert seen == [("reg-a", True), ("reg-a", False)]
    finally:
        await directory.stop()


async def test_update_republishes_the_record(etcd):
    directory = MemberDirectory([etcd.endpoint], membership_pb2.MEMBER_KIND_WORKER)
    await directory.start()
    try:
        async with Registration([etcd.endpoint], worker_member("reg-b"), ttl=5) as registration:
            await registration.registered.wait()
            updated = worker_member("reg-b")
            updated.address = "127.0.0.1:2"
            registration.update(updated)
            await until(lambda: directory.members.get("reg-b", updated).address == "127.0.0.1:2", 2)
    finally:
        await directory.stop()


async def test_outage_keeps_the_view_and_re_registers(tmp_path):
    server = EtcdServer(tmp_path / "etcd", free_port(), free_port())
    server.start()
    directory = MemberDirectory([server.endpoint], membership_pb2.MEMBER_KIND_WORKER)
    await directory.start()
    try:
        async with Registration([server.endpoint], worker_member("reg-c"), ttl=2) as registration:
            await registration.registered.wait()
            await until(lambda: "reg-c" in directory.members, 2)
            server.pause()  # etcd hangs: no answers, sockets open
            await asyncio.sleep(4)
            assert "reg-c" in directory.members, "the last known view must survive an etcd outage"
            server.resume()
            # The lease lapsed during the outage: the registration grants a new one.
            await until(lambda: registration.registered.is_set() and "reg-c" in directory.members, 10)
            await asyncio.sleep(3)  # longer than the TTL: the new lease is being kept alive
            assert "reg-c" in directory.members
    finally:
        server.resume()
        await directory.stop()
        server.stop()


async def test_killed_worker_leaves_routing_within_the_ttl(tmp_path, model_dir):
    ttl = 3
    server = EtcdServer(tmp_path / "etcd", free_port(), free_port())
    server.start()
    mesh = start_mesh(server, tmp_path / "logs", model_dir, [SIM_ARGS] * 3, lease_ttl=ttl)
    try:
        async with grpc.aio.insecure_channel(mesh.scheduler_address) as channel:
            admin = scheduler_pb2_grpc.SchedulerStub(channel)
            inference = inference_pb2_grpc.InferenceStub(channel)

            async def live() -> set[str]:
                listed = await admin.ListWorkers(scheduler_pb2.ListWorkersRequest())
                return {w.member.address for w in listed.workers}

            assert await live() == set(mesh.workers)
            victim_address, victim = next(iter(mesh.workers.items()))
            victim.signal(signal.SIGKILL)
            killed_at = time.monotonic()
            while victim_address in await live():
                assert time.monotonic() - killed_at < ttl + 1.5, "dead worker still routed after the TTL"
                await asyncio.sleep(0.1)
            gone_after = time.monotonic() - killed_at
            print(f"killed worker left routing after {gone_after:.2f}s (ttl {ttl}s)")

            request = inference_pb2.GenerateRequest(model=mesh.model, prompt="after the kill")
            request.sampling.max_tokens = 4
            served_by = set()
            for _ in range(6):
                responses = [r async for r in inference.Generate(request)]
                assert responses[-1].usage.completion_tokens == 4
                served_by.add(responses[0].worker_id)
            assert len(served_by) == 2
    finally:
        mesh.stop()
        server.stop()


async def test_registers_within_seconds_once_a_refusing_etcd_comes_up(tmp_path):
    """etcd's port refuses connections for a while (down, not hung): gRPC's reconnect backoff
    would grow towards 2 minutes; capped (services/membership.py), the registration lands
    within a few seconds of etcd's return."""
    server = EtcdServer(tmp_path / "etcd", free_port(), free_port())
    async with Registration([server.endpoint], worker_member("late-etcd"), ttl=5) as registration:
        await asyncio.sleep(30)  # failed reconnects all along: uncapped, the next try would be 10-20 s away
        server.start()
        try:
            assert await until(registration.registered.is_set, 6) < 6
        finally:
            server.stop()
