"""The NAT topology of `testing.netns.nat_hosts` behaves like hosts behind home routers on the internet, checked with
plain TCP sockets (no swarmgrad, no libp2p) so that the NAT tests built on it can trust it:

* a private host reaches a public one, which sees the connection come from the ROUTER's public address, with the
  private host's source port kept (a port-preserving NAT);
* a public host cannot open a connection to a private host: not at its private address (no route), not even with a
  route to the private LAN through the router (the router drops unsolicited inbound packets), and not at the
  router's public address (nothing is forwarded);
* two private hosts behind different routers cannot reach each other directly, at either address;
* a router built with `drop_unsolicited=False` answers a connection to its public address with a reset instead;
* a router built with `random_ports=True` (a symmetric NAT) does not keep the private host's source port.

Each listener in these tests also accepts a control connection that must succeed, so "no connection" means the
network refused it, not that nothing was listening. Needs root, iproute2 and iptables; skipped otherwise, except
under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from testing.netns import NatTopology, NetnsHost, nat_hosts, unavailable_reason

PORT = 7101
SOURCE_PORT = 40123
REFUSED_WAIT_S = 1.5
"""How long a connection attempt that a router drops silently is given before it counts as failed."""

_SERVER = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen(8)
s.settimeout(60)
print("ready", flush=True)
for _ in range(8):
    conn, (ip, port) = s.accept()
    print("peer", ip, port, flush=True)
    conn.close()
"""

_CLIENT = """
import errno, socket, sys
ip, port, source_port, timeout_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.settimeout(timeout_s)
if source_port:
    s.bind(("0.0.0.0", source_port))
try:
    s.connect((ip, port))
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno or 0, str(exc)))
else:
    print("connected")
"""


def _require_nat() -> None:
    reason = unavailable_reason(nat=True)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"NAT topology tests must run in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def topology() -> Iterator[NatTopology]:
    _require_nat()
    with nat_hosts(1, (1, 1)) as built:
        yield built


class Server:
    """A TCP listener on 0.0.0.0:PORT in one host, noting the peer address of each connection it accepts."""

    def __init__(self, host: NetnsHost) -> None:
        self.proc = subprocess.Popen(host.wrap([sys.executable, "-c", _SERVER]), stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def peers(self, expected: int) -> list[tuple[str, int]]:
        """The (ip, port) of each connection it accepted, once it has reported `expected` of them (a client's
        "connected" can come before the server's accept), then stop it; any extra one it reported is listed too."""
        assert self.proc.stdout is not None
        lines = [self.proc.stdout.readline() for _ in range(expected)]  # bounded: the server's accept times out
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=10)
        lines += out.splitlines()
        return [(words[1], int(words[2])) for line in lines if (words := line.split()) and words[0] == "peer"]


@pytest.fixture
def server() -> Iterator[type[Server]]:
    started: list[Server] = []

    class Tracked(Server):
        def __init__(self, host: NetnsHost) -> None:
            super().__init__(host)
            started.append(self)

    try:
        yield Tracked
    finally:
        for each in started:
            if each.proc.poll() is None:
                each.proc.kill()
                each.proc.wait(timeout=10)


def connect(host: NetnsHost, ip: str, source_port: int = 0, timeout_s: float = 5.0) -> str:
    """From inside `host`, open a TCP connection to ip:PORT: "connected", "timeout" or the errno's name."""
    return host.run(sys.executable, "-c", _CLIENT, ip, str(PORT), str(source_port), str(timeout_s)).strip()


def test_a_private_host_reaches_a_public_one_seen_from_its_routers_public_address(
    topology: NatTopology, server: type[Server]
) -> None:
    public, router = topology.public[0], topology.routers[0]
    private = router.private[0]
    listener = server(public)
    assert connect(private, public.ip, source_port=SOURCE_PORT) == "connected"
    assert listener.peers(1) == [(router.host.ip, SOURCE_PORT)]
    assert router.host.ip != private.ip and router.host.ip.startswith("198.18.0.")


def test_a_public_host_cannot_open_a_connection_to_a_private_host(topology: NatTopology, server: type[Server]) -> None:
    public, router = topology.public[0], topology.routers[0]
    private = router.private[0]
    listener = server(private)
    assert connect(public, private.ip) == "ENETUNREACH"  # no route to a private LAN from the public side
    # even a public host that routes the LAN through the router (its ISP could) gets no answer: dropped
    public.run("ip", "route", "add", router.lan_subnet, "via", router.host.ip)
    try:
        assert connect(public, private.ip, timeout_s=REFUSED_WAIT_S) == "timeout"
    finally:
        public.run("ip", "route", "del", router.lan_subnet, "via", router.host.ip)
    assert connect(public, router.host.ip, timeout_s=REFUSED_WAIT_S) == "timeout"  # no port forwarded: dropped
    assert connect(private, private.ip) == "connected"  # control: the listener was there all along
    assert [ip for ip, _port in listener.peers(1)] == [private.ip]


def test_private_hosts_behind_different_routers_cannot_reach_each_other_directly(
    topology: NatTopology, server: type[Server]
) -> None:
    router_a, router_b = topology.routers
    a, b = router_a.private[0], router_b.private[0]
    listener = server(b)
    assert connect(a, b.ip) == "ENETUNREACH"  # a's router has no route to b's LAN
    assert connect(a, router_b.host.ip, timeout_s=REFUSED_WAIT_S) == "timeout"  # b's router forwards no port
    assert connect(b, b.ip) == "connected"  # control
    assert [ip for ip, _port in listener.peers(1)] == [b.ip]


def test_a_rejecting_router_answers_a_connection_to_its_public_address_with_a_reset(server: type[Server]) -> None:
    _require_nat()
    with nat_hosts(1, (1,), drop_unsolicited=False) as rejecting:
        public, router = rejecting.public[0], rejecting.routers[0]
        private = router.private[0]
        listener = server(private)
        assert connect(public, router.host.ip) == "ECONNREFUSED"
        assert connect(private, public.ip) == "ECONNREFUSED"  # outbound works: the public host has no listener
        assert [ip for ip, _port in listener.peers(0)] == []


def test_a_symmetric_router_does_not_keep_the_source_port(server: type[Server]) -> None:
    _require_nat()
    with nat_hosts(1, (1,), random_ports=True) as symmetric:
        public, router = symmetric.public[0], symmetric.routers[0]
        listener = server(public)
        for source_port in (SOURCE_PORT, SOURCE_PORT + 1):
            assert connect(router.private[0], public.ip, source_port=source_port) == "connected"
        seen = listener.peers(2)
    assert [ip for ip, _port in seen] == [router.host.ip, router.host.ip]
    # a random port equals the source port with probability ~1/64k per connection: both kept would be ~1/4e9
    assert [port for _ip, port in seen] != [SOURCE_PORT, SOURCE_PORT + 1]
