"""A joiner's check of a certified checkpoint offer: an honest offer is adopted; each forgery is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from consensus.canonical import model_spec_hash
from consensus.certified_offer import CertifiedOfferRefused, check_certified_offer
from consensus.membership import genesis_parent_hash
from consensus.merkle import CheckpointTree
from consensus.messages import PRECOMMIT, Certificate, EpochValue, Signed, members_hash
from consensus.provenance import ChainGenesis
from tests.consensus_helpers import SWARM, Members, attendance_of
from training.tasks.base import TensorSpec

MEMBERS = Members.make(4)
GENESIS = ChainGenesis(SWARM, MEMBERS.keys)
STATE = {"w": torch.randn(50, 40, generator=torch.Generator().manual_seed(1)), "b": torch.zeros(40)}
SPEC = {n: TensorSpec(tuple(t.shape), "float32") for n, t in STATE.items()}
TREE = CheckpointTree.from_state(STATE)
BODY = bytes(TREE.data)


def _chain(epochs: int, root: bytes = TREE.root, swarm: str = SWARM) -> list[Certificate]:
    parent, certs = genesis_parent_hash(swarm, MEMBERS.keys), list[Certificate]()
    for epoch in range(1, epochs + 1):
        attendance = attendance_of(certs[-1]) if certs else ()
        value = EpochValue(
            swarm, epoch, 10 * epoch, root, model_spec_hash(SPEC), members_hash(MEMBERS.keys), parent, attendance
        )
        votes = [s.vote(swarm, epoch, 0, PRECOMMIT, value.hash()) for s in MEMBERS.signers[:3]]
        certs.append(Certificate(value, MEMBERS.keys, 0, tuple(Signed(v.voter, v.signature) for v in votes)))
        parent = value.hash()
    return certs


def _check(genesis: ChainGenesis = GENESIS, certs: list[Certificate] | None = None, body: bytes = BODY, **kw):  # type: ignore[no-untyped-def]
    return check_certified_offer(
        "p1",
        genesis,
        _chain(3) if certs is None else certs,
        body,
        expected_genesis=GENESIS,
        spec=SPEC,
        max_body_bytes=1 << 20,
        **kw,
    )


def _refused(match: str, **kw: object) -> None:
    with pytest.raises(CertifiedOfferRefused, match=match) as info:
        _check(**kw)  # type: ignore[arg-type]
    assert info.value.peer == "p1"


def test_an_honest_offer_is_adopted() -> None:
    adopted = _check()
    assert adopted.certificate == _chain(3)[-1] and [s.epoch for s in adopted.summaries] == [1, 2, 3]
    assert adopted.tree.root == TREE.root and torch.equal(adopted.state["w"], STATE["w"])
    trusted = _chain(3)[0].value.hash()
    assert [s.epoch for s in _check(trusted_hash=trusted).summaries] == [2, 3]


def test_a_forged_signature_is_refused() -> None:
    certs = _chain(3)
    first = certs[2].precommits[0]
    forged = Signed(first.member, bytes(64))
    certs[2] = dataclasses.replace(certs[2], precommits=(forged, *certs[2].precommits[1:]))
    _refused(r"chain does not verify: epoch 3: forged or wrong signature", certs=certs)


def test_a_body_that_does_not_match_the_root_is_refused() -> None:
    other = bytes(CheckpointTree.from_state({"w": STATE["w"] + 1, "b": STATE["b"]}).data)
    _refused(r"body's root [0-9a-f]{16} is not epoch 3's certified", body=other)
    _refused(r"body does not decode: .*truncated", body=BODY[:-8])
    _refused(r"body does not decode: .*exceed the limit", body=BODY + bytes(1 << 20))


def test_a_chain_of_another_swarm_or_genesis_is_refused() -> None:
    _refused(r"genesis differs from the swarm's: swarm_id is 'other'", genesis=ChainGenesis("other", MEMBERS.keys))
    _refused(
        r"genesis differs from the swarm's: members differ", genesis=ChainGenesis(SWARM, Members.make(4, "x").keys)
    )
    _refused(r"certificate of epoch 1 is for swarm 'other'", certs=_chain(2, swarm="other"))


def test_a_truncated_or_empty_chain_is_refused() -> None:
    _refused(r"chain does not verify: epoch 1: certificate is for epoch 2", certs=_chain(3)[1:])
    _refused(r"chain holds no certificate", certs=[])
