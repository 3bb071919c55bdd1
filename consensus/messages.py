"""The epoch-consensus wire messages, their schema and their hashes. No I/O, no state, no signature checks.

What is agreed for epoch E is an `EpochValue`: the proposer's checkpoint at the epoch boundary (a Merkle root over
its canonical parameter bytes), the model's spec hash, the hash of the member set that votes in E+1, and the link to
E's parent. Members are named by their raw 32-byte Ed25519 public keys (the same key as the peer's libp2p
identity; the peer maps one to the other). A message names its signer itself, so the transport's sender never
decides who voted: a relayed vote is as good as a direct one.

`parent_certificate_hash` is the *value hash* of the parent epoch's certified value (`EpochValue.hash`), not a hash
of the certificate's bytes: two nodes may hold different 2f+1 subsets of the same precommits, and both must link
the next epoch to the same parent. A value of epoch E > 1 also carries the *attendance* of epoch E-1: one signed
vote for the parent value (a prevote or precommit of any round) from each member of E-1 the proposer can prove
took part, which is what the silence rule counts (`consensus.membership`). A value also carries the *evidence*
of equivocation its proposer holds against members of its epoch (at most `MAX_EVIDENCE`, one per offender): the
next member set leaves out exactly the offenders the value proves, so every voter computes the same set from the
value alone, whatever evidence it saw itself. Likewise the *join requests* it admits (`JoinRequest`, signed by each
joiner, at most `MAX_JOINERS`). Every field is bounded here (`__post_init__`), so a decoded message is at most a
few hundred bytes plus its member list (`MAX_MEMBERS`), its attendance (at most `MAX_MEMBERS` entries of about 110
bytes), its evidence (at most `MAX_EVIDENCE` pairs of votes), its join requests and its justification (at most
`MAX_MEMBERS` votes).

Protocol 2.0.0 added the attendance to `EpochValue`, 3.0.0 the evidence and the join requests; peers of another
major version cannot negotiate the protocol, and chain files and voter states they wrote do not decode.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from swarmgrad.core.codec import Schema
from swarmgrad.core.swarm_id import MAX_SWARM_ID_CHARS, SWARM_ID_RULE, is_valid_swarm_id

PROTOCOL = "/swarmgrad/consensus/3.0.0"
KEY_BYTES = 32
"""A member's raw Ed25519 public key."""
SIGNATURE_BYTES = 64
HASH_BYTES = 32
MAX_MEMBERS = 1024
"""The largest member set an epoch may have: bounds every decoded list (members, justifications, signatures)."""
MAX_EVIDENCE = 32
"""At most this many offenders' evidence in one value; more equivocators (beyond any f < n/3) go over several
epochs."""
MAX_JOINERS = 32
"""At most this many join requests in one value (a public swarm admits fewer: `membership.max_new_voters`)."""
JOIN_REQUEST_MAX_AGE_EPOCHS = 1
"""A value of epoch E carries join requests made for epoch E or E-1: a joiner asks again at every certificate, and a
request made just before the proposer built its value goes into the next one."""
MAX_EPOCH = 2**63 - 1
MAX_ROUND = 2**31 - 1
PREVOTE = 1
PRECOMMIT = 2
PHASES = (PREVOTE, PRECOMMIT)
NIL = b""
"""The value hash of a nil vote."""

_VALUE_DOMAIN = b"swarmgrad/consensus/value/v1\x00"
_MEMBERS_DOMAIN = b"swarmgrad/consensus/members/v1\x00"


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_BYTES:
        raise ValueError(f"{name} must be {HASH_BYTES} bytes, got {len(value)}")


def _check_key(name: str, value: bytes) -> None:
    if len(value) != KEY_BYTES:
        raise ValueError(f"{name} must be a {KEY_BYTES}-byte Ed25519 public key, got {len(value)} bytes")


def _check_signature(value: bytes) -> None:
    if len(value) != SIGNATURE_BYTES:
        raise ValueError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(value)}")


def _check_swarm(swarm_id: str) -> None:
    if not is_valid_swarm_id(swarm_id):
        raise ValueError(f"swarm_id must be {SWARM_ID_RULE}, got {swarm_id[: MAX_SWARM_ID_CHARS + 1]!r}")


def _check_epoch(epoch: int) -> None:
    if not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"epoch must be in [1, {MAX_EPOCH}], got {epoch}")


def _check_round(name: str, value: int, lowest: int = 0) -> None:
    if not lowest <= value <= MAX_ROUND:
        raise ValueError(f"{name} must be in [{lowest}, {MAX_ROUND}], got {value}")


def check_members(members: tuple[bytes, ...]) -> None:
    """Raise `ValueError` unless `members` is a non-empty, strictly increasing tuple of at most `MAX_MEMBERS` keys."""
    if not 1 <= len(members) <= MAX_MEMBERS:
        raise ValueError(f"a member set has 1 to {MAX_MEMBERS} keys, got {len(members)}")
    for key in members:
        _check_key("member", key)
    if any(a >= b for a, b in itertools.pairwise(members)):
        raise ValueError("members must be distinct and in increasing byte order")


def members_hash(members: tuple[bytes, ...]) -> bytes:
    """The hash that an `EpochValue` carries for a member set (sorted, distinct keys)."""
    return hashlib.sha256(_MEMBERS_DOMAIN + len(members).to_bytes(4, "little") + b"".join(members)).digest()


def quorum(num_members: int) -> int:
    """Votes a decision needs among `num_members` voters: n - f with f = (n - 1) // 3 the tolerated faults (2f + 1
    when n = 3f + 1).

    Any two quorums of that size share at least n - 2f >= f + 1 members, so at least one honest member. (2f + 1
    alone is not enough when n is not 3f + 1: with n = 3 it would be 1, and two single votes need not meet.)"""
    return num_members - max_faulty(num_members)


def max_faulty(num_members: int) -> int:
    """f: the Byzantine members an epoch of `num_members` voters tolerates (n >= 3f + 1)."""
    return (num_members - 1) // 3


@dataclass(frozen=True)
class Attendance:
    """`voter`'s signed vote for the parent epoch's certified value, carried by the next epoch's value: the vote of
    phase `phase` in `consensus_round` of epoch E-1 for the value hash E's `parent_certificate_hash` names (so the
    swarm id, epoch and value hash are not repeated; `consensus.signing.attendance_bytes` rebuilds what was
    signed)."""

    voter: bytes
    consensus_round: int
    phase: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_key("voter", self.voter)
        _check_round("consensus_round", self.consensus_round)
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES} (prevote, precommit), got {self.phase}")
        _check_signature(self.signature)


@dataclass(frozen=True)
class JoinRequest:
    """`joiner` asks to become a voter. It holds the chain up to epoch `epoch - 1` and names the parent link of
    `epoch` there (`parent`: the value hash of epoch `epoch - 1`, or the genesis anchor for epoch 1), so a voter on
    another chain refuses it; signed by the joiner's key (`signing.join_bytes`)."""

    swarm_id: str
    epoch: int
    parent: bytes
    joiner: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_swarm(self.swarm_id)
        _check_epoch(self.epoch)
        _check_hash("parent", self.parent)
        _check_key("joiner", self.joiner)
        _check_signature(self.signature)


@dataclass(frozen=True)
class EpochValue:
    """What an epoch decides. `round` is the training round of the checkpoint boundary (not a consensus round).
    `attendance`: who took part in the parent epoch (see the module docstring), sorted by voter, empty in epoch 1.
    `evidence`: proofs that members of this epoch equivocated, at most one per offender, sorted by offender.
    `joiners`: join requests of non-members to admit, at most one per joiner, sorted by joiner."""

    swarm_id: str
    epoch: int
    round: int
    checkpoint_root: bytes
    model_spec_hash: bytes
    next_members_hash: bytes
    parent_certificate_hash: bytes
    attendance: tuple[Attendance, ...] = ()
    evidence: tuple[EquivocationEvidence, ...] = ()
    joiners: tuple[JoinRequest, ...] = ()

    def __post_init__(self) -> None:
        _check_swarm(self.swarm_id)
        _check_epoch(self.epoch)
        if not 0 <= self.round <= MAX_EPOCH:
            raise ValueError(f"round must be in [0, {MAX_EPOCH}], got {self.round}")
        _check_hash("checkpoint_root", self.checkpoint_root)
        _check_hash("model_spec_hash", self.model_spec_hash)
        _check_hash("next_members_hash", self.next_members_hash)
        _check_hash("parent_certificate_hash", self.parent_certificate_hash)
        if self.epoch == 1 and self.attendance:
            raise ValueError("epoch 1 has no parent epoch, so no attendance")
        if len(self.attendance) > MAX_MEMBERS:
            raise ValueError(f"an attendance has at most {MAX_MEMBERS} entries, got {len(self.attendance)}")
        if any(a.voter >= b.voter for a, b in itertools.pairwise(self.attendance)):
            raise ValueError("attendance must name distinct voters, in increasing key order")
        if len(self.evidence) > MAX_EVIDENCE:
            raise ValueError(f"a value carries at most {MAX_EVIDENCE} pieces of evidence, got {len(self.evidence)}")
        if any(a.offender >= b.offender for a, b in itertools.pairwise(self.evidence)):
            raise ValueError("evidence must name distinct offenders, in increasing key order")
        for proof in self.evidence:
            if proof.first.swarm_id != self.swarm_id or proof.first.epoch > self.epoch:
                raise ValueError("evidence must be of this swarm and of this epoch or an earlier one")
        if len(self.joiners) > MAX_JOINERS:
            raise ValueError(f"a value carries at most {MAX_JOINERS} join requests, got {len(self.joiners)}")
        if any(a.joiner >= b.joiner for a, b in itertools.pairwise(self.joiners)):
            raise ValueError("join requests must name distinct joiners, in increasing key order")
        for request in self.joiners:
            if request.swarm_id != self.swarm_id:
                raise ValueError("a join request must be of this swarm")
            if not self.epoch - JOIN_REQUEST_MAX_AGE_EPOCHS <= request.epoch <= self.epoch:
                raise ValueError(
                    f"a join request in a value of epoch {self.epoch} must be for epoch {self.epoch} or"
                    f" {self.epoch - JOIN_REQUEST_MAX_AGE_EPOCHS}, got {request.epoch}"
                )

    @property
    def attendees(self) -> frozenset[bytes]:
        """The members this value proves took part in the parent epoch."""
        return frozenset(a.voter for a in self.attendance)

    @property
    def joiner_keys(self) -> tuple[bytes, ...]:
        """The keys this value asks to admit, sorted."""
        return tuple(request.joiner for request in self.joiners)

    @property
    def offenders(self) -> frozenset[bytes]:
        """The members this value proves equivocated."""
        return frozenset(proof.offender for proof in self.evidence)

    def hash(self) -> bytes:
        """The value hash that votes name and that the next epoch links to (computed once per object)."""
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hashlib.sha256(_VALUE_DOMAIN + SCHEMA.encode(self)).digest()
            object.__setattr__(self, "_hash", cached)
        return cached


@dataclass(frozen=True)
class Vote:
    """A prevote or precommit of `voter` for `value_hash` (`NIL`: for no value) in one consensus round."""

    swarm_id: str
    epoch: int
    consensus_round: int
    phase: int
    value_hash: bytes
    voter: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_swarm(self.swarm_id)
        _check_epoch(self.epoch)
        _check_round("consensus_round", self.consensus_round)
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES} (prevote, precommit), got {self.phase}")
        if self.value_hash != NIL:
            _check_hash("value_hash", self.value_hash)
        _check_key("voter", self.voter)
        _check_signature(self.signature)


@dataclass(frozen=True)
class Proposal:
    """The proposer's value for (epoch, consensus round). `valid_round` >= 0 says the value already gathered 2f+1
    prevotes in that earlier round, and `justification` carries those prevotes (empty when `valid_round` is -1).
    The proposer's signature covers the value hash, the round and `valid_round`; the justification's votes carry
    their own signatures, so they are not signed again."""

    value: EpochValue
    next_members: tuple[bytes, ...]
    consensus_round: int
    valid_round: int
    proposer: bytes
    signature: bytes
    justification: tuple[Vote, ...]

    def __post_init__(self) -> None:
        check_members(self.next_members)
        if members_hash(self.next_members) != self.value.next_members_hash:
            raise ValueError("next_members do not match the value's next_members_hash")
        _check_round("consensus_round", self.consensus_round)
        _check_round("valid_round", self.valid_round, lowest=-1)
        if self.valid_round >= self.consensus_round:
            raise ValueError(f"valid_round {self.valid_round} must be below the round {self.consensus_round}")
        _check_key("proposer", self.proposer)
        _check_signature(self.signature)
        if len(self.justification) > MAX_MEMBERS:
            raise ValueError(f"a justification has at most {MAX_MEMBERS} votes, got {len(self.justification)}")
        if (self.valid_round < 0) != (not self.justification):
            raise ValueError("a justification comes with valid_round >= 0, and only then")


@dataclass(frozen=True)
class Signed:
    """One member's precommit signature inside a certificate."""

    member: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_key("member", self.member)
        _check_signature(self.signature)


@dataclass(frozen=True)
class Certificate:
    """2f+1 distinct members' precommits for `value` in `consensus_round` (sorted by member key)."""

    value: EpochValue
    next_members: tuple[bytes, ...]
    consensus_round: int
    precommits: tuple[Signed, ...]

    def __post_init__(self) -> None:
        check_members(self.next_members)
        if members_hash(self.next_members) != self.value.next_members_hash:
            raise ValueError("next_members do not match the value's next_members_hash")
        _check_round("consensus_round", self.consensus_round)
        if not 1 <= len(self.precommits) <= MAX_MEMBERS:
            raise ValueError(f"a certificate has 1 to {MAX_MEMBERS} precommits, got {len(self.precommits)}")
        keys = [s.member for s in self.precommits]
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise ValueError("precommits must come from distinct members, in increasing key order")

    @property
    def epoch(self) -> int:
        return self.value.epoch

    @property
    def signers(self) -> tuple[bytes, ...]:
        return tuple(s.member for s in self.precommits)


@dataclass(frozen=True)
class EquivocationEvidence:
    """Two votes of one member for the same (swarm, epoch, round, phase) naming different values."""

    first: Vote
    second: Vote

    def __post_init__(self) -> None:
        a, b = self.first, self.second
        if (a.swarm_id, a.epoch, a.consensus_round, a.phase, a.voter) != (
            b.swarm_id,
            b.epoch,
            b.consensus_round,
            b.phase,
            b.voter,
        ):
            raise ValueError("evidence votes must share swarm, epoch, round, phase and voter")
        if a.value_hash == b.value_hash:
            raise ValueError("evidence votes must name different values")

    @property
    def offender(self) -> bytes:
        return self.first.voter


@dataclass(frozen=True)
class CertificateRequest:
    """A request for the receiver's certificate of `epoch`: what a peer whose chain is behind (it hears messages of
    later epochs, e.g. after a restart) asks the sender, one epoch at a time. Unsigned: the answer is verified
    against the chain like any certificate."""

    swarm_id: str
    epoch: int

    def __post_init__(self) -> None:
        _check_swarm(self.swarm_id)
        _check_epoch(self.epoch)


SCHEMA = Schema(
    "consensus",
    {
        1: EpochValue,
        2: Vote,
        3: Proposal,
        4: Certificate,
        5: EquivocationEvidence,
        6: CertificateRequest,
        7: JoinRequest,
    },
)
MAX_MESSAGE_BYTES = 2 * MAX_MEMBERS * 256 + (2 * MAX_EVIDENCE + MAX_JOINERS) * 256 + 4096
"""An upper bound on an encoded message (a proposal with a full justification, evidence and join requests, a
certificate with every member)."""
