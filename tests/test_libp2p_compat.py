"""Each py-libp2p internal that `p2p.libp2p_compat` relies on, checked against the installed version with real hosts
on this machine: first the signature or attribute each function reaches for (so an upgrade that renames or reshapes
it fails here by name), then its behaviour: the received-address filter in front of the dialer, what a host
listening on 0.0.0.0 advertises (identify message, signed peer record), the auto-connector, the dial negative cache,
connection direction, the Kademlia internals discovery uses, a relayed dial in a private swarm, and DCUtR served
and driven without its own loop."""

from __future__ import annotations

import inspect
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.peer_routing import PeerRouting
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.kad_dht.routing_table import RoutingTable
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStore, PeerStoreError, env_to_send_in_RPC
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.security.pnet.protector import new_protected_conn
from libp2p.security.pnet.psk_conn import PskConn
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from p2p.addrs import ip_of
from p2p.host import ConnectionNotifee, HostConfig, HostError, listen_multiaddrs, running_host
from p2p.libp2p_compat import (
    closest_known_peers,
    dht_key,
    dial_fresh,
    dial_relayed,
    fill_routing_table,
    forget_dial_failure,
    has_direct_connection,
    is_inbound,
    is_relayed,
    local_providers,
    on_outbound_upgrade,
    pnet_once_on_responder_dials,
    punch_direct,
    query_providers,
    remote_ip,
    serve_dcutr,
    stop_auto_connector,
    stream_remote_ip,
)
from swarmgrad.core.errors import LocalProtocolError

TIMEOUT_S = 30
M = multiaddr.Multiaddr
ANY = ("/ip4/0.0.0.0/tcp/0",)


def _stranger() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def _known_addrs(host: IHost, peer: ID) -> list[str]:
    try:
        return [str(a) for a in host.get_peerstore().addrs(peer)]
    except PeerStoreError:  # py-libp2p raises for a peer it holds no address of
        return []


def _unspecified(addrs: list[multiaddr.Multiaddr]) -> list[str]:
    return [str(a) for a in addrs if (ip := ip_of(a)) is not None and ip.is_unspecified]


async def test_a_host_on_the_unspecified_address_advertises_real_addresses_in_identify_and_peer_records(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "k", listen_addrs=ANY)) as host:
            port = host.get_transport_addrs()[0].value_for_protocol("tcp")
            advertised = host.get_addrs()
            identify = _mk_identify_protobuf(host, None)
            envelope_bytes, _ = env_to_send_in_RPC(host)
            listed = listen_multiaddrs(host)
    assert advertised and not _unspecified(advertised)
    assert all(a.value_for_protocol("tcp") == port for a in advertised)
    in_identify = [M(raw) for raw in identify.listen_addrs]
    assert in_identify and not _unspecified(in_identify)
    _, record = consume_envelope(envelope_bytes, "libp2p-peer-record")
    assert record.addrs and not _unspecified(list(record.addrs))
    assert listed and not any("/0.0.0.0/" in text for text in listed)


async def test_announced_addresses_are_all_a_host_advertises(tmp_path: Path) -> None:
    config = HostConfig(tmp_path / "k", listen_addrs=ANY, announce_addrs=("/ip4/203.0.113.7/tcp/9000",))
    with trio.fail_after(TIMEOUT_S):
        async with running_host(config) as host:
            identify = _mk_identify_protobuf(host, None)
            listed = listen_multiaddrs(host)
    assert [str(M(raw)) for raw in identify.listen_addrs] == ["/ip4/203.0.113.7/tcp/9000"]
    assert listed == [f"/ip4/203.0.113.7/tcp/9000/p2p/{host.get_id()}"]


async def test_undialable_received_addresses_never_reach_the_peerstore(tmp_path: Path) -> None:
    stranger = _stranger()
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "k", listen_addrs=ANY)) as host:
            own = host.get_addrs()[0]
            own_transport = M(str(own).rpartition("/p2p/")[0])
            store = host.get_peerstore()
            store.add_addrs(
                stranger,
                [M("/ip4/0.0.0.0/tcp/7400"), M("/ip4/127.0.0.1/tcp/22"), own_transport, M("/ip4/198.51.100.7/tcp/1")],
                120,
            )
            store.add_addr(stranger, M("/ip6/::/tcp/7400"), 120)
            kept = _known_addrs(host, stranger)
            store.add_addrs(host.get_id(), [M("/ip4/198.51.100.8/tcp/1")], 120)
            own_entry = _known_addrs(host, host.get_id())
            # a dial through `connect` with only bad addresses fails without any connection attempt reaching us
            with pytest.raises(SwarmException):
                await host.connect(PeerInfo(_stranger(), [own_transport]))
    assert kept == ["/ip4/198.51.100.7/tcp/1"]
    assert "/ip4/198.51.100.8/tcp/1" not in own_entry


async def test_a_peer_connected_over_loopback_may_give_loopback_addresses(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a", listen_addrs=ANY)) as a:
            port = a.get_transport_addrs()[0].value_for_protocol("tcp")
            boot = f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.get_id()}"
            # b is not loopback-only (0.0.0.0): only a's loopback connection makes a local
            async with running_host(HostConfig(tmp_path / "b", listen_addrs=ANY), (boot,)) as b:
                await b.connect(PeerInfo(a.get_id(), [M(f"/ip4/127.0.0.1/tcp/{port}")]))
                b.get_peerstore().add_addrs(a.get_id(), [M("/ip4/127.0.0.1/tcp/9")], 120)
                stranger = _stranger()
                b.get_peerstore().add_addrs(stranger, [M("/ip4/127.0.0.1/tcp/9")], 120)
                from_local = _known_addrs(b, a.get_id())
                from_stranger = _known_addrs(b, stranger)
    assert "/ip4/127.0.0.1/tcp/9" in from_local
    assert from_stranger == []


async def test_a_bootstrap_address_that_is_our_own_listener_is_refused(tmp_path: Path) -> None:
    other = _stranger()
    with trio.fail_after(TIMEOUT_S):
        probe_port = 0
        async with running_host(HostConfig(tmp_path / "p", listen_addrs=ANY)) as probe:
            probe_port = int(probe.get_transport_addrs()[0].value_for_protocol("tcp"))
        config = HostConfig(tmp_path / "k", listen_addrs=(f"/ip4/0.0.0.0/tcp/{probe_port}",))
        with pytest.raises(HostError, match=r"own listen address.*swarmgrad id"):
            async with running_host(config, (f"/ip4/127.0.0.1/tcp/{probe_port}/p2p/{other}",)):
                pass


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_the_internals_have_the_shape_the_adapter_calls() -> None:
    """Fails by name when an upgrade renames, removes or reshapes one of the internals `p2p.libp2p_compat` uses."""
    assert _parameters(PeerStore.add_addrs) == ["self", "peer_id", "addrs", "ttl"]
    assert inspect.iscoroutinefunction(AutoConnector.stop) and _parameters(AutoConnector.stop) == ["self"]
    assert "auto_connector" in inspect.get_annotations(Swarm)
    assert _parameters(Swarm.unblock_peer) == ["self", "peer_id"]
    assert inspect.iscoroutinefunction(Swarm.upgrade_outbound_raw_conn)
    assert _parameters(Swarm.upgrade_outbound_raw_conn) == ["self", "raw_conn", "peer_id", "pre_scope"]
    assert isinstance(inspect.getattr_static(SwarmConn, "direction"), property)
    assert _parameters(Yamux.get_remote_address) == ["self"]
    assert _parameters(ProviderStore.get_providers) == ["self", "key"]
    assert inspect.iscoroutinefunction(ProviderStore._get_providers_from_peer_with_closers)
    assert _parameters(ProviderStore._get_providers_from_peer_with_closers) == ["self", "peer_id", "key"]
    assert _parameters(RoutingTable.find_local_closest_peers)[:2] == ["self", "key"]
    assert inspect.iscoroutinefunction(PeerRouting.find_closest_peers_network)
    assert _parameters(PeerRouting.find_closest_peers_network)[:2] == ["self", "target_key"]
    assert inspect.iscoroutinefunction(CircuitV2Transport.dial_peer_info)
    assert _parameters(CircuitV2Transport.dial_peer_info) == ["self", "dest_info", "relay_info"]
    assert _parameters(new_protected_conn) == ["conn", "psk"]
    assert _parameters(BasicHost.upgrade_outbound_connection) == ["self", "raw_conn", "peer_id"]
    assert inspect.iscoroutinefunction(Swarm.dial_addr) and _parameters(Swarm.dial_addr)[:3] == [
        "self",
        "addr",
        "peer_id",
    ]
    assert _parameters(NetStream.get_remote_address) == ["self"]
    assert _parameters(DCUtRProtocol.__init__) == ["self", "host", "read_timeout", "write_timeout", "dial_timeout"]
    assert _parameters(DCUtRProtocol._handle_dcutr_stream) == ["self", "stream"]
    assert _parameters(DCUtRProtocol.initiate_hole_punch) == ["self", "peer_id"]
    assert _parameters(DCUtRProtocol._try_unilateral_upgrade) == ["self", "peer_id"]
    assert "self._conn = conn" in inspect.getsource(PskConn.__init__)
    # a responder dial wraps pnet itself, then hands the connection to the method that wraps every connection again
    responder_dial = inspect.getsource(Swarm.dial_addr_as_responder)
    assert "new_protected_conn(raw_conn, self.psk)" in responder_dial
    assert "await self.upgrade_inbound_raw_conn(raw_conn, addr)" in responder_dial
    assert "new_protected_conn(raw_conn, self.psk)" in inspect.getsource(Swarm.upgrade_inbound_raw_conn)
    assert "self._try_unilateral_upgrade(peer_id)" in inspect.getsource(DCUtRProtocol._initiate_hole_punch_locked)
    # the self-driving loop is started by the service's run, which serve_dcutr never calls
    assert "_auto_drive_loop" in inspect.getsource(DCUtRProtocol.run)
    # dcutr_reads_bound_listen_addrs: both the predicted addresses and the punch's source port come from here
    for method in (DCUtRProtocol._get_observed_addrs, DCUtRProtocol._perform_hole_punch):
        assert "_local_tcp_listen_addrs(self.host)" in inspect.getsource(method)
    assert "_auto_drive_loop" not in inspect.getsource(DCUtRProtocol._handle_dcutr_stream)
    assert "_auto_drive_loop" not in inspect.getsource(DCUtRProtocol.initiate_hole_punch)


def test_dht_keys_are_the_utf8_bytes_of_a_swarmgrad_key() -> None:
    assert dht_key("/swarmgrad/s/members") == b"/swarmgrad/s/members"


async def test_the_auto_connector_stops_and_the_host_keeps_working(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:
            network = a.get_network()
            assert isinstance(network, Swarm)
            assert not network.auto_connector._started  # running_host stopped it
            await stop_auto_connector(a)  # a second stop is harmless
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            assert a.get_network().get_connections(b.get_id())


async def test_a_peer_in_the_dial_negative_cache_is_refused_until_the_failure_is_forgotten(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:
            network = a.get_network()
            assert isinstance(network, Swarm)
            network._negative_peer_cache.mark_failed(str(b.get_id()))  # as after a dial to every address failed
            with pytest.raises(SwarmException, match="negative cache"):
                await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            forget_dial_failure(a, b.get_id())
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            assert a.get_network().get_connections(b.get_id())
            forget_dial_failure(a, _stranger())  # a peer never dialled: no-op


async def test_the_upgrade_of_an_outbound_dial_is_seen_once_tcp_is_up(tmp_path: Path) -> None:
    """The split between a dial's TCP connect and its handshake: the callback runs for a dial whose TCP connection
    opened (once), not for one refused at the TCP level, and not for another peer or after the block."""
    seen: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:
            stranger = _stranger()
            with (
                on_outbound_upgrade(a, b.get_id(), lambda: seen.append("b")),
                on_outbound_upgrade(a, stranger, lambda: seen.append("stranger")),
            ):
                with pytest.raises(SwarmException):  # nobody listens on port 1: refused before any upgrade
                    await a.connect(PeerInfo(stranger, [M("/ip4/127.0.0.1/tcp/1")]))
                assert seen == []
                await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
                assert seen == ["b"]
            await a.disconnect(b.get_id())
            forget_dial_failure(a, b.get_id())
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
    assert seen == ["b"]


async def test_a_connection_knows_which_side_dialled(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:
            accepted = trio.Event()  # b's side of the connection may register after a's connect returns
            b.get_network().register_notifee(ConnectionNotifee(lambda conn: accepted.set(), lambda conn: None))
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            with trio.fail_after(5):
                await accepted.wait()
            outbound = a.get_network().get_connections(b.get_id())
            inbound = b.get_network().get_connections(a.get_id())
    assert outbound and not any(is_inbound(conn) for conn in outbound)
    assert inbound and all(is_inbound(conn) for conn in inbound)
    assert {remote_ip(conn) for conn in inbound} <= {str(ip_of(addr)) for addr in a.get_addrs()} | {"127.0.0.1"}
    assert all(remote_ip(conn) is not None for conn in inbound + outbound)


@asynccontextmanager
async def _dht(tmp_path: Path, name: str) -> AsyncIterator[tuple[IHost, KadDHT]]:
    async with running_host(HostConfig(tmp_path / name)) as host:
        dht = KadDHT(host, DHTMode.SERVER)
        async with background_trio_service(dht):
            yield host, dht


async def test_kademlia_internals_answer_as_discovery_expects(tmp_path: Path) -> None:
    key_text = "/swarmgrad/s/members"
    key = dht_key(key_text)
    with trio.fail_after(TIMEOUT_S):
        async with (
            _dht(tmp_path, "a") as (a, dht_a),
            _dht(tmp_path, "b") as (b, dht_b),
            _dht(tmp_path, "c") as (
                c,
                dht_c,
            ),
        ):
            # b knows a and c; a knows only b until it fills its routing table through b
            for host in (a, c):
                await b.connect(PeerInfo(host.get_id(), host.get_addrs()))
                await dht_b.add_peer(host.get_id())
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            await dht_a.add_peer(b.get_id())
            assert c.get_id() not in closest_known_peers(dht_a, key)
            await fill_routing_table(dht_a, a.get_id())
            assert {b.get_id(), c.get_id()} <= set(closest_known_peers(dht_a, key))

            assert await dht_c.provide(key_text)
            assert c.get_id() in [info.peer_id for info in local_providers(dht_c, key)]
            # (c's provide also pushes the record to its closest peers, a among them, at once or a little later: so
            # a's own store is not asserted on; the query below asks c itself)
            from_c = await query_providers(dht_a, c.get_id(), key)
            assert c.get_id() in [info.peer_id for info in from_c]
            # a peer that does not answer yields no providers rather than an exception
            assert await query_providers(dht_a, _stranger(), key) == []


async def test_a_relayed_dial_in_a_private_swarm_works_only_with_pnet_added_by_the_dialler(tmp_path: Path) -> None:
    psk = bytes(range(32))
    with trio.fail_after(TIMEOUT_S):
        async with (
            running_host(HostConfig(tmp_path / "relay", psk=psk)) as relay,
            running_host(HostConfig(tmp_path / "listener", psk=psk)) as listener,
            running_host(HostConfig(tmp_path / "dialler", psk=psk)) as dialler,
        ):
            relay_info = PeerInfo(relay.get_id(), relay.get_addrs())
            hop, stop = CircuitV2Protocol(relay, allow_hop=True), CircuitV2Protocol(listener)
            async with background_trio_service(hop), background_trio_service(stop), trio.open_nursery() as nursery:
                await listener.connect(relay_info)
                stream = await listener.new_stream(relay.get_id(), [HOP_PROTOCOL_ID])
                reserving = CircuitV2Transport(listener, stop, RelayConfig())
                assert await reserving.reserve(stream, relay.get_id(), nursery)
                await stream.close()
                # the dialler only connects (STOP role: no reservation of its own)
                transport = CircuitV2Transport(dialler, CircuitV2Protocol(dialler), RelayConfig(roles=RelayRole.STOP))
                circuit = M(f"{relay.get_addrs()[0]}/p2p-circuit/p2p/{listener.get_id()}")
                # py-libp2p's own dial adds no pnet on the dialling side: its handshake cannot complete (it fails
                # after ~10 s, "failed to negotiate the secure protocol"; 3 s tell enough here)
                with trio.move_on_after(3.0):
                    try:
                        await transport.dial(circuit)
                    except SwarmException:
                        pass
                    else:
                        pytest.fail("a relayed dial without pnet completed in a private swarm")
                assert not dialler.get_network().get_connections(listener.get_id())
                conn = await dial_relayed(dialler, transport, relay_info, listener.get_id(), psk)
                assert any("/p2p-circuit" in str(addr) for addr in conn.get_transport_addresses())
                assert conn in dialler.get_network().get_connections(listener.get_id())
                nursery.cancel_scope.cancel()  # the reservation's refresher


async def test_a_fresh_dial_opens_a_second_connection_beside_an_open_one_and_closes_alone(tmp_path: Path) -> None:
    """What the dial-back server relies on: `dial_fresh` really dials (a second connection, although one is open and
    `max_connections_per_peer` is 1), fails where nothing listens, and closing it leaves the first connection up;
    `stream_remote_ip` names the IP a stream comes from."""
    seen_ip: list[str | None] = []
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:

            async def handler(stream: INetStream) -> None:
                seen_ip.append(stream_remote_ip(stream))
                await stream.write(b"k")
                await stream.close()

            b.set_stream_handler(TProtocol("/test/ip/1"), handler)
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            (first,) = a.get_network().get_connections(b.get_id())
            fresh = await dial_fresh(a, b.get_transport_addrs()[0], b.get_id())
            both = list(a.get_network().get_connections(b.get_id()))
            await fresh.close()
            left = list(a.get_network().get_connections(b.get_id()))
            stream = await a.new_stream(b.get_id(), [TProtocol("/test/ip/1")])
            assert await stream.read(1) == b"k"
            with pytest.raises(SwarmException):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                await dial_fresh(a, M(f"/ip4/127.0.0.1/tcp/{port}"), b.get_id())
    assert fresh is not first and len(both) == 2 and left == [first]
    assert seen_ip == ["127.0.0.1"]


@pytest.mark.parametrize("psk", [None, bytes(range(32))], ids=["public", "private"])
async def test_dcutr_served_without_its_loop_punches_only_when_asked_and_upgrades_a_relayed_connection(
    tmp_path: Path, psk: bytes | None
) -> None:
    """On loopback every address is reachable, so the punch succeeds (both sides dial the other's listen address
    from their own, as predicted from the address the relay observed): what is checked is
    that relayed and direct connections are told apart on both sides, that the service's self-driving loop is not
    running, and that `punch_direct` returns once a direct connection exists."""
    with trio.fail_after(TIMEOUT_S):
        async with (
            running_host(HostConfig(tmp_path / "relay", psk=psk)) as relay,
            running_host(HostConfig(tmp_path / "listener", psk=psk)) as listener,
            running_host(HostConfig(tmp_path / "dialler", psk=psk)) as dialler,
        ):
            with pytest.raises(LocalProtocolError):
                await punch_direct(listener, dialler.get_id(), 1.0)
            for host in (listener, dialler):
                serve_dcutr(host, 5.0)
                assert DCUTR_PROTOCOL_ID in host.get_mux().get_protocols()
            relay_info = PeerInfo(relay.get_id(), relay.get_addrs())
            hop, stop = CircuitV2Protocol(relay, allow_hop=True), CircuitV2Protocol(listener)
            async with background_trio_service(hop), background_trio_service(stop), trio.open_nursery() as nursery:
                await listener.connect(relay_info)
                stream = await listener.new_stream(relay.get_id(), [HOP_PROTOCOL_ID])
                assert await CircuitV2Transport(listener, stop, RelayConfig()).reserve(stream, relay.get_id(), nursery)
                await stream.close()
                transport = CircuitV2Transport(dialler, CircuitV2Protocol(dialler), RelayConfig(roles=RelayRole.STOP))
                conn = await dial_relayed(dialler, transport, relay_info, listener.get_id(), psk)
                assert is_relayed(conn) and not is_inbound(conn)
                (accepted,) = listener.get_network().get_connections(dialler.get_id())
                assert is_relayed(accepted) and is_inbound(accepted)
                (to_relay,) = listener.get_network().get_connections(relay.get_id())
                assert not is_relayed(to_relay)
                # the service (whose run starts the self-driving loop) never ran: its nursery was never set
                assert all(host._dcutr_protocol._nursery is None for host in (listener, dialler))  # type: ignore[attr-defined]
                assert not has_direct_connection(dialler, listener.get_id())
                assert not has_direct_connection(listener, dialler.get_id())
                assert await punch_direct(listener, dialler.get_id(), 10.0)
                assert has_direct_connection(listener, dialler.get_id())
                nursery.cancel_scope.cancel()  # the reservation's refresher


async def test_pnet_once_on_responder_dials_unwraps_only_an_already_protected_connection(tmp_path: Path) -> None:
    psk = bytes(range(32))
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "k", psk=psk)) as host:
            swarm = host.get_network()
            assert isinstance(swarm, Swarm)
            received: list[object] = []

            async def recorder(raw_conn: object, maddr: multiaddr.Multiaddr) -> object:
                received.append(raw_conn)
                return None

            swarm.upgrade_inbound_raw_conn = recorder  # type: ignore[method-assign,assignment]
            pnet_once_on_responder_dials(host)
            pnet_once_on_responder_dials(host)  # idempotent: wrapped once
            raw, inner = object(), object()
            await swarm.upgrade_inbound_raw_conn(raw, M("/ip4/127.0.0.1/tcp/1"))  # type: ignore[arg-type]
            await swarm.upgrade_inbound_raw_conn(PskConn(inner, psk.hex()), M("/ip4/127.0.0.1/tcp/1"))  # type: ignore[arg-type]
    assert received == [raw, inner]
