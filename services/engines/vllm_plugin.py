"""A vLLM general plugin (entry point `vllm.general_plugins`: llm_mesh), loaded by vLLM in each
of its processes: the engine's NIXL agents run without a progress thread.

Why: the nixl Python API gives the UCX progress thread a delay of 0, so it polls without pause
on the engine's core. At normal priority it takes half the core from the model (`bench pd
--keep-nixl-spin`: prefill and ITL 2× slower); at SCHED_IDLE (what `deprioritize_idle_spinners`
gave it) it runs only when nothing else wants the core, and with the thread on, transfers
progress only there: under any other load on the machine a 6 MB KV pull took 0.9–1.6 s instead
of 3–8 ms (`bench pd` while a benchmark ran beside it). Without the thread, the caller
progresses its transfers: vLLM's model thread checks them and the notifications every step, as
it does for every NIXL backend without one. LLM_MESH_KEEP_NIXL_SPIN=1 keeps vLLM's default.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from services.engines.cpu_affinity import KEEP_SPIN_ENV


def register() -> None:
    """Wrap vLLM's `nixl_agent_config` so agents default to no progress thread (idempotent)."""
    if os.environ.get(KEEP_SPIN_ENV) == "1":
        return
    from vllm.distributed import nixl_utils

    current = nixl_utils.__dict__.get("nixl_agent_config")
    if getattr(current, "without_progress_thread", False):
        return

    @functools.wraps(_nixl_agent_config)
    def config(*args: Any, **kwargs: Any) -> Any:
        return _nixl_agent_config(*args, **kwargs)

    config.without_progress_thread = True  # type: ignore[attr-defined]
    # A module global shadows nixl_utils' lazy __getattr__, so `from vllm.distributed.nixl_utils
    # import nixl_agent_config` (vLLM's NIXL connector, imported later) gets this one.
    nixl_utils.nixl_agent_config = config  # type: ignore[attr-defined]


def _nixl_agent_config(*args: Any, **kwargs: Any) -> Any:
    """nixl's agent config with enable_prog_thread=False unless the caller says otherwise.
    (Called after vLLM's NixlWrapper import, which sets UCX's environment and imports nixl.)"""
    from nixl._api import nixl_agent_config

    kwargs.setdefault("enable_prog_thread", False)
    return nixl_agent_config(*args, **kwargs)
