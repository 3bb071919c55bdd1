"""One process of a NAT traversal run (`tests/test_hole_punch_netns.py`, `benchmarks/nat.py`): a circuit relay, or a
swarmgrad node behind NAT driven by line commands, each run inside a `testing.netns` namespace.

    python -m testing.nat_peer relay --listen /ip4/198.18.0.1/tcp/7400 --key DIR/relay.key
    python -m testing.nat_peer node --listen /ip4/198.19.1.2/tcp/7400 --key DIR/a.key --relay /ip4/.../p2p/<relay>

The relay is a py-libp2p host (`p2p.host.running_host`) running `CircuitV2Protocol(allow_hop=True)`. With
`--swarm-key-hex` every host is a member of that private swarm (pnet on every connection, relayed ones
included). A node is a
`p2p.node.SwarmNode` (first peer of its own swarm: no bootstrap) with identify's observed addresses on, whose host
also answers circuits (`CircuitV2Protocol`, STOP role), connects to the relay and reserves a slot on it, and serves a
small echo protocol. Both print one JSON line `{"ready": ..., "peer_id": ..., "addr": ...}` once up; a node then
reads one command per line from stdin and answers each with one JSON line on stdout:

* `dial <peer id>`: a relayed connection to that peer through the relay (`p2p.libp2p_compat.dial_relayed`);
* `wait_direct <peer id> <timeout_s>`: wait until this node holds a direct connection to the peer (woken by the
  host's connection events), answering `{"direct": bool, "elapsed_s": ...}`;
* `conns <peer id>`: the connections held to the peer, their transport addresses and whether relayed;
* `echo <peer id> <count> [bytes]`: `count` round trips of a new stream and `bytes` (default 32) each way; their
  median and all times;
* `wait_punch <timeout_s>`: wait for the node's next hole-punch outcome that ends its attempts (a success, or a
  failure after which it stays relayed), answering `{"punch": "succeeded" | "failed" | null, ...}`;
* `wait_relay_closed <peer id> <timeout_s>`: wait until no relayed connection to the peer is left;
* `stats`: `SwarmNode.statistics()`.

stdin closing (or `quit`) ends the process. Logs go to stderr.

`NatPeer` is the harness side: it starts one such process inside a namespace and exchanges those lines with it,
each read bounded by a timeout (`ask`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2p.discovery import DiscoveryConfig
from p2p.hole_punch import HolePunchConfig, PunchFailed, PunchSucceeded
from p2p.host import ConnectionNotifee, HostConfig, running_host
from p2p.libp2p_compat import dial_relayed, has_direct_connection, is_relayed, pnet_reports_its_transport
from p2p.node import NodeConfig, SwarmNode, open_node
from testing.netns import NetnsHost

ECHO_PROTOCOL = TProtocol("/swarmgrad-test/echo/1.0.0")
ECHO_BYTES = 32
MAX_ECHO_BYTES = 4 * 1024 * 1024
RELAY_LIMITS = RelayLimits(duration=3600, data=1 << 30, max_circuit_conns=64, max_reservations=64)
SWARM_ID = "nat-test"
_REPO = Path(__file__).resolve().parent.parent
_PEER_COMMANDS = frozenset({"dial", "wait_direct", "wait_relay_closed", "conns", "echo"})


def _say(**fields: object) -> None:
    print(json.dumps(fields, sort_keys=True), flush=True)


class _Changes:
    """Sets, and replaces, `changed` at every connection open and close of the host (`notifee`)."""

    def __init__(self) -> None:
        self.changed = trio.Event()
        self.notifee = ConnectionNotifee(self._wake, self._wake)

    def _wake(self, conn: INetConn) -> None:
        self.changed.set()
        self.changed = trio.Event()


async def _read_exactly(stream: INetStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.read(size - len(data))
        if not chunk:
            raise ConnectionError(f"echo stream closed after {len(data)} of {size} bytes")
        data += chunk
    return data


async def _echo_handler(stream: INetStream) -> None:
    """Reads a 4-byte big-endian length (at most `MAX_ECHO_BYTES`) and that many bytes, and writes them back."""
    try:
        size = int.from_bytes(await _read_exactly(stream, 4), "big")
        if size <= MAX_ECHO_BYTES:
            await stream.write(await _read_exactly(stream, size))
    except ConnectionError:
        return
    finally:
        await stream.close()


async def _echo_once(host: IHost, peer_id: ID, size: int) -> float:
    started = trio.current_time()
    stream = await host.new_stream(peer_id, [ECHO_PROTOCOL])
    try:
        await stream.write(size.to_bytes(4, "big") + b"x" * size)
        await _read_exactly(stream, size)
    finally:
        await stream.close()
    return trio.current_time() - started


def _conns(host: IHost, peer_id: ID) -> list[dict[str, object]]:
    return [
        {"addrs": [str(addr) for addr in conn.get_transport_addresses()], "relayed": is_relayed(conn)}
        for conn in host.get_network().get_connections(peer_id)
    ]


async def run_relay(listen: str, key: Path, psk: bytes | None) -> None:
    # as on every swarmgrad node (`serve_dcutr`): without it, in a private swarm, identify on the relay reports a
    # NATed peer's circuit address, not its public one, as the address it observes the peer at
    pnet_reports_its_transport()
    async with running_host(HostConfig(key, listen_addrs=(listen,), psk=psk)) as host:
        hop = CircuitV2Protocol(host, limits=RELAY_LIMITS, allow_hop=True)
        async with background_trio_service(hop):
            _say(ready=True, peer_id=str(host.get_id()), addr=f"{listen}/p2p/{host.get_id()}")
            stdin = trio.wrap_file(sys.stdin)
            while await stdin.readline() not in ("", "quit\n"):
                pass


async def run_node(listen: str, key: Path, relay_addr: str, psk: bytes | None, punch: HolePunchConfig) -> None:
    config = NodeConfig(
        host=HostConfig(key, listen_addrs=(listen,), psk=psk),
        discovery=DiscoveryConfig(SWARM_ID),
        reachability="private",
        hole_punch=punch,
    )
    relay = info_from_p2p_addr(multiaddr.Multiaddr(relay_addr))
    async with open_node(config) as node:
        host = node.host
        stop = CircuitV2Protocol(host, limits=RELAY_LIMITS, allow_hop=False)
        async with background_trio_service(stop), trio.open_nursery() as nursery:
            await _serve_commands(node, stop, relay, psk, nursery)
            nursery.cancel_scope.cancel()  # the reservation's refresher


async def _serve_commands(
    node: SwarmNode, stop: CircuitV2Protocol, relay: PeerInfo, psk: bytes | None, nursery: trio.Nursery
) -> None:
    host = node.host
    changes = _Changes()
    host.get_network().register_notifee(changes.notifee)
    events = node.subscribe()
    host.set_stream_handler(ECHO_PROTOCOL, _echo_handler)
    transport = CircuitV2Transport(host, stop, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))
    await host.connect(relay)
    stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL_ID])
    reserved = await transport.reserve(stream, relay.peer_id, nursery)
    await stream.close()
    _say(ready=reserved, peer_id=str(host.get_id()), addrs=[str(addr) for addr in host.get_addrs()])
    stdin = trio.wrap_file(sys.stdin)
    while (line := await stdin.readline()) not in ("", "quit\n"):
        words = line.split()
        if not words:
            continue
        peer_id = ID.from_base58(words[1]) if words[0] in _PEER_COMMANDS else host.get_id()
        if words[0] == "dial":
            started = trio.current_time()
            conn = await dial_relayed(host, transport, PeerInfo(relay.peer_id, relay.addrs), peer_id, psk)
            _say(dialled=True, relayed=is_relayed(conn), elapsed_s=trio.current_time() - started)
        elif words[0] == "wait_direct":
            started = trio.current_time()
            with trio.move_on_after(float(words[2])):
                while not has_direct_connection(host, peer_id):
                    await changes.changed.wait()
            _say(direct=has_direct_connection(host, peer_id), elapsed_s=trio.current_time() - started)
        elif words[0] == "wait_punch":
            started = trio.current_time()
            outcome: dict[str, object] = {"punch": None}
            with trio.move_on_after(float(words[1])):
                async for event in events:
                    if isinstance(event, PunchSucceeded):
                        outcome = {
                            "punch": "succeeded",
                            "attempt": event.attempt,
                            "since_relayed_s": event.elapsed_s,
                            "attempt_s": event.attempt_s,
                        }
                        break
                    if isinstance(event, PunchFailed) and event.final:
                        outcome = {"punch": "failed", "attempt": event.attempt, "reason": event.reason}
                        break
            _say(**outcome, elapsed_s=trio.current_time() - started)
        elif words[0] == "wait_relay_closed":
            started = trio.current_time()
            with trio.move_on_after(float(words[2])):
                while any(is_relayed(conn) for conn in host.get_network().get_connections(peer_id)):
                    await changes.changed.wait()
            _say(conns=_conns(host, peer_id), elapsed_s=trio.current_time() - started)
        elif words[0] == "conns":
            _say(conns=_conns(host, peer_id))
        elif words[0] == "echo":
            size = int(words[3]) if len(words) > 3 else ECHO_BYTES
            if not 0 < size <= MAX_ECHO_BYTES:
                raise ValueError(f"echo size must be in 1..{MAX_ECHO_BYTES}, got {size}")
            times = [await _echo_once(host, peer_id, size) for _ in range(int(words[2]))]
            _say(echo_median_s=statistics.median(times), echo_s=times, conns=_conns(host, peer_id))
        elif words[0] == "stats":
            _say(stats=node.statistics())
        else:
            _say(error=f"unknown command {words[0]!r}")


class NatPeer:
    """One `python -m testing.nat_peer` process inside `host`'s namespace, listening on `host.ip`:`port`; stderr
    goes to `log_path`. Use as a context manager: on exit stdin is closed and the process waited for (killed after
    10 s)."""

    def __init__(self, host: NetnsHost, role: str, port: int, key_dir: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        listen = f"/ip4/{host.ip}/tcp/{port}"
        key = key_dir / f"{host.name}-{port}.key"
        command = host.wrap([sys.executable, "-m", "testing.nat_peer", role, "--listen", listen, "--key", str(key)])
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*command, *extra],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=_REPO,
                text=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        self.ready: dict[str, Any] = {}

    def __enter__(self) -> NatPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        self.ready = self.read(timeout_s)
        if not self.ready.get("ready"):
            raise RuntimeError(f"{self.log_path.name} did not get ready: {self.ready}; {self.tail()}")
        return self.ready

    @property
    def peer_id(self) -> str:
        return str(self.ready["peer_id"])

    def read(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line, within `timeout_s`; raises `TimeoutError` (with the log's tail) otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_s = deadline - time.monotonic()
            readable, _, _ = select.select([self.stdout], [], [], max(0.0, left_s))
            if not readable:
                raise TimeoutError(f"{self.log_path.name}: no answer within {timeout_s} s; {self.tail()}")
            line = self.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.log_path.name} exited; {self.tail()}")
            if line.startswith("{"):
                answer: dict[str, Any] = json.loads(line)
                return answer

    def ask(self, command: str, timeout_s: float) -> dict[str, Any]:
        self.stdin.write(command + "\n")
        self.stdin.flush()
        return self.read(timeout_s)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.stdout.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testing.nat_peer")
    parser.add_argument("role", choices=("relay", "node"))
    parser.add_argument("--listen", required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--relay", default="")
    parser.add_argument("--swarm-key-hex", default="", help="a private swarm's 32-byte key, as 64 hex digits")
    parser.add_argument("--punch-timeout-s", type=float, default=HolePunchConfig().punch_timeout_s)
    parser.add_argument("--max-attempts", type=int, default=HolePunchConfig().max_attempts)
    parser.add_argument("--first-delay-s", type=float, default=HolePunchConfig().first_delay_s)
    parser.add_argument("--relay-close-grace-s", type=float, default=HolePunchConfig().relay_close_grace_s)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    psk = bytes.fromhex(args.swarm_key_hex) if args.swarm_key_hex else None
    if args.role == "relay":
        trio.run(run_relay, args.listen, args.key, psk)
    else:
        punch = HolePunchConfig(
            punch_timeout_s=args.punch_timeout_s,
            max_attempts=args.max_attempts,
            first_delay_s=args.first_delay_s,
            relay_close_grace_s=args.relay_close_grace_s,
        )
        trio.run(run_node, args.listen, args.key, args.relay, psk, punch)


if __name__ == "__main__":
    main()
