"""Signing bytes and signature checks of the epoch consensus. No I/O, no state beyond a bounded cache.

Every signature is over a canonical, domain-separated encoding:

    b"swarmgrad/consensus/v1\\x00" | kind (1 byte) | len(swarm_id) (1 byte) | swarm_id | epoch (u64 LE)
    | consensus round (u32 LE) | extra (i32 LE: a proposal's valid round, else 0) | len(value hash) (1 byte)
    | value hash (32 bytes, or none for a nil vote)

`kind` is the phase: proposal, prevote, precommit, the seed a voter draws its validity sample from, or a join
request (whose "value hash" is the parent link it names). So a
signature for one swarm, epoch, round or phase can never be replayed as another; a vote names a value only by its
hash, and a proposal's value is bound through that hash. Ed25519 (`cryptography`) is deterministic: signing the same
bytes twice gives the same signature, so a restarted voter that re-signs a persisted vote sends the same bytes.

`SignatureVerifier` checks each (key, message, signature) once and remembers the answer (bounded, least recently
used first out): a vote relayed inside a proposal's justification, or received twice, costs one check.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from consensus.messages import PRECOMMIT, Attendance, EpochValue, JoinRequest, Proposal, Vote
from swarmgrad.core.errors import ConfigError

DOMAIN = b"swarmgrad/consensus/v1\x00"
KIND_PROPOSAL = 0
KIND_SEED = 3
KIND_JOIN = 4
_HEAD = struct.Struct("<QIi")


def signing_bytes(
    kind: int, swarm_id: str, epoch: int, consensus_round: int, value_hash: bytes, extra: int = 0
) -> bytes:
    """The canonical bytes signed for one message; see the module docstring."""
    swarm = swarm_id.encode()
    return (
        DOMAIN
        + bytes((kind, len(swarm)))
        + swarm
        + _HEAD.pack(epoch, consensus_round, extra)
        + bytes((len(value_hash),))
        + value_hash
    )


def vote_bytes(vote: Vote) -> bytes:
    return signing_bytes(vote.phase, vote.swarm_id, vote.epoch, vote.consensus_round, vote.value_hash)


def precommit_bytes(swarm_id: str, epoch: int, consensus_round: int, value_hash: bytes) -> bytes:
    return signing_bytes(PRECOMMIT, swarm_id, epoch, consensus_round, value_hash)


def attendance_bytes(value: EpochValue, entry: Attendance) -> bytes:
    """What `entry.voter` signed: its vote in epoch `value.epoch - 1` for the parent value `value` names."""
    return signing_bytes(
        entry.phase, value.swarm_id, value.epoch - 1, entry.consensus_round, value.parent_certificate_hash
    )


def proposal_bytes(proposal: Proposal) -> bytes:
    value = proposal.value
    return signing_bytes(
        KIND_PROPOSAL, value.swarm_id, value.epoch, proposal.consensus_round, value.hash(), proposal.valid_round
    )


def join_bytes(request: JoinRequest) -> bytes:
    return signing_bytes(KIND_JOIN, request.swarm_id, request.epoch, 0, request.parent)


class Signer:
    """A member's Ed25519 private key: signs votes, proposals and validity seeds."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.signatures_made = 0

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """A signer from a 32-byte private seed (tests and harnesses make deterministic keys this way)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    def sign(self, message: bytes) -> bytes:
        self.signatures_made += 1
        return self._key.sign(message)

    def vote(self, swarm_id: str, epoch: int, consensus_round: int, phase: int, value_hash: bytes) -> Vote:
        signature = self.sign(signing_bytes(phase, swarm_id, epoch, consensus_round, value_hash))
        return Vote(swarm_id, epoch, consensus_round, phase, value_hash, self.public_key, signature)

    def join_request(self, swarm_id: str, epoch: int, parent: bytes) -> JoinRequest:
        unsigned = JoinRequest(swarm_id, epoch, parent, self.public_key, bytes(64))
        return JoinRequest(swarm_id, epoch, parent, self.public_key, self.sign(join_bytes(unsigned)))

    def validity_seed(self, proposal: Proposal) -> bytes:
        """The seed this voter draws its validity sample of `proposal` from: SHA-256 of its own signature over the
        proposal's value, which the proposer cannot compute without this voter's key."""
        value = proposal.value
        signature = self.sign(signing_bytes(KIND_SEED, value.swarm_id, value.epoch, 0, value.hash()))
        return hashlib.sha256(signature).digest()


class SignatureVerifier:
    """Ed25519 checks, each (key, message, signature) done once and its answer cached (at most `max_entries`)."""

    def __init__(self, max_entries: int = 65_536) -> None:
        if max_entries < 1:
            raise ConfigError("max_entries", max_entries, "an int >= 1")
        self.max_entries = max_entries
        self._answers: OrderedDict[tuple[bytes, bytes, bytes], bool] = OrderedDict()
        self._keys: OrderedDict[bytes, Ed25519PublicKey | None] = OrderedDict()
        self.verifications = 0

    def verify(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is `public_key`'s signature of `message`."""
        cache_key = (public_key, signature, message)
        answer = self._answers.get(cache_key)
        if answer is not None:
            self._answers.move_to_end(cache_key)
            return answer
        key = self._public_key(public_key)
        self.verifications += 1
        if key is None:
            answer = False
        else:
            try:
                key.verify(signature, message)
                answer = True
            except InvalidSignature:
                answer = False
        self._answers[cache_key] = answer
        if len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)
        return answer

    def _public_key(self, raw: bytes) -> Ed25519PublicKey | None:
        if raw in self._keys:
            self._keys.move_to_end(raw)
            return self._keys[raw]
        try:
            key: Ed25519PublicKey | None = Ed25519PublicKey.from_public_bytes(raw)
        except ValueError:
            key = None
        self._keys[raw] = key
        if len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)
        return key

    def vote(self, vote: Vote) -> bool:
        return self.verify(vote.voter, vote_bytes(vote), vote.signature)

    def attendance(self, value: EpochValue, entry: Attendance) -> bool:
        return self.verify(entry.voter, attendance_bytes(value, entry), entry.signature)

    def proposal(self, proposal: Proposal) -> bool:
        return self.verify(proposal.proposer, proposal_bytes(proposal), proposal.signature)

    def join_request(self, request: JoinRequest) -> bool:
        return self.verify(request.joiner, join_bytes(request), request.signature)
