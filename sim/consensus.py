"""Epoch consensus in the simulator: the real `consensus.epochs.EpochChain` per member, the Byzantine members'
behaviours, and the swarm's consensus (`SwarmConsensus`); the fault harness (`testing.consensus_faults`) shares the
roles and `chain_candidate`.

* Every honest member (and a poisoner) runs the machine a real peer's `ConsensusService` runs: an `EpochChain`,
  which strings one `EpochAgreement` per epoch on its chain of certificates, buffers later epochs, answers decided
  ones with their certificate, asks for certificates it lacks (`CertificateRequest`), sends each certificate to its
  live peers, and computes the next member set from the attendance its values carry (`consensus.membership`:
  members silent for `drop_after_missed` epochs, or proven equivocators, go). The simulator feeds it what the
  service feeds it: `Checkpoint` at each of the member's epoch boundaries, the messages, the timers, `PeerUp` and
  `PeerDown` of its live peers, and `ProposalChecked` answers to its `CheckProposal` effects; `Persist` is kept
  as the `VoterState` a restarted member resumes from, `Certified` appends to the member's chain (its chain file).
* `Silent` never sends; `Equivocator` signs conflicting votes and proposals for every round it hears of (it knows
  what the world has certified: a strong adversary, whose values carry the attendance and next member set an
  honest chain computes from the certificates, `chain_candidate`). A poisoner needs no class of its own: it is an
  honest `EpochChain` whose world hands it a checkpoint that honest validity checks refuse.
* `SwarmConsensus` runs these on a `SwarmRun`'s event loop and network: every member peer holds an `EpochChain`
  (or its Byzantine role) on one `Simulator` and a `consensus.sample_fetch.SampleFetch` on a second, both over the
  run's `NetworkModel`, so consensus and chunk traffic share the peers' links (and queues) with gossip. When a
  peer's own gossip round reaches `epoch * epoch_rounds`, it snapshots its parameters as its checkpoint
  (`CheckpointTree`), holds it for serving and hands its chain the `Checkpoint`. A voter's `CheckProposal` is the
  service's sampled-chunk check: the indices from the effect's seed, `FetchSample` from the proposer over the
  simulated network, and `consensus.chunks.check_sample` against its own checkpoint of that epoch with the real
  tolerance. The cheap model's parameters are one flat tensor, so its checkpoint is a real tree (one 64 KiB chunk
  per 16,384 parameters) and the check costs microseconds.

Simplifications, all deliberate: consensus runs on the members only (the first `consensus.members` peers; a real
non-member runs an `EpochChain` too, to learn the chain); a member's live peers are all other members up to
`max_peers` + 1 of them, else a fixed draw of about `max_peers` (`_draw_live_peers`), and they learn at once when it
goes down or comes up; a member's persisted `VoterState`, its chain and its checkpoints survive any restart (they
are on disk, whatever the training state), so a restarted member is handed its checkpoints again; all members
share one signature-verification cache (each signature is still checked once, only the bookkeeping per member is
saved). Nothing here reads a clock or draws from an unseeded source.
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
    EquivocationFound,
    Persist,
    ProposalChecked,
    StartEpoch,
    VoterState,
    proposer_of,
)
from consensus.chunks import DEFAULT_SAMPLE_COUNT, ChunkRefusal, ChunkReply, ChunkRequest, check_sample, sample_indices
from consensus.chunks import SCHEMA as CHUNK_SCHEMA
from consensus.epochs import Certified, Checkpoint, EpochChain
from consensus.merkle import CheckpointTree
from consensus.messages import (
    NIL,
    PRECOMMIT,
    PREVOTE,
    SCHEMA,
    Certificate,
    CertificateRequest,
    EpochValue,
    Proposal,
    Vote,
    members_hash,
)
from consensus.provenance import ChainGenesis
from consensus.sample_fetch import FetchSample, HoldTree, SampleFailed, SampleFetch, SampleFetchConfig, SampleFetched
from consensus.signing import SignatureVerifier, Signer, proposal_bytes
from p2p.membership import MembershipConfig
from sim.events import EventLoop, Network, Simulator
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import Action, Effect, Event, PeerDown, PeerId, PeerUp, Received, Send

if TYPE_CHECKING:
    from sim.scenario import ConsensusSection


def epoch_of(msg: object) -> int:
    """The epoch a consensus message belongs to (-1: none)."""
    if isinstance(msg, (Vote, CertificateRequest)):
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


def chain_candidate(
    config: AgreementConfig,
    signer: Signer,
    genesis: ChainGenesis,
    certificates: list[Certificate],
    peer_of_key: Callable[[bytes], PeerId],
    verifier: SignatureVerifier,
    checkpoint: Checkpoint,
) -> Candidate:
    """The value an honest `EpochChain` on `certificates` would propose for `checkpoint` when the only votes of the
    last epoch it holds are its certificate's precommits (what an adversary that knows the certificates can
    forge): its attendance, next member set and parent link are the chain's own."""
    chain = EpochChain(config, signer, genesis, certificates, peer_of_key, verifier=verifier)
    attendance = chain.attendance()
    following = chain.expected_next_members(attendance, ())
    value = EpochValue(
        genesis.swarm_id,
        checkpoint.epoch,
        checkpoint.round,
        checkpoint.root,
        checkpoint.model_spec_hash,
        members_hash(following),
        chain.parent_of_next(),
        attendance,
    )
    return Candidate(value, following)


@dataclass
class Silent:
    """A Byzantine member that never sends anything."""

    def step(self, now: float, event: Event) -> list[Action]:
        return []


class EquivocatorWorld(Protocol):
    """What an `Equivocator` knows of the run (everything certified so far: it is a strong adversary)."""

    swarm_id: str
    all_peers: list[PeerId]
    name_of: dict[bytes, PeerId]

    def parent_of(self, epoch: int) -> bytes | None:
        """The parent link of `epoch` once its parent is certified (None: not yet)."""
        ...

    def members_of(self, epoch: int) -> tuple[bytes, ...]:
        """Who votes in `epoch` (once its parent is certified)."""
        ...

    def current_epoch(self) -> int:
        """The first epoch nobody has a certificate for."""
        ...

    def forge(self, signer: Signer, tag: str, epoch: int) -> Candidate:
        """A value for `epoch` (its parent certified) that honest validity checks accept, different for every
        `tag`, with the attendance and next member set an honest chain computes (`chain_candidate`)."""
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
            if proposer_of(self.world.members_of(epoch), parent, 0) != self.signer.public_key:
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
            if (epoch, rr) not in self.proposed and proposer_of(self.world.members_of(epoch), parent, rr) == own:
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
            following = self.world.name_of[proposer_of(self.world.members_of(epoch), parent, r + 1)]
            left_out = following if following in self._others() else self.rng.choice(self._others())
            self.left_out[(epoch, r)] = left_out
            sides = ([p for p in self._others() if p != left_out],)
        for side, label in zip(sides, ("equivocator-a", "equivocator-b"), strict=False):
            tag = f"{label}/{self.signer.public_key.hex()[:8]}/{r}"
            forged = self.world.forge(self.signer, tag, epoch)
            value = forged.value
            unsigned = Proposal(value, forged.next_members, r, -1, self.signer.public_key, bytes(64), ())
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
LIVE_DRAW = MembershipConfig().max_peers // 2
"""Members each member draws as its live peers (`PeerUp`) when there are more than `max_peers`; with the links the
others draw to it, about `max_peers` (a real peer's live set is bounded by `p2p.membership`'s `max_peers`)."""


@dataclass
class EpochRecord:
    """What happened to one epoch, for the per-epoch table."""

    epoch: int
    boundary_round: int
    started_s: float = math.nan  # the first honest member's checkpoint at the boundary
    decided_at_s: dict[PeerId, float] = field(default_factory=dict)  # honest members only
    consensus_round: int = -1
    signers: int = 0
    members: int = 0  # who voted in the epoch (from the first certificate's chain)
    next_members: int = 0  # who votes in the next one (the certificate's `next_members`)
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
            "members": self.members,
            "next_members": self.next_members,
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
        self.genesis = ChainGenesis(SWARM_ID, self.members)
        self.name_of = {s.public_key: name for name, s in self.signers.items()}
        self.all_peers = sorted(members)
        self.honest = [p for p in self.all_peers if p not in roles]
        self.genesis_parent = self.genesis.parent_hash
        self.verifier = SignatureVerifier(max_entries=1 << 18)
        self.spec_hash = spec_hash
        self._sizes = VoteSizes()
        self.sim = Simulator(loop, network, self._sizes, host=self, on_sent=self._sent)
        self.fetch = Simulator(loop, network, self._chunk_size, host=self, on_sent=self._sent)
        self.fetch_config = SampleFetchConfig(swarm_id=SWARM_ID)
        self._rngs = {name: random.Random(f"{seed}/consensus/{name}") for name in members}
        self.live_peers = self._draw_live_peers(seed)
        self.checkpoints: dict[PeerId, dict[int, CheckpointTree]] = {name: {} for name in members}
        self.chains: dict[PeerId, list[Certificate]] = {name: [] for name in members}
        self._persisted: dict[PeerId, VoterState] = {}
        self._checks: dict[tuple[PeerId, int, bytes], tuple[bytes, tuple[int, ...], CheckpointTree]] = {}
        self.certified: dict[int, Certificate] = {}  # epoch -> the first certificate seen (the run's chain)
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

    def _draw_live_peers(self, seed: int) -> dict[PeerId, list[PeerId]]:
        """Each member's live peers among the members: all the others up to `max_peers` + 1 members, else the
        `LIVE_DRAW` it draws and those that drew it (a connection is both ways)."""
        names = self.all_peers
        if len(names) <= 2 * LIVE_DRAW + 1:
            return {name: [p for p in names if p != name] for name in names}
        linked: dict[PeerId, set[PeerId]] = {name: set() for name in names}
        for name in names:
            rng = random.Random(f"{seed}/live/{name}")
            for other in rng.sample([p for p in names if p != name], LIVE_DRAW):
                linked[name].add(other)
                linked[other].add(name)
        return {name: sorted(peers) for name, peers in linked.items()}

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
        chain = EpochChain(
            self.config,
            self.signers[name],
            self.genesis,
            self.chains[name],
            self.name_of.__getitem__,
            verifier=self.verifier,
            state=self._persisted.get(name),
        )
        self.sim.add(name, chain)
        for other in self.live_peers[name]:
            if self.fetch.has(other):  # the peer's live set (and the other's, if it runs a chain)
                self.sim.step(name, PeerUp(other))
                self.sim.step(other, PeerUp(name))
        for epoch, tree in sorted(self.checkpoints[name].items()):  # on disk: a restart keeps its checkpoints
            if epoch > len(self.chains[name]):
                self.sim.step(name, self._checkpoint(epoch, tree))

    def peer_down(self, name: PeerId) -> None:
        if name not in self.signers:
            return
        self.sim.remove(name)
        self.fetch.remove(name)
        for other in self.live_peers[name]:
            self.sim.step(other, PeerDown(name))

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
            self.sim.step(name, self._checkpoint(epoch, tree))

    def _checkpoint(self, epoch: int, tree: CheckpointTree) -> Checkpoint:
        return Checkpoint(epoch, epoch * self.epoch_rounds, tree.root, self.spec_hash)

    # ---- EquivocatorWorld ---------------------------------------------------------------------------------------

    def members_of(self, epoch: int) -> tuple[bytes, ...]:
        """Who votes in `epoch` by the run's chain (the founders, then each certificate's next member set)."""
        return self.members if epoch == 1 else self.certified[epoch - 1].next_members

    def parent_of(self, epoch: int) -> bytes | None:
        if epoch == 1:
            return self.genesis_parent
        cert = self.certified.get(epoch - 1)
        return None if cert is None else cert.value.hash()

    def current_epoch(self) -> int:
        return 1 + max(self.certified, default=0)

    def forge(self, signer: Signer, tag: str, epoch: int) -> Candidate:
        """The equivocator's current parameters, nudged by 1e-3 of their scale per `tag` (well inside the
        tolerance), as a tree it serves."""
        name = self.name_of[signer.public_key]
        params = self.params_of(name)
        generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big"))
        nudged = params + 1e-3 * params.abs().mean() * torch.randn(params.shape, generator=generator)
        tree = CheckpointTree.from_state({"params": nudged})
        if self.fetch.has(name):
            self.fetch.step(name, HoldTree(epoch, tree))
        certificates = [self.certified[e] for e in range(1, epoch)]
        return chain_candidate(
            self.config, signer, self.genesis, certificates, self.name_of.__getitem__, self.verifier,
            self._checkpoint(epoch, tree),
        )  # fmt: skip

    # ---- the Host of both simulators ----------------------------------------------------------------------------

    def notified(self, peer: PeerId, event: object) -> None:
        if isinstance(event, Certified):
            self._certified(peer, event)
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
            self._check(peer, effect)
        else:
            raise LocalProtocolError(f"the simulated consensus carries out no {type(effect).__name__}")

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0

    # ---- validity checks ----------------------------------------------------------------------------------------

    def _check(self, voter: PeerId, effect: CheckProposal) -> None:
        """The consensus service's check (`ConsensusService._run_effect`): sampled chunks from the proposer against
        this voter's own tree of the epoch (the chain has already refused a wrong spec, attendance or member set)."""
        value = effect.proposal.value
        own = self.checkpoints[voter].get(value.epoch)
        if own is None:
            self._step_later(voter, ProposalChecked(value.epoch, value.hash(), False, "no checkpoint of this epoch"))
            return
        indices = sample_indices(effect.seed, own.chunk_count, DEFAULT_SAMPLE_COUNT)
        request = ChunkRequest(SWARM_ID, value.epoch, value.checkpoint_root, indices)
        self._checks[(voter, value.epoch, value.checkpoint_root)] = (value.hash(), indices, own)
        self.stats["samples_requested"] += 1
        self.fetch.step(voter, FetchSample(self.name_of[effect.proposal.proposer], request))

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

    def _certified(self, peer: PeerId, note: Certified) -> None:
        """What the service does with `Certified` that the run needs: the chain file (here, the member's list)."""
        cert = note.certificate
        epoch = cert.epoch
        chain = self.chains[peer]
        if epoch != len(chain) + 1:
            return
        chain.append(cert)
        known = self.certified.setdefault(epoch, cert)
        if known.value.hash() != cert.value.hash():
            self.conflicting_certificates += 1
        record = self.records.setdefault(epoch, EpochRecord(epoch, epoch * self.epoch_rounds))
        if peer in self.honest:
            record.decided_at_s.setdefault(peer, self.loop.now)
        if record.consensus_round < 0:
            record.consensus_round, record.signers = cert.consensus_round, len(cert.precommits)
            record.members, record.next_members = len(note.members), len(cert.next_members)
            for name in self.all_peers:
                if self.roles.get(name) == "equivocate":
                    self._step_later(name, StartEpoch())

    # ---- sizes and the table ------------------------------------------------------------------------------------

    @staticmethod
    def _chunk_size(msg: object) -> int:
        return len(CHUNK_SCHEMA.encode(msg))

    def _sent(self, msg: object, size: int) -> None:
        """Count a consensus or chunk message sent towards its epoch's record (each receiver of a broadcast)."""
        epoch = epoch_of(msg)
        if epoch < 0:  # a chunk message
            epoch = getattr(msg, "epoch", -1)
        record = self.records.get(epoch)
        if record is not None:
            record.bytes_sent += size
            record.messages_sent += 1

    def epoch_rows(self) -> list[dict[str, object]]:
        return [self.records[e].as_row(len(self.honest)) for e in sorted(self.records)]

    def summary(self) -> dict[str, object]:
        rows = self.epoch_rows()
        latencies = sorted(float(r["commit_latency_s"]) for r in rows if r["honest_decided"])  # type: ignore[arg-type]
        last = self.certified[max(self.certified)] if self.certified else None
        return {
            "members": len(self.members),
            "final_members": len(self.members if last is None else last.next_members),
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
