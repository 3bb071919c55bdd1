"""Shared fixtures of the consensus tests: deterministic members, values and hand-signed certificates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from consensus.membership import genesis_parent_hash
from consensus.messages import PRECOMMIT, Certificate, EpochValue, Signed, members_hash
from consensus.signing import Signer

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


def value(epoch: int, parent: bytes, members: tuple[bytes, ...], label: str = "v") -> EpochValue:
    root = hashlib.sha256(f"{label}/{epoch}".encode()).digest()
    return EpochValue(SWARM, epoch, epoch * 10, root, SPEC, members_hash(members), parent)


def certificate(
    epoch: int,
    parent: bytes,
    members: Members,
    signers: list[Signer] | None = None,
    consensus_round: int = 0,
    next_members: tuple[bytes, ...] | None = None,
) -> Certificate:
    nxt = next_members if next_members is not None else members.keys
    v = value(epoch, parent, nxt)
    chosen = signers if signers is not None else members.signers[: 2 * ((len(members.keys) - 1) // 3) + 1]
    votes = [s.vote(SWARM, epoch, consensus_round, PRECOMMIT, v.hash()) for s in chosen]
    precommits = tuple(sorted((Signed(vote.voter, vote.signature) for vote in votes), key=lambda x: x.member))
    return Certificate(v, nxt, consensus_round, precommits)


def chain(members: Members, epochs: int) -> list[Certificate]:
    parent = genesis_parent_hash(SWARM, members.keys)
    certs = []
    for epoch in range(1, epochs + 1):
        cert = certificate(epoch, parent, members)
        certs.append(cert)
        parent = cert.value.hash()
    return certs
