"""The protocol core: what a sans-IO protocol machine takes in and gives out.

A machine (gossip round, membership, epoch consensus) is an object with one method,
`step(now, event) -> list[Action]`. It never awaits, never reads a clock (`now` is handed in, in seconds on the
driver's clock), uses only the `random.Random` it was constructed with, and iterates peers in sorted order so that
a run is deterministic per seed. Drivers (`swarmgrad.core.driver` on trio, and the simulator) feed it events and carry
out its actions. Nothing in this module does I/O.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

PeerId: TypeAlias = str
"""A peer's identity as text (the base58 libp2p peer id on a real network, any unique name in a simulation)."""


# ---- inputs -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A decoded message arrived from `peer` (the transport-authenticated sender)."""

    peer: PeerId
    msg: object


@dataclass(frozen=True)
class TimerFired:
    """The timer set with `SetTimer(key, ...)` reached its deadline."""

    key: Hashable


@dataclass(frozen=True)
class PeerUp:
    """`peer` became reachable."""

    peer: PeerId


@dataclass(frozen=True)
class PeerDown:
    """`peer` is gone (disconnected, failed its pings, or left)."""

    peer: PeerId


@dataclass(frozen=True)
class SendFailed:
    """A `Send` to `peer` could not be completed by its deadline or at all; `reason` says why."""

    peer: PeerId
    reason: str


class Command:
    """Base class of the commands an application hands a machine (`StartRound`, ...). Subclasses are frozen
    dataclasses."""


Event: TypeAlias = Received | TimerFired | PeerUp | PeerDown | SendFailed | Command


# ---- outputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send `msg` to `peer`. If `deadline` is set (absolute, on the driver's clock), the send is abandoned at that
    time and reported back as `SendFailed`."""

    peer: PeerId
    msg: object
    deadline: float | None = None


@dataclass(frozen=True)
class SetTimer:
    """Fire `TimerFired(key)` at the absolute time `deadline`; replaces an earlier timer with the same key."""

    key: Hashable
    deadline: float


@dataclass(frozen=True)
class CancelTimer:
    """Forget the timer with this key (no-op if none is set)."""

    key: Hashable


@dataclass(frozen=True)
class Notify:
    """Hand `event` to the application (a round completed, a peer misbehaved, ...)."""

    event: object


Action: TypeAlias = Send | SetTimer | CancelTimer | Notify


class Machine(Protocol):
    """A sans-IO protocol state machine."""

    def step(self, now: float, event: Event) -> list[Action]:
        """Consume one event at time `now`; return the actions to carry out, in order.

        Raises `RemoteProtocolError` when the event is a peer's message that breaks the protocol (the driver drops
        it and goes on; the machine's state must be unchanged) and `LocalProtocolError` when the caller misused the
        machine.
        """
        ...
