"""The chunk-fetch machine: asks proposers for sampled chunks (with a deadline and retries) and serves its own.

Sans-IO, on `swarmgrad.core.machine`: the trio side is a plain `swarmgrad.core.driver.Driver` on
`consensus.chunks.PROTOCOL` with `consensus.chunks.SCHEMA` and `MAX_MESSAGE_BYTES`. The messages, the index
sampling and the voter's check are `consensus.chunks`; this machine only moves them:

- **Asking.** `FetchSample(peer, request)` sends the request with a deadline of `timeout_s` and sets a timer; when
  it fires with no answer the request is sent again, up to `attempts` sends in all, then `SampleFailed` is
  notified. The first `ChunkReply` or `ChunkRefusal` from that peer for that (swarm, epoch, root) is notified as
  `SampleFetched` (the caller runs `check_sample` on it, a `Compute` if it likes). `PeerDown` fails every fetch
  from that peer at once; a `SendFailed` changes nothing (the timer resends). An answer nobody asked for is an
  `UnsolicitedChunkReply`; a late duplicate of an answer already taken (a retry crossed it) is dropped without
  blame.
- **Serving.** `HoldTree(epoch, tree)` keeps a tree to serve. `ReleaseBelow(epoch)` (the host's newest certified
  epoch) marks the trees of older epochs as no longer needed: of those, at most `max_held_trees` are kept (the
  oldest evicted first); a tree of the newest certified epoch or of one not decided yet is never evicted, since a
  voter may still sample it or a member fetch its body (training that runs epochs ahead of consensus must not
  starve the epoch under agreement of its proposer's tree; the host bounds that backlog, not this machine);
  a `ChunkRequest` is answered at once with `consensus.chunks.serve` (a refusal for another swarm or an unknown
  root). Serving 8 chunks costs a fraction of a millisecond, so it is not a `Compute`.

No I/O, no clock, no randomness, no logging above DEBUG.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from consensus.chunks import (
    ChunkRefusal,
    ChunkReply,
    ChunkRequest,
    UnsolicitedChunkReply,
    serve,
)
from consensus.merkle import CheckpointTree
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
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

ANSWERED_MEMORY = 256
"""How many answered fetches are remembered, so that a late duplicate answer is dropped instead of blamed."""


@dataclass(frozen=True)
class SampleFetchConfig:
    swarm_id: str
    timeout_s: float = 2.0
    """How long one send of a request waits for its answer."""
    attempts: int = 3
    """Sends of one request in all (the first and the retries)."""
    max_held_trees: int = 4
    """Trees of released (older than the newest certified) epochs kept for serving; undecided epochs' trees and the
    newest certified one's are kept beside them."""

    def __post_init__(self) -> None:
        validate_swarm_id(self.swarm_id)
        if not 0 < self.timeout_s < float("inf"):
            raise LocalProtocolError(f"timeout_s must be a finite number > 0, got {self.timeout_s}")
        if self.attempts < 1:
            raise LocalProtocolError(f"attempts must be >= 1, got {self.attempts}")
        if self.max_held_trees < 1:
            raise LocalProtocolError(f"max_held_trees must be >= 1, got {self.max_held_trees}")


# ---- commands and notifications -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchSample(Command):
    """Ask `peer` (the proposer) for the chunks of `request`."""

    peer: PeerId
    request: ChunkRequest


@dataclass(frozen=True, eq=False)
class HoldTree(Command):
    """Serve `tree` (our proposal's parameters) to voters of `epoch`."""

    epoch: int
    tree: CheckpointTree


@dataclass(frozen=True)
class ReleaseBelow(Command):
    """Trees of epochs below `epoch` (the newest certified one) may be evicted."""

    epoch: int


@dataclass(frozen=True)
class SampleFetched:
    """`peer` answered `request` with `answer` (chunks or a refusal): hand it to `check_sample`."""

    peer: PeerId
    request: ChunkRequest
    answer: ChunkReply | ChunkRefusal


@dataclass(frozen=True)
class SampleFailed:
    """`peer` did not answer `request`: `reason` says why (the voter prevotes nil)."""

    peer: PeerId
    request: ChunkRequest
    reason: str


_Key = tuple[PeerId, int, bytes]  # (peer, epoch, root): one fetch in flight per proposer and proposal


@dataclass
class _Fetch:
    request: ChunkRequest
    sends: int = 0


class SampleFetch:
    """Fetches samples for a voter and serves the trees of a proposer; one instance per peer."""

    def __init__(self, config: SampleFetchConfig) -> None:
        self.config = config
        self._fetches: dict[_Key, _Fetch] = {}
        self._answered: deque[_Key] = deque(maxlen=ANSWERED_MEMORY)
        self._held: dict[tuple[int, bytes], CheckpointTree] = {}
        self._release_below = 0

    @property
    def in_flight(self) -> int:
        return len(self._fetches)

    def asking(self, peer: PeerId, epoch: int, root: bytes) -> bool:
        """Whether a sample of `root` (for `epoch`) is asked of `peer` and not answered yet."""
        return (peer, epoch, root) in self._fetches

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchSample):
            return self._fetch(now, event)
        if isinstance(event, HoldTree):
            self._held[(event.epoch, event.tree.root)] = event.tree
            self._evict()
            return []
        if isinstance(event, ReleaseBelow):
            self._release_below = max(self._release_below, event.epoch)
            self._evict()
            return []
        if isinstance(event, TimerFired):
            return self._timer(now, event.key)
        if isinstance(event, PeerDown):
            return self._peer_down(event.peer)
        if isinstance(event, Received):
            return self._received(event.peer, event.msg)
        return []

    def _fetch(self, now: float, command: FetchSample) -> list[Action]:
        request = command.request
        if request.swarm_id != self.config.swarm_id:
            raise LocalProtocolError(f"a fetch for swarm {request.swarm_id!r} on a machine of {self.config.swarm_id!r}")
        key = (command.peer, request.epoch, request.root)
        if key in self._fetches:
            raise LocalProtocolError(f"a sample of {request.root.hex()[:16]} is already asked of {command.peer}")
        self._fetches[key] = _Fetch(request)
        return self._send(now, key)

    def _send(self, now: float, key: _Key) -> list[Action]:
        fetch = self._fetches[key]
        fetch.sends += 1
        deadline = now + self.config.timeout_s
        return [Send(key[0], fetch.request, deadline=deadline), SetTimer(_timer(key), deadline)]

    def _timer(self, now: float, timer: object) -> list[Action]:
        if not (isinstance(timer, tuple) and len(timer) == 2 and timer[0] == "sample-fetch"):
            return []
        key: _Key = timer[1]
        fetch = self._fetches.get(key)
        if fetch is None:
            return []
        if fetch.sends < self.config.attempts:
            return self._send(now, key)
        del self._fetches[key]
        reason = f"no answer to {fetch.sends} requests of {self.config.timeout_s} s each"
        return [Notify(SampleFailed(key[0], fetch.request, reason))]

    def _peer_down(self, peer: PeerId) -> list[Action]:
        actions: list[Action] = []
        for key in sorted(k for k in self._fetches if k[0] == peer):
            fetch = self._fetches.pop(key)
            actions += [CancelTimer(_timer(key)), Notify(SampleFailed(peer, fetch.request, "peer disconnected"))]
        return actions

    def _evict(self) -> None:
        released = sorted(key for key in self._held if key[0] < self._release_below)
        for key in released[: max(0, len(released) - self.config.max_held_trees)]:
            del self._held[key]

    def _received(self, peer: PeerId, msg: object) -> list[Action]:
        if isinstance(msg, ChunkRequest):
            tree = self._held.get((msg.epoch, msg.root)) if msg.swarm_id == self.config.swarm_id else None
            return [Send(peer, serve(msg, tree))]
        if isinstance(msg, ChunkReply | ChunkRefusal):
            key = (peer, msg.epoch, msg.root)
            fetch = self._fetches.get(key)
            if fetch is None or msg.swarm_id != self.config.swarm_id:
                if key in self._answered:
                    return []  # a retry crossed the first answer: both were honest
                raise UnsolicitedChunkReply(peer, f"{type(msg).__name__} for epoch {msg.epoch} that was not asked for")
            del self._fetches[key]
            self._answered.append(key)
            return [CancelTimer(_timer(key)), Notify(SampleFetched(peer, fetch.request, msg))]
        raise RemoteProtocolError(peer, f"unexpected message {type(msg).__name__}")


def _timer(key: _Key) -> tuple[str, _Key]:
    return ("sample-fetch", key)
