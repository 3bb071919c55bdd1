"""Equivocation evidence in `EpochChain`: a chain shares what it finds with the epoch's members and holds what it
receives for the values it proposes; a proposal that drops an equivocator must carry the proof, even to a voter that
holds one (every voter computes the set from the value alone), one that keeps an equivocator this voter caught is
still checked, and bad evidence is a remote error. (With evidence held locally instead, seeds 0, 4, 12, 33 and 291
of `testing.consensus_faults` stalled.)"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from consensus.agreement import AgreementConfig, CheckProposal, EquivocationFound, proposer_of
from consensus.epochs import Checkpoint, EpochChain
from consensus.messages import (
    PREVOTE,
    Attendance,
    Certificate,
    EpochValue,
    EquivocationEvidence,
    Proposal,
    Vote,
    members_hash,
)
from consensus.provenance import ChainGenesis
from consensus.signing import Signer, proposal_bytes
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import Action, Notify, PeerUp, Received, Send, SetTimer
from tests.consensus_helpers import SPEC, SWARM, Members, certificate


def _setup() -> tuple[Members, EpochChain, Signer, Signer, Certificate]:
    """A voter's chain holding epoch 1 (signed by every member), epoch 2's agreement started; the proposer of
    epoch 2's round 0 and a third member, the equivocator."""
    members = Members.make(4)
    genesis = ChainGenesis(SWARM, members.keys)
    cert = certificate(1, genesis.parent_hash, members, signers=members.signers)
    proposer = members.by_key(proposer_of(members.keys, cert.value.hash(), 0))
    voter, cheat = [s for s in members.signers if s is not proposer][:2]
    chain = EpochChain(AgreementConfig(), voter, genesis, [cert], members.name)
    for signer in members.signers:
        if signer is not voter:
            chain.step(20.0, PeerUp(members.name(signer.public_key)))
    chain.step(20.0, Checkpoint(2, 20, hashlib.sha256(b"mine").digest(), SPEC))
    return members, chain, proposer, cheat, cert


def _proposal(members: Members, proposer: Signer, cert: Certificate, nxt: tuple[bytes, ...]) -> Proposal:
    votes = (s.vote(SWARM, 1, 0, PREVOTE, cert.value.hash()) for s in members.signers)
    attendance = tuple(sorted((Attendance(v.voter, 0, PREVOTE, v.signature) for v in votes), key=lambda a: a.voter))
    root = hashlib.sha256(b"theirs").digest()
    value = EpochValue(SWARM, 2, 20, root, SPEC, members_hash(nxt), cert.value.hash(), attendance)
    unsigned = Proposal(value, nxt, 0, -1, proposer.public_key, bytes(64), ())
    return dataclasses.replace(unsigned, signature=proposer.sign(proposal_bytes(unsigned)))


def _evidence(cheat: Signer, epoch: int = 2) -> EquivocationEvidence:
    a, b = (cheat.vote(SWARM, epoch, 0, PREVOTE, hashlib.sha256(tag).digest()) for tag in (b"a", b"b"))
    return EquivocationEvidence(a, b)


def _checks(actions: list[Action]) -> list[CheckProposal]:
    return [a for a in actions if isinstance(a, CheckProposal)]


def test_received_evidence_is_held_for_this_peers_values_and_a_drop_must_carry_its_proof() -> None:
    members, chain, proposer, cheat, cert = _setup()
    actions = chain.step(20.4, Received("p9", _evidence(cheat)))
    assert any(isinstance(a, Notify) and isinstance(a.event, EquivocationFound) for a in actions)
    assert [p.offender for p in chain.evidence()] == [cheat.public_key]
    kept = tuple(k for k in members.keys if k != cheat.public_key)
    refused = chain.step(20.5, Received(members.name(proposer.public_key), _proposal(members, proposer, cert, kept)))
    prevotes = [a.msg for a in refused if isinstance(a, Send) and isinstance(a.msg, Vote) and a.msg.phase == PREVOTE]
    assert not _checks(refused) and prevotes and prevotes[0].value_hash == b""  # nil: the value proves no drop


def test_a_proposal_keeping_an_equivocator_this_voter_caught_is_still_checked() -> None:
    members, chain, proposer, cheat, cert = _setup()
    chain.step(20.4, Received("p9", _evidence(cheat)))
    actions = chain.step(
        20.5, Received(members.name(proposer.public_key), _proposal(members, proposer, cert, members.keys))
    )
    assert len(_checks(actions)) == 1


def test_a_chain_that_catches_an_equivocator_tells_the_epochs_other_members() -> None:
    members, chain, _, cheat, _ = _setup()
    evidence = _evidence(cheat)
    sender = members.name(cheat.public_key)
    chain.step(20.5, Received(sender, evidence.first))
    actions = chain.step(20.6, Received(sender, evidence.second))
    told = sorted(a.peer for a in actions if isinstance(a, Send) and isinstance(a.msg, EquivocationEvidence))
    me = chain.signer.public_key
    assert told == sorted(members.name(k) for k in members.keys if k != me)
    assert not [a for a in chain.step(20.7, Received("p9", evidence)) if isinstance(a, Send)]  # known: not again


@pytest.mark.parametrize("case", ["forged signature", "non-member", "another swarm"])
def test_bad_evidence_is_a_remote_error(case: str) -> None:
    _, chain, _, cheat, _ = _setup()
    evidence = _evidence(Signer.from_seed(b"stranger") if case == "non-member" else cheat)
    if case == "forged signature":
        evidence = EquivocationEvidence(evidence.first, dataclasses.replace(evidence.second, signature=bytes(64)))
    elif case == "another swarm":
        evidence = EquivocationEvidence(
            dataclasses.replace(evidence.first, swarm_id="other"),
            dataclasses.replace(evidence.second, swarm_id="other"),
        )
    with pytest.raises(RemoteProtocolError):
        chain.step(20.5, Received("p9", evidence))


def test_a_bad_buffered_message_is_dropped_when_its_epoch_starts_not_the_start_itself() -> None:
    # a vote of epoch 2 arriving while epoch 2 waits for this peer's checkpoint is buffered; when the checkpoint
    # starts the epoch, the replay finds its signature forged: it is dropped and counted, and the step still returns
    # the agreement's start (its timers), which a remote error would have thrown away
    members = Members.make(4)
    genesis = ChainGenesis(SWARM, members.keys)
    first = certificate(1, genesis.parent_hash, members, signers=members.signers)
    chain = EpochChain(AgreementConfig(), members.signers[0], genesis, [first], members.name)
    vote = members.signers[1].vote(SWARM, 2, 0, PREVOTE, hashlib.sha256(b"x").digest())
    assert chain.step(20.0, Received("p1", dataclasses.replace(vote, signature=bytes(64)))) == []
    actions = chain.step(20.1, Checkpoint(2, 20, hashlib.sha256(b"mine").digest(), SPEC))
    assert chain.agreement is not None and chain.agreement.epoch == 2 and chain.dropped == 1
    assert any(isinstance(a, SetTimer) for a in actions)
