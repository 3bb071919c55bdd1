"""`EpochChain`: the sans-IO machine that runs a peer's epochs one after another on top of its certified chain.

One `EpochAgreement` decides one epoch; this machine strings them together for a peer that trains and
checkpoints at every epoch boundary. It holds the chain of certificates decided so far (from genesis) and knows
from it who votes in the next epoch (genesis members, then each certificate's `next_members`) and what the next
epoch's parent link is (the genesis anchor, then the value hash of the last certificate). No trio, no I/O, no clock.

- **Starting an epoch.** The host hands it `Checkpoint(epoch, round, root, model_spec_hash)` when its training
  reaches a boundary. The agreement of epoch E = len(chain) + 1 starts when the checkpoint of E is known and this
  peer is a member of E; its candidate value names that checkpoint, the parent link and the next member set
  (`consensus.membership.next_members`: members silent for `drop_after_missed` epochs or proven equivocators go; no
  joiners yet). A checkpoint of an earlier epoch is ignored; one of a later epoch waits for its turn. A machine
  built with a persisted `VoterState` of epoch E resumes it (same votes, never a conflicting one).
- **Checks.** `CheckProposal` of the agreement goes to the host (the sampled-chunk check) unless the proposal is
  plainly invalid here: another model spec, or a next member set other than the one this peer computes. Those are
  answered `ProposalChecked(ok=False)` at once.
- **Messages.** Messages of the current epoch go to its agreement; those of a later epoch are buffered (at most
  `MAX_BUFFERED`) until it starts; a vote or proposal of an already decided epoch is answered with its
  certificate (at most once per `rebroadcast_s` per peer and epoch). A certificate for the next epoch is verified
  against the chain (members, parent link, signatures) and accepted whether or not an agreement runs: that is how
  a peer that is not a member, or whose training is behind, learns the chain.
- **Decisions.** On a decision the certificate joins the chain, `Certified(certificate)` is notified (the host
  writes it to the chain file and fetches the body), the certificate is sent to every live peer (non-members
  learn the chain this way, and so does a member whose training skipped the epoch's boundary and that would
  otherwise never hear of it; those that decided already drop it), and the next epoch starts if its checkpoint
  is already known.

Timers of the agreement are keyed `(epoch, key)`. All actions of an agreement pass through in order, so its
`Persist` still comes before the sends it covers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from consensus.agreement import (
    AgreementConfig,
    Candidate,
    CheckProposal,
    Decided,
    EpochAgreement,
    EquivocationFound,
    ProposalChecked,
    StartEpoch,
    VoterState,
)
from consensus.certificate import verify_certificate
from consensus.errors import CertificateError
from consensus.membership import MembershipPolicy, missed_epochs, next_members
from consensus.messages import Certificate, EpochValue, EquivocationEvidence, Proposal, Vote, members_hash
from consensus.provenance import ChainGenesis
from consensus.signing import SignatureVerifier, Signer
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Event,
    Notify,
    PeerDown,
    PeerId,
    PeerUp,
    Received,
    Send,
    SetTimer,
    TimerFired,
)

MAX_BUFFERED = 1024
"""Messages of later epochs held until their epoch starts; more are dropped (they are re-sent)."""


@dataclass(frozen=True)
class Checkpoint(Command):
    """This peer's checkpoint of epoch `epoch`'s boundary: training round `round`, Merkle root `root`."""

    epoch: int
    round: int
    root: bytes
    model_spec_hash: bytes


@dataclass(frozen=True)
class Certified:
    """Epoch `certificate.epoch` is final; `members` voted in it."""

    certificate: Certificate
    members: tuple[bytes, ...]


def _epoch_of(msg: object) -> int | None:
    if isinstance(msg, Vote):
        return msg.epoch
    if isinstance(msg, Proposal | Certificate):
        return msg.value.epoch
    return None


class EpochChain:
    """A peer's consensus over its epochs; see the module docstring."""

    def __init__(
        self,
        config: AgreementConfig,
        signer: Signer,
        genesis: ChainGenesis,
        certificates: list[Certificate],
        peer_of_key: Callable[[bytes], PeerId],
        *,
        policy: MembershipPolicy | None = None,
        verifier: SignatureVerifier | None = None,
        state: VoterState | None = None,
    ) -> None:
        self.config = config
        self.signer = signer
        self.genesis = genesis
        self.swarm_id = genesis.swarm_id
        self.policy = policy or MembershipPolicy()
        self.verifier = verifier or SignatureVerifier()
        self.peer_of_key = peer_of_key
        self.chain: list[Certificate] = list(certificates)
        self._state = state
        self._checkpoints: dict[int, Checkpoint] = {}
        self._buffered: list[tuple[PeerId, object]] = []
        self._answered: dict[tuple[PeerId, int], float] = {}
        self._live: set[PeerId] = set()
        self._equivocators: set[bytes] = set()
        self.agreement: EpochAgreement | None = None
        self.dropped = 0

    # ---- what the chain says ------------------------------------------------------------------------------------

    @property
    def next_epoch(self) -> int:
        return len(self.chain) + 1

    def members_of_next(self) -> tuple[bytes, ...]:
        return self.chain[-1].next_members if self.chain else self.genesis.members

    def parent_of_next(self) -> bytes:
        return self.chain[-1].value.hash() if self.chain else self.genesis.parent_hash

    def expected_next_members(self) -> tuple[bytes, ...]:
        members = self.members_of_next()
        k = self.policy.drop_after_missed
        missed = missed_epochs(members, [cert.signers for cert in self.chain[-k:]])
        return next_members(self.policy, members, self.parent_of_next(), missed, (), sorted(self._equivocators))

    # ---- the machine --------------------------------------------------------------------------------------------

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Checkpoint):
            if event.epoch >= self.next_epoch:
                self._checkpoints[event.epoch] = event
            return self._maybe_start(now)
        if isinstance(event, Received):
            return self._received(now, event.peer, event.msg)
        if isinstance(event, TimerFired):
            key = event.key
            if isinstance(key, tuple) and len(key) == 2 and self.agreement is not None:
                epoch, inner = key
                if epoch == self.agreement.epoch:
                    return self._run(now, TimerFired(inner))
            return []
        if isinstance(event, ProposalChecked):
            if self.agreement is not None and event.epoch == self.agreement.epoch:
                return self._run(now, event)
            return []
        if isinstance(event, PeerUp):
            self._live.add(event.peer)
        elif isinstance(event, PeerDown):
            self._live.discard(event.peer)
        return []

    def _maybe_start(self, now: float) -> list[Action]:
        epoch = self.next_epoch
        if self.agreement is not None and self.agreement.epoch == epoch:
            return []
        checkpoint = self._checkpoints.get(epoch)
        members = self.members_of_next()
        if checkpoint is None or self.signer.public_key not in members:
            return []
        following = self.expected_next_members()
        value = EpochValue(
            self.swarm_id,
            epoch,
            checkpoint.round,
            checkpoint.root,
            checkpoint.model_spec_hash,
            members_hash(following),
            self.parent_of_next(),
        )
        state = self._state if self._state is not None and self._state.epoch == epoch else None
        self.agreement = EpochAgreement(
            self.config,
            self.signer,
            members,
            {key: self.peer_of_key(key) for key in members},
            Candidate(value, following),
            verifier=self.verifier,
            state=state,
        )
        actions = self._run(now, StartEpoch())
        held, self._buffered = self._buffered, []
        for peer, msg in held:
            actions.extend(self._received(now, peer, msg))
        return actions

    def _received(self, now: float, peer: PeerId, msg: object) -> list[Action]:
        epoch = _epoch_of(msg)
        if epoch is None:
            raise RemoteProtocolError(peer, f"{type(msg).__name__} is not a consensus message")
        if 1 <= epoch <= len(self.chain):
            if isinstance(msg, Certificate):
                return []
            last = self._answered.get((peer, epoch))
            if last is not None and now < last + self.config.rebroadcast_s:
                return []
            self._answered[(peer, epoch)] = now
            return [Send(peer, self.chain[epoch - 1])]
        if epoch == self.next_epoch:
            if self.agreement is not None and self.agreement.epoch == epoch:
                return self._run(now, Received(peer, msg))
            if isinstance(msg, Certificate):
                return self._accept_certificate(now, peer, msg)
        if epoch >= self.next_epoch:
            if len(self._buffered) < MAX_BUFFERED:
                self._buffered.append((peer, msg))
            else:
                self.dropped += 1
        return []

    def _accept_certificate(self, now: float, peer: PeerId, cert: Certificate) -> list[Action]:
        if cert.value.swarm_id != self.swarm_id:
            raise RemoteProtocolError(peer, f"certificate of swarm {cert.value.swarm_id!r}")
        members = self.members_of_next()
        try:
            verify_certificate(cert, members, self.parent_of_next(), self.verifier, epoch=self.next_epoch)
        except CertificateError as exc:
            raise RemoteProtocolError(peer, f"bad certificate: {exc}") from exc
        return self._certified(now, cert, members)

    def _certified(self, now: float, cert: Certificate, members: tuple[bytes, ...]) -> list[Action]:
        self.chain.append(cert)
        self._checkpoints = {e: c for e, c in self._checkpoints.items() if e > cert.epoch}
        me = self.peer_of_key(self.signer.public_key)
        actions: list[Action] = [Notify(Certified(cert, members))]
        actions += [Send(peer, cert) for peer in sorted(self._live - {me})]
        return actions + self._maybe_start(now)

    def _run(self, now: float, event: Event) -> list[Action]:
        agreement = self.agreement
        if agreement is None:
            raise LocalProtocolError("no agreement is running")
        epoch = agreement.epoch
        out: list[Action] = []
        decided: Certificate | None = None
        refused: list[ProposalChecked] = []
        for action in agreement.step(now, event):
            if isinstance(action, SetTimer):
                out.append(SetTimer((epoch, action.key), action.deadline))
            elif isinstance(action, CancelTimer):
                out.append(CancelTimer((epoch, action.key)))
            elif isinstance(action, CheckProposal):
                verdict = self._check(action)
                if verdict is None:
                    out.append(action)
                else:
                    refused.append(verdict)
            elif isinstance(action, Notify) and isinstance(action.event, Decided):
                decided = action.event.certificate
            elif isinstance(action, Notify) and isinstance(action.event, EquivocationFound):
                evidence: EquivocationEvidence = action.event.evidence
                self._equivocators.add(evidence.offender)
                out.append(action)
            else:
                out.append(action)
        if decided is not None:
            return out + self._certified(now, decided, agreement.members)
        for verdict in refused:
            out.extend(self._run(now, verdict))
        return out

    def _check(self, action: CheckProposal) -> ProposalChecked | None:
        """The refusal of a plainly invalid proposal; None: the host's sampled-chunk check decides."""
        proposal = action.proposal
        value = proposal.value
        own = self._checkpoints.get(value.epoch)
        reason = None
        if own is not None and value.model_spec_hash != own.model_spec_hash:
            reason = "another model spec"
        elif proposal.next_members != self.expected_next_members():
            reason = "a next member set other than the one this peer computes"
        if reason is None:
            return None
        return ProposalChecked(value.epoch, value.hash(), False, reason)
