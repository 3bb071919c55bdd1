"""`ConsensusService`: the trio side of epoch consensus in a peer. Glue only: the rules are `consensus.epochs`
(`EpochChain`, which runs one `EpochAgreement` per epoch) and `consensus.chunk_exchange` (sample and body fetch).

It runs two `Driver`s over the peer's `Transport`: the agreement on `consensus.messages.PROTOCOL` (messages at
most `messages.MAX_MESSAGE_BYTES`) and the chunk exchange on `consensus.chunks.PROTOCOL` (at most
`chunks.MAX_MESSAGE_BYTES`). What it does for the machines:

- **Checkpoints.** `submit_checkpoint(epoch, round, state)` (from the training thread; it returns at once) builds
  the `CheckpointTree` of the state in a worker thread, holds it for serving and hands the machine a `Checkpoint`.
  Training never waits for consensus: the only cost on the training thread is one hop onto the event loop.
- **No amnesia.** `Persist(state)` is written by the driver's `run_durable` hook, inline, before any send that
  follows it in the same action list: encoded with `agreement.STATE_SCHEMA` to a temporary file, fsynced, renamed
  over `voter-state`, the directory fsynced. A restarted service reads it back and the machine resumes that epoch
  with the same votes.
- **Checks.** `CheckProposal`: the sample indices from the voter's seed, a `FetchSample` from the proposer, then
  `check_sample` against this peer's own tree of the same epoch (worker thread), answered as `ProposalChecked`.
- **Decisions.** `Certified`: the certificate is appended to the chain file (fsynced), the certified body is kept
  (this peer's own bytes when it proposed the value, else fetched once with `FetchBody`, the proposer first, then
  the other members), and `on_certified` is called with a `CertifiedEpoch` (what the peer logs and reports).
- **Joiners.** The newest certified checkpoint whose body this peer keeps (its own, fetched, adopted, or after a
  restart read back from `bodies/`) is offered with the chain up to it (`HoldChain`, `consensus.certified_join`).
  `join_certified(peers, spec, ...)` runs a join for a peer with no checkpoint: refusals are logged one line each
  (naming the peer and the reason), and a checkpoint that checks out is adopted (`AdoptChain`; its certificates
  are appended to the chain file on `ChainAdopted`, its body kept and offered on).
- **Divergence repair.** Once a fetched certified body is kept and this peer has its own tree of that epoch,
  `consensus.repair.repair_decision` compares them, every chunk, in a worker; when this peer lies farther than the
  tolerance, `on_diverged` gets a `Divergence` with the certified bytes (the peer adopts them at its next round).
  A peer whose own checkpoint was certified has nothing to repair. `repair_at_start(state)` runs the same rule on
  a restarted peer's resumed state against the newest certified body on disk.
- **Opening the chain.** `consensus.provenance.open_chain` at construction: a truncated tail is cut back with a
  warning (the cut bytes kept beside the file); any other damage, a genesis other than the configured one, a
  certificate of another swarm or one that does not verify raises, naming the file, and the file is left as it is.

Files, in `directory` (the peer's `<data_dir>/consensus/`):

    chain                                 the chain file (`consensus.provenance`: genesis record, then certificates)
    voter-state                           the persisted `VoterState` of the epoch being agreed
    bodies/epoch-<E:06d>-<root:16>.params the certified checkpoint of epoch E: its canonical bytes
                                          (`consensus.merkle.canonical_bytes`), whose Merkle root the certificate names
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trio

from consensus import chunks, messages
from consensus.agreement import (
    STATE_SCHEMA,
    AgreementConfig,
    CheckProposal,
    EquivocationFound,
    Persist,
    ProposalChecked,
    VoterState,
    proposer_of,
)
from consensus.body_fetch import BodyFailed, BodyFetchConfig, BodyFetched, BodyPeerFailed, FetchBody
from consensus.canonical import layout_spec_hash, spec_layout
from consensus.certified_join import (
    CertifiedJoinConfig,
    HoldChain,
    JoinCertified,
    Joined,
    JoinFailed,
    JoinOfferRefused,
    NothingCertified,
)
from consensus.certified_offer import TaskOfferChecks
from consensus.chain import ChainLog
from consensus.chunk_exchange import ChunkExchange
from consensus.chunks import ChunkRequest, check_sample, sample_indices
from consensus.epochs import AdoptChain, Certified, ChainAdopted, Checkpoint, EpochChain
from consensus.membership import MembershipPolicy
from consensus.merkle import CheckpointTree, chunk_count_of
from consensus.messages import Certificate, Signed
from consensus.provenance import (
    ChainGenesis,
    append_certificate,
    open_chain,
)
from consensus.repair import RepairDecision, repair_decision
from consensus.sample_fetch import (
    FetchSample,
    HoldTree,
    ReleaseBelow,
    SampleFailed,
    SampleFetchConfig,
    SampleFetched,
)
from consensus.signing import Signer
from swarmgrad.core.driver import Driver, PeerErrorHook
from swarmgrad.core.errors import DecodeError, LocalProtocolError
from swarmgrad.core.machine import Effect, Event, PeerDown, PeerId, PeerUp
from swarmgrad.core.transport import Transport
from training.tasks.base import TensorSpec

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CHAIN_FILE = "chain"
STATE_FILE = "voter-state"
BODY_DIR = "bodies"


@dataclass(frozen=True)
class ConsensusSettings:
    """What the service needs besides its transport and keys (the peer fills it from `[consensus]`)."""

    agreement: AgreementConfig
    tolerance: float = chunks.DEFAULT_TOLERANCE
    sample_chunks: int = chunks.DEFAULT_SAMPLE_COUNT
    sample_timeout_s: float = 2.0
    body_timeout_s: float = 5.0
    join_timeout_s: float = 5.0
    policy: MembershipPolicy = field(default_factory=MembershipPolicy)
    test_forge_offers: str = ""
    """TEST ONLY, hostile: "certificate" or "body" serves joiners a forged offer (see `_offer`)."""


@dataclass(frozen=True)
class CertifiedEpoch:
    """One certified epoch as the user sees it."""

    epoch: int
    round: int
    root: bytes
    proposer: PeerId
    signers: int
    members: int
    commit_latency_s: float | None
    """From this peer's checkpoint of the epoch to the certificate (None: it had no checkpoint of its own)."""
    chain_path: Path


@dataclass(frozen=True)
class Divergence:
    """This peer's own parameters at the boundary of `epoch` lie farther than the tolerance from the certified
    checkpoint of that epoch (`decision` says how far, and where): the peer adopts the certified checkpoint, whose
    canonical bytes are `body` (their Merkle root is the certificate's `root`). `at_start`: found when the peer
    restarted (its resumed checkpoint against the newest certified body on disk), else at run time."""

    epoch: int
    round: int
    root: bytes
    body: bytes
    decision: RepairDecision
    tolerance: float
    at_start: bool


def model_spec_hash(tree: CheckpointTree) -> bytes:
    """What `EpochValue.model_spec_hash` names: the canonical header (every tensor's name, dtype and shape), hashed
    as `consensus.canonical.model_spec_hash` hashes a task's spec, so that a joiner's check of the spec agrees."""
    return layout_spec_hash(tree.layout)


def body_path(directory: Path, epoch: int, root: bytes) -> Path:
    return directory / BODY_DIR / f"epoch-{epoch:06d}-{root.hex()[:16]}.params"


def write_atomically(path: Path, data: bytes | memoryview) -> None:
    """`data` at `path`, or the old file: a temporary file, fsynced, renamed over it, the directory fsynced."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ConsensusService:
    """A peer's epoch consensus; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        signer: Signer,
        genesis: ChainGenesis,
        directory: Path,
        settings: ConsensusSettings,
        peer_of_key: Callable[[bytes], PeerId],
        *,
        on_certified: Callable[[CertifiedEpoch], None] | None = None,
        on_diverged: Callable[[Divergence], Awaitable[None]] | None = None,
        on_peer_error: PeerErrorHook | None = None,
        spec: Mapping[str, TensorSpec] | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.genesis = genesis
        self.directory = directory
        self.peer_of_key = peer_of_key
        self.on_certified = on_certified
        self.on_peer_error = on_peer_error
        self.spec = spec
        self.on_diverged = on_diverged
        (directory / BODY_DIR).mkdir(parents=True, exist_ok=True)
        self.chain_path = directory / CHAIN_FILE
        certificates = self._open_chain()
        self.state_path = directory / STATE_FILE
        self.machine = EpochChain(
            settings.agreement,
            signer,
            genesis,
            certificates,
            peer_of_key,
            policy=settings.policy,
            state=self._load_state(),
        )
        self.driver = Driver(
            self.machine,
            transport,
            messages.PROTOCOL,
            messages.SCHEMA,
            max_message_bytes=messages.MAX_MESSAGE_BYTES,
            on_peer_error=on_peer_error,
            run_effect=self._run_effect,
            run_durable=self._run_durable,
        )
        swarm = genesis.swarm_id
        self.exchange = ChunkExchange(
            SampleFetchConfig(swarm, timeout_s=settings.sample_timeout_s),
            BodyFetchConfig(swarm, timeout_s=settings.body_timeout_s),
            CertifiedJoinConfig(swarm, timeout_s=settings.join_timeout_s),
        )
        self.chunk_driver = Driver(
            self.exchange,
            transport,
            chunks.PROTOCOL,
            chunks.SCHEMA,
            max_message_bytes=chunks.MAX_MESSAGE_BYTES,
            on_peer_error=on_peer_error,
        )
        self._trees: dict[int, CheckpointTree] = {}
        self._started_at: dict[int, float] = {}
        self._samples: dict[tuple[PeerId, int, bytes], tuple[trio.Event, list[object]]] = {}
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self.certified: list[CertifiedEpoch] = []
        self._join_outcome: tuple[trio.Event, list[Joined | NothingCertified | JoinFailed]] | None = None
        self._offered_body: tuple[int, CheckpointTree] | None = None
        self.offered_epoch = 0
        """The epoch of the certified checkpoint this peer serves joiners (0: none)."""

    # ---- files --------------------------------------------------------------------------------------------------

    def _open_chain(self) -> list[Certificate]:
        """`consensus.provenance.open_chain`: a truncated tail is cut back (the cut bytes kept aside) with a warning;
        damage, another genesis, a certificate of another swarm or one that does not verify raise, naming the file."""
        opened = open_chain(self.chain_path, self.genesis)
        self._log: ChainLog = opened.log
        return list(opened.certificates)

    def _load_state(self) -> VoterState | None:
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = STATE_SCHEMA.decode(data)
        except DecodeError as exc:
            raise LocalProtocolError(f"{self.state_path}: the persisted voter state does not decode: {exc}") from exc
        if not isinstance(state, VoterState) or state.swarm_id != self.genesis.swarm_id:
            raise LocalProtocolError(f"{self.state_path}: not a voter state of swarm {self.genesis.swarm_id!r}")
        return state

    def _run_durable(self, effect: Effect) -> bool:
        if not isinstance(effect, Persist):
            return False
        write_atomically(self.state_path, STATE_SCHEMA.encode(effect.state))
        return True

    # ---- trio ---------------------------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.driver.run)
            await nursery.start(self.chunk_driver.run)
            nursery.start_soon(self._follow_agreement)
            nursery.start_soon(self._follow_chunks)
            if self.spec is not None:
                await self._offer_kept_body(self.spec)
            if not self.offered_epoch:
                self._hold_chain()
            task_status.started()

    def peer_up(self, peer: PeerId) -> None:
        self.driver.submit(PeerUp(peer))

    def peer_down(self, peer: PeerId) -> None:
        self.driver.submit(PeerDown(peer))
        self.chunk_driver.submit(PeerDown(peer))

    def submit_checkpoint(self, epoch: int, round_: int, state: dict[str, torch.Tensor]) -> None:
        """From the training thread: this peer's parameters at the boundary of `epoch`. Returns at once."""
        if self._token is None or self._nursery is None:
            raise LocalProtocolError("ConsensusService.run() must be started before submit_checkpoint()")
        nursery = self._nursery
        trio.from_thread.run_sync(nursery.start_soon, self._prepare, epoch, round_, state, trio_token=self._token)

    async def _prepare(self, epoch: int, round_: int, state: dict[str, torch.Tensor]) -> None:
        tree = await trio.to_thread.run_sync(CheckpointTree.from_state, state)
        self._trees[epoch] = tree
        self._started_at[epoch] = trio.current_time()
        self.chunk_driver.submit(HoldTree(epoch, tree))
        self.driver.submit(Checkpoint(epoch, round_, tree.root, model_spec_hash(tree)))

    async def _run_effect(self, effect: Effect) -> Event | None:
        if not isinstance(effect, CheckProposal):
            raise LocalProtocolError(f"the consensus service carries out no {type(effect).__name__}")
        proposal = effect.proposal
        value = proposal.value
        own = self._trees.get(value.epoch)
        if own is None:
            return ProposalChecked(value.epoch, value.hash(), False, "no checkpoint of this epoch here")
        indices = sample_indices(effect.seed, own.chunk_count, self.settings.sample_chunks)
        peer = self.peer_of_key(proposal.proposer)
        key = (peer, value.epoch, value.checkpoint_root)
        done, answer = trio.Event(), list[object]()
        self._samples[key] = (done, answer)
        self.chunk_driver.submit(FetchSample(peer, ChunkRequest(value.swarm_id, value.epoch, key[2], indices)))
        try:
            await done.wait()
        finally:
            del self._samples[key]
        outcome = answer[0]
        if isinstance(outcome, SampleFailed):
            reason: str | None = f"no sample from the proposer: {outcome.reason}"
        else:
            assert isinstance(outcome, SampleFetched), "only fetch outcomes are collected"
            reason = await trio.to_thread.run_sync(
                check_sample, key[2], own.chunk_count, indices, outcome.answer, own, self.settings.tolerance
            )
        if reason is not None:
            log.info("epoch %d: refused the proposal of %s: %s", value.epoch, peer, reason)
        return ProposalChecked(value.epoch, value.hash(), reason is None, reason or "")

    async def _follow_agreement(self) -> None:
        async for note in self.driver.notifications:
            if isinstance(note, Certified):
                await self._on_certified(note)
                self._hold_chain()  # joiners are offered the chain up to its newest certificate
            elif isinstance(note, ChainAdopted):
                self._chain_adopted(note)
            elif isinstance(note, EquivocationFound):
                log.warning("member %s equivocated", note.evidence.offender.hex()[:16])

    def _chain_adopted(self, note: ChainAdopted) -> None:
        for cert in note.certificates:
            append_certificate(self._log, cert)
        self.chunk_driver.submit(ReleaseBelow(note.certificates[-1].epoch))
        self._hold_chain()

    async def _on_certified(self, note: Certified) -> None:
        cert = note.certificate
        value = cert.value
        append_certificate(self._log, cert)
        if value.joiners:
            names = ", ".join(self.peer_of_key(key) for key in value.joiner_keys if key in cert.next_members)
            log.info("epoch %d admits voters from epoch %d: %s", value.epoch, value.epoch + 1, names or "none")
        self.chunk_driver.submit(ReleaseBelow(value.epoch))  # older trees are no longer sampled
        proposer = self.peer_of_key(proposer_of(note.members, value.parent_certificate_hash, cert.consensus_round))
        started = self._started_at.pop(value.epoch, None)
        latency = None if started is None else trio.current_time() - started
        record = CertifiedEpoch(
            value.epoch,
            value.round,
            value.checkpoint_root,
            proposer,
            len(cert.precommits),
            len(note.members),
            latency,
            self.chain_path,
        )
        self.certified.append(record)
        own = self._trees.get(value.epoch)
        path = body_path(self.directory, value.epoch, value.checkpoint_root)
        if own is not None and own.root == value.checkpoint_root:
            await trio.to_thread.run_sync(write_atomically, path, own.data)
            await self._offer(value.epoch, own)
        elif own is not None:
            me = self.transport.local_peer
            others = sorted(self.peer_of_key(key) for key in note.members)
            peers = (proposer, *[p for p in others if p not in (proposer, me)])
            self.chunk_driver.submit(FetchBody(value.epoch, value.checkpoint_root, own.chunk_count, peers))
        for epoch in [e for e in self._trees if e < value.epoch]:
            del self._trees[epoch]
        if self.on_certified is not None:
            self.on_certified(record)

    async def _follow_chunks(self) -> None:
        async for note in self.chunk_driver.notifications:
            if isinstance(note, SampleFetched | SampleFailed):
                waiting = self._samples.get((note.peer, note.request.epoch, note.request.root))
                if waiting is not None:
                    waiting[1].append(note)
                    waiting[0].set()
            elif isinstance(note, BodyFetched):
                await self._keep_body(note)
            elif isinstance(note, BodyPeerFailed):
                log.info("epoch %d: body of %s from %s: %s", note.epoch, note.root.hex()[:16], note.peer, note.reason)
            elif isinstance(note, BodyFailed):
                log.warning("epoch %d: no peer gave the certified body %s", note.epoch, note.root.hex()[:16])
            elif isinstance(note, JoinOfferRefused):
                self._join_refused(note)
            elif isinstance(note, Joined | NothingCertified | JoinFailed):
                if self._join_outcome is not None:
                    self._join_outcome[1].append(note)
                    self._join_outcome[0].set()

    async def _keep_body(self, note: BodyFetched) -> None:
        data = b"".join(note.chunks)
        path = body_path(self.directory, note.epoch, note.root)
        await trio.to_thread.run_sync(write_atomically, path, data)
        own = self._trees.get(note.epoch) or next(iter(self._trees.values()), None)
        tree = None
        if own is not None and len(data) == own.total_size_bytes:
            tree = await trio.to_thread.run_sync(CheckpointTree, memoryview(data), own.layout)
            if tree.root == note.root:  # the chunks were proven one by one; serve the body to others too
                self.chunk_driver.submit(HoldTree(note.epoch, tree))
                await self._offer(note.epoch, tree)
        log.info("epoch %d: kept the certified body %s (%d bytes)", note.epoch, note.root.hex()[:16], len(data))
        mine = self._trees.get(note.epoch)
        record = next((r for r in reversed(self.certified) if r.epoch == note.epoch), None)
        if mine is not None and tree is not None and tree.root == note.root and record is not None:
            assert self._nursery is not None, "notes arrive only while run() runs"
            # in its own task: the chunk notes (sample answers included) keep flowing while it compares every chunk
            self._nursery.start_soon(
                functools.partial(self._repair_if_diverged, note.epoch, record.round, mine, tree, at_start=False)
            )

    # ---- joining from certified state, and serving joiners ------------------------------------------------------

    async def join_certified(
        self,
        peers: Sequence[PeerId],
        spec: Mapping[str, TensorSpec],
        *,
        max_body_bytes: int,
        trusted_hash: bytes | None = None,
    ) -> Joined | NothingCertified | JoinFailed:
        """Start from the newest certified checkpoint one of `peers` offers (`consensus.certified_join`): each
        refusal is logged (one line naming the peer and the reason); a `Joined` checkpoint is adopted here (its
        certificates join the chain, its body is kept and served on) before it is returned."""
        if self._join_outcome is not None:
            raise LocalProtocolError("a certified join is already running")
        checks = TaskOfferChecks(self.genesis, spec, max_body_bytes, trusted_hash)
        chunk_count = chunk_count_of(spec_layout(spec).total_size_bytes)
        done, outcome = trio.Event(), list[Joined | NothingCertified | JoinFailed]()
        self._join_outcome = (done, outcome)
        try:
            self.chunk_driver.submit(JoinCertified(tuple(peers), chunk_count, tuple(self.machine.chain), checks))
            await done.wait()
        finally:
            self._join_outcome = None
        result = outcome[0]
        if isinstance(result, Joined):
            await self._adopt(result)
        return result

    def _join_refused(self, note: JoinOfferRefused) -> None:
        if note.misbehaved:
            log.warning("refused the certified offer of %s: %s", note.peer, note.reason)
            if self.on_peer_error is not None:
                self.on_peer_error(note.peer, f"bad certified offer: {note.reason}")
        else:
            log.info("no certified offer from %s: %s", note.peer, note.reason)

    async def _adopt(self, joined: Joined) -> None:
        checkpoint = joined.checkpoint
        epoch, root = checkpoint.certificate.epoch, checkpoint.certificate.value.checkpoint_root
        await trio.to_thread.run_sync(write_atomically, body_path(self.directory, epoch, root), checkpoint.tree.data)
        self.driver.submit(AdoptChain(joined.certificates))
        await self._offer(epoch, checkpoint.tree, joined.certificates)

    async def _offer(self, epoch: int, tree: CheckpointTree, chain: Sequence[Certificate] | None = None) -> None:
        """Offer joiners the certified checkpoint of `epoch` (unless a later one is offered), whose body `tree` this
        peer keeps, beside its chain. Under `test_forge_offers` = "body" the chunks served are those of another body
        (one byte changed) under the certified root."""
        if self._offered_body is not None and epoch <= self._offered_body[0]:
            return
        if self.settings.test_forge_offers == "body":
            data = bytearray(tree.data)
            data[-1] ^= 1
            forged = await trio.to_thread.run_sync(CheckpointTree, memoryview(data), tree.layout)
            forged.root = tree.root  # the certified name on other bytes: every proof leads elsewhere
            tree = forged
        self._offered_body = (epoch, tree)
        self.offered_epoch = epoch
        self._hold_chain(chain)

    def _hold_chain(self, chain: Sequence[Certificate] | None = None) -> None:
        """Hand the join machine this peer's chain (`chain`, else the machine's) and the offered body. Under
        `test_forge_offers` = "certificate" one signature of the body's certificate is altered."""
        certificates = tuple(self.machine.chain if chain is None else chain)
        body = self._offered_body
        if body is None or body[0] > len(certificates):
            self.chunk_driver.submit(HoldChain(self.genesis, ()))
            return
        epoch, tree = body
        if self.settings.test_forge_offers == "certificate":
            cert = certificates[epoch - 1]
            first = cert.precommits[0]
            altered = Signed(first.member, bytes([first.signature[0] ^ 1]) + first.signature[1:])
            forged = Certificate(cert.value, cert.next_members, cert.consensus_round, (altered, *cert.precommits[1:]))
            certificates = (*certificates[: epoch - 1], forged, *certificates[epoch:])
        self.chunk_driver.submit(HoldChain(self.genesis, certificates, epoch, tree))

    async def _offer_kept_body(self, spec: Mapping[str, TensorSpec]) -> None:
        """At start: offer the newest kept certified body (after a restart this peer serves it again)."""
        chain = list(self.machine.chain)
        layout = spec_layout(spec)
        kept = []
        for path in (self.directory / BODY_DIR).glob("epoch-*.params"):
            match = _BODY_NAME.fullmatch(path.name)
            if match is None:
                continue
            epoch = int(match.group(1))
            if 1 <= epoch <= len(chain) and chain[epoch - 1].value.checkpoint_root.hex()[:16] == match.group(2):
                kept.append((epoch, path))
        for epoch, path in sorted(kept, reverse=True):
            data = await trio.to_thread.run_sync(path.read_bytes)
            if len(data) == layout.total_size_bytes:
                tree = await trio.to_thread.run_sync(CheckpointTree, memoryview(data), layout)
                if tree.root == chain[epoch - 1].value.checkpoint_root:
                    await self._offer(epoch, tree)
                    log.info("serving the kept certified body of epoch %d to joiners", epoch)
                    return
            log.warning("%s is not the certified body of epoch %d: not served", path, epoch)

    # ---- divergence repair --------------------------------------------------------------------------------------

    async def repair_at_start(self, state: dict[str, torch.Tensor]) -> None:
        """After a restart, before training: this peer's resumed `state` against the body of the newest certified
        epoch in its chain, when that body is on disk (and still hashes to the certified root), by the same rule as at
        run time; `on_diverged` when it adopts."""
        if not self.machine.chain:
            return
        value = self.machine.chain[-1].value
        path = body_path(self.directory, value.epoch, value.checkpoint_root)
        try:
            data = await trio.to_thread.run_sync(path.read_bytes)
        except FileNotFoundError:
            log.info("epoch %d: the certified body is not on disk: no divergence check at start", value.epoch)
            return
        own = await trio.to_thread.run_sync(CheckpointTree.from_state, state)
        if len(data) != own.total_size_bytes:
            size = own.total_size_bytes
            log.warning("%s: %d bytes, not this model's %d: the certified body is not used", path, len(data), size)
            return
        certified = await trio.to_thread.run_sync(CheckpointTree, memoryview(data), own.layout)
        if certified.root != value.checkpoint_root:
            log.warning("%s: does not hash to epoch %d's certified root (damaged on disk): not used", path, value.epoch)
            return
        await self._repair_if_diverged(value.epoch, value.round, own, certified, at_start=True)

    async def _repair_if_diverged(
        self, epoch: int, round_: int, own: CheckpointTree, certified: CheckpointTree, *, at_start: bool
    ) -> None:
        """`consensus.repair.repair_decision` of this peer's `own` tree at the boundary of `epoch` against the
        `certified` one, in a worker; when it adopts, `on_diverged` (the peer hands the state to its training)."""
        if self.on_diverged is None:
            return
        tolerance = self.settings.tolerance
        decision = await trio.to_thread.run_sync(repair_decision, own, certified, tolerance)
        log.debug("epoch %d: divergence check: %s", epoch, decision.reason)
        if decision.adopt:
            body = bytes(certified.data)
            await self.on_diverged(Divergence(epoch, round_, certified.root, body, decision, tolerance, at_start))


_BODY_NAME = re.compile(r"epoch-(\d{6,})-([0-9a-f]{16})\.params")
