"""`verify_chain` checks what each verified epoch's value carries, as its voters did: the attendance (signed votes
for the parent value, by members of the parent epoch), the equivocation evidence (against members of the epoch) and
the join requests (signed by their joiners, on this chain, of non-members). Chains the real machines certify, with
joiners and a dropped silent member, still verify; a certificate that carries a forged entry is refused naming its
epoch, through `verify_chain` and through `swarmgrad verify-chain`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from consensus.certificate import verify_chain
from consensus.errors import CertificateError
from consensus.membership import MembershipPolicy
from consensus.messages import PRECOMMIT, PREVOTE, Certificate, EpochValue, EquivocationEvidence, Signed
from consensus.provenance import ChainGenesis, append_certificate, create_chain
from consensus.signing import Signer
from swarmgrad.cli import main
from tests.consensus_helpers import SWARM, Members, Network, attendance_of, chain

EXIT_FAILURE = 1


def _signed(value: EpochValue, members: Members) -> Certificate:
    """`value` certified by the first quorum of `members` (its next member set: `members` too)."""
    votes = [s.vote(SWARM, value.epoch, 0, PRECOMMIT, value.hash()) for s in members.signers[:3]]
    return Certificate(value, members.keys, 0, tuple(Signed(v.voter, v.signature) for v in votes))


def _with_epoch_2(members: Members, **fields: object) -> list[Certificate]:
    """A three-epoch chain whose epoch 2 value carries `fields` instead (validly certified; epoch 3 relinked to it and
    attending it)."""
    certs = chain(members, 3)
    second = _signed(dataclasses.replace(certs[1].value, **fields), members)  # type: ignore[arg-type]
    relinked = dataclasses.replace(
        certs[2].value, parent_certificate_hash=second.value.hash(), attendance=attendance_of(second)
    )
    third = _signed(relinked, members)
    return [certs[0], second, third]


def _equivocation(signer: Signer, epoch: int) -> EquivocationEvidence:
    return EquivocationEvidence(
        signer.vote(SWARM, epoch, 0, PREVOTE, b"a" * 32), signer.vote(SWARM, epoch, 0, PREVOTE, b"b" * 32)
    )


def test_chains_the_machines_certify_verify_with_joiners_and_a_dropped_member() -> None:
    members = Members.make(4)
    joiners = tuple(Signer.from_seed(f"joiner{i}".encode()) for i in range(2))
    silent = members.name(members.keys[3])
    net = Network(members, {silent: -1.0}, MembershipPolicy(public=True, drop_after_missed=2), joiners=joiners)
    net.run(epochs=5)
    certs = [c.certificate for c in net.certified["p0"]]
    assert len(certs) == 5 and any(c.value.joiners for c in certs)
    assert members.keys[3] not in certs[-1].next_members  # dropped as silent
    assert [s.epoch for s in verify_chain(certs, members.keys)] == [1, 2, 3, 4, 5]
    assert [s.epoch for s in verify_chain(certs, members.keys, certs[1].value.hash())] == [3, 4, 5]


def test_valid_evidence_verifies_and_forged_evidence_is_refused_naming_the_epoch() -> None:
    members = Members.make(4)
    proof = _equivocation(members.signers[3], 2)
    assert len(verify_chain(_with_epoch_2(members, evidence=(proof,)), members.keys)) == 3
    forged = EquivocationEvidence(proof.first, dataclasses.replace(proof.second, signature=bytes(64)))
    with pytest.raises(CertificateError, match=r"epoch 2: evidence: a vote of .* is not validly signed"):
        verify_chain(_with_epoch_2(members, evidence=(forged,)), members.keys)
    stranger = _equivocation(Signer.from_seed(b"stranger"), 2)
    with pytest.raises(CertificateError, match=r"epoch 2: evidence: offender .* is not a member"):
        verify_chain(_with_epoch_2(members, evidence=(stranger,)), members.keys)


def test_a_forged_or_missing_attendance_is_refused_naming_the_epoch() -> None:
    members = Members.make(4)
    attendance = chain(members, 2)[1].value.attendance
    forged = (dataclasses.replace(attendance[0], signature=bytes(64)), *attendance[1:])
    with pytest.raises(CertificateError, match="epoch 2: attendance: forged or wrong attendance signature"):
        verify_chain(_with_epoch_2(members, attendance=forged), members.keys)
    with pytest.raises(CertificateError, match=r"epoch 2: attendance: 0 attendees of epoch 1, at least 3"):
        verify_chain(_with_epoch_2(members, attendance=()), members.keys)
    # from a trusted epoch 1, epoch 2's attendance is still checked
    with pytest.raises(CertificateError, match="epoch 2: attendance"):
        certs = _with_epoch_2(members, attendance=forged)
        verify_chain(certs, members.keys, certs[0].value.hash())
    # from a trusted epoch 2 whose parent the chain lacks, who voted in epoch 2 (epoch 3 names them) is unknown
    certs = chain(members, 3)
    with pytest.raises(CertificateError, match="epoch 3: the chain does not hold the parent of the trusted"):
        verify_chain(certs[1:], members.keys, certs[1].value.hash())


def test_join_requests_must_be_signed_on_this_chain_and_of_non_members() -> None:
    members = Members.make(4)
    joiner = Signer.from_seed(b"joiner")
    parent = chain(members, 1)[0].value.hash()
    good = joiner.join_request(SWARM, 2, parent)
    assert len(verify_chain(_with_epoch_2(members, joiners=(good,)), members.keys)) == 3
    cases = {
        "forged or wrong signature of the join request": dataclasses.replace(good, signature=bytes(64)),
        "names another chain": joiner.join_request(SWARM, 2, b"x" * 32),
        "a member or a proven equivocator": members.signers[0].join_request(SWARM, 2, parent),
    }
    for problem, request in cases.items():
        with pytest.raises(CertificateError, match=f"epoch 2: join request.*{problem}|epoch 2: {problem}"):
            verify_chain(_with_epoch_2(members, joiners=(request,)), members.keys)


def test_the_command_reports_a_forged_attendance_with_its_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    members = Members.make(4)
    attendance = chain(members, 2)[1].value.attendance
    forged = (*attendance[:-1], dataclasses.replace(attendance[-1], signature=bytes(64)))
    path = tmp_path / "forged.chain"
    log = create_chain(path, ChainGenesis(SWARM, members.keys))
    for cert in _with_epoch_2(members, attendance=forged):
        append_certificate(log, cert)
    status = main(["verify-chain", str(path)])
    err = capsys.readouterr().err
    assert status == EXIT_FAILURE and "epoch 2: attendance: forged or wrong attendance signature" in err
