"""`swarmgrad verify-chain`: a chain the fault harness wrote verifies; each kind of damage or forgery is reported
with a clear message and exit status 1."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from consensus.chain import ChainLog
from consensus.membership import genesis_parent_hash
from consensus.messages import Certificate, Signed
from consensus.provenance import ChainGenesis, append_certificate, create_chain, read_chain
from consensus.signing import Signer
from swarmgrad.cli import main
from testing.consensus_faults import FaultRun, Scenario, write_chains
from tests.consensus_helpers import SWARM, Members, attendance_of, certificate

EXIT_FAILURE = 1


def _harness_chain(tmp_path: Path) -> Path:
    run = FaultRun(Scenario.draw(3))
    result = run.result()
    assert not result.violations and result.scenario.epochs >= 2
    return write_chains(result, run.members, tmp_path / "chains")[0]


def _chain(tmp_path: Path, members: Members, certs: list[Certificate]) -> Path:
    path = tmp_path / "hand.chain"
    log = create_chain(path, ChainGenesis(SWARM, members.keys))
    for cert in certs:
        append_certificate(log, cert)
    return path


def _three_epochs(members: Members) -> list[Certificate]:
    parent = genesis_parent_hash(SWARM, members.keys)
    certs: list[Certificate] = []
    for epoch in (1, 2, 3):
        cert = certificate(epoch, parent, members, attendance=attendance_of(certs[-1]) if certs else ())
        certs.append(cert)
        parent = cert.value.hash()
    return certs


def _verify(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    status = main(["verify-chain", str(path), *extra])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_chain_the_harness_wrote_verifies_through_the_real_command(tmp_path: Path) -> None:
    path = _harness_chain(tmp_path)
    genesis, certs = read_chain(path)
    done = subprocess.run(
        [sys.executable, "-m", "swarmgrad.cli", "verify-chain", str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"swarm {genesis.swarm_id!r}" in lines[0]
    rows = [line.split() for line in lines[2:-1]]
    assert [int(row[0]) for row in rows] == [cert.epoch for cert in certs] == list(range(1, len(certs) + 1))
    assert [row[3] for row in rows] == [cert.value.checkpoint_root.hex()[:16] for cert in certs]
    assert [int(row[5]) for row in rows] == [len(cert.precommits) for cert in certs]
    assert lines[-1].startswith(f"ok: {len(certs)} epochs")


def test_verifying_from_a_trusted_certificate_checks_only_what_follows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = Members.make(4)
    certs = _three_epochs(members)
    forged_first = dataclasses.replace(certs[0], precommits=certs[0].precommits[:1])  # below quorum
    path = _chain(tmp_path, members, [forged_first, *certs[1:]])
    assert _verify(path, capsys)[0] == EXIT_FAILURE
    status, out, _ = _verify(path, capsys, "--trust", certs[0].value.hash().hex())
    assert status == 0, out
    assert [int(line.split()[0]) for line in out.splitlines()[2:-1]] == [2, 3]
    status, _, err = _verify(path, capsys, "--trust", "ab" * 32)
    assert status == EXIT_FAILURE and "no certificate of the chain has the trusted hash" in err


def test_a_truncated_chain_is_reported_and_left_as_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _harness_chain(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    status, _, err = _verify(path, capsys)
    assert status == EXIT_FAILURE and "truncated last record" in err
    assert path.read_bytes() == data[:-7]  # verification never repairs


def test_a_flipped_byte_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _harness_chain(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    status, _, err = _verify(path, capsys)
    assert status == EXIT_FAILURE and "chain file" in err and "at byte" in err


def test_a_missing_signature_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = Members.make(4)
    certs = _three_epochs(members)
    certs[1] = dataclasses.replace(certs[1], precommits=certs[1].precommits[1:])
    status, _, err = _verify(_chain(tmp_path, members, certs), capsys)
    assert status == EXIT_FAILURE and "epoch 2: below quorum" in err


def test_a_forged_signature_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = Members.make(4)
    certs = _three_epochs(members)
    first, *rest = certs[2].precommits
    forged = Signed(first.member, bytes(reversed(first.signature)))
    certs[2] = dataclasses.replace(certs[2], precommits=(forged, *rest))
    status, _, err = _verify(_chain(tmp_path, members, certs), capsys)
    assert status == EXIT_FAILURE and "epoch 3: forged or wrong signature" in err


def test_a_signer_outside_the_member_set_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = Members.make(4)
    outsider = Signer.from_seed(b"outsider")
    certs = _three_epochs(members)
    parent = certs[0].value.hash()
    # epoch 2 signed by three members and an outsider, all valid signatures of the same value
    with_outsider = certificate(2, parent, members, signers=[*members.signers[:2], outsider])
    certs[1] = with_outsider
    status, _, err = _verify(_chain(tmp_path, members, certs[:2]), capsys)
    assert status == EXIT_FAILURE and "epoch 2: signer" in err and "is not a member" in err


def test_a_broken_parent_link_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = Members.make(4)
    certs = _three_epochs(members)
    certs[2] = certificate(3, certs[0].value.hash(), members)  # links to epoch 1, skipping epoch 2
    status, _, err = _verify(_chain(tmp_path, members, certs), capsys)
    assert status == EXIT_FAILURE and "epoch 3: broken parent link" in err


def test_a_chain_without_its_genesis_record_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = Members.make(4)
    path = tmp_path / "headless.chain"
    log = ChainLog(path)
    for cert in _three_epochs(members):
        append_certificate(log, cert)
    status, _, err = _verify(path, capsys)
    assert status == EXIT_FAILURE and "record 0: a Certificate, not the genesis record" in err


def test_a_bad_trusted_hash_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["verify-chain", str(tmp_path / "x.chain"), "--trust", "not-hex"])
    assert exit_info.value.code == 2
    assert "is not a value hash" in capsys.readouterr().err
