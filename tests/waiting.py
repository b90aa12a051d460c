"""Waiting in tests: poll a condition until it holds or a deadline passes, then fail saying what.

One place for it, so every test waits the same way: a 50 ms poll, a deadline stated by the
caller (sized for a loaded 2-core CI machine), and an AssertionError that names the condition.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
POLL_S = 0.05


async def poll(read: Callable[[], T | Awaitable[T]], done: Callable[[T], bool], timeout: float,
               what: str) -> T:
    """Call `read` (sync or async) until `done(value)`; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {value!r})")
        await asyncio.sleep(POLL_S)


async def until(predicate: Callable[[], Any], timeout: float, what: str = "condition",
                detail: Callable[[], str] = lambda: "") -> float:
    """Until `predicate()` (sync or async) is true; the seconds it took."""
    start = time.monotonic()
    try:
        await poll(predicate, bool, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc} {detail()}".rstrip()) from None
    return time.monotonic() - start


def until_sync(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> float:
    """`until` for a test without an event loop (a blocking 50 ms poll)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(POLL_S)
    return time.monotonic() - start
