"""Membership in etcd: register a process under a lease, watch the others.

Layout: `/llm-mesh/v1/<kind>/<id>` → `llm_mesh.v1.Member` as protobuf JSON,
attached to the member's lease. A process that dies stops renewing its lease;
etcd deletes the key after the TTL, and every watcher sees a delete.

Invariants:
- A `Registration` keeps its key present for as long as the context is open,
  re-granting a lease and re-putting the key if the old lease expired (after an
  etcd outage longer than the TTL) — a lapsed lease never stops the process.
- Closing a `Registration` revokes the lease (clean shutdown: watchers see the
  delete at once instead of after the TTL).
- A `MemberDirectory` keeps its last known view while etcd is unreachable and
  resynchronises (full list, then watch from that revision) when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from google.protobuf import json_format

from llm_mesh.v1 import membership_pb2

log = logging.getLogger(__name__)

KEY_ROOT = "/llm-mesh/v1/"
DEFAULT_TTL_S = 10
_RPC_TIMEOUT_S = 2.0
_RETRY_S = 1.0

_KIND_SEGMENT = {
    membership_pb2.MEMBER_KIND_WORKER: "workers",
    membership_pb2.MEMBER_KIND_SCHEDULER: "schedulers",
    membership_pb2.MEMBER_KIND_GATEWAY: "gateways",
    membership_pb2.MEMBER_KIND_KVSTORE: "kvstores",
}
_ETCD_ERRORS = (grpc.aio.AioRpcError, EtcdError, asyncio.TimeoutError, OSError)


def kind_prefix(kind: int) -> str:
    return f"{KEY_ROOT}{_KIND_SEGMENT[kind]}/"


def member_key(member: membership_pb2.Member) -> str:
    return kind_prefix(member.kind) + member.id


def parse_endpoints(value: str | Sequence[str]) -> list[str]:
    """'h1:2379,h2:2379' or a list → ['h1:2379', 'h2:2379']."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [e.strip().removeprefix("http://") for e in items if e.strip()]


def encode(member: membership_pb2.Member) -> bytes:
    return json_format.MessageToJson(member, indent=None).encode()


def decode(value: bytes) -> membership_pb2.Member:
    return json_format.Parse(value, membership_pb2.Member(), ignore_unknown_fields=True)


class Registration:
    """Keeps one member registered in etcd while the async context is open.

        async with Registration(["127.0.0.1:2379"], member, ttl=10) as reg:
            await reg.registered.wait()   # optional: the key is in etcd
            ...serve...
        # lease revoked here

    Keep-alive runs every ttl/3; on etcd errors it retries every second.
    """

    def __init__(self, endpoints: Sequence[str], member: membership_pb2.Member, ttl: int = DEFAULT_TTL_S) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 s")
        self.member = member
        self.ttl = ttl
        self.key = member_key(member)
        self.registered = asyncio.Event()
        self._client = Etcd3Client(list(endpoints), rpc_max_attempts=1)
        self._lease_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Registration:
        await self._client.connect()
        self._task = asyncio.create_task(self._run(), name=f"etcd-registration-{self.member.id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease_id is not None:
            with contextlib.suppress(*_ETCD_ERRORS):
                await self._client.lease.revoke(self._lease_id, timeout=_RPC_TIMEOUT_S)
        await self._client.close()

    def update(self, member: membership_pb2.Member) -> None:
        """Publish a new record for the same id (e.g. a state change)."""
        assert member_key(member) == self.key, "a registration keeps its key"
        self.member = member
        self._changed.set()

    async def _run(self) -> None:
        while True:
            try:
                if self._lease_id is None:
                    lease = await self._client.lease.grant(self.ttl, timeout=_RPC_TIMEOUT_S)
                    await self._client.kv.put(self.key, encode(self.member), lease=lease.ID,
                                              timeout=_RPC_TIMEOUT_S)
                    self._lease_id = lease.ID
                    self.registered.set()
                    log.info("registered %s (lease %x, ttl %ss)", self.key, lease.ID, self.ttl)
                elif self._changed.is_set():
                    self._changed.clear()
                    await self._client.kv.put(self.key, encode(self.member), lease=self._lease_id,
                                              timeout=_RPC_TIMEOUT_S)
                if await self._keep_alive_once() <= 0:
                    log.warning("lease of %s expired; registering again", self.key)
                    self._lease_id = None
                    self.registered.clear()
                    continue
                interval = self.ttl / 3
            except _ETCD_ERRORS as exc:
                log.warning("etcd unreachable for %s (%s); retrying", self.key, type(exc).__name__)
                interval = _RETRY_S
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as
            # the awaited thing completes, and a stop() awaiting this task would hang.
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(interval):
                    await self._changed.wait()

    async def _keep_alive_once(self) -> int:
        """Renew the lease once; returns the TTL left (≤ 0: the lease is gone)."""
        assert self._lease_id is not None
        call = self._client.lease.keep_alive(self._lease_id)
        try:
            async with asyncio.timeout(_RPC_TIMEOUT_S):
                response = await call.read()
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise EtcdError("keep-alive stream closed")
        return response.TTL


MemberListener = Callable[[str, membership_pb2.Member | None], None]


class MemberDirectory:
    """The live members of one kind, kept current by an etcd watch.

    `members` is the last known view; listeners are called with
    (member_id, Member) on put and (member_id, None) on delete.
    """

    def __init__(self, endpoints: Sequence[str], kind: int) -> None:
        self.prefix = kind_prefix(kind)
        self.members: dict[str, membership_pb2.Member] = {}
        self.synced = asyncio.Event()
        self._listeners: list[MemberListener] = []
        self._client = Etcd3Client(list(endpoints), rpc_max_attempts=1,
                                   watch_max_reconnect_backoff_seconds=1.0)
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: MemberListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        await self._client.connect()
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch-{self.prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.close()

    async def _run(self) -> None:
        while True:
            try:
                revision = await self._resync()
                async for response in self._client.watch.watch(
                    self.prefix, range_end=prefix_range_end(self.prefix.encode()), start_revision=revision + 1
                ):
                    for event in response.events:
                        self._apply(event.kv.key.decode(), event.kv.value if event.type == 0 else None)
            except _ETCD_ERRORS as exc:
                log.warning("watch on %s lost (%s); keeping the last view", self.prefix, type(exc).__name__)
            await asyncio.sleep(_RETRY_S)

    async def _resync(self) -> int:
        """List the prefix; replace the view (deleting what vanished); return the revision."""
        response = await self._client.kv.get(self.prefix, range_end=prefix_range_end(self.prefix.encode()),
                                              timeout=_RPC_TIMEOUT_S)
        seen = set()
        for kv in response.kvs:
            key = kv.key.decode()
            seen.add(key.removeprefix(self.prefix))
            self._apply(key, kv.value)
        for member_id in list(self.members):
            if member_id not in seen:
                self._apply(self.prefix + member_id, None)
        self.synced.set()
        return response.header.revision

    def _apply(self, key: str, value: bytes | None) -> None:
        member_id = key.removeprefix(self.prefix)
        if value is None:
            if self.members.pop(member_id, None) is None:
                return
            member = None
        else:
            try:
                member = decode(value)
            except json_format.ParseError:
                log.warning("ignoring malformed member record at %s", key)
                return
            if self.members.get(member_id) == member:
                return
            self.members[member_id] = member
        for listener in self._listeners:
            listener(member_id, member)
