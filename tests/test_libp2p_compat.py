"""Each py-libp2p internal that `p2p.libp2p_compat` and `p2p.host` rely on, checked against the installed version
with real hosts on this machine: what a host listening on 0.0.0.0 advertises (identify message, signed peer
record) and that the received-address filter sits in front of the dialer."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.network.exceptions import SwarmException
from libp2p.peer.envelope import consume_envelope
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError, env_to_send_in_RPC

from p2p.addrs import ip_of
from p2p.host import HostConfig, HostError, listen_multiaddrs, running_host

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
