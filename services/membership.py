"""Membership in etcd: register a process under a lease, watch the others.

Layout: `/llm-mesh/v1/<kind>/<id>` → `llm_mesh.v1.Member` as protobuf JSON,
attached to the member's lease. A process that dies stops renewing its lease;
etcd deletes the key after the TTL, and every watcher sees a delete. A worker
whose engine moves KV over NIXL also keeps `/llm-mesh/v1/nixl/<id>` →
`llm_mesh.v1.NixlAgentMetadata` under the same lease (Registration.attach).

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

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import pathlib
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


def nixl_metadata_key(member_id: str) -> str:
    """Where a worker or KV store keeps its NIXL agent metadata (under its lease)."""
    return f"{KEY_ROOT}nixl/{member_id}"


KVCHUNKS_ROOT = f"{KEY_ROOT}kvchunks/"


def kvchunk_prefix(store_id: str | None = None) -> str:
    """Prefix of the KV stores' chunk records (llm_mesh.v1.KVStoreChunk as protobuf JSON,
    under the store's lease): all stores', or one store's."""
    return KVCHUNKS_ROOT if store_id is None else f"{KVCHUNKS_ROOT}{store_id}/"


def kvchunk_key(store_id: str, model: str, first_block_hash: int) -> str:
    """`/llm-mesh/v1/kvchunks/<store id>/<model>/<first block hash, 16 hex digits>`."""
    return f"{kvchunk_prefix(store_id)}{model}/{first_block_hash:016x}"


def parse_endpoints(value: str | Sequence[str]) -> list[str]:
    """'h1:2379,h2:2379' or a list → ['h1:2379', 'h2:2379']."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [e.strip().removeprefix("http://") for e in items if e.strip()]


@dataclasses.dataclass(frozen=True)
class EtcdSettings:
    """How this process reaches etcd beyond its endpoints: TLS (verify etcd against `ca`;
    `cert`/`key` for etcd's --client-cert-auth) and user/password auth. Defaults: plaintext, no auth."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None

    def client_options(self) -> dict[str, bytes]:
        """etcd3aio's TLS keyword arguments (ca_cert, cert_key, cert_chain), files read now."""
        if (self.cert or self.key) and not self.ca:
            raise SystemExit("--etcd-cert/--etcd-key need --etcd-ca")
        pairs = {"ca_cert": self.ca, "cert_key": self.key, "cert_chain": self.cert}
        return {name: pathlib.Path(path).read_bytes() for name, path in pairs.items() if path}

    def password(self) -> str:
        if not self.password_file:
            raise SystemExit("--etcd-user needs --etcd-password-file")
        return pathlib.Path(self.password_file).read_text().strip()

    def cli_args(self) -> list[str]:
        """The flags that give a child process the same settings (`llm-mesh up`)."""
        pairs = [("--etcd-ca", self.ca), ("--etcd-cert", self.cert), ("--etcd-key", self.key),
                 ("--etcd-user", self.user), ("--etcd-password-file", self.password_file)]
        return [item for flag, value in pairs if value for item in (flag, value)]


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("etcd TLS and auth (off when not given)")
    group.add_argument("--etcd-ca", default=None, help="PEM CA to verify etcd against (turns TLS on)")
    group.add_argument("--etcd-cert", default=None, help="PEM client certificate for etcd's --client-cert-auth")
    group.add_argument("--etcd-key", default=None, help="PEM private key of --etcd-cert")
    group.add_argument("--etcd-user", default=None, help="etcd user (etcd auth enabled)")
    group.add_argument("--etcd-password-file", default=None, help="file holding the password of --etcd-user")


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    return EtcdSettings(*(getattr(args, name, None) for name in
                          ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file")))


_TOKEN_REFRESH_S = 240.0  # etcd's simple tokens live 300 s by default


_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                      ("grpc.max_reconnect_backoff_ms", 2000)]


class EtcdConnection:
    """The one place an etcd client is built: an etcd3aio client with these settings. With a
    user, `connect` keeps an auth token fresh in the background (retrying while etcd is down,
    so a process still starts, and keeps serving, through an outage)."""

    def __init__(self, endpoints: Sequence[str], settings: EtcdSettings | None = None, **options: object) -> None:
        self.settings = settings or EtcdSettings()
        self._password = self.settings.password() if self.settings.user else None
        self.client = Etcd3Client(list(endpoints), **options, **self.settings.client_options())
        # gRPC's reconnect backoff grows to ~2 min by default: after an etcd outage a process would
        # wait that long to re-register. etcd3aio (pinned <0.4) takes channel options only through
        # its connection manager's list; without it we keep the default backoff.
        grpc_options = getattr(getattr(self.client, "_manager", None), "grpc_options", None)
        if isinstance(grpc_options, list):
            grpc_options.extend(_RECONNECT_OPTIONS)
        self._auth_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self.client.connect()
        if self._password is not None:
            authenticated = await self._authenticate()  # before the first request, when etcd is up
            self._auth_task = asyncio.create_task(self._keep_token(authenticated), name="etcd-auth")

    async def close(self) -> None:
        if self._auth_task is not None:
            self._auth_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._auth_task
        await self.client.close()

    async def _authenticate(self) -> bool:
        assert self.settings.user and self._password is not None
        try:
            reply = await self.client.auth.authenticate(self.settings.user, self._password,
                                                        timeout=_RPC_TIMEOUT_S)
        except _ETCD_ERRORS as exc:
            log.warning("etcd authentication as %s failed (%s); retrying", self.settings.user,
                        type(exc).__name__)
            return False
        self.client.set_token(reply.token)
        return True

    async def _keep_token(self, authenticated: bool) -> None:
        while True:
            await asyncio.sleep(_TOKEN_REFRESH_S if authenticated else _RETRY_S)
            authenticated = await self._authenticate()


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

    Health, for readiness and metrics (services/readiness.py, services/metrics.py read it;
    this module stays free of both): `healthy` (the last keep-alive succeeded),
    `ever_registered`, `keepalive_failures` and `registrations` (lifetime counts).
    """

    def __init__(self, endpoints: Sequence[str], member: membership_pb2.Member, ttl: int = DEFAULT_TTL_S,
                 etcd: EtcdSettings | None = None) -> None:
        if ttl < 2:
            raise ValueError("lease TTL must be at least 2 s")
        self.member = member
        self.ttl = ttl
        self.key = member_key(member)
        self.registered = asyncio.Event()
        self._etcd = EtcdConnection(endpoints, etcd, rpc_max_attempts=1)
        self._client = self._etcd.client
        self._lease_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._attached: dict[str, bytes] = {}  # other keys under the same lease
        self.healthy = False
        self.keepalive_failures = 0
        self.registrations = 0  # grants of a lease + put; every one after the first is a re-registration

    @property
    def lease_id(self) -> int | None:
        """The lease held now (None: none yet, or it lapsed and a new one is being granted).
        Other keys kept under it (services/kvstore_service.py's chunk records) must be
        written again when it changes: a lapsed lease took them with it."""
        return self._lease_id

    @property
    def ever_registered(self) -> bool:
        """Registered at least once. Readiness keys on this, not on the lease being alive: through an
        etcd outage the process keeps serving (schedulers keep their last view of the
        workers), and it registers again when etcd returns; only a drain ends readiness."""
        return self.registrations > 0

    async def __aenter__(self) -> Registration:
        await self._etcd.connect()
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
        await self._etcd.close()

    def attach(self, key: str, value: bytes) -> None:
        """Keep `key` in etcd under this member's lease (e.g. its NIXL agent metadata):
        written with the member record, re-written on re-registration, gone with the lease."""
        self._attached[key] = value
        self._changed.set()

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
                    await self._put_all(lease.ID)
                    self._lease_id = lease.ID
                    self.registrations += 1
                    self.registered.set()
                    log.info("registered %s (lease %x, ttl %ss)", self.key, lease.ID, self.ttl)
                elif self._changed.is_set():
                    self._changed.clear()
                    await self._put_all(self._lease_id)
                left = await self._keep_alive_once()
                if left <= 0:
                    log.warning("lease of %s expired; registering again", self.key)
                    self._lease_id, self.healthy = None, False
                    self.registered.clear()
                    continue
                self.healthy = True
                interval = self.ttl / 3
            except _ETCD_ERRORS as exc:
                log.warning("etcd unreachable for %s (%s); retrying", self.key, type(exc).__name__)
                self.healthy = False
                self.keepalive_failures += 1
                interval = _RETRY_S
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as
            # the awaited thing completes, and a stop() awaiting this task would hang.
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(interval):
                    await self._changed.wait()

    async def _put_all(self, lease_id: int) -> None:
        # Attachments first: a watcher that sees the member record can read them at once.
        for key, value in self._attached.items():
            await self._client.kv.put(key, value, lease=lease_id, timeout=_RPC_TIMEOUT_S)
        await self._client.kv.put(self.key, encode(self.member), lease=lease_id, timeout=_RPC_TIMEOUT_S)

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

    def __init__(self, endpoints: Sequence[str], kind: int, etcd: EtcdSettings | None = None) -> None:
        self.prefix = kind_prefix(kind)
        self.members: dict[str, membership_pb2.Member] = {}
        self.synced = asyncio.Event()
        self._listeners: list[MemberListener] = []
        self._etcd = EtcdConnection(endpoints, etcd, rpc_max_attempts=1, watch_max_reconnect_backoff_seconds=1.0)
        self._client = self._etcd.client
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: MemberListener) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        await self._etcd.connect()
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch-{self.prefix}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._etcd.close()

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
