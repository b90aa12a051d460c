"""The tests' wait helpers (tests/waiting.py): they return when the condition holds, fail naming it."""

import asyncio
import itertools

import pytest

from tests.waiting import poll, until, until_sync


async def test_poll_returns_the_first_value_that_is_done_sync_or_async():
    counter = itertools.count()
    assert await poll(lambda: next(counter), lambda v: v >= 3, 5, "count") == 3

    async def read():
        await asyncio.sleep(0)
        return next(counter)

    assert await poll(read, lambda v: v >= 6, 5, "count") == 6


async def test_until_times_out_naming_the_condition_and_its_detail():
    with pytest.raises(AssertionError, match=r"never: not within 0.2s \(last: False\) seen 0"):
        await until(lambda: False, 0.2, "never", detail=lambda: "seen 0")


async def test_until_returns_the_time_it_took():
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.2, flag.set)
    took = await until(flag.is_set, 5, "flag")
    assert 0.15 <= took < 5


def test_until_sync():
    values = iter([0, 0, 1])
    assert until_sync(lambda: next(values), 5, "third") >= 0.1  # two 50 ms polls first
    with pytest.raises(AssertionError, match="never: not within 0.1s"):
        until_sync(lambda: False, 0.1, "never")
