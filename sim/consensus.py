"""Epoch consensus in the simulator: the real `EpochAgreement` machines, one chain of epochs per member, and the
Byzantine members' behaviours; shared by the swarm simulation (`SwarmConsensus`, below) and the fault harness
(`testing.consensus_faults`).

* `EpochNode` is a member's consensus: one `EpochAgreement` per epoch, one after the other. It asks its `EpochWorld`
  for the epoch's candidate (the member's own checkpoint; None: not yet, e.g. training has not reached the epoch
  boundary) and for a persisted `VoterState` to resume from; messages of a later epoch are buffered until that epoch
  starts, and those of a decided one are answered with its certificate (rate-limited per peer).
* `Silent` never sends; `Equivocator` signs conflicting votes and proposals for every round it hears of (it knows
  what the world has certified: a strong adversary). A poisoner needs no class of its own: it is an honest
  `EpochNode` whose world proposes a checkpoint that honest validity checks refuse.
* `SwarmConsensus` runs these on a `SwarmRun`'s event loop and network: every member peer holds an `EpochNode` (or
  its Byzantine role) on one `Simulator` and a `consensus.sample_fetch.SampleFetch` on a second, both over the
  run's `NetworkModel`, so consensus and chunk traffic share the peers' links (and queues) with gossip. When a
  peer's own gossip round reaches `epoch * epoch_rounds`, it snapshots its parameters as its checkpoint
  (`CheckpointTree`) and starts that epoch once the one before is decided. A voter's `CheckProposal` is the real
  sampled-chunk check: it draws indices from its own validity seed, fetches them from the proposer with
  `FetchSample` over the simulated network, and runs `consensus.chunks.check_sample` against its own checkpoint of
  that epoch with the real tolerance. Nothing is stood in for: the cheap model's parameters are one flat tensor, so
  its checkpoint is a real tree (one 64 KiB chunk per 16,384 parameters) and the check costs microseconds.

Simplifications, all deliberate: the member set is fixed (the first `consensus.members` peers, every epoch); a
member's persisted `VoterState`, its chain and its checkpoints survive any restart (they are on disk, whatever the
training state); all members share one signature-verification cache (each signature is still checked once, only
the bookkeeping per member is saved). Nothing here reads a clock or draws from an unseeded source.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consensus.agreement import (
    AgreementConfig,
    Candidate,
    CheckProposal,
    Decided,
    EpochAgreement,
    EquivocationFound,
    Persist,
    ProposalChecked,
    StartEpoch,
    VoterState,
    proposer_of,
)
from consensus.chunks import DEFAULT_SAMPLE_COUNT, ChunkRefusal, ChunkReply, ChunkRequest, check_sample, sample_indices
from consensus.chunks import SCHEMA as CHUNK_SCHEMA
from consensus.membership import genesis_parent_hash
from consensus.merkle import CheckpointTree
from consensus.messages import (
    NIL,
    PRECOMMIT,
    PREVOTE,
    SCHEMA,
    Certificate,
    EpochValue,
    Proposal,
    Vote,
    max_faulty,
    members_hash,
)
from consensus.sample_fetch import FetchSample, HoldTree, SampleFailed, SampleFetch, SampleFetchConfig, SampleFetched
from consensus.signing import SignatureVerifier, Signer, proposal_bytes
from sim.events import EventLoop, Network, Simulator
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Effect,
    Event,
    PeerId,
    Received,
    Send,
    SetTimer,
    TimerFired,
)

if TYPE_CHECKING:
    from sim.scenario import ConsensusSection

MAX_BUFFERED = 4096
"""Messages of later epochs an `EpochNode` keeps until it starts them (beyond that they are dropped; re-sends and
certificates make good what a member missed)."""


def epoch_of(msg: object) -> int:
    """The epoch a consensus message belongs to (-1: none)."""
    if isinstance(msg, Vote):
        return msg.epoch
    if isinstance(msg, (Proposal, Certificate)):
        return msg.value.epoch
    return -1


class MemoSigner(Signer):
    """Ed25519 signatures are deterministic: remember them instead of signing the same bytes again (an equivocator
    signs one vote for many receivers; restarts re-sign persisted votes; a voter's validity seed is signed once)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        super().__init__(private_key)
        self._memo: dict[bytes, bytes] = {}

    def sign(self, message: bytes) -> bytes:
        signature = self._memo.get(message)
        if signature is None:
            signature = self._memo[message] = super().sign(message)
        return signature


class EpochWorld(Protocol):
    """What an `EpochNode` needs of the run it is part of."""

    members: tuple[bytes, ...]
    peer_of: dict[bytes, PeerId]
    verifier: SignatureVerifier
    genesis_parent: bytes

    def candidate(self, node: PeerId, epoch: int, parent: bytes) -> Candidate | None:
        """`node`'s own value for `epoch` (None: it has none yet, or the run has no such epoch)."""
        ...

    def persisted(self, node: PeerId) -> VoterState | None:
        """The last `VoterState` `node` persisted (None: none)."""
        ...

    def recipients(self, peer: PeerId) -> tuple[PeerId, ...]:
        """Where a message addressed to `peer` goes (the harness's Twins run twice under one name)."""
        ...


@dataclass
class EpochNode:
    """A member's consensus: one `EpochAgreement` per epoch, one after the other (see the module docstring)."""

    world: EpochWorld
    name: PeerId
    signer: Signer
    config: AgreementConfig
    chain: list[Certificate]
    agreement: EpochAgreement | None = None
    buffered: list[tuple[PeerId, object]] = field(default_factory=list)
    answered: dict[tuple[PeerId, int], float] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        return len(self.chain) + 1

    def start(self, now: float) -> list[Action]:
        """Start the agreement of the next undecided epoch (resuming from the persisted state if it is for that
        epoch); nothing if it runs already or the world has no candidate for it yet."""
        world = self.world
        epoch = self.epoch
        if self.agreement is not None and self.agreement.epoch >= epoch:
            return []  # already running (a restart started it before this start event came)
        parent = world.genesis_parent if not self.chain else self.chain[-1].value.hash()
        candidate = world.candidate(self.name, epoch, parent)
        if candidate is None:
            self.agreement = None
            return []
        persisted = world.persisted(self.name)
        state = persisted if persisted is not None and persisted.epoch == epoch else None
        self.agreement = EpochAgreement(
            self.config, self.signer, world.members, world.peer_of, candidate, verifier=world.verifier, state=state
        )
        actions = self._wrap(epoch, self.agreement.step(now, StartEpoch()))
        held, self.buffered = self.buffered, []
        for peer, msg in held:
            actions.extend(self._received(now, peer, msg))
        return actions

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, StartEpoch):
            return self.start(now)
        if isinstance(event, Received):
            return self._received(now, event.peer, event.msg)
        if isinstance(event, TimerFired) and isinstance(event.key, tuple):
            epoch, key = event.key
            if self.agreement is not None and epoch == self.agreement.epoch:
                return self._wrap(epoch, self.agreement.step(now, TimerFired(key)))
            return []
        if isinstance(event, ProposalChecked):
            if self.agreement is not None and event.epoch == self.agreement.epoch:
                return self._wrap(event.epoch, self.agreement.step(now, event))
        return []

    def _received(self, now: float, peer: PeerId, msg: object) -> list[Action]:
        epoch = epoch_of(msg)
        if self.agreement is not None and epoch == self.agreement.epoch:
            return self._wrap(epoch, self.agreement.step(now, Received(peer, msg)))
        if 1 <= epoch <= len(self.chain):
            if isinstance(msg, Certificate):
                return []
            last = self.answered.get((peer, epoch))
            if last is not None and now < last + self.config.rebroadcast_s:
                return []
            self.answered[(peer, epoch)] = now
            return [Send(peer, self.chain[epoch - 1])]
        if epoch > len(self.chain) and len(self.buffered) < MAX_BUFFERED:
            self.buffered.append((peer, msg))
        return []

    def _wrap(self, epoch: int, actions: list[Action]) -> list[Action]:
        out: list[Action] = []
        for action in actions:
            if isinstance(action, SetTimer):
                out.append(SetTimer((epoch, action.key), action.deadline))
            elif isinstance(action, CancelTimer):
                out.append(CancelTimer((epoch, action.key)))
            elif isinstance(action, Send):
                out.extend(Send(peer, action.msg) for peer in self.world.recipients(action.peer))
            else:
                out.append(action)
        return out


@dataclass
class Silent:
    """A Byzantine member that never sends anything."""

    def step(self, now: float, event: Event) -> list[Action]:
        return []


class EquivocatorWorld(Protocol):
    """What an `Equivocator` knows of the run (everything certified so far: it is a strong adversary)."""

    swarm_id: str
    members: tuple[bytes, ...]
    all_peers: list[PeerId]
    name_of: dict[bytes, PeerId]

    def parent_of(self, epoch: int) -> bytes | None:
        """The parent link of `epoch` once its parent is certified (None: not yet)."""
        ...

    def current_epoch(self) -> int:
        """The first epoch nobody has a certificate for."""
        ...

    def forge(self, signer: Signer, tag: str, epoch: int, parent: bytes) -> EpochValue:
        """A value for `epoch` that honest validity checks accept, different for every `tag`."""
        ...


@dataclass
class Equivocator:
    """A Byzantine member that signs conflicting votes and proposals for every round it hears of: with `split`, it
    sends two different valid values to two random halves as proposer and votes at random per receiver; without,
    it breaks locks (one fresh value for all but the next round's proposer, its precommit to a single victim)."""

    world: EquivocatorWorld
    signer: Signer
    rng: random.Random
    split: bool
    acted: set[tuple[int, int]] = field(default_factory=set)
    proposed: set[tuple[int, int]] = field(default_factory=set)
    values: dict[tuple[int, int], set[bytes]] = field(default_factory=dict)
    newest: dict[tuple[int, int], bytes] = field(default_factory=dict)
    left_out: dict[tuple[int, int], PeerId] = field(default_factory=dict)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, StartEpoch):  # the run tells it an epoch's parent is known: propose round 0 early
            epoch = self.world.current_epoch()
            parent = self.world.parent_of(epoch)
            if parent is None or (epoch, 0) in self.proposed:
                return []
            if proposer_of(self.world.members, parent, 0) != self.signer.public_key:
                return []
            self.proposed.add((epoch, 0))
            return self._propose(epoch, 0, parent)
        if not isinstance(event, Received):
            return []
        msg = event.msg
        epoch = epoch_of(msg)
        parent = self.world.parent_of(epoch)
        if parent is None or isinstance(msg, Certificate) or not isinstance(msg, (Proposal, Vote)):
            return []
        r = msg.consensus_round
        known = self.values.setdefault((epoch, r), set())
        new_value = False
        h = msg.value.hash() if isinstance(msg, Proposal) else msg.value_hash
        if h != NIL and h not in known:
            new_value = True
            known.add(h)
            self.newest[(epoch, r)] = h
        actions: list[Action] = []
        own = self.signer.public_key
        for rr in (r, r + 1):
            if (epoch, rr) not in self.proposed and proposer_of(self.world.members, parent, rr) == own:
                self.proposed.add((epoch, rr))
                actions.extend(self._propose(epoch, rr, parent))
        if (epoch, r) not in self.acted or new_value:
            self.acted.add((epoch, r))
            actions.extend(self._vote(epoch, r))
        return actions

    def _others(self) -> list[PeerId]:
        own = self.world.name_of[self.signer.public_key]
        return [p for p in self.world.all_peers if p != own]

    def _split(self) -> tuple[list[PeerId], list[PeerId]]:
        peers = self._others()
        self.rng.shuffle(peers)
        half = len(peers) // 2
        return peers[:half], peers[half:]

    def _propose(self, epoch: int, r: int, parent: bytes) -> list[Action]:
        actions: list[Action] = []
        sides: tuple[list[PeerId], ...]
        if self.split:
            sides = self._split()
        else:  # one fresh value for all but one member (the next round's proposer), which then cannot lock on it
            following = self.world.name_of[proposer_of(self.world.members, parent, r + 1)]
            left_out = following if following in self._others() else self.rng.choice(self._others())
            self.left_out[(epoch, r)] = left_out
            sides = ([p for p in self._others() if p != left_out],)
        for side, label in zip(sides, ("equivocator-a", "equivocator-b"), strict=False):
            tag = f"{label}/{self.signer.public_key.hex()[:8]}/{r}"
            value = self.world.forge(self.signer, tag, epoch, parent)
            unsigned = Proposal(value, self.world.members, r, -1, self.signer.public_key, bytes(64), ())
            proposal = replace(unsigned, signature=self.signer.sign(proposal_bytes(unsigned)))
            self.values.setdefault((epoch, r), set()).add(value.hash())
            self.newest[(epoch, r)] = value.hash()
            actions.extend(Send(peer, proposal) for peer in side)
        return actions

    def _vote(self, epoch: int, r: int) -> list[Action]:
        swarm_id = self.world.swarm_id
        options = [*sorted(self.values.get((epoch, r), set())), NIL]
        actions: list[Action] = []
        if not self.split:  # lock breaking: back the newest value, but let only one victim see the precommit
            newest = self.newest.get((epoch, r), NIL)
            left_out = self.left_out.get((epoch, r))
            victim = self.rng.choice([p for p in self._others() if p != left_out])
            for peer in self.world.all_peers:
                prevote = NIL if peer == left_out else newest
                actions.append(Send(peer, self.signer.vote(swarm_id, epoch, r, PREVOTE, prevote)))
                precommit = newest if left_out is None or peer == victim else NIL
                actions.append(Send(peer, self.signer.vote(swarm_id, epoch, r, PRECOMMIT, precommit)))
            return actions
        for phase in (PREVOTE, PRECOMMIT):
            for peer in sorted(self.world.all_peers):
                choice = self.rng.choice(options)
                actions.append(Send(peer, self.signer.vote(swarm_id, epoch, r, phase, choice)))
        return actions


class VoteSizes:
    """Wire sizes of consensus messages (`consensus.messages.SCHEMA`): a vote's encoding depends only on the lengths
    of its hash, epoch and round, so one of each shape is encoded; the last other message is remembered (a
    broadcast sends one object to every member)."""

    def __init__(self) -> None:
        self._votes: dict[tuple[int, int, int], int] = {}
        self._last_msg: object = None
        self._last_size = 0

    def __call__(self, msg: object) -> int:
        if msg is self._last_msg:
            return self._last_size
        if isinstance(msg, Vote):
            shape = (len(msg.value_hash), msg.epoch.bit_length(), msg.consensus_round.bit_length())
            size = self._votes.get(shape)
            if size is None:
                size = self._votes[shape] = len(SCHEMA.encode(msg))
            return size
        self._last_msg, self._last_size = msg, len(SCHEMA.encode(msg))
        return self._last_size


# ---- the swarm's consensus ----------------------------------------------------------------------------------------

CONSENSUS_ROLES = ("equivocate", "silent", "poison")
"""Byzantine roles a member may take in the swarm's consensus (`consensus.byzantine_role` of a scenario)."""

SWARM_ID = "sim"


@dataclass
class EpochRecord:
    """What happened to one epoch, for the per-epoch table."""

    epoch: int
    boundary_round: int
    started_s: float = math.nan  # the first honest member's checkpoint at the boundary
    decided_at_s: dict[PeerId, float] = field(default_factory=dict)  # honest members only
    consensus_round: int = -1
    signers: int = 0
    bytes_sent: int = 0  # consensus and chunk-sample messages of this epoch, all members together
    messages_sent: int = 0

    def as_row(self, honest_members: int) -> dict[str, object]:
        times = sorted(self.decided_at_s.values())
        first = times[0] - self.started_s if times else math.nan
        last = times[-1] - self.started_s if times else math.nan
        return {
            "epoch": self.epoch,
            "boundary_round": self.boundary_round,
            "started_s": self.started_s,
            "first_commit_latency_s": first,
            "commit_latency_s": last,
            "consensus_rounds": self.consensus_round + 1 if times else 0,
            "signers": self.signers,
            "honest_decided": len(times),
            "honest_members": honest_members,
            "consensus_bytes": self.bytes_sent,
            "consensus_messages": self.messages_sent,
        }


EPOCH_COLUMNS = tuple(EpochRecord(0, 0).as_row(0))


class SwarmConsensus:
    """The epoch consensus of one `SwarmRun` (see the module docstring). The run tells it when a peer completes a
    gossip round (`round_completed`), goes down (`peer_down`) or comes up (`peer_up`)."""

    def __init__(
        self,
        loop: EventLoop,
        network: Network,
        seed: int,
        members: list[PeerId],
        roles: dict[PeerId, str],
        epoch_rounds: int,
        max_epoch: int,
        config: AgreementConfig,
        tolerance: float,
        spec_hash: bytes,
        params_of: Callable[[PeerId], torch.Tensor],
    ) -> None:
        self.loop = loop
        self.epoch_rounds = epoch_rounds
        self.max_epoch = max_epoch
        self.config = config
        self.tolerance = tolerance
        self.params_of = params_of
        self.roles = roles
        self.swarm_id = SWARM_ID
        self.signers = {name: MemoSigner.from_seed(f"{seed}/member/{name}".encode()) for name in members}
        self.members = tuple(sorted(s.public_key for s in self.signers.values()))
        self.members_hash = members_hash(self.members)
        self.name_of = {s.public_key: name for name, s in self.signers.items()}
        self.peer_of = self.name_of
        self.all_peers = sorted(members)
        self.honest = [p for p in self.all_peers if p not in roles]
        self.f = max_faulty(len(self.members))
        self.genesis_parent = genesis_parent_hash(SWARM_ID, self.members)
        self.verifier = SignatureVerifier(max_entries=1 << 18)
        self.spec_hash = spec_hash
        self._sizes = VoteSizes()
        self.sim = Simulator(loop, network, self._consensus_size, host=self)
        self.fetch = Simulator(loop, network, self._chunk_size, host=self)
        self.fetch_config = SampleFetchConfig(swarm_id=SWARM_ID)
        self._rngs = {name: random.Random(f"{seed}/consensus/{name}") for name in members}
        self.checkpoints: dict[PeerId, dict[int, CheckpointTree]] = {name: {} for name in members}
        self.chains: dict[PeerId, list[Certificate]] = {name: [] for name in members}
        self._persisted: dict[PeerId, VoterState] = {}
        self._checks: dict[tuple[PeerId, int, bytes], tuple[bytes, tuple[int, ...], CheckpointTree]] = {}
        self.certified: dict[int, bytes] = {}  # epoch -> the value hash certified (the first one seen)
        self.records: dict[int, EpochRecord] = {}
        self.stats: Counter[str] = Counter()
        self.conflicting_certificates = 0  # a second value certified for an epoch: a safety violation

    @classmethod
    def from_section(
        cls,
        section: ConsensusSection,
        peers: int,
        rounds: int,
        loop: EventLoop,
        network: Network,
        seed: int,
        spec_hash: bytes,
        params_of: Callable[[PeerId], torch.Tensor],
    ) -> SwarmConsensus:
        roles = {peer: section.byzantine_role for peer in section.byzantine_peers}
        config = section.agreement_config()
        members = section.member_names(peers)
        epochs = (rounds - 1) // section.epoch_rounds  # every boundary before the run's last round
        return cls(
            loop, network, seed, members, roles, section.epoch_rounds, epochs, config, section.tolerance, spec_hash,
            params_of,
        )  # fmt: skip

    # ---- the run's hooks ----------------------------------------------------------------------------------------

    def peer_up(self, name: PeerId) -> None:
        if name not in self.signers:
            return
        self.fetch.add(name, SampleFetch(self.fetch_config))
        for epoch, tree in sorted(self.checkpoints[name].items()):
            self.fetch.step(name, HoldTree(epoch, tree))
        role = self.roles.get(name)
        if role == "silent":
            self.sim.add(name, Silent())
            return
        if role == "equivocate":
            rng = self._rngs[name]
            self.sim.add(name, Equivocator(self, self.signers[name], rng, split=rng.random() < 0.5))
            self.sim.step(name, StartEpoch())
            return
        self.sim.add(name, EpochNode(self, name, self.signers[name], self.config, self.chains[name]))
        self.sim.step(name, StartEpoch())

    def peer_down(self, name: PeerId) -> None:
        self.sim.remove(name)
        self.fetch.remove(name)

    def round_completed(self, name: PeerId, gossip_round: int) -> None:
        """`name` completed gossip round `gossip_round` (numbered from 0) with its parameters now `params_of`."""
        if name not in self.signers:
            return
        epoch, rest = divmod(gossip_round + 1, self.epoch_rounds)
        if rest or not 1 <= epoch <= self.max_epoch or epoch in self.checkpoints[name]:
            return
        params = self.params_of(name)
        if self.roles.get(name) == "poison":  # it proposes (and serves) its parameters sign-flipped
            params = -params
        tree = CheckpointTree.from_state({"params": params})
        self.checkpoints[name][epoch] = tree
        record = self.records.setdefault(epoch, EpochRecord(epoch, epoch * self.epoch_rounds))
        if name in self.honest and math.isnan(record.started_s):
            record.started_s = self.loop.now
        if self.sim.has(name):
            self.fetch.step(name, HoldTree(epoch, tree))
            self.sim.step(name, StartEpoch())

    # ---- EpochWorld and EquivocatorWorld ------------------------------------------------------------------------

    def candidate(self, node: PeerId, epoch: int, parent: bytes) -> Candidate | None:
        tree = self.checkpoints[node].get(epoch)
        if tree is None:
            return None
        value = EpochValue(
            SWARM_ID, epoch, epoch * self.epoch_rounds, tree.root, self.spec_hash, self.members_hash, parent
        )
        return Candidate(value, self.members)

    def persisted(self, node: PeerId) -> VoterState | None:
        return self._persisted.get(node)

    def recipients(self, peer: PeerId) -> tuple[PeerId, ...]:
        return (peer,)

    def parent_of(self, epoch: int) -> bytes | None:
        if epoch == 1:
            return self.genesis_parent
        return self.certified.get(epoch - 1)

    def current_epoch(self) -> int:
        return 1 + max(self.certified, default=0)

    def forge(self, signer: Signer, tag: str, epoch: int, parent: bytes) -> EpochValue:
        """The equivocator's current parameters, nudged by 1e-3 of their scale per `tag` (well inside the
        tolerance), as a tree it serves."""
        name = self.name_of[signer.public_key]
        params = self.params_of(name)
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big"))
        nudged = params + 1e-3 * params.abs().mean() * torch.randn(params.shape, generator=generator)
        tree = CheckpointTree.from_state({"params": nudged})
        if self.fetch.has(name):
            self.fetch.step(name, HoldTree(epoch, tree))
        return EpochValue(
            SWARM_ID, epoch, epoch * self.epoch_rounds, tree.root, self.spec_hash, self.members_hash, parent
        )

    # ---- the Host of both simulators ----------------------------------------------------------------------------

    def notified(self, peer: PeerId, event: object) -> None:
        if isinstance(event, Decided):
            self._decided(peer, event.certificate)
        elif isinstance(event, EquivocationFound):
            self.stats["equivocations_found"] += 1
        elif isinstance(event, SampleFetched):
            self._sampled(peer, event.request, event.answer)
        elif isinstance(event, SampleFailed):
            self._answer_check(peer, event.request, event.reason)

    def effect(self, peer: PeerId, effect: Effect) -> None:
        if isinstance(effect, Persist):
            self._persisted[peer] = effect.state
        elif isinstance(effect, CheckProposal):
            self._check(peer, effect.proposal)
        else:
            raise LocalProtocolError(f"the simulated consensus carries out no {type(effect).__name__}")

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0

    # ---- validity checks ----------------------------------------------------------------------------------------

    def _check(self, voter: PeerId, proposal: Proposal) -> None:
        value = proposal.value
        own = self.checkpoints[voter].get(value.epoch)
        reason = ""
        if own is None:
            reason = "no checkpoint of our own at this boundary"
        elif value.model_spec_hash != self.spec_hash or proposal.next_members != self.members:
            reason = "another model or member set"
        if reason or own is None:
            self._step_later(voter, ProposalChecked(value.epoch, value.hash(), False, reason))
            return
        seed = self.signers[voter].validity_seed(proposal)
        indices = sample_indices(seed, own.chunk_count, DEFAULT_SAMPLE_COUNT)
        request = ChunkRequest(SWARM_ID, value.epoch, value.checkpoint_root, indices)
        self._checks[(voter, value.epoch, value.checkpoint_root)] = (value.hash(), indices, own)
        self.stats["samples_requested"] += 1
        self.fetch.step(voter, FetchSample(self.peer_of[proposal.proposer], request))

    def _sampled(self, voter: PeerId, request: ChunkRequest, answer: ChunkReply | ChunkRefusal) -> None:
        pending = self._checks.get((voter, request.epoch, request.root))
        if pending is None:
            return
        _, indices, own = pending
        reason = check_sample(request.root, own.chunk_count, indices, answer, own, self.tolerance)
        self._answer_check(voter, request, reason or "")

    def _answer_check(self, voter: PeerId, request: ChunkRequest, reason: str) -> None:
        pending = self._checks.pop((voter, request.epoch, request.root), None)
        if pending is None:
            return
        if voter in self.honest:
            self.stats["honest_checks_passed" if not reason else "honest_checks_refused"] += 1
        self._step_later(voter, ProposalChecked(request.epoch, pending[0], not reason, reason))

    def _step_later(self, peer: PeerId, event: Event) -> None:
        self.loop.at(self.loop.now, lambda: self.sim.step(peer, event))

    # ---- decisions ----------------------------------------------------------------------------------------------

    def _decided(self, peer: PeerId, cert: Certificate) -> None:
        epoch = cert.value.epoch
        chain = self.chains[peer]
        if epoch != len(chain) + 1:
            return
        chain.append(cert)
        value_hash = cert.value.hash()
        known = self.certified.setdefault(epoch, value_hash)
        if known != value_hash:
            self.conflicting_certificates += 1
        record = self.records.setdefault(epoch, EpochRecord(epoch, epoch * self.epoch_rounds))
        if peer in self.honest:
            record.decided_at_s.setdefault(peer, self.loop.now)
        if record.consensus_round < 0:
            record.consensus_round, record.signers = cert.consensus_round, len(cert.precommits)
            for name in self.all_peers:
                if self.roles.get(name) == "equivocate":
                    self._step_later(name, StartEpoch())
        self._step_later(peer, StartEpoch())

    # ---- sizes and the table ------------------------------------------------------------------------------------

    def _consensus_size(self, msg: object) -> int:
        size = self._sizes(msg)
        self._count(epoch_of(msg), size)
        return size

    def _chunk_size(self, msg: object) -> int:
        size = len(CHUNK_SCHEMA.encode(msg))
        self._count(getattr(msg, "epoch", -1), size)
        return size

    def _count(self, epoch: int, size: int) -> None:
        record = self.records.get(epoch)
        if record is not None:
            record.bytes_sent += size
            record.messages_sent += 1

    def epoch_rows(self) -> list[dict[str, object]]:
        return [self.records[e].as_row(len(self.honest)) for e in sorted(self.records)]

    def summary(self) -> dict[str, object]:
        rows = self.epoch_rows()
        latencies = sorted(float(r["commit_latency_s"]) for r in rows if r["honest_decided"])  # type: ignore[arg-type]
        return {
            "members": len(self.members),
            "byzantine_members": dict(sorted(self.roles.items())),
            "epochs_started": len(rows),
            "epochs_committed": len(latencies),
            "commit_latency_s": {
                "mean": sum(latencies) / len(latencies) if latencies else math.nan,
                "median": latencies[len(latencies) // 2] if latencies else math.nan,
                "max": latencies[-1] if latencies else math.nan,
            },
            "conflicting_certificates": self.conflicting_certificates,
            "bytes_sent": sum(self.sim.bytes_sent.values()) + sum(self.fetch.bytes_sent.values()),
            "messages_sent": self.sim.counters["messages_sent"] + self.fetch.counters["messages_sent"],
            "checks": dict(sorted(self.stats.items())),
        }
