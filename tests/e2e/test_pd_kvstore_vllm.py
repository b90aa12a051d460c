"""End to end: prefill/decode disaggregation and the KV store together, on real vLLM workers
through `llm-mesh up` (etcd, a KV store, a prefill-role and a decode-role vLLM worker that both
offload to it, the scheduler).

Each engine then runs vLLM's MultiConnector: NixlConnector (P/D) first, the store's offloading
spec second. A ~1,500-token prompt is prefilled remotely and its blocks are written through to
the store; two other prompts evict it from both engines' small KV caches; sent again, it is
served with the prefix loaded from the store (by whichever worker the scheduler picks: the
prefiller before its leg, or the decoder itself), nearly nothing recomputed, the same greedy
tokens.
"""

from __future__ import annotations

import grpc
import pytest
import yaml

from llm_mesh.v1 import (inference_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc,
                         worker_pb2, worker_pb2_grpc)
from services.procs import Child
from tests.conftest import free_port, free_port_pair
from tests.e2e.test_kvstore_mesh_vllm import BLOCK, KV_BLOCKS, PROMPT_TOKENS, prompt, request, tokenizer  # noqa: F401

pytestmark = pytest.mark.vllm

ENGINE_ARGS = ["--kv-blocks", KV_BLOCKS, "--max-model-len", 2048, "--max-num-seqs", 4]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_dir):
    directory = tmp_path_factory.mktemp("pd-kvstore-mesh")
    scheduler, store = (f"127.0.0.1:{free_port()}" for _ in range(2))
    base = free_port()
    config = directory / "topology.yaml"
    config.write_text(yaml.safe_dump({
        "etcd": {"port": free_port_pair()},
        "scheduler": {"port": int(scheduler.rsplit(":", 1)[1])},
        "gateway": {"port": free_port()},
        "kvstore": {"port": int(store.rsplit(":", 1)[1]), "ram_gib": 1},
        "workers": [
            {"engine": "vllm", "role": "prefill", "kv_offload": "store", "cpu_cores": "0",
             "args": [*ENGINE_ARGS, "--kv-side-channel-port", free_port()]},
            {"engine": "vllm", "role": "decode", "kv_offload": "store", "cpu_cores": "1",
             "args": [*ENGINE_ARGS, "--kv-side-channel-port", free_port()]},
        ],
    }))
    child = Child.llm_mesh("up", ["up", "--config", str(config), "--worker-base-port", str(base),
                                  "--run-dir", str(directory / "run")], directory, env={"COLUMNS": "200"})
    child.start()
    try:
        child.wait_ready(lambda: "llm-mesh is up" in child.log_path.read_text(), 500, interval=0.5)
        yield scheduler, store, {"prefill": f"127.0.0.1:{base}", "decode": f"127.0.0.1:{base + 1}"}
    finally:
        child.stop()


def test_pd_with_the_store_writes_through_and_serves_an_evicted_prefix(mesh, tokenizer):  # noqa: F811
    scheduler, store, workers = mesh
    ids = prompt(tokenizer, 11)
    full_blocks = PROMPT_TOKENS // BLOCK
    channels = {name: grpc.insecure_channel(address) for name, address in {"scheduler": scheduler, "store": store,
                                                                            **workers}.items()}
    try:
        inference = inference_pb2_grpc.InferenceStub(channels["scheduler"])
        admin = scheduler_pb2_grpc.SchedulerStub(channels["scheduler"])
        stats = kvstore_pb2_grpc.KVStoreStub(channels["store"]).GetStats

        def loads() -> dict[str, worker_pb2.WorkerLoad]:
            return {name: worker_pb2_grpc.WorkerStub(channels[name]).GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
                    for name in workers}

        def generate(tokens: list[int]) -> list[int]:
            return [t for r in inference.Generate(request(tokens), timeout=180) for t in r.token_ids]

        explained = admin.Explain(scheduler_pb2.ExplainRequest(request=request(ids)), timeout=10)
        assert explained.disaggregation.rule == "remote", explained.disaggregation.reason
        stored_before = stats(kvstore_pb2.GetKVStoreStatsRequest(), timeout=10).stored_blocks
        before = loads()
        first = generate(ids)
        after = loads()
        pulled = after["decode"].kv_transferred_prompt_tokens - before["decode"].kv_transferred_prompt_tokens
        assert pulled > 0  # the decoder pulled the prefill over NIXL ...
        assert after["decode"].prompt_tokens - before["decode"].prompt_tokens == pulled + (
            after["decode"].cached_prompt_tokens - before["decode"].cached_prompt_tokens)  # ... computing none
        # ... and the prompt's blocks went through to the store (write-through, from either engine).
        assert stats(kvstore_pb2.GetKVStoreStatsRequest(), timeout=10).stored_blocks - stored_before >= full_blocks

        for seed in (12, 13):  # evict it from both engines (80-block caches, 46 blocks a prompt)
            generate(prompt(tokenizer, seed))

        before = loads()
        again = generate(ids)
        after = loads()
    finally:
        for channel in channels.values():
            channel.close()
    # Across both workers: what was loaded (store or NIXL), found in an engine cache, or computed.
    moved = {n: after[n].kv_transferred_prompt_tokens - before[n].kv_transferred_prompt_tokens for n in workers}
    cached = {n: after[n].cached_prompt_tokens - before[n].cached_prompt_tokens for n in workers}
    computed = {n: (after[n].prompt_tokens - before[n].prompt_tokens) - moved[n] - cached[n] for n in workers}
    print(f"\nsecond run: moved {moved}, engine-cached {cached}, computed {computed}")
    assert sum(computed.values()) < 2 * BLOCK, (moved, cached, computed)  # the prefix came from the store
    assert again == first
