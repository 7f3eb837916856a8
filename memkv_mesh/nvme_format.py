"""The NVMe tier's on-disk format: block headers, the journal header and journal records.

Pure encoding and decoding, no I/O. ``memkv_mesh/nvme.py`` explains how they are used and what
every crash leaves behind; ``docs/storage.md`` has the same with figures. All integers are
little-endian; every structure carries its own xxh3-64 checksum over the bytes before it, so a
torn or flipped structure is recognised, never trusted.

Block header (72 bytes, at the start of a block's extent; the payload starts ``header_region``
bytes later, ``round_up(72, align)``, so payload file offsets stay aligned for O_DIRECT/GDS)::

    0   4s  magic  b"MKVB"
    4   H   format version (1)
    6   H   flags (0)
    8   Q   seq         unique per tier, never reused
    16  Q   length      payload bytes
    24  Q   checksum    xxh3_64 of the payload (computed by the caller when the block entered DRAM)
    32  32s key
    64  Q   xxh3_64 of bytes 0..63

Journal file ``journal``: a 48-byte header, then fixed 80-byte records, appended in order::

    header: 0 8s magic b"MKVJRNL\\0" | 8 H version (1) | 10 H reserved | 12 I align
            | 16 Q file_size | 24 Q next_seq | 32 Q reserved | 40 Q xxh3_64 of bytes 0..39
    record: 0 B type (1 = PUT, 2 = DEL) | 1 3x | 4 I file | 8 Q seq | 16 32s key | 48 Q offset
            | 56 Q length | 64 Q checksum | 72 Q xxh3_64 of bytes 0..71

ONLY APPEND to the record types; never renumber.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import xxhash

__all__ = [
    "BLOCK_MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "JOURNAL_HEADER_SIZE",
    "JOURNAL_MAGIC",
    "KEY_SIZE",
    "REC_DEL",
    "REC_PUT",
    "RECORD_SIZE",
    "BlockHeader",
    "JournalHeader",
    "Record",
    "decode_block_header",
    "decode_journal_header",
    "decode_record",
    "encode_block_header",
    "encode_journal_header",
    "encode_record",
]

FORMAT_VERSION = 1
KEY_SIZE = 32
BLOCK_MAGIC = b"MKVB"
JOURNAL_MAGIC = b"MKVJRNL\0"
REC_PUT = 1
REC_DEL = 2

_HDR = struct.Struct("<4sHHQQQ32s")
_JHDR = struct.Struct("<8sHHIQQQ")
_REC = struct.Struct("<B3xIQ32sQQQ")
_CRC = struct.Struct("<Q")

HEADER_SIZE = _HDR.size + _CRC.size  # 72
JOURNAL_HEADER_SIZE = _JHDR.size + _CRC.size  # 48
RECORD_SIZE = _REC.size + _CRC.size  # 80

_h64 = xxhash.xxh3_64_intdigest


class BlockHeader(NamedTuple):
    seq: int
    length: int
    checksum: int
    key: bytes


class JournalHeader(NamedTuple):
    align: int
    file_size: int
    next_seq: int


class Record(NamedTuple):
    type: int
    file: int
    seq: int
    key: bytes
    offset: int
    length: int
    checksum: int


def encode_block_header(h: BlockHeader) -> bytes:
    body = _HDR.pack(BLOCK_MAGIC, FORMAT_VERSION, 0, h.seq, h.length, h.checksum, h.key)
    return body + _CRC.pack(_h64(body))


def decode_block_header(buf: bytes | bytearray | memoryview) -> BlockHeader | None:
    """The header in ``buf[:HEADER_SIZE]``, or None if it is torn, foreign or corrupt."""
    if len(buf) < HEADER_SIZE:
        return None
    body = bytes(buf[: _HDR.size])
    (crc,) = _CRC.unpack_from(buf, _HDR.size)
    if _h64(body) != crc:
        return None
    magic, version, _flags, seq, length, checksum, key = _HDR.unpack(body)
    if magic != BLOCK_MAGIC or version != FORMAT_VERSION:
        return None
    return BlockHeader(seq, length, checksum, key)


def encode_journal_header(h: JournalHeader) -> bytes:
    body = _JHDR.pack(JOURNAL_MAGIC, FORMAT_VERSION, 0, h.align, h.file_size, h.next_seq, 0)
    return body + _CRC.pack(_h64(body))


def decode_journal_header(buf: bytes) -> JournalHeader | None:
    """Decode a journal header: None if it is torn or fails its checksum; ValueError if the file
    is not a journal of this tier at all (foreign magic, unsupported version), so a wrong
    directory is refused instead of being overwritten."""
    if len(buf) >= len(JOURNAL_MAGIC) and buf[: len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        raise ValueError(f"not a memkv-mesh NVMe journal (magic {bytes(buf[:8])!r})")
    if len(buf) < JOURNAL_HEADER_SIZE:
        return None
    body = buf[: _JHDR.size]
    _magic, version, _r, align, file_size, next_seq, _r2 = _JHDR.unpack(body)
    if version != FORMAT_VERSION:  # checked first: a newer format is refused, never reset
        raise ValueError(f"journal format version {version} is not supported ({FORMAT_VERSION} is)")
    (crc,) = _CRC.unpack_from(buf, _JHDR.size)
    if _h64(body) != crc:
        return None
    return JournalHeader(align, file_size, next_seq)


def encode_record(r: Record) -> bytes:
    body = _REC.pack(r.type, r.file, r.seq, r.key, r.offset, r.length, r.checksum)
    return body + _CRC.pack(_h64(body))


def decode_record(buf: bytes | memoryview, pos: int) -> Record | None:
    """The record at ``buf[pos:pos + RECORD_SIZE]``, or None if it is short, corrupt or unknown."""
    if len(buf) - pos < RECORD_SIZE:
        return None
    body = buf[pos : pos + _REC.size]
    (crc,) = _CRC.unpack_from(buf, pos + _REC.size)
    if _h64(body) != crc:
        return None
    rec = Record(*_REC.unpack(body))
    if rec.type not in (REC_PUT, REC_DEL):
        return None
    return rec
