"""A vLLM engine's clients to the KV store over TLS: the worker's --tls-* files and --etcd-*
settings reach the offloading spec through `extra_config` (JSON, as vLLM hands it to both
halves in other processes), and `connection_settings` — the one builder MeshKVStoreSpec uses —
turns them into a client that works against a real `llm-mesh kvstore` serving mTLS on an etcd
that requires client certificates, and into etcd settings that find the store's NIXL record
there. Without the client certificate, or without the etcd settings, both are refused."""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time

import grpc
import pytest
from etcd3aio import EtcdError

from services import worker
from services.etcd_server import EtcdServer
from services.kvstore_client import list_stores
from services.membership import EtcdSettings
from services.procs import Child, free_port, grpc_serving
from services.tls import TlsFiles
from tests.integration.test_security import code_of, etcd_flags, pki, tls_etcd, tls_flags  # noqa: F401 - fixtures

kv_offload = pytest.importorskip("services.engines.kv_offload")  # needs vLLM (and torch)
from vllm.v1.kv_offload.base import LookupResult, ReqContext  # noqa: E402

from tests.integration.test_kv_offload import STEP, key, settle  # noqa: E402

MODEL, BLOCK = "m", 4096


def etcd_settings_of(files: TlsFiles) -> EtcdSettings:
    return EtcdSettings(ca=files.ca, cert=files.cert, key=files.key)


def through_vllm(config: dict) -> dict:
    """What the spec's halves receive: the extra config after a JSON round trip."""
    return json.loads(json.dumps(config))


def spec_of(extra: dict) -> kv_offload.MeshKVStoreSpec:
    """The spec as vLLM builds it (either half) from an OffloadingConfig with `extra`."""
    from vllm.v1.kv_offload.config import (OffloadingCacheConfig, OffloadingConfig, OffloadingGroupConfig,
                                           OffloadingModelConfig, OffloadingParallelConfig)

    return kv_offload.MeshKVStoreSpec(OffloadingConfig(
        groups=(OffloadingGroupConfig(tokens_per_block=16, layer_names=("layer.0",), group_id=0),),
        worker_kv_bytes_per_block=BLOCK, enable_kv_cache_events=False, extra_config=extra, engine_id="e",
        model=OffloadingModelConfig(name="/no/model", dtype="float16"),
        cache=OffloadingCacheConfig(tokens_per_hash=16, blocks_per_chunk=1),
        parallel=OffloadingParallelConfig(rank=0, world_size=1, tp_size=1, pp_size=1, pcp_size=1, dcp_size=1,
                                          data_parallel_index=0, data_parallel_size=1,
                                          data_parallel_rank_local=None, is_parallelism_agnostic=False)))


# ---------------------------------------------------------------- the extra config


def test_extra_config_round_trips_tls_files_and_etcd_settings(pki, tmp_path: pathlib.Path) -> None:  # noqa: F811
    password = tmp_path / "etcd-password"
    password.write_text("s3cret-etcd-pw\n")
    tls = pki["mesh"]
    tls = TlsFiles(tls.cert, tls.key, tls.ca, server_name="localhost")
    etcd = EtcdSettings(ca=tls.ca, cert=tls.cert, key=tls.key, user="root", password_file=str(password))
    config = kv_offload.extra_config("127.0.0.1:1", MODEL, etcd="127.0.0.1:2", tls=tls, etcd_settings=etcd)
    dumped = json.dumps(config)
    assert "s3cret-etcd-pw" not in dumped and "PRIVATE KEY" not in dumped  # paths travel, never secrets
    assert kv_offload.connection_settings(json.loads(dumped)) == (tls, etcd)

    only_ca = kv_offload.extra_config("a:1", MODEL, tls=TlsFiles(ca=tls.ca), etcd_settings=EtcdSettings(ca=tls.ca))
    assert kv_offload.connection_settings(through_vllm(only_ca)) == (TlsFiles(ca=tls.ca), EtcdSettings(ca=tls.ca))


def test_extra_config_without_tls_is_unchanged() -> None:
    for config in (kv_offload.extra_config("a:1", MODEL, etcd="e:2"),
                   kv_offload.extra_config("a:1", MODEL, etcd="e:2", tls=None, etcd_settings=EtcdSettings())):
        assert kv_offload.TLS_KEY not in config and kv_offload.ETCD_SETTINGS_KEY not in config
        assert kv_offload.connection_settings(through_vllm(config)) == (None, None)


def test_worker_flags_reach_the_engine_extra_config(pki, tmp_path: pathlib.Path) -> None:  # noqa: F811
    """`llm-mesh worker --kv-offload store` flags → build_engine → VllmSettings → the
    OffloadingConnector's extra config → the same TlsFiles/EtcdSettings."""
    from services.engines.vllm_engine import kv_transfer_config

    mesh, client = pki["mesh"], pki["client"]
    args = worker_args(["--kv-offload", "store", "--kvstore", "127.0.0.1:9", *tls_flags(mesh),
                        "--tls-server-name", "localhost", *etcd_flags(client)], tmp_path)
    engine = worker.build_engine(args)  # builds the engine's settings; starts nothing
    transfer = kv_transfer_config(engine.settings)
    assert transfer is not None and transfer.kv_connector == "OffloadingConnector"
    extra = through_vllm(transfer.kv_connector_extra_config)
    assert extra["kvstore_address"] == "127.0.0.1:9"
    assert kv_offload.connection_settings(extra) == (TlsFiles(mesh.cert, mesh.key, mesh.ca, "localhost"),
                                                      etcd_settings_of(client))

    plain = worker.build_engine(worker_args(["--kv-offload", "store", "--kvstore", "127.0.0.1:9"], tmp_path))
    assert kv_offload.connection_settings(through_vllm(kv_transfer_config(plain.settings)
                                                       .kv_connector_extra_config)) == (None, None)


def worker_args(argv: list[str], model_dir: pathlib.Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    return parser.parse_args(["--model-dir", str(model_dir), *argv])


@pytest.fixture
def cert_files(pki) -> TlsFiles:  # noqa: F811
    return pki["mesh"]


@pytest.mark.parametrize(("section", "fields", "named"), [
    ("kvstore_tls", {"certificate": "x"}, "kvstore_tls.certificate"),
    ("kvstore_etcd_settings", {"password": "x"}, "kvstore_etcd_settings.password"),
    ("kvstore_tls", {"ca": "/nonexistent/ca.pem"}, "kvstore_tls.ca"),
    ("kvstore_etcd_settings", {"password_file": "/nonexistent/pw", "user": "u"},
     "kvstore_etcd_settings.password_file"),
    ("kvstore_tls", {"ca": 7}, "kvstore_tls.ca"),
    ("kvstore_tls", "/path/ca.pem", "kvstore_tls"),
    ("kvstore_tls", {"cert": "CERT"}, "kvstore_tls.key"),
    ("kvstore_tls", {"server_name": "localhost"}, "kvstore_tls"),
    ("kvstore_etcd_settings", {"cert": "CERT", "key": "KEY"}, "kvstore_etcd_settings.ca"),
    ("kvstore_etcd_settings", {"user": "root"}, "kvstore_etcd_settings.password_file"),
])
def test_connection_settings_refuse_bad_config_naming_the_key(cert_files: TlsFiles, section: str, fields: object,
                                                              named: str) -> None:
    if isinstance(fields, dict):  # CERT/KEY stand for files that exist
        fields = {k: {"CERT": cert_files.cert, "KEY": cert_files.key}.get(v, v) if isinstance(v, str) else v
                  for k, v in fields.items()}
    extra = {**kv_offload.extra_config("a:1", MODEL), section: fields}
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        kv_offload.connection_settings(extra)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):  # the spec builds through it
        spec_of(extra)


# ---------------------------------------------------------------- a store serving mTLS on a TLS etcd


@pytest.fixture(scope="module")
def tls_store(tls_etcd: EtcdServer, pki, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """`llm-mesh kvstore` with --tls-ca (mTLS: clients must present a certificate), registered
    on the etcd that requires client certificates, publishing its NIXL record there."""
    mesh, client = pki["mesh"], pki["client"]
    port, store_id = free_port(), f"kvs-tls-{free_port()}"
    child = Child.llm_mesh(store_id, [
        "kvstore", "--port", str(port), "--id", store_id, "--etcd", tls_etcd.endpoint, "--ram-mib", "4",
        "--nixl", "on", *tls_flags(mesh), *etcd_flags(mesh)], tmp_path_factory.mktemp("kvstore-tls"))
    child.start()
    address = f"127.0.0.1:{port}"
    try:
        child.wait_ready(lambda: grpc_serving(address, tls=client), 60)
        deadline = time.monotonic() + 15
        while store_id not in list_stores(tls_etcd.endpoint, etcd_settings_of(client)):
            assert time.monotonic() < deadline, "the store never registered in etcd"
            time.sleep(0.2)
        yield store_id, address
    finally:
        child.stop()


def engine_extra(address: str, etcd: EtcdServer, tls: TlsFiles | None, etcd_settings: EtcdSettings | None) -> dict:
    return through_vllm(kv_offload.extra_config(address, MODEL, etcd=etcd.endpoint, tls=tls,
                                                etcd_settings=etcd_settings))


def test_engine_client_works_over_mtls(tls_store, tls_etcd: EtcdServer, pki) -> None:  # noqa: F811
    """Both halves' clients, as the spec builds them from the extra config: the bytes path and a
    reservation, then the scheduler half's lookup (a Pin) finding the stored run."""
    _, address = tls_store
    spec = spec_of(engine_extra(address, tls_etcd, pki["mesh"], None))
    blocks = [(0x7000 + i, bytes([i + 1]) * BLOCK) for i in range(4)]
    hashes = [h for h, _ in blocks]
    with spec.store_client() as client:
        assert client.lookup(MODEL, spec.layout, hashes) == (0, 0)
        assert client.put(MODEL, spec.layout, blocks) == (4, [])
        assert client.lookup(MODEL, spec.layout, hashes) == (4, 4)
        assert client.get(MODEL, spec.layout, hashes) == blocks
        more = [0x7100, 0x7101]
        reservation = client.reserve(MODEL, spec.layout, BLOCK, more)
        assert [s.block_hash for s in reservation.slots] == more and reservation.write_id
        client.abort(reservation.write_id)
        assert client.lookup(MODEL, spec.layout, more) == (0, 0)

    manager = spec.get_manager()
    try:
        ctx = ReqContext(req_id="tls-1")
        manager.on_new_request(ctx)
        assert manager.lookup(key(hashes[0]), ctx) is LookupResult.RETRY
        manager.on_schedule_end(STEP)
        assert settle(manager, key(hashes[0]), ctx) is LookupResult.HIT
        assert manager.lookup(key(0x7200), ctx) is LookupResult.RETRY  # not asked yet
        manager.on_schedule_end(STEP)
        assert settle(manager, key(0x7200), ctx) is LookupResult.MISS
    finally:
        manager.shutdown()


def test_engine_client_without_a_client_certificate_is_refused(tls_store, tls_etcd: EtcdServer,
                                                               pki) -> None:  # noqa: F811
    _, address = tls_store
    for tls in (pki["no_cert"], pki["rogue"], None):  # CA only; a certificate of another CA; plaintext
        with spec_of(engine_extra(address, tls_etcd, tls, None)).store_client() as client:
            assert code_of(lambda: client.lookup(MODEL, "layout", [1])) == grpc.StatusCode.UNAVAILABLE, tls


def test_store_nixl_record_through_tls_etcd(tls_store, tls_etcd: EtcdServer, pki) -> None:  # noqa: F811
    """The worker half's lookup of the store's NIXL record (StoreWorker._connect), with the etcd
    settings from the extra config; without them a secured etcd refuses it."""
    store_id, address = tls_store
    extra = engine_extra(address, tls_etcd, pki["mesh"], etcd_settings_of(pki["client"]))
    _, etcd_settings = kv_offload.connection_settings(extra)
    record = kv_offload.store_nixl_record(address, extra["kvstore_etcd"], etcd_settings)
    assert record.engine_id == store_id and record.agent_metadata and record.region_bytes == 4 << 20

    with pytest.raises(LookupError):  # the right etcd, another address: no record
        kv_offload.store_nixl_record("127.0.0.1:1", extra["kvstore_etcd"], etcd_settings)
    for refused in (None, EtcdSettings(ca=pki["client"].ca)):  # plaintext; TLS without a client certificate
        with pytest.raises((grpc.RpcError, EtcdError)):
            kv_offload.store_nixl_record(address, extra["kvstore_etcd"], refused)


def test_worker_discovers_the_store_through_tls_etcd(tls_store, tls_etcd: EtcdServer, pki,  # noqa: F811
                                                     tmp_path: pathlib.Path) -> None:
    """No --kvstore: the worker finds the store in the secured etcd with its --etcd-* flags."""
    _, address = tls_store
    args = worker_args(["--kv-offload", "store", "--etcd", tls_etcd.endpoint, *etcd_flags(pki["client"])], tmp_path)
    assert asyncio.run(worker.discover_kvstore(args, wait_s=5)) == address
