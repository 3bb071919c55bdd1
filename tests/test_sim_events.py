"""`sim.events`: the heap's order, timers that are replaced or cancelled never fire, sends go through the network
model with real sizes, `Compute` runs in place after its virtual compute time, and bad messages are dropped."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from sim.events import EventLoop, Simulator
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Compute,
    Computed,
    Effect,
    Event,
    Notify,
    PeerId,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)


class FixedNetwork:
    def __init__(self, latency_s: float, lost: bool = False) -> None:
        self.latency_s = latency_s
        self.lost = lost

    def transmit(self, now: float, sender: PeerId, receiver: PeerId, size_bytes: int) -> list[float]:
        return [] if self.lost else [now + self.latency_s]


@dataclass
class Recorder:
    seen: list[tuple[float, object]] = field(default_factory=list)

    def step(self, now: float, event: Event) -> list[Action]:
        self.seen.append((now, event))
        if isinstance(event, Received) and event.msg == "bad":
            raise RemoteProtocolError(event.peer, "bad")
        return []


@dataclass
class Host:
    loop: EventLoop
    notes: list[tuple[float, PeerId, object]] = field(default_factory=list)
    compute_s: float = 0.0

    def notified(self, peer: PeerId, event: object) -> None:
        self.notes.append((self.loop.now, peer, event))

    def effect(self, peer: PeerId, effect: Effect) -> None:
        self.notes.append((self.loop.now, peer, effect))

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return self.compute_s


class Scripted:
    """Returns the given actions on its first step, records every event."""

    def __init__(self, actions: list[Action]) -> None:
        self.actions = actions
        self.seen: list[tuple[float, object]] = []

    def step(self, now: float, event: Event) -> list[Action]:
        self.seen.append((now, event))
        actions, self.actions = self.actions, []
        return actions


def test_same_instant_runs_in_scheduling_order() -> None:
    loop = EventLoop()
    order: list[str] = []
    for name in "cab":
        loop.at(1.0, lambda name=name: order.append(name))
    loop.at(0.5, lambda: order.append("first"))
    loop.run()
    assert order == ["first", "c", "a", "b"]
    assert loop.now == 1.0


def test_replaced_and_cancelled_timers_never_fire() -> None:
    loop = EventLoop()
    machine = Scripted([SetTimer("a", 1.0), SetTimer("a", 2.0), SetTimer("b", 1.5), CancelTimer("b")])
    sim = Simulator(loop, FixedNetwork(0.1), size_bytes=len)
    sim.add("p", machine)
    sim.step("p", TimerFired("start"))
    loop.run()
    assert machine.seen[1:] == [(2.0, TimerFired("a"))]


def test_send_arrives_after_latency_and_counts_bytes() -> None:
    loop = EventLoop()
    sender, receiver = Scripted([Send("q", "hello", deadline=1.0)]), Recorder()
    sim = Simulator(loop, FixedNetwork(0.25), size_bytes=len)
    sim.add("p", sender)
    sim.add("q", receiver)
    sim.step("p", TimerFired("go"))
    loop.run()
    assert receiver.seen == [(0.25, Received("p", "hello"))]
    assert sim.bytes_sent["p"] == 5


def test_one_message_sent_to_several_peers_is_measured_once_and_counted_for_each() -> None:
    loop = EventLoop()
    measured: list[object] = []

    def size_bytes(msg: object) -> int:
        measured.append(msg)
        return len(str(msg))

    hello, other = "hello", "other!"
    sends = [Send("q", hello, 1.0), Send("r", hello, 1.0), Send("q", other, 1.0), Send("r", hello, 1.0)]
    sim = Simulator(loop, FixedNetwork(0.25), size_bytes=size_bytes)
    sim.add("p", Scripted(sends))
    sim.add("q", Recorder())
    sim.add("r", Recorder())
    sim.step("p", TimerFired("go"))
    assert measured == [hello, other, hello]  # a repeat in a row is not measured again
    assert sim.bytes_sent["p"] == 5 + 5 + 6 + 5 and sim.counters["messages_sent"] == 4


def test_late_or_unreachable_send_fails_at_its_deadline() -> None:
    loop = EventLoop()
    sender = Scripted([Send("q", "slow", deadline=0.1), Send("gone", "x", deadline=0.2)])
    sim = Simulator(loop, FixedNetwork(0.5), size_bytes=len)
    sim.add("p", sender)
    sim.add("q", Recorder())
    sim.step("p", TimerFired("go"))
    loop.run()
    assert sender.seen[1:] == [(0.1, SendFailed("q", "deadline")), (0.2, SendFailed("gone", "unreachable"))]


def test_compute_runs_in_place_after_virtual_compute_time() -> None:
    loop = EventLoop()
    host = Host(loop, compute_s=0.75)
    machine = Scripted([Compute("k", lambda: 42), Notify("done")])
    sim = Simulator(loop, FixedNetwork(0.1), size_bytes=len, host=host)
    sim.add("p", machine)
    sim.step("p", TimerFired("go"))
    loop.run()
    assert host.notes == [(0.0, "p", "done")]
    ((when, event),) = machine.seen[1:]
    assert when == 0.75 and isinstance(event, Computed) and event.result == 42


def test_bad_message_is_dropped_and_counted() -> None:
    loop = EventLoop()
    sim = Simulator(loop, FixedNetwork(0.1), size_bytes=len)
    sim.add("p", Scripted([Send("q", "bad"), Send("q", "good")]))
    receiver = Recorder()
    sim.add("q", receiver)
    sim.step("p", TimerFired("go"))
    loop.run()
    assert [e for _, e in receiver.seen] == [Received("p", "bad"), Received("p", "good")]
    assert sim.rejected["q"] == 1


def test_removed_peer_gets_nothing() -> None:
    loop = EventLoop()
    sim = Simulator(loop, FixedNetwork(0.1), size_bytes=len)
    receiver = Scripted([SetTimer("t", 1.0)])
    sim.add("q", receiver)
    sim.step("q", TimerFired("go"))
    sim.add("p", Scripted([Send("q", "x")]))
    sim.step("p", TimerFired("go"))
    sim.remove("q")
    loop.run()
    assert receiver.seen == [(0.0, TimerFired("go"))]


def test_a_run_past_its_event_bound_fails_instead_of_hanging() -> None:
    import pytest

    from swarmgrad.core.errors import LocalProtocolError

    loop = EventLoop()

    def again() -> None:
        loop.at(loop.now + 1.0, again)

    loop.at(0.0, again)
    with pytest.raises(LocalProtocolError):
        loop.run(max_events=100)
    assert loop.events_run == 100


def test_rejections_are_told_with_sender_and_a_harness_can_send_for_a_peer() -> None:
    loop = EventLoop()
    told: list[tuple[PeerId, PeerId, str]] = []
    sim = Simulator(loop, FixedNetwork(0.1), size_bytes=len, on_rejected=lambda r, s, e: told.append((r, s, str(e))))
    receiver = Recorder()
    sim.add("q", receiver)
    sim.add("z", Recorder())  # a scripted peer: the harness sends on its behalf
    sim.send("z", Send("q", "bad"))
    sim.send("z", Send("q", "fine"))
    loop.run()
    assert [e for _, e in receiver.seen] == [Received("z", "bad"), Received("z", "fine")]
    assert [(r, s) for r, s, _ in told] == [("q", "z")] and "bad" in told[0][2]
    assert sim.bytes_sent["z"] == 7
