"""`llm-mesh chaos` with a short schedule under ~20 concurrent greedy streams: kill -9 a worker,
SIGTERM-drain another, stop etcd for 8 s, kill -9 the KV store. Nothing may be lost: every request
succeeds and every stream equals its reference token for token; the kill migrates streams
mid-way; the store comes back with what its disk tier held."""

from __future__ import annotations

import json
import pathlib

from services.cli import main


def test_chaos_short_schedule_loses_nothing(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "chaos.json"
    code = main(["chaos", "--faults", "kill-worker,drain-worker,etcd-stop:8,kill-kvstore:2", "--workers", "3",
                 "--schedulers", "1",
                 "--concurrency", "20", "--max-tokens", "60", "--prompts", "32", "--drain-seconds", "0.3",
                 "--warmup", "3", "--fault-gap", "4", "--settle", "4", "--replace-after", "3",
                 "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    report = json.loads(out.read_text())
    requests, tokens = report["requests"], report["tokens"]
    assert code == 0, report
    assert requests["failed"] == 0 and requests["failed_by_code"] == {}, requests
    assert requests["sent"] == requests["succeeded"] > 0, requests
    assert tokens["streams_checked"] == requests["sent"]
    assert tokens["streams_mismatched"] == tokens["missing"] == tokens["extra"] == 0, tokens
    assert requests["migrated_by_mesh"] >= 1, requests
    faults = {f["kind"]: f for f in report["faults"]}
    assert faults["kill-worker"]["mesh_failovers"]["migrate"] >= 1
    assert faults["drain-worker"]["exit_code"] == 0  # drained and exited cleanly
    assert faults["etcd-stop"]["end_s"] - faults["etcd-stop"]["start_s"] >= 8
    assert all(f["ttft"]["after"]["n"] > 0 for f in report["faults"])  # served again after each fault
    store = faults["kill-kvstore"]
    assert store["store_blocks_before"] == 32 * 4  # every full 16-token block of the 32 64-token prompts
    # A 1 MiB RAM tier of 64 KiB blocks: all but the last RAM-resident ones were spilled to disk.
    assert store["store_blocks_before"] - 16 <= store["store_blocks_after"] < store["store_blocks_before"]
