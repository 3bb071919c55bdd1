"""consensus messages, signing, certificates, chains, evidence and membership rules: pure functions, no I/O."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from consensus.certificate import verify_certificate, verify_chain, verify_evidence
from consensus.errors import CertificateError, EvidenceError
from consensus.membership import (
    MembershipPolicy,
    genesis_members,
    genesis_parent_hash,
    max_new_voters,
    missed_epochs,
    next_members,
)
from consensus.messages import (
    NIL,
    PRECOMMIT,
    PREVOTE,
    SCHEMA,
    EquivocationEvidence,
    Proposal,
    Signed,
    quorum,
)
from consensus.signing import SignatureVerifier, Signer, proposal_bytes, vote_bytes
from swarmgrad.core.errors import ConfigError, DecodeError
from tests.consensus_helpers import SWARM, Members, attendance_of, certificate, chain, value


def test_quorum_is_two_f_plus_one() -> None:
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 6, 7, 10, 31)] == [1, 2, 3, 3, 4, 5, 5, 7, 21]


def test_every_message_round_trips_through_the_codec() -> None:
    m = Members.make(4)
    cert = chain(m, 1)[0]
    signer = m.signers[0]
    vote = signer.vote(SWARM, 1, 0, PREVOTE, cert.value.hash())
    nil = signer.vote(SWARM, 1, 0, PRECOMMIT, NIL)
    unsigned = Proposal(cert.value, m.keys, 1, 0, signer.public_key, bytes(64), (vote,))
    proposal = dataclasses.replace(unsigned, signature=signer.sign(proposal_bytes(unsigned)))
    other = signer.vote(SWARM, 1, 0, PREVOTE, NIL)
    evidence = EquivocationEvidence(vote, other)
    for msg in (cert.value, vote, nil, proposal, cert, evidence):
        assert SCHEMA.decode(SCHEMA.encode(msg)) == msg


def test_decoder_rejects_malformed_fields() -> None:
    m = Members.make(4)
    vote = m.signers[0].vote(SWARM, 1, 0, PREVOTE, NIL)
    good = [getattr(vote, f.name) for f in dataclasses.fields(vote)]
    assert SCHEMA.decode(_vote_body(good)) == vote
    names = [f.name for f in dataclasses.fields(vote)]
    for field, bad in (("value_hash", b"x" * 31), ("voter", b"k" * 31), ("phase", 3), ("epoch", 0), ("signature", b"")):
        fields = list(good)
        fields[names.index(field)] = bad
        with pytest.raises(DecodeError):
            SCHEMA.decode(_vote_body(fields))


def _vote_body(fields: list[object]) -> bytes:
    return (2).to_bytes(2, "little") + msgpack.packb(fields, use_bin_type=True)


def test_cert_with_duplicate_signer_is_rejected_by_the_message() -> None:
    m = Members.make(4)
    cert = chain(m, 1)[0]
    with pytest.raises(ValueError, match="distinct"):
        dataclasses.replace(cert, precommits=(cert.precommits[0], cert.precommits[0]))


def test_signatures_are_domain_separated_and_checked_once() -> None:
    m = Members.make(4)
    signer = m.signers[0]
    h = b"h" * 32
    prevote = signer.vote(SWARM, 1, 0, PREVOTE, h)
    verifier = SignatureVerifier(max_entries=8)
    assert verifier.vote(prevote)
    assert verifier.vote(prevote)
    assert verifier.verifications == 1
    for other in (
        dataclasses.replace(prevote, phase=PRECOMMIT),
        dataclasses.replace(prevote, consensus_round=1),
        dataclasses.replace(prevote, epoch=2),
        dataclasses.replace(prevote, swarm_id="other"),
        dataclasses.replace(prevote, value_hash=NIL),
    ):
        assert vote_bytes(other) != vote_bytes(prevote)
        assert not verifier.vote(other)
    with pytest.raises(ConfigError):
        SignatureVerifier(max_entries=0)


def test_verifier_cache_is_bounded() -> None:
    signer = Signer.from_seed(b"x")
    verifier = SignatureVerifier(max_entries=4)
    for r in range(10):
        assert verifier.vote(signer.vote(SWARM, 1, r, PREVOTE, NIL))
    assert len(verifier._answers) == 4


def test_chain_verifies_and_summarises_each_epoch() -> None:
    m = Members.make(4)
    certs = chain(m, 3)
    summaries = verify_chain(certs, m.keys)
    assert [s.epoch for s in summaries] == [1, 2, 3]
    assert all(s.member_count == 4 and len(s.signers) == 3 for s in summaries)
    assert summaries[1].checkpoint_root == certs[1].value.checkpoint_root
    from_trusted = verify_chain(certs, m.keys, trusted_hash=certs[0].value.hash())
    assert [s.epoch for s in from_trusted] == [2, 3]


def test_chain_errors_name_the_epoch_and_problem() -> None:
    m = Members.make(4)
    outsider = Signer.from_seed(b"outsider")
    certs = chain(m, 3)
    parent2 = certs[0].value.hash()

    below = certificate(2, parent2, m, signers=m.signers[:2])
    with pytest.raises(CertificateError, match=r"epoch 2: below quorum: 2 precommits, 3 of 4"):
        verify_chain([certs[0], below, certs[2]], m.keys)

    forged_sig = dataclasses.replace(
        certs[1], precommits=(Signed(certs[1].precommits[0].member, bytes(64)), *certs[1].precommits[1:])
    )
    with pytest.raises(CertificateError, match="epoch 2: forged or wrong signature"):
        verify_chain([certs[0], forged_sig], m.keys)

    stranger = certificate(2, parent2, m, signers=[*m.signers[:2], outsider])
    with pytest.raises(CertificateError, match=r"epoch 2: signer .* is not a member"):
        verify_chain([certs[0], stranger], m.keys)

    broken = certificate(2, b"\x01" * 32, m)
    with pytest.raises(CertificateError, match="epoch 2: broken parent link"):
        verify_chain([certs[0], broken], m.keys)

    with pytest.raises(CertificateError, match="epoch 2: certificate is for epoch 3"):
        verify_chain([certs[0], certs[2]], m.keys)

    with pytest.raises(CertificateError, match="epoch 1: broken parent link"):
        verify_chain(certs, Members.make(4, tag="other").keys)


def test_member_set_changes_follow_the_certificates() -> None:
    m = Members.make(4)
    newcomers = Members.make(4, tag="n")
    parent = genesis_parent_hash(SWARM, m.keys)
    first = certificate(1, parent, m, next_members=newcomers.keys)
    second = certificate(2, first.value.hash(), newcomers, attendance=attendance_of(first))
    assert len(verify_chain([first, second], m.keys)) == 2
    old_signed = certificate(2, first.value.hash(), m)
    with pytest.raises(CertificateError, match="epoch 2: signer"):
        verify_chain([first, old_signed], m.keys)


def test_certificate_for_wrong_value_hash_fails() -> None:
    m = Members.make(4)
    cert = chain(m, 1)[0]
    other_value = dataclasses.replace(cert.value, round=cert.value.round + 1)
    with pytest.raises(CertificateError, match="forged or wrong signature"):
        verify_certificate(dataclasses.replace(cert, value=other_value), m.keys, cert.value.parent_certificate_hash)


def test_evidence_verifies_offline() -> None:
    m = Members.make(4)
    signer = m.signers[1]
    a = signer.vote(SWARM, 3, 2, PREVOTE, b"a" * 32)
    b = signer.vote(SWARM, 3, 2, PREVOTE, b"b" * 32)
    evidence = SCHEMA.decode(SCHEMA.encode(EquivocationEvidence(a, b)))
    assert verify_evidence(evidence, m.keys) == signer.public_key  # type: ignore[arg-type]
    with pytest.raises(EvidenceError, match="not a member"):
        verify_evidence(evidence, Members.make(4, tag="z").keys)  # type: ignore[arg-type]
    forged = EquivocationEvidence(a, dataclasses.replace(b, signature=bytes(64)))
    with pytest.raises(EvidenceError, match="not validly signed"):
        verify_evidence(forged)
    with pytest.raises(ValueError):
        EquivocationEvidence(a, a)
    with pytest.raises(ValueError):
        EquivocationEvidence(a, signer.vote(SWARM, 3, 3, PREVOTE, b"b" * 32))


def test_genesis_and_next_members() -> None:
    m = Members.make(7)
    keys = genesis_members(reversed(m.keys))
    assert keys == m.keys
    with pytest.raises(ConfigError, match="founders"):
        genesis_members([])
    parent = genesis_parent_hash(SWARM, keys)
    joiners = Members.make(70, tag="j").keys
    private = next_members(MembershipPolicy(public=False), keys, parent, {}, joiners[:3], [])
    assert len(private) == 10 and set(joiners[:3]) <= set(private)
    public = next_members(MembershipPolicy(public=True), keys, parent, {}, joiners, [])
    assert len(public) == 7 + max_new_voters(7) == 8
    current = tuple(sorted(set(public) | set(joiners[:60])))
    big = next_members(MembershipPolicy(public=True), current, parent, {}, joiners, [])
    assert len(big) == len(current) + len(current) // 32  # the public bound: n // 32 new voters
    dropped = next_members(MembershipPolicy(drop_after_missed=3), keys, parent, {keys[0]: 3, keys[1]: 2}, [], [keys[2]])
    assert keys[0] not in dropped and keys[2] not in dropped and keys[1] in dropped
    assert next_members(MembershipPolicy(), keys[:1], parent, {keys[0]: 9}, [], []) == keys[:1]
    both = keys[:2]
    assert missed_epochs(both, [(both, [keys[0]]), (both, [keys[1]]), (both, [keys[1]])]) == {keys[0]: 2, keys[1]: 0}
    # epochs before a key was a voter are not missed: admitted for the last epoch, it missed only that one
    assert missed_epochs(both, [(keys[:1], [keys[0]]), (keys[:1], [keys[0]]), (both, [keys[0]])])[keys[1]] == 1
    with pytest.raises(ConfigError):
        MembershipPolicy(drop_after_missed=0)


def test_value_hash_is_stable_and_cached() -> None:
    m = Members.make(4)
    v = value(1, b"p" * 32, m.keys)
    again = SCHEMA.decode(SCHEMA.encode(v))
    assert v.hash() == again.hash() == v.hash()  # type: ignore[attr-defined]
    assert dataclasses.replace(v, epoch=2).hash() != v.hash()
