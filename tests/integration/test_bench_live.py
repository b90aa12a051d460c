"""`llm-mesh bench routing --mode live`: real sim worker processes, a scheduler process per policy,
real etcd and gRPC, on a short shared-prefix workload."""

from __future__ import annotations

import json
import pathlib

import yaml

from services import cli


def _bench(argv: list[str]) -> int:
    args = cli.build_parser(["bench", "routing", *argv]).parse_args(["bench", "routing", *argv])
    return args.run(args)


def test_live_shared_prefix_report(tmp_path: pathlib.Path, model_dir, capsys) -> None:
    # 4 tenants with 2k-token prefixes (64 blocks) on 2 workers of 160 blocks: two prefixes fit a
    # worker, so a cache-aware router keeps each tenant on one worker while random thrashes.
    out, logs = tmp_path / "live", tmp_path / "logs"
    assert _bench(["--mode", "live", "--workload", "shared-prefix", "--tenants", "4", "--prefix-tokens", "2048",
                   "--suffix-tokens", "128", "--output-tokens", "8", "--requests", "48", "--rate", "12",
                   "--workers", "2", "--num-blocks", "160", "--max-model-len", "4096",
                   "--policies", "ours,random", "--speedup", "2", "--log-dir", str(logs),
                   "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["mode"].startswith("live")
    p = report["policies"]
    for name, s in p.items():
        assert s["failed"] == 0 and s["requests"] == s["completed"] == 48, name
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"], name
        assert s["e2e_mean_s"] >= s["ttft_mean_s"] > 0, name
        assert 0 <= s["itl_p50_s"] <= s["itl_p99_s"] and s["itl_p99_s"] > 0, name  # per-token arrival gaps
        # The run's own choices, replayed in the simulator (services/bench/agreement.py).
        check = s["sim_with_these_choices"]
        assert check["compared"] == 48 and 0 < check["ttft_p90_s"] and check["ttft_error_abs_p90_s"] >= 0, name
        assert abs(check["hit_rate"] - s["hit_rate"]) < 0.1, name  # the same blocks cached, near enough
    # Engine-reported hits (usage.cached_prompt_tokens) through the real mesh.
    assert p["ours"]["hit_rate"] > 0.6
    assert p["ours"]["hit_rate"] > p["random"]["hit_rate"]
    # A scheduler per policy really ran, and each routed over both workers.
    assert sorted(f.name for f in logs.glob("*-scheduler.log")) == ["ours-scheduler.log", "random-scheduler.log"]
    assert len(list(logs.glob("ours-worker-*.log"))) == 2
    # Each scheduler ran its policy's profile with the constants of the 2x faster cluster.
    profile = yaml.safe_load((logs / "ours-profile.yaml").read_text())
    assert profile["scorers"][0]["params"]["step_overhead_s"] == 0.001
    assert "policy ours;" in (logs / "ours-scheduler.log").read_text()
    assert "policy random;" in (logs / "random-scheduler.log").read_text()
    assert (out / "ttft_cdf.png").exists()
    printed = capsys.readouterr().out
    assert "live:" in printed and "simulated with the same choices" in printed
