"""A peer opening its own chain at start: a truncated tail is cut back with one warning (the cut bytes kept aside);
a flipped byte, another genesis, a certificate of another swarm or one that does not verify is an error naming the
file, and nothing is deleted."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from consensus.chain import FILE_HEADER_BYTES, RECORD_HEADER_BYTES, ChainError, ChainLog
from consensus.membership import genesis_parent_hash
from consensus.messages import EpochValue, members_hash
from consensus.provenance import (
    SCHEMA,
    ChainContentError,
    ChainGenesis,
    append_certificate,
    create_chain,
    open_chain,
    read_chain,
)
from tests.consensus_helpers import SWARM, Members, attendance_of, certificate, chain

MEMBERS = Members.make(4)
GENESIS = ChainGenesis(SWARM, MEMBERS.keys)


def _chain_file(tmp_path: Path, epochs: int = 3) -> Path:
    path = tmp_path / "data" / "chain.log"
    log = create_chain(path, GENESIS)
    for cert in chain(MEMBERS, epochs):
        append_certificate(log, cert)
    return path


def test_a_missing_file_is_created_with_the_genesis_record(tmp_path: Path) -> None:
    path = tmp_path / "data" / "chain.log"
    opened = open_chain(path, GENESIS)
    assert opened.certificates == () and read_chain(path) == (GENESIS, [])
    append_certificate(opened.log, chain(MEMBERS, 1)[0])
    assert read_chain(path)[1] == chain(MEMBERS, 1)


def test_a_whole_chain_opens_verified_and_appends_continue_it(tmp_path: Path) -> None:
    path = _chain_file(tmp_path)
    opened = open_chain(path, GENESIS)
    assert opened.genesis == GENESIS and list(opened.certificates) == chain(MEMBERS, 3)
    assert [s.epoch for s in opened.summaries] == [1, 2, 3]
    fourth = certificate(4, opened.summaries[-1].value_hash, MEMBERS, attendance=attendance_of(opened.certificates[-1]))
    append_certificate(opened.log, fourth)
    assert read_chain(path)[1] == [*chain(MEMBERS, 3), fourth]


def test_a_truncated_tail_is_cut_back_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _chain_file(tmp_path)
    whole = path.read_bytes()
    last = len(SCHEMA.encode(chain(MEMBERS, 3)[2])) + RECORD_HEADER_BYTES
    path.write_bytes(whole[: len(whole) - last // 2])
    with caplog.at_level(logging.WARNING):
        opened = open_chain(path, GENESIS)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated last record" in warnings[0].getMessage()
    assert list(opened.certificates) == chain(MEMBERS, 2)
    assert path.read_bytes() == whole[: len(whole) - last]  # cut back to the last whole record, not further
    aside = path.with_name(f"{path.name}.tail-{len(whole) - last}")  # the cut bytes are kept: nothing is lost
    assert aside.read_bytes() == whole[len(whole) - last : len(whole) - last // 2]
    assert str(aside) in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_chain(path, GENESIS)
    assert not caplog.records  # repaired once, quiet after


def test_a_file_cut_while_it_was_created_gets_its_genesis(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "chain.log"
    create_chain(path, GENESIS)
    path.write_bytes(path.read_bytes()[: FILE_HEADER_BYTES + 5])
    with caplog.at_level(logging.WARNING):
        opened = open_chain(path, GENESIS)
    assert opened.certificates == () and read_chain(path) == (GENESIS, [])
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_a_flipped_byte_anywhere_but_the_tail_is_an_error_naming_file_and_offset(tmp_path: Path) -> None:
    path = _chain_file(tmp_path)
    whole = path.read_bytes()
    genesis_end = FILE_HEADER_BYTES + RECORD_HEADER_BYTES + len(SCHEMA.encode(GENESIS))
    # the file header, a record's length, its checksum, the genesis body, a middle certificate, the last byte
    for offset in (3, FILE_HEADER_BYTES + 1, FILE_HEADER_BYTES + 10, genesis_end - 3, genesis_end + 60, len(whole) - 1):
        damaged = bytearray(whole)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(ChainError) as info:
            open_chain(path, GENESIS)
        assert info.value.path == path and str(path) in str(info.value)
        record_start = max(o for o in _record_offsets(whole) if o <= offset)
        assert info.value.offset in {0, 8, record_start}, (offset, info.value)
        assert path.read_bytes() == bytes(damaged)  # nothing deleted, nothing repaired


def _record_offsets(data: bytes) -> list[int]:
    offsets, offset = [0], FILE_HEADER_BYTES
    while offset < len(data):
        offsets.append(offset)
        offset += RECORD_HEADER_BYTES + int.from_bytes(data[offset : offset + 4], "little")
    return offsets


def test_a_genesis_other_than_the_configured_one_names_the_field(tmp_path: Path) -> None:
    path = _chain_file(tmp_path)
    with pytest.raises(ChainContentError, match=r"record 0: the genesis record differs .*swarm_id is 'lab', expected"):
        open_chain(path, ChainGenesis("other-swarm", MEMBERS.keys))
    others = Members.make(4, tag="x")
    with pytest.raises(ChainContentError, match=r"members differ: 4 founders where 4 are expected .*4 unknown"):
        open_chain(path, ChainGenesis(SWARM, others.keys))
    with pytest.raises(ChainContentError, match="members differ: 4 founders where 3 are expected"):
        open_chain(path, ChainGenesis(SWARM, MEMBERS.keys[:3]))
    assert read_chain(path)[1] == chain(MEMBERS, 3)  # untouched


def test_a_certificate_of_another_swarm_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "chain.log"
    log = create_chain(path, GENESIS)
    first = chain(MEMBERS, 1)[0]
    stolen = dataclasses.replace(
        first,
        value=EpochValue(
            "other",
            1,
            10,
            first.value.checkpoint_root,
            first.value.model_spec_hash,
            members_hash(MEMBERS.keys),
            genesis_parent_hash("other", MEMBERS.keys),
        ),
    )
    append_certificate(log, stolen)
    with pytest.raises(ChainContentError, match="record 1: a certificate of swarm 'other' in the chain of 'lab'"):
        open_chain(path, GENESIS)


def test_a_certificate_that_does_not_verify_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "chain.log"
    log = create_chain(path, GENESIS)
    certs = chain(MEMBERS, 2)
    append_certificate(log, certs[0])
    append_certificate(log, dataclasses.replace(certs[1], precommits=certs[1].precommits[:2]))
    with pytest.raises(ChainContentError, match="record 2: does not verify from genesis: epoch 2: below quorum"):
        open_chain(path, GENESIS)
    assert len(ChainLog(path).load(repair=False)) == 3
