"""The chain file: records survive reloads, a truncated tail is cut back with a warning, other damage is an error."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import pytest

from consensus.chain import (
    FILE_HEADER_BYTES,
    MAX_RECORD_BYTES,
    RECORD_HEADER_BYTES,
    ChainError,
    ChainLog,
    encode_record,
)
from swarmgrad.core.errors import LocalProtocolError, SwarmgradError

RECORDS = [b"genesis certificate", b"\x00" * 40, bytes(range(256)), b"x"]


def _written(tmp_path: Path, records: list[bytes] = RECORDS) -> Path:
    path = tmp_path / "data" / "chain.log"
    log = ChainLog(path)
    for record in records:
        log.append(record)
    return path


def test_records_round_trip_and_the_layout_is_as_documented(tmp_path: Path) -> None:
    path = _written(tmp_path)
    assert ChainLog(path).load() == RECORDS
    data = path.read_bytes()
    assert data[:8] == b"SGCHAIN\x00" and len(data) == FILE_HEADER_BYTES + sum(
        RECORD_HEADER_BYTES + len(r) for r in RECORDS
    )
    assert data[FILE_HEADER_BYTES : FILE_HEADER_BYTES + 4] == len(RECORDS[0]).to_bytes(4, "little")
    assert data.endswith(encode_record(b"x"))


def test_a_missing_file_has_no_records_and_is_not_created_by_load(tmp_path: Path) -> None:
    path = tmp_path / "chain.log"
    assert ChainLog(path).load() == []
    assert not path.exists()


def test_append_continues_a_loaded_chain(tmp_path: Path) -> None:
    path = _written(tmp_path, RECORDS[:2])
    log = ChainLog(path)
    log.append(b"third")  # loads (and checks) first
    log.append(b"fourth")
    assert ChainLog(path).load() == [*RECORDS[:2], b"third", b"fourth"]


def test_truncation_at_every_byte_of_the_last_record_keeps_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _written(tmp_path)
    whole = path.read_bytes()
    last_start = len(whole) - len(encode_record(RECORDS[-1]))
    for cut in range(last_start + 1, len(whole)):
        path.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="consensus.chain"):
            assert ChainLog(path).load(repair=False) == RECORDS[:-1]
        assert len(caplog.records) == 1 and "truncated last record" in caplog.records[0].getMessage()
        assert path.stat().st_size == cut  # a read-only check leaves the file alone
    path.write_bytes(whole[: len(whole) - 1])
    with caplog.at_level(logging.WARNING, logger="consensus.chain"):
        assert ChainLog(path).load() == RECORDS[:-1]
    assert path.read_bytes() == whole[:last_start]


def test_truncation_inside_a_long_body_and_inside_the_header(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _written(tmp_path, [b"a", b"b" * 5000])
    whole = path.read_bytes()
    path.write_bytes(whole[:-2500])
    assert ChainLog(path).load() == [b"a"]
    for cut in range(FILE_HEADER_BYTES):  # a crash while the file was created, the empty file included
        path.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="consensus.chain"):
            assert ChainLog(path).load() == []
        assert len(caplog.records) == 1 and "header is cut short" in caplog.records[0].getMessage()
        assert path.read_bytes() == whole[:FILE_HEADER_BYTES]


def test_append_after_a_repaired_truncation(tmp_path: Path) -> None:
    path = _written(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])
    log = ChainLog(path)
    log.append(b"after the crash")  # load cuts the partial record, then the new one follows the last whole one
    assert ChainLog(path).load() == [*RECORDS[:-1], b"after the crash"]
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    ChainLog(empty).append(b"first")
    assert ChainLog(empty).load() == [b"first"]


def test_a_flipped_byte_anywhere_is_an_error_with_its_offset(tmp_path: Path) -> None:
    path = _written(tmp_path)
    whole = path.read_bytes()
    starts = [FILE_HEADER_BYTES]
    for record in RECORDS:
        starts.append(starts[-1] + RECORD_HEADER_BYTES + len(record))
    for position in range(len(whole)):
        damaged = bytearray(whole)
        damaged[position] ^= 1 << (position % 8)  # every bit position is flipped somewhere
        path.write_bytes(bytes(damaged))
        with pytest.raises(ChainError) as caught:
            ChainLog(path).load()
        record_start = max([0] + [s for s in starts if s <= position]) if position >= FILE_HEADER_BYTES else 0
        assert caught.value.offset == record_start, (position, caught.value)
        assert path.read_bytes() == bytes(damaged)  # damage is never repaired away


def test_bad_headers_lengths_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "chain.log"
    good = _written(tmp_path).read_bytes()
    cases = {
        b"NOTCHAIN" + good[8:]: "bad magic",
        good[:8] + (2).to_bytes(4, "little") + good[12:]: "file header checksum",
        b"hello": "too short",
        b"\x00" * 64: "bad magic",
    }
    for data, reason in cases.items():
        path.write_bytes(data)
        with pytest.raises(ChainError, match=reason) as caught:
            ChainLog(path).load()
        assert isinstance(caught.value, SwarmgradError) and caught.value.offset == 0
    head = b"SGCHAIN\x00" + struct.pack("<I", 2)
    path.write_bytes(head + struct.pack("<I", zlib.crc32(head)))
    with pytest.raises(ChainError, match="unsupported format version 2"):
        ChainLog(path).load()
    too_long = struct.pack("<I", MAX_RECORD_BYTES + 1)
    path.write_bytes(good[:FILE_HEADER_BYTES] + too_long + struct.pack("<I", zlib.crc32(too_long)) + bytes(20))
    with pytest.raises(ChainError, match=f"at byte {FILE_HEADER_BYTES}: record 0: length"):
        ChainLog(path).load()


def test_records_are_bounded() -> None:
    with pytest.raises(LocalProtocolError):
        encode_record(b"")
    with pytest.raises(LocalProtocolError):
        encode_record(bytes(MAX_RECORD_BYTES + 1))
