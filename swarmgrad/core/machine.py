"""The protocol core: what a sans-IO protocol machine takes in and gives out.

A machine (gossip round, membership, epoch consensus) is an object with one method,
`step(now, event) -> list[Action]`. It never awaits, never reads a clock (`now` is handed in, in seconds on the
driver's clock), uses only the `random.Random` it was constructed with, and iterates peers in sorted order so that
a run is deterministic per seed. Drivers (`swarmgrad.core.driver` on trio, and the simulator) feed it events and carry
out its actions. Nothing in this module does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
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


@dataclass(frozen=True, eq=False)
class Computed:
    """The result of the work of `Compute(key, ...)`."""

    key: Hashable
    result: object


class Command:
    """Base class of the commands an application hands a machine (`StartRound`, ...). Subclasses are frozen
    dataclasses."""


Event: TypeAlias = Received | TimerFired | PeerUp | PeerDown | SendFailed | Computed | Command


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


@dataclass(frozen=True, eq=False)
class Compute:
    """Run `work()` away from the protocol's thread and feed its return value back as `Computed(key, result)`.

    For tensor work that would stall a driver's event loop (top-k over millions of floats, aggregation). `work`
    must touch only objects the machine leaves alone until `Computed` arrives; it may raise only on a bug (the
    driver propagates the exception). A driver runs one machine's computations one at a time, in the order given,
    and steps the machine with other events meanwhile."""

    key: Hashable
    work: Callable[[], object]


class Effect:
    """Base class of the actions that ask the driver for I/O other than messages (open or close a connection, ping
    a peer, ...). A driver hands each to its effect runner, in a task of its own, and feeds back the event the
    runner returns (if any): a machine learns an effect's outcome only through its events. Subclasses are frozen
    dataclasses."""


@dataclass(frozen=True)
class Dial(Effect):
    """Open a connection to `peer` at one of `addrs` (multiaddrs on a real network)."""

    peer: PeerId
    addrs: tuple[str, ...]


@dataclass(frozen=True)
class Disconnect(Effect):
    """Close every connection to `peer`; `reason` is for the log."""

    peer: PeerId
    reason: str


@dataclass(frozen=True)
class Ping(Effect):
    """Check that `peer` answers, within the runner's ping timeout."""

    peer: PeerId


Action: TypeAlias = Send | SetTimer | CancelTimer | Notify | Compute | Effect


class Machine(Protocol):
    """A sans-IO protocol state machine."""

    def step(self, now: float, event: Event) -> list[Action]:
        """Consume one event at time `now`; return the actions to carry out, in order.

        Raises `RemoteProtocolError` when the event is a peer's message that breaks the protocol (the driver drops
        it and goes on; the machine's state must be unchanged) and `LocalProtocolError` when the caller misused the
        machine.
        """
        ...


def settle(machine: Machine, now: float, event: Event) -> list[Action]:
    """Step `machine` with `event` and carry out every `Compute` at once, in place (its `Computed` is stepped at the
    same `now`): the actions left, in order. For in-process harnesses (tests, simulations) that run no worker
    thread; the compute then takes no time on the harness's clock."""
    actions: list[Action] = []
    for action in machine.step(now, event):
        if isinstance(action, Compute):
            actions.extend(settle(machine, now, Computed(action.key, action.work())))
        else:
            actions.append(action)
    return actions
