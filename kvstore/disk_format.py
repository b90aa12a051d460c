"""The on-disk block format (pure encode/decode; the file I/O is services/kvstore_disk.py).

One file per block, named by `file_name(model, layout, hash)`:

    offset  size  field
    0       4     magic b"LMKV"
    4       2     version (1), little-endian like every field
    6       2     flags (0)
    8       8     block hash (uint64)
    16      4     position of the block in its chain (uint32)
    20      4     data length = the layout's block_bytes (uint32)
    24      4     CRC-32 of the data
    28      8     chunk key: first hash of the block's chunk record (uint64)
    36      2     model name length M (UTF-8 bytes)
    38      2     layout length L (UTF-8 bytes)
    40      M     model name
    40+M    L     layout
    40+M+L  4     CRC-32 of bytes [0, 40+M+L) (the header)
    44+M+L  n     data

Why each check exists:
- header CRC: a garbage or bit-flipped header is never trusted (the file is deleted);
- file size == header + length: a torn (truncated or extended) file is detected at
  recovery without reading its data;
- name == file_name(header fields): a file renamed or left by another layout is rejected;
- data CRC: verified on every read of the data; a mismatch is a miss, never served.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from kvstore.types import Buffer, checksum

MAGIC = b"LMKV"
VERSION = 1
MAX_MODEL_BYTES = 512
MAX_LAYOUT_BYTES = 4096
SUFFIX = ".kvb"

_FIXED = struct.Struct("<4sHHQIIIQHH")  # 40 bytes
_CRC = struct.Struct("<I")
#: Bytes to read to be sure to hold any header.
MAX_HEADER_BYTES = _FIXED.size + MAX_MODEL_BYTES + MAX_LAYOUT_BYTES + _CRC.size


class FormatError(ValueError):
    """The bytes are not a valid block file header (garbage, torn, or another version)."""


class BlockHeader(NamedTuple):
    """What a block file says about its block."""

    model: str
    layout: str
    block_hash: int
    position: int
    chunk_key: int
    length: int
    checksum: int


def layout_tag(model: str, layout: str) -> str:
    """16 hex digits naming (model, layout) in file names (BLAKE2b-64: collisions ~2^-64)."""
    return hashlib.blake2b(f"{model}\0{layout}".encode(), digest_size=8).hexdigest()


def file_name(model: str, layout: str, block_hash: int, tag: str | None = None) -> str:
    """The file of a block: `<layout tag>-<hash, 16 hex digits>.kvb`."""
    return f"{tag or layout_tag(model, layout)}-{block_hash:016x}{SUFFIX}"


def encode_header(h: BlockHeader) -> bytes:
    """The header bytes (data follows them in the file)."""
    m, lay = h.model.encode(), h.layout.encode()
    if len(m) > MAX_MODEL_BYTES or len(lay) > MAX_LAYOUT_BYTES:
        raise FormatError("model or layout too long")
    head = _FIXED.pack(MAGIC, VERSION, 0, h.block_hash, h.position, h.length, h.checksum, h.chunk_key,
                       len(m), len(lay)) + m + lay
    return head + _CRC.pack(checksum(head))


def decode_header(buf: Buffer) -> tuple[BlockHeader, int]:
    """(header, header length) from the first bytes of a file; FormatError if they are not a valid header."""
    if len(buf) < _FIXED.size + _CRC.size:
        raise FormatError("short header")
    magic, version, flags, bh, pos, length, crc, chunk, mlen, llen = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError("bad magic")
    if version != VERSION or flags != 0:
        raise FormatError(f"unsupported version {version} flags {flags}")
    if mlen > MAX_MODEL_BYTES or llen > MAX_LAYOUT_BYTES:
        raise FormatError("name lengths out of range")
    end = _FIXED.size + mlen + llen
    if len(buf) < end + _CRC.size:
        raise FormatError("short header")
    (hcrc,) = _CRC.unpack_from(buf, end)
    if checksum(memoryview(buf)[:end]) != hcrc:
        raise FormatError("header checksum mismatch")
    try:
        model = bytes(buf[_FIXED.size:_FIXED.size + mlen]).decode()
        layout = bytes(buf[_FIXED.size + mlen:end]).decode()
    except UnicodeDecodeError as e:
        raise FormatError("names are not UTF-8") from e
    return BlockHeader(model, layout, bh, pos, chunk, length, crc), end + _CRC.size
