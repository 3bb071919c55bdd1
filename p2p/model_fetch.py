"""Model fetch: how a peer that joins late (or lost its data directory) gets the swarm's current model.

Owns the `/swarmgrad/model/1.0.0` messages and the sans-IO `ModelFetch` machine; the trio side is a plain
`swarmgrad.core.driver.Driver`. A joiner asks one neighbour at a time (`FetchModel`, peers tried in sorted order) and
waits `timeout_s` for a `ModelOffer`: safetensors bytes of the model, the round it was taken at and the task name.
The policy is the machine's: the offer is checked by the application's injected `OfferValidator` (against the task:
`training.checkpoint.decode_state`, size first, then names, shapes, dtypes, finite values; never unpickled), run as
a `Compute` so a large body is decoded off the event loop; a valid offer is adopted (`ModelAdopted`, carrying what
the validator returned), an invalid one refused (`OfferRefused`, the sender to be scored) and the next neighbour
asked; when none is left, `FetchFailed` with a reason per neighbour. Serving is the other half: a `ModelRequest` is
handed to the application (`ModelRequested`), which answers with `ServeModel` or `DeclineRequest`. No I/O, no
clock, no logging above DEBUG here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Compute,
    Computed,
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


@dataclass(frozen=True, eq=False)
class ModelAdopted:
    """`peer`'s offer of its model as of `round` passed the validator, which returned `state`: load it."""

    peer: PeerId
    round: int
    state: object


@dataclass(frozen=True)
class OfferRefused:
    """`peer` offered a model that did not validate (`reason`): the sender misbehaved; the next one is asked."""

    peer: PeerId
    reason: str


OfferValidator = Callable[[ModelOffer], object]
"""Checks an offer against the local task and returns what to adopt (e.g. the decoded state); raises `DecodeError`
when it does not validate. Run as a `Compute`: it must not touch the application's live state."""


@dataclass(frozen=True, eq=False)
class _Checked:
    state: object
    refusal: str | None


def _check(validate: OfferValidator, offer: ModelOffer) -> _Checked:
    try:
        return _Checked(validate(offer), None)
    except DecodeError as exc:
        return _Checked(None, str(exc))


@dataclass(frozen=True)
class FetchFailed:
    """No candidate gave a model; `reasons` says, per peer asked, why."""

    reasons: tuple[tuple[PeerId, str], ...]


_TIMER = "model-fetch"


class ModelFetch:
    """The fetch/serve machine. One fetch at a time; serving needs no state beyond the question. `validate` checks
    offers (a machine that only serves needs none: then `FetchModel` is a local error)."""

    def __init__(self, timeout_s: float, validate: OfferValidator | None = None) -> None:
        if not timeout_s > 0:
            raise LocalProtocolError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._validate = validate
        self._queue: list[PeerId] = []
        self._asked: PeerId | None = None
        self._checking: tuple[PeerId, int, int] | None = None  # an offer being validated: peer, nonce, round
        self._nonce = 0
        self._reasons: list[tuple[PeerId, str]] = []

    @property
    def fetching(self) -> bool:
        return self._asked is not None or self._checking is not None

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchModel):
            if self._validate is None:
                raise LocalProtocolError("this ModelFetch was built without a validator: it only serves")
            if self.fetching:
                raise LocalProtocolError("a model fetch is already running")
            self._queue = sorted(set(event.candidates))
            self._reasons = []
            return self._ask_next(now)
        if isinstance(event, Computed):
            return self._checked(now, event)
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
            assert self._validate is not None, "nothing is asked without a validator"
            self._asked = None
            self._checking = (peer, msg.nonce, msg.round)
            key = ("model-fetch", "check", msg.nonce)
            return [CancelTimer(_TIMER), Compute(key, partial(_check, self._validate, msg))]
        raise RemoteProtocolError(peer, f"unexpected message {type(msg).__name__}")

    def _checked(self, now: float, event: Computed) -> list[Action]:
        checking = self._checking
        if checking is None or event.key != ("model-fetch", "check", checking[1]):
            raise LocalProtocolError(f"ModelFetch did not ask for the computation {event.key!r}")
        if not isinstance(event.result, _Checked):
            raise LocalProtocolError(f"an offer check gave {type(event.result).__name__}")
        peer, _, round_ = checking
        self._checking = None
        if event.result.refusal is None:
            return [Notify(ModelAdopted(peer, round_, event.result.state))]
        self._reasons.append((peer, f"offer refused: {event.result.refusal}"))
        return [Notify(OfferRefused(peer, event.result.refusal)), *self._ask_next(now)]

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
