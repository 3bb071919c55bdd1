"""How the conformance suite opens transports: one harness per `Transport` implementation.

A harness opens `count` transports that can reach each other (`address(t)` is what `connect` takes) and closes
them all on exit. `tests/test_transport_conformance.py` runs every check against every harness in `HARNESSES`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Protocol

from p2p.transport import Transport
from sim.transport import SimNetwork, SimTransport


class Harness(Protocol):
    name: str

    def open(self, count: int, max_message_bytes: int) -> AsyncIterator[list[Transport]]: ...

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


HARNESSES: list[Harness] = [SimHarness()]
