"""The vLLM offloading spec's scheduler side (services/engines/kv_offload.StoreManager) against a
real `llm-mesh kvstore` process: lookups never wait on the network inside a step (RETRY, then
the store's answer), pins hold the found blocks until the request's loads are done, stores are
not offered twice, and an unreachable store is a miss. No engine: the calls are the ones vLLM's
OffloadingConnector makes, in its order."""

from __future__ import annotations

import signal
import time

import pytest

from services.kvstore_client import KVStoreClient
from services.procs import Child, free_port, grpc_serving

kv_offload = pytest.importorskip("services.engines.kv_offload")  # needs vLLM (and torch)
from vllm.v1.kv_offload.base import LookupResult, ReqContext, ScheduleEndContext, make_offload_key  # noqa: E402

MODEL, LAYOUT, BLOCK_BYTES = "m", "layout-test", 4096
STEP = ScheduleEndContext(new_req_ids=(), preempted_req_ids=())


def key(h: int) -> bytes:
    """An offload key whose vLLM block hash (32 bytes) has `h` as its low 64 bits."""
    return make_offload_key(bytes(24) + h.to_bytes(8, "big"), 0)


def start_store(etcd, log_dir) -> tuple[str, Child]:  # noqa: ANN001
    """A 16 MiB `llm-mesh kvstore` (gRPC only), ready: (address, its Child)."""
    port = free_port()
    child = Child.llm_mesh("kvstore", ["kvstore", "--port", str(port), "--etcd", etcd.endpoint, "--ram-mib", "16",
                                       "--nixl", "off"], log_dir)
    child.start()
    try:
        child.wait_ready(lambda: grpc_serving(f"127.0.0.1:{port}"), 60)
    except BaseException:
        child.stop()
        raise
    return f"127.0.0.1:{port}", child


@pytest.fixture(scope="module")
def store(etcd, tmp_path_factory) -> str:
    address, child = start_store(etcd, tmp_path_factory.mktemp("kv-offload"))
    try:
        yield address
    finally:
        child.stop()


def settle(manager, probe: bytes, ctx: ReqContext, timeout: float = 10.0) -> LookupResult:
    """Step (on_schedule_end) until the store's answer for `probe` is in."""
    deadline = time.monotonic() + timeout
    while (result := manager.lookup(probe, ctx)) is LookupResult.RETRY:
        assert time.monotonic() < deadline, "the lookup never resolved"
        manager.on_schedule_end(STEP)
        time.sleep(0.01)
    return result


def pinned(address: str) -> int:
    with KVStoreClient(address) as client:
        return client.stats().pinned_blocks


def test_lookup_pins_the_stored_run_until_the_load_is_done(store):
    hashes = [1000 + i for i in range(10)]
    with KVStoreClient(store) as client:
        client.put(MODEL, LAYOUT, [(h, bytes([i]) * BLOCK_BYTES) for i, h in enumerate(hashes)])
    manager = kv_offload.StoreManager(KVStoreClient(store), MODEL, LAYOUT, pin_lease_s=30, block_tokens=16)
    try:
        ctx = ReqContext(req_id="r1")
        keys = [key(h) for h in [*hashes, 5000, 5001]]
        # Inside a step: no answer yet, and nothing asked of the store until the step ends.
        assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.RETRY] * len(keys)
        assert not manager.has_pending_work()
        manager.on_schedule_end(STEP)
        assert manager.has_pending_work()  # keeps vLLM stepping while the lookup is out
        assert settle(manager, keys[0], ctx) is LookupResult.HIT
        assert [manager.lookup(k, ctx) for k in keys] == [LookupResult.HIT] * 10 + [LookupResult.MISS] * 2
        assert not manager.has_pending_work()
        assert pinned(store) == 10

        spec = manager.prepare_load(keys[:10], ctx)
        assert spec.hashes == tuple(hashes) and [s.block_hash for s in spec.slots] == hashes
        manager.on_request_finished(ctx)
        time.sleep(0.3)
        assert pinned(store) == 10  # the load still reads them
        manager.complete_load(keys[:10], ctx)
        deadline = time.monotonic() + 5
        while pinned(store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pinned(store) == 0
    finally:
        manager.shutdown()


def test_stores_are_offered_once(store):
    manager = kv_offload.StoreManager(KVStoreClient(store), MODEL, LAYOUT, pin_lease_s=30, block_tokens=16)
    try:
        ctx = ReqContext(req_id="r2")
        keys = [key(7000 + i) for i in range(4)]
        out = manager.prepare_store(keys, ctx)
        assert out.keys_to_store == keys and out.store_spec.hashes == tuple(7000 + i for i in range(4))
        assert out.evicted_keys == []
        manager.complete_store(keys[:2], ctx)
        assert manager.prepare_store(keys, ctx).keys_to_store == keys[2:]
    finally:
        manager.shutdown()


def test_an_unreachable_store_is_a_miss():
    manager = kv_offload.StoreManager(KVStoreClient(f"127.0.0.1:{free_port()}", timeout_s=1.0), MODEL, LAYOUT,
                                      pin_lease_s=30, block_tokens=16)
    try:
        ctx = ReqContext(req_id="r3")
        assert manager.lookup(key(1), ctx) is LookupResult.RETRY
        manager.on_schedule_end(STEP)
        assert settle(manager, key(1), ctx) is LookupResult.MISS
    finally:
        manager.shutdown()


def test_engine_settings_choose_the_connector():
    from vllm.config.kv_transfer import KVTransferConfig

    from services.engines.vllm_engine import VllmSettings, kv_transfer_config

    base = dict(model_dir="/m", model_name=MODEL, kv_offload="store", kvstore_address="127.0.0.1:1")
    both = kv_transfer_config(VllmSettings(**base))
    assert both.kv_connector == "OffloadingConnector"
    extra = both.kv_connector_extra_config
    assert extra["spec_module_path"] == "services.engines.kv_offload" and extra["kvstore_model"] == MODEL
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        multi = kv_transfer_config(VllmSettings(**base, role=role))
        assert multi.kv_connector == "MultiConnector" and multi.kv_role == kv_role
        # What vLLM's MultiConnector builds from each entry.
        children = [KVTransferConfig(**c, engine_id=multi.engine_id) for c in multi.kv_connector_extra_config["connectors"]]
        assert [c.kv_connector for c in children] == ["NixlConnector", "OffloadingConnector"]
    assert kv_transfer_config(VllmSettings(model_dir="/m", model_name=MODEL)) is None
    with pytest.raises(ValueError, match="kvstore_address"):
        kv_transfer_config(VllmSettings(model_dir="/m", model_name=MODEL, kv_offload="store"))


def test_up_starts_a_store_for_workers_that_offload_to_it(tmp_path):
    import argparse

    from services import up

    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    args = parser.parse_args(["--kv-offload", "store", "--workers", "2", "--kvstore-port", "50999"])
    config = up.topology(args)
    child, address = up.kvstore_child(config, args, "127.0.0.1:2379", tmp_path)
    assert address == "127.0.0.1:50999" and child.argv[3:6] == ["kvstore", "--host", "127.0.0.1"]
    workers = up.worker_children(config["workers"], args, "127.0.0.1:2379", tmp_path, kvstore=address)
    for worker, _, _ in workers:
        at = worker.argv.index("--kv-offload")
        assert worker.argv[at:at + 4] == ["--kv-offload", "store", "--kvstore", address]
    assert up.kvstore_child(up.topology(parser.parse_args([])), args, "e", tmp_path) is None
    config["kvstore"] = {"ram_gib": 2, "prefault": True}
    child, _ = up.kvstore_child(config, args, "e", tmp_path)
    assert child.argv[-3:] == ["--ram-gib", "2", "--prefault"]
    config["kvstore"] = {"ram_gib": 2, "bogus": 1}
    with pytest.raises(SystemExit, match="bogus"):
        up.kvstore_child(config, args, "e", tmp_path)


def test_stores_say_where_their_blocks_sit_in_the_sequence(store):
    """vLLM places each key (its end token); a store job carries each block's position and the
    hash before it, split into runs of consecutive positions (what ReserveWrite/PutBlocks send)."""
    manager = kv_offload.StoreManager(KVStoreClient(store), MODEL, LAYOUT, pin_lease_s=30, block_tokens=16)
    try:
        ctx = ReqContext(req_id="r4")
        manager.on_new_request(ctx)
        keys = [key(8000 + i) for i in range(6)]
        for i, k in enumerate(keys):
            ctx.set_offload_key_position(k, (i + 1) * 16)
        first = manager.prepare_store(keys[:2], ctx).store_spec
        assert first.positions == (0, 1) and first.parents == (None, 8000)
        assert first.runs() == [(0, 2, None)]
        manager.complete_store(keys[:2], ctx)
        # Block 4 went out in a job of its own; a later step hands over blocks 2, 3 and 5.
        assert manager.prepare_store(keys[4:5], ctx).store_spec.runs() == [(0, 1, None)]  # 3 not seen yet
        manager.complete_store(keys[4:5], ctx)
        later = manager.prepare_store([keys[5], keys[2], keys[3]], ctx)
        assert later.keys_to_store == [keys[2], keys[3], keys[5]]  # sequence order, as vLLM's block ids
        spec = later.store_spec
        assert spec.hashes == (8002, 8003, 8005) and spec.positions == (2, 3, 5)
        assert spec.runs() == [(0, 2, 8001), (2, 1, 8004)]
        # Unplaced keys: one run from the job's first block, as given.
        unplaced = manager.prepare_store([key(9001), key(9000)], ReqContext(req_id="r5")).store_spec
        assert unplaced.positions == () and unplaced.runs() == [(0, 2, None)]
        # A request's blocks stored after it finished leave no bookkeeping behind.
        manager.on_request_finished(ctx)
        manager.prepare_store([key(8006)], ctx)
        assert "r4" not in manager._requests and "r5" not in manager._requests
    finally:
        manager.shutdown()


def test_a_sim_worker_refuses_kv_offload():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--engine", "sim", "--kv-offload", "store",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--kv-offload store is for the vllm engine, not sim" in done.stderr


@pytest.fixture
def frozen_store(etcd, tmp_path):
    """A store of its own (the tests SIGSTOP it): (address, its Child)."""
    address, child = start_store(etcd, tmp_path)
    try:
        yield address, child
    finally:
        child.signal(signal.SIGCONT)
        child.stop()


def test_a_store_that_stops_answering_costs_one_lookup_timeout(frozen_store):
    """A store that is there but silent (SIGSTOP: what a stalled store looks like): the first
    lookup waits its deadline and is a miss; while the store cools down every other request's
    lookup is a miss at once, without asking; after the cool-down the store is asked again."""
    address, child = frozen_store
    hashes = [9000 + i for i in range(4)]
    with KVStoreClient(address) as client:
        client.put(MODEL, LAYOUT, [(h, bytes([i]) * BLOCK_BYTES) for i, h in enumerate(hashes)])
    manager = kv_offload.StoreManager(KVStoreClient(address), MODEL, LAYOUT, pin_lease_s=30, block_tokens=16,
                                      lookup_timeout_s=0.5)

    def ask(req_id: str) -> tuple[LookupResult, float, bool]:
        """(the answer, seconds to it, whether it came in the step that queued it: not asked)."""
        started = time.monotonic()
        ctx = ReqContext(req_id=req_id)
        assert manager.lookup(key(hashes[0]), ctx) is LookupResult.RETRY
        manager.on_schedule_end(STEP)
        at_once = manager.lookup(key(hashes[0]), ctx)
        result = at_once
        if at_once is LookupResult.RETRY:
            result = settle(manager, key(hashes[0]), ctx, timeout=30)
        return result, time.monotonic() - started, at_once is not LookupResult.RETRY

    try:
        assert ask("warm")[0] is LookupResult.HIT
        child.signal(signal.SIGSTOP)
        try:
            result, waited, _ = ask("first")
            assert result is LookupResult.MISS and 0.4 < waited < 2.0, waited  # one deadline (0.5 s)
            assert manager.circuit.state(time.monotonic()) == "open" and manager.circuit.failures == 1
            for i in range(5):
                # Not asked: a miss in the same step, and no second timeout on the circuit (no
                # wall-clock bound, which a loaded machine could break).
                result, _, at_once = ask(f"next-{i}")
                assert result is LookupResult.MISS and at_once, i
            assert manager.circuit.failures == 1
        finally:
            child.signal(signal.SIGCONT)
        time.sleep(manager.circuit.cooldown_s)
        assert ask("after")[0] is LookupResult.HIT
        assert manager.circuit.state(time.monotonic()) == "closed"
    finally:
        manager.shutdown()


def test_stores_to_a_silent_store_are_dropped_not_queued(frozen_store):
    """The worker half, over the gRPC bytes path with real KV tensors: a store job to a frozen
    store ends after one write deadline, the next ones at once (dropped while the store cools
    down: they never hold up the loads behind them); afterwards stores land again."""
    import types

    import torch
    from vllm.v1.kv_offload.base import GPULoadStoreSpec

    address, child = frozen_store
    tensors = [torch.randint(-128, 127, (16, BLOCK_BYTES // 2), dtype=torch.int8) for _ in range(2)]
    caches = types.SimpleNamespace(tensors=[types.SimpleNamespace(tensor=t) for t in tensors])
    worker = kv_offload.StoreWorker(caches, KVStoreClient(address), MODEL, LAYOUT, transport="grpc",
                                    write_timeout_s=0.5)
    job_ids = iter(range(1, 100))

    def store(hashes: list[int]) -> float:
        job = next(job_ids)
        started = time.monotonic()
        worker.submit_store(job, GPULoadStoreSpec(list(range(len(hashes))), [len(hashes)], [0]),
                            kv_offload.StoreBlocks(tuple(hashes)))
        worker.wait({job})
        assert [r.success for r in worker.get_finished()] == [True]  # vLLM asserts it
        return time.monotonic() - started

    def stored(hashes: list[int]) -> int:
        with KVStoreClient(address) as client:
            return client.lookup(MODEL, LAYOUT, hashes)[0]

    try:
        assert store([100, 101]) < 5 and stored([100, 101]) == 2
        child.signal(signal.SIGSTOP)
        try:
            assert 0.4 < store([200, 201]) < 2.0  # one deadline (0.5 s)
            assert worker.circuit.failures == 1
            for i in range(3):
                store([300 + 2 * i, 301 + 2 * i])  # dropped at once: not sent, so no second timeout
            assert worker.dropped_blocks == 8 and worker.circuit.failures == 1
        finally:
            child.signal(signal.SIGCONT)
        time.sleep(worker.circuit.cooldown_s)
        assert store([400, 401]) < 5 and stored([400, 401]) == 2
        assert stored([200, 201]) == 0
    finally:
        worker.shutdown()


def test_a_store_that_stops_answering_mid_write_costs_one_deadline(frozen_store):
    """The NIXL write path against a real store that freezes after granting the reservation: the
    commit's deadline ends the job, and no abort is sent into the same silence (that held the
    transfer thread, and the loads behind it, for a second deadline). The WRITE itself is a
    stand-in: NIXL never loads into pytest (tests/integration/test_kvstore_nixl.py runs it)."""
    import types

    import torch
    from vllm.v1.kv_offload.base import GPULoadStoreSpec

    address, child = frozen_store
    tensors = [torch.randint(-128, 127, (16, BLOCK_BYTES // 2), dtype=torch.int8) for _ in range(2)]
    caches = types.SimpleNamespace(tensors=[types.SimpleNamespace(tensor=t) for t in tensors])
    worker = kv_offload.StoreWorker(caches, KVStoreClient(address), MODEL, LAYOUT, transport="grpc",
                                    write_timeout_s=1.0)
    worker._nixl = types.SimpleNamespace(move=lambda *_: child.signal(signal.SIGSTOP),  # the store freezes
                                         close=lambda: None)
    try:
        started = time.monotonic()
        worker.submit_store(1, GPULoadStoreSpec([0, 1], [2], [0]), kv_offload.StoreBlocks((500, 501)))
        worker.wait({1})
        elapsed = time.monotonic() - started
        assert [r.success for r in worker.get_finished()] == [True]
        # One 1 s deadline, not two: the upper bound leaves 0.7 s for a loaded machine.
        assert 0.9 < elapsed < 1.7, elapsed
        assert worker.dropped_blocks == 2 and worker.circuit.state(time.monotonic()) == "open"
    finally:
        child.signal(signal.SIGCONT)
        worker.shutdown()
