"""Joiners become voters through the values that admit them: a non-member asks the members (`JoinRequest`, signed,
naming its chain), the next value carries the requests its proposer holds, and the next member set adds exactly
those joiners (all of them in a private swarm, `max_new_voters` an epoch in a public one), so every voter computes
the same set from the value alone. An admitted joiner votes, attends and stays; a value that admits a forged,
foreign or missing request, or leaves out one it carries, is refused before any sampling."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from consensus.agreement import AgreementConfig, CheckProposal, proposer_of
from consensus.epochs import Checkpoint, EpochChain
from consensus.membership import MembershipPolicy, max_new_voters
from consensus.messages import (
    JOIN_REQUEST_MAX_AGE_EPOCHS,
    MAX_JOINERS,
    NIL,
    PREVOTE,
    EpochValue,
    JoinRequest,
    Proposal,
    Vote,
    members_hash,
)
from consensus.provenance import ChainGenesis
from consensus.signing import Signer, proposal_bytes
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import PeerUp, Received, Send, SetTimer
from tests.consensus_helpers import SPEC, SWARM, Members, Network, certificate


def test_a_joiner_is_admitted_at_the_next_value_then_votes_and_stays() -> None:
    members = Members.make(4)
    joiner = Signer.from_seed(b"joiner")
    net = Network(members, {}, MembershipPolicy(drop_after_missed=2), joiners=(joiner,))
    net.run(epochs=5)
    for name in net.names:
        # it asked at once (PeerUp), so epoch 1's value admits it: 5 voters from epoch 2 on
        assert net.member_counts(name) == [4, 5, 5, 5, 5], name
    chain = [c.certificate for c in net.certified["p0"]]
    assert chain[0].value.joiner_keys == (joiner.public_key,) and joiner.public_key in chain[0].next_members
    assert all(not c.value.joiners for c in chain[1:])  # a member asks no more
    assert [c.certificate.value.hash() for c in net.certified["j0"]] == [c.value.hash() for c in chain]
    # it votes: every value from epoch 3 on attests it took part in the epoch before (k = 2 would drop it otherwise)
    assert all(joiner.public_key in c.value.attendees for c in chain[2:])


@pytest.mark.parametrize("who", ["the joiner", "a founder"])
def test_a_joiner_starts_its_first_epoch_at_once_and_a_member_waits_for_late_votes(who: str) -> None:
    # epochs back to back (epoch 2's checkpoint known before epoch 1 is certified), and epoch 1's certificate lacks
    # a founder's precommit. A founder waits up to vote_timeout_s for that founder's late vote of epoch 1, which
    # members send each other. The joiner is sent no votes of epoch 1: it waited the whole vote_timeout_s, while the
    # founders started on the late vote, decided epoch 2 among themselves (4 of its 5 voters suffice) and sent it the
    # certificate before it had voted, so epoch 3's attendance could not name it (seen in a loaded process run)
    members = Members.make(4)
    genesis = ChainGenesis(SWARM, members.keys)
    nxt = tuple(sorted((*members.keys, JOINER.public_key)))
    cert = certificate(1, genesis.parent_hash, members, signers=members.signers[:3], next_members=nxt)
    signer = JOINER if who == "the joiner" else members.signers[3]
    names = members.peer_of | {JOINER.public_key: "j0"}
    chain = EpochChain(AgreementConfig(), signer, genesis, [], names.__getitem__)
    chain.step(0.5, Checkpoint(2, 20, hashlib.sha256(b"mine").digest(), SPEC))
    actions = chain.step(1.0, Received("p0", cert))
    assert [c.epoch for c in chain.chain] == [1] and len(chain.attendance()) == 3
    waits = [a for a in actions if isinstance(a, SetTimer) and a.key == ("attendance", 2)]
    if who == "the joiner":
        assert chain.agreement is not None and chain.agreement.epoch == 2 and not waits, actions
    else:
        assert chain.agreement is None and [w.deadline for w in waits] == [1.0 + AgreementConfig().vote_timeout_s]


def test_a_public_swarm_admits_at_most_max_new_voters_an_epoch() -> None:
    members = Members.make(4)
    joiners = tuple(Signer.from_seed(f"joiner{i}".encode()) for i in range(3))
    net = Network(members, {}, MembershipPolicy(public=True), joiners=joiners)
    net.run(epochs=5)
    assert max_new_voters(4) == 1
    for name in net.names[:4]:
        assert net.member_counts(name) == [4, 5, 6, 7, 7], name
    last = net.certified["p0"][-1].certificate
    assert set(last.next_members) == set(members.keys) | {j.public_key for j in joiners}


# ---- a voter's check of the join requests a value carries -----------------------------------------------------------


JOINER = Signer.from_seed(b"joiner")


def _voter_of_epoch_1() -> tuple[Members, EpochChain, Signer, ChainGenesis]:
    members = Members.make(4)
    genesis = ChainGenesis(SWARM, members.keys)
    proposer = members.by_key(proposer_of(members.keys, genesis.parent_hash, 0))
    voter = next(s for s in members.signers if s is not proposer)
    names = members.peer_of | {JOINER.public_key: "j0"}
    chain = EpochChain(AgreementConfig(), voter, genesis, [], names.__getitem__)
    chain.step(10.0, Checkpoint(1, 10, hashlib.sha256(b"mine").digest(), SPEC))
    return members, chain, proposer, genesis


def _proposal(proposer: Signer, parent: bytes, nxt: tuple[bytes, ...], joiners: tuple[JoinRequest, ...]) -> Proposal:
    root = hashlib.sha256(b"theirs").digest()
    value = EpochValue(SWARM, 1, 10, root, SPEC, members_hash(nxt), parent, (), (), joiners)
    unsigned = Proposal(value, nxt, 0, -1, proposer.public_key, bytes(64), ())
    return dataclasses.replace(unsigned, signature=proposer.sign(proposal_bytes(unsigned)))


CASES = ["honest", "forged signature", "another chain", "a member's request", "left out", "admitted unasked"]


@pytest.mark.parametrize("case", CASES)
def test_a_value_admits_exactly_the_joiners_whose_requests_it_carries(case: str) -> None:
    members, chain, proposer, genesis = _voter_of_epoch_1()
    request = JOINER.join_request(SWARM, 1, genesis.parent_hash)
    nxt = tuple(sorted((*members.keys, JOINER.public_key)))
    requests: tuple[JoinRequest, ...] = (request,)
    if case == "forged signature":
        requests = (dataclasses.replace(request, signature=bytes(64)),)
    elif case == "another chain":
        requests = (JOINER.join_request(SWARM, 1, hashlib.sha256(b"another genesis").digest()),)
    elif case == "a member's request":
        requests = (members.signers[0].join_request(SWARM, 1, genesis.parent_hash),)
        nxt = members.keys
    elif case == "left out":
        nxt = members.keys
    elif case == "admitted unasked":
        requests = ()
    actions = chain.step(
        10.5, Received(members.name(proposer.public_key), _proposal(proposer, genesis.parent_hash, nxt, requests))
    )
    checked = any(isinstance(a, CheckProposal) for a in actions)
    prevotes = [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, Vote) and a.msg.phase == PREVOTE]
    if case == "honest":
        assert checked, actions  # nothing plainly wrong: the host samples it
    else:
        assert not checked and prevotes and prevotes[0].value_hash == NIL, actions


def test_a_join_request_is_held_only_from_its_joiner_and_signed() -> None:
    _, chain, _, genesis = _voter_of_epoch_1()
    request = JOINER.join_request(SWARM, 1, genesis.parent_hash)
    with pytest.raises(RemoteProtocolError, match="another peer's key"):
        chain.step(10.1, Received("p1", request))
    with pytest.raises(RemoteProtocolError, match="bad signature"):
        chain.step(10.1, Received("j0", dataclasses.replace(request, signature=bytes(64))))
    with pytest.raises(RemoteProtocolError, match="another chain"):
        chain.step(10.1, Received("j0", JOINER.join_request(SWARM, 1, hashlib.sha256(b"x").digest())))
    chain.step(10.1, Received("j0", request))
    assert chain.joiners() == ()  # held, but the joiner is not live here
    chain.step(10.2, PeerUp("j0"))
    assert chain.joiners() == (request,)


@pytest.mark.parametrize("case", ["too many", "unsorted", "duplicate joiner", "too old", "from the future"])
def test_malformed_join_requests_in_a_value_are_refused(case: str) -> None:
    signers = sorted((Signer.from_seed(f"j{i}".encode()) for i in range(MAX_JOINERS + 1)), key=lambda s: s.public_key)
    requests = [s.join_request(SWARM, 3, bytes(32)) for s in signers]
    bad = {
        "too many": tuple(requests),
        "unsorted": (requests[1], requests[0]),
        "duplicate joiner": (requests[0], requests[0]),
        "too old": (signers[0].join_request(SWARM, 3 - JOIN_REQUEST_MAX_AGE_EPOCHS - 1, bytes(32)),),
        "from the future": (signers[0].join_request(SWARM, 4, bytes(32)),),
    }[case]
    with pytest.raises(ValueError, match="join request"):
        EpochValue(SWARM, 3, 30, bytes(32), SPEC, members_hash((bytes(32),)), bytes(32), (), (), bad)
