"""Request and attempt ids (services.requests.IDS): unique without a syscall per id, and not
shared with a forked child."""

from __future__ import annotations

import os
import re

from services.requests import IDS, _Ids


def test_request_ids_are_32_hex_and_unique() -> None:
    ids = [IDS.request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_attempt_ids_differ_per_try_and_name_their_request() -> None:
    tries = [IDS.attempt_id("client-id") for _ in range(100)]
    assert len(set(tries)) == 100
    assert all(t.startswith("client-id-") for t in tries)


def test_two_generators_draw_different_prefixes() -> None:
    a, b = _Ids(), _Ids()
    assert a.request_id()[:16] != b.request_id()[:16]


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        try:
            os.write(write, IDS.request_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child_id = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_id = IDS.request_id()
    assert re.fullmatch(r"[0-9a-f]{32}", child_id)
    assert child_id[:16] != parent_id[:16]  # drawn again after the fork, not the parent's prefix
