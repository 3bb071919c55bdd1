"""`CertifiedJoin`: a joiner with no checkpoint starts from a neighbour's newest certified checkpoint. No I/O.

The sans-IO machine of both sides of the join, on the chunk protocol (messages `consensus.chain_offer`, body
chunks `consensus.chunks`); `consensus.chunk_exchange` routes its messages to it.

**Asking.** `JoinCertified(peers, chunk_count, own, checks)` asks the `peers` one at a time, in peer id order:

1. *Chain.* `ChainQuery(from_epoch=1)`, then the next page until the offer's newest epoch is reached; each page
   has `timeout_s` to come. A neighbour that has nothing certified (newest epoch 0) is passed over, so is one that
   stays silent, goes down or cannot be sent the query (`SendFailed`). An offer that does not answer the query,
   that changes its genesis between pages, or whose chain differs from `own` (the certificates this peer already
   holds) is refused.
2. *Verify.* `checks.chain(peer, genesis, certificates)` as a `Compute` (signatures: worker-thread work): None, or
   the reason it is refused (a forged signature, a chain that does not lead from genesis or the trusted hash, ...).
3. *Body.* The `chunk_count` chunks of the certified checkpoint whose body the offer serves (its `body_epoch`,
   which may lag the chain's last epoch) from the same neighbour, by an embedded `BodyFetch` (every chunk's proof
   checked against the certified root; a bad proof refuses the neighbour).
4. *Check.* `checks.body(peer, genesis, certificates up to the body's epoch, body)` as a `Compute`: the
   `CertifiedCheckpoint`, or the reason it is refused (a body that does not decode for the task or is not the
   certified root's).

A refusal notifies `JoinOfferRefused(peer, reason, misbehaved)` (`misbehaved`: it sent something wrong, not
merely nothing) and the next neighbour is asked. The join ends with one of `Joined(peer, genesis, certificates,
checkpoint)`, `NothingCertified(peers)` (no neighbour offered a certified checkpoint: they answered that they have
none, stayed silent or do not speak the protocol; the host may fall back to an uncertified start) or
`JoinFailed(reasons)` (some neighbour offered one, and none checked out; one (peer, reason) per neighbour).

**Serving.** `HoldChain(genesis, certificates, body_epoch, tree)` sets what this peer offers: its genesis, its
chain, and the tree of the newest certified checkpoint whose body it keeps (the host sends it again as either
grows). A `ChainQuery` is answered at once with
`consensus.chain_offer.offer_page`, a `ChunkRequest` for that body with `consensus.chunks.serve` (held here, not
among the sample fetch's trees, so that newer checkpoints never evict it while it is offered); before any
`HoldChain`, queries are not answered.

Timers are keyed `("certified-join", n)`, computations `("certified-join", n, phase)`, n counting the neighbours
asked. No clock, no randomness, no logging above DEBUG.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from consensus.body_fetch import BodyFailed, BodyFetch, BodyFetchConfig, BodyFetched, BodyPeerFailed, FetchBody
from consensus.certified_offer import CertifiedCheckpoint
from consensus.chain_offer import OFFER_VERSION, ChainOffer, ChainOfferError, ChainQuery, check_offer, offer_page
from consensus.chunks import ChunkRequest, serve
from consensus.merkle import CheckpointTree
from consensus.messages import Certificate
from consensus.provenance import ChainGenesis
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Compute,
    Computed,
    Event,
    Notify,
    PeerDown,
    PeerId,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)
from swarmgrad.core.swarm_id import validate_swarm_id

_NAME = "certified-join"


class OfferChecks(Protocol):
    """The host's checks of an offer (both run as `Compute`s: they may take long, and touch nothing of the
    machine's)."""

    def chain(self, peer: PeerId, genesis: ChainGenesis, certificates: tuple[Certificate, ...]) -> str | None:
        """None when the chain verifies for this swarm and task, else why not (one line)."""
        ...

    def body(
        self, peer: PeerId, genesis: ChainGenesis, certificates: tuple[Certificate, ...], body: bytes
    ) -> CertifiedCheckpoint | str:
        """The checked checkpoint of the last certificate, or why `body` is refused (one line)."""
        ...


@dataclass(frozen=True)
class CertifiedJoinConfig:
    swarm_id: str
    timeout_s: float = 5.0
    """How long one neighbour has to answer one page of its chain."""

    def __post_init__(self) -> None:
        validate_swarm_id(self.swarm_id)
        if not 0 < self.timeout_s < float("inf"):
            raise LocalProtocolError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")


@dataclass(frozen=True, eq=False)
class JoinCertified(Command):
    """Join from the newest certified checkpoint of one of `peers` (see the module docstring)."""

    peers: tuple[PeerId, ...]
    chunk_count: int
    own: tuple[Certificate, ...]
    checks: OfferChecks


@dataclass(frozen=True, eq=False)
class HoldChain(Command):
    """Offer `certificates` (epochs 1..N, this peer's chain) and serve `tree`, the body of epoch `body_epoch`'s
    certified checkpoint (`body_epoch` 0 and `tree` None: this peer offers nothing)."""

    genesis: ChainGenesis
    certificates: tuple[Certificate, ...]
    body_epoch: int = 0
    tree: CheckpointTree | None = None


@dataclass(frozen=True)
class JoinOfferRefused:
    """`peer`'s offer was not taken: `reason`; `misbehaved` when it sent something wrong (not merely nothing)."""

    peer: PeerId
    reason: str
    misbehaved: bool


@dataclass(frozen=True, eq=False)
class Joined:
    """`peer`'s certified checkpoint checked out: its whole chain (verified) and the checkpoint of the offered
    body's epoch (`checkpoint.certificate`, at or before the chain's last epoch)."""

    peer: PeerId
    genesis: ChainGenesis
    certificates: tuple[Certificate, ...]
    checkpoint: CertifiedCheckpoint


@dataclass(frozen=True)
class NothingCertified:
    """No neighbour offered a certified checkpoint (those that answered have none)."""

    peers: tuple[PeerId, ...]


@dataclass(frozen=True)
class JoinFailed:
    """No neighbour gave a checkpoint that checked out; one (peer, reason) per neighbour asked."""

    reasons: tuple[tuple[PeerId, str], ...]


@dataclass
class _Join:
    command: JoinCertified
    queue: list[PeerId]
    reasons: list[tuple[PeerId, str]] = field(default_factory=list)
    offered: bool = False
    serial: int = 0
    peer: PeerId = ""
    phase: str = "chain"
    query: ChainQuery | None = None
    genesis_members: tuple[bytes, ...] = ()
    newest: int = 0
    body_epoch: int = 0
    certificates: list[Certificate] = field(default_factory=list)


class CertifiedJoin:
    """Joins from certified state and serves this peer's; see the module docstring."""

    def __init__(self, config: CertifiedJoinConfig, body: BodyFetchConfig) -> None:
        if body.swarm_id != config.swarm_id:
            raise LocalProtocolError("the body fetch must be of the join's swarm")
        self.config = config
        self.body = BodyFetch(body)
        self._join: _Join | None = None
        self._held: HoldChain | None = None

    def expects(self, peer: PeerId, msg: object) -> bool:
        """Whether `msg` is this machine's: a chain message, a request for chunks of the body it offers, or an
        answer to its body fetch."""
        return isinstance(msg, ChainQuery | ChainOffer) or self._serves(msg) or self.body.expects(peer, msg)

    def _serves(self, msg: object) -> bool:
        held = self._held
        if not isinstance(msg, ChunkRequest) or held is None or held.tree is None:
            return False
        return (msg.swarm_id, msg.epoch, msg.root) == (self.config.swarm_id, held.body_epoch, held.tree.root)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, JoinCertified):
            return self._start(now, event)
        if isinstance(event, HoldChain):
            if event.genesis.swarm_id != self.config.swarm_id:
                raise LocalProtocolError(f"a chain of swarm {event.genesis.swarm_id!r}")
            if (event.tree is None) != (event.body_epoch == 0) or event.body_epoch > len(event.certificates):
                raise LocalProtocolError(
                    f"a body of epoch {event.body_epoch} beside a chain of {len(event.certificates)}"
                )
            self._held = event
            return []
        if isinstance(event, Received):
            if isinstance(event.msg, ChainQuery):
                return self._serve(event.peer, event.msg)
            if isinstance(event.msg, ChainOffer):
                return self._offered(now, event.peer, event.msg)
            if self._serves(event.msg):
                assert self._held is not None and isinstance(event.msg, ChunkRequest), "checked by _serves"
                return [Send(event.peer, serve(event.msg, self._held.tree))]
            return self._body(now, event)
        if isinstance(event, Computed):
            return self._computed(now, event)
        if isinstance(event, TimerFired):
            join = self._join
            if join is not None and event.key == (_NAME, join.serial) and join.phase == "chain":
                return self._refuse(now, f"no answer to its chain query in {self.config.timeout_s} s", False)
            return self._body(now, event)
        if isinstance(event, PeerDown | SendFailed):
            join = self._join
            if join is not None and join.peer == event.peer and join.phase == "chain":
                why = "peer disconnected" if isinstance(event, PeerDown) else f"query not sent: {event.reason}"
                return [CancelTimer((_NAME, join.serial)), *self._refuse(now, why, False)]
            return self._body(now, event) if isinstance(event, PeerDown) else []
        return []

    # ---- serving ------------------------------------------------------------------------------------------------

    def _serve(self, peer: PeerId, query: ChainQuery) -> list[Action]:
        held = self._held
        if held is None or query.swarm_id != self.config.swarm_id:
            return []
        offer = offer_page(
            self.config.swarm_id, held.genesis.members, held.certificates, held.body_epoch, query.from_epoch
        )
        return [Send(peer, offer)]

    # ---- asking -------------------------------------------------------------------------------------------------

    def _start(self, now: float, command: JoinCertified) -> list[Action]:
        if self._join is not None:
            raise LocalProtocolError("a certified join is already running")
        if command.chunk_count < 1:
            raise LocalProtocolError(f"chunk_count must be >= 1, got {command.chunk_count}")
        self._join = _Join(command, sorted(set(command.peers)))
        return self._next(now)

    def _next(self, now: float) -> list[Action]:
        join = self._join
        assert join is not None, "called only while joining"
        if not join.queue:
            self._join = None
            if not join.offered:
                return [Notify(NothingCertified(tuple(peer for peer, _ in join.reasons)))]
            return [Notify(JoinFailed(tuple(join.reasons)))]
        join.serial += 1
        join.peer = join.queue.pop(0)
        join.phase = "chain"
        join.genesis_members, join.newest, join.body_epoch, join.certificates = (), 0, 0, []
        return self._ask(now, 1)

    def _ask(self, now: float, from_epoch: int) -> list[Action]:
        join = self._join
        assert join is not None, "called only while joining"
        join.query = ChainQuery(OFFER_VERSION, self.config.swarm_id, from_epoch)
        deadline = now + self.config.timeout_s
        return [Send(join.peer, join.query, deadline=deadline), SetTimer((_NAME, join.serial), deadline)]

    def _refuse(self, now: float, reason: str, misbehaved: bool) -> list[Action]:
        join = self._join
        assert join is not None, "called only while joining"
        join.reasons.append((join.peer, reason))
        return [Notify(JoinOfferRefused(join.peer, reason, misbehaved)), *self._next(now)]

    def _offered(self, now: float, peer: PeerId, offer: ChainOffer) -> list[Action]:
        join = self._join
        if join is None or join.phase != "chain" or peer != join.peer or join.query is None:
            return []  # a late answer of a neighbour already passed over: nothing to blame it for
        actions: list[Action] = [CancelTimer((_NAME, join.serial))]
        try:
            check_offer(peer, join.query, offer)
        except ChainOfferError as exc:
            return actions + self._refuse(now, exc.reason, True)
        first_page = join.query.from_epoch == 1
        if offer.newest_epoch == 0:
            if not first_page:
                return actions + self._refuse(now, "offered nothing after a first page", True)
            return actions + self._refuse(now, "has no certified checkpoint yet", False)
        join.offered = True
        if first_page:
            join.genesis_members = offer.genesis_members
        elif offer.genesis_members != join.genesis_members:
            return actions + self._refuse(now, "changed its genesis members between pages", True)
        join.newest, join.body_epoch = offer.newest_epoch, offer.body_epoch
        join.certificates.extend(offer.certificates)
        if len(join.certificates) < join.newest:
            return actions + self._ask(now, len(join.certificates) + 1)
        own = join.command.own
        for mine, theirs in zip(own, join.certificates, strict=False):
            if mine.value.hash() != theirs.value.hash():
                return actions + self._refuse(now, f"its epoch {mine.epoch} differs from our chain's", True)
        try:
            genesis = ChainGenesis(self.config.swarm_id, join.genesis_members)
        except ValueError as exc:
            return actions + self._refuse(now, f"its genesis record is invalid: {exc}", True)
        join.phase = "verify"
        certificates = tuple(join.certificates)
        work = partial(join.command.checks.chain, peer, genesis, certificates)
        return [*actions, Compute((_NAME, join.serial, "chain"), work)]

    def _computed(self, now: float, event: Computed) -> list[Action]:
        join = self._join
        key = event.key
        if join is None or not (isinstance(key, tuple) and len(key) == 3 and key[:2] == (_NAME, join.serial)):
            return []
        genesis = ChainGenesis(self.config.swarm_id, join.genesis_members)
        certificates = tuple(join.certificates)
        if key[2] == "chain" and join.phase == "verify":
            if event.result is not None:
                return self._refuse(now, str(event.result), True)
            join.phase = "body"
            body = certificates[join.body_epoch - 1]
            fetch = FetchBody(body.epoch, body.value.checkpoint_root, join.command.chunk_count, (join.peer,))
            return self._body(now, fetch)
        if key[2] == "body" and join.phase == "check":
            result = event.result
            if not isinstance(result, CertifiedCheckpoint):
                return self._refuse(now, str(result), True)
            self._join = None
            return [Notify(Joined(join.peer, genesis, certificates, result))]
        raise LocalProtocolError(f"a computation {key!r} in phase {join.phase}")

    def _body(self, now: float, event: Event) -> list[Action]:
        """Step the embedded body fetch and act on what it notifies."""
        out: list[Action] = []
        failure: BodyPeerFailed | None = None
        for action in self.body.step(now, event):
            if not isinstance(action, Notify):
                out.append(action)
                continue
            note = action.event
            join = self._join
            if join is None or join.phase != "body":
                continue  # a fetch of a join that has ended
            if isinstance(note, BodyPeerFailed):
                failure = note
            elif isinstance(note, BodyFailed):
                why = failure.reason if failure is not None else "; ".join(reason for _, reason in note.reasons)
                out += self._refuse(now, f"body: {why}", failure is not None and failure.misbehaved)
            elif isinstance(note, BodyFetched):
                join.phase = "check"
                genesis = ChainGenesis(self.config.swarm_id, join.genesis_members)
                certificates = tuple(join.certificates[: join.body_epoch])
                work = partial(join.command.checks.body, join.peer, genesis, certificates, _joined(note))
                out.append(Compute((_NAME, join.serial, "body"), work))
        return out


def _joined(note: BodyFetched) -> bytes:
    return b"".join(note.chunks)
