"""What a peer advertises, which received addresses it will dial, and the one validator of configured addresses
(`p2p.addrs`): pure functions, no sockets."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest

from p2p.addrs import (
    AddressPolicy,
    HostIps,
    advertised_addrs,
    check_announce_addr,
    check_listen_addr,
    interface_ips,
    parse_peer_addr,
    transport_part,
)
from p2p.discovery import DiscoveryConfig
from p2p.host import HostConfig
from swarmgrad.config import NetworkConfig
from swarmgrad.core.errors import ConfigError

M = multiaddr.Multiaddr
IPS = HostIps(ipv4=("10.0.0.5", "127.0.0.1", "192.168.1.9"), ipv6=("::1", "fd00::5"))


def _texts(addrs: list[multiaddr.Multiaddr]) -> list[str]:
    return [str(addr) for addr in addrs]


def test_an_unspecified_listen_address_is_advertised_as_every_non_loopback_interface_address() -> None:
    got = advertised_addrs([M("/ip4/0.0.0.0/tcp/7400"), M("/ip6/::/tcp/7401")], (), IPS)
    assert _texts(got) == [
        "/ip4/10.0.0.5/tcp/7400",
        "/ip4/192.168.1.9/tcp/7400",
        "/ip6/fd00::5/tcp/7401",
    ]


def test_announce_addresses_replace_everything_else() -> None:
    got = advertised_addrs([M("/ip4/0.0.0.0/tcp/7400")], ("/ip4/203.0.113.7/tcp/9000",), IPS)
    assert _texts(got) == ["/ip4/203.0.113.7/tcp/9000"]


def test_a_loopback_only_host_advertises_loopback_and_never_the_unspecified_address() -> None:
    only_lo = HostIps(ipv4=("127.0.0.1",), ipv6=())
    assert _texts(advertised_addrs([M("/ip4/0.0.0.0/tcp/5")], (), only_lo)) == ["/ip4/127.0.0.1/tcp/5"]
    assert _texts(advertised_addrs([M("/ip4/127.0.0.1/tcp/5")], (), IPS)) == ["/ip4/127.0.0.1/tcp/5"]
    assert advertised_addrs([M("/ip4/0.0.0.0/tcp/5")], (), HostIps((), ())) == []


def test_a_specific_listen_address_is_advertised_as_it_is() -> None:
    got = advertised_addrs([M("/ip4/192.168.1.9/tcp/7400"), M("/ip4/127.0.0.1/tcp/7401")], (), IPS)
    assert _texts(got) == ["/ip4/192.168.1.9/tcp/7400"]


def test_this_machine_has_at_least_loopback_and_reports_no_link_local_address() -> None:
    ips = interface_ips()
    assert "127.0.0.1" in ips.ipv4
    assert not any(ip.lower().startswith("fe80") for ip in ips.ipv6)


@pytest.mark.parametrize(
    ("text", "needs"),
    [
        ("/ip4/0.0.0.0/tcp/7400", "not 0.0.0.0"),
        ("/ip6/::/tcp/7400", "not 0.0.0.0"),
        ("/ip4/10.0.0.5/tcp/0", "real port"),
        ("/ip4/10.0.0.5/tcp/7400/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", "without /p2p/"),
        ("/dns4/example.org/tcp/7400", "TCP multiaddr"),
        ("10.0.0.5:7400", "multiaddr"),
    ],
)
def test_a_bad_announce_address_is_refused_naming_field_and_value(text: str, needs: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_announce_addr("announce_addrs", text)
    message = str(caught.value)
    assert "announce_addrs" in message and text in message and needs in message


def test_a_good_announce_address_passes() -> None:
    check_announce_addr("announce_addrs", "/ip4/203.0.113.7/tcp/9000")
    check_announce_addr("announce_addrs", "/ip6/2001:db8::1/tcp/9000")


def _policy(listen: str = "/ip4/0.0.0.0/tcp/7400") -> AddressPolicy:
    return AddressPolicy(IPS, [M(listen)])


@pytest.mark.parametrize(
    ("addr", "local", "reason"),
    [
        ("/ip4/0.0.0.0/tcp/7400", False, "unspecified"),
        ("/ip4/0.0.0.0/tcp/7999", True, "unspecified"),
        ("/ip6/::/tcp/7400", True, "unspecified"),
        ("/ip4/10.0.0.5/tcp/7400", False, "our own listen"),  # our interface address, our port: ourselves
        ("/ip4/127.0.0.1/tcp/7400", True, "our own listen"),
        ("/ip4/127.0.0.1/tcp/22", False, "loopback address from a peer that is not on this host"),
        ("/ip6/::1/tcp/22", False, "loopback address from a peer that is not on this host"),
    ],
)
def test_undialable_received_addresses_are_dropped_with_the_reason(addr: str, local: bool, reason: str) -> None:
    got = _policy().dialable(M(addr), local)
    assert got is not None and reason in got


@pytest.mark.parametrize(
    ("addr", "local"),
    [
        ("/ip4/10.0.0.7/tcp/7400", False),  # another host on our port
        ("/ip4/10.0.0.5/tcp/7401", False),  # another process on our host
        ("/ip4/127.0.0.1/tcp/7401", True),  # a peer on this host, over loopback
        ("/dns4/peer.example/tcp/7400", False),
    ],
)
def test_dialable_received_addresses_pass(addr: str, local: bool) -> None:
    assert _policy().dialable(M(addr), local) is None


def test_a_loopback_only_host_dials_loopback_from_anyone_but_not_itself() -> None:
    policy = _policy("/ip4/127.0.0.1/tcp/5000")
    assert policy.loopback_only()
    assert policy.dialable(M("/ip4/127.0.0.1/tcp/5001"), peer_is_local=False) is None
    assert policy.dialable(M("/ip4/127.0.0.1/tcp/5000"), peer_is_local=False) is not None
    # bound to loopback only: our interface address on the same port is another process, not us
    assert policy.dialable(M("/ip4/10.0.0.5/tcp/5000"), peer_is_local=False) is None


def test_trusted_bootstrap_addresses_pass_as_given() -> None:
    policy = _policy()
    boot = "/ip4/127.0.0.1/tcp/22/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
    assert policy.dialable(M("/ip4/127.0.0.1/tcp/22"), peer_is_local=False) is not None
    policy.trust([boot])
    assert policy.dialable(M("/ip4/127.0.0.1/tcp/22"), peer_is_local=False) is None
    assert transport_part(M(boot)) == "/ip4/127.0.0.1/tcp/22"


def test_a_connection_from_loopback_or_our_own_address_is_local() -> None:
    policy = _policy()
    assert policy.is_local_ip("127.0.0.1") and policy.is_local_ip("::1") and policy.is_local_ip("10.0.0.5")
    assert not policy.is_local_ip("10.0.0.7") and not policy.is_local_ip("not an ip")


PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
BAD_LISTEN = ["not a multiaddr", "/dns4/example.org/tcp/7400", f"/ip4/10.0.0.5/tcp/7400/p2p/{PEER}", "/ip4/10.0.0.5"]
BAD_PEER = [
    "not a multiaddr",
    "/ip4/10.0.0.5/tcp/7400",
    f"/ip4/0.0.0.0/tcp/7400/p2p/{PEER}",
    f"/ip4/10.0.0.5/p2p/{PEER}",
]


@pytest.mark.parametrize("text", BAD_LISTEN)
def test_every_listen_address_check_is_the_one_validator(text: str) -> None:
    with pytest.raises(ConfigError, match="multiaddr") as direct:
        check_listen_addr("listen", text)
    for build in (lambda: HostConfig(Path("k"), listen_addrs=(text,)), lambda: NetworkConfig(listen=(text,))):
        with pytest.raises(ConfigError) as caught:
            build()
        assert caught.value.expected == direct.value.expected


@pytest.mark.parametrize("text", BAD_PEER)
def test_every_peer_address_check_is_the_one_validator(text: str) -> None:
    with pytest.raises(ConfigError) as direct:
        parse_peer_addr("bootstrap", text)
    for build in (lambda: DiscoveryConfig("s", bootstrap_addrs=(text,)), lambda: NetworkConfig(bootstrap=(text,))):
        with pytest.raises(ConfigError) as caught:
            build()
        assert caught.value.expected == direct.value.expected


@pytest.mark.parametrize(
    "text", [f"/ip4/10.0.0.5/tcp/7400/p2p/{PEER}", f"/dns4/swarmgrad-0.swarmgrad/tcp/7400/p2p/{PEER}"]
)
def test_a_good_peer_address_parses(text: str) -> None:
    assert parse_peer_addr("bootstrap", text).peer_id.to_base58() == PEER
