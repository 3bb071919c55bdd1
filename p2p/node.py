"""`SwarmNode`: the trio service that turns a libp2p host into a member of one swarm with a live peer set.

It assembles the parts and carries out their requests; it holds no protocol logic of its own:

* the host (`p2p.host.running_host`: Noise, yamux, pnet when a swarm key is given),
* `p2p.discovery.Discovery` (DHT join, member records, lookups), whose verified finds go to the machine,
* the `p2p.membership.Membership` machine, run by the one `swarmgrad.core.driver.Driver` (its timers, its bounded
  input: discovery finds, connection events from the host's network, dial and ping outcomes), whose effects this
  module carries out: `Dial` (`p2p.discovery.bounded_connect`: TCP within `HostConfig.connect_timeout_s`, the
  handshake within `HostConfig.handshake_timeout_s`, so a wrong swarm key fails in ~1.5 s with a log line naming
  it), `Disconnect`, `Ping` (libp2p `/ipfs/ping/1.0.0`, bounded by `ping_timeout_s`),
* the admission policy (`p2p.swarm.ScoringPolicy`): a connection from a banned peer, or an inbound connection over
  the cap, is closed as soon as it opens; `policy` is also the `PeerPolicy` to hand a transport on the same host.
* the dial-back check (`p2p.dialback.DialBackService`, `dialback`): it serves other members' dial-back requests
  and, with `reachability = "auto"`, asks members to dial this peer back; its verdicts become `set_reachability`.
  A peer may serve once its verdict is public, or while it has none once a peer on another IP dialled it,
* the `p2p.hole_punch.HolePunch` machine, on a second `Driver`: every connection open and close tells it whether
  this node holds a relayed and a direct connection to the peer; its `UpgradeDirect` runs one bounded DCUtR punch
  (`p2p.libp2p_compat.punch_direct`, in a task of its own), its `CloseRelayed` closes the relayed connection once a
  direct one has held for a grace period. DCUtR punches other peers start are answered (`serve_dcutr`).
* the per-IP limits (`p2p.limits.IpLimits`, `ip_limits`): an inbound connection from a banned IP, from an IP that
  shows too many new identities, or over the IP's connection cap is closed as soon as it opens; every remote error
  reported to `policy` is also charged to the offender's IP, and an IP banned for either reason loses all its
  connections. Each ban, of a peer or of an IP, is logged once at WARNING with its reason and duration.

The live set is `live_peers()`; `subscribe()` gives a feed of `PeerUp` / `PeerDown` (for the gossip and consensus
machines) and of `PeerDiscovered` / `PeerForgotten` (for logs and tests). `statistics()` merges the machine's,
discovery's, the policy's, the dial-back check's (`dialback.*`) and this module's counters.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2p.addrs import interface_ips, ip_of
from p2p.dialback import DialBackService
from p2p.discovery import Discovery, DiscoveryConfig, bounded_connect
from p2p.hole_punch import (
    CloseRelayed,
    ConnectionsChanged,
    HolePunch,
    HolePunchConfig,
    PunchDone,
    PunchFailed,
    PunchSucceeded,
    UpgradeDirect,
)
from p2p.host import AddressGate, ConnectionNotifee, HostConfig, listen_multiaddrs, running_host
from p2p.identity import load_or_create_identity
from p2p.libp2p_compat import is_inbound, is_relayed, punch_direct, remote_ip, serve_dcutr
from p2p.limits import Ban, IpLimits, IpLimitsConfig
from p2p.membership import (
    ConnectionClosed,
    ConnectionOpened,
    DialFailed,
    Membership,
    MembershipConfig,
    PeerDiscovered,
    PeerForgotten,
    PingFailed,
    PingSucceeded,
    Start,
)
from p2p.reachability import (
    REACHABILITY_SETTINGS,
    Reachability,
    ReachabilityChanged,
    ReachabilityConfig,
    ReachabilitySetting,
)
from p2p.relay import (
    FindRelays,
    ReachabilityIs,
    RelayAddrsChanged,
    RelayClient,
    RelayClientConfig,
    RelayDown,
    RelayDropped,
    RelayInfo,
    RelayServiceConfig,
    RelaysFound,
    Reserve,
    relays_key,
)
from p2p.relay_host import CIRCUIT, RelayHost, is_circuit_addr
from p2p.swarm import PeerBan, ScoringConfig, ScoringPolicy
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import Dial, Disconnect, Effect, Event, PeerDown, PeerId, PeerUp, Ping

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

NodeEvent = (
    PeerUp
    | PeerDown
    | PeerDiscovered
    | PeerForgotten
    | ReachabilityChanged
    | RelayAddrsChanged
    | PunchSucceeded
    | PunchFailed
)


@dataclass(frozen=True)
class NodeConfig:
    """Everything one swarm member needs. A private swarm sets `host.psk`; a public one leaves it None."""

    host: HostConfig
    discovery: DiscoveryConfig
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ip_limits: IpLimitsConfig = field(default_factory=IpLimitsConfig)
    ping_timeout_s: float = 2.0
    seed: int = 0
    """Seeds the membership machine's `random.Random` (re-dial jitter)."""
    event_queue_len: int = 1024
    reachability: ReachabilitySetting = "auto"
    """Forced verdict ("public" / "private") or "auto": the dial-back check decides (`p2p.reachability`)."""
    dialback: ReachabilityConfig = field(default_factory=ReachabilityConfig)
    relay: RelayServiceConfig = field(default_factory=RelayServiceConfig)
    """The limits this peer relays under once public (`p2p.relay`)."""
    relay_client: RelayClientConfig = field(default_factory=RelayClientConfig)
    """How this peer keeps its relay reservations once private."""
    hole_punch: HolePunchConfig = field(default_factory=HolePunchConfig)

    def __post_init__(self) -> None:
        if self.reachability not in REACHABILITY_SETTINGS:
            raise ConfigError("reachability", self.reachability, " | ".join(REACHABILITY_SETTINGS))
        if not (isinstance(self.ping_timeout_s, (int, float)) and math.isfinite(self.ping_timeout_s)):
            raise ConfigError("ping_timeout_s", self.ping_timeout_s, "a finite number of seconds > 0")
        if self.ping_timeout_s <= 0:
            raise ConfigError("ping_timeout_s", self.ping_timeout_s, "a finite number of seconds > 0")
        if not (isinstance(self.event_queue_len, int) and self.event_queue_len >= 16):
            raise ConfigError("event_queue_len", self.event_queue_len, "an integer >= 16")


class SwarmNode:
    """One member of one swarm on a running host. Use `open_node`; see the module docstring."""

    def __init__(self, host: IHost, key_pair: KeyPair, config: NodeConfig, gate: AddressGate | None = None) -> None:
        self.host = host
        self._gate = AddressGate() if gate is None else gate  # the host's (`open_node`): closed while private
        self.config = config
        self.peer_id: PeerId = host.get_id().to_base58()
        self.policy = ScoringPolicy(config.scoring, trio.current_time, self._on_report)
        self.ip_limits = IpLimits(config.ip_limits)
        self._inbound_ips: dict[INetConn, tuple[str, PeerId]] = {}  # admitted inbound connection -> (ip, peer)
        self.membership = Membership(self.peer_id, config.membership, random.Random(config.seed))
        self.driver = Driver(
            self.membership,
            input_queue_len=config.event_queue_len,
            notify_queue_len=config.event_queue_len,
            run_effect=self._carry_out,
        )
        self.hole_punch = HolePunch(config.hole_punch, random.Random(config.seed + 1))
        self._punch_driver = Driver(
            self.hole_punch,
            input_queue_len=config.event_queue_len,
            notify_queue_len=config.event_queue_len,
            run_effect=self._carry_out_punch,
        )
        self.discovery = Discovery(host, key_pair, config.discovery, config.host, self._submit)
        self._subscribers: list[trio.MemorySendChannel[NodeEvent]] = []
        self._changed = trio.Event()  # set, and replaced, at each change of the live set
        self._nursery: trio.Nursery | None = None
        self._counters: Counter[str] = Counter()
        self._reachability: Reachability | None = None
        announced = (ip_of(multiaddr.Multiaddr(addr)) for addr in config.host.announce_addrs)
        self._own_ips = interface_ips().all() | {str(ip) for ip in announced if ip is not None}
        self._dialled_from_outside = False  # an inbound direct connection came from an IP not ours
        self.dialback = DialBackService(
            host,
            config.dialback,
            ask=config.reachability == "auto",
            seed=config.seed,
            can_serve=self._can_serve,
            addrs=lambda: tuple(addr.rsplit("/p2p/", 1)[0] for addr in self.listen_multiaddrs),
            own_ips=lambda: tuple(sorted(self._own_ips)),
            on_verdict=lambda change: self.set_reachability(change.reachability, change.reason),
            on_peer_error=self.policy.report,
        )
        self.relay_host = RelayHost(host, config.relay, config.host)
        self.relay_client = RelayClient(self.peer_id, config.relay_client, random.Random(f"{config.seed}/relay"))
        self.relay_driver = Driver(self.relay_client, run_effect=self._carry_out_relay)
        self._circuit_addrs: tuple[str, ...] = ()

    # ---- public -------------------------------------------------------------------------------------------------

    @property
    def listen_multiaddrs(self) -> list[str]:
        """Addresses other peers can dial (and pass as `--bootstrap`), each ending in `/p2p/<peer id>`."""
        return listen_multiaddrs(self.host)

    def live_peers(self) -> list[PeerId]:
        """Members of the swarm connected and answering pings right now, sorted."""
        return self.membership.live_peers()

    @property
    def reachability(self) -> Reachability | None:
        """The current verdict (`p2p.reachability`), None while there is none."""
        return self._reachability

    def subscribe(self, queue_len: int = 256) -> trio.MemoryReceiveChannel[NodeEvent]:
        """A new channel of `PeerUp`, `PeerDown`, `PeerDiscovered`, `PeerForgotten`, `ReachabilityChanged`,
        `RelayAddrsChanged` (a private peer's relayed addresses) and the hole-punch outcomes (`PunchSucceeded`,
        `PunchFailed`) from now on (a subscriber that joins later reads the current verdict from `reachability`). A
        subscriber that falls `queue_len` events behind loses the newest ones (counted as `dropped_events`)."""
        send, recv = trio.open_memory_channel[NodeEvent](queue_len)
        self._subscribers.append(send)
        return recv

    async def wait_for_peers(self, count: int) -> None:
        """Return once at least `count` peers are live (at once if they are): woken by the live set's changes,
        not by polling. Bound it with a cancel scope."""
        while len(self.live_peers()) < count:
            await self._changed.wait()

    def statistics(self) -> dict[str, int]:
        """Counters of the node, prefixed by part: `membership.*`, `discovery.*`, `policy.*`, `ip_limits.*`,
        `hole_punch.*` (`punches_tried`, `punches_succeeded`, `punches_failed`, ...), `driver.*`, `node.*`."""
        stats = {f"node.{k}": v for k, v in self._counters.items()}
        for prefix, part in (
            ("driver", self.driver.statistics()),
            ("membership", self.membership.statistics()),
            ("discovery", self.discovery.statistics()),
            ("policy", self.policy.statistics()),
            ("ip_limits", self.ip_limits.statistics()),
            ("dialback", self.dialback.statistics()),
            ("relay", self.relay_client.statistics()),
            ("hole_punch", self.hole_punch.statistics()),
        ):
            stats.update({f"{prefix}.{k}": v for k, v in part.items()})
        return stats

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the swarm, then keep the live set until cancelled. `started()` once joined and published; raises
        `BootstrapFailed` (nothing left running) when no bootstrap peer answers."""
        serve_dcutr(self.host, self.config.hole_punch.punch_timeout_s)
        self.host.get_network().register_notifee(ConnectionNotifee(self._on_connected, self._on_disconnected))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.driver.run)
            await nursery.start(self.relay_host.run)
            await nursery.start(self.relay_driver.run)
            await nursery.start(self._punch_driver.run)
            nursery.start_soon(self._report_punches)
            nursery.start_soon(self._fan_out)
            nursery.start_soon(self._follow_relays)
            if self.config.reachability == "private":
                self._advertise(())  # never advertise the unreachable private addresses
            await nursery.start(self.discovery.run)
            await nursery.start(self.dialback.run)
            self._submit(Start())
            if self.config.reachability != "auto":
                self.set_reachability(self.config.reachability, "set by network.reachability")
            task_status.started()

    def set_reachability(self, reachability: Reachability, reason: str) -> None:
        """Record a new verdict: logged once and announced to subscribers; the same verdict again changes nothing."""
        if reachability == self._reachability:
            return
        self._reachability = reachability
        log.info("reachability: %s (%s)", reachability, reason)
        self.relay_driver.submit(ReachabilityIs(reachability))
        if reachability == "public":
            self._advertise(None)
            if not self.relay_host.relaying:
                self._start(self.relay_host.serve_hop)
            self.discovery.provide_also(relays_key(self.config.discovery.swarm_id))
        else:
            self._advertise(self._circuit_addrs)
        self._publish(ReachabilityChanged(reachability, reason))

    def is_relayed(self, peer: PeerId) -> bool:
        """Whether every open connection to `peer` runs through a relay (False when none is open)."""
        conns = self.host.get_network().get_connections(ID.from_base58(peer))
        return bool(conns) and all(_relayed(conn) for conn in conns)

    # ---- inputs -------------------------------------------------------------------------------------------------

    def _submit(self, event: Event) -> None:
        if not self.driver.submit(event):
            log.warning("membership input queue full: dropped %r", event)

    def _on_connected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        peer = peer_id.to_base58()
        inbound = is_inbound(conn)
        if not self.policy.allows(peer):
            self._refuse(peer_id, "the peer is banned")
            return
        ip = remote_ip(conn) if inbound and not _relayed(conn) else None  # a relayed one comes from the relay's IP
        if ip is not None:
            refusal = self.ip_limits.admit_connection(ip, peer, trio.current_time())
            if refusal is not None:
                if refusal.ban is not None:
                    self._ban_ip(refusal.ban)
                self._refuse(peer_id, refusal.reason)
                return
            self._inbound_ips[conn] = (ip, peer)
            self._dialled_from_outside = self._dialled_from_outside or ip not in self._own_ips
        if inbound and not self.policy.admit_inbound(peer):
            self._release_ip(conn)
            self._refuse(peer_id, f"over the cap of {self.config.scoring.max_inbound_connections} inbound connections")
            return
        self._counters["connections_opened"] += 1
        self._submit(ConnectionOpened(peer))
        self._punch_state(peer_id)
        if inbound and peer not in self.membership.live_peers():
            self.discovery.wake()  # a stranger connected: maybe a new member, whose record a lookup would find

    def _on_disconnected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        self.policy.release_inbound(peer_id.to_base58())
        self._release_ip(conn)
        self._punch_state(peer_id)
        if not self.host.get_network().get_connections(peer_id):
            self._counters["connections_closed"] += 1
            self._submit(ConnectionClosed(peer_id.to_base58()))

    def _punch_state(self, peer_id: ID) -> None:
        """Tell the hole-punch machine what this node holds to `peer_id` now."""
        conns = self.host.get_network().get_connections(peer_id)
        relayed = [conn for conn in conns if is_relayed(conn)]
        event = ConnectionsChanged(
            peer_id.to_base58(),
            relayed=bool(relayed),
            direct=len(relayed) < len(conns),
            initiator=any(is_inbound(conn) for conn in relayed),
        )
        if not self._punch_driver.submit(event):
            log.warning("hole-punch input queue full: dropped %r", event)

    # ---- admission ----------------------------------------------------------------------------------------------

    def _refuse(self, peer_id: ID, reason: str) -> None:
        self._counters["connections_refused"] += 1
        log.debug("closing a connection from %s: %s", peer_id, reason)
        self._start(self.host.disconnect, peer_id)

    def _release_ip(self, conn: INetConn) -> None:
        entry = self._inbound_ips.pop(conn, None)
        if entry is not None:
            self.ip_limits.release_connection(*entry)

    def _on_report(self, peer: PeerId, reason: str, ban: PeerBan | None) -> None:
        """Every remote error reported to `policy`: log a peer ban once, and charge the error to the peer's IP."""
        if ban is not None:
            log.warning("banned peer %s for %g s: %s", ban.peer, ban.duration_s, ban.reason)
        for conn in self.host.get_network().get_connections(ID.from_base58(peer)):
            ip = None if _relayed(conn) else remote_ip(conn)  # never the relay's IP for a relayed peer's offence
            if ip is not None:
                ip_ban = self.ip_limits.offence(ip, peer, trio.current_time())
                if ip_ban is not None:
                    self._ban_ip(ip_ban)
                return

    def _ban_ip(self, ban: Ban) -> None:
        """Log `ban` (once: `IpLimits` hands each ban out once) and close every connection from its IP."""
        log.warning("banned IP %s for %g s: %s", ban.ip, ban.duration_s, ban.reason)
        for peer_id, conns in sorted(self.host.get_network().get_connections_map().items(), key=lambda kv: str(kv[0])):
            if any(remote_ip(conn) == ban.ip for conn in conns):
                self._start(self.host.disconnect, peer_id)

    # ---- effects and notifications ------------------------------------------------------------------------------

    async def _carry_out(self, effect: Effect) -> Event | None:
        if isinstance(effect, Dial):
            return await self._dial(effect)
        if isinstance(effect, Disconnect):
            log.info("disconnecting %s: %s", effect.peer, effect.reason)
            await self.host.disconnect(ID.from_base58(effect.peer))
            return None  # the host's network reports the closed connection
        if isinstance(effect, Ping):
            return await self._ping(effect.peer)
        raise LocalProtocolError(f"the node cannot carry out {effect!r}")

    async def _fan_out(self) -> None:
        async for event in self.driver.notifications:
            if not isinstance(event, PeerUp | PeerDown | PeerDiscovered | PeerForgotten):
                raise LocalProtocolError(f"unknown notification from the membership machine: {event!r}")
            if isinstance(event, PeerForgotten):
                self.discovery.forget(event.peer)
            self._changed.set()
            self._changed = trio.Event()
            if isinstance(event, PeerUp):
                self.dialback.member_up(event.peer, self._peer_ip(event.peer))
            elif isinstance(event, PeerDown):
                self.dialback.member_down(event.peer)
                self.relay_driver.submit(RelayDown(event.peer))
            self._publish(event)

    def _can_serve(self) -> bool:
        """Whether this peer may answer dial-back requests (`p2p.reachability`, "Serving")."""
        return self._reachability == "public" or (self._reachability is None and self._dialled_from_outside)

    def _peer_ip(self, peer: PeerId) -> str | None:
        for conn in self.host.get_network().get_connections(ID.from_base58(peer)):
            ip = remote_ip(conn)
            if ip is not None:
                return ip
        return None

    async def _follow_relays(self) -> None:
        """The relay client's notifications: advertise the circuit addresses it holds, log what it dropped."""
        async for note in self.relay_driver.notifications:
            if isinstance(note, RelayAddrsChanged):
                self._circuit_addrs = note.addrs
                log.info("relayed through %d relay(s): %s", len(note.relays), ", ".join(note.addrs) or "none")
                if self._reachability == "private":
                    self._advertise(note.addrs)
                self._publish(note)
            elif isinstance(note, RelayDropped):
                log.warning("relay %s dropped: %s", note.relay, note.reason)
            else:
                raise LocalProtocolError(f"unknown notification from the relay client: {note!r}")

    def _advertise(self, circuit_addrs: tuple[str, ...] | None) -> None:
        """Advertise only `circuit_addrs`, in the member record (None: the host's own addresses, everywhere)."""
        self._gate.closed = circuit_addrs is not None
        self.discovery.set_record_addrs(circuit_addrs)

    async def _carry_out_relay(self, effect: Effect) -> Event | None:
        if isinstance(effect, FindRelays):
            providers = await self.discovery.find_providers(relays_key(self.config.discovery.swarm_id))
            relays = []
            for peer, addrs in sorted(providers.items()):
                bare = sorted({str(addr).split("/p2p/")[0] for addr in addrs if not is_circuit_addr(str(addr))})
                relays.append(RelayInfo(peer, tuple(bare)))
            return RelaysFound(tuple(relays))
        if isinstance(effect, Reserve):
            outcome = await self.relay_host.reserve(effect.relay, effect.addrs)
            log.info("relay %s: %s", effect.relay, outcome)
            return outcome
        raise LocalProtocolError(f"the node cannot carry out {effect!r}")

    async def _report_punches(self) -> None:
        async for event in self._punch_driver.notifications:
            if isinstance(event, PunchSucceeded):
                log.info(
                    "hole punch to %s: direct connection (attempt %d of %.1f s, %.1f s after the relayed one)",
                    event.peer,
                    event.attempt,
                    event.attempt_s,
                    event.elapsed_s,
                )
            elif isinstance(event, PunchFailed):
                then = "staying relayed" if event.final else "will retry"
                log.info("hole punch to %s failed (attempt %d): %s; %s", event.peer, event.attempt, event.reason, then)
            else:
                raise LocalProtocolError(f"unknown notification from the hole-punch machine: {event!r}")
            self._publish(event)

    def _publish(self, event: NodeEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber.send_nowait(event)
            except trio.WouldBlock:
                self._counters["dropped_events"] += 1
            except trio.BrokenResourceError:
                self._subscribers.remove(subscriber)

    def _start(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        assert self._nursery is not None, "tasks start only inside run()"
        self._nursery.start_soon(fn, *args)

    async def _carry_out_punch(self, effect: Effect) -> Event | None:
        if isinstance(effect, UpgradeDirect):
            peer_id = ID.from_base58(effect.peer)
            if await punch_direct(self.host, peer_id, effect.timeout_s):
                return PunchDone(effect.peer, direct=True)
            reason = "no direct connection" if self.host.get_network().get_connections(peer_id) else "peer gone"
            return PunchDone(effect.peer, direct=False, reason=f"{reason} within {effect.timeout_s:g} s")
        if isinstance(effect, CloseRelayed):
            for conn in list(self.host.get_network().get_connections(ID.from_base58(effect.peer))):
                if is_relayed(conn):
                    log.info("closing the relayed connection to %s: a direct one is open", effect.peer)
                    await conn.close()
            return None
        raise LocalProtocolError(f"the node cannot carry out {effect!r}")

    # ---- effect runners -----------------------------------------------------------------------------------------

    async def _dial(self, request: Dial) -> Event | None:
        peer_id = ID.from_base58(request.peer)
        circuits = [addr for addr in request.addrs if is_circuit_addr(addr)]
        try:
            addrs = [multiaddr.Multiaddr(addr) for addr in request.addrs if not is_circuit_addr(addr)]
        except (ValueError, multiaddr.exceptions.Error) as exc:
            return DialFailed(request.peer, f"bad address in its member record: {exc}")
        reasons = []
        if addrs:  # direct first: a relayed connection is slower and its circuit has a byte budget
            reasons.append(await bounded_connect(self.host, PeerInfo(peer_id, addrs), self.config.host))
        for addr in circuits:
            if reasons and reasons[-1] is None:
                break
            reasons.append(await self.relay_host.dial(request.peer, addr))
        reason = "; ".join(r for r in reasons if r is not None) if reasons else "no address"
        if reasons and reasons[-1] is None:
            return ConnectionOpened(request.peer) if self.host.get_network().get_connections(peer_id) else None
        self._counters["dials_failed"] += 1
        log.warning("dial %s (%s): %s", request.peer, ", ".join(request.addrs), reason)
        return DialFailed(request.peer, reason)

    async def _ping(self, peer: PeerId) -> Event:
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
                return PingSucceeded(peer)
        self._counters["pings_failed"] += 1
        return PingFailed(peer, reason)


def _relayed(conn: INetConn) -> bool:
    return any(CIRCUIT in str(addr) for addr in conn.get_transport_addresses())


@asynccontextmanager
async def open_node(config: NodeConfig) -> AsyncIterator[SwarmNode]:
    """Start the host and the node, joined to the swarm; stop and close everything on exit. Raises `HostError`
    (port in use), `IdentityError` (bad key file) or `BootstrapFailed` with nothing left running."""
    key_pair = load_or_create_identity(config.host.key_path)
    gate = AddressGate()
    async with (
        running_host(config.host, config.discovery.bootstrap_addrs, gate) as host,
        trio.open_nursery() as nursery,
    ):
        node = SwarmNode(host, key_pair, config, gate)
        await nursery.start(node.run)
        try:
            yield node
        finally:
            nursery.cancel_scope.cancel()
