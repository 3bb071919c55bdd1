"""The silence rule counts attendance, not certificate signatures: 4 `EpochChain` machines on a small virtual-time
network keep an honest member that is always the slowest (it signs none of the others' certificates), still drop
a member that is really silent, and refuse a proposal whose attendance is forged or that drops a member the voter
saw voting. Equivocators go by the evidence the value carries, never by evidence only one voter holds: a voter that
saw none accepts a value that proves one, a voter that holds some accepts a value that proves none, and forged
evidence is refused."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from consensus.agreement import AgreementConfig, CheckProposal, proposer_of
from consensus.certificate import verify_attendance
from consensus.epochs import Checkpoint, EpochChain
from consensus.errors import AttendanceError
from consensus.membership import MembershipPolicy
from consensus.messages import (
    MAX_EVIDENCE,
    MAX_MEMBERS,
    MAX_MESSAGE_BYTES,
    NIL,
    PREVOTE,
    SCHEMA,
    Attendance,
    Certificate,
    EpochValue,
    EquivocationEvidence,
    Proposal,
    Signed,
    Vote,
    members_hash,
)
from consensus.provenance import ChainGenesis
from consensus.signing import Signer, proposal_bytes
from swarmgrad.core.errors import DecodeError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    Received,
    Send,
)
from tests.consensus_helpers import EPOCH_S, SPEC, SWARM, Members, Network, certificate


@pytest.mark.parametrize("epoch_s", [EPOCH_S, 0.0], ids=["spaced epochs", "back-to-back epochs"])
def test_the_slowest_honest_member_signs_no_certificate_of_the_others_and_stays(epoch_s: float) -> None:
    # back to back: every checkpoint is known from the start, so each epoch starts at the last one's decision,
    # before the slow member's votes have arrived; it then waits up to vote_timeout_s for them
    members = Members.make(4)
    slow = members.name(members.keys[3])
    delay_s = {members.name(key): 0.01 for key in members.keys} | {slow: 0.3}
    net = Network(members, delay_s, MembershipPolicy(drop_after_missed=3))
    net.run(epochs=6, epoch_s=epoch_s)
    slow_key = members.keys[3]
    for name in net.names:
        assert [c.certificate.epoch for c in net.certified[name]] == [1, 2, 3, 4, 5, 6], name
        assert net.member_counts(name) == [4] * 6, name
        assert all(len(c.certificate.next_members) == 4 for c in net.certified[name])
        if name != slow:  # the old rule's premise: the slow member is in none of these peers' certificates
            assert all(slow_key not in c.certificate.signers for c in net.certified[name]), name
    # what kept it: every value from epoch 2 on attests it took part in the epoch before
    for cert in (c.certificate for c in net.certified[net.names[0]][1:]):
        assert slow_key in cert.value.attendees
        assert verify_attendance(cert.value, members.keys) == cert.value.attendees


def test_a_silent_member_is_still_dropped_after_drop_after_missed_epochs() -> None:
    members = Members.make(4)
    silent = members.name(members.keys[2])
    delay_s = {members.name(key): 0.01 for key in members.keys} | {silent: -1.0}  # it never sends anything
    net = Network(members, delay_s, MembershipPolicy(drop_after_missed=3))
    net.run(epochs=5)
    for name in net.names:
        if name == silent:
            continue
        # epochs 1-3 missed: the value of epoch 4 attests that, and names the 3 others as epoch 5's voters
        assert net.member_counts(name) == [4, 4, 4, 4, 3], name
        assert members.keys[2] not in net.certified[name][3].certificate.next_members


# ---- a voter's check of a proposal's attendance -------------------------------------------------------------------


def _voter_of_epoch_2(policy: MembershipPolicy) -> tuple[Members, EpochChain, Signer, Certificate]:
    """A member's chain holding epoch 1 (signed by the first three, in key order), with epoch 2's agreement
    started, and the signer of the proposer of epoch 2's round 0 (another member)."""
    members = Members.make(4)
    genesis = ChainGenesis(SWARM, members.keys)
    cert = certificate(1, genesis.parent_hash, members, signers=members.signers[:3])
    proposer = proposer_of(members.keys, cert.value.hash(), 0)
    voter = next(s for s in members.signers if s.public_key != proposer)
    chain = EpochChain(AgreementConfig(), voter, genesis, [cert], members.name, policy=policy)
    chain.step(20.0, Checkpoint(2, 20, hashlib.sha256(b"mine").digest(), SPEC))
    return members, chain, members.by_key(proposer), cert


def _proposal(
    proposer: Signer,
    cert: Certificate,
    attendance: tuple[Attendance, ...],
    nxt: tuple[bytes, ...],
    evidence: tuple[EquivocationEvidence, ...] = (),
) -> Proposal:
    root = hashlib.sha256(b"theirs").digest()
    value = EpochValue(SWARM, 2, 20, root, SPEC, members_hash(nxt), cert.value.hash(), attendance, evidence)
    unsigned = Proposal(value, nxt, 0, -1, proposer.public_key, bytes(64), ())
    return dataclasses.replace(unsigned, signature=proposer.sign(proposal_bytes(unsigned)))


def _attend(signer: Signer, cert: Certificate) -> Attendance:
    vote = signer.vote(SWARM, 1, cert.consensus_round, PREVOTE, cert.value.hash())
    return Attendance(vote.voter, vote.consensus_round, vote.phase, vote.signature)


def _prevote_of(chain: EpochChain, members: Members, proposal: Proposal) -> tuple[bytes, list[Action]]:
    actions = chain.step(20.5, Received(members.name(proposal.proposer), proposal))
    votes = [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, Vote) and a.msg.phase == PREVOTE]
    assert votes, actions
    return votes[0].value_hash, actions


def test_an_honest_attendance_goes_to_the_sampled_check() -> None:
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy())
    attendance = tuple(sorted((_attend(s, cert) for s in members.signers), key=lambda a: a.voter))
    actions = chain.step(
        20.5, Received(members.name(proposer.public_key), _proposal(proposer, cert, attendance, members.keys))
    )
    assert any(isinstance(a, CheckProposal) for a in actions)  # nothing plainly wrong: the host samples it


def _forged(members: Members, cert: Certificate, case: str) -> tuple[tuple[Attendance, ...], tuple[bytes, ...]]:
    honest = sorted((_attend(s, cert) for s in members.signers), key=lambda a: a.voter)
    if case == "forged signature":  # the silent-looking member "attends" with a signature it never made
        honest[3] = dataclasses.replace(honest[3], signature=bytes(64))
    elif case == "another epoch's vote":
        vote = members.signers[3].vote(SWARM, 1, 0, PREVOTE, hashlib.sha256(b"other value").digest())
        honest[3] = Attendance(vote.voter, 0, PREVOTE, vote.signature)
    elif case == "non-member":
        stranger = Signer.from_seed(b"stranger")
        vote = stranger.vote(SWARM, 1, 0, PREVOTE, cert.value.hash())
        honest = sorted([*honest[:3], Attendance(vote.voter, 0, PREVOTE, vote.signature)], key=lambda a: a.voter)
    elif case == "below quorum":
        honest = honest[:2]
    return tuple(honest), members.keys


@pytest.mark.parametrize("case", ["forged signature", "another epoch's vote", "non-member", "below quorum"])
def test_a_forged_attendance_is_refused_before_any_sampling(case: str) -> None:
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy())
    attendance, nxt = _forged(members, cert, case)
    proposal = _proposal(proposer, cert, attendance, nxt)
    prevote, actions = _prevote_of(chain, members, proposal)
    assert prevote == NIL and not any(isinstance(a, CheckProposal) for a in actions)
    with pytest.raises(AttendanceError):
        verify_attendance(proposal.value, members.keys)


def test_a_proposal_that_drops_a_member_this_voter_saw_voting_is_refused() -> None:
    # with k = 1, a proposer that leaves a member out of the attendance drops it at once; this voter's certificate
    # of epoch 1 holds that member's precommit, so it refuses, though the member set follows from the attendance
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy(drop_after_missed=1))
    victim = next(k for k in cert.signers if k not in (proposer.public_key, chain.signer.public_key))
    kept = tuple(k for k in members.keys if k != victim)
    attendance = tuple(sorted((_attend(members.by_key(k), cert) for k in kept), key=lambda a: a.voter))
    prevote, _ = _prevote_of(chain, members, _proposal(proposer, cert, attendance, kept))
    assert prevote == NIL


def _equivocation(offender: Signer, epoch: int = 1) -> EquivocationEvidence:
    first, second = (hashlib.sha256(label).digest() for label in (b"one value", b"another value"))
    return EquivocationEvidence(
        offender.vote(SWARM, epoch, 0, PREVOTE, first), offender.vote(SWARM, epoch, 0, PREVOTE, second)
    )


def _full_attendance(members: Members, cert: Certificate) -> tuple[Attendance, ...]:
    return tuple(sorted((_attend(s, cert) for s in members.signers), key=lambda a: a.voter))


def _bystander(members: Members, chain: EpochChain, proposer: Signer) -> Signer:
    """A member that is neither the voter nor the proposer."""
    return next(s for s in members.signers if s.public_key not in (chain.signer.public_key, proposer.public_key))


def test_a_value_that_proves_an_equivocation_drops_the_offender_for_a_voter_that_saw_none() -> None:
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy())
    offender = _bystander(members, chain, proposer)
    kept = tuple(k for k in members.keys if k != offender.public_key)
    proposal = _proposal(proposer, cert, _full_attendance(members, cert), kept, (_equivocation(offender),))
    actions = chain.step(20.5, Received(members.name(proposer.public_key), proposal))
    assert any(isinstance(a, CheckProposal) for a in actions), actions  # not refused: the host samples it
    # the same drop without the proof is refused (the offender attended epoch 1: nothing else drops it)
    _, chain, _, _ = _voter_of_epoch_2(MembershipPolicy())
    prevote, actions = _prevote_of(chain, members, _proposal(proposer, cert, _full_attendance(members, cert), kept))
    assert prevote == NIL and not any(isinstance(a, CheckProposal) for a in actions)


@pytest.mark.parametrize("case", ["forged signature", "a non-member", "another swarm"])
def test_evidence_that_proves_nothing_is_refused(case: str) -> None:
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy())
    offender = _bystander(members, chain, proposer)
    if case == "a non-member":
        offender = Signer.from_seed(b"stranger")
    proof = _equivocation(offender)
    if case == "forged signature":
        proof = dataclasses.replace(proof, second=dataclasses.replace(proof.second, signature=bytes(64)))
    kept = tuple(k for k in members.keys if k != offender.public_key)
    if case == "another swarm":
        with pytest.raises(ValueError, match="of this swarm"):
            other = EquivocationEvidence(
                offender.vote("other", 1, 0, PREVOTE, bytes(32)), offender.vote("other", 1, 0, PREVOTE, bytes([1]) * 32)
            )
            _proposal(proposer, cert, _full_attendance(members, cert), kept, (other,))
        return
    prevote, actions = _prevote_of(
        chain, members, _proposal(proposer, cert, _full_attendance(members, cert), kept, (proof,))
    )
    assert prevote == NIL and not any(isinstance(a, CheckProposal) for a in actions)


def test_a_voter_holding_evidence_proposes_it_and_still_accepts_a_value_without_it() -> None:
    members, chain, proposer, cert = _voter_of_epoch_2(MembershipPolicy())
    offender = _bystander(members, chain, proposer)
    proof = _equivocation(offender, epoch=2)  # two conflicting prevotes of epoch 2, round 0, as they arrive
    chain.step(20.2, Received(members.name(offender.public_key), proof.first))
    chain.step(20.3, Received(members.name(offender.public_key), proof.second))
    assert [p.offender for p in chain.evidence()] == [offender.public_key]
    # the next member set it would propose leaves the offender out, because its value carries the proof
    assert offender.public_key not in chain.expected_next_members(chain.attendance(), chain.evidence())
    # a proposal that proves nothing keeps the offender, and this voter computes the same set from it
    actions = chain.step(
        20.5,
        Received(
            members.name(proposer.public_key), _proposal(proposer, cert, _full_attendance(members, cert), members.keys)
        ),
    )
    assert any(isinstance(a, CheckProposal) for a in actions), actions


def test_a_late_vote_is_attended_and_a_forged_late_vote_is_a_remote_error() -> None:
    members, chain, _, cert = _voter_of_epoch_2(MembershipPolicy())
    late = members.signers[3]
    assert late.public_key not in {a.voter for a in chain.attendance()}
    forged = dataclasses.replace(late.vote(SWARM, 1, 0, PREVOTE, cert.value.hash()), signature=bytes(64))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        chain.step(21.0, Received("p3", forged))
    chain.step(21.0, Received("p3", late.vote(SWARM, 1, 0, PREVOTE, cert.value.hash())))
    assert late.public_key in {a.voter for a in chain.attendance()}


def test_the_largest_value_and_proposal_fit_the_message_bound() -> None:
    keys = tuple(sorted(hashlib.sha256(bytes([i % 256, i // 256])).digest() for i in range(MAX_MEMBERS)))
    attendance = tuple(Attendance(k, 2**31 - 1, PREVOTE, bytes(64)) for k in keys)
    swarm = "s" * 63
    evidence = tuple(
        EquivocationEvidence(
            Vote(swarm, 2**62, 2**31 - 1, PREVOTE, bytes(32), k, bytes(64)),
            Vote(swarm, 2**62, 2**31 - 1, PREVOTE, bytes([1]) * 32, k, bytes(64)),
        )
        for k in keys[:MAX_EVIDENCE]
    )
    value = EpochValue(swarm, 2**62, 2**62, bytes(32), bytes(32), members_hash(keys), bytes(32), attendance, evidence)
    votes = tuple(Vote(swarm, 2**62, 2**31 - 2, PREVOTE, value.hash(), k, bytes(64)) for k in keys)
    proposal = Proposal(value, keys, 2**31 - 1, 2**31 - 2, keys[0], bytes(64), votes)
    cert = Certificate(value, keys, 2**31 - 1, tuple(Signed(k, bytes(64)) for k in keys))
    for msg in (proposal, cert):
        assert len(SCHEMA.encode(msg)) < MAX_MESSAGE_BYTES
    assert SCHEMA.decode(SCHEMA.encode(value)) == value


@pytest.mark.parametrize("case", ["epoch 1", "unsorted", "duplicate voter", "bad phase", "short signature"])
def test_a_malformed_attendance_is_a_decode_error(case: str) -> None:
    members = Members.make(4)
    good = tuple(Attendance(k, 0, PREVOTE, bytes(64)) for k in members.keys)
    value = EpochValue(SWARM, 2, 20, bytes(32), SPEC, members_hash(members.keys), bytes(32), good)
    bad: object = {
        "epoch 1": good,
        "unsorted": tuple(reversed(good)),
        "duplicate voter": (good[0], good[0]),
        "bad phase": (dataclasses.replace(good[0], phase=1), good[1]),
        "short signature": (good[0],),
    }[case]
    if case == "epoch 1":
        object.__setattr__(value, "epoch", 1)
    elif case == "bad phase":
        object.__setattr__(bad[0], "phase", 7)  # type: ignore[index]
    elif case == "short signature":
        object.__setattr__(bad[0], "signature", bytes(63))  # type: ignore[index]
    object.__setattr__(value, "attendance", bad)  # bypass the constructor's checks to make the bytes
    with pytest.raises(DecodeError):
        SCHEMA.decode(SCHEMA.encode(value))


@pytest.mark.parametrize("case", ["too many", "unsorted", "duplicate offender", "a later epoch"])
def test_malformed_evidence_in_a_value_is_refused(case: str) -> None:
    members = Members.make(4)
    proofs = sorted((_equivocation(s, epoch=2) for s in members.signers), key=lambda p: p.offender)
    bad = {
        "too many": tuple(proofs) * (MAX_EVIDENCE // 4 + 1),
        "unsorted": tuple(reversed(proofs)),
        "duplicate offender": (proofs[0], proofs[0]),
        "a later epoch": (_equivocation(members.signers[0], epoch=3),),
    }[case]
    with pytest.raises(ValueError, match="evidence"):
        EpochValue(SWARM, 2, 20, bytes(32), SPEC, members_hash(members.keys), bytes(32), (), bad)
