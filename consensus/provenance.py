"""The provenance chain of a swarm's model: a genesis record, then one certificate per epoch, in a `ChainLog` file.

A chain file (`consensus.chain` owns its format and integrity) holds, as its records, first one `ChainGenesis`
(the swarm id and the member set that votes in epoch 1), then the certificates of epochs 1, 2, ... in order, each
encoded with `SCHEMA` (a 16-bit tag, then the message). `read_chain` decodes and checks the file; `verify_file`
then verifies it link by link from the genesis record (`consensus.certificate.verify_chain`), or from a certificate
the caller trusts, named by its value hash. This is what `swarmgrad verify-chain PATH` runs.

Nothing in a chain file is trusted: a record that does not decode, a genesis record that is not first, or a second
one, is an error naming the record, as is any damage the file itself shows. A read for verification never repairs
the file: a truncated last record is reported (the file may be a copy a peer handed over; a crash while appending
is repaired by the peer that owns the file, when it opens it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from consensus.certificate import EpochSummary, verify_chain
from consensus.chain import ChainLog
from consensus.errors import CertificateError
from consensus.membership import genesis_parent_hash
from consensus.messages import Certificate, check_members
from consensus.signing import SignatureVerifier
from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import DecodeError, SwarmgradError
from swarmgrad.core.swarm_id import SWARM_ID_RULE, is_valid_swarm_id

log = logging.getLogger(__name__)


class ChainContentError(SwarmgradError):
    """A chain file whose records are whole and intact but do not form a chain: names the record and the problem."""

    def __init__(self, path: Path, index: int, problem: str) -> None:
        self.path = path
        self.index = index
        self.problem = problem
        super().__init__(f"chain file {path}: record {index}: {problem}")


@dataclass(frozen=True)
class ChainGenesis:
    """The first record of a chain: the swarm and the members who vote in epoch 1."""

    swarm_id: str
    members: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not is_valid_swarm_id(self.swarm_id):
            raise ValueError(f"swarm_id must be {SWARM_ID_RULE}, got {self.swarm_id[:80]!r}")
        check_members(self.members)

    @property
    def parent_hash(self) -> bytes:
        """The parent link epoch 1's certificate must name."""
        return genesis_parent_hash(self.swarm_id, self.members)


SCHEMA = Schema("provenance", {1: ChainGenesis, 2: Certificate})


def create_chain(path: Path, genesis: ChainGenesis) -> ChainLog:
    """A new chain file at `path` holding only `genesis`. Refuses to touch an existing file."""
    if path.exists():
        raise ChainContentError(path, 0, "a chain file already exists here")
    chain = ChainLog(path)
    chain.append(SCHEMA.encode(genesis))
    return chain


def append_certificate(log: ChainLog, certificate: Certificate) -> None:
    """Append `certificate` (fsynced before this returns). The caller has verified it against the chain."""
    log.append(SCHEMA.encode(certificate))


def read_chain(path: Path, *, repair: bool = False) -> tuple[ChainGenesis, list[Certificate]]:
    """The genesis record and the certificates of the chain file at `path`. Raises `ChainError` on damage (with
    `repair`, a truncated last record is cut back with a warning instead, as when a peer opens its own chain) and
    `ChainContentError` when the records do not form a chain."""
    if not path.is_file():
        raise ChainContentError(path, 0, "no such file")
    return decode_chain(path, ChainLog(path).load(repair=repair, strict=not repair))


def decode_chain(path: Path, records: list[bytes]) -> tuple[ChainGenesis, list[Certificate]]:
    """The genesis record and certificates that `records` (a `ChainLog`'s, read from `path`) hold, or
    `ChainContentError` naming the first record that does not fit."""
    if not records:
        raise ChainContentError(path, 0, "the chain holds no record (a chain starts with its genesis record)")
    decoded: list[object] = []
    for index, record in enumerate(records):
        try:
            decoded.append(SCHEMA.decode(record))
        except DecodeError as exc:
            raise ChainContentError(path, index, f"does not decode: {exc}") from exc
    genesis, *rest = decoded
    if not isinstance(genesis, ChainGenesis):
        raise ChainContentError(path, 0, f"a {type(genesis).__name__}, not the genesis record")
    certificates: list[Certificate] = []
    for index, message in enumerate(rest, start=1):
        if not isinstance(message, Certificate):
            raise ChainContentError(path, index, "a second genesis record")
        certificates.append(message)
    return genesis, certificates


def genesis_difference(found: ChainGenesis, expected: ChainGenesis) -> str | None:
    """None when `found` is the `expected` genesis record, else which field differs and how (one line)."""
    if found.swarm_id != expected.swarm_id:
        return f"swarm_id is {found.swarm_id!r}, expected {expected.swarm_id!r}"
    if found.members != expected.members:
        extra = sorted(set(found.members) - set(expected.members))
        missing = sorted(set(expected.members) - set(found.members))
        return (
            f"members differ: {len(found.members)} founders where {len(expected.members)} are expected"
            f" ({len(extra)} unknown, first {extra[0].hex()[:16] if extra else '-'};"
            f" {len(missing)} missing, first {missing[0].hex()[:16] if missing else '-'})"
        )
    return None


def verify_file(path: Path, trusted_hash: bytes | None = None) -> tuple[ChainGenesis, list[EpochSummary]]:
    """Read and verify the chain at `path` from its genesis record (or from the certificate whose value hash is
    `trusted_hash`); one summary per verified epoch. Raises `ChainError` / `ChainContentError` (the file) or
    `CertificateError` (a
    link: a missing or forged signature, a signer outside the member set, below quorum, a broken parent link)."""
    genesis, certificates = read_chain(path)
    for cert in certificates:
        if cert.value.swarm_id != genesis.swarm_id:
            raise CertificateError(
                cert.epoch, f"a certificate of swarm {cert.value.swarm_id!r} in the chain of {genesis.swarm_id!r}"
            )
    return genesis, verify_chain(certificates, genesis.members, trusted_hash)


@dataclass(frozen=True, eq=False)
class OpenedChain:
    """A peer's own chain, opened at start: `log` appends after its last certificate."""

    log: ChainLog
    genesis: ChainGenesis
    certificates: tuple[Certificate, ...]
    summaries: tuple[EpochSummary, ...]


def open_chain(path: Path, genesis: ChainGenesis, verifier: SignatureVerifier | None = None) -> OpenedChain:
    """Open the peer's own chain file at `path` at start, for the swarm whose configured genesis is `genesis`.

    No file: one is created holding `genesis`. A truncated last record (a crash while appending) is cut back to the
    last whole record with one warning, and a file that holds only its header (a crash while it was created) gets
    `genesis` appended, with a warning. Everything else that is wrong is an error and the file is left as it is:
    damage (`ChainError`: the file and the byte offset), records that do not form a chain, a genesis record other
    than `genesis` (which field differs), a certificate of another swarm id, or a certificate that does not verify
    from genesis (`ChainContentError`: the file and the record)."""
    if not path.exists():
        return OpenedChain(create_chain(path, genesis), genesis, (), ())
    chain = ChainLog(path)
    records = chain.load(repair=True)
    if not records:
        log.warning("chain file %s: holds no genesis record (cut short while created); writing it", path)
        chain.append(SCHEMA.encode(genesis))
        records = [SCHEMA.encode(genesis)]
    found, certificates = decode_chain(path, records)
    difference = genesis_difference(found, genesis)
    if difference is not None:
        raise ChainContentError(
            path, 0, f"the genesis record differs from the swarm's configured genesis: {difference}"
        )
    for index, cert in enumerate(certificates, start=1):
        if cert.value.swarm_id != genesis.swarm_id:
            raise ChainContentError(
                path, index, f"a certificate of swarm {cert.value.swarm_id!r} in the chain of {genesis.swarm_id!r}"
            )
    try:
        summaries = verify_chain(certificates, genesis.members, verifier=verifier)
    except CertificateError as exc:
        raise ChainContentError(path, exc.epoch, f"does not verify from genesis: {exc}") from exc
    return OpenedChain(chain, found, tuple(certificates), tuple(summaries))
