"""The body fetch: downloads a whole certified checkpoint, chunk by chunk, each chunk checked against the root.

A certificate names a checkpoint by its Merkle root (`consensus.merkle`); the bytes themselves stay with the peers
that hold them (its proposer, and every peer that fetched it since). `BodyFetch` is the sans-IO machine that
gets them over the chunk protocol (`consensus.chunks`: the same `ChunkRequest`/`ChunkReply` messages that voters
sample with), so a peer keeps the certified body beside its certificate, and a joiner can start from it.

- `FetchBody(epoch, root, chunk_count, peers)` asks `peers` in turn. From the current peer it requests
  `batch_chunks` chunks at a time, in index order, with a deadline of `timeout_s` per request and `attempts` sends
  of each; every chunk's proof must lead to `root` (`verify_proof`, which also checks the chunk's length).
- A refusal, a reply that does not answer the request, a bad proof, no answer after `attempts` sends, or the peer
  going down (`PeerDown`) moves on to the next peer; the chunks already verified are kept, since they are proven
  against the root whoever sent them. Each such failure is notified as `BodyPeerFailed` (the host may report the
  peer). With every chunk verified it notifies `BodyFetched` (the chunks in order), with no peer left `BodyFailed`.
- Several bodies may be fetched at once (one per (epoch, root)); a second `FetchBody` of the same one is refused
  as a local error.

The machine verifies chunks only; the host turns them into a `CheckpointTree` (and from there into parameters).
Bounds: at most `MAX_CHUNKS_PER_REQUEST` chunks per request, so a reply is at most `chunks.MAX_MESSAGE_BYTES`.
No I/O, no clock, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consensus.chunks import MAX_CHUNKS_PER_REQUEST, ChunkRefusal, ChunkReply, ChunkRequest, Refusal
from consensus.merkle import MAX_CHUNK_COUNT, verify_proof
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Event,
    Notify,
    PeerDown,
    PeerId,
    Received,
    Send,
    SetTimer,
    TimerFired,
)
from swarmgrad.core.swarm_id import validate_swarm_id


@dataclass(frozen=True)
class BodyFetchConfig:
    swarm_id: str
    batch_chunks: int = 16
    """Chunks asked for in one request (16 x 64 KiB: replies of about 1 MiB)."""
    timeout_s: float = 5.0
    """How long one request waits for its answer."""
    attempts: int = 2
    """Sends of one request to one peer before the next peer is asked."""

    def __post_init__(self) -> None:
        validate_swarm_id(self.swarm_id)
        if not 1 <= self.batch_chunks <= MAX_CHUNKS_PER_REQUEST:
            raise LocalProtocolError(f"batch_chunks must be in [1, {MAX_CHUNKS_PER_REQUEST}], got {self.batch_chunks}")
        if not 0 < self.timeout_s < float("inf"):
            raise LocalProtocolError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")
        if self.attempts < 1:
            raise LocalProtocolError(f"attempts must be >= 1, got {self.attempts}")


@dataclass(frozen=True)
class FetchBody(Command):
    """Fetch all `chunk_count` chunks of the checkpoint `root` of `epoch`, asking `peers` in this order."""

    epoch: int
    root: bytes
    chunk_count: int
    peers: tuple[PeerId, ...]


@dataclass(frozen=True)
class BodyFetched:
    """Every chunk of `root`, in index order, each verified against it."""

    epoch: int
    root: bytes
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class BodyPeerFailed:
    """`peer` did not give (the rest of) the body: `reason`; the next peer is asked."""

    epoch: int
    root: bytes
    peer: PeerId
    reason: str
    misbehaved: bool = False
    """True when the peer sent something wrong (a bad proof, a reply to other indices), not merely nothing."""


@dataclass(frozen=True)
class BodyFailed:
    """No peer gave the whole body of `root`; `reasons` has one (peer, reason) per peer asked."""

    epoch: int
    root: bytes
    reasons: tuple[tuple[PeerId, str], ...]


_Key = tuple[int, bytes]


@dataclass
class _Body:
    root: bytes
    chunk_count: int
    peers: list[PeerId]
    chunks: dict[int, bytes] = field(default_factory=dict)
    reasons: list[tuple[PeerId, str]] = field(default_factory=list)
    request: ChunkRequest | None = None
    sends: int = 0


class BodyFetch:
    """Fetches certified bodies; see the module docstring."""

    def __init__(self, config: BodyFetchConfig) -> None:
        self.config = config
        self._bodies: dict[_Key, _Body] = {}

    @property
    def in_flight(self) -> int:
        return len(self._bodies)

    def expects(self, peer: PeerId, msg: object) -> bool:
        """Whether `msg` from `peer` answers one of this machine's requests (the chunk protocol is shared with the
        sample fetch, so a driver routes answers by this): a reply must answer the request's very indices."""
        if not isinstance(msg, ChunkReply | ChunkRefusal) or msg.swarm_id != self.config.swarm_id:
            return False
        body = self._bodies.get((msg.epoch, msg.root))
        if body is None or body.request is None or body.peers[0] != peer:
            return False
        return isinstance(msg, ChunkRefusal) or tuple(c.index for c in msg.chunks) == body.request.indices

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchBody):
            return self._start(now, event)
        if isinstance(event, Received) and self.expects(event.peer, event.msg):
            return self._answer(now, event.peer, event.msg)  # type: ignore[arg-type]
        if isinstance(event, TimerFired):
            return self._timer(now, event.key)
        if isinstance(event, PeerDown):
            actions: list[Action] = []
            for key in sorted(self._bodies):
                body = self._bodies[key]
                if body.peers and body.peers[0] == event.peer and body.request is not None:
                    actions += [CancelTimer(_timer(key)), *self._next_peer(now, key, "peer disconnected")]
            return actions
        return []

    def _start(self, now: float, command: FetchBody) -> list[Action]:
        key = (command.epoch, command.root)
        if key in self._bodies:
            raise LocalProtocolError(f"the body of {command.root.hex()[:16]} is already being fetched")
        if not 1 <= command.chunk_count <= MAX_CHUNK_COUNT:
            raise LocalProtocolError(f"chunk_count must be in [1, {MAX_CHUNK_COUNT}], got {command.chunk_count}")
        self._bodies[key] = _Body(command.root, command.chunk_count, list(command.peers))
        return self._request(now, key)

    def _request(self, now: float, key: _Key) -> list[Action]:
        body = self._bodies[key]
        if not body.peers:
            del self._bodies[key]
            return [Notify(BodyFailed(key[0], key[1], tuple(body.reasons)))]
        missing = [i for i in range(body.chunk_count) if i not in body.chunks][: self.config.batch_chunks]
        if not missing:
            del self._bodies[key]
            chunks = tuple(body.chunks[i] for i in range(body.chunk_count))
            return [Notify(BodyFetched(key[0], key[1], chunks))]
        body.request = ChunkRequest(self.config.swarm_id, key[0], key[1], tuple(missing))
        body.sends = 0
        return self._send(now, key)

    def _send(self, now: float, key: _Key) -> list[Action]:
        body = self._bodies[key]
        assert body.request is not None, "a request is set before it is sent"
        body.sends += 1
        deadline = now + self.config.timeout_s
        return [Send(body.peers[0], body.request, deadline=deadline), SetTimer(_timer(key), deadline)]

    def _next_peer(self, now: float, key: _Key, reason: str, misbehaved: bool = False) -> list[Action]:
        body = self._bodies[key]
        peer = body.peers.pop(0)
        body.reasons.append((peer, reason))
        body.request = None
        return [Notify(BodyPeerFailed(key[0], key[1], peer, reason, misbehaved)), *self._request(now, key)]

    def _timer(self, now: float, timer: object) -> list[Action]:
        if not (isinstance(timer, tuple) and len(timer) == 2 and timer[0] == "body-fetch"):
            return []
        key: _Key = timer[1]
        body = self._bodies.get(key)
        if body is None or body.request is None:
            return []
        if body.sends < self.config.attempts:
            return self._send(now, key)
        return self._next_peer(now, key, f"no answer to {body.sends} requests of {self.config.timeout_s} s each")

    def _answer(self, now: float, peer: PeerId, msg: ChunkReply | ChunkRefusal) -> list[Action]:
        key = (msg.epoch, msg.root)
        body = self._bodies[key]
        request = body.request
        assert request is not None, "checked by expects()"
        actions: list[Action] = [CancelTimer(_timer(key))]
        if isinstance(msg, ChunkRefusal):
            name = Refusal(msg.code).name.lower().replace("_", " ")
            return actions + self._next_peer(now, key, f"refused: {name}: {msg.detail}")
        if tuple(c.index for c in msg.chunks) != request.indices:
            return actions + self._next_peer(now, key, "the reply does not answer the requested indices", True)
        for proven in msg.chunks:
            if not verify_proof(body.root, proven.index, body.chunk_count, proven.chunk, proven.proof):
                return actions + self._next_peer(
                    now, key, f"chunk {proven.index}: proof does not lead to the root", True
                )
        for proven in msg.chunks:
            body.chunks[proven.index] = proven.chunk
        return actions + self._request(now, key)


def _timer(key: _Key) -> tuple[str, _Key]:
    return ("body-fetch", key)
