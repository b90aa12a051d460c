"""The worker's side of `Worker.WatchKVEvents`: its engine's KV events,
numbered, kept for replay, and folded into the set of blocks it holds.

The engine hands events to `KVEventLog.append` (its KV event sink). The log
- folds them into set transitions per (tier, model, hash) (the model is ""
  from a worker, named by a KV store holding several): the engine may hold two
  blocks with one hash (vLLM does, for concurrent identical prefixes), so it
  counts references and announces a hash stored on 0 → 1 and removed on
  1 → 0 only. Subscribers therefore need no reference counts;
- numbers the resulting protobuf events 1, 2, 3… within an `epoch` (random
  per process: a restarted worker never continues an old numbering);
- keeps the last `capacity` events in a ring for replay, and the live set,
  so a subscriber that is new, lagging (its position left the ring) or from
  another epoch gets a snapshot (reset + every live block) and then deltas.

Invariant: for every seq S, the snapshot taken at S followed by events
S+1… equals the live set after them — so every subscriber, whatever its
history, converges on the same view. All methods run on one event loop;
`append` never awaits, so a snapshot is atomic with respect to events.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence

from llm_mesh.v1 import worker_pb2
from services.engines.base import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

DEFAULT_CAPACITY = 65536  # events kept for replay (~100 B each without tokens)
MAX_BATCH_EVENTS = 512  # events per delta message
SNAPSHOT_CHUNK = 8192  # hashes per snapshot message (~75 KB)
DEFAULT_HEARTBEAT_S = 2.0
# Under a steady flow of events a subscriber gets at most one delta per interval (all events since
# the last in it); the first after a quiet spell goes at once, and a backlog (full batches) is sent
# without waiting. Each message costs both ends a gRPC write/read and a wake-up: a zero-latency sim
# engine produced one per request, ~10% of the scheduler's CPU at 1,000 req/s. 10 ms is an engine
# step on a GPU; vLLM publishes its events once per step anyway.
DEFAULT_SEND_INTERVAL_S = 0.01

_MEDIUM_TIERS = {
    None: worker_pb2.KV_TIER_ENGINE, "GPU": worker_pb2.KV_TIER_ENGINE, "ENGINE": worker_pb2.KV_TIER_ENGINE,
    "CPU": worker_pb2.KV_TIER_HOST, "HOST": worker_pb2.KV_TIER_HOST,
    "DISK": worker_pb2.KV_TIER_DISK, "STORAGE": worker_pb2.KV_TIER_DISK,
    "STORE": worker_pb2.KV_TIER_STORE,  # a KV store's own blocks (services/kvstore_service.py)
}


def tier_of_medium(medium: str | None) -> int:
    """vLLM's `medium` → KVTier: the engine's own memory (GPU, or unnamed) is
    ENGINE, CPU offload HOST, disk/storage DISK; STORE is a KV store's. An unknown medium counts as
    DISK, the cheapest tier a hit is credited at: never over-promise."""
    return _MEDIUM_TIERS.get(medium.upper() if medium is not None else None, worker_pb2.KV_TIER_DISK)


class KVEventLog:
    """Numbered KV events of one worker (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, block_size: int = 0, keep_token_ids: bool = False,
                 send_interval_s: float = DEFAULT_SEND_INTERVAL_S) -> None:
        """`keep_token_ids`: keep BlockStored tokens for subscribers that ask for
        them. Off by default: a prefill event carries every token of its blocks,
        so the ring would cost up to capacity × prompt size; hashes alone cost
        ~100 bytes an event. `send_interval_s`: see DEFAULT_SEND_INTERVAL_S (0: a
        message as soon as there is an event)."""
        if capacity < 1:
            raise ValueError("capacity must be positive")
        if send_interval_s < 0:
            raise ValueError("send_interval_s must be >= 0")
        self.send_interval_s = send_interval_s
        self.keep_token_ids = keep_token_ids
        self.epoch = secrets.token_hex(8)
        self.seq = 0  # number of the last event
        self.capacity = capacity
        self.block_size = block_size  # reported in snapshots; set once the engine is known
        # Ring: event seq s is at _ring[s % capacity] as (with tokens, without tokens).
        self._ring: list[tuple[worker_pb2.KVEvent, worker_pb2.KVEvent] | None] = [None] * capacity
        # (tier, model) → hash → engine blocks holding it; model "" from a worker (its own model).
        self._live: dict[tuple[int, str], dict[int, int]] = {}
        self._wakeup: asyncio.Event | None = None
        self.closed = False

    # --- the engine's sink ---------------------------------------------------

    def append(self, events: Sequence[KVEvent]) -> None:
        """Fold engine events into the live set and number what changed it."""
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event)
            elif isinstance(event, BlockRemoved):
                self._removed(event)
            elif isinstance(event, AllBlocksCleared):
                self._cleared(event)
            else:
                raise TypeError(f"not a KV event: {event!r}")
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    def _stored(self, event: BlockStored) -> None:
        tier = tier_of_medium(event.medium)
        counts = self._live.setdefault((tier, event.model), {})
        hashes = event.block_hashes
        tokens = event.token_ids
        per_block = len(tokens) // len(hashes) if hashes and len(tokens) % len(hashes) == 0 else 0
        run_start, prev, run_parent = -1, event.parent_block_hash, None
        for i, h in enumerate(hashes):
            held = counts.get(h, 0)
            counts[h] = held + 1
            if held == 0 and run_start < 0:
                run_start, run_parent = i, prev
            elif held and run_start >= 0:
                self._emit_stored(event, tier, run_start, i, run_parent, per_block)
                run_start = -1
            prev = h
        if run_start >= 0:
            self._emit_stored(event, tier, run_start, len(hashes), run_parent, per_block)

    def _emit_stored(self, event: BlockStored, tier: int, start: int, end: int, parent: int | None,
                     per_block: int) -> None:
        lean = worker_pb2.KVEvent(stored=worker_pb2.BlockStored(
            block_hashes=event.block_hashes[start:end], parent_block_hash=parent,
            block_size=event.block_size, tier=tier, model=event.model))
        full = lean
        if per_block and event.token_ids and self.keep_token_ids:
            full = worker_pb2.KVEvent()
            full.CopyFrom(lean)
            full.stored.token_ids.extend(event.token_ids[start * per_block:end * per_block])
        self._push(full, lean)

    def _removed(self, event: BlockRemoved) -> None:
        tier = tier_of_medium(event.medium)
        counts = self._live.get((tier, event.model), {})
        gone = []
        for h in event.block_hashes:
            held = counts.get(h)
            if held is None:
                continue  # never announced (e.g. stored before an unrecoverable gap): nothing to undo
            if held == 1:
                del counts[h]
                gone.append(h)
            else:
                counts[h] = held - 1
        if gone:
            removed = worker_pb2.KVEvent(removed=worker_pb2.BlockRemoved(block_hashes=gone, tier=tier,
                                                                         model=event.model))
            self._push(removed, removed)

    def _cleared(self, event: AllBlocksCleared) -> None:
        if event.medium is None:
            self._live.clear()
            tier = worker_pb2.KV_TIER_UNSPECIFIED
        else:
            tier = tier_of_medium(event.medium)
            for key in [k for k in self._live if k[0] == tier]:
                del self._live[key]
        cleared = worker_pb2.KVEvent(cleared=worker_pb2.AllBlocksCleared(tier=tier))
        self._push(cleared, cleared)

    def _push(self, full: worker_pb2.KVEvent, lean: worker_pb2.KVEvent) -> None:
        self.seq += 1
        self._ring[self.seq % self.capacity] = (full, lean)

    # --- reading -------------------------------------------------------------

    @property
    def oldest_seq(self) -> int:
        """The first seq still in the ring (seq + 1 when empty)."""
        return max(1, self.seq - self.capacity + 1)

    def live_blocks(self) -> dict[int, set[int]]:
        """tier → hashes held now, all models (a copy; for tests and debugging)."""
        out: dict[int, set[int]] = {}
        for (tier, _), counts in self._live.items():
            if counts:
                out.setdefault(tier, set()).update(counts)
        return out

    def read(self, after_seq: int, limit: int = MAX_BATCH_EVENTS,
             with_tokens: bool = False) -> list[worker_pb2.KVEvent] | None:
        """Events after `after_seq` (at most `limit`); None if they are no
        longer in the ring or `after_seq` is ahead of the log."""
        if after_seq > self.seq or after_seq + 1 < self.oldest_seq:
            return None
        variant = 0 if with_tokens else 1
        end = min(self.seq, after_seq + limit)
        ring, cap = self._ring, self.capacity
        return [ring[s % cap][variant] for s in range(after_seq + 1, end + 1)]  # type: ignore[index]

    def snapshot(self) -> tuple[int, list[worker_pb2.KVEvent]]:
        """(seq, BlockStored events of every live block), consistent at seq."""
        events = []
        for (tier, model), counts in self._live.items():
            hashes = list(counts)
            for i in range(0, len(hashes), SNAPSHOT_CHUNK):
                events.append(worker_pb2.KVEvent(stored=worker_pb2.BlockStored(
                    block_hashes=hashes[i:i + SNAPSHOT_CHUNK], block_size=self.block_size, tier=tier, model=model)))
        return self.seq, events

    async def wait(self, after_seq: int, timeout: float) -> bool:
        """Until an event after `after_seq` exists or the log closes; False on timeout."""
        if self.seq > after_seq or self.closed:
            return True
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        wakeup = self._wakeup
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                await wakeup.wait()
            return True
        return False

    def close(self) -> None:
        """End every watch (worker shutdown)."""
        self.closed = True
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def watch(self, request: worker_pb2.WatchKVEventsRequest,
                    heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> AsyncIterator[worker_pb2.KVEventBatch]:
        """The stream of `WatchKVEvents`: a replay or a snapshot, then deltas
        (at most one per `send_interval_s` while they keep coming) and
        heartbeats, until the log closes. A subscriber that falls out of the
        ring while streaming (too slow) gets a new snapshot in-stream."""
        epoch, tokens = self.epoch, request.include_token_ids
        cursor: int | None = request.after_seq if request.epoch == epoch else None
        while not self.closed:
            events = self.read(cursor, with_tokens=tokens) if cursor is not None else None
            if events is None:
                seq, stored = self.snapshot()
                for i in range(max(1, len(stored))):
                    yield worker_pb2.KVEventBatch(epoch=epoch, seq=seq, snapshot=True, reset=i == 0,
                                                  events=stored[i:i + 1])
                cursor = seq
                events = self.read(cursor, with_tokens=tokens)
                if events is None:
                    continue  # overflowed while the snapshot was sent: another one
                # Ends the snapshot, even when empty.
                cursor += len(events)
                yield worker_pb2.KVEventBatch(epoch=epoch, seq=cursor, events=events)
            elif events:
                cursor += len(events)
                yield worker_pb2.KVEventBatch(epoch=epoch, seq=cursor, events=events)
                if self.send_interval_s and len(events) < MAX_BATCH_EVENTS:  # drained: gather the next ones
                    await asyncio.sleep(self.send_interval_s)
            elif not await self.wait(cursor, heartbeat_s):
                yield worker_pb2.KVEventBatch(epoch=epoch, seq=cursor)
