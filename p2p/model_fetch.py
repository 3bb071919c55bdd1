"""Model fetch: how a peer that joins late (or lost its data directory) gets the swarm's current model.

Owns the `/swarmgrad/model/1.0.0` messages and the sans-IO `ModelFetch` machine; the trio side is a plain
`swarmgrad.core.driver.Driver`. A joiner asks one neighbour at a time (`FetchModel`, peers tried in sorted order) and
waits `timeout_s` for a `ModelOffer`: safetensors bytes of the model, the round it was taken at and the task name.
The machine never looks inside the body: it notifies the application (`ModelOffered`), which validates it against
the task (`training.checkpoint.decode_state`: size first, then names, shapes, dtypes, finite values; never
unpickled) and either adopts it or rejects it (`RejectOffer`), and then the next neighbour is asked. Serving is
the other half: a `ModelRequest` is handed to the application (`ModelRequested`), which answers with `ServeModel`
or `DeclineRequest`. No I/O, no clock, no logging above DEBUG here.
"""

from __future__ import annotations

from dataclasses import dataclass

from swarmgrad.core.codec import Schema
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
    SendFailed,
    SetTimer,
    TimerFired,
)

PROTOCOL = "/swarmgrad/model/1.0.0"
MESSAGE_OVERHEAD_BYTES = 4096
"""Room for an offer's fields around its body, when sizing the protocol's message limit."""


# ---- wire messages ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRequest:
    """Please send me your current model. `nonce` matches the answer to the question."""

    nonce: int


@dataclass(frozen=True)
class ModelOffer:
    """The sender's model as of `round`, for `task`, as safetensors bytes."""

    nonce: int
    round: int
    task: str
    body: bytes

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")


@dataclass(frozen=True)
class ModelUnavailable:
    """The sender has no model to give (yet), or another task."""

    nonce: int
    reason: str


SCHEMA = Schema("model-fetch", {1: ModelRequest, 2: ModelOffer, 3: ModelUnavailable})


# ---- commands and notifications -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchModel(Command):
    """Ask `candidates` (tried in sorted order, one at a time) for the model."""

    candidates: tuple[PeerId, ...]


@dataclass(frozen=True)
class RejectOffer(Command):
    """The application refused the last offer (it did not validate): ask the next candidate."""

    peer: PeerId


@dataclass(frozen=True)
class ServeModel(Command):
    """Answer `peer`'s request `nonce` with this model."""

    peer: PeerId
    nonce: int
    round: int
    task: str
    body: bytes


@dataclass(frozen=True)
class DeclineRequest(Command):
    """Answer `peer`'s request `nonce`: no model to give."""

    peer: PeerId
    nonce: int
    reason: str


@dataclass(frozen=True)
class ModelRequested:
    """`peer` asks for our model; answer with `ServeModel` or `DeclineRequest`."""

    peer: PeerId
    nonce: int


@dataclass(frozen=True)
class ModelOffered:
    """`peer` offered a model in answer to our request: validate it, then adopt it or `RejectOffer`."""

    peer: PeerId
    offer: ModelOffer


@dataclass(frozen=True)
class FetchFailed:
    """No candidate gave a model; `reasons` says, per peer asked, why."""

    reasons: tuple[tuple[PeerId, str], ...]


_TIMER = "model-fetch"


class ModelFetch:
    """The fetch/serve machine. One fetch at a time; serving needs no state beyond the question."""

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise LocalProtocolError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._queue: list[PeerId] = []
        self._asked: PeerId | None = None
        self._nonce = 0
        self._reasons: list[tuple[PeerId, str]] = []

    @property
    def fetching(self) -> bool:
        return self._asked is not None

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchModel):
            if self._asked is not None:
                raise LocalProtocolError("a model fetch is already running")
            self._queue = sorted(set(event.candidates))
            self._reasons = []
            return self._ask_next(now)
        if isinstance(event, RejectOffer):
            self._reasons.append((event.peer, "offer refused"))
            return self._ask_next(now)
        if isinstance(event, ServeModel):
            return [Send(event.peer, ModelOffer(event.nonce, event.round, event.task, event.body))]
        if isinstance(event, DeclineRequest):
            return [Send(event.peer, ModelUnavailable(event.nonce, event.reason))]
        if isinstance(event, TimerFired) and event.key == _TIMER and self._asked is not None:
            self._reasons.append((self._asked, f"no answer within {self.timeout_s} s"))
            return self._ask_next(now)
        if isinstance(event, PeerDown | SendFailed) and event.peer == self._asked:
            reason = "disconnected" if isinstance(event, PeerDown) else f"request not sent: {event.reason}"
            self._reasons.append((event.peer, reason))
            return [CancelTimer(_TIMER), *self._ask_next(now)]
        if isinstance(event, Received):
            return self._received(now, event.peer, event.msg)
        return []

    def _received(self, now: float, peer: PeerId, msg: object) -> list[Action]:
        if isinstance(msg, ModelRequest):
            return [Notify(ModelRequested(peer, msg.nonce))]
        if isinstance(msg, ModelOffer | ModelUnavailable):
            if peer != self._asked or msg.nonce != self._nonce:
                raise RemoteProtocolError(peer, f"unsolicited {type(msg).__name__} (nonce {msg.nonce})")
            if isinstance(msg, ModelUnavailable):
                self._reasons.append((peer, f"unavailable: {msg.reason}"))
                return [CancelTimer(_TIMER), *self._ask_next(now)]
            self._asked = None  # the application adopts the offer, or sends RejectOffer to go on with the queue
            return [CancelTimer(_TIMER), Notify(ModelOffered(peer, msg))]
        raise RemoteProtocolError(peer, f"unexpected message {type(msg).__name__}")

    def _ask_next(self, now: float) -> list[Action]:
        self._asked = None
        if not self._queue:
            return [Notify(FetchFailed(tuple(self._reasons)))]
        self._asked = self._queue.pop(0)
        self._nonce += 1
        return [
            Send(self._asked, ModelRequest(self._nonce), deadline=now + self.timeout_s),
            SetTimer(_TIMER, now + self.timeout_s),
        ]
