"""The `Transport` contract: authenticated, ordered, size-bounded message delivery between peers.

A transport moves opaque byte payloads (frame bodies, see `swarmgrad.core.codec`) between peers under named protocols
(e.g. `/swarmgrad/gossip/1.0.0`). Two implementations honour this contract: `p2p.libp2p_transport.LibP2PTransport`
(real network) and `sim.transport.SimTransport` (in memory, virtual time); `tests/test_transport_conformance.py`
holds them both to it. It knows nothing about messages, machines or training.

The contract:

* `listen(protocol, max_message_bytes, queue_len)` is called before traffic for that protocol is expected; it
  returns the channel of `Delivery`s for it. A payload over `max_message_bytes` is refused by the receiver before
  it is buffered (and counted as the sender's misbehaviour). When the channel holds `queue_len` undelivered
  messages, further ones are dropped and counted (`statistics()["dropped_full"]`), never blocking the network.
* `send(peer, protocol, payload)` returns once the payload is handed to the network; payloads to one peer under one
  protocol arrive in the order they were sent, intact, or not at all. It raises `MessageTooLarge` when the
  payload exceeds the transport's own `max_message_bytes` (set at construction), `PeerUnreachable` when no
  connection can be made or kept, and `TransportClosed` after `aclose()`. It may block while the receiver is
  slow; callers bound it with a trio cancel scope, and a cancelled send leaves the transport usable (a
  half-written message is discarded).
* `connect(address)` opens a connection; `send` to a peer already known may also connect on demand.
* `peer_events()` gives `PeerUp` / `PeerDown` for connections as they open and close.
* `aclose()` closes every connection and listener and releases every socket; it is idempotent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import trio

from swarmgrad.core.machine import PeerDown, PeerId, PeerUp

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_QUEUE_LEN = 64


@dataclass(frozen=True)
class Delivery:
    """One payload received from `peer` (the authenticated sender) under `protocol`."""

    peer: PeerId
    protocol: str
    payload: bytes


class PeerPolicy(Protocol):
    """Who a transport talks to, and where it reports misbehaviour (scoring and bans are built on this hook).

    A transport calls `allows` before accepting a connection or a stream from a peer and before sending to it, and
    calls `report` for every error it attributes to a remote peer (a bad, oversized or truncated frame, ...).
    Both are called from the transport's tasks and must not block.
    """

    def allows(self, peer: PeerId) -> bool:
        """Whether `peer` may connect and exchange messages now."""
        ...

    def report(self, peer: PeerId, reason: str) -> None:
        """`peer` sent something that breaks the protocol; `reason` says what."""
        ...


class Transport(ABC):
    """Authenticated, ordered, size-bounded delivery of payloads between peers. See the module docstring."""

    @property
    @abstractmethod
    def local_peer(self) -> PeerId:
        """This peer's id."""

    @abstractmethod
    def listen(
        self, protocol: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, queue_len: int = DEFAULT_QUEUE_LEN
    ) -> trio.MemoryReceiveChannel[Delivery]:
        """Accept payloads under `protocol` and return the channel they arrive on. One listener per protocol."""

    @abstractmethod
    async def send(self, peer: PeerId, protocol: str, payload: bytes) -> None:
        """Deliver `payload` to `peer` under `protocol`, in order with earlier sends to the same peer and protocol."""

    @abstractmethod
    async def connect(self, address: str) -> PeerId:
        """Open a connection to the peer at `address` (a multiaddr with `/p2p/<id>` on libp2p, a peer id in the
        simulator) and return its peer id. Raises `PeerUnreachable`."""

    @abstractmethod
    def peer_events(self) -> trio.MemoryReceiveChannel[PeerUp | PeerDown]:
        """A new channel that receives `PeerUp`/`PeerDown` for connections opened or closed from now on."""

    @abstractmethod
    def connected_peers(self) -> list[PeerId]:
        """Peers with an open connection, sorted."""

    @abstractmethod
    def statistics(self) -> dict[str, int]:
        """Counters: bytes and messages in and out, messages dropped, remote errors, ..."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close every connection and listener; idempotent."""
