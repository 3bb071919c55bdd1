"""The trio driver: runs one sans-IO machine, over one protocol of a `Transport` when it speaks one.

It owns the machine: a single task feeds it, one event at a time, from a bounded input channel (decoded messages,
timer expiries, peer events, commands), and carries out the actions it returns. Timers live in a heap on trio's
clock, so a test under `MockClock`/`autojump_clock` runs in virtual time. Sends go through one task and one bounded
queue per peer, so a slow or hung peer delays only its own messages and every send is bounded by its deadline.
`Compute` work runs in a worker thread (one at a time, in order; `run_compute` can be replaced, e.g. by a benchmark's
baseline that runs it on the event loop), and its `Computed` result is fed back like any other event, never dropped:
the event loop stays responsive while a round's top-k or aggregation runs. An `Effect` (dial, disconnect, ping) goes
to the `run_effect` the assembly supplies, in a task of its own; the event it returns is fed back the same way.
*Durable* effects are the exception: an effect the assembly's `run_durable` hook accepts (it returns True) is
carried out synchronously, inline, before the next action of the same list is executed. This is how a machine's
`Persist(state)` reaches disk (written, fsynced) before the `Send`s that follow it are even queued (consensus's
no-amnesia rule); the hook blocks the event loop for its duration, so it is for small writes only.
A machine with no wire protocol (membership) is driven with no transport.

Policy when a queue is full: the newest item is dropped and counted (`statistics()`), never blocking the network
reader or the machine. A `RemoteProtocolError` from the codec or the machine drops that message, is counted and
reported through `on_peer_error`, and the driver goes on; any other exception is a bug and propagates.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

import trio

from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import DecodeError, LocalProtocolError, RemoteProtocolError, TransportError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Compute,
    Computed,
    Effect,
    Event,
    Machine,
    Notify,
    PeerDown,
    PeerId,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)
from swarmgrad.core.transport import DEFAULT_MAX_MESSAGE_BYTES, Transport

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PeerErrorHook = Callable[[PeerId, str], None]
ComputeRunner = Callable[[Callable[[], object]], Awaitable[object]]
EffectRunner = Callable[[Effect], Awaitable[Event | None]]
DurableRunner = Callable[[Effect], bool]
"""Carries out an effect synchronously and returns True, or returns False to leave it to the `EffectRunner`."""


async def run_in_worker_thread(work: Callable[[], object]) -> object:
    """The default `ComputeRunner`: `work()` in one of trio's worker threads."""
    return await trio.to_thread.run_sync(work)


async def run_on_event_loop(work: Callable[[], object]) -> object:
    """A `ComputeRunner` that runs `work()` right here, blocking the event loop: for virtual-time runs (under
    `MockClock(autojump_threshold=0)` a worker thread lets the clock jump while it runs) and as the baseline of the
    event-loop lag benchmark."""
    return work()


class Driver:
    """Runs `machine`, over `transport` under `protocol` with messages encoded by `schema` (all three, or none for
    a machine without a wire protocol)."""

    def __init__(
        self,
        machine: Machine,
        transport: Transport | None = None,
        protocol: str | None = None,
        schema: Schema | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        input_queue_len: int = 256,
        send_queue_len: int = 16,
        notify_queue_len: int = 256,
        forward_peer_events: bool = False,
        on_peer_error: PeerErrorHook | None = None,
        run_compute: ComputeRunner = run_in_worker_thread,
        compute_queue_len: int = 16,
        run_effect: EffectRunner | None = None,
        run_durable: DurableRunner | None = None,
    ) -> None:
        wire = (transport is not None, protocol is not None, schema is not None)
        if any(wire) and not all(wire):
            raise LocalProtocolError("a driver takes a transport, a protocol and a schema, or none of them")
        if forward_peer_events and transport is None:
            raise LocalProtocolError("forward_peer_events needs a transport")
        self.machine = machine
        self.transport = transport
        self.protocol = protocol
        self.schema = schema
        self._inbox = (
            None
            if transport is None or protocol is None
            else transport.listen(protocol, max_message_bytes=max_message_bytes, queue_len=input_queue_len)
        )
        self._run_effect = run_effect
        self._run_durable = run_durable
        self._input_send, self._input_recv = trio.open_memory_channel[Event](input_queue_len)
        self._notify_send, self.notifications = trio.open_memory_channel[object](notify_queue_len)
        self._send_queue_len = send_queue_len
        self._senders: dict[PeerId, trio.MemorySendChannel[tuple[bytes, float | None]]] = {}
        self._forward_peer_events = forward_peer_events
        self._on_peer_error = on_peer_error
        self._run_compute = run_compute
        self._compute_queue_len = compute_queue_len
        self._compute_send, self._compute_recv = trio.open_memory_channel[Compute](compute_queue_len)
        self._timers: list[tuple[float, int, Hashable]] = []
        self._timer_seq: dict[Hashable, int] = {}
        self._seq = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._counters: Counter[str] = Counter()

    # ---- public -------------------------------------------------------------------------------------------------

    def submit(self, event: Event) -> bool:
        """Queue an event (usually a command) for the machine without blocking. Returns False, and counts it, when
        the input queue is full."""
        try:
            self._input_send.send_nowait(event)
        except trio.WouldBlock:
            self._counters["dropped_input"] += 1
            return False
        return True

    def statistics(self) -> dict[str, int]:
        """Counters: events stepped, messages sent and their payload bytes (`bytes_sent`; `bytes_received` for the
        messages read from the transport under this driver's protocol), drops per queue, remote errors, send
        failures."""
        return dict(self._counters)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._inbox is not None:
                nursery.start_soon(self._read_network)
            nursery.start_soon(self._compute)
            if self._forward_peer_events:
                nursery.start_soon(self._read_peer_events)
            task_status.started()
            await self._own_machine()

    # ---- tasks --------------------------------------------------------------------------------------------------

    async def _read_network(self) -> None:
        assert self._inbox is not None and self.schema is not None, "started only with a wire protocol"
        async for delivery in self._inbox:
            self._counters["bytes_received"] += len(delivery.payload)
            try:
                msg = self.schema.decode(delivery.payload)
            except DecodeError as exc:
                self._peer_error(RemoteProtocolError(delivery.peer, str(exc)))
                continue
            self.submit(Received(delivery.peer, msg))

    async def _read_peer_events(self) -> None:
        assert self.transport is not None, "checked at construction"
        async for event in self.transport.peer_events():
            self.submit(event)

    async def _compute(self) -> None:
        async for action in self._compute_recv:
            result = await self._run_compute(action.work)
            self._counters["computed"] += 1
            await self._input_send.send(Computed(action.key, result))  # waits for room: a result is never dropped

    async def _carry_out(self, effect: Effect) -> None:
        assert self._run_effect is not None, "checked when the effect was queued"
        outcome = await self._run_effect(effect)
        self._counters["effects"] += 1
        if outcome is not None:
            await self._input_send.send(outcome)  # waits for room: an outcome is never dropped

    async def _own_machine(self) -> None:
        while True:
            self._fire_due_timers()
            deadline = self._timers[0][0] if self._timers else math.inf
            with trio.move_on_at(deadline):
                event = await self._input_recv.receive()
                self._step(event)

    async def _send_to(self, peer: PeerId, queue: trio.MemoryReceiveChannel[tuple[bytes, float | None]]) -> None:
        async for payload, deadline in queue:
            reason = None
            assert self.transport is not None and self.protocol is not None, "a Send needs a wire protocol"
            with trio.move_on_at(math.inf if deadline is None else deadline) as scope:
                try:
                    await self.transport.send(peer, self.protocol, payload)
                except TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}"
            if scope.cancelled_caught:
                reason = "deadline passed before the message was sent"
            if reason is None:
                self._counters["sent"] += 1
                self._counters["bytes_sent"] += len(payload)
            else:
                self._counters["send_failed"] += 1
                self.submit(SendFailed(peer, reason))

    # ---- machine ------------------------------------------------------------------------------------------------

    def _fire_due_timers(self) -> None:
        while self._timers and self._timers[0][0] <= trio.current_time():
            _, seq, key = heapq.heappop(self._timers)
            if self._timer_seq.get(key) == seq:
                del self._timer_seq[key]
                self._step(TimerFired(key))

    def _step(self, event: Event) -> None:
        try:
            actions = self.machine.step(trio.current_time(), event)
        except RemoteProtocolError as exc:
            self._peer_error(exc)
            return
        self._counters["stepped"] += 1
        if isinstance(event, PeerDown):
            sender = self._senders.pop(event.peer, None)
            if sender is not None:
                sender.close()
        for action in actions:
            self._execute(action)

    def _execute(self, action: Action) -> None:
        if isinstance(action, Send):
            self._queue_send(action)
        elif isinstance(action, SetTimer):
            seq = next(self._seq)
            self._timer_seq[action.key] = seq
            heapq.heappush(self._timers, (action.deadline, seq, action.key))
        elif isinstance(action, CancelTimer):
            self._timer_seq.pop(action.key, None)
        elif isinstance(action, Compute):
            try:
                self._compute_send.send_nowait(action)
            except trio.WouldBlock:
                raise LocalProtocolError(
                    f"more than {self._compute_queue_len} computations queued: the machine must wait for its results"
                ) from None
        elif isinstance(action, Effect):
            if self._run_durable is not None and self._run_durable(action):
                self._counters["durable_effects"] += 1
                return
            if self._run_effect is None:
                raise LocalProtocolError(f"{type(action).__name__}: this driver was given no effect runner")
            assert self._nursery is not None, "actions run only inside run()"
            self._nursery.start_soon(self._carry_out, action)
        elif isinstance(action, Notify):
            try:
                self._notify_send.send_nowait(action.event)
            except trio.WouldBlock:
                self._counters["dropped_notify"] += 1
        else:
            raise TypeError(f"unknown action {action!r}")

    def _queue_send(self, action: Send) -> None:
        assert self._nursery is not None, "actions run only inside run()"
        if self.schema is None:
            raise LocalProtocolError(f"a Send to {action.peer}: this driver has no wire protocol")
        sender = self._senders.get(action.peer)
        if sender is None:
            sender, queue = trio.open_memory_channel[tuple[bytes, float | None]](self._send_queue_len)
            self._senders[action.peer] = sender
            self._nursery.start_soon(self._send_to, action.peer, queue)
        try:
            sender.send_nowait((self.schema.encode(action.msg), action.deadline))
        except trio.WouldBlock:
            self._counters["dropped_send"] += 1
            self.submit(SendFailed(action.peer, "send queue full"))

    def _peer_error(self, exc: RemoteProtocolError) -> None:
        self._counters["remote_errors"] += 1
        log.info("dropped a message: %s", exc)
        if self._on_peer_error is not None:
            self._on_peer_error(exc.peer, exc.reason)
