"""Which addresses a peer advertises, and which received addresses it is willing to dial.

A host listening on the unspecified address (`/ip4/0.0.0.0/tcp/7400`) accepts connections on every interface, but
`0.0.0.0` is not an address anyone can dial: a peer that dials it reaches *its own* listener on that port. So:

* **Advertising** (`advertised_addrs`): the announced addresses when the user gave `--announce`; otherwise each
  listen address, with an unspecified IP expanded into this host's interface addresses of that family. Loopback
  addresses are advertised only when the host has nothing else (a loopback-only test host). The unspecified
  addresses themselves are never advertised. Every advertisement goes through this one function: identify, DHT
  provider records and peer routing all read the host's advertised addresses, and so do member records.
* **Receiving** (`AddressPolicy.dialable`): an address learned from the network (identify, DHT, member records) is
  kept only if it can be dialled from here: never an unspecified address, never one of our own listen addresses
  (dialling it would reach ourselves), and a loopback address only from a peer on this host (one whose connection
  comes from loopback or from one of our interface addresses), or when this host itself listens only on loopback
  (then every peer it can meet is local). So a misconfigured or hostile peer cannot make us dial ourselves or a
  service bound to our loopback interface. Addresses the user typed (`--bootstrap`) are trusted as given.

`interface_ips()` reads the host's addresses without external tools: IPv4 through the `SIOCGIFADDR` ioctl (the
primary address of each interface), IPv6 from `/proc/net/if_inet6` (link-local addresses are skipped: they need a
zone to be dialled).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import multiaddr
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from swarmgrad.core.errors import ConfigError

_SIOCGIFADDR = 0x8915
"""Linux ioctl: the primary IPv4 address of an interface."""
_IF_INET6 = Path("/proc/net/if_inet6")


@dataclass(frozen=True)
class HostIps:
    """This host's interface addresses, as strings, loopback included."""

    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]

    def all(self) -> frozenset[str]:
        return frozenset(self.ipv4) | frozenset(self.ipv6)


def interface_ips() -> HostIps:
    """The addresses of this host's interfaces that are up and have one (see the module docstring)."""
    ipv4: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:  # the interface has no IPv4 address (or is down)
                continue
            ipv4.append(socket.inet_ntoa(reply[20:24]))
    ipv6: list[str] = []
    try:
        lines = _IF_INET6.read_text(encoding="ascii").splitlines()
    except OSError:  # no IPv6 on this kernel
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if not address.is_link_local:
            ipv6.append(str(address))
    return HostIps(tuple(sorted(set(ipv4))), tuple(sorted(set(ipv6))))


def ip_of(addr: multiaddr.Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address of `addr`, or None when it has no /ip4 or /ip6 part (e.g. /dns4)."""
    for protocol in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(addr.value_for_protocol(protocol))
        except (multiaddr.exceptions.ProtocolLookupError, ValueError):
            continue
    return None


def tcp_port_of(addr: multiaddr.Multiaddr) -> int | None:
    try:
        return int(addr.value_for_protocol("tcp"))
    except (multiaddr.exceptions.ProtocolLookupError, ValueError):
        return None


def transport_part(addr: multiaddr.Multiaddr) -> str:
    """`addr` without its trailing `/p2p/<peer id>`, as text."""
    text = str(addr)
    head, sep, _ = text.rpartition("/p2p/")
    return head if sep else text


# ---- the one validator of the multiaddrs a user or a peer gives us ------------------------------------------------


def parse_multiaddr(field: str, text: str) -> multiaddr.Multiaddr:
    """`text` as a multiaddr; `ConfigError` naming `field` when it is not one."""
    try:
        return multiaddr.Multiaddr(text)
    except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error) as exc:
        raise ConfigError(field, text, f"a multiaddr ({exc})") from exc


def check_listen_addr(field: str, text: str) -> multiaddr.Multiaddr:
    """`text` as a TCP multiaddr to listen on, /ip4|ip6/<address>/tcp/<port> (port 0: any free port), else
    `ConfigError` naming `field`."""
    parsed = parse_multiaddr(field, text)
    names = [protocol.name for protocol in parsed.protocols()]
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        raise ConfigError(field, text, "a TCP multiaddr /ip4/<address>/tcp/<port> (or /ip6/...) without /p2p/")
    return parsed


def parse_peer_addr(field: str, text: str) -> PeerInfo:
    """`text`, a peer's multiaddr to dial (`/ip4|ip6|dns4|dns6|dns/<host>/tcp/<port>/p2p/<peer id>`), as a
    `PeerInfo`; `ConfigError` naming `field` when it is malformed, lacks the TCP port or the peer id, or names the
    unspecified address."""
    parsed = parse_multiaddr(field, text)
    names = [protocol.name for protocol in parsed.protocols()]
    if "tcp" not in names or names[-1] != "p2p":
        raise ConfigError(field, text, "a multiaddr ending in /tcp/<port>/p2p/<peer id>")
    try:
        info = info_from_p2p_addr(parsed)
    except (ValueError, TypeError, KeyError, multiaddr.exceptions.Error) as exc:
        raise ConfigError(field, text, f"a multiaddr ending in /p2p/<peer id> ({exc})") from exc
    ip = ip_of(parsed)
    if ip is not None and ip.is_unspecified:
        raise ConfigError(
            field,
            text,
            "the peer host's own IP (0.0.0.0 is where it listens, not an address to dial; "
            "`swarmgrad id` on that host prints its dialable addresses)",
        )
    return info


def check_announce_addr(field: str, text: str) -> None:
    """Raise `ConfigError` unless `text` is a dialable /ip4|ip6/<address>/tcp/<port> with a port > 0."""
    parsed = check_listen_addr(field, text)
    ip = ip_of(parsed)
    if ip is None or ip.is_unspecified:
        raise ConfigError(field, text, "an address other hosts can dial (not 0.0.0.0 or ::): this host's IP")
    if tcp_port_of(parsed) == 0:
        raise ConfigError(field, text, "the real port (not 0)")


def advertised_addrs(
    listening: Sequence[multiaddr.Multiaddr], announce: Sequence[str], ips: HostIps
) -> list[multiaddr.Multiaddr]:
    """What this host advertises, given its bound listen addresses (real ports), the user's announce addresses and
    its interface addresses. Sorted, without duplicates, never an unspecified address."""
    if announce:
        return sorted({multiaddr.Multiaddr(text) for text in announce}, key=str)
    expanded: set[multiaddr.Multiaddr] = set()
    for addr in listening:
        ip = ip_of(addr)
        port = tcp_port_of(addr)
        if ip is None or port is None:
            continue
        if not ip.is_unspecified:
            expanded.add(addr)
            continue
        family, own = ("ip4", ips.ipv4) if ip.version == 4 else ("ip6", ips.ipv6)
        expanded.update(multiaddr.Multiaddr(f"/{family}/{host_ip}/tcp/{port}") for host_ip in own)
    reachable = {addr for addr in expanded if not _is_loopback(addr)}
    return sorted(reachable or expanded, key=str)


def _is_loopback(addr: multiaddr.Multiaddr) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_loopback


class AddressPolicy:
    """Decides which received addresses may reach the dialer (see the module docstring). Pure: the caller says
    whether the peer is local, and keeps `listening` current."""

    def __init__(self, ips: HostIps, listening: Iterable[multiaddr.Multiaddr]) -> None:
        self._own_ips = ips.all()
        self._listening = list(listening)
        self._trusted: set[str] = set()

    def trust(self, addrs: Iterable[str]) -> None:
        """Let `addrs` (the user's own `--bootstrap` addresses) through as given."""
        self._trusted.update(transport_part(multiaddr.Multiaddr(text)) for text in addrs)

    def is_local_ip(self, ip: str) -> bool:
        """Whether a connection from `ip` comes from this host."""
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return parsed.is_loopback or str(parsed) in self._own_ips

    def loopback_only(self) -> bool:
        """Whether every listen address is a loopback one."""
        return bool(self._listening) and all(_is_loopback(addr) for addr in self._listening)

    def dialable(self, addr: multiaddr.Multiaddr, peer_is_local: bool) -> str | None:
        """None when `addr` may be dialled; otherwise why not."""
        if transport_part(addr) in self._trusted:
            return None
        ip = ip_of(addr)
        if ip is None:
            return None  # a /dns or relayed address: nothing of ours to protect here
        if ip.is_unspecified:
            return "an unspecified address (it would reach our own listener)"
        port = tcp_port_of(addr)
        if (ip.is_loopback or str(ip) in self._own_ips) and any(
            tcp_port_of(own) == port and _same_host_ip(own, ip) for own in self._listening
        ):
            return "one of our own listen addresses"
        if ip.is_loopback and not (peer_is_local or self.loopback_only()):
            return "a loopback address from a peer that is not on this host"
        return None


def _same_host_ip(own: multiaddr.Multiaddr, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a connection to `ip` would reach our listener `own` (bound to `ip`, or to every address)."""
    own_ip = ip_of(own)
    return own_ip is not None and own_ip.version == ip.version and (own_ip.is_unspecified or own_ip == ip)
