"""Several "hosts" on one Linux machine: network namespaces on one bridge, for tests of what users run across hosts.

`bridged_hosts(count)` creates one namespace holding a bridge and `count` host namespaces, each joined to the bridge
by a veth pair and given the address 198.18.0.<i+1>/24 (198.18.0.0/15 is reserved for network benchmarks, so it
cannot clash with a real network), loopback up. Every name carries this process's id, so two runs never collide;
everything is deleted on exit, also when the body raises (deleting a namespace deletes its veth ends). Commands run
inside a host with `host.wrap(argv)` (`ip netns exec <name> ...`).

It needs root and iproute2. `unavailable_reason()` says why it cannot run here (for a pytest skip), or None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

SUBNET_PREFIX = "198.18.0."
PREFIX_LEN = 24


@dataclass(frozen=True)
class NetnsHost:
    name: str
    ip: str

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str) -> str:
        """Run a command inside this host; its stdout. Raises `subprocess.CalledProcessError` on failure."""
        return subprocess.run(self.wrap(argv), check=True, capture_output=True, text=True, timeout=30).stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (`ip`)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def bridged_hosts(count: int) -> Iterator[list[NetnsHost]]:
    """`count` hosts (1 to 200) on one bridge; see the module docstring."""
    if not 1 <= count <= 200:
        raise ValueError(f"count must be 1 to 200, got {count}")
    tag = f"sg{os.getpid() % 100000}"
    bridge_ns = f"{tag}br"
    created: list[str] = []
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        hosts = []
        for index in range(count):
            name = f"{tag}h{index}"
            _ip("netns", "add", name)
            created.append(name)
            ip = f"{SUBNET_PREFIX}{index + 1}"
            # the veth pair is made inside the host namespace and one end moved to the bridge namespace, so the
            # machine's own namespace never holds either end (no clash with its interface names)
            _ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{index}")
            _ip("-n", name, "link", "set", f"v{index}", "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", f"v{index}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            hosts.append(NetnsHost(name, ip))
        yield hosts
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
