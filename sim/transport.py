"""`SimTransport`: the `Transport` contract in memory, on trio's clock (virtual under `MockClock`).

A `SimNetwork` connects any number of `SimTransport`s in one process. Each directed link has a `LinkModel`
(latency, bandwidth, loss); a link carries one payload at a time, so a sender's `send` returns when its payload has
been put on the wire (size / bandwidth after the link is free) and the payload arrives one latency later, in order.
Loss draws from the network's seeded `random.Random`, so a run is deterministic per seed. `freeze(peer)` models a
hung process: sends to it block until it is thawed or the sender gives up. The research simulator builds its
network model (partitions, churn, Byzantine peers) on these hooks; this module must not grow protocol logic.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from swarmgrad.core.errors import ConfigError, LocalProtocolError, MessageTooLarge, PeerUnreachable, TransportClosed
from swarmgrad.core.machine import PeerDown, PeerId, PeerUp
from swarmgrad.core.transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_QUEUE_LEN, Delivery, Transport


@dataclass(frozen=True)
class LinkModel:
    """How one direction of a link behaves."""

    latency_s: float = 0.0
    bandwidth_bytes_per_s: float = math.inf
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ConfigError("latency_s", self.latency_s, "a finite number >= 0")
        if not self.bandwidth_bytes_per_s > 0:
            raise ConfigError("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s, "> 0")
        if not 0 <= self.loss < 1:
            raise ConfigError("loss", self.loss, "in [0, 1)")


@dataclass
class _Link:
    model: LinkModel
    queue_send: trio.MemorySendChannel[tuple[float, str, bytes]]
    free_at: float = 0.0


class SimNetwork:
    """A set of simulated peers and the links between them. Use `open_transport` inside `run`'s nursery."""

    def __init__(self, seed: int, default_link: LinkModel | None = None) -> None:
        self._rng = random.Random(seed)
        self._default = default_link or LinkModel()
        self._models: dict[tuple[PeerId, PeerId], LinkModel] = {}
        self._links: dict[tuple[PeerId, PeerId], _Link] = {}
        self._peers: dict[PeerId, SimTransport] = {}
        self._frozen: dict[PeerId, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[SimNetwork]:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield self
            finally:
                for transport in list(self._peers.values()):
                    await transport.aclose()
                nursery.cancel_scope.cancel()

    def set_link(self, src: PeerId, dst: PeerId, model: LinkModel) -> None:
        """Model the direction src → dst (applies to payloads sent from now on)."""
        self._models[(src, dst)] = model
        link = self._links.get((src, dst))
        if link is not None:
            link.model = model

    def freeze(self, peer: PeerId) -> None:
        """`peer` stops reading: sends to it block (like a SIGSTOPped process) until `thaw`."""
        self._frozen.setdefault(peer, trio.Event())

    def thaw(self, peer: PeerId) -> None:
        event = self._frozen.pop(peer, None)
        if event is not None:
            event.set()

    @asynccontextmanager
    async def open_transport(
        self, peer: PeerId, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> AsyncIterator[SimTransport]:
        if peer in self._peers:
            raise LocalProtocolError(f"peer {peer} is already on this network")
        transport = SimTransport(self, peer, max_message_bytes)
        self._peers[peer] = transport
        try:
            yield transport
        finally:
            await transport.aclose()

    # ---- used by SimTransport -----------------------------------------------------------------------------------

    def _alive(self, peer: PeerId) -> SimTransport | None:
        transport = self._peers.get(peer)
        return transport if transport is not None and not transport.closed else None

    def _link(self, src: PeerId, dst: PeerId) -> _Link:
        link = self._links.get((src, dst))
        if link is None:
            if self._nursery is None:
                raise LocalProtocolError("SimNetwork.run() must be entered before sending")
            send, recv = trio.open_memory_channel[tuple[float, str, bytes]](math.inf)
            link = _Link(self._models.get((src, dst), self._default), send)
            self._links[(src, dst)] = link
            self._nursery.start_soon(self._carry, src, dst, recv)
        return link

    async def _carry(
        self, src: PeerId, dst: PeerId, queue: trio.MemoryReceiveChannel[tuple[float, str, bytes]]
    ) -> None:
        async for arrival, protocol, payload in queue:
            await trio.sleep_until(arrival)
            receiver = self._alive(dst)
            if receiver is not None:
                receiver._deliver(src, protocol, payload)

    async def _transmit(self, src: PeerId, dst: PeerId, protocol: str, payload: bytes) -> None:
        frozen = self._frozen.get(dst)
        if frozen is not None:
            await frozen.wait()
        link = self._link(src, dst)
        start = max(trio.current_time(), link.free_at)
        done = start + len(payload) / link.model.bandwidth_bytes_per_s
        link.free_at = done
        await trio.sleep_until(done)
        if self._rng.random() < link.model.loss:
            return
        link.queue_send.send_nowait((done + link.model.latency_s, protocol, payload))

    def _connect(self, a: SimTransport, b: SimTransport) -> None:
        if b.local_peer not in a._connected:
            a._connected.add(b.local_peer)
            b._connected.add(a.local_peer)
            a._emit(PeerUp(b.local_peer))
            b._emit(PeerUp(a.local_peer))

    def _disconnect_all(self, gone: SimTransport) -> None:
        for other_id in sorted(gone._connected):
            other = self._peers[other_id]
            other._connected.discard(gone.local_peer)
            other._emit(PeerDown(gone.local_peer))
        gone._connected.clear()


class SimTransport(Transport):
    """One simulated peer's transport. Create with `SimNetwork.open_transport`."""

    def __init__(self, network: SimNetwork, peer: PeerId, max_message_bytes: int) -> None:
        self._network = network
        self._peer = peer
        self._max_message_bytes = max_message_bytes
        self._inboxes: dict[str, tuple[trio.MemorySendChannel[Delivery], int]] = {}
        self._watchers: list[trio.MemorySendChannel[PeerUp | PeerDown]] = []
        self._connected: set[PeerId] = set()
        self._counters: Counter[str] = Counter()
        self.closed = False

    @property
    def local_peer(self) -> PeerId:
        return self._peer

    def listen(
        self, protocol: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, queue_len: int = DEFAULT_QUEUE_LEN
    ) -> trio.MemoryReceiveChannel[Delivery]:
        if protocol in self._inboxes:
            raise LocalProtocolError(f"{protocol} already has a listener")
        send, recv = trio.open_memory_channel[Delivery](queue_len)
        self._inboxes[protocol] = (send, max_message_bytes)
        return recv

    async def connect(self, address: str) -> PeerId:
        self._check_open()
        other = self._network._alive(address)
        if other is None or other is self:
            raise PeerUnreachable(f"no simulated peer {address!r} is reachable")
        self._network._connect(self, other)
        return address

    async def send(self, peer: PeerId, protocol: str, payload: bytes) -> None:
        self._check_open()
        if len(payload) > self._max_message_bytes:
            raise MessageTooLarge(f"payload of {len(payload)} bytes exceeds {self._max_message_bytes}")
        if peer not in self._connected:
            await self.connect(peer)
        await self._network._transmit(self._peer, peer, protocol, bytes(payload))
        self._check_open()
        if self._network._alive(peer) is None:
            raise PeerUnreachable(f"peer {peer} went away")
        self._counters["messages_out"] += 1
        self._counters["bytes_out"] += len(payload)

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerUp | PeerDown]:
        send, recv = trio.open_memory_channel[PeerUp | PeerDown](DEFAULT_QUEUE_LEN)
        self._watchers.append(send)
        return recv

    def connected_peers(self) -> list[PeerId]:
        return sorted(self._connected)

    def statistics(self) -> dict[str, int]:
        return dict(self._counters)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._network._disconnect_all(self)
        for send, _ in self._inboxes.values():
            send.close()
        for watcher in self._watchers:
            watcher.close()
        await trio.lowlevel.checkpoint()

    # ---- used by SimNetwork -------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise TransportClosed(f"transport of {self._peer} is closed")

    def _deliver(self, src: PeerId, protocol: str, payload: bytes) -> None:
        inbox = self._inboxes.get(protocol)
        if inbox is None:
            self._counters["dropped_no_listener"] += 1
            return
        send, max_message_bytes = inbox
        if len(payload) > max_message_bytes:
            self._counters["remote_errors"] += 1
            return
        try:
            send.send_nowait(Delivery(src, protocol, payload))
        except trio.WouldBlock:
            self._counters["dropped_full"] += 1
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._counters["dropped_no_listener"] += 1
            return
        self._counters["messages_in"] += 1
        self._counters["bytes_in"] += len(payload)

    def _emit(self, event: PeerUp | PeerDown) -> None:
        for watcher in self._watchers:
            try:
                watcher.send_nowait(event)
            except (trio.WouldBlock, trio.ClosedResourceError):
                self._counters["dropped_peer_events"] += 1
