"""`GossipService`: runs the `GossipRound` machine over a `Transport` and hands a training loop an `Averager`.

This module owns the trio side of gossip only: a `Driver` for the machine, the peer feed (the transport's peer
events and/or an explicit `peer_up`/`peer_down` feed from a membership machine), and the bridge to a synchronous
training thread (`average`, the training loop's `Averager`, blocks that thread on `trio.from_thread.run`). It holds
no protocol logic -- rounds, deadlines, replay checks and aggregation live in `gossip.round` and `gossip.aggregate`
-- and no training logic.

Use it like this (the training loop stays plain torch code running in a worker thread):

    service = GossipService(transport, config, numel=flat.numel(), fingerprint=model_fingerprint(shapes))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await trio.to_thread.run_sync(train, service)   # train() calls service.average(flat) once per round
        nursery.cancel_scope.cancel()
"""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING

import torch
import trio

from gossip.messages import PROTOCOL, SCHEMA
from gossip.round import Compressor, GossipConfig, GossipRound, RoundCompleted, StartRound
from swarmgrad.core.driver import ComputeRunner, Driver, PeerErrorHook, run_in_worker_thread
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import PeerDown, PeerId, PeerUp
from swarmgrad.core.transport import Transport
from training.loop import Averaged
from training.topk import TopKSelector

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

# A SparseUpdate's body is the payload (at most 8 bytes per selected coordinate) plus a few hundred bytes of fields.
_MESSAGE_OVERHEAD_BYTES = 4096
_BYTES_PER_COORDINATE = 8


class GossipService:
    """Gossip averaging over `transport`, the training loop's `Averager`. Start `run` in a nursery, then call
    `average` (from a worker thread) or `average_async` (from trio), one round at a time. `compressor` defaults to
    the native top-k (`SWARMGRAD_TOPK_FALLBACK=reference` for the reference), loaded here; a round's tensor work
    runs through `run_compute` (a worker thread)."""

    def __init__(
        self,
        transport: Transport,
        config: GossipConfig,
        numel: int,
        fingerprint: bytes,
        *,
        follow_transport_peers: bool = True,
        on_peer_error: PeerErrorHook | None = None,
        compressor: Compressor | None = None,
        run_compute: ComputeRunner = run_in_worker_thread,
    ) -> None:
        self.config = config
        self.transport = transport
        if compressor is None:  # chosen and loaded here, before any round: never inside a machine step
            compressor = TopKSelector()
        self.machine = GossipRound(
            config, transport.local_peer, numel, fingerprint, random.Random(config.seed), compressor
        )
        self._follow_transport_peers = follow_transport_peers
        self._user_peer_error = on_peer_error
        self.peer_errors: Counter[PeerId] = Counter()
        self.contributions: Counter[PeerId] = Counter()
        """Rounds each neighbour's update was mixed into ours."""
        self.driver = Driver(
            self.machine,
            transport,
            PROTOCOL,
            SCHEMA,
            max_message_bytes=self.machine.k * _BYTES_PER_COORDINATE + _MESSAGE_OVERHEAD_BYTES,
            forward_peer_events=follow_transport_peers,
            on_peer_error=self._peer_error,
            run_compute=run_compute,
        )
        self._token: trio.lowlevel.TrioToken | None = None
        self._pending: tuple[trio.Event, list[RoundCompleted]] | None = None
        self._counters: Counter[str] = Counter()
        self.last_round: RoundCompleted | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the driver and collect round results until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.driver.run)
            if self._follow_transport_peers:
                for peer in self.transport.connected_peers():
                    self.driver.submit(PeerUp(peer))
            nursery.start_soon(self._collect)
            task_status.started()

    def peer_up(self, peer: PeerId) -> None:
        """Explicit membership feed (from the trio thread): `peer` may be chosen as a neighbour."""
        self.driver.submit(PeerUp(peer))

    def peer_down(self, peer: PeerId) -> None:
        """Explicit membership feed (from the trio thread): `peer` is no longer chosen, nor waited for."""
        self.driver.submit(PeerDown(peer))

    async def average_async(self, params: torch.Tensor, not_before: int = 0) -> Averaged:
        """One gossip round from trio: the averaged vector when the round completes (by its deadline), and the
        round's number (None when the machine held, or the round could not be started: the input queue was full).
        `params` is handed to the machine and comes back updated in place; the round is numbered at least
        `not_before` (see `StartRound`)."""
        if self._pending is not None:
            raise LocalProtocolError("average() is already running: one round at a time")
        done, holder = trio.Event(), list[RoundCompleted]()
        self._pending = (done, holder)
        try:
            if not self.driver.submit(StartRound(params, not_before)):
                self._counters["rounds_not_started"] += 1
                return Averaged(params, None)
            await done.wait()
        finally:
            self._pending = None
        completed = holder[0]
        return Averaged(completed.params, None if completed.held else completed.round)

    def average(self, params: torch.Tensor, not_before: int) -> Averaged:
        """`Averager.average`: call from a worker thread (e.g. under `trio.to_thread.run_sync`), never from trio."""
        if self._token is None:
            raise LocalProtocolError("GossipService.run() must be started before average()")
        return trio.from_thread.run(self.average_async, params, not_before, trio_token=self._token)

    def statistics(self) -> dict[str, float | int]:
        """The machine's, driver's (`driver_*`) and transport's (`transport_*`) counters. `bytes_sent` and
        `bytes_received` are gossip's own: the payloads of this service's messages. The transport's counters are
        everyone's on it: a peer shares one transport between gossip, model fetch and consensus."""
        stats: dict[str, float | int] = {}
        stats.update(self.machine.statistics())
        stats.update({f"driver_{k}": v for k, v in self.driver.statistics().items()})
        stats.update({f"transport_{k}": v for k, v in self.transport.statistics().items()})
        stats.update(self._counters)
        rounds = stats.get("rounds", 0)
        stats["remote_errors"] = sum(self.peer_errors.values())
        stats["bytes_sent"] = stats.get("driver_bytes_sent", 0)
        stats["bytes_received"] = stats.get("driver_bytes_received", 0)
        if rounds:
            stats["neighbours_answered_per_round"] = stats.get("neighbours_answered", 0) / rounds
        return stats

    async def _collect(self) -> None:
        async for event in self.driver.notifications:
            if not isinstance(event, RoundCompleted):
                continue
            self.last_round = event
            self.contributions.update(event.contributors)
            if self._pending is not None:
                done, holder = self._pending
                holder.append(event)
                done.set()

    def _peer_error(self, peer: PeerId, reason: str) -> None:
        self.peer_errors[peer] += 1
        if self._user_peer_error is not None:
            self._user_peer_error(peer, reason)
