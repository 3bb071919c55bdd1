"""How the conformance suite opens transports: one harness per `Transport` implementation.

A harness opens `count` transports that can reach each other (`address(t)` is what `connect` takes) and closes
them all on exit. `tests/test_transport_conformance.py` runs every check against every harness in `HARNESSES`.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Protocol

from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from sim.transport import SimNetwork, SimTransport
from swarmgrad.core.transport import Transport


class Harness(Protocol):
    name: str

    def open(self, count: int, max_message_bytes: int) -> AbstractAsyncContextManager[list[Transport]]: ...

    def address(self, transport: Transport) -> str: ...


class SimHarness:
    name = "sim"

    @asynccontextmanager
    async def open(self, count: int, max_message_bytes: int) -> AsyncIterator[list[Transport]]:
        net = SimNetwork(seed=7)
        async with net.run(), AsyncExitStack() as stack:
            transports: list[Transport] = [
                await stack.enter_async_context(net.open_transport(f"peer{i}", max_message_bytes)) for i in range(count)
            ]
            yield transports

    def address(self, transport: Transport) -> str:
        assert isinstance(transport, SimTransport)
        return transport.local_peer


class LibP2PHarness:
    """Real py-libp2p hosts on 127.0.0.1 (free ports), each with a fresh identity in a temporary directory."""

    name = "libp2p"

    @asynccontextmanager
    async def open(self, count: int, max_message_bytes: int) -> AsyncIterator[list[Transport]]:
        with tempfile.TemporaryDirectory(prefix="swarmgrad-keys-") as keys:
            async with AsyncExitStack() as stack:
                transports: list[Transport] = [
                    await stack.enter_async_context(
                        LibP2PTransport.open(
                            HostConfig(
                                key_path=Path(keys) / f"peer{i}.key",
                                max_message_bytes=max_message_bytes,
                                max_in_flight_bytes_per_peer=max(max_message_bytes, 256 * 1024 * 1024),
                            )
                        )
                    )
                    for i in range(count)
                ]
                yield transports

    def address(self, transport: Transport) -> str:
        assert isinstance(transport, LibP2PTransport)
        return transport.listen_multiaddrs[0]


HARNESSES: list[Harness] = [SimHarness(), LibP2PHarness()]
