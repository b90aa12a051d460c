"""Undo vLLM's NIXL re-pinning on CPU, so an engine stays on the cores it was given.

vLLM 0.32's NIXL connector worker, on a CPU platform, calls
`os.sched_setaffinity(0, <last core of each NUMA node>)` in its constructor
(kv_connector/v1/nixl/base_worker.py, "reserve different cores for
start_load_kv() from model_forward()"). That moves the worker's main thread —
which is also the OpenMP master that runs the model — onto that core, whatever
VLLM_CPU_OMP_THREADS_BIND said (the NIXL agent's threads, created just before,
keep the engine's cores). With one NUMA node and two engines bound to cores 0
and 1, both engines' model threads end up on core 1. Nothing in vLLM turns it
off (the call depends only on the platform being CPU), so after the engine has
started we put the threads on the reserved cores back on the engine's own.

The same agent's UCX progress thread would poll without pause on the engine's core; our vLLM
plugin (services/engines/vllm_plugin.py) starts the agent without one. Any thread still found
spinning while the engine idles gets SCHED_IDLE (`deprioritize_idle_spinners`, a safety net).
LLM_MESH_KEEP_NIXL_PINNING=1 / LLM_MESH_KEEP_NIXL_SPIN=1 keep vLLM's behaviour, to measure
what each fix is worth (`llm-mesh bench pd --keep-nixl-pinning --keep-nixl-spin`).
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

log = logging.getLogger(__name__)

KEEP_PINNING_ENV = "LLM_MESH_KEEP_NIXL_PINNING"
KEEP_SPIN_ENV = "LLM_MESH_KEEP_NIXL_SPIN"


def parse_cpu_list(text: str) -> set[int] | None:
    """'0', '0-3', '0,2-3' → core ids; None for vLLM's keywords (auto, all, nobind)."""
    if not text or not text[0].isdigit():
        return None
    cores: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def descendants(pid: int) -> list[int]:
    """`pid`'s child processes, recursively (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        for task in pathlib.Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            stack += children
    return out


def thread_affinities(pid: int) -> dict[int, set[int]]:
    """Each thread of `pid` and the cores it may run on."""
    out: dict[int, set[int]] = {}
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            out[int(task.name)] = os.sched_getaffinity(int(task.name))
        except OSError:
            continue  # the thread ended
    return out


def nixl_reserved_cores() -> set[int]:
    """The cores vLLM's NIXL connector pins its worker thread to on CPU (its own topology rule)."""
    from vllm.platforms.cpu import CpuPlatform

    return {max(node) for node in CpuPlatform.discover_numa_topology() if node}


def restore_engine_cores(cores: set[int], root: int | None = None) -> list[tuple[int, int, set[int]]]:
    """Re-bind to `cores` every thread under `root` (default: this process's children) that vLLM's
    NIXL connector moved to its reserved cores. Returns (pid, tid, old cores) for each moved thread."""
    if os.environ.get(KEEP_PINNING_ENV) == "1":
        return []
    reserved = nixl_reserved_cores()
    if not reserved or reserved <= cores:
        return []  # the connector's pin already lies within the engine's cores
    moved = []
    for pid in descendants(root if root is not None else os.getpid()):
        for tid, allowed in thread_affinities(pid).items():
            if allowed == reserved:
                try:
                    os.sched_setaffinity(tid, cores)
                except OSError:
                    continue
                moved.append((pid, tid, allowed))
    if moved:
        log.info("moved %d vLLM threads from NIXL's reserved cores %s back to %s",
                 len(moved), sorted(reserved), sorted(cores))
    return moved


def _cpu_ticks(pid: int, tid: int) -> int | None:
    try:
        fields = pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_threads(pids: list[int], sample_s: float = 1.0,
                 busy_fraction: float = 0.2) -> list[tuple[int, int, float]]:
    """(pid, tid, fraction of a core) of each non-main thread of `pids` busy over `sample_s`."""
    threads = [(pid, tid) for pid in pids for tid in thread_affinities(pid) if tid != pid]
    before = {t: _cpu_ticks(*t) for t in threads}
    time.sleep(sample_s)
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for (pid, tid), start in before.items():
        end = _cpu_ticks(pid, tid)
        if start is not None and end is not None and (end - start) / hz / sample_s >= busy_fraction:
            busy.append((pid, tid, (end - start) / hz / sample_s))
    return busy


def set_idle_priority(tids: list[int], idle: bool = True) -> None:
    """SCHED_IDLE (run only when nothing else wants the core), or back to SCHED_OTHER."""
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            continue  # the thread ended


def deprioritize_idle_spinners(root: int | None = None, sample_s: float = 1.0,
                               busy_fraction: float = 0.2) -> list[tuple[int, int, float]]:
    """Give SCHED_IDLE to the threads under `root` that burn CPU while the engine is idle.

    A NIXL agent's UCX progress thread polls without pause (the nixl Python API sets its
    delay to 0) on the engine's own core: an idle engine spends ~60% of that core on it and
    a busy one loses half its model thread's time to it. Our vLLM plugin starts vLLM's agent
    without one; this catches any other spinner. SCHED_IDLE leaves it only the cycles nothing
    else wants (a progress thread so starved held KV pulls for 0.9–1.6 s under load: why the
    plugin removes it instead). Call this while the engine is idle (right after start).
    Returns (pid, tid, busy fraction) of each thread.
    """
    if os.environ.get(KEEP_SPIN_ENV) == "1":
        return []
    changed = busy_threads(descendants(root if root is not None else os.getpid()), sample_s, busy_fraction)
    set_idle_priority([tid for _, tid, _ in changed])
    if changed:
        log.info("SCHED_IDLE for %d thread(s) spinning while the engine is idle: %s", len(changed),
                 ", ".join(f"{tid} ({busy:.0%})" for _, tid, busy in changed))
    return changed
