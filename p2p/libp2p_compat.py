"""Every use swarmgrad makes of py-libp2p beyond its documented interfaces, one small function each; checked by
`tests/test_libp2p_compat.py`.

py-libp2p 0.8.1 is pinned (constraints.txt). What this module touches is private (a leading underscore), lives on a
concrete class rather than on an `abc.py` interface, or is behaviour no documentation promises; another release may
change any of it. Each function's docstring states the fact it relies on, `docs/libp2p.md` ("Internals") lists them
in prose, and the test module checks each one against the installed version (signature and behaviour), so an upgrade
that breaks one fails there, by name, rather than somewhere in a swarm run. No other product module may reach past
py-libp2p's interfaces: put the next such use here, with its test.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.kad_dht import _encode_key as _libp2p_encode_key
from libp2p.network.connection.swarm_connection import Direction
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2 import dcutr as dcutr_module
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.security.pnet.psk_conn import PskConn

from p2p.addrs import AddressPolicy
from swarmgrad.core.errors import LocalProtocolError

log = logging.getLogger(__name__)


def _swarm(host: IHost) -> Swarm:
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise LocalProtocolError(f"py-libp2p built a {type(network).__name__}, expected a Swarm")
    return network


async def stop_auto_connector(host: IHost) -> None:
    """Stop the host's auto-connector, which otherwise re-dials every peer in the peerstore every 30 s (its target is
    half of the connection manager's high watermark, whatever the low one). Relies on: the host's network is a
    `Swarm` with an `auto_connector` attribute whose `stop()` is a coroutine, safe to call right after the host
    started."""
    await _swarm(host).auto_connector.stop()


def forget_dial_failure(host: IHost, peer_id: ID) -> None:
    """Let the next dial to `peer_id` reach the network. Relies on: after one failed dial `Swarm` refuses every
    dial to that peer for 60 s without touching the network (its negative cache), and `Swarm.unblock_peer(peer_id)`
    (not on `INetwork`) lifts it; a peer not in the cache is a no-op."""
    _swarm(host).unblock_peer(peer_id)


def is_inbound(conn: INetConn) -> bool:
    """Whether the remote peer dialled this connection. Relies on: py-libp2p's connections are `SwarmConn`s with a
    `direction` property (not on `INetConn`) that is `Direction.INBOUND` for a connection a listener accepted."""
    return getattr(conn, "direction", None) == Direction.INBOUND


def remote_ip(conn: INetConn) -> str | None:
    """The IP address `conn` comes from, or None when its transport does not know it. Relies on: py-libp2p's muxed
    connections (yamux, mplex) have a `get_remote_address()` (not on `IMuxedConn`) that returns (host, port) from
    the secured connection beneath, or None."""
    remote = getattr(conn.muxed_conn, "get_remote_address", lambda: None)()
    return None if remote is None else str(remote[0])


def dht_key(key: str) -> bytes:
    """The bytes py-libp2p's Kademlia stores `key` under in its provider store and routing lookups. Relies on: the
    private `kad_dht._encode_key`, which `KadDHT.provide`/`find_providers` apply to a string key (a CID's multihash,
    else a hex multihash, else the UTF-8 bytes of the string)."""
    return _libp2p_encode_key(key)


def local_providers(dht: KadDHT, key: bytes) -> list[PeerInfo]:
    """The providers of `key` (from `dht_key`) this peer's own provider store holds, itself included once it
    provides. Relies on: `KadDHT.provider_store.get_providers(key)`."""
    return dht.provider_store.get_providers(key)


def closest_known_peers(dht: KadDHT, key: bytes) -> list[ID]:
    """The peers of the routing table closest to `key` (up to the bucket size, 20), without any network query.
    Relies on: `KadDHT.routing_table.find_local_closest_peers(key)`."""
    return dht.routing_table.find_local_closest_peers(key)


async def fill_routing_table(dht: KadDHT, own_id: ID) -> None:
    """Fill the routing table with this peer's neighbours by looking up its own id on the network. Relies on: a plain
    `connect` plus `add_peer` leaves the table holding only the bootstrap peer, and
    `KadDHT.peer_routing.find_closest_peers_network(key_bytes)` adds every peer its iterative lookup meets
    (py-libp2p's `refresh_routing_table` also looks up a random key per bucket: seconds, for nothing we need)."""
    await dht.peer_routing.find_closest_peers_network(own_id.to_bytes())


async def query_providers(dht: KadDHT, peer_id: ID, key: bytes) -> list[PeerInfo]:
    """The providers of `key` that one peer, `peer_id`, knows, asked directly with one GET_PROVIDERS request.
    Relies on: the private `ProviderStore._get_providers_from_peer_with_closers(peer_id, key)` returning
    `(providers, closer_peers)`, and logging and absorbing every failure of the query (no answer: no providers).
    py-libp2p's public `find_providers` answers from the local store alone whenever it holds any provider, which
    every member does once it provides, so it never asks the network."""
    providers, _closer = await dht.provider_store._get_providers_from_peer_with_closers(peer_id, key)
    return providers


def filter_received_addrs(host: IHost, policy: AddressPolicy) -> None:
    """Drop, before they reach `host`'s peerstore, the addresses `policy` says are not dialable from here. A peer is
    local when one of its current connections comes from loopback or from one of this host's addresses.

    Relies on: every address py-libp2p learns about another peer (identify, Kademlia peer routing and provider
    records, `host.connect`) enters the peerstore through its `add_addrs` (its `add_addr` calls it too), so wrapping
    that one method on the host's peerstore instance is the single gate in front of the dialer; and yamux's muxed
    connection has `get_remote_address()` (not on the `IMuxedConn` interface)."""
    peerstore = host.get_peerstore()
    original = peerstore.add_addrs
    own_id = host.get_id()
    reported: set[tuple[ID, str]] = set()

    def peer_is_local(peer_id: ID) -> bool:
        for conn in host.get_network().get_connections(peer_id):
            remote = getattr(conn.muxed_conn, "get_remote_address", lambda: None)()
            if remote is not None and policy.is_local_ip(remote[0]):
                return True
        return False

    def add_addrs(peer_id: ID, addrs: Sequence[multiaddr.Multiaddr], ttl: int = 0) -> None:
        if peer_id == own_id:
            return
        local = peer_is_local(peer_id)
        kept = []
        for addr in addrs:
            reason = policy.dialable(addr, local)
            if reason is None:
                kept.append(addr)
            elif (peer_id, str(addr)) not in reported and len(reported) < 4096:
                reported.add((peer_id, str(addr)))
                log.info("not dialling %s at %s: %s", peer_id, addr, reason)
        if kept:
            original(peer_id, kept, ttl)

    peerstore.add_addrs = add_addrs  # type: ignore[method-assign]


class _UpgradeWatch:
    """The callbacks waiting for an outbound connection upgrade to begin, per remote peer, on one `Swarm`."""

    def __init__(self, swarm: Swarm) -> None:
        self.waiters: dict[ID, list[Callable[[], None]]] = {}
        original = swarm.upgrade_outbound_raw_conn

        async def upgrade(raw_conn: Any, peer_id: ID, pre_scope: Any = None) -> Any:
            for callback in list(self.waiters.get(peer_id, ())):
                callback()
            return await original(raw_conn, peer_id, pre_scope)

        swarm.upgrade_outbound_raw_conn = upgrade  # type: ignore[method-assign]


_upgrade_watches: weakref.WeakKeyDictionary[Swarm, _UpgradeWatch] = weakref.WeakKeyDictionary()


@contextmanager
def on_outbound_upgrade(host: IHost, peer_id: ID, callback: Callable[[], None]) -> Iterator[None]:
    """While in this block, call `callback()` each time one of `host`'s outbound dials to `peer_id` (ours or any
    other task's) has its TCP connection open and starts upgrading it: pnet, the security handshake, the muxer.
    What happens before is the TCP connect; what follows is the handshake, which a peer holding another swarm key
    never completes.

    Relies on: `Swarm.dial_addr` gets the raw connection from the transport (the TCP connect), wraps it for pnet
    (no I/O yet), then awaits `self.upgrade_outbound_raw_conn(raw_conn, peer_id, pre_scope)`, looked up on the
    instance, which does all of the upgrade; so wrapping that method on the host's `Swarm` (once per swarm) sees
    the moment TCP is up."""
    swarm = _swarm(host)
    watch = _upgrade_watches.get(swarm)
    if watch is None:
        watch = _upgrade_watches[swarm] = _UpgradeWatch(swarm)
    waiting = watch.waiters.setdefault(peer_id, [])
    waiting.append(callback)
    try:
        yield
    finally:
        waiting.remove(callback)
        if not waiting:
            del watch.waiters[peer_id]


async def dial_relayed(
    host: IHost, transport: CircuitV2Transport, relay: PeerInfo, target: ID, psk: bytes | None
) -> INetConn:
    """A connection to `target` through a circuit relay v2 reservation `target` holds on `relay`, registered in the
    host's swarm like a direct one (its transport addresses contain `/p2p-circuit`). `psk` is the host's pre-shared
    key, or None.

    Relies on: `CircuitV2Transport.dial_peer_info(dest_info, relay_info=...)` connects to the relay, sends the hop
    CONNECT and returns the circuit as a raw, not yet secured connection; the receiving side upgrades an inbound
    circuit like any inbound connection, inside pnet when it has a key, but `host.upgrade_outbound_connection` adds
    no pnet, so with a key the dialling side must wrap the circuit itself (`new_protected_conn`, which takes the key
    as 64 hex characters), or the handshake fails with "failed to negotiate the secure protocol" (docs/nat.md).
    With a key, `pnet_reports_its_transport` runs first, so the connection is seen as relayed."""
    pnet_reports_its_transport()
    raw = await transport.dial_peer_info(dest_info=PeerInfo(target, []), relay_info=relay)
    if psk is not None:
        raw = new_protected_conn(raw, psk.hex())
    return await host.upgrade_outbound_connection(raw, target)


def stream_remote_ip(stream: INetStream) -> str | None:
    """The IP address the connection under `stream` comes from, or None when its transport does not know it. Relies
    on: py-libp2p's streams (`NetStream`) have a `get_remote_address()` (not on `INetStream`) that returns (host,
    port) from the muxed connection beneath, or None."""
    remote = getattr(stream, "get_remote_address", lambda: None)()
    return None if remote is None else str(remote[0])


async def dial_fresh(host: IHost, addr: multiaddr.Multiaddr, peer_id: ID) -> INetConn:
    """A NEW connection to `peer_id` at exactly `addr` (TCP, pnet when the host has a key, the security handshake
    that proves the remote holds `peer_id`'s key, the muxer), even while another connection to that peer is open;
    the caller closes it (`await conn.close()`), which leaves the other connections alone. For a real dial-back
    (`p2p.dialback`): `host.connect` would return at once on the open connection and test nothing.

    Relies on: `Swarm.dial_addr(addr, peer_id)` (the call py-libp2p's DCUtR uses) dials without looking at the
    connections already open and registers the new one beside them (despite `max_connections_per_peer=1`), retrying a
    refused TCP connect a few times with backoff (`RetryConfig`): the caller bounds it in time; it raises
    `SwarmException` when every attempt failed (docs/nat.md)."""
    return await _swarm(host).dial_addr(addr, peer_id)


def pnet_reports_its_transport() -> None:
    """Make every pnet-wrapped connection report the transport addresses and type of the connection it wraps, as
    the Noise and yamux layers above it do; without it a private swarm's connections have no transport addresses,
    and a relayed one cannot be told from a direct one. Idempotent, for the whole process.

    Relies on: `PskConn` keeps the wrapped connection as `_conn` and defines neither `get_transport_addresses` nor
    `get_connection_type` (the stubs it inherits from `IRawConnection` return None), and the swarm reads both,
    through the security and muxer layers, when it registers a connection."""
    if "get_transport_addresses" in PskConn.__dict__:
        return

    def get_transport_addresses(self: PskConn) -> list[multiaddr.Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self: PskConn) -> Any:
        return self._conn.get_connection_type()

    PskConn.get_transport_addresses = get_transport_addresses  # type: ignore[method-assign,assignment]
    PskConn.get_connection_type = get_connection_type  # type: ignore[method-assign,assignment]


def pnet_once_on_responder_dials(host: IHost) -> None:
    """Let a hole-punch dial upgraded as responder be wrapped in pnet once, not twice, in a private swarm.

    Relies on: `Swarm.dial_addr_as_responder` (DCUtR's initiator dials with it) wraps the raw connection in pnet
    (`PskConn`) and then awaits `self.upgrade_inbound_raw_conn(raw_conn, addr)`, looked up on the instance, which
    wraps every connection it gets in pnet again when the swarm has a key; no other caller hands that method a
    `PskConn`. Doubly wrapped, the peer (wrapped once) reads noise and every punch in a private swarm fails at the
    dial timeout (measured in the namespace topology). So the wrapper on the instance unwraps a `PskConn` (its
    `_conn`) before the original wraps it again. Idempotent per host."""
    swarm = _swarm(host)
    if swarm.psk is None or getattr(swarm, "_swarmgrad_pnet_once", False):
        return
    original = swarm.upgrade_inbound_raw_conn

    async def upgrade_inbound_raw_conn(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        if isinstance(raw_conn, PskConn):
            raw_conn = raw_conn._conn
        return await original(raw_conn, maddr)

    swarm.upgrade_inbound_raw_conn = upgrade_inbound_raw_conn  # type: ignore[method-assign]
    swarm._swarmgrad_pnet_once = True  # type: ignore[attr-defined]


def is_relayed(conn: INetConn) -> bool:
    """Whether `conn` runs through a circuit relay. Relies on: the swarm sets a connection's transport addresses
    from its muxed connection before it announces it, and a circuit's (either side) contain `/p2p-circuit`; a
    connection whose addresses were never set reads as not relayed (`SwarmConn.get_transport_addresses` would fall
    back to the peerstore's addresses, which say nothing about this connection, so the set ones are read)."""
    addrs = getattr(conn, "_actual_transport_addresses", None) or []
    return any("/p2p-circuit" in str(addr) for addr in addrs)


DCUTR_DIAL_TIMEOUT_S = 3
"""Bound on each DCUtR dial (py-libp2p's default is 10 s). A punch that works connects within one SYN
retransmission (1 s) plus the handshake."""


def serve_dcutr(host: IHost, max_session_s: float) -> None:
    """Answer DCUtR hole punches that other peers start, without py-libp2p's self-driving loop, and make
    `punch_direct` available on `host`. Each answered session (the peer's CONNECT, our CONNECT, its SYNC, our dials)
    is cut off after `max_session_s`.

    Relies on: `DCUtRProtocol(host, ...)` does no I/O when built and registers itself as `host._dcutr_protocol` (the
    host calls its `on_peer_disconnected` on every close); its stream handler, the private `_handle_dcutr_stream`,
    and `initiate_hole_punch` need only the host, not the running service: `DCUtRProtocol.run` adds nothing but the
    handler registration and `_auto_drive_loop`, which every 2 s punches every relayed-only peer on its own
    schedule (docs/nat.md). Not running the service also leaves its `_nursery` None, so its own 60 s closing of the
    relayed connection after a success is skipped (the node closes it). Timeouts are whole seconds. It also runs
    `pnet_reports_its_transport`, so that relayed connections are recognised in a private swarm,
    `pnet_once_on_responder_dials`, without which no punch succeeds in one, and `dcutr_reads_bound_listen_addrs`.

    The initiator's first step, `_try_unilateral_upgrade` (a plain dial of the peer's non-relayed peerstore
    addresses, looked up on the instance), is replaced by one that dials nothing: swarmgrad dials a member's
    advertised addresses itself (membership's `Dial`), and what identify put in the peerstore of a NATed peer is its
    private address, whose dial is retried until the dial timeout (3 s of every punch, measured in the namespace
    topology)."""
    pnet_reports_its_transport()
    pnet_once_on_responder_dials(host)
    dcutr_reads_bound_listen_addrs()
    session_timeout = max(1, math.ceil(max_session_s))
    dcutr = DCUtRProtocol(
        host, read_timeout=session_timeout, write_timeout=session_timeout, dial_timeout=DCUTR_DIAL_TIMEOUT_S
    )

    async def no_unilateral_upgrade(peer_id: ID) -> bool:
        return False

    dcutr._try_unilateral_upgrade = no_unilateral_upgrade  # type: ignore[method-assign]

    async def handle(stream: INetStream) -> None:
        with trio.move_on_after(max_session_s):
            await dcutr._handle_dcutr_stream(stream)

    host.set_stream_handler(DCUTR_PROTOCOL_ID, handle)


class _BoundAddrs:
    """What `dcutr_module._local_tcp_listen_addrs` reads of a host: `get_addrs()`, answered with the bound ones."""

    def __init__(self, host: Any) -> None:
        self._host = host

    def get_addrs(self) -> list[multiaddr.Multiaddr]:
        return list(self._host.get_transport_addrs())


def dcutr_reads_bound_listen_addrs() -> None:
    """Make DCUtR take its listen port from the addresses the host is bound to, not from those it advertises: a
    private node advertises only a placeholder (`p2p.host.AddressGate`, port 0), and DCUtR would then predict
    `<router IP>/tcp/0` and dial from an ephemeral port, and no punch would succeed. Idempotent, for the process.

    Relies on: the predicted addresses of `_get_observed_addrs` (observed IP, listen port) and the source port of
    the punch dials (`_dial_peer`) both come from the module function `_local_tcp_listen_addrs(host)`, which reads
    only `host.get_addrs()`."""
    original = dcutr_module._local_tcp_listen_addrs
    if getattr(original, "reads_bound_addrs", False):
        return

    def bound_listen_addrs(host: Any) -> list[tuple[int, str, int]]:
        return original(_BoundAddrs(host))

    bound_listen_addrs.reads_bound_addrs = True  # type: ignore[attr-defined]
    dcutr_module._local_tcp_listen_addrs = bound_listen_addrs


def _dcutr(host: IHost) -> DCUtRProtocol:
    dcutr = getattr(host, "_dcutr_protocol", None)
    if not isinstance(dcutr, DCUtRProtocol):
        raise LocalProtocolError("punch_direct needs serve_dcutr(host) first")
    return dcutr


def has_direct_connection(host: IHost, peer_id: ID) -> bool:
    """Whether `host` holds a connection to `peer_id` that is not relayed (see `is_relayed`)."""
    return any(not is_relayed(conn) for conn in host.get_network().get_connections(peer_id))


async def punch_direct(host: IHost, peer_id: ID, timeout_s: float) -> bool:
    """One DCUtR hole punch to `peer_id`, over the relayed connection `host` holds to it, cut off after `timeout_s`;
    whether a direct connection exists afterwards. `serve_dcutr(host, ...)` must have run first.

    Relies on: `DCUtRProtocol.initiate_hole_punch(peer_id)` (its unilateral upgrade disabled by `serve_dcutr`)
    opens the DCUtR stream, exchanges CONNECT (the addresses each side
    predicts for itself: the public IP identify observed, with its own listen port) and SYNC, and dials those from
    its listen port, in up to 3 rounds; and it refuses a peer after 3 attempts (`_hole_punch_attempts`, reset only
    when a connection to the peer closes), so the attempt count is cleared here: swarmgrad's `p2p.hole_punch` bounds
    the attempts instead."""
    dcutr = _dcutr(host)
    dcutr._hole_punch_attempts.pop(peer_id, None)
    with trio.move_on_after(timeout_s):
        await dcutr.initiate_hole_punch(peer_id)
    return has_direct_connection(host, peer_id)
