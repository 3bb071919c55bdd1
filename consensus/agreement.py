"""`EpochAgreement`: the sans-IO machine that decides one epoch's checkpoint. No trio, no sockets, no clock reads.

Theory of operation
===================

One `EpochAgreement` is a single-shot Byzantine agreement, in the style of Tendermint (Buchman, Kwon, Milosevic,
"The latest gossip on BFT consensus", 2018), on one `EpochValue` among the epoch's members. It runs in consensus
rounds 0, 1, 2, ...; each round has three steps:

1. **Propose.** The round's proposer (`proposer_of`: the members ordered by `sha256(parent link, key)`, then the
   round modulo n, so every member proposes once in n rounds and nobody can pick its turn before the parent is
   decided) signs a `Proposal`: its *valid value* with the round it became valid in and the 2f+1 prevotes that
   made it so, if it has one, else its own checkpoint value.
2. **Prevote.** A voter that receives the proposal asks its host to check it (`CheckProposal`: the sampled-chunk
   validity check of the training layer, seeded by the voter's own signature so the proposer cannot predict the
   sample) and prevotes the value's hash if the check passed and its lock allows it -- it is not locked, or locked
   on this value, or the proposal shows 2f+1 prevotes for it in a round at or after the lock -- else it prevotes
   nil. No proposal by the propose timeout: nil.
3. **Precommit.** 2f+1 prevotes for a checked value v in the round (a *polka*): the voter locks on v (records v and
   the round), records v as its valid value, and precommits v. 2f+1 nil prevotes, or the prevote timeout after
   2f+1 prevotes of any kind: it precommits nil.

2f+1 precommits for v in any round decide v: the machine builds a `Certificate` and notifies `Decided`. 2f+1
precommits of any kind start the precommit timeout, after which the voter goes to the next round; f+1 members'
messages for a higher round make it jump there at once. Timeouts grow by `timeout_increase_s` per round. A decided
machine answers every later message of its epoch with its certificate, and an undecided one that receives a valid
certificate for its epoch decides too. Undecided machines re-send their current round's proposal and votes every
`rebroadcast_s`, doubling the interval up to `max_rebroadcast_s` while the round and step stay the same, so lost
messages are made good without flooding a partitioned network.

Fault model. Partial synchrony: messages may be lost, duplicated, reordered and delayed without bound until an
unknown time GST, after which every message between honest members arrives within some bound D. Of the epoch's n
members at most f = (n - 1) // 3 are Byzantine (they may sign anything, equivocate, stay silent, or run twice
under one key); any number of the others may crash and restart at any point, keeping what they persisted.

Safety (never two decisions in one epoch). Two quorums of 2f+1 among 3f+1 share f+1 members, so at least one
honest one. (a) Within a round: an honest member prevotes once and precommits once per round, so two values
cannot both get 2f+1 precommits in one round. (b) Across rounds, the locks: if v is decided in round r, 2f+1
members precommitted v in r, so at least f+1 honest members locked v in round r. An honest member locked on v
prevotes another value w in a later round r' only when shown 2f+1 prevotes for w in a round vr with
lock round <= vr < r'. By induction on r' > r, no round from r on has 2f+1 prevotes for any w != v (that needs one
of the f+1 locked honest members, which each would have needed an earlier such polka), so no honest member
precommits w, w never gets 2f+1 precommits, and nobody decides w. The lock is what makes it safe: without it, a
split vote in round r (some decide v, the others time out) lets round r+1 gather 2f+1 prevotes for w from the
same honest members, and two certificates for one epoch exist. A restarted member could break (a) and (b) by
forgetting its lock or its votes (amnesia), so the lock, the valid value and this round's votes are handed to the
host as `Persist(state)` *before* the sends that depend on them, in the same action list (drivers carry out
actions in order), and a machine built from that state never signs a vote that conflicts with it.

Validity. An honest member prevotes only values its own check accepted, so a value with 2f+1 prevotes was accepted
by at least f+1 honest members; a decided value is one of them.

Liveness. After GST, rounds eventually last long enough (timeouts grow) for an honest proposer's proposal and all
honest votes of a round to arrive before the timeouts; proposers rotate over all members, so an honest one comes
within f+1 rounds. Its valid value is the highest-round polka it saw (relayed with its proposal); every honest
member's lock is at or below that round once it has seen all honest messages (they are re-sent), so all honest
members prevote and precommit it, and it is decided. Messages for a higher round from f+1 members pull laggards
into the rounds the others are in.

Bounds: messages more than `max_future_rounds` rounds ahead are dropped, every container is per (round, member),
and a message that breaks the rules (bad signature, non-member, wrong epoch or parent, a proposal from the wrong
proposer or with a bad justification) raises `RemoteProtocolError` before any state changes.

`planted_bug` exists only for the fault harness, which must show it catches broken protocols: "weak_quorum" uses
f+1 instead of 2f+1, "ignore_lock" prevotes regardless of the lock. Never set it elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from consensus.certificate import verify_certificate
from consensus.errors import CertificateError
from consensus.messages import (
    MAX_MEMBERS,
    NIL,
    PRECOMMIT,
    PREVOTE,
    Certificate,
    EpochValue,
    EquivocationEvidence,
    Proposal,
    Signed,
    Vote,
    check_members,
    max_faulty,
    members_hash,
    quorum,
)
from consensus.signing import SignatureVerifier, Signer, proposal_bytes
from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Effect,
    Event,
    Notify,
    PeerId,
    Received,
    Send,
    SetTimer,
    TimerFired,
)

PLANTED_BUGS = ("weak_quorum", "ignore_lock")
_PROPOSER_DOMAIN = b"swarmgrad/consensus/proposer-order/v1\x00"
STEP_PROPOSE, STEP_PREVOTE, STEP_PRECOMMIT = 0, 1, 2


@dataclass(frozen=True)
class AgreementConfig:
    """Timeouts of a round r: propose `propose_timeout_s + r * timeout_increase_s`, prevote and precommit
        `vote_timeout_s + r * timeout_increase_s`. Defaults are for links of up to ~100 ms and a validity check of a
        few hundred ms; `rebroadcast_s` re-sends the current round's messages while undecided (the interval doubles up
    to `max_rebroadcast_s` while nothing changes)."""

    propose_timeout_s: float = 1.0
    vote_timeout_s: float = 0.5
    timeout_increase_s: float = 0.5
    rebroadcast_s: float = 1.0
    max_rebroadcast_s: float = 8.0
    max_future_rounds: int = 64
    planted_bug: str | None = None

    def __post_init__(self) -> None:
        for name in ("propose_timeout_s", "vote_timeout_s", "rebroadcast_s", "max_rebroadcast_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"consensus.{name}", value, "a number > 0")
        if not self.timeout_increase_s >= 0:
            raise ConfigError("consensus.timeout_increase_s", self.timeout_increase_s, "a number >= 0")
        if self.max_future_rounds < 1:
            raise ConfigError("consensus.max_future_rounds", self.max_future_rounds, "an int >= 1")
        if self.planted_bug is not None and self.planted_bug not in PLANTED_BUGS:
            raise ConfigError("consensus.planted_bug", self.planted_bug, f"None or one of {PLANTED_BUGS}")


@dataclass(frozen=True)
class Candidate:
    """A value with the member list its `next_members_hash` names."""

    value: EpochValue
    next_members: tuple[bytes, ...]

    def __post_init__(self) -> None:
        check_members(self.next_members)
        if members_hash(self.next_members) != self.value.next_members_hash:
            raise ValueError("next_members do not match the value's next_members_hash")


@dataclass(frozen=True)
class VoterState:
    """What a voter persists before it sends what it signed: its round, this round's proposal and votes (None: not
    cast; `NIL`: nil), its lock and its valid value (round -1: none) with the prevotes that justify the latter, and
    the votes that justified entering this round (2f+1 precommits of the round before, or f+1 members' votes of
    this one), which it shows to members still in an earlier round so that they catch up."""

    swarm_id: str
    epoch: int
    consensus_round: int
    proposed: Proposal | None
    prevote: bytes | None
    precommit: bytes | None
    locked_round: int
    locked: Candidate | None
    valid_round: int
    valid: Candidate | None
    valid_justification: tuple[Vote, ...]
    entry_votes: tuple[Vote, ...]

    def __post_init__(self) -> None:
        if (self.locked_round < 0) != (self.locked is None) or (self.valid_round < 0) != (self.valid is None):
            raise ValueError("a lock or valid value comes with a round >= 0, and only then")
        if len(self.valid_justification) > MAX_MEMBERS or len(self.entry_votes) > 2 * MAX_MEMBERS:
            raise ValueError("too many justification or entry votes")


STATE_SCHEMA = Schema("consensus-state", {1: VoterState})
"""How a driver writes `Persist.state` to disk (and reads it back for a restart)."""


# ---- events and actions of this machine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StartEpoch(Command):
    """Begin (or, for a machine built from a persisted state, resume) the agreement."""


@dataclass(frozen=True)
class ProposalChecked(Command):
    """The host's answer to `CheckProposal`: whether the value passed this voter's validity check."""

    epoch: int
    value_hash: bytes
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class CheckProposal(Effect):
    """Check `proposal`'s value (sampled chunks and their Merkle proofs, tolerance, member set), drawing the sample
    from `seed`; answer with `ProposalChecked`."""

    proposal: Proposal
    seed: bytes


@dataclass(frozen=True)
class Persist(Effect):
    """Write `state` durably (fsync) before carrying out the actions after this one."""

    state: VoterState


@dataclass(frozen=True)
class Decided:
    """The epoch is decided: `certificate` proves it."""

    certificate: Certificate


@dataclass(frozen=True)
class EquivocationFound:
    """A member signed two different votes for one round and phase."""

    evidence: EquivocationEvidence


# ---- pure rules ---------------------------------------------------------------------------------------------------


def proposer_order(members: tuple[bytes, ...], parent_hash: bytes) -> tuple[bytes, ...]:
    """The epoch's proposers in turn: members ordered by `sha256(domain, parent link, key)`."""
    return tuple(sorted(members, key=lambda key: hashlib.sha256(_PROPOSER_DOMAIN + parent_hash + key).digest()))


def proposer_of(members: tuple[bytes, ...], parent_hash: bytes, consensus_round: int) -> bytes:
    """The proposer of `consensus_round` in the epoch whose parent link is `parent_hash`."""
    order = proposer_order(members, parent_hash)
    return order[consensus_round % len(order)]


def initial_state(value: EpochValue) -> VoterState:
    """The state of a voter that has not voted yet in `value`'s epoch."""
    return VoterState(value.swarm_id, value.epoch, 0, None, None, None, -1, None, -1, None, (), ())


@dataclass
class _Round:
    proposal: Proposal | None = None
    votes: dict[tuple[int, bytes], Vote] = field(default_factory=dict)  # (phase, voter) -> vote
    tally: dict[int, Counter[bytes]] = field(default_factory=lambda: {PREVOTE: Counter(), PRECOMMIT: Counter()})
    senders: set[bytes] = field(default_factory=set)
    polka_seen: bool = False
    prevote_timer: bool = False
    precommit_timer: bool = False

    def total(self, phase: int) -> int:
        return sum(self.tally[phase].values())


class EpochAgreement:
    """The agreement of one epoch at one member; see the module docstring."""

    def __init__(
        self,
        config: AgreementConfig,
        signer: Signer,
        members: tuple[bytes, ...],
        peer_of: Mapping[bytes, PeerId],
        own: Candidate,
        verifier: SignatureVerifier | None = None,
        state: VoterState | None = None,
    ) -> None:
        check_members(members)
        self.config = config
        self.signer = signer
        self.me = signer.public_key
        self.members = members
        self._member_set = frozenset(members)
        self.peer_of = dict(peer_of)
        self.own = own
        self.swarm_id = own.value.swarm_id
        self.epoch = own.value.epoch
        self.parent_hash = own.value.parent_certificate_hash
        self.verifier = verifier or SignatureVerifier()
        self.q = max_faulty(len(members)) + 1 if config.planted_bug == "weak_quorum" else quorum(len(members))
        self.f = max_faulty(len(members))
        self._order = proposer_order(members, self.parent_hash)
        self.state = state if state is not None else initial_state(own.value)
        if (self.state.swarm_id, self.state.epoch) != (self.swarm_id, self.epoch):
            raise LocalProtocolError(f"state of epoch {self.state.epoch} given to the agreement of {self.epoch}")
        self.step_name = STEP_PROPOSE
        self._rounds: dict[int, _Round] = {}
        self._values: dict[bytes, Candidate] = {}
        self._checks: dict[bytes, bool | None] = {}
        self._reported: set[bytes] = set()
        self._cert_sent_at: dict[PeerId, float] = {}
        self._helped_at: dict[PeerId, float] = {}
        self._rebroadcast_at = (-1, -1)
        self._rebroadcast_s = config.rebroadcast_s
        self._decidable: list[tuple[int, bytes]] = []  # (round, value hash) with 2f+1 precommits
        self.decided: Certificate | None = None
        self._started = False
        self._out: list[Action] = []
        self._dirty = False
        for candidate in (own, self.state.locked, self.state.valid):
            if candidate is not None:
                self._values[candidate.value.hash()] = candidate
        self._checks[own.value.hash()] = True

    # ---- the machine interface ----------------------------------------------------------------------------------

    def proposer(self, consensus_round: int) -> bytes:
        return self._order[consensus_round % len(self._order)]

    def votes_for(self, value_hash: bytes) -> list[Vote]:
        """The (validly signed) votes this machine holds for `value_hash`, by round, phase and voter."""
        return [
            vote
            for r in sorted(self._rounds)
            for _, vote in sorted(self._rounds[r].votes.items())
            if vote.value_hash == value_hash
        ]

    def step(self, now: float, event: Event) -> list[Action]:
        self._now = now
        self._out = []
        self._dirty = False
        if isinstance(event, StartEpoch):
            if self._started:
                raise LocalProtocolError(f"epoch {self.epoch} started twice")
            self._started = True
            self._resume()
        elif not self._started:
            raise LocalProtocolError(f"epoch {self.epoch}: {type(event).__name__} before StartEpoch")
        elif isinstance(event, Received):
            self._on_message(event.peer, event.msg)
        elif isinstance(event, ProposalChecked):
            self._on_checked(event)
        elif isinstance(event, TimerFired):
            self._on_timer(event.key)
        self._progress()
        out = self._out
        if self._dirty:
            out = [Persist(self.state), *out]
        self._out = []
        return out

    # ---- inputs -------------------------------------------------------------------------------------------------

    def _on_message(self, peer: PeerId, msg: object) -> None:
        if self.decided is not None:
            if (
                isinstance(msg, (Vote, Proposal))
                and self._cert_sent_at.get(peer, -1e18) + self.config.rebroadcast_s <= self._now
            ):
                self._cert_sent_at[peer] = self._now
                self._out.append(Send(peer, self.decided))
            return
        if isinstance(msg, Vote):
            self._check_vote(peer, msg)
            self._help(peer, msg.consensus_round)
            if msg.consensus_round <= self.state.consensus_round + self.config.max_future_rounds:
                self._add_vote(msg)
        elif isinstance(msg, Proposal):
            self._on_proposal(peer, msg)
        elif isinstance(msg, Certificate):
            self._on_certificate(peer, msg)
        else:
            raise RemoteProtocolError(peer, f"{type(msg).__name__} is not a consensus message")

    def _check_vote(self, peer: PeerId, vote: Vote, phase: int | None = None) -> None:
        if (vote.swarm_id, vote.epoch) != (self.swarm_id, self.epoch):
            raise RemoteProtocolError(
                peer, f"vote for {vote.swarm_id}/{vote.epoch}, this is {self.swarm_id}/{self.epoch}"
            )
        if vote.voter not in self._member_set:
            raise RemoteProtocolError(peer, f"vote of non-member {vote.voter.hex()[:16]}")
        if phase is not None and vote.phase != phase:
            raise RemoteProtocolError(peer, "justification holds a vote that is not a prevote")
        if not self.verifier.vote(vote):
            raise RemoteProtocolError(peer, f"bad signature on a vote of {vote.voter.hex()[:16]}")

    def _on_proposal(self, peer: PeerId, p: Proposal) -> None:
        value = p.value
        if (value.swarm_id, value.epoch, value.parent_certificate_hash) != (
            self.swarm_id,
            self.epoch,
            self.parent_hash,
        ):
            raise RemoteProtocolError(peer, "proposal for another swarm, epoch or parent")
        if p.proposer != self.proposer(p.consensus_round):
            raise RemoteProtocolError(peer, f"{p.proposer.hex()[:16]} is not the proposer of round {p.consensus_round}")
        if not self.verifier.proposal(p):
            raise RemoteProtocolError(peer, "bad signature on a proposal")
        value_hash = value.hash()
        if p.valid_round >= 0:
            voters = set()
            for vote in p.justification:
                self._check_vote(peer, vote, PREVOTE)
                if (vote.consensus_round, vote.value_hash) != (p.valid_round, value_hash):
                    raise RemoteProtocolError(peer, "justification vote for another round or value")
                voters.add(vote.voter)
            if len(voters) < self.q:
                raise RemoteProtocolError(peer, f"justification of {len(voters)} prevotes, {self.q} needed")
        self._help(peer, p.consensus_round)
        if p.consensus_round > self.state.consensus_round + self.config.max_future_rounds:
            return
        for vote in p.justification:
            self._add_vote(vote)
        rnd = self._round(p.consensus_round)
        if rnd.proposal is not None:
            return  # a repeat, or a second proposal of the round (the first one stands)
        rnd.proposal = p
        self._values.setdefault(value_hash, Candidate(value, p.next_members))
        if value_hash not in self._checks:
            self._checks[value_hash] = None
            self._out.append(CheckProposal(p, self.signer.validity_seed(p)))

    def _on_certificate(self, peer: PeerId, cert: Certificate) -> None:
        try:
            verify_certificate(cert, self.members, self.parent_hash, self.verifier, epoch=self.epoch)
        except CertificateError as exc:
            raise RemoteProtocolError(peer, f"bad certificate: {exc}") from exc
        if cert.value.swarm_id != self.swarm_id:
            raise RemoteProtocolError(peer, "certificate of another swarm")
        self._decide(cert)

    def _on_checked(self, event: ProposalChecked) -> None:
        if event.epoch == self.epoch and self._checks.get(event.value_hash, False) is None:
            self._checks[event.value_hash] = event.ok

    def _on_timer(self, key: object) -> None:
        if self.decided is not None or not isinstance(key, tuple):
            return
        kind, r = key
        s = self.state
        if kind == "rebroadcast":
            self._rebroadcast()
        elif r != s.consensus_round:
            return
        elif kind == "propose" and self.step_name == STEP_PROPOSE:
            self._prevote(NIL)
        elif kind == "prevote" and self.step_name == STEP_PREVOTE:
            self._precommit(NIL)
        elif kind == "precommit":
            rnd = self._round(r)
            entry = tuple(v for (phase, _), v in sorted(rnd.votes.items()) if phase == PRECOMMIT)
            self._start_round(r + 1, entry)

    # ---- votes and rounds ---------------------------------------------------------------------------------------

    def _round(self, r: int) -> _Round:
        rnd = self._rounds.get(r)
        if rnd is None:
            rnd = self._rounds[r] = _Round()
        return rnd

    def _help(self, peer: PeerId, their_round: int) -> None:
        """`peer` is in an earlier round: show it (at most once per `rebroadcast_s`) why this member moved on."""
        s = self.state
        if their_round >= s.consensus_round or not s.entry_votes:
            return
        if self._helped_at.get(peer, -math.inf) + self.config.rebroadcast_s > self._now:
            return
        self._helped_at[peer] = self._now
        self._out.extend(Send(peer, vote) for vote in s.entry_votes)

    def _add_vote(self, vote: Vote) -> None:
        rnd = self._round(vote.consensus_round)
        key = (vote.phase, vote.voter)
        seen = rnd.votes.get(key)
        if seen is not None:
            if seen.value_hash != vote.value_hash and vote.voter not in self._reported:
                self._reported.add(vote.voter)
                self._out.append(Notify(EquivocationFound(EquivocationEvidence(seen, vote))))
            return
        rnd.votes[key] = vote
        tally = rnd.tally[vote.phase]
        tally[vote.value_hash] += 1
        rnd.senders.add(vote.voter)
        r = vote.consensus_round
        if vote.phase == PRECOMMIT and vote.value_hash != NIL and tally[vote.value_hash] == self.q:
            self._decidable.append((r, vote.value_hash))
        if r > self.state.consensus_round and len(rnd.senders) >= self.f + 1:
            first: dict[bytes, Vote] = {}
            for (_, voter), seen_vote in sorted(rnd.votes.items()):
                first.setdefault(voter, seen_vote)
            self._start_round(r, tuple(first[voter] for voter in sorted(first)))

    def _update(self, **changes: object) -> None:
        self.state = dataclasses.replace(self.state, **changes)  # type: ignore[arg-type]
        self._dirty = True

    def _timeout(self, base_s: float, r: int) -> float:
        return self._now + base_s + r * self.config.timeout_increase_s

    def _resume(self) -> None:
        s = self.state
        self.step_name = STEP_PROPOSE if s.prevote is None else STEP_PREVOTE if s.precommit is None else STEP_PRECOMMIT
        self._out.append(SetTimer(("rebroadcast", 0), self._now + self.config.rebroadcast_s))
        if s.proposed is not None:
            self._on_own_proposal(s.proposed)
        for phase, value_hash in ((PREVOTE, s.prevote), (PRECOMMIT, s.precommit)):
            if value_hash is not None:
                vote = self.signer.vote(self.swarm_id, self.epoch, s.consensus_round, phase, value_hash)
                self._add_vote(vote)
                self._broadcast(vote)
        if self.step_name == STEP_PROPOSE and s.proposed is None:
            self._enter_propose(s.consensus_round)

    def _start_round(self, r: int, entry_votes: tuple[Vote, ...]) -> None:
        self._update(consensus_round=r, proposed=None, prevote=None, precommit=None, entry_votes=entry_votes)
        self.step_name = STEP_PROPOSE
        self._enter_propose(r)

    def _enter_propose(self, r: int) -> None:
        s = self.state
        if self.proposer(r) != self.me:
            self._out.append(SetTimer(("propose", r), self._timeout(self.config.propose_timeout_s, r)))
            return
        candidate, valid_round = self.own, -1
        justification: tuple[Vote, ...] = ()
        if s.valid is not None:
            candidate, valid_round, justification = s.valid, s.valid_round, s.valid_justification
        unsigned = Proposal(candidate.value, candidate.next_members, r, valid_round, self.me, bytes(64), justification)
        proposal = Proposal(
            candidate.value,
            candidate.next_members,
            r,
            valid_round,
            self.me,
            self.signer.sign(proposal_bytes(unsigned)),
            justification,
        )
        self._update(proposed=proposal)
        self._on_own_proposal(proposal)

    def _on_own_proposal(self, proposal: Proposal) -> None:
        rnd = self._round(proposal.consensus_round)
        rnd.proposal = proposal
        value_hash = proposal.value.hash()
        self._values.setdefault(value_hash, Candidate(proposal.value, proposal.next_members))
        self._checks[value_hash] = True
        self._broadcast(proposal)

    def _broadcast(self, msg: object) -> None:
        for member in self.members:
            if member != self.me:
                peer = self.peer_of.get(member)
                if peer is not None:
                    self._out.append(Send(peer, msg))

    def _vote(self, phase: int, value_hash: bytes) -> None:
        s = self.state
        cast = s.prevote if phase == PREVOTE else s.precommit
        if cast is not None:
            raise LocalProtocolError(f"epoch {self.epoch} round {s.consensus_round}: second vote in phase {phase}")
        vote = self.signer.vote(self.swarm_id, self.epoch, s.consensus_round, phase, value_hash)
        self._add_vote(vote)
        self._broadcast(vote)

    def _prevote(self, value_hash: bytes) -> None:
        self._vote(PREVOTE, value_hash)
        self._update(prevote=value_hash)
        self.step_name = STEP_PREVOTE

    def _precommit(self, value_hash: bytes) -> None:
        self._vote(PRECOMMIT, value_hash)
        self._update(precommit=value_hash)
        self.step_name = STEP_PRECOMMIT

    def _rebroadcast(self) -> None:
        s = self.state
        position = (s.consensus_round, self.step_name)
        if position == self._rebroadcast_at:
            self._rebroadcast_s = min(2 * self._rebroadcast_s, self.config.max_rebroadcast_s)
        else:
            self._rebroadcast_at, self._rebroadcast_s = position, self.config.rebroadcast_s
        self._out.append(SetTimer(("rebroadcast", 0), self._now + self._rebroadcast_s))
        if s.proposed is not None and s.proposed.consensus_round == s.consensus_round:
            self._broadcast(s.proposed)
        rnd = self._round(s.consensus_round)
        for phase in (PREVOTE, PRECOMMIT):
            vote = rnd.votes.get((phase, self.me))
            if vote is not None:
                self._broadcast(vote)

    # ---- the rules ----------------------------------------------------------------------------------------------

    def _progress(self) -> None:
        for _ in range(8):  # each pass moves at most one step; a step's effects settle in a few passes
            if self.decided is not None or not self._started or not self._progress_once():
                return
        raise LocalProtocolError(f"epoch {self.epoch}: the rules did not settle")

    def _progress_once(self) -> bool:
        for decided_round, decided_hash in self._decidable:
            if decided_hash in self._values:
                self._decide_from(decided_round, self._rounds[decided_round], decided_hash)
                return False
        s = self.state
        r = s.consensus_round
        rnd = self._round(r)
        p = rnd.proposal
        value_hash = p.value.hash() if p is not None else None
        ok = self._checks.get(value_hash) if value_hash is not None else None
        if self.step_name == STEP_PROPOSE and p is not None and ok is not None:
            lock_free = s.locked is None or s.locked.value.hash() == value_hash
            ignore = self.config.planted_bug == "ignore_lock"
            if p.valid_round < 0:
                self._prevote(value_hash if ok and (lock_free or ignore) else NIL)  # type: ignore[arg-type]
                return True
            # valid_round >= 0: the proposal's justification, checked on receipt, holds 2f+1 prevotes of that
            # round (counted apart from the tally, which keeps only the first vote of an equivocating member)
            allowed = lock_free or s.locked_round <= p.valid_round or ignore
            self._prevote(value_hash if ok and allowed else NIL)  # type: ignore[arg-type]
            return True
        if self.step_name == STEP_PREVOTE and not rnd.prevote_timer and rnd.total(PREVOTE) >= self.q:
            rnd.prevote_timer = True
            self._out.append(SetTimer(("prevote", r), self._timeout(self.config.vote_timeout_s, r)))
        if (
            self.step_name >= STEP_PREVOTE
            and not rnd.polka_seen
            and value_hash is not None
            and ok
            and rnd.tally[PREVOTE][value_hash] >= self.q
        ):
            rnd.polka_seen = True
            candidate = self._values[value_hash]
            justification = tuple(
                sorted(
                    (v for (phase, _), v in rnd.votes.items() if phase == PREVOTE and v.value_hash == value_hash),
                    key=lambda v: v.voter,
                )
            )
            if self.step_name == STEP_PREVOTE:
                self._update(locked_round=r, locked=candidate)
                self._precommit(value_hash)
            self._update(valid_round=r, valid=candidate, valid_justification=justification)
            return True
        if self.step_name == STEP_PREVOTE and rnd.tally[PREVOTE][NIL] >= self.q:
            self._precommit(NIL)
            return True
        if not rnd.precommit_timer and rnd.total(PRECOMMIT) >= self.q:
            rnd.precommit_timer = True
            self._out.append(SetTimer(("precommit", r), self._timeout(self.config.vote_timeout_s, r)))
        return False

    def _decide_from(self, r: int, rnd: _Round, value_hash: bytes) -> None:
        candidate = self._values[value_hash]
        precommits = tuple(
            Signed(v.voter, v.signature)
            for (phase, _), v in sorted(rnd.votes.items(), key=lambda item: item[0][1])
            if phase == PRECOMMIT and v.value_hash == value_hash
        )
        self._decide(Certificate(candidate.value, candidate.next_members, r, precommits))

    def _decide(self, cert: Certificate) -> None:
        self.decided = cert
        for kind in ("propose", "prevote", "precommit"):
            self._out.append(CancelTimer((kind, self.state.consensus_round)))
        self._out.append(CancelTimer(("rebroadcast", 0)))
        self._out.append(Notify(Decided(cert)))
