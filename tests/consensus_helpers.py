"""Shared fixtures of the consensus tests: deterministic members, values and hand-signed certificates, and a small
virtual-time network of `EpochChain` machines."""

from __future__ import annotations

import hashlib
import heapq
import itertools
from dataclasses import dataclass

from consensus.agreement import AgreementConfig, CheckProposal, ProposalChecked
from consensus.epochs import Certified, Checkpoint, EpochChain
from consensus.membership import MembershipPolicy, genesis_parent_hash
from consensus.messages import PRECOMMIT, Attendance, Certificate, EpochValue, Signed, members_hash
from consensus.provenance import ChainGenesis
from consensus.signing import Signer
from swarmgrad.core.machine import Action, CancelTimer, Event, Notify, PeerUp, Received, Send, SetTimer, TimerFired

SWARM = "lab"
SPEC = hashlib.sha256(b"spec").digest()


@dataclass
class Members:
    signers: list[Signer]

    @classmethod
    def make(cls, n: int, tag: str = "m") -> Members:
        signers = sorted((Signer.from_seed(f"{tag}{i}".encode()) for i in range(n)), key=lambda s: s.public_key)
        return cls(signers)

    @property
    def keys(self) -> tuple[bytes, ...]:
        return tuple(s.public_key for s in self.signers)

    def by_key(self, key: bytes) -> Signer:
        return next(s for s in self.signers if s.public_key == key)

    @property
    def peer_of(self) -> dict[bytes, str]:
        return {s.public_key: f"p{i}" for i, s in enumerate(self.signers)}

    def name(self, key: bytes) -> str:
        return self.peer_of[key]


def value(
    epoch: int, parent: bytes, members: tuple[bytes, ...], label: str = "v", attendance: tuple[Attendance, ...] = ()
) -> EpochValue:
    root = hashlib.sha256(f"{label}/{epoch}".encode()).digest()
    return EpochValue(SWARM, epoch, epoch * 10, root, SPEC, members_hash(members), parent, attendance)


def attendance_of(parent: Certificate) -> tuple[Attendance, ...]:
    """The attendance of `parent`'s epoch that its precommits prove: what the next epoch's value carries."""
    return tuple(Attendance(s.member, parent.consensus_round, PRECOMMIT, s.signature) for s in parent.precommits)


def certificate(
    epoch: int,
    parent: bytes,
    members: Members,
    signers: list[Signer] | None = None,
    consensus_round: int = 0,
    next_members: tuple[bytes, ...] | None = None,
    attendance: tuple[Attendance, ...] = (),
) -> Certificate:
    """`members`' certificate of epoch `epoch`; `attendance` (e.g. `attendance_of` the parent certificate) is
    needed for `verify_chain` to accept an epoch above 1."""
    nxt = next_members if next_members is not None else members.keys
    v = value(epoch, parent, nxt, attendance=attendance)
    chosen = signers if signers is not None else members.signers[: 2 * ((len(members.keys) - 1) // 3) + 1]
    votes = [s.vote(SWARM, epoch, consensus_round, PRECOMMIT, v.hash()) for s in chosen]
    precommits = tuple(sorted((Signed(vote.voter, vote.signature) for vote in votes), key=lambda x: x.member))
    return Certificate(v, nxt, consensus_round, precommits)


def chain(members: Members, epochs: int) -> list[Certificate]:
    parent = genesis_parent_hash(SWARM, members.keys)
    certs: list[Certificate] = []
    for epoch in range(1, epochs + 1):
        cert = certificate(epoch, parent, members, attendance=attendance_of(certs[-1]) if certs else ())
        certs.append(cert)
        parent = cert.value.hash()
    return certs


EPOCH_S = 10.0
"""Virtual seconds between two epoch boundaries: late votes of an epoch arrive long before the next one starts."""


class Network:
    """The founders' chains, and those of `joiners` (named j0, j1, ...), in virtual time: each message takes
    `delay_s[sender]` (negative: never arrives; 0.01 s for a peer it does not name); proposals are checked at once."""

    def __init__(
        self,
        members: Members,
        delay_s: dict[str, float],
        policy: MembershipPolicy,
        joiners: tuple[Signer, ...] = (),
    ) -> None:
        self.members = members
        self.genesis = ChainGenesis(SWARM, members.keys)
        self.name_of = members.peer_of | {s.public_key: f"j{i}" for i, s in enumerate(joiners)}
        self.names = [self.name_of[s.public_key] for s in (*members.signers, *joiners)]
        self.delay_s = {name: 0.01 for name in self.names} | delay_s
        self.chains = {
            self.name_of[s.public_key]: EpochChain(
                AgreementConfig(), s, self.genesis, [], self.name_of.__getitem__, policy=policy
            )
            for s in (*members.signers, *joiners)
        }
        self.queue: list[tuple[float, int, str, Event]] = []
        self.seq = itertools.count()
        self.timers: dict[tuple[str, object], float] = {}
        self.certified: dict[str, list[Certified]] = {name: [] for name in self.names}
        self.tamper: dict[str, object] = {}

    def at(self, when: float, node: str, event: Event) -> None:
        heapq.heappush(self.queue, (when, next(self.seq), node, event))

    def run(self, epochs: int, epoch_s: float = EPOCH_S) -> None:
        for name in self.names:
            for other in self.names:
                if other != name:
                    self.at(0.0, name, PeerUp(other))
            for epoch in range(1, epochs + 1):
                root = hashlib.sha256(f"root/{epoch}".encode()).digest()  # the same checkpoint everywhere
                self.at(epoch * epoch_s, name, Checkpoint(epoch, 10 * epoch, root, SPEC))
        while self.queue:
            now, _, node, event = heapq.heappop(self.queue)
            if now > (epochs + 1) * EPOCH_S:  # a ceiling; every test here ends long before
                break
            if isinstance(event, TimerFired) and self.timers.get((node, event.key)) != now:
                continue  # cancelled or replaced
            self.carry_out(now, node, self.chains[node].step(now, event))

    def carry_out(self, now: float, node: str, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                if self.delay_s[node] >= 0:
                    self.at(now + self.delay_s[node], action.peer, Received(node, action.msg))
            elif isinstance(action, SetTimer):
                self.timers[(node, action.key)] = action.deadline
                self.at(action.deadline, node, TimerFired(action.key))
            elif isinstance(action, CancelTimer):
                self.timers.pop((node, action.key), None)
            elif isinstance(action, CheckProposal):
                value = action.proposal.value
                self.at(now, node, ProposalChecked(value.epoch, value.hash(), True))
            elif isinstance(action, Notify) and isinstance(action.event, Certified):
                self.certified[node].append(action.event)

    def member_counts(self, node: str) -> list[int]:
        return [len(c.members) for c in self.certified[node]]
