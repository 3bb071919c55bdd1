"""The trio service over the simulated transport: the `Averager` bridge for a synchronous training thread, the
deadline against a hung receiver (sends included), and scoring of misbehaving peers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import torch
import trio
import trio.testing

from gossip.messages import PROTOCOL, SCHEMA, SparseUpdate, model_fingerprint
from gossip.round import GossipConfig
from gossip.service import GossipService
from sim.transport import LinkModel, SimNetwork, SimTransport
from swarmgrad.core.driver import ComputeRunner, run_in_worker_thread, run_on_event_loop
from training.loop import Averager
from training.topk import pack_sparse

NUMEL = 5000
FP = model_fingerprint([(NUMEL,)])
DEADLINE_S = 2.0


def config(seed: int, **overrides: object) -> GossipConfig:
    values: dict[str, object] = {
        "swarm_id": "svc",
        "density": 0.02,
        "round_deadline_s": DEADLINE_S,
        "seed": seed,
        "neighbours_per_round": 2,
    }
    values.update(overrides)
    return GossipConfig(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def swarm(
    net: SimNetwork,
    names: list[str],
    nursery: trio.Nursery,
    on_error: object = None,
    run_compute: ComputeRunner = run_on_event_loop,  # virtual time: a worker thread would let the clock jump
) -> AsyncIterator[tuple[list[SimTransport], list[GossipService]]]:
    async with AsyncExitStack() as stack:
        transports = [await stack.enter_async_context(net.open_transport(n)) for n in names]
        for i, t in enumerate(transports):
            for other in names[i + 1 :]:
                await t.connect(other)
        services = [
            GossipService(t, config(i), NUMEL, FP, on_peer_error=on_error, run_compute=run_compute)  # type: ignore[arg-type]
            for i, t in enumerate(transports)
        ]
        for service in services:
            await nursery.start(service.run)
        yield transports, services


async def test_average_from_worker_threads_mixes_the_vectors() -> None:
    net = SimNetwork(seed=3, default_link=LinkModel(latency_s=0.001))
    async with (
        net.run(),
        trio.open_nursery() as nursery,
        swarm(net, ["a", "b", "c"], nursery, run_compute=run_in_worker_thread) as (_, services),
    ):
        starts = [torch.full((NUMEL,), float(i)) for i in range(3)]
        results: list[torch.Tensor] = [torch.empty(0)] * 3

        def train(i: int, averager: Averager) -> None:  # plain synchronous code, as in the training loop
            x = starts[i].clone()  # the averager takes the tensor it is given
            for _ in range(3):
                x = averager.average(x, 0).params
            results[i] = x

        with trio.fail_after(30):
            async with trio.open_nursery() as threads:
                for i, service in enumerate(services):
                    threads.start_soon(trio.to_thread.run_sync, train, i, service)
        for i, x in enumerate(results):
            assert x.shape == (NUMEL,)
            assert float((x - starts[i]).abs().max()) > 0, f"peer {i} never moved"
            assert float(x.min()) >= 0.0 and float(x.max()) <= 2.0  # convex combinations of the starts
        stats = services[0].statistics()
        assert stats["rounds"] == 3 and stats["bytes_sent"] > 0 and stats["neighbours_answered_per_round"] > 0
        nursery.cancel_scope.cancel()


async def test_bytes_sent_counts_gossip_alone_on_a_shared_transport(autojump_clock: trio.testing.MockClock) -> None:
    # a peer runs model fetch and consensus over the transport its gossip uses: their bytes are not gossip's
    net = SimNetwork(seed=3, default_link=LinkModel(latency_s=0.001))
    async with net.run(), trio.open_nursery() as nursery, swarm(net, ["a", "b"], nursery) as (transports, services):
        other = transports[1].listen("/other/1.0.0")
        await transports[0].send("b", "/other/1.0.0", bytes(10_000))
        assert len((await other.receive()).payload) == 10_000
        async with trio.open_nursery() as rounds:
            for service in services:
                rounds.start_soon(service.average_async, torch.randn(NUMEL))
        a, b = services[0].statistics(), services[1].statistics()
        assert a["driver_sent"] > 0 and 0 < a["bytes_sent"] < 10_000
        assert a["transport_bytes_out"] == a["bytes_sent"] + 10_000
        assert 0 < b["bytes_received"] <= b["transport_bytes_in"] - 10_000
        nursery.cancel_scope.cancel()


async def test_a_hung_receiver_costs_exactly_one_deadline(autojump_clock: trio.testing.MockClock) -> None:
    net = SimNetwork(seed=3)
    async with net.run(), trio.open_nursery() as nursery, swarm(net, ["a", "b"], nursery) as (_, services):
        net.freeze("b")  # b stops reading: a's send to it blocks, as to a SIGSTOPped process
        start = trio.current_time()
        x = torch.randn(NUMEL)
        out = (await services[0].average_async(x.clone())).params
        assert trio.current_time() - start == DEADLINE_S
        assert torch.equal(out, x)
        done = services[0].last_round
        assert done is not None and done.timed_out and done.missing == ("b",)
        for _ in range(100):  # the send task gives up at the same virtual instant: let it run (bounded)
            if services[0].statistics().get("driver_send_failed", 0):
                break
            await trio.lowlevel.checkpoint()
        assert services[0].statistics()["driver_send_failed"] == 1
        nursery.cancel_scope.cancel()


async def test_a_mismatched_update_scores_its_sender(autojump_clock: trio.testing.MockClock) -> None:
    reported: list[tuple[str, str]] = []
    both = trio.Event()

    def report(peer: str, reason: str) -> None:
        reported.append((peer, reason))
        if len(reported) == 2:
            both.set()

    net = SimNetwork(seed=3)
    async with (
        net.run(),
        trio.open_nursery() as nursery,
        swarm(net, ["a"], nursery, report) as (_, services),
        net.open_transport("mallory") as mallory,
    ):
        indices = torch.arange(0, NUMEL, 50)
        payload = pack_sparse(indices, torch.ones(indices.numel()), NUMEL)
        await mallory.send("a", PROTOCOL, SCHEMA.encode(SparseUpdate("other-swarm", 0, FP, False, payload, 0)))
        await mallory.send("a", PROTOCOL, b"garbage")
        with trio.fail_after(5):
            await both.wait()
        assert [p for p, _ in reported] == ["mallory", "mallory"]
        assert services[0].peer_errors["mallory"] == 2
        assert services[0].statistics()["remote_errors"] == 2
        nursery.cancel_scope.cancel()
