"""Checking a certified checkpoint a neighbour offers a joiner: its chain, its certificate and its body. No I/O.

`check_certified_offer` is the validation a joiner runs (in a worker) on what a neighbour sent: the chain's genesis
record, its certificates and the canonical bytes of the checkpoint the last certificate names. It returns the
decoded state with its tree and the verified summaries, or raises `CertifiedOfferRefused` (a
`RemoteProtocolError` naming the peer) with one line naming what failed: a genesis other than the swarm's
(`genesis_difference`), no certificate, a certificate of another swarm, a chain that does not verify from genesis or
from the trusted certificate hash, another model spec, a body over the limit, a body that does not decode for the
task, or a body whose Merkle root is not the last certificate's `checkpoint_root`. `check_offered_chain` is its
first half, the chain alone, which the joiner (`consensus.certified_join`) runs before it downloads the body; the
body may come inline or from a chunked fetch, this check takes the bytes either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from consensus.canonical import CanonicalBytesError, decode_canonical, model_spec_hash, spec_layout
from consensus.certificate import EpochSummary, verify_chain
from consensus.errors import CertificateError
from consensus.merkle import CheckpointTree
from consensus.messages import Certificate
from consensus.provenance import ChainGenesis, genesis_difference
from consensus.signing import SignatureVerifier
from swarmgrad.core.errors import RemoteProtocolError
from training.tasks.base import TensorSpec


class CertifiedOfferRefused(RemoteProtocolError):
    """A neighbour's certified checkpoint did not check out; `reason` names what failed."""


@dataclass(frozen=True, eq=False)
class CertifiedCheckpoint:
    """A checked offer: the chain (verified), the certificate it ends in, and the body as a state and a tree."""

    certificate: Certificate
    summaries: tuple[EpochSummary, ...]
    state: dict[str, torch.Tensor]
    tree: CheckpointTree


def check_offered_chain(
    peer: str,
    genesis: ChainGenesis,
    certificates: Sequence[Certificate],
    *,
    expected_genesis: ChainGenesis,
    spec: Mapping[str, TensorSpec],
    trusted_hash: bytes | None = None,
    verifier: SignatureVerifier | None = None,
) -> list[EpochSummary]:
    """The chain half of `check_certified_offer` (a joiner runs it before it downloads the body): the genesis, the
    swarm of every certificate, the chain from genesis or the trusted hash, the last certificate's model spec. The
    verified summaries, or `CertifiedOfferRefused`."""
    difference = genesis_difference(genesis, expected_genesis)
    if difference is not None:
        raise CertifiedOfferRefused(peer, f"chain's genesis differs from the swarm's: {difference}")
    if not certificates:
        raise CertifiedOfferRefused(peer, "chain holds no certificate")
    for cert in certificates:
        if cert.value.swarm_id != genesis.swarm_id:
            raise CertifiedOfferRefused(peer, f"certificate of epoch {cert.epoch} is for swarm {cert.value.swarm_id!r}")
    try:
        summaries = verify_chain(certificates, genesis.members, trusted_hash, verifier)
    except CertificateError as exc:
        raise CertifiedOfferRefused(peer, f"chain does not verify: {exc}") from exc
    last = certificates[-1]
    if last.value.model_spec_hash != model_spec_hash(spec):
        raise CertifiedOfferRefused(peer, f"epoch {last.epoch} certifies another model spec than our task's")
    return summaries


def check_certified_offer(
    peer: str,
    genesis: ChainGenesis,
    certificates: Sequence[Certificate],
    body: bytes | memoryview,
    *,
    expected_genesis: ChainGenesis,
    spec: Mapping[str, TensorSpec],
    max_body_bytes: int,
    trusted_hash: bytes | None = None,
    verifier: SignatureVerifier | None = None,
) -> CertifiedCheckpoint:
    """Check `peer`'s offer (see the module docstring); raise `CertifiedOfferRefused` with the reason."""
    summaries = check_offered_chain(
        peer,
        genesis,
        certificates,
        expected_genesis=expected_genesis,
        spec=spec,
        trusted_hash=trusted_hash,
        verifier=verifier,
    )
    last = certificates[-1]
    try:
        state = decode_canonical(body, spec, max_bytes=max_body_bytes)
    except CanonicalBytesError as exc:
        raise CertifiedOfferRefused(peer, f"body does not decode: {exc}") from exc
    tree = CheckpointTree(memoryview(body).cast("B"), spec_layout(spec))
    if tree.root != last.value.checkpoint_root:
        raise CertifiedOfferRefused(
            peer,
            f"body's root {tree.root.hex()[:16]} is not epoch {last.epoch}'s certified "
            f"{last.value.checkpoint_root.hex()[:16]}",
        )
    return CertifiedCheckpoint(last, tuple(summaries), state, tree)


@dataclass(frozen=True)
class TaskOfferChecks:
    """The two halves of the check as `consensus.certified_join.OfferChecks` want them (a reason instead of an
    exception) for one swarm and task; one signature cache serves both halves, so the body check re-verifies the chain
    at little cost."""

    genesis: ChainGenesis
    spec: Mapping[str, TensorSpec]
    max_body_bytes: int
    trusted_hash: bytes | None
    verifier: SignatureVerifier = field(default_factory=SignatureVerifier)

    def chain(self, peer: str, genesis: ChainGenesis, certificates: tuple[Certificate, ...]) -> str | None:
        try:
            check_offered_chain(
                peer,
                genesis,
                certificates,
                expected_genesis=self.genesis,
                spec=self.spec,
                trusted_hash=self.trusted_hash,
                verifier=self.verifier,
            )
        except CertifiedOfferRefused as exc:
            return exc.reason
        return None

    def body(
        self, peer: str, genesis: ChainGenesis, certificates: tuple[Certificate, ...], body: bytes
    ) -> CertifiedCheckpoint | str:
        try:
            return check_certified_offer(
                peer,
                genesis,
                certificates,
                body,
                expected_genesis=self.genesis,
                spec=self.spec,
                max_body_bytes=self.max_body_bytes,
                trusted_hash=self.trusted_hash,
                verifier=self.verifier,
            )
        except CertifiedOfferRefused as exc:
            return exc.reason
