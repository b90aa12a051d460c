"""Explain's wire form shows each worker's usable prefix by tier, the KV store's blocks included."""

from __future__ import annotations

from llm_mesh.v1 import scheduler_pb2
from scheduler.framework import RequestView, WorkerState
from scheduler.index import BlockIndex, Tier
from scheduler.policies import policy_by_name
from services.scheduler_service import _scores


def test_explain_rows_carry_prefix_blocks_by_tier():
    ix = BlockIndex()
    req = RequestView("m", 8 * 16, list(range(100, 108)), 16)
    ix.stored("a", "m", req.block_hashes[:2])
    ix.stored("a", "m", req.block_hashes[2:3], Tier.HOST)
    ix.stored("kvstore-0", "m", req.block_hashes[:7], Tier.STORE)
    workers = [WorkerState(w, "m", max_num_seqs=4) for w in ("a", "b", "c")]
    workers[2].routable = False
    rows = {r.worker_id: r for r in _scores(policy_by_name("ours").decide(req, workers, ix, dry_run=True))}
    assert rows["a"].prefix_blocks == scheduler_pb2.PrefixBlocks(engine=2, host=1, store=4)
    assert rows["b"].prefix_blocks == scheduler_pb2.PrefixBlocks(store=7)
    assert not rows["c"].HasField("prefix_blocks") and rows["c"].filtered_reason
    wire = scheduler_pb2.WorkerScore.FromString(rows["a"].SerializeToString())
    assert wire.prefix_blocks.store == 4 and wire.components["ttft.load_s"] > 0


def test_a_store_run_that_continues_a_workers_own_run_counts_for_that_worker():
    """Evicted tails go to the store while the head stays in the engine: the store holds blocks
    2..6 but not block 0. The engine loads them after its own hit (vLLM's offloading connector
    looks up the blocks past the local one), so they are usable at `a` and nowhere else."""
    ix = BlockIndex()
    req = RequestView("m", 8 * 16, list(range(100, 108)), 16)
    ix.stored("a", "m", req.block_hashes[:2])
    ix.stored("b", "m", req.block_hashes[:1])
    ix.stored("kvstore-0", "m", req.block_hashes[2:7], Tier.STORE)
    workers = [WorkerState(w, "m", max_num_seqs=4) for w in ("a", "b", "c")]
    rows = {r.worker_id: r for r in _scores(policy_by_name("ours").decide(req, workers, ix, dry_run=True))}
    assert rows["a"].prefix_blocks == scheduler_pb2.PrefixBlocks(engine=2, store=5)
    assert rows["b"].prefix_blocks == scheduler_pb2.PrefixBlocks(engine=1)  # its run ends before the store's
    assert rows["c"].prefix_blocks == scheduler_pb2.PrefixBlocks()
    mooncake = policy_by_name("mooncake").decide(req, workers, ix, dry_run=True)
    assert mooncake.worker_id == "a" and mooncake.prefill_tokens == 8 * 16 - 7 * 16
