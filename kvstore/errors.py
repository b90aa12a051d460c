"""Errors of the KV store core; the service maps each to one gRPC status.

    InvalidArgument -> INVALID_ARGUMENT (BadRequest detail naming `field`)
    NoSpace         -> RESOURCE_EXHAUSTED (every block is pinned or reserved; retry later)
    LayoutMismatch  -> FAILED_PRECONDITION (block_bytes differs from the layout's)
    UnknownId       -> NOT_FOUND (unknown, finished or expired write_id / pin_id)
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidArgument(KVStoreError, ValueError):
    """An input field is malformed; `field` names it (e.g. "hashes", "lease_s")."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NoSpace(KVStoreError):
    """No RAM slot can be freed: every block is pinned or reserved (or pins are at their limit)."""


class LayoutMismatch(KVStoreError):
    """A write's block_bytes differs from the block_bytes its (model, layout) already has."""

    def __init__(self, model: str, layout: str, block_bytes: int, expected: int) -> None:
        super().__init__(
            f"layout {layout!r} of model {model!r} has block_bytes {expected}, not {block_bytes}")
        self.model = model
        self.layout = layout
        self.block_bytes = block_bytes
        self.expected = expected


class UnknownId(KVStoreError, KeyError):
    """A write_id / pin_id that is unknown, already finished, or whose lease ended."""

    def __str__(self) -> str:  # KeyError's str() adds quotes
        return str(self.args[0]) if self.args else "unknown id"
