"""`EpochAgreement` as a machine: feed events, assert the exact actions. No I/O, no clock, no trio."""

from __future__ import annotations

import dataclasses

import pytest

from consensus.agreement import (
    STATE_SCHEMA,
    AgreementConfig,
    Candidate,
    CheckProposal,
    Decided,
    EpochAgreement,
    EquivocationFound,
    Persist,
    ProposalChecked,
    StartEpoch,
    proposer_of,
)
from consensus.certificate import verify_certificate, verify_evidence
from consensus.membership import genesis_parent_hash
from consensus.messages import NIL, PRECOMMIT, PREVOTE, Certificate, Proposal, Signed, Vote
from consensus.signing import Signer, proposal_bytes
from swarmgrad.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import Action, Notify, Received, Send, SetTimer, TimerFired
from tests.consensus_helpers import SWARM, Members, value

CONFIG = AgreementConfig()


class Setup:
    """Four members; `me` is a member that does not propose in rounds 0 and 1."""

    def __init__(self, config: AgreementConfig = CONFIG) -> None:
        self.m = Members.make(4)
        self.parent = genesis_parent_hash(SWARM, self.m.keys)
        self.proposers = [proposer_of(self.m.keys, self.parent, r) for r in range(4)]
        self.me = next(s for s in self.m.signers if s.public_key not in self.proposers[:2])
        self.others = [s for s in self.m.signers if s is not self.me]
        self.config = config
        self.machine = self.make(self.me)

    def make(self, signer: Signer, state: object = None) -> EpochAgreement:
        own = Candidate(value(1, self.parent, self.m.keys, label=signer.public_key.hex()), self.m.keys)
        return EpochAgreement(self.config, signer, self.m.keys, self.m.peer_of, own, state=state)  # type: ignore[arg-type]

    def proposal(
        self, r: int, label: str = "x", valid_round: int = -1, justification: tuple[Vote, ...] = ()
    ) -> Proposal:
        signer = self.m.by_key(self.proposers[r])
        v = value(1, self.parent, self.m.keys, label=label)
        unsigned = Proposal(v, self.m.keys, r, valid_round, signer.public_key, bytes(64), justification)
        return dataclasses.replace(unsigned, signature=signer.sign(proposal_bytes(unsigned)))

    def vote(self, signer: Signer, r: int, phase: int, value_hash: bytes) -> Vote:
        return signer.vote(SWARM, 1, r, phase, value_hash)

    def recv(self, msg: object, now: float = 0.1) -> list[Action]:
        return self.machine.step(now, Received("px", msg))


def votes_sent(actions: list[Action], phase: int) -> set[bytes]:
    return {
        a.msg.value_hash for a in actions if isinstance(a, Send) and isinstance(a.msg, Vote) and a.msg.phase == phase
    }


def accept(setup: Setup, p: Proposal, now: float = 0.2, ok: bool = True) -> list[Action]:
    actions = setup.recv(p)
    checks = [a for a in actions if isinstance(a, CheckProposal)]
    assert len(checks) == 1 and checks[0].proposal == p
    assert not votes_sent(actions, PREVOTE)  # no prevote before the check answered
    return setup.machine.step(now, ProposalChecked(1, p.value.hash(), ok, "" if ok else "out of tolerance"))


def test_proposer_persists_then_broadcasts_its_value() -> None:
    s = Setup()
    proposer = s.make(s.m.by_key(s.proposers[0]))
    actions = proposer.step(0.0, StartEpoch())
    assert isinstance(actions[0], Persist) and actions[0].state.proposed is not None
    proposals = [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, Proposal)]
    assert len(proposals) == 3 and all(p.valid_round == -1 and p.value == proposer.own.value for p in proposals)
    # its own checkpoint needs no check: it prevotes it at once, persisted before anything is sent
    assert votes_sent(actions, PREVOTE) == {proposer.own.value.hash()}
    assert [type(a) for a in actions].count(Persist) == 1 and actions[0].state.prevote == proposer.own.value.hash()


def test_voter_checks_then_prevotes_valid_proposal() -> None:
    s = Setup()
    start = s.machine.step(0.0, StartEpoch())
    assert SetTimer(("propose", 0), CONFIG.propose_timeout_s) in start
    p = s.proposal(0)
    actions = accept(s, p)
    assert isinstance(actions[0], Persist) and actions[0].state.prevote == p.value.hash()
    assert votes_sent(actions, PREVOTE) == {p.value.hash()}
    assert len([a for a in actions if isinstance(a, Send)]) == 3


def test_invalid_proposal_gets_nil_prevote() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    actions = accept(s, s.proposal(0), ok=False)
    assert votes_sent(actions, PREVOTE) == {NIL}


def test_propose_timeout_prevotes_nil_and_timeouts_grow() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    actions = s.machine.step(1.0, TimerFired(("propose", 0)))
    assert votes_sent(actions, PREVOTE) == {NIL}
    # 2f+1 nil prevotes: precommit nil; 2f+1 precommits: the precommit timeout, then round 1 with longer timeouts
    actions = []
    for other in s.others[:2]:
        actions += s.recv(s.vote(other, 0, PREVOTE, NIL), now=1.1)
    assert votes_sent(actions, PRECOMMIT) == {NIL}
    actions = []
    for other in s.others[:2]:
        actions += s.recv(s.vote(other, 0, PRECOMMIT, NIL), now=1.2)
    assert SetTimer(("precommit", 0), 1.2 + CONFIG.vote_timeout_s) in actions
    actions = s.machine.step(1.7, TimerFired(("precommit", 0)))
    assert s.machine.state.consensus_round == 1
    assert isinstance(actions[0], Persist) and actions[0].state.entry_votes
    assert SetTimer(("propose", 1), 1.7 + CONFIG.propose_timeout_s + CONFIG.timeout_increase_s) in actions


def test_prevote_timeout_after_split_prevotes() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    p = s.proposal(0)
    accept(s, p)
    actions = s.recv(s.vote(s.others[0], 0, PREVOTE, NIL)) + s.recv(s.vote(s.others[1], 0, PREVOTE, b"z" * 32))
    assert SetTimer(("prevote", 0), 0.1 + CONFIG.vote_timeout_s) in actions
    assert votes_sent(s.machine.step(0.6, TimerFired(("prevote", 0))), PRECOMMIT) == {NIL}
    assert s.machine.state.locked_round == -1


def test_polka_locks_and_precommits_then_quorum_decides() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    p = s.proposal(0)
    accept(s, p)
    h = p.value.hash()
    actions = s.recv(s.vote(s.others[0], 0, PREVOTE, h)) + s.recv(s.vote(s.others[1], 0, PREVOTE, h))
    assert votes_sent(actions, PRECOMMIT) == {h}
    persisted = [a.state for a in actions if isinstance(a, Persist)]
    assert persisted[-1].locked_round == 0 and persisted[-1].locked.value == p.value  # type: ignore[union-attr]
    # the Persist with the lock comes before the precommit goes out
    first_precommit = next(i for i, a in enumerate(actions) if isinstance(a, Send) and a.msg.phase == PRECOMMIT)  # type: ignore[attr-defined]
    assert any(isinstance(a, Persist) and a.state.precommit == h for a in actions[:first_precommit])
    actions = s.recv(s.vote(s.others[0], 0, PRECOMMIT, h)) + s.recv(s.vote(s.others[1], 0, PRECOMMIT, h))
    decided = [a.event for a in actions if isinstance(a, Notify) and isinstance(a.event, Decided)]
    assert len(decided) == 1
    cert = decided[0].certificate
    assert cert.value == p.value and len(cert.precommits) == 3
    verify_certificate(cert, s.m.keys, s.parent)
    # a decided member answers later messages of its epoch with the certificate
    answer = s.recv(s.vote(s.others[2], 1, PREVOTE, NIL), now=5.0)
    assert answer == [Send("px", cert)]


def test_lock_refuses_other_value_unless_a_later_polka_is_shown() -> None:
    for bug, expect_w in ((None, False), ("ignore_lock", True)):
        s = Setup(AgreementConfig(planted_bug=bug))
        s.machine.step(0.0, StartEpoch())
        p0 = s.proposal(0, label="v")
        accept(s, p0)
        h = p0.value.hash()
        s.recv(s.vote(s.others[0], 0, PREVOTE, h))
        s.recv(s.vote(s.others[1], 0, PREVOTE, h))
        assert s.machine.state.locked_round == 0
        for other in s.others[:2]:
            s.recv(s.vote(other, 0, PRECOMMIT, NIL), now=0.3)
        s.machine.step(1.0, TimerFired(("precommit", 0)))
        p1 = s.proposal(1, label="w")
        actions = accept(s, p1, now=1.1)
        assert votes_sent(actions, PREVOTE) == ({p1.value.hash()} if expect_w else {NIL})
    # a proposal of w that shows 2f+1 prevotes for w in round 1 >= the lock round 0 unlocks it (round 2)
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    accept(s, s.proposal(0, label="v"))
    h = s.proposal(0, label="v").value.hash()
    s.recv(s.vote(s.others[0], 0, PREVOTE, h))
    s.recv(s.vote(s.others[1], 0, PREVOTE, h))
    w = s.proposal(1, label="w").value.hash()
    justification = tuple(s.vote(o, 1, PREVOTE, w) for o in s.others)
    p2 = s.proposal(2, label="w", valid_round=1, justification=justification)
    for other in s.others[:2]:  # f+1 members in round 2: jump there
        s.recv(s.vote(other, 2, PREVOTE, NIL), now=0.5)
    assert s.machine.state.consensus_round == 2
    actions = accept(s, p2, now=0.6)
    assert votes_sent(actions, PREVOTE) == {w}


def test_round_skip_on_f_plus_one_higher_round_messages() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    s.recv(s.vote(s.others[0], 3, PREVOTE, NIL))
    assert s.machine.state.consensus_round == 0
    actions = s.recv(s.vote(s.others[1], 3, PRECOMMIT, NIL))
    assert s.machine.state.consensus_round == 3
    assert (
        any(isinstance(a, SetTimer) and a.key == ("propose", 3) for a in actions) or s.proposers[3] == s.me.public_key
    )
    # a member still in round 0 is shown the votes that moved this one on
    helped = s.recv(s.vote(s.others[2], 0, PREVOTE, NIL), now=0.2)
    assert {a.msg for a in helped if isinstance(a, Send)} == set(s.machine.state.entry_votes)


def test_equivocation_is_reported_once_with_verifiable_evidence() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    bad = s.others[0]
    s.recv(s.vote(bad, 0, PREVOTE, b"a" * 32))
    actions = s.recv(s.vote(bad, 0, PREVOTE, b"b" * 32))
    found = [a.event for a in actions if isinstance(a, Notify) and isinstance(a.event, EquivocationFound)]
    assert len(found) == 1
    assert verify_evidence(found[0].evidence, s.m.keys) == bad.public_key
    assert not s.recv(s.vote(bad, 0, PREVOTE, NIL))  # reported once


def test_bad_messages_raise_and_leave_state_unchanged() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    outsider = Signer.from_seed(b"outsider")
    before = s.machine.state
    p = s.proposal(0)
    wrong_proposer = dataclasses.replace(p, proposer=s.proposers[1])
    forged = dataclasses.replace(s.vote(s.others[0], 0, PREVOTE, NIL), signature=bytes(64))
    bad_justification = s.proposal(1, valid_round=0, justification=(s.vote(s.others[0], 0, PREVOTE, NIL),))
    for msg in (
        outsider.vote(SWARM, 1, 0, PREVOTE, NIL),
        forged,
        wrong_proposer,
        dataclasses.replace(p, signature=bytes(64)),
        bad_justification,
        s.others[0].vote(SWARM, 2, 0, PREVOTE, NIL),
        "not a message",
    ):
        with pytest.raises(RemoteProtocolError):
            s.recv(msg)
    assert s.machine.state == before
    with pytest.raises(LocalProtocolError):
        s.machine.step(0.0, StartEpoch())


def test_restart_from_persisted_state_never_signs_a_conflicting_vote() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    p = s.proposal(0)
    actions = accept(s, p)
    state = [a.state for a in actions if isinstance(a, Persist)][-1]
    state = STATE_SCHEMA.decode(STATE_SCHEMA.encode(state))  # as the driver writes and reads it
    sent = next(a.msg for a in actions if isinstance(a, Send))
    restarted = s.make(s.me, state=state)
    actions = restarted.step(5.0, StartEpoch())
    resent = [a.msg for a in actions if isinstance(a, Send) and isinstance(a.msg, Vote)]
    assert resent and all(v == sent for v in resent)  # the very same signed prevote
    assert not any(isinstance(a, SetTimer) and a.key[0] == "propose" for a in actions)
    # neither a late timeout nor a different answer makes it prevote again in round 0
    assert not votes_sent(restarted.step(6.0, TimerFired(("propose", 0))), PREVOTE)
    assert not votes_sent(restarted.step(6.0, ProposalChecked(1, p.value.hash(), False)), PREVOTE)
    with pytest.raises(LocalProtocolError):
        s.make(s.me, state=dataclasses.replace(state, epoch=2))


def test_certificate_from_a_peer_decides() -> None:
    s = Setup()
    s.machine.step(0.0, StartEpoch())
    p = s.proposal(0)
    h = p.value.hash()
    signed = sorted(
        (Signed(o.public_key, s.vote(o, 0, PRECOMMIT, h).signature) for o in s.others), key=lambda x: x.member
    )
    cert = Certificate(p.value, p.next_members, 0, tuple(signed))
    actions = s.recv(cert)
    assert [a.event for a in actions if isinstance(a, Notify)] == [Decided(cert)]
    weak = dataclasses.replace(cert, precommits=cert.precommits[:2])
    fresh = Setup()
    fresh.machine.step(0.0, StartEpoch())
    with pytest.raises(RemoteProtocolError, match="below quorum"):
        fresh.recv(weak)


def test_four_honest_members_decide_in_three_message_delays() -> None:
    s = Setup()
    machines = {s.m.name(sig.public_key): s.make(sig) for sig in s.m.signers}
    queue: list[tuple[float, str, str, object]] = []
    decided: dict[str, Certificate] = {}
    latency = 0.05

    def run(name: str, now: float, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                queue.append((now + latency, name, a.peer, a.msg))
            elif isinstance(a, CheckProposal):
                queue.append((now, "host", name, ProposalChecked(1, a.proposal.value.hash(), True)))
            elif isinstance(a, Notify) and isinstance(a.event, Decided):
                decided[name] = a.event.certificate

    for name, machine in sorted(machines.items()):
        run(name, 0.0, machine.step(0.0, StartEpoch()))
    for _ in range(10_000):
        if not queue:
            break
        queue.sort(key=lambda item: item[0])
        when, sender, receiver, msg = queue.pop(0)
        event = msg if isinstance(msg, ProposalChecked) else Received(sender, msg)
        run(receiver, when, machines[receiver].step(when, event))  # type: ignore[arg-type]
    assert len(decided) == 4
    assert len({c.value.hash() for c in decided.values()}) == 1
    assert all(c.consensus_round == 0 for c in decided.values())
    assert max(m._now for m in machines.values()) >= 3 * latency - 1e-9


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="planted_bug"):
        AgreementConfig(planted_bug="nope")
    with pytest.raises(ConfigError, match="propose_timeout_s"):
        AgreementConfig(propose_timeout_s=0)
