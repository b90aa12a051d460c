"""services/engines/vllm_plugin.py through vLLM's own plugin loading (the installed entry point),
in a child process (NIXL is never imported into the test process): vLLM's NIXL connector then
builds agent configs without a progress thread, unless LLM_MESH_KEEP_NIXL_SPIN=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

PROBE = """
from vllm.distributed import nixl_utils
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vLLM does in its engine core and worker processes
by_entry_point = nixl_utils.__dict__.get("nixl_agent_config")
from services.engines.vllm_plugin import register
register()  # once more: nothing changes
assert nixl_utils.__dict__.get("nixl_agent_config") is by_entry_point
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
print(config.enable_pthread, config.num_threads, config.capture_telemetry)
"""


def probe(**env: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_vllm_nixl_agents_get_no_progress_thread() -> None:
    assert probe() == "False 4 True"  # vLLM's own arguments pass through


def test_keep_spin_leaves_vllm_default() -> None:
    assert probe(LLM_MESH_KEEP_NIXL_SPIN="1") == "True 4 True"
