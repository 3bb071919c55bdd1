"""Several "hosts" on one Linux machine, made of network namespaces, for tests of what users run across hosts.

`bridged_hosts(count)` creates one namespace holding a bridge and `count` host namespaces, each joined to the bridge
by a veth pair and given the address 198.18.0.<i+1>/24 (198.18.0.0/15 is reserved for network benchmarks, so it
cannot clash with a real network), loopback up.

`nat_hosts(public_count, private_counts)` builds the same public bridge with `public_count` public hosts, and beside
them one NAT router per entry of `private_counts`: router r is a namespace with one leg (`wan`) on the public bridge,
at 198.18.0.<201+r>, and one (`lan`, a bridge of its own) on a private LAN 198.19.<r+1>.0/24 at 198.19.<r+1>.1,
where `private_counts[r]` private hosts sit at 198.19.<r+1>.<i+2> with a default route through it. The router
forwards, masquerades what leaves through `wan` (`iptables -t nat -A POSTROUTING -o wan -j MASQUERADE`) and, like a
home router's stateful firewall, lets in from `wan` only packets of connections a private host opened (conntrack
ESTABLISHED/RELATED). Everything else arriving on `wan` is dropped silently, as most home routers do; with
`drop_unsolicited=False` a connection attempt to the router's own public address is answered by its TCP stack with a
reset instead (a "rejecting" NAT, which cuts TCP hole punching short). Public hosts have no route to any private LAN,
and routers no default route: the private LANs reach one another only through the public bridge, at the routers'
public addresses, like two homes on the internet. Linux's MASQUERADE keeps a connection's source port when it is
free, so by default this NAT is port-preserving with address-and-port-dependent filtering; with `random_ports=True`
each connection gets a random source port (`MASQUERADE --random-fully`): a symmetric NAT.

Every name carries this process's id and a count, so two runs (or two topologies of one run) never collide;
everything is deleted on exit, also when the body raises (deleting a namespace deletes its veth ends and its iptables
rules). Commands run inside a host with `host.wrap(argv)` (`ip netns exec <name> ...`). It needs root and iproute2,
and iptables for `nat_hosts`: `unavailable_reason(nat=...)` says why it cannot run here (for a pytest skip), or None.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24
MAX_PUBLIC_HOSTS = 200
"""Public hosts take 198.18.0.1-200; routers' public addresses start at 198.18.0.201."""
MAX_ROUTERS = 50
MAX_PRIVATE_HOSTS_PER_ROUTER = 200
_COMMAND_TIMEOUT_S = 30


@dataclass(frozen=True)
class NetnsHost:
    name: str
    ip: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> str:
        """Run a command inside this host; its stdout. Raises `subprocess.CalledProcessError` on failure."""
        return subprocess.run(
            self.wrap(argv), check=True, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S
        ).stdout


@dataclass(frozen=True)
class NatRouter:
    """One NAT router and the private LAN behind it."""

    host: NetnsHost
    """The router's own namespace; `host.ip` is its public address, the one its private hosts are seen from."""
    lan_ip: str
    """The router's address on its LAN: its private hosts' default gateway."""
    lan_subnet: str
    """The LAN, e.g. 198.19.1.0/24."""
    private: tuple[NetnsHost, ...]
    """The hosts behind it."""


@dataclass(frozen=True)
class NatTopology:
    public: tuple[NetnsHost, ...]
    routers: tuple[NatRouter, ...]


def unavailable_reason(nat: bool = False) -> str | None:
    """Why namespaces (with `nat`: also NAT routers) cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    if nat and shutil.which("iptables") is None:
        return "NAT routers need iptables (`apt-get install iptables`)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)


def _in(namespace: str, *argv: str) -> None:
    _ip("netns", "exec", namespace, *argv)


def _add_namespace(name: str, created: list[str]) -> None:
    _ip("netns", "add", name)
    created.append(name)
    _ip("-n", name, "link", "set", "lo", "up")


def _add_bridge(namespace: str, bridge: str) -> None:
    _ip("-n", namespace, "link", "add", bridge, "type", "bridge")
    _ip("-n", namespace, "link", "set", bridge, "up")


def _plug(namespace: str, interface: str, bridge_ns: str, bridge: str, port: str, address: str) -> None:
    """Join `namespace` to `bridge` (in `bridge_ns`) by a veth pair: `interface` in the namespace, holding `address`
    (with its prefix length), and `port` on the bridge. The pair is made inside `namespace` and one end moved, so the
    machine's own namespace never holds either end (no clash with its interface names)."""
    _ip("-n", namespace, "link", "add", interface, "type", "veth", "peer", "name", port)
    if bridge_ns != namespace:
        _ip("-n", namespace, "link", "set", port, "netns", bridge_ns)
    _ip("-n", bridge_ns, "link", "set", port, "master", bridge, "up")
    _ip("-n", namespace, "addr", "add", address, "dev", interface)
    _ip("-n", namespace, "link", "set", interface, "up")


def _delete(created: list[str]) -> None:
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=_COMMAND_TIMEOUT_S)


_topologies = itertools.count()


def _tag() -> str:
    """A prefix for one topology's names: this process's id and a count, so that neither two runs nor two topologies
    of one run collide."""
    return f"sg{os.getpid() % 100000}t{next(_topologies)}"


@contextmanager
def bridged_hosts(count: int) -> Iterator[list[NetnsHost]]:
    """`count` hosts (1 to 200) on one bridge; see the module docstring."""
    if not 1 <= count <= MAX_PUBLIC_HOSTS:
        raise ValueError(f"count must be 1 to {MAX_PUBLIC_HOSTS}, got {count}")
    tag = _tag()
    created: list[str] = []
    try:
        yield _bridge_with_hosts(f"{tag}br", f"{tag}h", count, created)
    finally:
        _delete(created)


def _bridge_with_hosts(bridge_ns: str, host_prefix: str, count: int, created: list[str]) -> list[NetnsHost]:
    """A namespace `bridge_ns` holding bridge br0, and `count` host namespaces on it at 198.18.0.1, .2, ..."""
    _add_namespace(bridge_ns, created)
    _add_bridge(bridge_ns, "br0")
    hosts = []
    for index in range(count):
        host = NetnsHost(f"{host_prefix}{index}", f"{SUBNET_PREFIX}{index + 1}")
        _add_namespace(host.name, created)
        _plug(host.name, "eth0", bridge_ns, "br0", f"v{index}", f"{host.ip}/{PREFIX_LEN}")
        hosts.append(host)
    return hosts


def _make_router(
    tag: str, index: int, bridge_ns: str, private_count: int, nat: tuple[bool, bool], created: list[str]
) -> NatRouter:
    drop_unsolicited, random_ports = nat
    lan_prefix = f"198.19.{index + 1}."
    router = NetnsHost(f"{tag}r{index}", f"{SUBNET_PREFIX}{MAX_PUBLIC_HOSTS + 1 + index}")
    _add_namespace(router.name, created)
    _plug(router.name, "wan", bridge_ns, "br0", f"w{index}", f"{router.ip}/{PREFIX_LEN}")
    _add_bridge(router.name, "lan")
    _ip("-n", router.name, "addr", "add", f"{lan_prefix}1/24", "dev", "lan")
    _in(router.name, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    masquerade = ["-j", "MASQUERADE", *(["--random-fully"] if random_ports else [])]
    _in(router.name, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
    established = ["-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
    chains = ("FORWARD", "INPUT") if drop_unsolicited else ("FORWARD",)
    for chain in chains:
        _in(router.name, "iptables", "-A", chain, *established)
        _in(router.name, "iptables", "-A", chain, "-i", "wan", "-j", "DROP")
    private = []
    for host_index in range(private_count):
        host = NetnsHost(f"{tag}r{index}h{host_index}", f"{lan_prefix}{host_index + 2}")
        _add_namespace(host.name, created)
        _plug(host.name, "eth0", router.name, "lan", f"p{host_index}", f"{host.ip}/24")
        _ip("-n", host.name, "route", "add", "default", "via", f"{lan_prefix}1")
        private.append(host)
    return NatRouter(router, f"{lan_prefix}1", f"{lan_prefix}0/24", tuple(private))


@contextmanager
def nat_hosts(
    public_count: int, private_counts: Sequence[int], drop_unsolicited: bool = True, random_ports: bool = False
) -> Iterator[NatTopology]:
    """`public_count` public hosts (1 to 200) and one NAT router per entry of `private_counts` (1 to 50 routers, 1 to
    200 private hosts each); see the module docstring."""
    if not 1 <= public_count <= MAX_PUBLIC_HOSTS:
        raise ValueError(f"public_count must be 1 to {MAX_PUBLIC_HOSTS}, got {public_count}")
    if not 1 <= len(private_counts) <= MAX_ROUTERS or not all(
        isinstance(n, int) and 1 <= n <= MAX_PRIVATE_HOSTS_PER_ROUTER for n in private_counts
    ):
        raise ValueError(
            f"private_counts must be 1 to {MAX_ROUTERS} counts of 1 to {MAX_PRIVATE_HOSTS_PER_ROUTER}, "
            f"got {private_counts!r}"
        )
    tag = _tag()
    bridge_ns = f"{tag}pub"
    created: list[str] = []
    try:
        public = _bridge_with_hosts(bridge_ns, f"{tag}g", public_count, created)
        routers = tuple(
            _make_router(tag, index, bridge_ns, count, (drop_unsolicited, random_ports), created)
            for index, count in enumerate(private_counts)
        )
        yield NatTopology(tuple(public), routers)
    finally:
        _delete(created)
