"""The swarmgrad libp2p host: validated config, Noise-only security, bind errors that name the address."""

from __future__ import annotations

import socket
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

from p2p.host import HostConfig, HostError, listen_multiaddrs, running_host
from p2p.identity import load_or_create_identity, peer_id_of
from swarmgrad.core.errors import ConfigError

TIMEOUT_S = 30


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("listen_addrs", ()),
        ("listen_addrs", ["/ip4/127.0.0.1/tcp/0"]),
        ("listen_addrs", ("not a multiaddr",)),
        ("listen_addrs", ("/ip4/127.0.0.1/udp/0/quic-v1",)),
        ("listen_addrs", ("/ip4/127.0.0.1/tcp/0/p2p/12D3KooWReUsT8GXhqioAyck8EXRjh6SeeVA79KNbeE4qNWgjxRU",)),
        ("listen_addrs", ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/0")),
        ("psk", b"short"),
        ("psk", "ab" * 32),
        ("max_message_bytes", 0),
        ("max_in_flight_bytes_per_peer", 10),
        ("connect_timeout_s", 0),
        ("connect_timeout_s", float("inf")),
        ("handshake_timeout_s", 0),
        ("handshake_timeout_s", float("nan")),
        ("stream_open_timeout_s", -1.0),
        ("max_connections", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        HostConfig(key_path=tmp_path / "k", **{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_config_key_path_must_be_a_path() -> None:
    with pytest.raises(ConfigError, match="key_path"):
        HostConfig(key_path="peer.key")  # type: ignore[arg-type]


async def test_listen_addresses_carry_the_real_port_and_the_persistent_peer_id(tmp_path: Path) -> None:
    key_path = tmp_path / "peer.key"
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(key_path)) as host:
            (addr,) = listen_multiaddrs(host)
            first_port = addr.split("/")[4]
    assert addr.endswith(f"/p2p/{peer_id_of(load_or_create_identity(key_path))}")
    assert addr.startswith("/ip4/127.0.0.1/tcp/") and first_port != "0"
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(key_path)) as host:
            assert str(host.get_id()) == addr.rsplit("/", 1)[1], "same peer id after a restart"


async def test_a_port_in_use_is_refused_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"/ip4/127.0.0.1/tcp/{taken.getsockname()[1]}"
        with trio.fail_after(TIMEOUT_S), pytest.raises(HostError, match=f"{addr}: the port is in use"):
            async with running_host(HostConfig(tmp_path / "k", listen_addrs=(addr,))):
                raise AssertionError("must not start")


async def test_a_port_held_by_another_host_is_refused(tmp_path: Path) -> None:
    """py-libp2p binds with SO_REUSEPORT; a second host on the same port would silently share it."""
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as first:
            port = listen_multiaddrs(first)[0].split("/")[4]
            addr = f"/ip4/127.0.0.1/tcp/{port}"
            with pytest.raises(HostError, match=addr):
                async with running_host(HostConfig(tmp_path / "b", listen_addrs=(addr,))):
                    raise AssertionError("must not start")


async def test_an_address_not_on_this_machine_is_refused(tmp_path: Path) -> None:
    addr = "/ip4/192.0.2.1/tcp/4001"  # TEST-NET-1: never assigned to a local interface
    with trio.fail_after(TIMEOUT_S), pytest.raises(HostError, match=addr):
        async with running_host(HostConfig(tmp_path / "k", listen_addrs=(addr,))):
            raise AssertionError("must not start")


async def test_a_noise_dialer_connects(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a")) as a, running_host(HostConfig(tmp_path / "b")) as b:
            await b.connect(info_from_p2p_addr(multiaddr.Multiaddr(listen_multiaddrs(a)[0])))
            assert [str(p) for p in b.get_connected_peers()] == [str(a.get_id())]


async def test_a_plaintext_dialer_is_refused(tmp_path: Path) -> None:
    """A dialer that offers only /plaintext/2.0.0 (which would let it claim any public key) cannot connect."""
    key_pair = create_new_key_pair()
    plaintext_host = new_host(
        key_pair=key_pair,
        sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
        listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
    )
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "a", connect_timeout_s=5)) as victim:
            async with plaintext_host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    with pytest.raises(SwarmException, match="unable to connect"):
                        await plaintext_host.connect(
                            info_from_p2p_addr(multiaddr.Multiaddr(listen_multiaddrs(victim)[0]))
                        )
                    assert victim.get_connected_peers() == []
                    assert plaintext_host.get_connected_peers() == []
                finally:
                    await plaintext_host.close()
