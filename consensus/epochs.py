"""`EpochChain`: the sans-IO machine that runs a peer's epochs one after another on top of its certified chain.

One `EpochAgreement` decides one epoch; this machine strings them together for a peer that trains and
checkpoints at every epoch boundary. It holds the chain of certificates decided so far (from genesis) and knows
from it who votes in the next epoch (genesis members, then each certificate's `next_members`) and what the next
epoch's parent link is (the genesis anchor, then the value hash of the last certificate). No trio, no I/O, no clock.

- **Starting an epoch.** The host hands it `Checkpoint(epoch, round, root, model_spec_hash)` when its training
  reaches a boundary. The agreement of epoch E = len(chain) + 1 starts when the checkpoint of E is known and this
  peer is a member of E; its candidate value names that checkpoint, the parent link, the attendance of E-1 and
  the next member set (`consensus.membership.next_members`: members silent for `drop_after_missed` epochs go, and
  the equivocators the value itself proves: it carries the evidence this peer holds against members of E; in come
  the joiners whose requests it carries). A checkpoint of an earlier epoch is ignored; one of a later epoch waits
  for its turn. A machine built with a persisted `VoterState` of epoch E resumes it (same votes, never a
  conflicting one).
- **Evidence.** The first time its agreement finds a member equivocating, the machine sends the
  `EquivocationEvidence` to the epoch's other members, so that whoever proposes next can carry it; evidence
  received is verified (`verify_evidence`: the offender a member of its epoch, both votes signed) and held as if
  found here.
- **Joining.** A peer that is not a voter of the next epoch (and not banned) sends each live member of it one
  `JoinRequest` per epoch; members hold verified requests of live joiners (at most `MAX_PENDING_JOINS`) and a
  proposer puts them in its value (`joiners`).
- **Attendance.** While epoch L is the last certified one, the machine collects one signed vote for L's value
  from each member of L it can: the precommits of its certificate, the votes its agreement held, and the votes and
  certificates of L that arrive late (after the decision, which the first 2f+1 precommits made). The value it
  proposes for L+1 carries them (`EpochValue.attendance`), so a member that voted, however slowly, is not counted
  as silent. When the next epoch's checkpoint is already known at the decision (epochs shorter than a decision),
  its agreement starts once every member of L attended, or `vote_timeout_s` after the decision, whichever comes
  first, so that the late votes make it into the value. A peer that was no member of L (a joiner admitted by L's
  value) starts at once: no member sends it votes of L, so it would wait the whole `vote_timeout_s` for nothing,
  while the members start as soon as their late votes arrive and, being n - f of the n voters, may decide L+1
  before it starts; it then never votes in L+1 and no attendance can name it.
- **Checks.** `CheckProposal` of the agreement goes to the host (the sampled-chunk check) unless the proposal is
  plainly invalid here: another model spec; an attendance that does not verify (a non-member, a forged signature,
  fewer than a quorum: `verify_attendance`); evidence that does not prove a member of E equivocated
  (`verify_evidence`); a next member set other than the one this peer computes from the chain's attendances and
  the proposal's attendance and evidence (never from evidence only this peer holds: honest voters would disagree
  on the set, and none would then gather a quorum); or one that drops a member as silent although this peer holds
  a vote of it in those epochs (its own certificates' signers, the votes it collected). Those are answered
  `ProposalChecked(ok=False)` at once.
- **Messages.** Messages of the current epoch go to its agreement; those of a later epoch are buffered (at most
  `MAX_BUFFERED`) until it starts; a vote or proposal of an already decided epoch is answered with its
  certificate (at most once per `rebroadcast_s` per peer and epoch). A certificate for the next epoch is verified
  against the chain (members, parent link, signatures) and accepted whether or not an agreement runs: that is how
  a peer that is not a member, or whose training is behind, learns the chain. A peer whose *chain* is behind (it
  hears a message of an epoch past its next one, e.g. after a restart) asks that sender for the next epoch's
  certificate (`CertificateRequest`, at most once per `rebroadcast_s` per peer and epoch), and after accepting it
  asks for the following one while later messages wait; a request for a decided epoch is answered with its
  certificate like a late vote. Buffered messages of epochs that become decided are dropped, and so is (counted in
  `dropped`) one that proves bad when its epoch starts: its replay runs inside another event's step (a checkpoint,
  a timer), whose actions a remote error would throw away (the fault harness found an agreement started without
  its timers that way).
- **Adopting.** `AdoptChain(certificates)` (a joiner that starts from a neighbour's certified checkpoint, whose
  chain the host verified) appends the certificates beyond this chain and notifies `ChainAdopted` with them; the
  next epoch is then the one after the adopted chain's last. Buffered certificates that continue the chain (after an
  adoption, or after a certificate that arrived late) are accepted at once, in epoch order.
- **Decisions.** On a decision the certificate joins the chain, `Certified(certificate)` is notified (the host
  writes it to the chain file and fetches the body), the certificate is sent to every live peer (non-members
  learn the chain this way, and so does a member whose training skipped the epoch's boundary and that would
  otherwise never hear of it; those that decided already drop it), and the next epoch starts if its checkpoint
  is already known.

Timers of the agreement are keyed `(epoch, key)`. All actions of an agreement pass through in order, so its
`Persist` still comes before the sends it covers.
"""

from __future__ import annotations

import math
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
from consensus.certificate import verify_attendance, verify_certificate, verify_evidence
from consensus.errors import AttendanceError, CertificateError, EvidenceError
from consensus.membership import MembershipPolicy, missed_epochs, next_members
from consensus.messages import (
    JOIN_REQUEST_MAX_AGE_EPOCHS,
    MAX_EVIDENCE,
    MAX_JOINERS,
    PRECOMMIT,
    Attendance,
    Certificate,
    CertificateRequest,
    EpochValue,
    EquivocationEvidence,
    JoinRequest,
    Proposal,
    Vote,
    members_hash,
)
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

_ATTENDANCE_TIMER = "attendance"
MAX_BUFFERED = 1024
"""Messages of later epochs held until their epoch starts; more are dropped (they are re-sent)."""
MAX_PENDING_JOINS = 256
"""Join requests held for the next value; requests of further joiners are dropped (they are re-sent each epoch)."""


@dataclass(frozen=True)
class Checkpoint(Command):
    """This peer's checkpoint of epoch `epoch`'s boundary: training round `round`, Merkle root `root`."""

    epoch: int
    round: int
    root: bytes
    model_spec_hash: bytes


@dataclass(frozen=True)
class AdoptChain(Command):
    """Certificates of epochs 1..E the host verified (`consensus.certified_offer`: from genesis or a trusted hash) for
    a joiner that starts from epoch E's certified checkpoint; those beyond this chain continue it."""

    certificates: tuple[Certificate, ...]


@dataclass(frozen=True)
class ChainAdopted:
    """`certificates` joined the chain by `AdoptChain` (the host appends them to its chain file)."""

    certificates: tuple[Certificate, ...]


@dataclass(frozen=True)
class Certified:
    """Epoch `certificate.epoch` is final; `members` voted in it."""

    certificate: Certificate
    members: tuple[bytes, ...]


def _epoch_of(msg: object) -> int | None:
    if isinstance(msg, Vote | CertificateRequest | JoinRequest):
        return msg.epoch
    if isinstance(msg, Proposal | Certificate):
        return msg.value.epoch
    return None


def _is_certificate_of(msg: object, epoch: int) -> bool:
    return isinstance(msg, Certificate) and msg.value.epoch == epoch


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
        self._asked: dict[tuple[PeerId, int], float] = {}
        self._live: set[PeerId] = set()
        self._evidence: dict[bytes, EquivocationEvidence] = {}  # offender -> the first proof found here
        self._join_requests: dict[bytes, JoinRequest] = {}  # joiner -> its newest verified request
        self._join_sent: dict[PeerId, int] = {}  # member's peer -> the epoch of the last request sent to it
        self.agreement: EpochAgreement | None = None
        self.dropped = 0
        self._attendance: dict[bytes, Attendance] = {}  # who took part in the last certified epoch
        self._certified_at = -math.inf  # when the last epoch was certified here (before a restart: long ago)
        if self.chain:
            for vote in self._certificate_votes(self.chain[-1]):
                self._attend(vote)

    # ---- what the chain says ------------------------------------------------------------------------------------

    @property
    def next_epoch(self) -> int:
        return len(self.chain) + 1

    def members_of_next(self) -> tuple[bytes, ...]:
        return self.chain[-1].next_members if self.chain else self.genesis.members

    def parent_of_next(self) -> bytes:
        return self.chain[-1].value.hash() if self.chain else self.genesis.parent_hash

    def members_of(self, epoch: int) -> tuple[bytes, ...]:
        """Who votes in `epoch`, from 1 to the next epoch."""
        return self.genesis.members if epoch == 1 else self.chain[epoch - 2].next_members

    def attendance(self) -> tuple[Attendance, ...]:
        """Who this peer can prove took part in the last certified epoch (empty before the first), by key: what its
        value of the next epoch carries."""
        return tuple(self._attendance[key] for key in sorted(self._attendance))

    def parent_of(self, epoch: int) -> bytes | None:
        """The parent link of `epoch` on this chain (None beyond the next epoch)."""
        if epoch == 1:
            return self.genesis.parent_hash
        return self.chain[epoch - 2].value.hash() if epoch - 2 < len(self.chain) else None

    def banned(self) -> frozenset[bytes]:
        """The keys the chain's values prove equivocated: they never vote again."""
        return frozenset(key for cert in self.chain for key in cert.value.offenders)

    def joiners(self) -> tuple[JoinRequest, ...]:
        """The join requests this peer's value of the next epoch carries: of live non-members, not banned, made for
        the next epoch or the one before on this chain (at most `MAX_JOINERS`, by joiner)."""
        epoch = self.next_epoch
        members = set(self.members_of_next()) | self.banned()
        held = [
            request
            for key, request in sorted(self._join_requests.items())
            if key not in members
            and epoch - JOIN_REQUEST_MAX_AGE_EPOCHS <= request.epoch <= epoch
            and self.peer_of_key(key) in self._live
        ]
        return tuple(held[:MAX_JOINERS])

    def evidence(self) -> tuple[EquivocationEvidence, ...]:
        """The proofs of equivocation this peer holds against members of the next epoch (at most `MAX_EVIDENCE`, by
        offender): what its value of the next epoch carries."""
        members = set(self.members_of_next())
        held = [self._evidence[key] for key in sorted(self._evidence) if key in members]
        return tuple(held[:MAX_EVIDENCE])

    def expected_next_members(
        self,
        attendance: tuple[Attendance, ...],
        evidence: tuple[EquivocationEvidence, ...],
        joiners: tuple[JoinRequest, ...] = (),
    ) -> tuple[bytes, ...]:
        """The member set after the next epoch, for a next value that carries `attendance`, `evidence` and
        `joiners`."""
        members = self.members_of_next()
        k = self.policy.drop_after_missed
        # epoch j's attendance is in epoch j+1's value: the chain's values hold it for all but the last epoch
        window = [
            (self.members_of(cert.epoch - 1), cert.value.attendees)
            for cert in self.chain[max(1, len(self.chain) - k + 1) :]
        ]
        if self.chain:
            window.append((self.members_of(len(self.chain)), frozenset(entry.voter for entry in attendance)))
        missed = missed_epochs(members, window)
        banned = sorted(self.banned() | {proof.offender for proof in evidence})
        keys = [request.joiner for request in joiners]
        return next_members(self.policy, members, self.parent_of_next(), missed, keys, banned)

    def _seen_in_window(self) -> set[bytes]:
        """Members of whom this peer holds a vote in the epochs the silence rule looks at."""
        seen = set(self._attendance)
        for cert in self.chain[-self.policy.drop_after_missed :]:
            seen.update(cert.signers)
        return seen

    # ---- the machine --------------------------------------------------------------------------------------------

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Checkpoint):
            if event.epoch >= self.next_epoch:
                self._checkpoints[event.epoch] = event
            return self._maybe_start(now)
        if isinstance(event, Received):
            return self._received(now, event.peer, event.msg)
        if isinstance(event, AdoptChain):
            return self._adopt(now, event.certificates)
        if isinstance(event, TimerFired):
            key = event.key
            if key == (_ATTENDANCE_TIMER, self.next_epoch):
                return self._maybe_start(now)
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
            return self._ask_to_join()
        if isinstance(event, PeerDown):
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
        last_members = self.members_of(len(self.chain)) if self.chain else ()
        # only members of the last epoch are sent its votes: a peer that was none (a joiner in its first epoch) has
        # all the attendance it will get from the certificates, and waiting would only make it the last to start
        if self.signer.public_key in last_members and len(self._attendance) < len(last_members):
            wait_until = self._certified_at + self.config.vote_timeout_s
            if now < wait_until:  # late votes of the last epoch are still on their way
                return [SetTimer((_ATTENDANCE_TIMER, epoch), wait_until)]
        attendance = self.attendance()
        evidence = self.evidence()
        joiners = self.joiners()
        following = self.expected_next_members(attendance, evidence, joiners)
        value = EpochValue(
            self.swarm_id,
            epoch,
            checkpoint.round,
            checkpoint.root,
            checkpoint.model_spec_hash,
            members_hash(following),
            self.parent_of_next(),
            attendance,
            evidence,
            joiners,
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
            try:
                actions.extend(self._received(now, peer, msg))
            except RemoteProtocolError:
                self.dropped += 1  # a bad buffered message must not cost this step its actions (the start's timers)
        return actions

    def _received(self, now: float, peer: PeerId, msg: object) -> list[Action]:
        if isinstance(msg, EquivocationEvidence):
            return self._evidence_received(peer, msg)
        epoch = _epoch_of(msg)
        if epoch is None:
            raise RemoteProtocolError(peer, f"{type(msg).__name__} is not a consensus message")
        if isinstance(msg, JoinRequest):
            self._on_join_request(peer, msg)
            return []
        if isinstance(msg, CertificateRequest):
            if msg.swarm_id != self.swarm_id:
                raise RemoteProtocolError(peer, f"certificate request of swarm {msg.swarm_id!r}")
            if epoch > len(self.chain):
                return []  # not decided here (yet): nothing to send, nothing to buffer
        if 1 <= epoch <= len(self.chain):
            started: list[Action] = []
            if epoch == len(self.chain):
                self._late(peer, msg)
                if len(self._attendance) == len(self.members_of(epoch)):
                    started = self._maybe_start(now)
            if isinstance(msg, Certificate):
                return started
            last = self._answered.get((peer, epoch))
            if last is not None and now < last + self.config.rebroadcast_s:
                return started
            self._answered[(peer, epoch)] = now
            return [Send(peer, self.chain[epoch - 1]), *started]
        if epoch == self.next_epoch:
            if self.agreement is not None and self.agreement.epoch == epoch:
                return self._run(now, Received(peer, msg))
            if isinstance(msg, Certificate):
                return self._accept_certificate(now, peer, msg) + self._replay_certificates(now)
        if epoch >= self.next_epoch:
            if len(self._buffered) < MAX_BUFFERED:
                self._buffered.append((peer, msg))
            else:
                self.dropped += 1
        if epoch > self.next_epoch:  # the sender is past an epoch this chain lacks: ask it for the certificate
            return self._ask(now, peer)
        return []

    def _evidence_received(self, peer: PeerId, evidence: EquivocationEvidence) -> list[Action]:
        """Another member's proof that a member equivocated: verified, it is one this peer's values carry."""
        epoch = evidence.first.epoch
        if evidence.first.swarm_id != self.swarm_id:
            raise RemoteProtocolError(peer, f"equivocation evidence of swarm {evidence.first.swarm_id!r}")
        if evidence.offender in self._evidence or not 1 <= epoch <= self.next_epoch:
            return []  # known, or of an epoch whose members this chain does not know yet
        try:
            verify_evidence(evidence, self.members_of(epoch), self.verifier)
        except EvidenceError as exc:
            raise RemoteProtocolError(peer, f"bad equivocation evidence: {exc}") from exc
        self._evidence[evidence.offender] = evidence
        return [Notify(EquivocationFound(evidence))]

    def _on_join_request(self, peer: PeerId, request: JoinRequest) -> None:
        """Hold a joiner's request for the next value: only from the joiner itself, signed, on this chain, for the
        next epoch or the one before; requests of members, of banned keys and of other epochs are ignored."""
        if request.swarm_id != self.swarm_id:
            raise RemoteProtocolError(peer, f"join request of swarm {request.swarm_id!r}")
        if self.peer_of_key(request.joiner) != peer:
            raise RemoteProtocolError(peer, "a join request for another peer's key")
        if not self.verifier.join_request(request):
            raise RemoteProtocolError(peer, "bad signature on a join request")
        epoch = self.next_epoch
        if not epoch - JOIN_REQUEST_MAX_AGE_EPOCHS <= request.epoch <= epoch:
            return  # a joiner behind or ahead of this chain: it asks again at its next certificate
        if request.parent != self.parent_of(request.epoch):
            raise RemoteProtocolError(peer, f"a join request on another chain (epoch {request.epoch})")
        if request.joiner in self.members_of_next() or request.joiner in self.banned():
            return
        held = self._join_requests.get(request.joiner)
        if held is None and len(self._join_requests) >= MAX_PENDING_JOINS:
            self.dropped += 1
            return
        if held is None or held.epoch < request.epoch:
            self._join_requests[request.joiner] = request

    def _ask_to_join(self) -> list[Action]:
        """A non-member (not banned) asks each live member of the next epoch, once per epoch, to admit it."""
        key = self.signer.public_key
        members = self.members_of_next()
        if key in members or key in self.banned():
            return []
        epoch = self.next_epoch
        parent = self.parent_of_next()
        actions: list[Action] = []
        for peer in sorted({self.peer_of_key(m) for m in members} & self._live):
            if self._join_sent.get(peer) != epoch:
                self._join_sent[peer] = epoch
                actions.append(Send(peer, self.signer.join_request(self.swarm_id, epoch, parent)))
        return actions

    def _ask(self, now: float, peer: PeerId) -> list[Action]:
        """A `CertificateRequest` for the next epoch to `peer`, at most once per `rebroadcast_s` per peer and epoch."""
        key = (peer, self.next_epoch)
        last = self._asked.get(key)
        if last is not None and now < last + self.config.rebroadcast_s:
            return []
        self._asked = {k: t for k, t in self._asked.items() if k[1] >= self.next_epoch}
        self._asked[key] = now
        return [Send(peer, CertificateRequest(self.swarm_id, self.next_epoch))]

    def _accept_certificate(self, now: float, peer: PeerId, cert: Certificate) -> list[Action]:
        if cert.value.swarm_id != self.swarm_id:
            raise RemoteProtocolError(peer, f"certificate of swarm {cert.value.swarm_id!r}")
        members = self.members_of_next()
        try:
            verify_certificate(cert, members, self.parent_of_next(), self.verifier, epoch=self.next_epoch)
        except CertificateError as exc:
            raise RemoteProtocolError(peer, f"bad certificate: {exc}") from exc
        actions = self._certified(now, cert, members)
        if any((_epoch_of(msg) or 0) > self.next_epoch for _, msg in self._buffered):
            actions += self._ask(now, peer)  # still behind: the next one, from the peer that had this one
        return actions

    def _certificate_votes(self, cert: Certificate) -> list[Vote]:
        value_hash = cert.value.hash()
        return [
            Vote(self.swarm_id, cert.epoch, cert.consensus_round, PRECOMMIT, value_hash, s.member, s.signature)
            for s in cert.precommits
        ]

    def _attend(self, vote: Vote) -> None:
        """Note a verified vote for the last certified value (the first one of each member is kept)."""
        if vote.voter not in self._attendance:
            self._attendance[vote.voter] = Attendance(vote.voter, vote.consensus_round, vote.phase, vote.signature)

    def _late(self, peer: PeerId, msg: object) -> None:
        """A vote or certificate of the last certified epoch: note the members it proves took part."""
        last = self.chain[-1]
        value_hash = last.value.hash()
        if isinstance(msg, Vote):
            votes = [msg]
        elif isinstance(msg, Certificate) and msg.value.hash() == value_hash:
            votes = self._certificate_votes(msg)
        else:
            return
        members = set(self.members_of(last.epoch))
        for vote in votes:
            if (
                vote.swarm_id != self.swarm_id
                or vote.value_hash != value_hash
                or vote.voter in self._attendance
                or vote.voter not in members
            ):
                continue
            if not self.verifier.vote(vote):
                raise RemoteProtocolError(peer, f"bad signature on a vote of {vote.voter.hex()[:16]}")
            self._attend(vote)

    def _adopt(self, now: float, certificates: tuple[Certificate, ...]) -> list[Action]:
        new: list[Certificate] = []
        for cert in certificates:
            if cert.epoch <= len(self.chain):
                if self.chain[cert.epoch - 1].value.hash() != cert.value.hash():
                    raise LocalProtocolError(f"adopted epoch {cert.epoch} differs from the chain's")
                continue
            if cert.epoch != self.next_epoch or cert.value.parent_certificate_hash != self.parent_of_next():
                raise LocalProtocolError(f"adopted epoch {cert.epoch} does not continue the chain")
            self.chain.append(cert)
            new.append(cert)
        if not new:
            return []
        self._attendance = {}  # who took part in the adopted chain's last epoch, as far as its certificate shows
        for vote in self._certificate_votes(new[-1]):
            self._attend(vote)
        self._checkpoints = {e: c for e, c in self._checkpoints.items() if e > new[-1].epoch}
        if self.agreement is not None and self.agreement.epoch <= new[-1].epoch:
            self.agreement = None
        self._prune_join_requests()
        adopted: list[Action] = [Notify(ChainAdopted(tuple(new))), *self._replay_certificates(now)]
        return [*adopted, *self._ask_to_join(), *self._maybe_start(now)]

    def _replay_certificates(self, now: float) -> list[Action]:
        """Accept the buffered certificates that now continue the chain, in epoch order (with no agreement running,
        nothing else would replay them: a non-member that got epoch E+2's certificate before E+1's)."""
        actions: list[Action] = []
        while self.agreement is None or self.agreement.epoch != self.next_epoch:
            ready = [i for i, (_, m) in enumerate(self._buffered) if _is_certificate_of(m, self.next_epoch)]
            if not ready:
                break
            peer, cert = self._buffered.pop(ready[0])
            assert isinstance(cert, Certificate), "selected by _is_certificate_of"
            try:
                actions += self._accept_certificate(now, peer, cert)
            except RemoteProtocolError:
                self.dropped += 1  # a buffered certificate that does not verify on this chain
        return actions

    def _certified(self, now: float, cert: Certificate, members: tuple[bytes, ...]) -> list[Action]:
        self.chain.append(cert)
        self._certified_at = now
        self._attendance = {}
        if self.agreement is not None and self.agreement.epoch == cert.epoch:
            for vote in self.agreement.votes_for(cert.value.hash()):
                self._attend(vote)
        for vote in self._certificate_votes(cert):
            self._attend(vote)
        self._checkpoints = {e: c for e, c in self._checkpoints.items() if e > cert.epoch}
        self._buffered = [(peer, msg) for peer, msg in self._buffered if (_epoch_of(msg) or 0) > cert.epoch]
        self._prune_join_requests()
        me = self.peer_of_key(self.signer.public_key)
        actions: list[Action] = [Notify(Certified(cert, members))]
        actions += [Send(peer, cert) for peer in sorted(self._live - {me})]
        return actions + self._ask_to_join() + self._maybe_start(now)

    def _prune_join_requests(self) -> None:
        """Drop the requests no value of the next epoch may carry any more (too old, or the joiner is a member)."""
        oldest = self.next_epoch - JOIN_REQUEST_MAX_AGE_EPOCHS
        members = set(self.members_of_next())
        self._join_requests = {
            key: request
            for key, request in self._join_requests.items()
            if request.epoch >= oldest and key not in members
        }

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
                if evidence.offender not in self._evidence:
                    self._evidence[evidence.offender] = evidence
                    me = self.signer.public_key  # the other members may propose before this peer does
                    out += [Send(self.peer_of_key(m), evidence) for m in agreement.members if m != me]
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
        else:
            reason = self._membership_problem(proposal)
        if reason is None:
            return None
        return ProposalChecked(value.epoch, value.hash(), False, reason)

    def _membership_problem(self, proposal: Proposal) -> str | None:
        """Why `proposal`'s attendance or next member set is wrong here, or None."""
        value = proposal.value
        try:
            verify_attendance(value, self.members_of(value.epoch - 1) if value.epoch > 1 else (), self.verifier)
        except AttendanceError as exc:
            return f"attendance: {exc}"
        for proof in value.evidence:
            try:
                verify_evidence(proof, self.members_of(value.epoch), self.verifier)
            except EvidenceError as exc:
                return f"evidence: {exc}"
        members = set(self.members_of(value.epoch)) | self.banned()
        for request in value.joiners:
            if request.joiner in members:
                return f"join request of member or banned key {request.joiner.hex()[:16]}"
            if request.parent != self.parent_of(request.epoch) or not self.verifier.join_request(request):
                return f"join request of {request.joiner.hex()[:16]}: not signed, or on another chain"
        if proposal.next_members != self.expected_next_members(value.attendance, value.evidence, value.joiners):
            return "a next member set other than the one this peer computes"
        dropped = set(self.members_of_next()) - set(proposal.next_members) - value.offenders
        wrongly = sorted(dropped & self._seen_in_window())
        if wrongly:
            return f"it drops member {wrongly[0].hex()[:16]} as silent, whose vote this peer holds"
        return None
