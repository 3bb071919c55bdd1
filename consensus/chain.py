"""The provenance chain file: an append-only log of records (certificates) in the data directory, crash-safe.

This module owns the file format and its integrity, nothing else: what a record means (a certificate, its parent
link, its signatures) is the caller's business. It does blocking file I/O, so a protocol machine asks for an
append through an action and a driver calls `ChainLog.append`.

**Format** (all integers little-endian):

- a file header of 16 bytes: `FILE_MAGIC` (8 bytes), the format version (u32, `FORMAT_VERSION`), then the CRC-32
  (zlib's) of those 12 bytes (u32);
- then records, each a 24-byte record header and the body: the body's length (u32, 1 to `MAX_RECORD_BYTES`), the
  CRC-32 of those 4 length bytes (u32), the SHA-256 of the body truncated to `CHECKSUM_BYTES` (16) bytes, then
  the body.

The length has a checksum of its own so that a damaged length is told apart from a truncated tail: without it, a
flipped bit that made a middle record's length point past the end of the file would look like a cut-short last
record and everything after it would be dropped.

**Durability.** `append` writes one record with a single `write` and `fsync`s the file before it returns; creating
the file writes and `fsync`s the header, then `fsync`s the directory so that the file's name survives a crash too.

**Damage.** `load` reads the whole file and checks every record. A crash during an append can leave only a
*prefix* of the last record (its length, checksum or body cut short): such a truncated tail is cut back to the end
of the last whole record, with a warning in the log, and the records before it are returned; the cut bytes are
first written to `<name>.tail-<offset>` beside the file, so that nothing is lost. A file shorter than
its header that holds a prefix of it (an empty file included: a crash while the file was created) gets its header
rewritten, with a warning, and holds no records. Anything else is damage that a crash cannot cause: a bad file
header, a length whose CRC does not match or that is 0 or above the limit, or a body checksum that does not match
(in the middle or in a complete last record). That raises `ChainError` with the byte offset and the reason, and
the file is left as it is: the chain is never silently shortened or accepted. (A cut exactly at a record boundary
looks like a shorter chain and cannot be seen in the file alone; verifying from a trusted certificate catches it.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

from swarmgrad.core.errors import LocalProtocolError, SwarmgradError

log = logging.getLogger(__name__)

FILE_MAGIC = b"SGCHAIN\x00"
FORMAT_VERSION = 1
MAX_RECORD_BYTES = 16 * 1024 * 1024
"""Bound on one record: a certificate of 2f+1 signatures over a few hundred members is a few tens of KiB."""
CHECKSUM_BYTES = 16

_FILE_HEADER = struct.Struct("<8sII")
FILE_HEADER_BYTES = _FILE_HEADER.size
_RECORD_HEADER = struct.Struct(f"<II{CHECKSUM_BYTES}s")
RECORD_HEADER_BYTES = _RECORD_HEADER.size
_LENGTH = struct.Struct("<II")  # the start of a record header: the length and its CRC-32


class ChainError(SwarmgradError):
    """The chain file is damaged in a way a crash cannot explain: `offset` is the byte where the damage starts,
    `reason` says what is wrong."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(f"chain file {path}: at byte {offset}: {reason}")


def _file_header() -> bytes:
    head = FILE_MAGIC + struct.pack("<I", FORMAT_VERSION)
    return head + struct.pack("<I", zlib.crc32(head))


def _checksum(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()[:CHECKSUM_BYTES]


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def encode_record(body: bytes) -> bytes:
    """One record as it lies in the file."""
    if not 1 <= len(body) <= MAX_RECORD_BYTES:
        raise LocalProtocolError(f"a record holds 1 to {MAX_RECORD_BYTES} bytes, got {len(body)}")
    length = struct.pack("<I", len(body))
    return _RECORD_HEADER.pack(len(body), zlib.crc32(length), _checksum(body)) + body


class ChainLog:
    """The chain file at `path`. Not safe for two writers: one peer owns its data directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._end: int | None = None  # the end of the last whole record, once loaded or created

    def load(self, *, repair: bool = True, strict: bool = False) -> list[bytes]:
        """Every record, verified; none if the file does not exist yet. A truncated tail (or header) is cut back
        with one warning (left in place when `repair` is false, for a read-only check; an error with `strict`, for
        a file that no crash of ours can explain, such as a copy to verify); any other damage raises `ChainError`."""
        if not self.path.exists():
            self._end = None
            return []
        data = self.path.read_bytes()
        if len(data) < FILE_HEADER_BYTES and _file_header().startswith(data):
            if strict:
                raise ChainError(self.path, len(data), "the file header is cut short: the file holds no record")
            log.warning("chain file %s: its header is cut short at %d bytes; it holds no records", self.path, len(data))
            if repair:
                self._write_header(self.path.open("r+b"))
            self._end = FILE_HEADER_BYTES
            return []
        records, end = self._parse(data)
        if end < len(data) and strict:
            cut = len(data) - end
            raise ChainError(self.path, end, f"a truncated last record ({cut} bytes after the last whole one)")
        if end < len(data):
            # the cut bytes are kept beside the file (a person may want them): only then is the file cut back
            aside = self.path.with_name(f"{self.path.name}.tail-{end}")
            if repair:
                _write_synced(aside, data[end:])
            log.warning(
                "chain file %s: a truncated last record (%d bytes at byte %d); keeping the %d whole records%s",
                self.path,
                len(data) - end,
                end,
                len(records),
                f", the cut bytes in {aside}" if repair else "",
            )
            if repair:
                with open(self.path, "r+b") as file:
                    file.truncate(end)
                    file.flush()
                    os.fsync(file.fileno())
        self._end = end
        return records

    def append(self, record: bytes) -> None:
        """Write `record` at the end of the chain and `fsync` it before returning. The chain is loaded (and so
        checked, a truncated tail repaired) first if this object has not loaded it yet; the file is created (and
        its directory `fsync`ed) if there is none."""
        encoded = encode_record(record)
        if self._end is None:
            self.load()
        if self._end is None:
            self._create()
            self._end = FILE_HEADER_BYTES
        with open(self.path, "r+b") as file:
            file.seek(self._end)
            file.write(encoded)
            file.truncate()  # drops what a failed earlier append may have left past the end
            file.flush()
            os.fsync(file.fileno())
        self._end += len(encoded)

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write_header(open(self.path, "xb"))
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @staticmethod
    def _write_header(file: BinaryIO) -> None:
        with file:
            file.seek(0)
            file.write(_file_header())
            file.flush()
            os.fsync(file.fileno())

    def _parse(self, data: bytes) -> tuple[list[bytes], int]:
        """The whole records of `data` and where the last one ends."""
        if len(data) < FILE_HEADER_BYTES:
            raise ChainError(self.path, 0, f"file of {len(data)} bytes is too short for a chain file header")
        magic, version, crc = _FILE_HEADER.unpack_from(data)
        if magic != FILE_MAGIC:
            raise ChainError(self.path, 0, f"bad magic {magic!r}: not a swarmgrad chain file")
        if crc != zlib.crc32(data[:12]):
            raise ChainError(self.path, 0, "file header checksum does not match")
        if version != FORMAT_VERSION:
            raise ChainError(self.path, 8, f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
        records: list[bytes] = []
        offset = FILE_HEADER_BYTES
        while offset < len(data):  # each pass consumes one record of at least RECORD_HEADER_BYTES + 1 bytes
            left = len(data) - offset
            if left < _LENGTH.size:
                return records, offset  # a record's length cut short: a truncated tail
            length, length_crc = _LENGTH.unpack_from(data, offset)
            if length_crc != zlib.crc32(data[offset : offset + 4]):
                raise ChainError(self.path, offset, f"record {len(records)}: length field checksum does not match")
            if not 1 <= length <= MAX_RECORD_BYTES:
                raise ChainError(
                    self.path, offset, f"record {len(records)}: length {length} outside 1..{MAX_RECORD_BYTES}"
                )
            if left < RECORD_HEADER_BYTES + length:
                return records, offset  # a checksum or body cut short: a truncated tail
            _, _, checksum = _RECORD_HEADER.unpack_from(data, offset)
            start = offset + RECORD_HEADER_BYTES
            body = data[start : start + length]
            if _checksum(body) != checksum:
                raise ChainError(self.path, offset, f"record {len(records)}: checksum does not match its bytes")
            records.append(body)
            offset = start + length
        return records, offset
