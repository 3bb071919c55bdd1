"""The py-libp2p host every swarmgrad peer runs: its configuration, how it is built, how it is run and closed.

A swarmgrad host offers exactly one security protocol, Noise, and one stream muxer, yamux. py-libp2p's default host
also offers plaintext (which lets a dialer that knows only a victim's *public* key pose as the victim), secio and
TLS, and mplex as a second muxer: none of them are offered here (docs/libp2p.md #1). The identity is the persistent
Ed25519 key of `p2p.identity`; a pre-shared key, when given, makes it a private network (libp2p pnet: only peers
holding the same 32-byte key can complete a connection). One connection per peer (a dial then takes milliseconds
instead of ~250 ms, docs/libp2p.md #5). mDNS, UPnP, bootstrap and the auto-connector (which would re-dial every known
peer every 30 s) stay off: discovery is the DHT's job, on top of this host.

What the host advertises (identify, DHT provider records and peer routing all read `host.get_addrs()`) and which
received addresses reach its dialer are decided by `p2p.addrs`: the announced addresses, or the listen addresses
with 0.0.0.0 / :: expanded into this host's interface addresses (read once, when the host is built); never an
unspecified address. Identify's observed addresses are recorded (DCUtR hole punching predicts its addresses from
them) but never advertised: what the host advertises is built from its bound listen addresses (or `--announce`)
alone, never from an address another peer observed (a NATed peer's router address, an ephemeral source port).

`running_host(config)` is the one way to run it: it binds every listen address (or raises a `HostError` naming the
address that failed), installs the received-address filter, refuses a bootstrap address that would reach this host's
own listener, and on exit closes the host with `await host.close()` so that no socket stays open and the port is
released (docs/libp2p.md #7). This module must not define stream protocols: `p2p.libp2p_transport` and the
DHT register theirs on the host it yields.
"""

from __future__ import annotations

import errno
import math
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2p.addrs import AddressPolicy, advertised_addrs, check_announce_addr, check_listen_addr, interface_ips
from p2p.identity import load_or_create_identity
from p2p.libp2p_compat import filter_received_addrs, stop_auto_connector
from swarmgrad.core.errors import ConfigError, TransportError
from swarmgrad.core.transport import DEFAULT_MAX_MESSAGE_BYTES

PSK_SIZE_BYTES = 32
"""libp2p pnet keys are 32 bytes (a Salsa20 key)."""

_IP_PROTOCOLS = frozenset({"ip4", "ip6"})
MAX_ADVERTISED_ADDRS = 8
"""At most this many addresses are advertised (a member record carries at most this many)."""


class HostError(TransportError):
    """The host could not start: an address could not be bound."""


@dataclass(frozen=True)
class HostConfig:
    """How one peer's libp2p host is set up. Defaults are for a local test; a real peer sets `listen_addrs`."""

    key_path: Path
    """The peer's identity file (created on first use, see `p2p.identity`)."""
    listen_addrs: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    """TCP multiaddrs to listen on; port 0 picks a free port (`listen_multiaddrs` gives the real one)."""
    announce_addrs: tuple[str, ...] = ()
    """Dialable /ip4|ip6/<address>/tcp/<port> addresses to advertise instead of the (expanded) listen addresses:
    for a host behind a port mapping, or with interfaces other peers cannot reach."""
    psk: bytes | None = None
    """A 32-byte pre-shared key: only peers holding the same key can connect (libp2p pnet). A peer with another
    key (or none) never completes the handshake: it is refused when `handshake_timeout_s` runs out."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """The largest payload this host sends, and the default limit of what it accepts per protocol."""
    max_in_flight_bytes_per_peer: int = 2 * DEFAULT_MAX_MESSAGE_BYTES
    """How many bytes of not-yet-delivered messages one peer may make this host hold, over all its streams; further
    frames from that peer wait (back-pressure) until earlier ones are delivered."""
    connect_timeout_s: float = 10.0
    """Bound on the TCP connect of one dial: generous, for a slow or distant link (py-libp2p's own default is also
    10 s). The handshake that follows has its own bound, `handshake_timeout_s`."""
    handshake_timeout_s: float = 1.5
    """Bound on upgrading a connection once TCP is up, both ways: pnet, the Noise handshake and the yamux
    negotiation, which take milliseconds between two peers of one swarm. A peer holding another swarm key (or
    none, or one where we have none) never completes it, and py-libp2p alone would wait 30-40 s
    (docs/libp2p.md #9): this bound is what makes a wrong swarm key fail fast, with a message naming it."""
    stream_open_timeout_s: float = 10.0
    """Bound on opening a stream and negotiating its protocol on an existing connection."""
    stream_idle_timeout_s: float = 120.0
    """An inbound stream on which no byte arrives for this long (idle between frames, or stalled half-way through
    one) is reset; the sender's next message opens a fresh stream."""
    max_connections: int = 256
    """Connections this host keeps open in all (inbound and outbound); further inbound ones are refused."""

    def __post_init__(self) -> None:
        if not isinstance(self.key_path, Path):
            raise ConfigError("key_path", self.key_path, "a pathlib.Path")
        if not isinstance(self.listen_addrs, tuple) or not self.listen_addrs:
            raise ConfigError("listen_addrs", self.listen_addrs, "a non-empty tuple of multiaddr strings")
        for addr in self.listen_addrs:
            if not isinstance(addr, str):
                raise ConfigError("listen_addrs", addr, "a multiaddr string")
            check_listen_addr("listen_addrs", addr)
        if len(set(self.listen_addrs)) != len(self.listen_addrs):
            raise ConfigError("listen_addrs", self.listen_addrs, "distinct addresses")
        if not isinstance(self.announce_addrs, tuple) or len(self.announce_addrs) > MAX_ADVERTISED_ADDRS:
            raise ConfigError(
                "announce_addrs", self.announce_addrs, f"a tuple of at most {MAX_ADVERTISED_ADDRS} multiaddrs"
            )
        for addr in self.announce_addrs:
            check_announce_addr("announce_addrs", addr)
        if self.psk is not None and (not isinstance(self.psk, bytes) or len(self.psk) != PSK_SIZE_BYTES):
            raise ConfigError("psk", self.psk, f"None or exactly {PSK_SIZE_BYTES} bytes")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1:
            raise ConfigError("max_message_bytes", self.max_message_bytes, "an int >= 1")
        if (
            not isinstance(self.max_in_flight_bytes_per_peer, int)
            or self.max_in_flight_bytes_per_peer < self.max_message_bytes
        ):
            raise ConfigError(
                "max_in_flight_bytes_per_peer",
                self.max_in_flight_bytes_per_peer,
                f"an int >= max_message_bytes ({self.max_message_bytes})",
            )
        for name in ("connect_timeout_s", "handshake_timeout_s", "stream_open_timeout_s", "stream_idle_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
                raise ConfigError(name, value, "a finite number of seconds > 0")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise ConfigError("max_connections", self.max_connections, "an int >= 1")


NO_ADDRESS = "/ip4/0.0.0.0/tcp/0"
"""What a host advertises while its `AddressGate` is closed. A DHT server keeps a provider record only with an
address, so it cannot be nothing; every swarmgrad peer drops this one on receipt (`p2p.addrs`: an unspecified
address), and anything else that dials it fails at once (port 0)."""


class AddressGate:
    """While `closed`, a host advertises only `NO_ADDRESS` (identify, DHT provider records and peer routing): a
    private peer's own addresses are unreachable, and a peer that learnt one would try it (a NAT that drops the
    attempt makes every DHT query to it wait out the connect timeout). Its member record carries its relayed
    addresses instead (py-libp2p's advertised addresses cannot: it cuts every address at its first `/p2p/`)."""

    def __init__(self) -> None:
        self.closed = False


class ConnectionNotifee(INotifee):
    """py-libp2p's network notifications reduced to connection opens and closes, each handed to a callback; the
    stream and listener notifications are ignored. py-libp2p awaits its notifees inline, so the callbacks must not
    block."""

    def __init__(self, on_connected: Callable[[INetConn], None], on_disconnected: Callable[[INetConn], None]) -> None:
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_disconnected(conn)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


def build_host(config: HostConfig, gate: AddressGate | None = None) -> IHost:
    """A py-libp2p host for `config` (Noise only, yamux only, persistent identity, pnet when `psk` is set); not yet
    listening. Prefer `running_host`, which also binds and closes it."""
    key_pair = load_or_create_identity(config.key_path)
    ips = interface_ips()
    built: list[IHost] = []

    def advertise(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        if gate is not None and gate.closed:
            return [multiaddr.Multiaddr(NO_ADDRESS)]
        # `candidates` holds identify's observed addresses too (a NATed peer's router address, ephemeral ports):
        # built from the bound listen addresses only (module docstring)
        bound = built[0].get_transport_addrs() if built else candidates
        return advertised_addrs(bound, config.announce_addrs, ips)[:MAX_ADVERTISED_ADDRS]

    noise = NoiseTransport(key_pair, noise_privkey=create_new_x25519_key_pair().private_key)
    connection_config = ConnectionConfig(
        max_connections=config.max_connections,
        high_watermark=config.max_connections,
        min_connections=0,  # no floor to defend: the pruner only trims above max_connections
        low_watermark=0,
        max_connections_per_peer=1,
        dial_timeout=config.connect_timeout_s,
        outbound_upgrade_timeout=config.handshake_timeout_s,
        inbound_upgrade_timeout=config.handshake_timeout_s,
        outbound_stream_protocol_negotiation_timeout=config.stream_open_timeout_s,
        inbound_stream_protocol_negotiation_timeout=config.stream_open_timeout_s,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[multiaddr.Multiaddr(addr) for addr in config.listen_addrs],
        connection_config=connection_config,
        psk=None if config.psk is None else config.psk.hex(),
        enable_mDNS=False,
        enable_upnp=False,
        addrs_factory=advertise,
    )
    built.append(host)
    return host


def _check_bindable(addr: str) -> None:
    """Refuse an address whose port another process already listens on.

    py-libp2p binds with SO_REUSEPORT, so a second host on a taken port would *succeed* and silently share the
    port's incoming connections with the first. This probe binds without SO_REUSEPORT (with SO_REUSEADDR, so
    sockets in TIME_WAIT from an earlier run do not count) and so fails exactly when a listener holds the port.
    """
    parsed = multiaddr.Multiaddr(addr)
    port = int(parsed.value_for_protocol("tcp"))
    if port == 0:
        return
    family, ip = (
        (socket.AF_INET6, parsed.value_for_protocol("ip6"))
        if "ip6" in [protocol.name for protocol in parsed.protocols()]
        else (socket.AF_INET, parsed.value_for_protocol("ip4"))
    )
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as exc:
            reason = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise HostError(f"cannot listen on {addr}: {reason}") from exc


@asynccontextmanager
async def running_host(
    config: HostConfig, bootstrap_addrs: tuple[str, ...] = (), gate: AddressGate | None = None
) -> AsyncIterator[IHost]:
    """Build the host, listen on every address of `config`, and close it (releasing every socket) on exit.

    `bootstrap_addrs` are the addresses the user gave to join through: they are dialled as given (a loopback one
    too), but one that would reach this host's own listener is refused. While `gate` is closed it advertises nothing
    (`AddressGate`). Raises `HostError` naming the address when
    one cannot be bound (port in use, address not on this machine) or a bootstrap address is this host's own.
    """
    for addr in config.listen_addrs:
        _check_bindable(addr)
    host = build_host(config, gate)
    wanted = [multiaddr.Multiaddr(addr) for addr in config.listen_addrs]
    refusal: HostError | None = None
    async with host.run(listen_addrs=wanted):
        try:
            bound = host.get_network().listeners
            for addr, text in zip(wanted, config.listen_addrs, strict=True):
                if str(addr) not in bound:
                    raise HostError(
                        f"cannot listen on {text}: the port is in use or the address is not on this machine"
                    )
            # Stopped right after start, before anything is in the peerstore (docs/libp2p.md #11).
            await stop_auto_connector(host)
            policy = AddressPolicy(interface_ips(), host.get_transport_addrs())
            refusal = _refuse_own_bootstrap(host, policy, bootstrap_addrs)
            if refusal is None:
                policy.trust(bootstrap_addrs)
                filter_received_addrs(host, policy)
                yield host
        finally:
            await host.close()
    if refusal is not None:  # raised here, outside py-libp2p's nursery, so the caller gets it ungrouped
        raise refusal


def _refuse_own_bootstrap(host: IHost, policy: AddressPolicy, bootstrap_addrs: tuple[str, ...]) -> HostError | None:
    """The error for the first bootstrap address that would reach this host's own listener, or None."""
    for text in bootstrap_addrs:
        addr = multiaddr.Multiaddr(text)
        if addr.value_for_protocol("p2p") == host.get_id().to_base58():
            continue  # ourselves by id: discovery skips it (pod 0 of a StatefulSet)
        reason = policy.dialable(addr, peer_is_local=True)
        if reason is not None:
            return HostError(
                f"bootstrap address {text} is {reason}, so it would reach this peer itself: give the address "
                "the bootstrap host prints with `swarmgrad id` (its --announce address, or one of its "
                "interface addresses)"
            )
    return None


def listen_multiaddrs(host: IHost) -> list[str]:
    """The addresses this host advertises (see `p2p.addrs`), each with the real bound port and ending in
    `/p2p/<peer id>`, sorted; none while its `AddressGate` is closed."""
    return sorted(str(addr) for addr in host.get_addrs() if not str(addr).startswith(f"{NO_ADDRESS}/"))
