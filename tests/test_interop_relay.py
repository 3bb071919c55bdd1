"""A relay of another libp2p implementation serves swarmgrad: go-libp2p's `p2pd` (`testing.p2pd`, fetched from the
hivemind wheel) as a circuit relay v2, on 127.0.0.1 (a public swarm: py-libp2p's pnet does not interoperate with
go-libp2p's).

A swarmgrad host reserves a slot on the daemon with swarmgrad's own RESERVE (`p2p.relay_host.RelayHost.reserve`, as
a NATed peer's relay client does); a second one dials it through the daemon (`RelayHost.dial`, as membership does
for a circuit address in a member record) and exchanges 64 KiB over the circuit; a dial through the daemon to a host
that holds no reservation fails with the spec's NO_RESERVATION status. Skipped when the daemon cannot be fetched (no
PyPI, not x86-64), except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from p2p.addrs import parse_peer_addr
from p2p.host import HostConfig, running_host
from p2p.relay import RelayServiceConfig, Reserved
from p2p.relay_host import RelayHost
from testing.p2pd import P2pdUnavailable, default_cache_dir, p2pd_binary, running_p2pd

ECHO = TProtocol("/swarmgrad-test/echo/1.0.0")
PAYLOAD = bytes(range(256)) * 256  # 64 KiB
NO_RESERVATION = 204
"""The status circuit relay v2 answers a CONNECT to a peer that holds no reservation (the spec's `Status` enum)."""
LOCAL = ("/ip4/127.0.0.1/tcp/0",)


@pytest.fixture(scope="module")
def p2pd_path() -> Path:
    try:
        return p2pd_binary(default_cache_dir())
    except P2pdUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the interop test must run in CI: {exc}")
        pytest.skip(str(exc))


@asynccontextmanager
async def relay_capable_host(tmp: Path, name: str) -> AsyncIterator[tuple[IHost, RelayHost]]:
    """A swarmgrad host with the stop side of circuit relay v2, as every peer runs it."""
    config = HostConfig(key_path=tmp / name / "identity.key", listen_addrs=LOCAL)
    async with running_host(config) as host, trio.open_nursery() as nursery:
        relay_host = RelayHost(host, RelayServiceConfig(), config)
        await nursery.start(relay_host.run)
        yield host, relay_host
        nursery.cancel_scope.cancel()


async def echo(stream: INetStream) -> None:
    received = b""
    while len(received) < len(PAYLOAD):
        chunk = await stream.read(len(PAYLOAD) - len(received))
        if not chunk:
            break
        received += chunk
    await stream.write(received)
    await stream.close()


async def test_a_go_libp2p_relay_serves_a_swarmgrad_reservation_and_circuit(tmp_path: Path, p2pd_path: Path) -> None:
    with running_p2pd(p2pd_path, tmp_path, LOCAL) as daemon:
        relay_addr = f"{daemon.addrs[0]}/p2p/{daemon.peer_id}"
        relay = parse_peer_addr("relay", relay_addr)
        with trio.fail_after(30):
            async with (
                relay_capable_host(tmp_path, "listener") as (listener, listener_relay),
                relay_capable_host(tmp_path, "dialler") as (dialler, dialler_relay),
                relay_capable_host(tmp_path, "stranger") as (stranger, _),
            ):
                listener.set_stream_handler(ECHO, echo)
                await listener.connect(relay)
                outcome = await listener_relay.reserve(daemon.peer_id, daemon.addrs)
                assert isinstance(outcome, Reserved) and outcome.ttl_s > 0, outcome

                target = listener.get_id()
                assert await dialler_relay.dial(target.to_base58(), f"{relay_addr}/p2p-circuit/p2p/{target}") is None
                (conn,) = dialler.get_network().get_connections(target)
                assert any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
                stream = await dialler.new_stream(target, [ECHO])
                await stream.write(PAYLOAD)
                back = b""
                while len(back) < len(PAYLOAD):
                    chunk = await stream.read(len(PAYLOAD) - len(back))
                    assert chunk, f"the circuit closed after {len(back)} of {len(PAYLOAD)} bytes"
                    back += chunk
                assert back == PAYLOAD

                await stranger.connect(relay)  # connected to the relay, but holding no reservation there
                other = stranger.get_id()
                reason = await dialler_relay.dial(other.to_base58(), f"{relay_addr}/p2p-circuit/p2p/{other}")
                assert reason is not None and f"status {NO_RESERVATION}" in reason, reason
