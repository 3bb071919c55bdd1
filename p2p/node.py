"""`SwarmNode`: the trio service that turns a libp2p host into a member of one swarm with a live peer set.

It assembles the parts and carries out their requests; it holds no protocol logic of its own:

* the host (`p2p.host.running_host`: Noise, yamux, pnet when a swarm key is given),
* `p2p.discovery.Discovery` (DHT join, member records, lookups), whose verified finds go to the machine,
* the `p2p.membership.Membership` machine, fed from one bounded channel (discovery finds, connection events from
  the host's network, dial and ping outcomes, its own timers), whose requests this module executes: dial (bounded
  by `DiscoveryConfig.dial_timeout_s`, so a wrong swarm key fails in seconds with a clear log line), disconnect,
  ping (libp2p `/ipfs/ping/1.0.0`, bounded by `ping_timeout_s`),
* the admission policy (`p2p.swarm.ScoringPolicy`): a connection from a banned peer, or an inbound connection over
  the cap, is closed as soon as it opens; `policy` is also the `PeerPolicy` to hand a transport on the same host.

The live set is `live_peers()`; `subscribe()` gives a feed of `PeerUp` / `PeerDown` (for the gossip and consensus
machines) and of `PeerDiscovered` / `PeerForgotten` (for logs and tests). `statistics()` merges the machine's,
discovery's, the policy's and this module's counters.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.network.connection.swarm_connection import Direction
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2p.discovery import Discovery, DiscoveryConfig, bounded_connect
from p2p.host import HostConfig, listen_multiaddrs, running_host
from p2p.identity import load_or_create_identity
from p2p.membership import (
    ConnectionClosed,
    ConnectionOpened,
    DialFailed,
    DialRequested,
    DisconnectRequested,
    Membership,
    MembershipConfig,
    PeerDiscovered,
    PeerForgotten,
    PingFailed,
    PingRequested,
    PingSucceeded,
    Start,
)
from p2p.swarm import ScoringConfig, ScoringPolicy
from swarmgrad.core.errors import ConfigError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Event,
    Notify,
    PeerDown,
    PeerId,
    PeerUp,
    Send,
    SetTimer,
    TimerFired,
)

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

NodeEvent = PeerUp | PeerDown | PeerDiscovered | PeerForgotten


@dataclass(frozen=True)
class NodeConfig:
    """Everything one swarm member needs. A private swarm sets `host.psk`; a public one leaves it None."""

    host: HostConfig
    discovery: DiscoveryConfig
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ping_timeout_s: float = 2.0
    seed: int = 0
    """Seeds the membership machine's `random.Random` (re-dial jitter)."""
    event_queue_len: int = 1024

    def __post_init__(self) -> None:
        if not (isinstance(self.ping_timeout_s, (int, float)) and math.isfinite(self.ping_timeout_s)):
            raise ConfigError("ping_timeout_s", self.ping_timeout_s, "a finite number of seconds > 0")
        if self.ping_timeout_s <= 0:
            raise ConfigError("ping_timeout_s", self.ping_timeout_s, "a finite number of seconds > 0")
        if not (isinstance(self.event_queue_len, int) and self.event_queue_len >= 16):
            raise ConfigError("event_queue_len", self.event_queue_len, "an integer >= 16")


class _ConnectionEvents(INotifee):
    """Hands the host's connection opens and closes to the node, without blocking the network."""

    def __init__(self, node: SwarmNode) -> None:
        self._node = node

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._node._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._node._on_disconnected(conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


class SwarmNode:
    """One member of one swarm on a running host. Use `open_node`; see the module docstring."""

    def __init__(self, host: IHost, key_pair: KeyPair, config: NodeConfig) -> None:
        self.host = host
        self.config = config
        self.peer_id: PeerId = host.get_id().to_base58()
        self.policy = ScoringPolicy(config.scoring, trio.current_time)
        self.membership = Membership(self.peer_id, config.membership, random.Random(config.seed))
        self.discovery = Discovery(host, key_pair, config.discovery, self._submit)
        self._events_send, self._events_recv = trio.open_memory_channel[Event](config.event_queue_len)
        self._subscribers: list[trio.MemorySendChannel[NodeEvent]] = []
        self._timer_seq: dict[Hashable, int] = {}
        self._seq = 0
        self._nursery: trio.Nursery | None = None
        self._counters: Counter[str] = Counter()

    # ---- public -------------------------------------------------------------------------------------------------

    @property
    def listen_multiaddrs(self) -> list[str]:
        """Addresses other peers can dial (and pass as `--bootstrap`), each ending in `/p2p/<peer id>`."""
        return listen_multiaddrs(self.host)

    def live_peers(self) -> list[PeerId]:
        """Members of the swarm connected and answering pings right now, sorted."""
        return self.membership.live_peers()

    def subscribe(self, queue_len: int = 256) -> trio.MemoryReceiveChannel[NodeEvent]:
        """A new channel of `PeerUp`, `PeerDown`, `PeerDiscovered` and `PeerForgotten` from now on. A subscriber
        that falls `queue_len` events behind loses the newest ones (counted as `dropped_events`)."""
        send, recv = trio.open_memory_channel[NodeEvent](queue_len)
        self._subscribers.append(send)
        return recv

    def statistics(self) -> dict[str, int]:
        """Counters of the node, prefixed by part: `membership.*`, `discovery.*`, `policy.*`, `node.*`."""
        stats = {f"node.{k}": v for k, v in self._counters.items()}
        for prefix, part in (
            ("membership", self.membership.statistics()),
            ("discovery", self.discovery.statistics()),
            ("policy", self.policy.statistics()),
        ):
            stats.update({f"{prefix}.{k}": v for k, v in part.items()})
        return stats

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the swarm, then keep the live set until cancelled. `started()` once joined and published; raises
        `BootstrapFailed` (nothing left running) when no bootstrap peer answers."""
        self.host.get_network().register_notifee(_ConnectionEvents(self))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.discovery.run)
            self._submit(Start())
            nursery.start_soon(self._own_machine)
            task_status.started()

    # ---- inputs -------------------------------------------------------------------------------------------------

    def _submit(self, event: Event) -> None:
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            self._counters["dropped_input"] += 1
            log.warning("membership input queue full: dropped %r", event)

    def _on_connected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        peer = peer_id.to_base58()
        inbound = getattr(conn, "direction", None) == Direction.INBOUND
        if not self.policy.allows(peer) or (inbound and not self.policy.admit_inbound(peer)):
            self._counters["connections_refused"] += 1
            log.info("closing a connection from %s: banned or over the inbound cap", peer)
            self._start(self.host.disconnect, peer_id)
            return
        self._counters["connections_opened"] += 1
        self._submit(ConnectionOpened(peer))
        if inbound and peer not in self.membership.live_peers():
            self.discovery.wake()  # a stranger connected: maybe a new member, whose record a lookup would find

    def _on_disconnected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        self.policy.release_inbound(peer_id.to_base58())
        if not self.host.get_network().get_connections(peer_id):
            self._counters["connections_closed"] += 1
            self._submit(ConnectionClosed(peer_id.to_base58()))

    # ---- the machine ----------------------------------------------------------------------------------------------

    async def _own_machine(self) -> None:
        async for event in self._events_recv:
            actions = self.membership.step(trio.current_time(), event)
            for action in actions:
                self._execute(action)

    def _execute(self, action: Action) -> None:
        if isinstance(action, SetTimer):
            self._seq += 1
            self._timer_seq[action.key] = self._seq
            self._start(self._timer, action.key, action.deadline, self._seq)
        elif isinstance(action, CancelTimer):
            self._timer_seq.pop(action.key, None)
        elif isinstance(action, Notify):
            self._carry_out(action.event)
        elif isinstance(action, Send):
            raise TypeError(f"the membership machine has no wire protocol, got {action!r}")
        else:
            raise TypeError(f"unknown action {action!r}")

    def _carry_out(self, request: object) -> None:
        if isinstance(request, DialRequested):
            self._start(self._dial, request)
        elif isinstance(request, DisconnectRequested):
            log.info("disconnecting %s: %s", request.peer, request.reason)
            self._start(self.host.disconnect, ID.from_base58(request.peer))
        elif isinstance(request, PingRequested):
            for peer in request.peers:
                self._start(self._ping, peer)
        elif isinstance(request, PeerUp | PeerDown | PeerDiscovered | PeerForgotten):
            for subscriber in self._subscribers:
                try:
                    subscriber.send_nowait(request)
                except trio.WouldBlock:
                    self._counters["dropped_events"] += 1
                except trio.BrokenResourceError:
                    self._subscribers.remove(subscriber)
        else:
            raise TypeError(f"unknown request from the membership machine: {request!r}")

    def _start(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None, "tasks start only inside run()"
        self._nursery.start_soon(fn, *args)

    # ---- requests -----------------------------------------------------------------------------------------------

    async def _timer(self, key: Hashable, deadline: float, seq: int) -> None:
        await trio.sleep_until(deadline)
        if self._timer_seq.get(key) == seq:
            del self._timer_seq[key]
            self._submit(TimerFired(key))

    async def _dial(self, request: DialRequested) -> None:
        peer_id = ID.from_base58(request.peer)
        try:
            addrs = [multiaddr.Multiaddr(addr) for addr in request.addrs]
        except (ValueError, multiaddr.exceptions.Error) as exc:
            self._submit(DialFailed(request.peer, f"bad address in its member record: {exc}"))
            return
        reason = await bounded_connect(self.host, PeerInfo(peer_id, addrs), self.config.discovery.dial_timeout_s)
        if reason is None:
            if self.host.get_network().get_connections(peer_id):
                self._submit(ConnectionOpened(request.peer))
            return
        self._counters["dials_failed"] += 1
        log.warning("dial %s (%s): %s", request.peer, ", ".join(request.addrs), reason)
        self._submit(DialFailed(request.peer, reason))

    async def _ping(self, peer: PeerId) -> None:
        reason = "no answer within ping_timeout_s"
        with trio.move_on_after(self.config.ping_timeout_s):
            try:
                stream = await self.host.new_stream(ID.from_base58(peer), [PING_PROTOCOL_ID])
                try:
                    await perform_ping_roundtrip(stream)
                finally:
                    await stream.close()
            except (BaseLibp2pError, OSError, ValueError, trio.TooSlowError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                self._submit(PingSucceeded(peer))
                return
        self._counters["pings_failed"] += 1
        self._submit(PingFailed(peer, reason))


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[SwarmNode]:
    """Start the host and the node, joined to the swarm; stop and close everything on exit. Raises `HostError`
    (port in use), `IdentityError` (bad key file) or `BootstrapFailed` with nothing left running."""
    key_pair = load_or_create_identity(config.host.key_path)
    async with running_host(config.host, config.discovery.bootstrap_addrs) as host, trio.open_nursery() as nursery:
        node = SwarmNode(host, key_pair, config)
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
