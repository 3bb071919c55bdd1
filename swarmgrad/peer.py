"""`swarmgrad peer`: one training member of a swarm, as a user runs it on a Linux host.

This module assembles the parts and owns only the glue: the subcommand's flags (merged over the TOML config, see
`swarmgrad.config`), the data directory (`identity.key`, `checkpoints/`, `peer.log`), the trio side (the p2p node
with discovery and membership, a `LibP2PTransport` on its host, the gossip service, the model-fetch driver, signal
handling, the optional Prometheus endpoint) and the training thread that runs `training.loop.TrainingLoop`. It holds
no protocol logic and no training math.

Life of a peer: load the config and the task; resume from its own newest checkpoint, if any; join the swarm; with no
checkpoint of its own, start from a neighbour's newest certified checkpoint when consensus is on (its chain verified
from genesis or `--trust-epoch`, its body against the certified root), or, while the swarm has certified nothing,
fetch the current model from a neighbour (validated against the task, never unpickled); a bad offer is refused with
a log line and the next neighbour is asked; train until `max_rounds` or a signal. SIGINT or
SIGTERM lets the current round finish, saves a checkpoint and leaves the swarm.

Exit status: 0 finished or stopped cleanly (checkpoint saved); 1 a runtime failure (bootstrap unreachable, port in
use, swarm key or identity file unusable, ...); 2 a configuration or usage error (unknown task or key, bad value or
multiaddr, unwritable data directory). Errors are one line on stderr naming the problem (`swarmgrad.cli.main`).

With `--json`, one JSON object per line on stdout (`listening`, `reachability` at each verdict, `model`, `round` at
each evaluation, `epoch`, `certified`, `repaired`, `finished`), for scripts and tests; the progress display goes to
stderr.

Divergence repair: when an epoch is certified and this peer's own parameters at that boundary lie farther than the
tolerance from the certified checkpoint (or, after a restart, its resumed checkpoint from the newest certified
body on disk), the training thread adopts the certified checkpoint at its next round, with one log line and a
`repaired` event; a peer within the tolerance keeps its own state (docs/consensus.md).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as CryptoEd25519PrivateKey
from prometheus_client import CollectorRegistry, Enum, Gauge, start_http_server

from consensus.canonical import CanonicalBytesError, decode_canonical
from consensus.certified_join import Joined, NothingCertified
from consensus.membership import genesis_members
from consensus.provenance import ChainGenesis
from consensus.service import CertifiedEpoch, ConsensusService, ConsensusSettings, Divergence
from consensus.signing import Signer
from gossip.messages import model_fingerprint
from gossip.service import GossipService
from p2p.identity import (
    load_or_create_identity,
    peer_id_of,
    peer_id_of_public_key,
    public_key_of_peer_id,
    signing_seed,
)
from p2p.libp2p_transport import LibP2PTransport
from p2p.model_fetch import (
    MESSAGE_OVERHEAD_BYTES,
    PROTOCOL,
    SCHEMA,
    DeclineRequest,
    FetchFailed,
    FetchModel,
    ModelAdopted,
    ModelFetch,
    ModelOffer,
    ModelRequested,
    OfferRefused,
    ServeModel,
)
from p2p.node import SwarmNode, open_node
from p2p.reachability import Reachability, ReachabilityChanged
from p2p.relay import RelayAddrsChanged
from swarmgrad.config import PeerConfig, load_config
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError, SwarmgradError
from swarmgrad.core.machine import PeerDown, PeerUp
from swarmgrad.netconfig import IDENTITY_FILE, add_network_arguments, network_overrides
from training.checkpoint import CheckpointStore, config_hash, decode_state, encode_state
from training.loop import EpochReached, RoundReport, TrainingLoop
from training.tasks import Task, load_task
from training.tasks.base import Evaluation, model_spec, peer_seed

log = logging.getLogger(__name__)
FetchOutcome = ModelAdopted | OfferRefused | FetchFailed

CHECKPOINT_DIR = "checkpoints"
CONSENSUS_DIR = "consensus"
LOG_FILE = "peer.log"
EXIT_OK = 0


# ---- command line -------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `swarmgrad peer` (called by `swarmgrad.cli`)."""
    parser = subparsers.add_parser(
        "peer",
        help="train with a swarm (see docs/peer.md)",
        description="Train a task with a swarm of peers. Flags override the --config file; see docs/peer.md.",
    )
    add_network_arguments(parser)
    parser.add_argument("--task", help="digits, charlm, or package.module:factory (peer.task)")
    parser.add_argument("--max-rounds", type=int, help="stop after this many rounds (training.max_rounds)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus metrics here (metrics.prometheus_port)")
    parser.add_argument("--progress", choices=["auto", "tty", "plain"], help="progress display (metrics.progress)")
    parser.add_argument(
        "--founders",
        metavar="ID,ID,...",
        help="peer ids that vote in epoch 1, comma-separated (consensus.founders; default: the bootstrap peers)",
    )
    parser.add_argument(
        "--trust-epoch",
        metavar="HASH",
        help="verify a joiner's chain from this certificate's value hash, not genesis (consensus.trust_epoch)",
    )
    parser.add_argument(
        "--no-consensus", action="store_true", help="train without epoch consensus (consensus.enabled = false)"
    )
    parser.set_defaults(run=run_peer)


def config_from_args(args: argparse.Namespace) -> PeerConfig:
    """The config file with the flags applied on top. Raises `ConfigError` naming the field."""
    overrides = network_overrides(args)
    flags = {
        "peer.task": args.task,
        "training.max_rounds": args.max_rounds,
        "metrics.prometheus_port": args.metrics_port,
        "metrics.progress": args.progress,
    }
    if args.founders is not None:
        flags["consensus.founders"] = [text.strip() for text in args.founders.split(",") if text.strip()]
    if args.trust_epoch is not None:
        flags["consensus.trust_epoch"] = args.trust_epoch
    if args.no_consensus:
        flags["consensus.enabled"] = False
    overrides.update({key: value for key, value in flags.items() if value is not None})
    return load_config(args.config, overrides)


def genesis_founders(config: PeerConfig, own_peer_id: str) -> tuple[str, ...]:
    """The genesis rule: `consensus.founders` when given; else the peers named by `network.bootstrap` (their
    `/p2p/` ids); else this peer alone. Consistent across a swarm only when every peer is given the same founders
    or bootstraps from the same peers (the first peer, with no bootstrap, then names itself: the same set)."""
    if config.consensus.founders:
        return config.consensus.founders
    named = sorted({addr.rsplit("/p2p/", 1)[1] for addr in config.network.bootstrap if "/p2p/" in addr})
    return tuple(named) or (own_peer_id,)


def run_peer(args: argparse.Namespace) -> int:
    """The `swarmgrad peer` subcommand."""
    config = config_from_args(args)
    data_dir = prepare_data_dir(config.peer.data_dir)
    _log_to_file(data_dir / LOG_FILE, config.peer.log_level)
    task = load_task(config.peer.task)
    if config.peer.torch_threads:
        torch.set_num_threads(config.peer.torch_threads)
    events = EventLog(sys.stdout if args.json else None)
    peer = Peer(config, task, data_dir, events)
    return trio.run(peer.serve)


def prepare_data_dir(path: Path) -> Path:
    """Create the data directory if needed; a `ConfigError` on `peer.data_dir` unless it is a writable directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError("peer.data_dir", str(path), f"a directory this user can create ({exc.strerror})") from exc
    if not path.is_dir() or not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError("peer.data_dir", str(path), "a directory this user can read and write")
    return path


def _log_to_file(path: Path, level_name: str) -> None:
    root = logging.getLogger()
    level = getattr(logging, level_name.upper())
    for handler in root.handlers:  # the console keeps the level the CLI set
        if handler.level == logging.NOTSET:
            handler.setLevel(root.level)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(root.level, level))


# ---- output -------------------------------------------------------------------------------------------------------


class EventLog:
    """JSON lines on `stream` (or nothing), written whole from either thread."""

    def __init__(self, stream: IO[str] | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> None:
        if self._stream is None:
            return
        line = json.dumps({"event": event, "unix_s": round(time.time(), 3), **fields}, sort_keys=True)
        with self._lock:
            print(line, file=self._stream, flush=True)


@dataclass
class SwarmView:
    """What the training thread may read of the trio side: plain values, replaced whole."""

    peers: int = 0


class Progress:
    """Round, loss, metric, peers and bytes/s: a status line rewritten in place on a terminal, plain log lines at
    each evaluation otherwise."""

    def __init__(self, stream: IO[str], live: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.live = live
        self.clock = clock
        self._last_time = clock()
        self._last_bytes = 0
        self._last_draw = -math.inf

    def update(self, report: RoundReport, peers: int, evaluation: Evaluation | None) -> None:
        now = self.clock()
        sent = int(report.averager.get("bytes_sent", 0))
        rate = (sent - self._last_bytes) / max(now - self._last_time, 1e-9)
        if not self.live and report.evaluation is None:
            return
        if self.live and report.evaluation is None and now - self._last_draw < 0.25:
            return
        self._last_time, self._last_bytes, self._last_draw = now, sent, now
        metric = "" if evaluation is None else f"  {evaluation.metric} {evaluation.value:.4f}"
        line = (
            f"round {report.round:6d}  epoch {report.epoch:4d}  loss {report.train_loss:.4f}{metric}"
            f"  peers {peers:3d}  sent {sent / 1e6:8.2f} MB  {rate / 1e3:8.1f} kB/s"
        )
        if self.live:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()


class MetricsError(SwarmgradError):
    """The metrics endpoint could not be served (exit status 1, like a `--listen` port in use)."""


class Metrics:
    """The Prometheus gauges, on their own registry, served on `host:port` by prometheus_client's thread. Raises
    `MetricsError` naming the address when it cannot listen there."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.round = Gauge("swarmgrad_round", "Training rounds done", registry=self.registry)
        self.train_loss = Gauge(
            "swarmgrad_train_loss", "Mean local training loss of the last round", registry=self.registry
        )
        self.eval_value = Gauge("swarmgrad_eval_value", "Headline held-out metric", ["metric"], registry=self.registry)
        self.peers = Gauge("swarmgrad_peers", "Live peers in the swarm", registry=self.registry)
        self.bytes_sent = Gauge("swarmgrad_gossip_bytes_sent", "Bytes sent by gossip", registry=self.registry)
        self.certified_epoch = Gauge(
            "swarmgrad_certified_epoch", "Last epoch certified by the swarm's consensus", registry=self.registry
        )
        self.reachability = Enum(
            "swarmgrad_reachability",
            "Whether other peers can dial this one (unknown until the dial-back check decides)",
            states=["unknown", "public", "private"],
            registry=self.registry,
        )
        self.commit_latency = Gauge(
            "swarmgrad_commit_latency_seconds",
            "From this peer's epoch checkpoint to the epoch's certificate, last certified epoch",
            registry=self.registry,
        )
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise MetricsError(f"cannot serve metrics on {host}:{port} (--metrics-port): {reason}") from exc

    def update(self, report: RoundReport, peers: int) -> None:
        self.round.set(report.round)
        self.train_loss.set(report.train_loss)
        if report.evaluation is not None:
            self.eval_value.labels(report.evaluation.metric).set(report.evaluation.value)
        self.peers.set(peers)
        self.bytes_sent.set(float(report.averager.get("bytes_sent", 0)))

    def certified(self, record: CertifiedEpoch) -> None:
        self.certified_epoch.set(record.epoch)
        if record.commit_latency_s is not None:
            self.commit_latency.set(record.commit_latency_s)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the peer -----------------------------------------------------------------------------------------------------


class Peer:
    """One peer's run: see the module docstring."""

    def __init__(self, config: PeerConfig, task: Task, data_dir: Path, events: EventLog) -> None:
        self.config = config
        self.task = task
        self.events = events
        key_path = data_dir / IDENTITY_FILE
        self.key_pair = load_or_create_identity(key_path)
        self.peer_id = peer_id_of(self.key_pair)
        self.data_dir = data_dir
        self.node_config = config.network.node_config(key_path, seed=peer_seed(self.peer_id))
        self.store = CheckpointStore(
            data_dir / CHECKPOINT_DIR, keep=config.checkpoint.keep, max_bytes=config.checkpoint.max_bytes
        )
        self.view = SwarmView()
        self.stop = threading.Event()
        self.progress = Progress(sys.stderr, _live_progress(config.metrics.progress))
        self.metrics: Metrics | None = None
        model = task.build_model()
        # The first optimizer built in a process imports torch's lazy machinery (torch._dynamo, sympy): 3-4 s of CPU
        # on a busy 2-core box. Built here, before trio.run, instead of first in `TrainingLoop()` on the event loop
        # right after joining, where it froze the host long enough for the fresh bootstrap connection to be dropped
        # and delayed the first PeerUp by ~17 s.
        task.optimizer.build(list(model.parameters()))
        self.spec = model_spec(model)
        self.shapes = [tuple(p.shape) for p in model.parameters()]
        self.numel = sum(p.numel() for p in model.parameters())
        self.config_hash = config_hash(config.training_settings())
        self._snapshot_lock = threading.Lock()
        self._snapshot: tuple[int, dict[str, torch.Tensor]] | None = None
        self.remote_errors = 0
        self.consensus: ConsensusService | None = None
        self.loop: TrainingLoop | None = None
        self.epoch_hand_off_s: list[float] = []
        self.epochs_reached = 0
        self.last_epoch_submitted = 0
        self._certified_now: trio.Event | None = None
        self._last_epoch_wait: trio.CancelScope | None = None

    # ---- trio side ----------------------------------------------------------------------------------------------

    async def serve(self) -> int:
        """Join, (resume or fetch,) train, leave. Returns the exit status."""
        if self.config.metrics.prometheus_port:
            self.metrics = Metrics(self.config.metrics.prometheus_host, self.config.metrics.prometheus_port)
        try:
            async with open_node(self.node_config) as node, trio.open_nursery() as nursery:
                status = await self._serve_on(node, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self.progress.close()
            if self.metrics is not None:
                self.metrics.close()
        log.info("left the swarm")
        return status

    async def _serve_on(self, node: SwarmNode, nursery: trio.Nursery) -> int:
        transport = LibP2PTransport(node.host, self.node_config.host, node.policy, nursery, ip_limits=node.ip_limits)
        gossip = GossipService(
            transport,
            self.config.gossip.gossip_config(swarm_id=self.config.network.swarm_id, seed=peer_seed(self.peer_id)),
            numel=self.numel,
            fingerprint=model_fingerprint(self.shapes),
            follow_transport_peers=False,
            on_peer_error=self._peer_error(node),
        )
        fetch = Driver(
            ModelFetch(self.config.checkpoint.fetch_timeout_s, self._check_offer),
            transport,
            PROTOCOL,
            SCHEMA,
            max_message_bytes=self.config.checkpoint.max_bytes + MESSAGE_OVERHEAD_BYTES,
            on_peer_error=self._peer_error(node),
        )
        outcomes_send, outcomes = trio.open_memory_channel[FetchOutcome](4)
        await nursery.start(gossip.run)
        await nursery.start(fetch.run)
        if self.config.consensus.enabled:
            self.consensus = self._consensus_service(transport, node)
            await nursery.start(self.consensus.run)
        nursery.start_soon(self._follow_membership, node, gossip, fetch)
        nursery.start_soon(self._answer_fetch, fetch, outcomes_send)
        nursery.start_soon(self._stop_on_signal)
        self.events.emit("listening", peer_id=self.peer_id, addrs=node.listen_multiaddrs, task=self.task.name)
        log.info("peer %s listening on %s", self.peer_id, ", ".join(node.listen_multiaddrs))

        loop = TrainingLoop(
            self.task,
            gossip,
            self.config.training,
            peer_id=self.peer_id,
            store=self.store,
            config_hash=self.config_hash,
            on_round=lambda report: self._on_round(report, loop),
            on_epoch=lambda reached: self._on_epoch(reached, loop),
        )
        self.loop = loop
        resumed = await trio.to_thread.run_sync(loop.resume)
        if resumed is not None and self.consensus is not None:
            await self.consensus.repair_at_start(loop.state())  # a restart far from the chain repairs (docs/peer.md)
        await self._wait_for_peers(node)
        if resumed is not None:
            self.events.emit("model", source="checkpoint", round=resumed.round, model_hash=resumed.model_hash)
        elif self.config.checkpoint.fetch_from_peers and self.node_config.discovery.bootstrap_addrs:
            with trio.move_on_after(self.config.checkpoint.fetch_timeout_s):
                await node.wait_for_peers(1)
            if self.consensus is None or not await self._join_certified(node, self.consensus, loop):
                await self._fetch_model(node, fetch, outcomes, loop)
        else:
            log.info("no checkpoint and no neighbour to fetch from: starting from the initial %s model", self.task.name)
            self.events.emit("model", source="initial", round=0)
        self._publish(loop.round, loop.state())

        last = await trio.to_thread.run_sync(loop.run, self.stop)
        final = await trio.to_thread.run_sync(self.task.evaluate, loop.model)
        if not self.stop.is_set():
            await self._await_last_epoch()
        stats = gossip.statistics()
        sent_messages = int(stats.get("driver_sent", 0))
        drivers = () if self.consensus is None else (self.consensus.driver, self.consensus.chunk_driver)
        self.events.emit(
            "finished",
            round=loop.round,
            samples=loop.samples,
            metric=final.metric,
            value=final.value,
            loss=final.loss,
            bytes_sent=int(stats.get("transport_bytes_out", 0)),  # gossip, model fetch and consensus
            gossip_bytes_sent=int(stats.get("bytes_sent", 0)),
            consensus_bytes_sent=sum(driver.statistics().get("bytes_sent", 0) for driver in drivers),
            epochs=self.epochs_reached,
            gossip_messages_sent=sent_messages,
            dense_bytes_equivalent=sent_messages * self.numel * 4,
            remote_errors=self.remote_errors,
            contributions=dict(sorted(gossip.contributions.items())),
            stopped_by_signal=self.stop.is_set(),
        )
        log.info(
            "finished at round %d: %s %.4f (%s)", loop.round, final.metric, final.value, "stopped" if last else "idle"
        )
        return EXIT_OK

    async def _await_last_epoch(self) -> None:
        """Training is done: keep consensus running until the epoch checkpointed last is certified, for at most
        `consensus.pending_epoch_wait_s` (the others still vote on it; leaving at once, the last epoch of a swarm
        that stops together never commits)."""
        epoch, consensus = self.last_epoch_submitted, self.consensus
        if consensus is None or not epoch:
            return
        wait_s = self.config.consensus.pending_epoch_wait_s
        with trio.move_on_after(wait_s) as self._last_epoch_wait:
            while not consensus.certified or consensus.certified[-1].epoch < epoch:
                self._certified_now = trio.Event()
                await self._certified_now.wait()
            return
        if not self.stop.is_set():
            log.warning("epoch %d not certified %.1f s after the last round: leaving", epoch, wait_s)

    def _consensus_service(self, transport: LibP2PTransport, node: SwarmNode) -> ConsensusService:
        settings = self.config.consensus
        founders = genesis_founders(self.config, self.peer_id)
        genesis = ChainGenesis(
            self.config.network.swarm_id, genesis_members(public_key_of_peer_id(f) for f in founders)
        )
        log.info("consensus: %d founders (%s)", len(founders), ", ".join(f[-8:] for f in founders))
        return ConsensusService(
            transport,
            Signer(CryptoEd25519PrivateKey.from_private_bytes(signing_seed(self.key_pair))),
            genesis,
            self.data_dir / CONSENSUS_DIR,
            ConsensusSettings(
                settings.agreement_config(),
                tolerance=settings.tolerance,
                sample_chunks=settings.sample_chunks,
                sample_timeout_s=settings.sample_timeout_s,
                body_timeout_s=settings.body_timeout_s,
                join_timeout_s=settings.join_timeout_s,
                policy=settings.policy(),
                test_forge_offers=settings.test_forge_offers,
            ),
            peer_id_of_public_key,
            on_certified=self._on_certified,
            on_diverged=self._on_diverged,
            on_peer_error=self._peer_error(node),
            spec=self.spec,
        )

    def _on_certified(self, record: CertifiedEpoch) -> None:
        latency_ms = None if record.commit_latency_s is None else round(record.commit_latency_s * 1000, 1)
        log.info(
            "certified epoch %d: round %d, root %s, proposer %s, signers %d/%d, commit latency %s ms",
            record.epoch,
            record.round,
            record.root.hex()[:16],
            record.proposer,
            record.signers,
            record.members,
            latency_ms,
        )
        self.events.emit(
            "certified",
            epoch=record.epoch,
            round=record.round,
            root=record.root.hex(),
            proposer=record.proposer,
            signers=record.signers,
            members=record.members,
            commit_latency_ms=latency_ms,
            chain=str(record.chain_path),
        )
        if self.metrics is not None:
            self.metrics.certified(record)
        if self._certified_now is not None:
            self._certified_now.set()

    async def _on_diverged(self, divergence: Divergence) -> None:
        """Divergence repair (docs/consensus.md): this peer's own parameters at a certified boundary lie farther than
        the tolerance from the certified checkpoint, so the training thread adopts it at its next round."""
        decode = functools.partial(decode_canonical, max_bytes=self.config.checkpoint.max_bytes)
        epoch, decision = divergence.epoch, divergence.decision
        try:
            state = await trio.to_thread.run_sync(decode, divergence.body, self.spec)
        except CanonicalBytesError as exc:
            log.warning("epoch %d: the certified checkpoint does not decode here (%s): not adopted", epoch, exc)
            return
        if self.loop is None:
            raise LocalProtocolError("a divergence before the training loop exists")
        log.warning(
            "epoch %d: own parameters are %.3g from the certified checkpoint (> tolerance %.3g): adopting it",
            epoch,
            decision.distance,
            divergence.tolerance,
        )
        self.loop.adopt(state, divergence.round)
        self.events.emit(
            "repaired",
            epoch=epoch,
            round=divergence.round,
            root=divergence.root.hex(),
            distance=decision.distance if math.isfinite(decision.distance) else None,
            chunk=decision.chunk,
            reason=decision.reason,
            tolerance=divergence.tolerance,
            at_start=divergence.at_start,
        )

    def _peer_error(self, node: SwarmNode) -> Callable[[str, str], None]:
        def report(peer: str, reason: str) -> None:
            self.remote_errors += 1
            node.policy.report(peer, reason)

        return report

    async def _follow_membership(self, node: SwarmNode, gossip: GossipService, fetch: Driver) -> None:
        events = node.subscribe()
        for peer in node.live_peers():
            gossip.peer_up(peer)
            if self.consensus is not None:
                self.consensus.peer_up(peer)
        self.view.peers = len(node.live_peers())
        if node.reachability is not None:  # forced by network.reachability: announced before we subscribed
            self._reachability(node.reachability, "set by network.reachability")
        async for event in events:
            if isinstance(event, ReachabilityChanged):
                self._reachability(event.reachability, event.reason)
            elif isinstance(event, PeerUp):
                gossip.peer_up(event.peer)
                if self.consensus is not None:
                    self.consensus.peer_up(event.peer)
                relayed = node.is_relayed(event.peer)
                self.events.emit("peer_up", peer=event.peer, relayed=relayed)
                log.info("peer up: %s%s", event.peer, " (relayed)" if relayed else "")
            elif isinstance(event, PeerDown):
                gossip.peer_down(event.peer)
                if self.consensus is not None:
                    self.consensus.peer_down(event.peer)
                fetch.submit(event)
                log.info("peer down: %s", event.peer)
            elif isinstance(event, RelayAddrsChanged):
                self.events.emit("relayed", relays=list(event.relays), addrs=list(event.addrs))
            self.view.peers = len(node.live_peers())

    def _reachability(self, reachability: Reachability, reason: str) -> None:
        self.events.emit("reachability", reachability=reachability, reason=reason)
        if self.metrics is not None:
            self.metrics.reachability.state(reachability)

    async def _answer_fetch(self, fetch: Driver, outcomes: trio.MemorySendChannel[FetchOutcome]) -> None:
        async for note in fetch.notifications:
            if isinstance(note, ModelRequested):
                with self._snapshot_lock:
                    snapshot = self._snapshot
                if snapshot is None or snapshot[0] == 0:
                    fetch.submit(DeclineRequest(note.peer, note.nonce, "no trained model yet"))
                    continue
                body = await trio.to_thread.run_sync(encode_state, snapshot[1])
                fetch.submit(ServeModel(note.peer, note.nonce, snapshot[0], self.task.name, body))
                log.info("sent the model of round %d to %s (%d bytes)", snapshot[0], note.peer, len(body))
            elif isinstance(note, ModelAdopted | OfferRefused | FetchFailed):
                await outcomes.send(note)

    async def _fetch_model(
        self,
        node: SwarmNode,
        fetch: Driver,
        outcomes: trio.MemoryReceiveChannel[FetchOutcome],
        loop: TrainingLoop,
    ) -> None:
        """Ask neighbours for the current model (the `ModelFetch` machine's policy: one at a time, each offer checked
        by `_check_offer`, the first valid one adopted). Training starts from the task's initial model when none is
        given in `fetch_timeout_s` per neighbour."""
        fetch.submit(FetchModel(_fetch_candidates(node)))
        async for outcome in outcomes:
            if isinstance(outcome, OfferRefused):
                self.remote_errors += 1
                node.policy.report(outcome.peer, f"bad model offer: {outcome.reason}")
                log.warning("refused the model offered by %s: %s", outcome.peer, outcome.reason)
                self.events.emit("model_refused", peer=outcome.peer, reason=outcome.reason)
            elif isinstance(outcome, FetchFailed):
                reasons = "; ".join(f"{peer}: {why}" for peer, why in outcome.reasons) or "no live neighbour"
                log.warning("no neighbour gave a usable model (%s); starting from the initial model", reasons)
                self.events.emit("model", source="initial", round=0)
                return
            else:
                if not isinstance(outcome.state, dict):
                    raise LocalProtocolError(f"the offer check returned {type(outcome.state).__name__}")
                loop.load_state(outcome.state, outcome.round)
                log.info("adopted the model of round %d from %s", outcome.round, outcome.peer)
                self.events.emit("model", source="peer", peer=outcome.peer, round=outcome.round)
                return

    async def _join_certified(self, node: SwarmNode, consensus: ConsensusService, loop: TrainingLoop) -> bool:
        """Start from the newest certified checkpoint a neighbour offers, its chain verified (docs/consensus.md,
        "Joining from certified state"). False when no neighbour has a certified epoch yet: the caller fetches the
        plain current model instead. With offers that all fail, training starts from the initial model."""
        trusted = self.config.consensus.trusted_hash
        outcome = await consensus.join_certified(
            list(_fetch_candidates(node)),
            self.spec,
            max_body_bytes=self.config.checkpoint.max_bytes,
            trusted_hash=trusted,
        )
        if isinstance(outcome, NothingCertified):
            log.info("no neighbour has a certified epoch yet: fetching the current model instead")
            return False
        if not isinstance(outcome, Joined):
            reasons = "; ".join(f"{peer}: {why}" for peer, why in outcome.reasons) or "no live neighbour"
            log.warning(
                "no neighbour gave a certified checkpoint that checks out (%s); starting from the initial model",
                reasons,
            )
            self.events.emit("model", source="initial", round=0)
            return True
        cert = outcome.checkpoint.certificate
        value = cert.value
        await trio.to_thread.run_sync(loop.load_state, outcome.checkpoint.state, value.round)
        origin = "genesis" if trusted is None else f"trusted hash {trusted.hex()[:16]}"
        log.info(
            "adopted certified epoch %d (round %d, root %s) from %s, chain verified from %s",
            cert.epoch,
            value.round,
            value.checkpoint_root.hex()[:16],
            outcome.peer,
            origin,
        )
        self.events.emit(
            "model",
            source="certified",
            peer=outcome.peer,
            epoch=cert.epoch,
            round=value.round,
            root=value.checkpoint_root.hex(),
            verified_from="genesis" if trusted is None else "trusted",
        )
        return True

    async def _wait_for_peers(self, node: SwarmNode) -> None:
        wanted = self.config.network.min_peers
        if not wanted:
            return
        with trio.move_on_after(self.config.network.min_peers_timeout_s):
            await node.wait_for_peers(wanted)
            return
        log.warning(
            "only %d of %d peers live after %.0f s: training anyway",
            len(node.live_peers()),
            wanted,
            self.config.network.min_peers_timeout_s,
        )

    def _check_offer(self, offer: ModelOffer) -> dict[str, torch.Tensor]:
        """The `OfferValidator` of model fetch (runs in a worker thread): the offer's task, then its body."""
        if offer.task != self.task.name:
            raise DecodeError(f"the model is for task {offer.task!r}, not {self.task.name!r}")
        return decode_state(offer.body, self.spec, max_bytes=self.config.checkpoint.max_bytes)

    async def _stop_on_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.warning("%s: finishing the current round, saving, leaving", signal.Signals(signum).name)
                self.stop.set()
                if self._last_epoch_wait is not None:
                    self._last_epoch_wait.cancel()
                return

    # ---- training thread side -----------------------------------------------------------------------------------

    def _publish(self, round_: int, state: dict[str, torch.Tensor]) -> None:
        with self._snapshot_lock:
            self._snapshot = (round_, state)

    def _on_round(self, report: RoundReport, loop: TrainingLoop) -> None:
        # runs in the training thread, after each round: keep the model a late joiner is served, and report
        self._publish(report.round, loop.state())
        peers = self.view.peers
        self.progress.update(report, peers, report.evaluation)
        if self.metrics is not None:
            self.metrics.update(report, peers)
        if report.evaluation is not None:
            self.events.emit(
                "round",
                round=report.round,
                epoch=report.epoch,
                train_loss=report.train_loss,
                metric=report.evaluation.metric,
                value=report.evaluation.value,
                samples=report.samples,
                peers=peers,
                bytes_sent=int(report.averager.get("bytes_sent", 0)),
            )

    def _on_epoch(self, reached: EpochReached, loop: TrainingLoop) -> None:
        # runs in the training thread at each epoch boundary: hand the checkpoint to consensus and go on training
        # (the hand-off is one hop onto the event loop; the tree is built there in a worker thread)
        log.info("epoch %d at round %d: model %s", reached.epoch, reached.round, reached.model_hash)
        hand_off_s = 0.0
        if self.consensus is not None:
            started = time.perf_counter()
            state = loop.state()
            if self.config.consensus.test_poison_proposals:
                state = {name: -tensor for name, tensor in state.items()}
            self.consensus.submit_checkpoint(reached.epoch, reached.round, state)
            hand_off_s = time.perf_counter() - started
            self.epoch_hand_off_s.append(hand_off_s)
            self.last_epoch_submitted = reached.epoch
        self.epochs_reached += 1
        self.events.emit(
            "epoch",
            epoch=reached.epoch,
            round=reached.round,
            model_hash=reached.model_hash,
            consensus_hand_off_ms=round(hand_off_s * 1000, 3),
        )


def _fetch_candidates(node: SwarmNode) -> tuple[str, ...]:
    """The live peers to fetch a model from: those over a direct connection, or all when none is. A checkpoint over
    a relayed connection counts against the circuit's byte budget, and a circuit that exceeds it ends the
    connection (docs/nat.md)."""
    live = node.live_peers()
    return tuple([peer for peer in live if not node.is_relayed(peer)] or live)


def _live_progress(mode: str) -> bool:
    if mode == "auto":
        return sys.stderr.isatty()
    return mode == "tty"
