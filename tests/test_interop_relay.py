"""A relay of another libp2p implementation serves swarmgrad's hosts: go-libp2p's `p2pd` (`testing.p2pd`, fetched
from the hivemind wheel) as a circuit relay v2, on 127.0.0.1.

A swarmgrad host (Noise, yamux, built by `p2p.host.running_host`) reserves a slot on the daemon; a second one dials
it through the daemon (`p2p.libp2p_compat.dial_relayed`) and exchanges bytes over the circuit; a dial through the
daemon to a host that holds no reservation is refused with the spec's NO_RESERVATION status. So the relay messages
of py-libp2p, as swarmgrad drives them, are the ones go-libp2p speaks. Skipped when the daemon cannot be fetched (no
PyPI, not x86-64), except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from p2p.host import HostConfig, running_host
from p2p.libp2p_compat import dial_relayed
from testing.p2pd import P2pd, P2pdUnavailable, default_cache_dir, p2pd_binary, running_p2pd

ECHO = TProtocol("/swarmgrad-test/echo/1.0.0")
PAYLOAD = bytes(range(256)) * 256  # 64 KiB
NO_RESERVATION = 204
"""The status circuit relay v2 answers a CONNECT to a peer that holds no reservation (the spec's `Status` enum)."""
LIMITS = RelayLimits(duration=600, data=16 * 1024 * 1024, max_circuit_conns=4, max_reservations=4)


@pytest.fixture(scope="module")
def p2pd_path() -> Path:
    try:
        return p2pd_binary(default_cache_dir())
    except P2pdUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the interop test must run in CI: {exc}")
        pytest.skip(str(exc))


@asynccontextmanager
async def relay_client(host: IHost) -> AsyncIterator[CircuitV2Transport]:
    """The client and STOP roles of circuit relay v2 on `host`, as a NATed peer runs them."""
    protocol = CircuitV2Protocol(host, limits=LIMITS, allow_hop=False)
    async with background_trio_service(protocol):
        yield CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT, limits=LIMITS))


async def echo(stream: INetStream) -> None:
    received = b""
    while len(received) < len(PAYLOAD):
        chunk = await stream.read(len(PAYLOAD) - len(received))
        if not chunk:
            break
        received += chunk
    await stream.write(received)
    await stream.close()


async def test_a_go_libp2p_relay_serves_a_reservation_and_carries_a_circuit(tmp_path: Path, p2pd_path: Path) -> None:
    with running_p2pd(p2pd_path, tmp_path, ["/ip4/127.0.0.1/tcp/0"]) as daemon:
        await _exchange_through(daemon, tmp_path)


async def _exchange_through(daemon: P2pd, tmp_path: Path) -> None:
    relay = PeerInfo(ID.from_base58(daemon.peer_id), [multiaddr.Multiaddr(addr) for addr in daemon.addrs])
    local = ("/ip4/127.0.0.1/tcp/0",)
    listener_config = HostConfig(key_path=tmp_path / "listener.key", listen_addrs=local)
    dialer_config = HostConfig(key_path=tmp_path / "dialer.key", listen_addrs=local)
    stranger_config = HostConfig(key_path=tmp_path / "stranger.key", listen_addrs=local)
    async with (
        running_host(listener_config) as listener,
        running_host(dialer_config) as dialer,
        running_host(stranger_config) as stranger,
        relay_client(listener) as listener_relay,
        relay_client(dialer) as dialer_relay,
        relay_client(stranger),
        trio.open_nursery() as nursery,
    ):
        listener.set_stream_handler(ECHO, echo)
        with trio.fail_after(20):
            await listener.connect(relay)
            hop = await listener.new_stream(relay.peer_id, [HOP_PROTOCOL_ID])
            assert await listener_relay.reserve(hop, relay.peer_id, nursery)

            conn = await dial_relayed(dialer, dialer_relay, relay, listener.get_id(), None)
            assert any("/p2p-circuit" in str(addr) for addr in conn.get_transport_addresses())
            stream = await dialer.new_stream(listener.get_id(), [ECHO])
            await stream.write(PAYLOAD)
            back = b""
            while len(back) < len(PAYLOAD):
                chunk = await stream.read(len(PAYLOAD) - len(back))
                assert chunk, f"the circuit closed after {len(back)} of {len(PAYLOAD)} bytes"
                back += chunk
            assert back == PAYLOAD

            await stranger.connect(relay)  # connected to the relay, but no reservation there
            with pytest.raises(ConnectionError, match=f"status {NO_RESERVATION}"):
                await dial_relayed(dialer, dialer_relay, relay, stranger.get_id(), None)
        nursery.cancel_scope.cancel()
