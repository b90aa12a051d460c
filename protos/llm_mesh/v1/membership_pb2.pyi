from llm_mesh.v1 import kvstore_pb2 as _kvstore_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemberKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBER_KIND_UNSPECIFIED: _ClassVar[MemberKind]
    MEMBER_KIND_WORKER: _ClassVar[MemberKind]
    MEMBER_KIND_SCHEDULER: _ClassVar[MemberKind]
    MEMBER_KIND_GATEWAY: _ClassVar[MemberKind]
    MEMBER_KIND_KVSTORE: _ClassVar[MemberKind]

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_BOTH: _ClassVar[WorkerRole]
MEMBER_KIND_UNSPECIFIED: MemberKind
MEMBER_KIND_WORKER: MemberKind
MEMBER_KIND_SCHEDULER: MemberKind
MEMBER_KIND_GATEWAY: MemberKind
MEMBER_KIND_KVSTORE: MemberKind
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_BOTH: WorkerRole

class Member(_message.Message):
    __slots__ = ("id", "kind", "address", "started_at", "version", "worker", "kvstore")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    KVSTORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: MemberKind
    address: str
    started_at: int
    version: str
    worker: WorkerInfo
    kvstore: _kvstore_pb2.KVStoreInfo
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[MemberKind, str]] = ..., address: _Optional[str] = ..., started_at: _Optional[int] = ..., version: _Optional[str] = ..., worker: _Optional[_Union[WorkerInfo, _Mapping]] = ..., kvstore: _Optional[_Union[_kvstore_pb2.KVStoreInfo, _Mapping]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("role", "model", "engine", "max_model_len", "block_size", "kv_blocks_total", "max_num_seqs", "nixl_metadata_key", "kv_endpoint")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    NIXL_METADATA_KEY_FIELD_NUMBER: _ClassVar[int]
    KV_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    role: WorkerRole
    model: str
    engine: str
    max_model_len: int
    block_size: int
    kv_blocks_total: int
    max_num_seqs: int
    nixl_metadata_key: str
    kv_endpoint: KVEndpoint
    def __init__(self, role: _Optional[_Union[WorkerRole, str]] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., max_model_len: _Optional[int] = ..., block_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., nixl_metadata_key: _Optional[str] = ..., kv_endpoint: _Optional[_Union[KVEndpoint, _Mapping]] = ...) -> None: ...

class KVEndpoint(_message.Message):
    __slots__ = ("engine_id", "host", "port", "tp_size")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    host: str
    port: int
    tp_size: int
    def __init__(self, engine_id: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class NixlAgentMetadata(_message.Message):
    __slots__ = ("engine_id", "connector_version", "compatibility_hash", "handshake_payload", "agent_metadata_bytes", "num_blocks", "agent_metadata", "region_address", "region_bytes")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPATIBILITY_HASH_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    AGENT_METADATA_FIELD_NUMBER: _ClassVar[int]
    REGION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    connector_version: int
    compatibility_hash: str
    handshake_payload: bytes
    agent_metadata_bytes: int
    num_blocks: int
    agent_metadata: bytes
    region_address: int
    region_bytes: int
    def __init__(self, engine_id: _Optional[str] = ..., connector_version: _Optional[int] = ..., compatibility_hash: _Optional[str] = ..., handshake_payload: _Optional[bytes] = ..., agent_metadata_bytes: _Optional[int] = ..., num_blocks: _Optional[int] = ..., agent_metadata: _Optional[bytes] = ..., region_address: _Optional[int] = ..., region_bytes: _Optional[int] = ...) -> None: ...
