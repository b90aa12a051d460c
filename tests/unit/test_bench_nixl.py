"""`bench nixl` for real, small: two processes, NIXL READ/WRITE, memcpy and gRPC, every
destination verified by checksum, and the JSON carries the fields the report promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

# nixl is a hard dependency; it is imported only inside the bench's own processes: loading its
# bindings into the pytest process (beside grpc/torch) aborts it.
from services.bench import nixl


def test_checksum_sees_every_block_in_order() -> None:
    buf = np.arange(64, dtype=np.uint8)
    assert nixl.checksum(buf, 8, (0, 1)) != nixl.checksum(buf, 8, (1, 0))
    assert nixl.checksum(buf, 8, (2,)) == nixl.checksum(buf[16:24].copy(), 8, (0,))


def test_small_real_run_moves_verified_bytes(tmp_path) -> None:
    # As its own process (`llm-mesh bench nixl`), as a user runs it: the initiator's NIXL agent
    # lives in the calling process, and NIXL's bindings abort a process that holds pytest's.
    out = tmp_path / "nixl.json"
    done = subprocess.run([sys.executable, "-m", "services.cli", "bench", "nixl", "--sizes", "16K,1M",
                           "--blocks", "32x16K", "--iterations", "3", "--warmup", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [c["case"] for c in result["cases"]] == ["16 KiB", "1 MiB", "32 × 16 KiB"]
    for case in result["cases"]:
        assert case["total_bytes"] == case["block_bytes"] * case["blocks"]
        for path in ("nixl_read", "nixl_write", "memcpy", "grpc_unary", "grpc_stream"):
            r = case[path]
            assert r["verified"] is True, (case["case"], path)
            assert r["iterations"] == 3
            assert r["gbps_median"] > 0 and r["median_ms"] <= r["p90_ms"]
        for op in ("nixl_read", "nixl_write"):
            assert case[op]["vs_memcpy"] > 0 and case[op]["vs_grpc"] > 0
    verdict = result["verdict"]
    assert verdict["all_verified"] is True
    assert set(verdict["nixl_read"]) == {"min_vs_grpc", "min_vs_memcpy", "grpc_target_holds",
                                         "memcpy_target_holds", "cases_missing_a_target"}


def test_source_and_destination_start_different() -> None:
    """Each case fills source and destination with different patterns, so a transfer that moved
    nothing leaves a destination whose checksum differs from the source's."""
    case = nixl.make_cases([], [(4, 16 * 1024)])[0]
    src = np.zeros(case.region_bytes(), np.uint8)
    dst = np.zeros(case.region_bytes(), np.uint8)
    nixl.fill(src, len(src), 1)
    nixl.fill(dst, len(dst), 2)
    assert nixl.checksum(src, case.block_bytes, case.local_slots) != nixl.checksum(dst, case.block_bytes,
                                                                                    case.remote_slots)
