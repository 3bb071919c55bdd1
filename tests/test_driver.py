"""The trio driver runs a machine in virtual time, survives misbehaving peers, and drops (and counts) on overflow."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import trio
import trio.testing

from sim.transport import SimNetwork
from swarmgrad.core.codec import Schema
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    Command,
    Compute,
    Computed,
    Effect,
    Event,
    Notify,
    Received,
    Send,
    SetTimer,
    TimerFired,
)


@dataclasses.dataclass(frozen=True)
class Hello:
    n: int


SCHEMA = Schema("toy", {1: Hello})
PROTOCOL = "/toy/1"


@dataclasses.dataclass(frozen=True)
class Arm(Command):
    key: str
    delay_s: float


class Toy:
    """Arms timers on command, greets on timer, echoes Hello n+1 until 3, rejects negative n as a remote error."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Arm):
            return [SetTimer(event.key, now + event.delay_s)]
        if isinstance(event, TimerFired):
            return [Notify(("fired", event.key, now)), Send(self.peer, Hello(0))]
        if isinstance(event, Received) and isinstance(event.msg, Hello):
            if event.msg.n < 0:
                raise RemoteProtocolError(event.peer, "negative n")
            actions: list[Action] = [Notify(("got", event.msg.n, now))]
            if event.msg.n < 3:
                actions.append(Send(event.peer, Hello(event.msg.n + 1)))
            return actions
        return []


async def test_timers_fire_at_their_virtual_time_and_messages_flow(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("a") as ta, net.open_transport("b") as tb, trio.open_nursery() as n:
        da, db = Driver(Toy("b"), ta, PROTOCOL, SCHEMA), Driver(Toy("a"), tb, PROTOCOL, SCHEMA)
        await n.start(da.run)
        await n.start(db.run)
        start = trio.current_time()
        da.submit(Arm("late", 5.0))
        da.submit(Arm("early", 2.0))
        assert await da.notifications.receive() == ("fired", "early", start + 2.0)
        assert await db.notifications.receive() == ("got", 0, start + 2.0)
        assert await da.notifications.receive() == ("got", 1, start + 2.0)
        assert await db.notifications.receive() == ("got", 2, start + 2.0)
        assert await da.notifications.receive() == ("got", 3, start + 2.0)
        assert await da.notifications.receive() == ("fired", "late", start + 5.0)
        n.cancel_scope.cancel()


async def test_the_driver_counts_the_payload_bytes_it_sends_and_reads(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("a") as ta, net.open_transport("b") as tb, trio.open_nursery() as n:
        da, db = Driver(Toy("b"), ta, PROTOCOL, SCHEMA), Driver(Toy("a"), tb, PROTOCOL, SCHEMA)
        await n.start(da.run)
        await n.start(db.run)
        da.submit(Arm("go", 1.0))
        while await da.notifications.receive() != ("got", 3, trio.current_time()):
            pass
        sizes = {n: len(SCHEMA.encode(Hello(n))) for n in range(4)}
        assert da.statistics()["bytes_sent"] == sizes[0] + sizes[2]  # a sends Hello 0 and 2, b sends 1 and 3
        assert db.statistics()["bytes_sent"] == sizes[1] + sizes[3]
        assert da.statistics()["bytes_received"] == db.statistics()["bytes_sent"]
        assert db.statistics()["bytes_received"] == da.statistics()["bytes_sent"]
        n.cancel_scope.cancel()


async def test_rearming_a_timer_replaces_it(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("a") as ta, net.open_transport("b"), trio.open_nursery() as n:
        driver = Driver(Toy("b"), ta, PROTOCOL, SCHEMA)
        await n.start(driver.run)
        start = trio.current_time()
        driver.submit(Arm("t", 1.0))
        driver.submit(Arm("t", 4.0))
        assert await driver.notifications.receive() == ("fired", "t", start + 4.0)
        with trio.move_on_after(100):
            extra = await driver.notifications.receive()
            raise AssertionError(f"timer fired twice: {extra}")
        n.cancel_scope.cancel()


async def test_remote_errors_and_garbage_do_not_stop_the_driver(autojump_clock: trio.testing.MockClock) -> None:
    reported: list[tuple[str, str]] = []
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("a") as ta, net.open_transport("b") as tb, trio.open_nursery() as n:
        driver = Driver(Toy("b"), ta, PROTOCOL, SCHEMA, on_peer_error=lambda p, r: reported.append((p, r)))
        await n.start(driver.run)
        await tb.send("a", PROTOCOL, SCHEMA.encode(Hello(-1)))
        await tb.send("a", PROTOCOL, b"\xff\xff garbage")
        await tb.send("a", PROTOCOL, SCHEMA.encode(Hello(3)))
        assert await driver.notifications.receive() == ("got", 3, trio.current_time())
        assert [peer for peer, _ in reported] == ["b", "b"]
        assert "negative n" in reported[0][1] and "unknown message tag" in reported[1][1]
        assert driver.statistics()["remote_errors"] == 2
        n.cancel_scope.cancel()


async def test_full_input_queue_drops_and_counts() -> None:
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("a") as ta:
        driver = Driver(Toy("b"), ta, PROTOCOL, SCHEMA, input_queue_len=2)
        accepted = [driver.submit(Arm(str(i), 1.0)) for i in range(5)]  # not running: nothing drains the queue
        assert accepted == [True, True, False, False, False]
        assert driver.statistics()["dropped_input"] == 3


@dataclasses.dataclass(frozen=True)
class Work(Command):
    key: str


class Worker:
    """Hands each `Work` out as a `Compute` that blocks until `release` is set; reports which thread ran it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Work):
            return [Compute(event.key, self._work)]
        if isinstance(event, Computed):
            return [Notify(("computed", event.key, event.result))]
        if isinstance(event, Arm):
            return [Notify(("armed", event.key))]
        return []

    def _work(self) -> object:
        if not self.release.wait(timeout=60):
            raise TimeoutError("never released")
        return threading.get_ident()


async def test_compute_runs_in_a_worker_thread_while_the_machine_goes_on() -> None:
    net = SimNetwork(seed=1)
    machine = Worker()
    async with net.run(), net.open_transport("a") as ta, trio.open_nursery() as n:
        driver = Driver(machine, ta, PROTOCOL, SCHEMA)
        await n.start(driver.run)
        driver.submit(Work("first"))
        driver.submit(Work("second"))
        driver.submit(Arm("meanwhile", 0.0))
        with trio.fail_after(30):  # a ceiling, not what is tested: the Arm is stepped while the work blocks
            assert await driver.notifications.receive() == ("armed", "meanwhile")
            machine.release.set()
            first = await driver.notifications.receive()
            second = await driver.notifications.receive()
        assert first[:2] == ("computed", "first") and second[:2] == ("computed", "second")  # in order
        assert first[2] != threading.get_ident() and second[2] != threading.get_ident()
        assert driver.statistics()["computed"] == 2
        n.cancel_scope.cancel()


@dataclasses.dataclass(frozen=True)
class Save(Effect):
    n: int


@dataclasses.dataclass(frozen=True)
class Ping2(Effect):
    n: int


class Saver:
    """On `Arm`, persists, sends, persists again and asks for a non-durable effect: the shape of `Persist` + votes."""

    def __init__(self, peer: str) -> None:
        self.peer = peer

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, Arm):
            return [Save(1), Send(self.peer, Hello(3)), Save(2), Ping2(3)]
        return []


async def test_durable_effects_run_inline_in_order_before_the_sends_after_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    order: list[object] = []
    net = SimNetwork(seed=1)

    def durable(effect: Effect) -> bool:
        if not isinstance(effect, Save):
            return False
        order.append((effect.n, trio.lowlevel.current_task() is driver_task[0], driver.statistics().get("sent", 0)))
        return True

    effect_ran = trio.Event()

    async def other(effect: Effect) -> None:
        order.append(("effect", effect))
        effect_ran.set()
        return None

    driver_task: list[object] = []
    async with net.run(), net.open_transport("a") as ta, net.open_transport("b") as tb, trio.open_nursery() as n:
        inbox = tb.listen(PROTOCOL)
        driver = Driver(Saver("b"), ta, PROTOCOL, SCHEMA, run_effect=other, run_durable=durable)
        await n.start(driver.run)
        driver_task.append(next(t for t in n.child_tasks if "run" in t.name))
        driver.submit(Arm("go", 0.0))
        delivery = await inbox.receive()
        assert SCHEMA.decode(delivery.payload) == Hello(3)
        with trio.fail_after(5):
            await effect_ran.wait()
        # both saves ran synchronously in the machine's own step, before the message left; Ping2 went to run_effect
        assert [entry[0] for entry in order] == [1, 2, "effect"]
        assert order[0][2] == 0 and order[1][2] == 0
        assert driver.statistics()["durable_effects"] == 2
        n.cancel_scope.cancel()


async def test_a_failing_durable_write_stops_the_sends_after_it(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=1)

    def durable(effect: Effect) -> bool:
        raise OSError("disk full")

    async with net.run(), net.open_transport("a") as ta, net.open_transport("b") as tb:
        inbox = tb.listen(PROTOCOL)
        driver = Driver(Saver("b"), ta, PROTOCOL, SCHEMA, run_durable=durable)
        driver.submit(Arm("go", 0.0))
        with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="disk full"), flatten_subgroups=True):
            await driver.run()
        with trio.move_on_after(5):
            got = await inbox.receive()
            raise AssertionError(f"a message left after the failed write: {got}")
