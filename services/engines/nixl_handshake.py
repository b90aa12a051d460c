"""Read a vLLM engine's NIXL agent metadata from its own side channel, once, at start.

vLLM's NixlConnector serves its agent metadata on a ZMQ ROUTER socket (the "side channel",
VLLM_NIXL_SIDE_CHANNEL_HOST/PORT); a decoder asks for it once per prefill engine (the
handshake) and caches it. The worker asks the same question of its own engine, exactly as a
decoder would (`(GET_META_MSG, pp_rank, tp_rank)` → `[payload, perf_counter]`), so it can
publish the metadata under its etcd lease: other processes then learn every engine's agent
without asking it, and per request only engine ids and block ids travel.
"""

from __future__ import annotations

import msgspec
import zmq

from services.engines.base import NixlMetadata


def fetch_nixl_metadata(host: str, port: int, timeout_s: float = 5.0, tp_rank: int = 0) -> NixlMetadata:
    """The engine's handshake payload for `tp_rank` (pipeline rank 0), decoded enough to
    check it; raises TimeoutError when the side channel does not answer in `timeout_s`."""
    # Imported here: vLLM's nixl package loads the NIXL bindings, which only P/D workers need
    # (and which abort a process that already loaded some other native modules, e.g. pytest's).
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        GET_META_MSG,
        NIXL_CONNECTOR_VERSION,
        NixlAgentMetadata,
        NixlHandshakePayload,
    )

    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(f"tcp://{host}:{port}")
        sock.send(msgspec.msgpack.encode((GET_META_MSG, 0, tp_rank)))
        try:
            payload_bytes = sock.recv_multipart()[0]
        except zmq.Again as exc:
            raise TimeoutError(f"NIXL side channel {host}:{port} did not answer in {timeout_s}s") from exc
    finally:
        sock.close()
    payload = msgspec.msgpack.decode(payload_bytes, type=NixlHandshakePayload)
    agent = msgspec.msgpack.decode(payload.agent_metadata_bytes, type=NixlAgentMetadata)
    return NixlMetadata(
        engine_id=agent.engine_id,
        connector_version=NIXL_CONNECTOR_VERSION,
        compatibility_hash=payload.compatibility_hash,
        handshake_payload=payload_bytes,
        agent_metadata_bytes=len(agent.agent_metadata),
        num_blocks=agent.num_blocks,
    )
