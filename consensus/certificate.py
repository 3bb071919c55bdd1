"""Offline checks of certificates, certificate chains and equivocation evidence. No I/O, no clock.

A certificate for epoch E holds for the member set M of E and the parent link P when: its value names E and P, it
has at least `quorum(len(M))` precommits, every signer is in M (distinct, which the message already enforces), and
every signature is that member's precommit for the value's hash in the certificate's consensus round. The member
set of E+1 is the certificate's `next_members` (bound to the value by `next_members_hash`), and E+1's parent link
is E's value hash. So a chain verifies from the genesis member set (or from a trusted certificate named by its
value hash) one link at a time; the first link that fails raises `CertificateError` naming its epoch. Each verified
link's value must also carry only what its voters accepted: attendance that `verify_attendance` accepts, evidence
that `verify_evidence` accepts against E's members, and join requests signed by their joiners, naming this chain's
parent link of their epoch, of keys that are neither members of E nor offenders an earlier value proves. Whether
`next_members` is the one the membership rule gives is not checked here: the rule also depends on the swarm's
`MembershipPolicy`, which a chain does not record.

`verify_attendance` checks the attendance a value of epoch E carries (who took part in E-1) against E-1's members:
every entry a member's valid signature of a vote for the parent value, and at least a quorum of them (the parent
certificate alone holds that many, so an honest proposer always has them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from consensus.errors import AttendanceError, CertificateError, EvidenceError
from consensus.membership import genesis_parent_hash
from consensus.messages import Certificate, EpochValue, EquivocationEvidence, check_members, quorum
from consensus.signing import SignatureVerifier, precommit_bytes, vote_bytes


@dataclass(frozen=True)
class EpochSummary:
    """What `verify_chain` reports for each verified epoch."""

    epoch: int
    round: int  # the swarm (training) round of the certified checkpoint
    consensus_round: int
    checkpoint_root: bytes
    member_count: int
    signers: tuple[bytes, ...]
    value_hash: bytes


def verify_certificate(
    cert: Certificate,
    members: Sequence[bytes],
    parent_hash: bytes,
    verifier: SignatureVerifier | None = None,
    epoch: int | None = None,
) -> bytes:
    """Check `cert` against the epoch's `members` and the expected parent link; return the certified value hash.
    Raises `CertificateError` naming the epoch and the first problem found."""
    verifier = verifier or SignatureVerifier()
    value = cert.value
    if epoch is not None and value.epoch != epoch:
        raise CertificateError(epoch, f"certificate is for epoch {value.epoch} (epoch gap or reordering)")
    if value.parent_certificate_hash != parent_hash:
        raise CertificateError(
            value.epoch,
            f"broken parent link: names parent {value.parent_certificate_hash.hex()[:16]}, "
            f"expected {parent_hash.hex()[:16]}",
        )
    member_set = set(members)
    need = quorum(len(member_set))
    if len(cert.precommits) < need:
        raise CertificateError(
            value.epoch, f"below quorum: {len(cert.precommits)} precommits, {need} of {len(member_set)} needed"
        )
    value_hash = value.hash()
    message = precommit_bytes(value.swarm_id, value.epoch, cert.consensus_round, value_hash)
    for signed in cert.precommits:
        if signed.member not in member_set:
            raise CertificateError(value.epoch, f"signer {signed.member.hex()[:16]} is not a member of this epoch")
        if not verifier.verify(signed.member, message, signed.signature):
            raise CertificateError(value.epoch, f"forged or wrong signature of member {signed.member.hex()[:16]}")
    return value_hash


def verify_chain(
    certificates: Iterable[Certificate],
    genesis_members: Sequence[bytes],
    trusted_hash: bytes | None = None,
    verifier: SignatureVerifier | None = None,
) -> list[EpochSummary]:
    """Verify consecutive certificates from epoch 1 (members `genesis_members`, parent `genesis_parent_hash` of the
    chain's swarm id and those members), or,
    with `trusted_hash`, from the certificate whose value hash it is (accepted without signature checks: the
    caller trusts it), and return one summary per verified epoch. Each verified epoch's attendance, evidence and
    join requests are checked too (see the module docstring); from a trusted epoch T > 1, the certificate before it
    must be its parent, whose `next_members` voted in T. Raises `CertificateError` at the first bad link, and when
    `trusted_hash` names no certificate of the chain."""
    verifier = verifier or SignatureVerifier()
    certs = list(certificates)
    members = tuple(genesis_members)
    try:
        check_members(members)
    except ValueError as exc:
        raise CertificateError(1, f"genesis member set: {exc}") from exc
    if not certs:
        return []
    swarm_id = certs[0].value.swarm_id
    parent = genesis_parent_hash(swarm_id, members)
    expected_epoch = 1
    start = 0
    parent_members: tuple[bytes, ...] = ()  # who voted in the epoch before the next one (none before epoch 1)
    grandparent = parent  # the parent link of that epoch
    banned: set[bytes] = set()
    if trusted_hash is not None:
        for index, cert in enumerate(certs):
            if cert.value.hash() == trusted_hash:
                start = index + 1
                parent_members = _members_of_trusted(certs, index, members)
                grandparent = cert.value.parent_certificate_hash
                members, parent, expected_epoch = cert.next_members, trusted_hash, cert.epoch + 1
                banned.update(cert.value.offenders)
                break
        else:
            raise CertificateError(0, f"no certificate of the chain has the trusted hash {trusted_hash.hex()[:16]}")
    summaries = []
    for cert in certs[start:]:
        if cert.value.swarm_id != swarm_id:
            raise CertificateError(
                cert.epoch, f"certificate of swarm {cert.value.swarm_id!r} in a chain of {swarm_id!r}"
            )
        value_hash = verify_certificate(cert, members, parent, verifier, epoch=expected_epoch)
        _verify_contents(
            cert.value, parent_members, members, {cert.epoch: parent, cert.epoch - 1: grandparent}, banned, verifier
        )
        banned.update(cert.value.offenders)
        parent_members, grandparent = members, parent
        summaries.append(
            EpochSummary(
                cert.epoch,
                cert.value.round,
                cert.consensus_round,
                cert.value.checkpoint_root,
                len(members),
                cert.signers,
                value_hash,
            )
        )
        members, parent, expected_epoch = cert.next_members, value_hash, expected_epoch + 1
    return summaries


def _members_of_trusted(
    certs: Sequence[Certificate], index: int, genesis_members: tuple[bytes, ...]
) -> tuple[bytes, ...]:
    """Who voted in the epoch of the trusted `certs[index]`: the genesis members in epoch 1, else the next members
    of the certificate before it, which must be its parent (the next epoch's attendance is checked against them)."""
    trusted = certs[index]
    if trusted.epoch == 1:
        return genesis_members
    if index > 0 and certs[index - 1].value.hash() == trusted.value.parent_certificate_hash:
        return certs[index - 1].next_members
    raise CertificateError(
        trusted.epoch + 1,
        f"the chain does not hold the parent of the trusted certificate (epoch {trusted.epoch}), so who voted in"
        " that epoch, which this epoch's attendance names, is unknown",
    )


def _verify_contents(
    value: EpochValue,
    parent_members: Sequence[bytes],
    members: Sequence[bytes],
    parent_of: Mapping[int, bytes],
    banned: Set[bytes],
    verifier: SignatureVerifier,
) -> None:
    """Check what a certified `value` carries, as its voters did: its attendance against `parent_members` (who voted
    in the epoch before), each evidence entry against `members` (who voted in its epoch), each join request's
    signature and parent link (`parent_of`: the parent link of the value's epoch and of the one before), and that
    no joiner is a member or `banned`. Raises `CertificateError` naming the epoch."""
    epoch = value.epoch
    try:
        verify_attendance(value, parent_members, verifier)
    except AttendanceError as exc:
        raise CertificateError(epoch, f"attendance: {exc}") from exc
    for proof in value.evidence:
        try:
            verify_evidence(proof, members, verifier)
        except EvidenceError as exc:
            raise CertificateError(epoch, f"evidence: {exc}") from exc
    refused = set(members) | banned
    for request in value.joiners:
        joiner = request.joiner.hex()[:16]
        if request.joiner in refused:
            raise CertificateError(epoch, f"join request of {joiner}, a member or a proven equivocator")
        if request.parent != parent_of.get(request.epoch):
            raise CertificateError(epoch, f"join request of {joiner} names another chain (epoch {request.epoch})")
        if not verifier.join_request(request):
            raise CertificateError(epoch, f"forged or wrong signature of the join request of {joiner}")


def verify_evidence(
    evidence: EquivocationEvidence, members: Sequence[bytes] | None = None, verifier: SignatureVerifier | None = None
) -> bytes:
    """Check offline that `evidence` proves its offender signed two different votes for one (swarm, epoch, round,
    phase); return the offender's key. With `members`, the offender must also be one of them. Raises
    `EvidenceError`. (The message itself already enforces that both votes share everything but the value.)"""
    verifier = verifier or SignatureVerifier()
    offender = evidence.offender
    if members is not None and offender not in set(members):
        raise EvidenceError(f"offender {offender.hex()[:16]} is not a member")
    for vote in (evidence.first, evidence.second):
        if not verifier.verify(vote.voter, vote_bytes(vote), vote.signature):
            raise EvidenceError(f"a vote of {offender.hex()[:16]} in the evidence is not validly signed")
    return offender


def verify_attendance(
    value: EpochValue, parent_members: Sequence[bytes], verifier: SignatureVerifier | None = None
) -> frozenset[bytes]:
    """Check that `value`'s attendance proves who took part in the parent epoch, whose members are
    `parent_members` (ignored in epoch 1, whose attendance the message keeps empty); return the attendees. Raises
    `AttendanceError` on a non-member, a forged or wrong signature, or fewer than a quorum of attendees."""
    if value.epoch == 1:
        return frozenset()
    verifier = verifier or SignatureVerifier()
    member_set = set(parent_members)
    need = quorum(len(member_set))
    if len(value.attendance) < need:
        raise AttendanceError(
            f"{len(value.attendance)} attendees of epoch {value.epoch - 1}, at least {need} (a quorum) expected"
        )
    for entry in value.attendance:
        if entry.voter not in member_set:
            raise AttendanceError(f"attendee {entry.voter.hex()[:16]} is not a member of epoch {value.epoch - 1}")
        if not verifier.attendance(value, entry):
            raise AttendanceError(f"forged or wrong attendance signature of member {entry.voter.hex()[:16]}")
    return value.attendees
