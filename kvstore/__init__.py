"""KV block storage core: tiers, eviction, pins, integrity -- no I/O (see kvstore/README.md).

`BlockStore` is the whole store; services/kvstore_service.py serves it over gRPC/NIXL and
services/kvstore_disk.py gives it a filesystem disk tier.
"""

from kvstore.errors import InvalidArgument, KVStoreError, LayoutMismatch, NoSpace, UnknownId
from kvstore.store import MAX_CHAIN, MAX_LEASE_S, BlockStore, RecoveryReport
from kvstore.types import (
    REMOVED,
    STORED,
    ChunkKey,
    CommitResult,
    DiskBackend,
    Event,
    LookupResult,
    PinResult,
    PutResult,
    Reservation,
    Slot,
    Stats,
    TierStats,
    checksum,
)

__all__ = [
    "MAX_CHAIN", "MAX_LEASE_S", "REMOVED", "STORED",
    "BlockStore", "ChunkKey", "CommitResult", "DiskBackend", "Event", "InvalidArgument", "KVStoreError",
    "LayoutMismatch", "LookupResult", "NoSpace", "PinResult", "PutResult", "RecoveryReport", "Reservation",
    "Slot", "Stats", "TierStats", "UnknownId", "checksum",
]
