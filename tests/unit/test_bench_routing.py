"""`llm-mesh bench routing` (simulated time) on short workloads: structure and real properties."""

from __future__ import annotations

import json
import math
import pathlib
import types

import pytest

from services import cli
from services.bench import routing
from services.bench.des import connect_index
from services.engines.base import AllBlocksCleared, BlockRemoved, BlockStored
from services.worker_pool import DEFAULT_POLL_INTERVAL_S

TRACE = routing.default_trace()
KEYS = {"requests", "completed", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_mean_s", "e2e_p90_s",
        "output_tok_per_s", "hit_rate", "imbalance", "slo_attainment", "wall_s"}


def _bench(argv: list[str]) -> int:
    args = cli.build_parser(["bench", "routing", *argv]).parse_args(["bench", "routing", *argv])
    return args.run(args)


@pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")
def test_trace_slice_report(tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "r"
    assert _bench(["--workload", "trace", "--limit", "60", "--time-scale", "4", "--workers", "4",
                   "--policies", "ours,random,round-robin", "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert set(report["policies"]) == {"ours", "random", "round-robin"}
    assert report["workload"]["num_requests"] == 60
    assert "default" in report["latency"]["source"]
    for name, s in report["policies"].items():
        assert KEYS <= set(s), name
        assert s["requests"] == s["completed"] == 60, name  # every request completes
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"] <= s["ttft_p99_s"], name
        assert s["ttft_mean_s"] > 0 and s["e2e_mean_s"] >= s["ttft_mean_s"], name
        assert 0 <= s["hit_rate"] < 1 and 0 <= s["slo_attainment"] <= 1 and s["imbalance"] >= 1, name
        assert s["output_tok_per_s"] > 0
    b = report["bounds"]
    assert 0 < b["ideal_ttft_p90_s"] <= b["no_cache_ttft_p90_s"] and 0 <= b["ideal_hit_rate"] < 1
    for s in report["policies"].values():  # no policy beats the infinite-cache, no-queue bound
        assert s["hit_rate"] <= b["ideal_hit_rate"] + 1e-9
    v = report["verdict"]
    assert v["best_peer_p90"] in {"random", "round-robin"} and isinstance(v["met"], bool)
    assert v["p90_ratio"] == pytest.approx(v["ours_p90_ttft_s"] / v["best_peer_p90_ttft_s"])
    png = (out / "ttft_cdf.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    assert "round-robin" in printed and "issue target" in printed


def test_shared_prefix_cache_aware_beats_random(tmp_path: pathlib.Path) -> None:
    # 12 tenants with 4k-token prefixes on 4 workers: a cache-aware policy must find the prefixes.
    out = tmp_path / "sp"
    assert _bench(["--workload", "shared-prefix", "--tenants", "12", "--prefix-tokens", "4096",
                   "--suffix-tokens", "256", "--output-tokens", "16", "--requests", "150", "--rate", "10",
                   "--workers", "4", "--num-blocks", "1024", "--policies", "ours,random,sglang",
                   "--no-plot", "--out", str(out)]) == 0
    p = json.loads((out / "routing.json").read_text())["policies"]
    for s in p.values():
        assert s["completed"] == 150
    # Ideal: only 12 first-time prefixes and the unique suffixes miss, ~0.85 of the prompt tokens hit
    # (random got ~0.52 here: 8 of the 12 prefixes fit a worker's 1024 blocks).
    assert p["ours"]["hit_rate"] > 0.75
    assert p["ours"]["hit_rate"] >= p["random"]["hit_rate"] + 0.2
    assert p["sglang"]["hit_rate"] >= p["random"]["hit_rate"]
    assert not (out / "ttft_cdf.png").exists()


def test_connect_index_counts_references() -> None:
    calls: list[tuple] = []
    index = types.SimpleNamespace(stored=lambda w, m, h: calls.append(("stored", w, m, list(h))),
                                  removed=lambda w, m, h: calls.append(("removed", w, m, list(h))),
                                  cleared=lambda w: calls.append(("cleared", w)))
    engine = types.SimpleNamespace(pool=types.SimpleNamespace(on_kv_event=None))
    connect_index(engine, "w0", "m", index)
    emit = engine.pool.on_kv_event
    emit(BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=(), block_size=32))
    emit(BlockStored(block_hashes=(2, 3), parent_block_hash=1, token_ids=(), block_size=32))
    emit(BlockRemoved(block_hashes=(2,)))  # one of two blocks holding 2: still held
    emit(BlockRemoved(block_hashes=(2,)))
    emit(AllBlocksCleared())
    assert calls == [("stored", "w0", "m", [1, 2]), ("stored", "w0", "m", [3]), ("removed", "w0", "m", [2]),
                     ("cleared", "w0")]


def test_verdict_states_the_target_plainly() -> None:
    base = {"ttft_p90_s": 1.0, "hit_rate": 0.5, "slo_attainment": 0.5}
    res = {"ours": base | {"ttft_p90_s": 0.8, "hit_rate": 0.6}, "round-robin": base | {"ttft_p90_s": 3.0},
           "sglang": base | {"ttft_p90_s": 1.0, "hit_rate": 0.55}}
    v = routing.verdict(res, slo_ttft_s=2.0)
    assert v["met"] and v["best_peer_p90"] == "sglang" and v["round_robin_misses_slo"]
    res["ours"]["ttft_p90_s"] = 0.9  # only 1.11x better
    v = routing.verdict(res, slo_ttft_s=2.0)
    assert not v["met"] and not v["p90_met"] and v["hit_met"] and "NOT met" in v["summary"]


def test_router_hashes_match_engine_and_sharing_them_changes_nothing() -> None:
    from scheduler.framework import RequestView
    from scheduler.policies import policy_by_name
    from services.bench.des import ClusterSpec, _Hasher, simulate
    from services.bench.workload import WorkloadRequest, prompt_tokens, shared_prefix

    hasher = _Hasher(32, 512)
    # Shared chunks (memoized), a partial last chunk, and padding past the chunk ids.
    for req in [WorkloadRequest(0.0, (1, 2, 3), 1400, 4), WorkloadRequest(0.0, (1, 2, 9), 1536, 4),
                WorkloadRequest(0.0, (1, 2), 1600, 4)]:
        tokens = prompt_tokens(req)
        assert hasher.hashes(req, tokens) == list(RequestView.from_tokens("m", tokens, 32).block_hashes)
    reqs = shared_prefix(tenants=6, prefix_tokens=2048, suffix_tokens=256, output_tokens=8, rate_per_s=20,
                         requests=60)
    spec = ClusterSpec(workers=3, num_blocks=512)
    a = simulate(reqs, policy_by_name("ours", seed=0), spec, hasher=_Hasher(32, 512), share_hashes=True)
    b = simulate(reqs, policy_by_name("ours", seed=0), spec, hasher=_Hasher(32, 512), share_hashes=False)
    assert a == b and a["hit_rate"] > 0.5


def test_kvstore_comparison_at_the_same_engine_memory(tmp_path: pathlib.Path, capsys) -> None:
    # 12 tenants' 4k-token prefixes on 2 workers holding ~4 each: without a store the prefixes are
    # evicted and recomputed; with one, every engine loads them back instead.
    out = tmp_path / "kv"
    assert _bench(["--workload", "shared-prefix", "--tenants", "12", "--prefix-tokens", "4096",
                   "--suffix-tokens", "256", "--output-tokens", "8", "--requests", "120", "--rate", "4",
                   "--workers", "2", "--num-blocks", "560", "--kvstore-blocks", "4096", "--policies",
                   "ours,round-robin", "--no-plot", "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["cluster"]["kvstore_blocks"] == 4096 and report["cluster"]["num_blocks"] == 560
    without, with_ = report["without_kvstore"], report["policies"]
    for name in ("ours", "round-robin"):
        assert without[name]["completed"] == with_[name]["completed"] == 120
        assert with_[name]["hit_rate"] > without[name]["hit_rate"] + 0.1, name
        assert with_[name]["ttft_p90_s"] < without[name]["ttft_p90_s"], name
        assert with_[name]["engine_stats"]["w"]["store_loads"] > 0
        assert without[name]["engine_stats"]["w"]["store_loads"] == 0 and "kvstore" not in without[name]
        assert with_[name]["kvstore"]["put_blocks"] > 0 and with_[name]["kvstore"]["hit_blocks"] > 0
    v = report["kvstore_verdict"]
    assert v["met"] is True and v["policies"]["ours"]["hit_rate_with"] == with_["ours"]["hit_rate"]
    printed = capsys.readouterr().out
    assert "without the KV store" in printed and "issue 5 sim target" in printed


def test_kvstore_needs_the_simulated_aggregated_mode(tmp_path: pathlib.Path) -> None:
    assert _bench(["--workload", "shared-prefix", "--requests", "5", "--prefill-workers", "1",
                   "--kvstore-blocks", "64", "--no-plot", "--out", str(tmp_path)]) == 2


@pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")
def test_a_profile_file_runs_beside_the_policies_outside_the_verdict(tmp_path: pathlib.Path) -> None:
    import yaml

    from scheduler.policies import policy_spec

    # ours as a file under its own name: the same decisions, so the same numbers as ours.
    mine = policy_spec("ours") | {"name": "mine"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    out = tmp_path / "r"
    assert _bench(["--workload", "trace", "--limit", "60", "--time-scale", "4", "--workers", "4", "--no-plot",
                   "--policies", f"ours,round-robin,{tmp_path / 'mine.yaml'}", "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    p = report["policies"]
    assert set(p) == {"ours", "round-robin", "mine"}
    for key in ("ttft_p90_s", "hit_rate", "e2e_mean_s"):
        assert p["mine"][key] == p["ours"][key], key
    assert report["verdict"]["best_peer_p90"] == "round-robin"  # a file is never the peer compared with


def test_policy_entries_are_checked(tmp_path: pathlib.Path) -> None:
    clash = tmp_path / "clash.yaml"
    clash.write_text("name: llm-d\nscorers: [{name: queue}]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scorers: [{name: nope}]\n")
    assert routing.policy_sources(["ours", "sglang"]) == {"ours": "ours", "sglang": "sglang"}
    for entries, message in [(["ours", "bogus"], "unknown policy 'bogus'"), (["ours", "ours"], "given twice"),
                             ([str(clash)], "is a built-in policy's"), ([str(bad)], "unknown scorer 'nope'"),
                             ([str(tmp_path / "none.yaml")], "can't read profile")]:
        with pytest.raises(ValueError, match=message):
            routing.policy_sources(entries)
    assert _bench(["--workload", "trace", "--limit", "5", "--policies", "ours,bogus", "--no-plot",
                   "--out", str(tmp_path / "x")]) == 2


def test_a_burst_reaches_the_engine_one_decision_apart() -> None:
    from scheduler.policies import policy_by_name
    from services.bench.des import ClusterSpec, simulate
    from services.bench.workload import WorkloadRequest

    # One engine decoding a long answer; at t=1 a short and a long prompt arrive with the same stamp.
    warm = WorkloadRequest(0.0, (20,), 100, 1000)
    burst = [WorkloadRequest(1.0, (1, 2), 1000, 2), WorkloadRequest(1.0, (3, 4, 5, 6, 7, 8, 9, 10), 4000, 2)]
    spec = ClusterSpec(workers=1, num_blocks=1024)
    lat = spec.latency
    step = lat.decode_time(1)  # the decode step in flight at t=1 ends within this

    def ttfts(requests: list, decision_s: float) -> list[float]:
        results: list = []
        simulate(requests, policy_by_name("round-robin"), spec, decision_s=decision_s, results_out=results)
        return [r.ttft for r in results[1:]]

    # All at once: both wait out the decode step, share one prefill step, get their first token together.
    a, b = ttfts([warm, *burst], 0.0)
    assert a == pytest.approx(b) and 0 <= a - lat.prefill_time(5000) <= step
    # More than a decode step apart: the short prompt's step starts without the long one.
    a, b = ttfts([warm, *burst], 2 * step)
    assert 0 <= a - lat.prefill_time(1000) <= step
    assert b == pytest.approx(a + lat.prefill_time(4000))
    # A request arriving after the router is free is decided at its own arrival time.
    assert ttfts([warm, WorkloadRequest(20.0, (11,), 500, 2)], 2 * step) == pytest.approx([lat.prefill_time(500)])
    with pytest.raises(ValueError, match="decision_s"):
        simulate(burst, policy_by_name("round-robin"), spec, decision_s=-0.001)


def test_the_router_sees_the_engines_load_as_of_its_last_poll() -> None:
    from scheduler.policies import policy_by_name
    from services.bench.des import ClusterSpec, simulate
    from services.bench.workload import WorkloadRequest

    class Recording:  # round-robin, noting the load it was shown
        name = "recording"

        def __init__(self) -> None:
            self.inner, self.seen = policy_by_name("round-robin"), []

        def decide(self, request, workers, index, dry_run=False):
            self.seen.append((workers[0].reported_running, workers[0].reported_waiting))
            return self.inner.decide(request, workers, index, dry_run=dry_run)

    # A's prefill ends at ~0.5 s; B comes at 0.7 s and C at 1.5 s, both while A (and B) decode.
    requests = [WorkloadRequest(0.0, (1,), 5000, 1000), WorkloadRequest(0.7, (2,), 100, 1000),
                WorkloadRequest(1.5, (3,), 100, 1000)]
    spec = ClusterSpec(workers=1, num_blocks=1024)
    seen = {}
    for poll in (0.0, 1.0):
        p = Recording()
        simulate(requests, p, spec, load_poll_s=poll)
        seen[poll] = p.seen
    assert seen[0.0] == [(0, 0), (1, 0), (2, 0)]  # current after every engine event
    assert seen[1.0] == [(0, 0), (0, 0), (2, 0)]  # polled at 0 s (before A) and at 1 s
    with pytest.raises(ValueError, match="load_poll_s"):
        simulate(requests, policy_by_name("round-robin"), spec, load_poll_s=math.nan)


def test_the_decision_time_is_reported_and_checked(tmp_path: pathlib.Path, capsys) -> None:
    out = tmp_path / "d"
    argv = ["--workload", "shared-prefix", "--tenants", "2", "--requests", "20", "--workers", "2",
            "--policies", "round-robin", "--out", str(out), "--no-plot"]
    assert _bench(argv) == 0
    assert json.loads((out / "routing.json").read_text())["decision_s"] == routing.DEFAULT_DECISION_MS / 1e3
    assert _bench([*argv, "--decision-ms", "0.5"]) == 0
    assert json.loads((out / "routing.json").read_text())["decision_s"] == 0.0005
    for bad in ("-1", "nan", "inf"):
        assert _bench([*argv, "--decision-ms", bad]) == 2
        assert "--decision-ms must be >= 0" in capsys.readouterr().out
    assert json.loads((out / "routing.json").read_text())["load_poll_s"] == DEFAULT_POLL_INTERVAL_S
    assert _bench([*argv, "--load-poll-interval", "0"]) == 0
    assert json.loads((out / "routing.json").read_text())["load_poll_s"] == 0.0
    for bad in ("-1", "nan", "inf"):
        assert _bench([*argv, "--load-poll-interval", bad]) == 2
        assert "--load-poll-interval must be > 0 seconds (>= 0 in sim mode)" in capsys.readouterr().out
    assert _bench([*argv, "--mode", "live", "--load-poll-interval", "0"]) == 2  # the scheduler needs > 0


def test_a_run_replayed_with_its_own_choices_gives_its_own_results() -> None:
    from scheduler.policies import policy_by_name
    from services.bench.agreement import replay_choices
    from services.bench.des import ClusterSpec, arrival_order, simulate
    from services.bench.workload import load_trace

    requests = load_trace(routing.default_trace(), limit=200, time_scale=1.5, max_input_tokens=131072)
    spec = ClusterSpec(workers=4, num_blocks=4096)
    for name in ("mooncake", "ours"):
        run: list = []
        summary = simulate(requests, policy_by_name(name), spec, decision_s=0.002, load_poll_s=1.0,
                           results_out=run)
        order = arrival_order(requests)
        as_loaded = [None] * len(requests)  # a live run lists results in the requests' order
        for r, i in zip(run, order):
            as_loaded[i] = r
        # Live ids are any strings; they map to the simulated engines in order of first use.
        renamed = {w: f"worker-{9 - k}" for k, w in enumerate(sorted({r.worker for r in run}))}
        for r in as_loaded:
            r.worker = renamed[r.worker]
        check = replay_choices(requests, as_loaded, spec, decision_s=0.002, load_poll_s=1.0)
        assert check["compared"] == len(requests)
        assert check["ttft_p90_s"] == pytest.approx(summary["ttft_p90_s"]), name
        assert check["hit_rate"] == pytest.approx(summary["hit_rate"]), name
        assert check["ttft_error_abs_p90_s"] == pytest.approx(0.0, abs=1e-9), name
    # Another spacing of a burst changes the timing, and the check shows it.
    moved = replay_choices(requests, as_loaded, spec, decision_s=0.0, load_poll_s=1.0)
    assert moved["ttft_error_abs_p90_s"] > 0.0
    as_loaded[0].worker = ""  # failed live: not sent anywhere in the replay, not compared
    as_loaded[0].first_token_s = as_loaded[0].finish_s = None
    assert replay_choices(requests, as_loaded, spec, decision_s=0.002, load_poll_s=1.0)["compared"] == len(requests) - 1
