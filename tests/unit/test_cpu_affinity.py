"""The fixes for vLLM's NIXL threads on CPU (services/engines/cpu_affinity.py), on real child
processes: a thread on NIXL's reserved core goes back to the engine's cores, and a thread that
spins while the rest sleeps gets SCHED_IDLE."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from services.engines import cpu_affinity

SPINNER = """
import threading, time
def spin():
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
time.sleep(60)
"""


def test_parse_cpu_list() -> None:
    assert cpu_affinity.parse_cpu_list("1") == {1}
    assert cpu_affinity.parse_cpu_list("0,2-3") == {0, 2, 3}
    assert cpu_affinity.parse_cpu_list("auto") is None
    assert cpu_affinity.parse_cpu_list("nobind") is None


# Each test runs its process under a parent of its own and passes that parent as `root`: the
# default root is this process, whose other children (a session's mesh, in a whole-suite run)
# must be neither scanned nor changed.
PARENT = "import subprocess, sys; subprocess.run(sys.argv[1:])"


def _under_a_parent(argv: list[str]) -> tuple[subprocess.Popen, int]:
    """(the parent, the pid of `argv` running as its only child)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *argv])
    deadline = time.monotonic() + 10
    while not (children := cpu_affinity.descendants(parent.pid)):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    return parent, children[0]


def _stop(parent: subprocess.Popen, child: int) -> None:
    for pid in (child, parent.pid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    parent.wait()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_threads_on_the_reserved_core_go_back(monkeypatch) -> None:
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_affinity, "nixl_reserved_cores", lambda: {cores[-1]})
    parent, child = _under_a_parent(["sleep", "30"])
    try:
        os.sched_setaffinity(child, {cores[-1]})  # what vLLM's NIXL worker does to itself
        moved = cpu_affinity.restore_engine_cores({cores[0]}, root=parent.pid)
        assert moved == [(child, child, {cores[-1]})]
        assert os.sched_getaffinity(child) == {cores[0]}
    finally:
        _stop(parent, child)


def test_only_the_spinning_thread_gets_sched_idle() -> None:
    parent, child = _under_a_parent([sys.executable, "-c", SPINNER])
    try:
        time.sleep(0.5)
        changed = cpu_affinity.deprioritize_idle_spinners(root=parent.pid, sample_s=0.5)
        assert len(changed) == 1
        pid, tid, busy = changed[0]
        assert pid == child and tid != pid and busy > 0.2
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
        others = [t for t in cpu_affinity.thread_affinities(pid) if t != tid]
        assert all(os.sched_getscheduler(t) != os.SCHED_IDLE for t in others)
    finally:
        _stop(parent, child)
