"""The messages a joiner and a server exchange about the server's newest certified checkpoint. No I/O.

They travel on the chunk protocol (`consensus.chunks.PROTOCOL`, schema `consensus.chunks.SCHEMA`, tags 4 and 5),
beside the chunk requests that then fetch the checkpoint's body:

- `ChainQuery(version, swarm_id, from_epoch)`: "your chain of certificates, from epoch `from_epoch` on, and the
  newest certified checkpoint whose body you keep".
- `ChainOffer(version, swarm_id, genesis_members, newest_epoch, body_epoch, certificates)`: the server's genesis
  member set, the last epoch of its chain, the epoch of the certified checkpoint whose body it serves (both 0: it
  has nothing to offer; else 1 <= `body_epoch` <= `newest_epoch`, the body may lag the chain while it is fetched)
  and one page of its chain, consecutive certificates from the asked epoch on, at most
  `MAX_CERTIFICATES_PER_OFFER` of them and at most `MAX_OFFER_PAGE_BYTES` of encoded certificates (so any page
  fits the chunk protocol's message limit). A chain longer than one page is read page by page, `from_epoch` moving
  on. The whole chain is offered, not only the part up to the body, so that a joiner's chain ends where the
  members' does and the next certificate they send it follows on.

`version` is `OFFER_VERSION` (1); a message of another version does not decode (`DecodeError`, so the driver
reports the peer). `offer_page` builds the page a server answers; `check_offer` is the asker's check that an offer
answers its query, raising `UnsolicitedChainOffer` or `MalformedChainOffer` (both `RemoteProtocolError`s naming
the peer). Whether the chain *verifies* is not decided here (`consensus.certified_offer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consensus.messages import Certificate, check_members
from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.swarm_id import MAX_SWARM_ID_CHARS, SWARM_ID_RULE, is_valid_swarm_id

OFFER_VERSION = 1
MAX_CERTIFICATES_PER_OFFER = 256
"""Certificates in one page of an offer."""
MAX_OFFER_PAGE_BYTES = 3 * 1024 * 1024
"""Encoded certificates in one page (below the chunk protocol's ~4.1 MiB limit, with room for the genesis members:
1,024 keys of 32 bytes at most)."""

_PAGE_SCHEMA = Schema("chain-offer-page", {1: Certificate})


def _check_common(version: int, swarm_id: str) -> None:
    if version != OFFER_VERSION:
        raise ValueError(f"chain offer messages of version {OFFER_VERSION} only, got {version}")
    if not is_valid_swarm_id(swarm_id):
        raise ValueError(f"swarm_id must be {SWARM_ID_RULE}, got {swarm_id[: MAX_SWARM_ID_CHARS + 1]!r}")


@dataclass(frozen=True)
class ChainQuery:
    """Send me your certified chain from `from_epoch` on (see the module docstring)."""

    version: int
    swarm_id: str
    from_epoch: int

    def __post_init__(self) -> None:
        _check_common(self.version, self.swarm_id)
        if not 1 <= self.from_epoch < 2**63:
            raise ValueError(f"from_epoch must be in [1, 2**63), got {self.from_epoch}")


@dataclass(frozen=True)
class ChainOffer:
    """One page of the server's chain of `newest_epoch` epochs, whose epoch `body_epoch` it serves the body of (see
    the module docstring)."""

    version: int
    swarm_id: str
    genesis_members: tuple[bytes, ...]
    newest_epoch: int
    body_epoch: int
    certificates: tuple[Certificate, ...]

    def __post_init__(self) -> None:
        _check_common(self.version, self.swarm_id)
        check_members(self.genesis_members)
        if not 0 <= self.newest_epoch < 2**63:
            raise ValueError(f"newest_epoch must be in [0, 2**63), got {self.newest_epoch}")
        if not (1 <= self.body_epoch <= self.newest_epoch or self.body_epoch == self.newest_epoch == 0):
            raise ValueError(f"body_epoch must be in [1, newest_epoch] (or both 0), got {self.body_epoch}")
        if len(self.certificates) > MAX_CERTIFICATES_PER_OFFER:
            raise ValueError(f"at most {MAX_CERTIFICATES_PER_OFFER} certificates a page, got {len(self.certificates)}")
        epochs = [cert.epoch for cert in self.certificates]
        if epochs and epochs != list(range(epochs[0], epochs[0] + len(epochs))):
            raise ValueError("the certificates of a page must be of consecutive epochs")
        if epochs and epochs[-1] > self.newest_epoch:
            raise ValueError(f"a certificate of epoch {epochs[-1]} beyond the offered epoch {self.newest_epoch}")
        if any(cert.value.swarm_id != self.swarm_id for cert in self.certificates):
            raise ValueError("every certificate must be of the offer's swarm")


def offer_page(
    swarm_id: str, genesis_members: tuple[bytes, ...], chain: Sequence[Certificate], body_epoch: int, from_epoch: int
) -> ChainOffer:
    """The server's answer to `ChainQuery(from_epoch)` when it holds `chain` (epochs 1..N) and the body of epoch
    `body_epoch` (0: none; it then offers nothing)."""
    if not body_epoch:
        return ChainOffer(OFFER_VERSION, swarm_id, genesis_members, 0, 0, ())
    page: list[Certificate] = []
    size = 0
    for cert in chain[from_epoch - 1 : from_epoch - 1 + MAX_CERTIFICATES_PER_OFFER]:
        size += len(_PAGE_SCHEMA.encode(cert))
        if size > MAX_OFFER_PAGE_BYTES and page:
            break
        page.append(cert)
    return ChainOffer(OFFER_VERSION, swarm_id, genesis_members, len(chain), body_epoch, tuple(page))


class ChainOfferError(RemoteProtocolError):
    """A peer's chain offer breaks the protocol: the message is dropped and the peer reported."""


class UnsolicitedChainOffer(ChainOfferError):
    """An offer nobody asked this peer for, or for another swarm."""


class MalformedChainOffer(ChainOfferError):
    """An offer that does not answer the query: a page that starts elsewhere, or an empty page of a longer chain."""


def check_offer(peer: str, query: ChainQuery, offer: ChainOffer) -> None:
    """That `offer` answers `query` (see the module docstring), else `ChainOfferError`."""
    if offer.swarm_id != query.swarm_id:
        raise UnsolicitedChainOffer(peer, f"chain offer for swarm {offer.swarm_id!r}")
    if offer.newest_epoch == 0:
        if offer.certificates:
            raise MalformedChainOffer(peer, "certificates in an offer of nothing")
        return
    if offer.newest_epoch < query.from_epoch:
        raise MalformedChainOffer(peer, f"offers epoch {offer.newest_epoch}, below the asked epoch {query.from_epoch}")
    if not offer.certificates or offer.certificates[0].epoch != query.from_epoch:
        first = offer.certificates[0].epoch if offer.certificates else None
        raise MalformedChainOffer(peer, f"page starts at epoch {first}, not the asked {query.from_epoch}")
