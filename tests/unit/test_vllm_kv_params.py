"""The typed KVTransferParams ↔ vLLM 0.32 NixlConnector kv_transfer_params mapping (no engine)."""

from __future__ import annotations

import pytest

from services.engines.base import KVTransferParams
from services.engines.vllm_engine import (VllmSettings, from_vllm_kv_params, kv_transfer_config,
                                          prefill_leg_kv_params, to_vllm_kv_params)

# What vLLM 0.32's NixlPullConnectorScheduler.request_finished returns for a finished
# prefill leg (nixl/pull_scheduler.py), as it reaches RequestOutput.kv_transfer_params.
PRODUCED = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[7, 8, 9, 12]],
    "remote_engine_id": "prefill-engine-1",
    "remote_request_id": "r1-0a1b2c3d",
    "remote_host": "127.0.0.1",
    "remote_port": 6061,
    "tp_size": 1,
    "dcp_size": 1,
    "pp_size": 1,
    "remote_num_tokens": 120,
    "remote_blocks_expiry_time": None,
    "transfer_mode": "pull",
}


def test_from_vllm_params():
    p = from_vllm_kv_params(PRODUCED, num_tokens=121)
    assert p == KVTransferParams(engine_id="prefill-engine-1", block_ids=(7, 8, 9, 12), host="127.0.0.1",
                                 port=6061, request_id="r1-0a1b2c3d", tp_size=1, num_tokens=120)


def test_round_trip_gives_what_the_decode_side_reads():
    d = to_vllm_kv_params(from_vllm_kv_params(PRODUCED, num_tokens=120))
    # Exactly the keys vLLM's pull scheduler/worker read on the decode side.
    for key in ("do_remote_prefill", "remote_block_ids", "remote_engine_id", "remote_request_id",
                "remote_host", "remote_port", "tp_size", "remote_num_tokens"):
        assert d[key] == PRODUCED[key], key
    assert d["do_remote_decode"] is False
    # Nothing the decode side must not receive (it would report the P side's cache hits as its own).
    assert "remote_prefill_cached_tokens" not in d


def test_prompt_length_stands_in_for_a_missing_token_count():
    produced = {**PRODUCED, "remote_num_tokens": None}
    assert from_vllm_kv_params(produced, num_tokens=99).num_tokens == 99


def test_flat_block_list_accepted():
    assert from_vllm_kv_params({**PRODUCED, "remote_block_ids": [1, 2]}, 10).block_ids == (1, 2)


def test_several_kv_cache_groups_refused():
    with pytest.raises(ValueError, match="groups"):
        from_vllm_kv_params({**PRODUCED, "remote_block_ids": [[1], [2]]}, 10)


@pytest.mark.parametrize("key", ["remote_engine_id", "remote_request_id", "remote_host", "remote_port"])
def test_incomplete_params_refused(key):
    with pytest.raises(ValueError, match=key):
        from_vllm_kv_params({**PRODUCED, key: None}, 10)


def test_parallel_layouts_refused():
    with pytest.raises(ValueError):
        from_vllm_kv_params({**PRODUCED, "dcp_size": 2}, 10)


def test_prefill_leg_params():
    d = prefill_leg_kv_params()
    assert d["do_remote_decode"] is True and d["do_remote_prefill"] is False


def test_connector_per_role():
    base = dict(model_dir="/m", model_name="m")
    assert kv_transfer_config(VllmSettings(**base)) is None
    prefill = kv_transfer_config(VllmSettings(**base, role="prefill", kv_engine_id="p1", kv_lease_s=12))
    assert prefill is not None
    assert prefill.kv_connector == "NixlConnector"
    assert (prefill.kv_role, prefill.kv_buffer_device) == ("kv_producer", "cpu")
    assert prefill.engine_id == "p1" and prefill.kv_connector_extra_config["kv_lease_duration"] == 12
    decode = kv_transfer_config(VllmSettings(**base, role="decode"))
    assert decode is not None and decode.kv_role == "kv_consumer"
    assert decode.kv_load_failure_policy == "recompute"
    with pytest.raises(ValueError):
        kv_transfer_config(VllmSettings(**base, role="nonsense"))  # type: ignore[arg-type]


def test_auto_dtype_is_float32_on_a_cpu():
    """vLLM's bf16 CPU kernels change this model's greedy answers on AMX CPUs (VllmSettings.dtype)."""
    from services.engines.vllm_engine import engine_dtype

    assert VllmSettings(model_dir="/m", model_name="m").dtype == "auto"
    assert engine_dtype("auto") == "float32"  # this machine, and CI's, run vLLM on the CPU
    assert engine_dtype("bfloat16") == "bfloat16"
