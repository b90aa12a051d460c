from llm_mesh.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockChain(_message.Message):
    __slots__ = ("model", "layout", "block_hashes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    model: str
    layout: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., layout: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("chain",)
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    chain: BlockChain
    def __init__(self, chain: _Optional[_Union[BlockChain, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("blocks", "ram_blocks")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RAM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    ram_blocks: int
    def __init__(self, blocks: _Optional[int] = ..., ram_blocks: _Optional[int] = ...) -> None: ...

class BlockSlot(_message.Message):
    __slots__ = ("block_hash", "offset", "length", "checksum")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_hash: int
    offset: int
    length: int
    checksum: int
    def __init__(self, block_hash: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., checksum: _Optional[int] = ...) -> None: ...

class ReserveWriteRequest(_message.Message):
    __slots__ = ("chain", "block_bytes", "lease_s", "start_position", "parent_block_hash")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    chain: BlockChain
    block_bytes: int
    lease_s: float
    start_position: int
    parent_block_hash: int
    def __init__(self, chain: _Optional[_Union[BlockChain, _Mapping]] = ..., block_bytes: _Optional[int] = ..., lease_s: _Optional[float] = ..., start_position: _Optional[int] = ..., parent_block_hash: _Optional[int] = ...) -> None: ...

class ReserveWriteResponse(_message.Message):
    __slots__ = ("write_id", "slots", "lease_s")
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    slots: _containers.RepeatedCompositeFieldContainer[BlockSlot]
    lease_s: float
    def __init__(self, write_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[BlockSlot, _Mapping]]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class CommitWriteRequest(_message.Message):
    __slots__ = ("write_id", "checksums")
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, write_id: _Optional[str] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitWriteResponse(_message.Message):
    __slots__ = ("committed", "rejected_block_hashes")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    committed: int
    rejected_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, committed: _Optional[int] = ..., rejected_block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class AbortWriteRequest(_message.Message):
    __slots__ = ("write_id",)
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    def __init__(self, write_id: _Optional[str] = ...) -> None: ...

class AbortWriteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("chain", "lease_s")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    chain: BlockChain
    lease_s: float
    def __init__(self, chain: _Optional[_Union[BlockChain, _Mapping]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pin_id", "slots", "lease_s")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    slots: _containers.RepeatedCompositeFieldContainer[BlockSlot]
    lease_s: float
    def __init__(self, pin_id: _Optional[str] = ..., slots: _Optional[_Iterable[_Union[BlockSlot, _Mapping]]] = ..., lease_s: _Optional[float] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    def __init__(self, pin_id: _Optional[str] = ...) -> None: ...

class UnpinResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutBlocksRequest(_message.Message):
    __slots__ = ("model", "layout", "block_hash", "data", "checksum", "start_position", "parent_block_hash")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    START_POSITION_FIELD_NUMBER: _ClassVar[int]
    PARENT_BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    model: str
    layout: str
    block_hash: int
    data: bytes
    checksum: int
    start_position: int
    parent_block_hash: int
    def __init__(self, model: _Optional[str] = ..., layout: _Optional[str] = ..., block_hash: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., start_position: _Optional[int] = ..., parent_block_hash: _Optional[int] = ...) -> None: ...

class PutBlocksResponse(_message.Message):
    __slots__ = ("stored", "rejected_block_hashes")
    STORED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    stored: int
    rejected_block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stored: _Optional[int] = ..., rejected_block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class GetBlocksRequest(_message.Message):
    __slots__ = ("chain",)
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    chain: BlockChain
    def __init__(self, chain: _Optional[_Union[BlockChain, _Mapping]] = ...) -> None: ...

class GetBlocksResponse(_message.Message):
    __slots__ = ("block_hash", "data", "checksum")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    block_hash: int
    data: bytes
    checksum: int
    def __init__(self, block_hash: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class GetKVStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreTierStats(_message.Message):
    __slots__ = ("blocks", "bytes_used", "bytes_total")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    bytes_used: int
    bytes_total: int
    def __init__(self, blocks: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_total: _Optional[int] = ...) -> None: ...

class KVStoreStats(_message.Message):
    __slots__ = ("ram", "disk", "pinned_blocks", "reserved_blocks", "hit_blocks", "miss_blocks", "stored_blocks", "spilled_blocks", "evicted_blocks", "corrupt_blocks")
    RAM_FIELD_NUMBER: _ClassVar[int]
    DISK_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MISS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    STORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SPILLED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ram: KVStoreTierStats
    disk: KVStoreTierStats
    pinned_blocks: int
    reserved_blocks: int
    hit_blocks: int
    miss_blocks: int
    stored_blocks: int
    spilled_blocks: int
    evicted_blocks: int
    corrupt_blocks: int
    def __init__(self, ram: _Optional[_Union[KVStoreTierStats, _Mapping]] = ..., disk: _Optional[_Union[KVStoreTierStats, _Mapping]] = ..., pinned_blocks: _Optional[int] = ..., reserved_blocks: _Optional[int] = ..., hit_blocks: _Optional[int] = ..., miss_blocks: _Optional[int] = ..., stored_blocks: _Optional[int] = ..., spilled_blocks: _Optional[int] = ..., evicted_blocks: _Optional[int] = ..., corrupt_blocks: _Optional[int] = ...) -> None: ...

class KVStoreInfo(_message.Message):
    __slots__ = ("nixl_metadata_key", "ram_bytes", "disk_bytes", "chunk_blocks")
    NIXL_METADATA_KEY_FIELD_NUMBER: _ClassVar[int]
    RAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    nixl_metadata_key: str
    ram_bytes: int
    disk_bytes: int
    chunk_blocks: int
    def __init__(self, nixl_metadata_key: _Optional[str] = ..., ram_bytes: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., chunk_blocks: _Optional[int] = ...) -> None: ...

class KVStoreChunk(_message.Message):
    __slots__ = ("store_id", "model", "layout", "block_hashes")
    STORE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    store_id: str
    model: str
    layout: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, store_id: _Optional[str] = ..., model: _Optional[str] = ..., layout: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...
