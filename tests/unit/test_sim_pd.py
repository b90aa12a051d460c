"""Prefill/decode disaggregation in the simulator: the decode engine's remote-KV path
(services/engines/sim_model.py) and P/D clusters in the discrete-event loop (services/bench/des.py)."""

from __future__ import annotations

import pytest

from scheduler.framework import Role
from scheduler.policies import policy_by_name
from services.bench.des import ClusterSpec, RequestResult, simulate, summarize
from services.bench.workload import long_short_mix
from services.engines.base import BlockStored, EngineRequest, SamplingOptions
from services.engines.sim_model import KVTransfer, SimConfig, SimLatency, SimModel, SimOutput

LAT = SimLatency(prefill_per_token_s=0.001, step_overhead_s=0.01, itl_s=0.1, batch_slowdown=0.5)
# 1000 bytes/token at 8 Gb/s = 1 µs per token on the wire; 5 ms fixed.
KV = KVTransfer(bytes_per_token=1000, bandwidth_gbps=8.0, latency_s=0.005)


def model(**kw) -> SimModel:
    kw.setdefault("latency", LAT)
    kw.setdefault("kv_transfer", KV)
    kw.setdefault("block_size", 4)
    return SimModel(SimConfig(**kw))


def req(rid: str, prompt: list[int], max_tokens: int = 4) -> EngineRequest:
    return EngineRequest(rid, prompt, SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def run(m: SimModel) -> list[SimOutput]:
    out = []
    while (t := m.next_event_time()) is not None:
        out += m.advance(t)
    return out


def test_remote_request_pulls_its_kv_then_only_decodes():
    prompt = list(range(100, 200))  # 100 tokens = 25 blocks of 4
    local, remote = model(), model()
    local.add_request(req("a", prompt), now=1.0)
    remote.add_request(req("a", prompt), now=1.0, remote_kv=True)
    expected, got = run(local), run(remote)
    # Same tokens, same count: the decode engine samples every output token itself.
    assert [o.token_id for o in got] == [o.token_id for o in expected] and len(got) == 4
    assert got[-1].finish_reason == "length" and got[-1].completion_tokens == 4
    # No prompt compute, no prefill step; the whole prompt's KV came over the link.
    assert remote.stats.prefill_computed_tokens == 0 and remote.stats.prefill_steps == 0
    assert local.stats.prefill_computed_tokens == 100
    assert remote.stats.remote_prefills == 1
    assert remote.stats.kv_pulled_tokens == 100 and remote.stats.kv_pulled_bytes == 100_000
    # First token: pull (5 ms + 100 µs), then one decode step at batch 1.
    assert [o.time for o in got] == pytest.approx([1.0 + 0.005 + 1e-4 + 0.1 * k for k in range(1, 5)])
    assert remote.load().running == 0 and remote.load().kv_cache_usage == 0.0


@pytest.mark.parametrize("gbps", [0.8, 8.0, 80.0])
def test_transfer_time_is_latency_plus_bytes_over_bandwidth(gbps):
    kv = KVTransfer(bytes_per_token=128 * 1024, bandwidth_gbps=gbps, latency_s=0.002)
    m = model(kv_transfer=kv, block_size=16, num_blocks=1024)
    prompt = list(range(1, 1601))  # 1600 tokens x 128 KiB = 200 MiB
    m.add_request(req("a", prompt, max_tokens=1), now=0.0, remote_kv=True)
    (out,) = run(m)
    wire = 1600 * 128 * 1024 * 8 / (gbps * 1e9)
    assert kv.wire_time(1600) == pytest.approx(wire)
    assert out.time == pytest.approx(0.002 + wire + LAT.decode_time(1))


def test_pulls_into_one_engine_share_its_link_in_fifo_order():
    m = model()
    m.add_request(req("a", list(range(1000, 2000)), max_tokens=1), now=0.0, remote_kv=True)
    m.add_request(req("b", list(range(3000, 4000)), max_tokens=1), now=0.0, remote_kv=True)
    outs = {o.request_id: o.time for o in run(m)}
    wire = KV.wire_time(1000)  # 1 ms each
    assert outs["a"] == pytest.approx(wire + KV.latency_s + LAT.decode_time(1))
    # b's bytes follow a's on the wire; it lands after a's first decode step started, so it waits for it.
    b_lands = 2 * wire + KV.latency_s
    assert b_lands > outs["a"] - LAT.decode_time(1)
    assert outs["b"] == pytest.approx(outs["a"] + LAT.decode_time(1))


def test_decode_side_prefix_hit_is_not_pulled_and_pulled_blocks_are_announced():
    events = []
    m = model()
    m.pool.on_kv_event = events.append
    shared = list(range(500, 540))  # 10 blocks
    m.add_request(req("warm", shared + [1, 2, 3], max_tokens=1), now=0.0)
    run(m)
    events.clear()
    prompt = shared + list(range(900, 920))  # 10 cached + 5 new blocks
    m.add_request(req("r", prompt, max_tokens=2), now=5.0, remote_kv=True)
    outs = run(m)
    assert m.stats.kv_pulled_tokens == 20 and outs[-1].cached_prompt_tokens == 40
    assert m.stats.prefill_computed_tokens == 43  # only the warm-up's local prefill
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert len(stored) == 5  # the pulled blocks, keyed once they landed
    assert outs[0].time == pytest.approx(5.0 + KV.latency_s + KV.wire_time(20) + LAT.decode_time(1))


def test_abort_during_the_pull_frees_the_blocks():
    m = model()
    m.add_request(req("a", list(range(100)), max_tokens=3), now=0.0, remote_kv=True)
    m.advance(0.0)  # admitted: pull in flight, blocks held, counted as waiting
    assert m.load().waiting == 1 and m.pool.num_free == m.config.num_blocks - 25
    assert m.finish("a", now=0.001)
    assert run(m) == [] and m.pool.num_free == m.config.num_blocks and m.next_event_time() is None


def test_a_long_local_prefill_stalls_running_decodes_and_a_remote_one_does_not():
    def gaps(remote: bool) -> list[float]:
        m = model(num_blocks=4096)
        m.add_request(req("short", list(range(10)), max_tokens=6), now=0.0)
        m.add_request(req("long", list(range(1000, 3000)), max_tokens=1), now=0.15, remote_kv=remote)
        times = [o.time for o in run(m) if o.request_id == "short"]
        return [b - a for a, b in zip(times, times[1:])]

    local, remote = gaps(False), gaps(True)
    assert max(local) == pytest.approx(LAT.prefill_time(2000) + LAT.decode_time(1))  # 2.01 s stall + its step
    assert max(remote) <= LAT.decode_time(2) + 1e-9  # only batching slows it


def test_pd_cluster_completes_every_request_with_its_output_and_no_decode_prompt_compute():
    requests = long_short_mix(long_fraction=0.3, long_tokens=4096, short_tokens=512, output_tokens=16,
                              rate_per_s=4.0, requests=40, seed=1)
    spec = ClusterSpec(workers=0, prefill_workers=1, decode_workers=2, num_blocks=2048, max_num_seqs=16)
    s = simulate(requests, policy_by_name("ours"), spec)
    assert s["completed"] == s["requests"] == 40
    assert s["pd_decisions"] == {"remote": 40} and s["pd_remote"] == 40  # every prompt >= 64 uncached tokens
    stats = s["engine_stats"]
    assert stats["d"]["prefill_computed_tokens"] == 0 and stats["d"]["remote_prefills"] == 40
    assert stats["d"]["kv_pulled_bytes"] == sum(r.input_tokens for r in requests) * 128 * 1024
    assert stats["p"]["prefill_computed_tokens"] == sum(r.input_tokens for r in requests)
    assert s["output_tok_per_s"] > 0 and 0 < s["itl_p50_s"] <= s["itl_p99_s"]
    # Aggregated on the same total: the same tokens come out.
    agg_spec = ClusterSpec(workers=3, num_blocks=2048, max_num_seqs=16)
    agg = simulate(requests, policy_by_name("ours"), agg_spec)
    assert agg["completed"] == 40 and agg["pd_remote"] == 0 and "p" not in agg["engine_stats"]
    assert agg["engine_stats"]["w"]["prefill_computed_tokens"] == stats["p"]["prefill_computed_tokens"]
    # At twice the rate no worker is free of decodes: the aggregated ITL tail carries the prefill
    # stalls (at 4/s `ours` routes the long prompts around running decodes), P/D's does not.
    busy = long_short_mix(long_fraction=0.3, long_tokens=4096, short_tokens=512, output_tokens=16,
                          rate_per_s=8.0, requests=40, seed=1)
    pd, agg = simulate(busy, policy_by_name("ours"), spec), simulate(busy, policy_by_name("ours"), agg_spec)
    assert pd["completed"] == agg["completed"] == 40 and agg["itl_p99_s"] > 10 * pd["itl_p99_s"]


def test_default_cluster_is_aggregated():
    spec = ClusterSpec()
    assert spec.worker_roles() == [(f"w{i:02d}", Role.BOTH) for i in range(8)]
    assert spec.total_workers == 8 and spec.kv_transfer == KVTransfer()
    pd = ClusterSpec(workers=0, prefill_workers=2, decode_workers=3)
    assert [w for w, _ in pd.worker_roles()] == ["p00", "p01", "d00", "d01", "d02"]


def test_summarize_stays_compatible_and_reports_itl():
    results = [RequestResult(0.0, "w00", 100, 5, first_token_s=0.5, finish_s=0.9),
               RequestResult(1.0, "d00", 100, 1, first_token_s=1.2, finish_s=1.2, prefill_worker="p00")]
    s = summarize(results, 2.0, 1.2)  # the live benchmark's call: no per-token gaps
    assert s["completed"] == 2 and s["pd_remote"] == 1
    assert s["tpot_p50_s"] == pytest.approx(0.1) and s["itl_p99_s"] != s["itl_p99_s"]  # NaN: not tracked
    s = summarize(results, 2.0, 1.2, itl_gaps=[0.1, 0.1, 0.1, 0.1])
    assert s["itl_p50_s"] == pytest.approx(0.1) == s["itl_p99_s"]
    assert results[1].tpot is None


def _bench(argv: list[str]) -> int:
    from services import cli

    args = cli.build_parser(["bench", "routing", *argv]).parse_args(["bench", "routing", *argv])
    return args.run(args)


def test_bench_routing_pd_flags_compare_with_aggregated(tmp_path, capsys):
    import json

    out = tmp_path / "pd"
    assert _bench(["--workload", "mixed", "--requests", "80", "--rate", "4", "--long-tokens", "4096",
                   "--output-tokens", "32", "--workers", "3", "--prefill-workers", "1",
                   "--kv-bandwidth-gbps", "100",
                   "--policies", "ours,round-robin", "--no-plot", "--out", str(out)]) == 0
    report = json.loads((out / "routing.json").read_text())
    assert report["cluster"]["prefill_workers"] == 1 and report["cluster"]["decode_workers"] == 2
    assert report["cluster"]["kv_transfer"]["bandwidth_gbps"] == 100
    assert set(report["aggregated_baseline"]) == set(report["policies"]) == {"ours", "round-robin"}
    for name, s in report["policies"].items():
        base = report["aggregated_baseline"][name]
        assert s["completed"] == base["completed"] == 80
        assert s["pd_remote"] == s["pd_decisions"]["remote"] > 0 and base["pd_remote"] == 0
        row = report["pd_verdict"]["policies"][name]
        assert row["itl_p99_ratio"] == pytest.approx(s["itl_p99_s"] / base["itl_p99_s"])
    printed = capsys.readouterr().out
    assert "aggregated (3 workers)" in printed and "P/D (1 prefill + 2 decode)" in printed
    assert "issue 4 sim target" in printed
    assert _bench(["--mode", "live", "--prefill-workers", "1", "--out", str(out)]) == 2
