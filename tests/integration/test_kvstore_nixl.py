"""The KV store's NIXL data plane: a client subprocess (NIXL never loads into pytest) adds the
store's agent from its etcd record, WRITEs blocks into reserved slots, commits, pins and READs
them back; this process then reads the same blocks over the gRPC bytes path and compares them
with the bytes the subprocess derived from the same seed."""

from __future__ import annotations

import json
import subprocess
import sys

from llm_mesh.v1 import membership_pb2
from services.kvstore_client import list_stores, store_nixl_metadata
from services.kvstore_nixl import chain, pattern
from services.membership import nixl_metadata_key
from tests.integration.test_kvstore import new_store, stores  # noqa: F401 - the fixture

BLOCK, BLOCKS, SEED = 64 * 1024, 16, 11


def test_nixl_write_then_read_from_a_client_process(stores, tmp_path, etcd) -> None:  # noqa: F811
    store = new_store(stores, tmp_path, etcd, "kvs-nixl", "--nixl", "on", disk=False)
    member = list_stores(etcd.endpoint)[store.id]
    assert member.kvstore.nixl_metadata_key == nixl_metadata_key(store.id)
    record = store_nixl_metadata(etcd.endpoint, store.id)
    assert isinstance(record, membership_pb2.NixlAgentMetadata) and record.engine_id == store.id
    assert record.region_bytes == 4 << 20 and record.region_address and record.agent_metadata

    done = subprocess.run(
        [sys.executable, "-m", "services.kvstore_nixl", "roundtrip", "--address", store.address, "--etcd",
         etcd.endpoint, "--store-id", store.id, "--model", "m", "--layout", "nixl-layout", "--block-bytes",
         str(BLOCK), "--blocks", str(BLOCKS), "--seed", str(SEED)],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["reserved"] == result["committed"] == result["pinned"] == BLOCKS and result["rejected"] == []
    assert result["read_equal"] is True and result["checksums_ok"] is True
    hashes = chain(SEED, BLOCKS)
    assert result["hashes"] == hashes

    # What NIXL wrote is what the store holds: read it over gRPC here.
    expected = pattern(BLOCK * BLOCKS, SEED).tobytes()
    with store.client() as c:
        got = c.get("m", "nixl-layout", hashes)
        assert [h for h, _ in got] == hashes
        assert b"".join(d for _, d in got) == expected
        assert c.stats().pinned_blocks == 0  # the client unpinned
    assert store.metric('llm_mesh_kvstore_transfer_bytes_total{op="write",path="nixl"}') == BLOCK * BLOCKS
    assert store.metric('llm_mesh_kvstore_transfer_bytes_total{op="read",path="nixl"}') == BLOCK * BLOCKS
