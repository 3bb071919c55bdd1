"""16 gossip peers in the simulated network (virtual time): consensus with and without error feedback, and the
attack suite (4 Byzantine peers: sign flip, ALIE, IPM, large noise, replay of stale rounds).

Every honest peer runs the real `GossipService` (driver + machine) over a `SimTransport`. A Byzantine peer runs no
machine: it reads the honest peers' current vectors (an omniscient adversary), answers every request and sends its
own requests to random peers, with crafted values. Figures printed with `-s` are the ones quoted in docs/gossip.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
import torch
import trio
import trio.testing

from gossip.messages import PROTOCOL, SCHEMA, SparseUpdate, model_fingerprint
from gossip.round import GossipConfig
from gossip.service import GossipService
from sim.transport import LinkModel, SimNetwork, SimTransport
from swarmgrad.core.driver import run_on_event_loop
from training.topk import pack_sparse, unpack_sparse

NUM_PEERS = 16
NUMEL = 2000
DENSITY = 0.01
FP = model_fingerprint([(NUMEL,)])
ROUND_DEADLINE_S = 1.0
# Measured (seed 1, 30 rounds): clipped deviation 1.08, 0.76, 1.14, 0.86; the plain mean 1.81, 0.75, 1.61, 34.7.
ROBUST_DEVIATION_BOUND = {"sign_flip": 1.25, "alie": 0.9, "ipm": 1.3, "noise": 1.0}

Attack = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(honest mean, honest std, round) -> the vector whose values a Byzantine peer sends."""


def initial_vectors(seed: int) -> list[torch.Tensor]:
    """Heterogeneous starts: a shared offset of mixed magnitudes plus each peer's own noise."""
    gen = torch.Generator().manual_seed(seed)
    offset = torch.randn(NUMEL, generator=gen) * torch.linspace(0.0, 4.0, NUMEL)
    return [offset + torch.randn(NUMEL, generator=gen) for _ in range(NUM_PEERS)]


@dataclass
class Outcome:
    spread: list[float]  # RMS distance of honest peers to their current mean, after each round (index 0: start)
    deviation: float  # max distance of an honest peer to the initial honest mean, over the initial spread
    drift: float  # distance of the final honest mean to the initial honest mean, over the initial spread
    remote_errors: dict[str, int]
    late_dropped: int


async def run_swarm(
    rounds: int,
    *,
    seed: int = 1,
    byzantine: int = 0,
    attack: Attack | None = None,
    replay: bool = False,
    **config: object,
) -> Outcome:
    honest = NUM_PEERS - byzantine
    names = [f"p{i:02d}" for i in range(NUM_PEERS)]
    starts = initial_vectors(seed)[:honest]
    state = {names[i]: starts[i].clone() for i in range(honest)}
    mean0 = torch.stack(starts).mean(0)
    spread0 = math.sqrt(sum(float((x - mean0).norm()) ** 2 for x in starts) / honest)
    spread = [spread0]
    round_done = [0] * (rounds + 1)
    next_round_started = trio.Event()
    errors: dict[str, int] = {}

    def scored(peer: str, reason: str) -> None:
        errors[peer] = errors.get(peer, 0) + 1

    net = SimNetwork(seed=seed, default_link=LinkModel(latency_s=0.01))
    async with net.run(), AsyncExitStack() as stack:
        transports: list[SimTransport] = [await stack.enter_async_context(net.open_transport(n)) for n in names]
        for i, t in enumerate(transports):
            for other in names[i + 1 :]:
                await t.connect(other)
        services = []
        for i in range(honest):
            options: dict[str, object] = {"swarm_id": "sim", "density": DENSITY, "seed": seed * 1000 + i}
            cfg = GossipConfig(round_deadline_s=ROUND_DEADLINE_S, **options, **config)  # type: ignore[arg-type]
            services.append(
                GossipService(transports[i], cfg, NUMEL, FP, on_peer_error=scored, run_compute=run_on_event_loop)
            )
        async with trio.open_nursery() as nursery:
            for service in services:
                await nursery.start(service.run)

            async def honest_peer(i: int) -> None:
                nonlocal next_round_started
                for r in range(rounds):
                    state[names[i]] = (await services[i].average_async(state[names[i]])).params
                    round_done[r + 1] += 1
                    if round_done[r + 1] == honest:
                        xs = torch.stack(list(state.values()))
                        spread.append(float((xs - xs.mean(0)).norm(dim=1).pow(2).mean().sqrt()))
                        next_round_started.set()
                        next_round_started = trio.Event()
                    else:
                        await next_round_started.wait()  # lockstep rounds, as training peers of equal speed

            for i in range(byzantine):
                assert attack is not None
                bad = ByzantinePeer(transports[honest + i], names[:honest], state, attack, replay)
                nursery.start_soon(bad.run)
            async with trio.open_nursery() as honest_nursery:
                for i in range(honest):
                    honest_nursery.start_soon(honest_peer, i)
            nursery.cancel_scope.cancel()
    deviation = max(float((x - mean0).norm()) for x in state.values()) / spread0
    late = sum(int(s.statistics().get("late_dropped", 0)) for s in services)
    drift = float((torch.stack(list(state.values())).mean(0) - mean0).norm()) / spread0
    return Outcome(spread, deviation, drift, errors, late)


class ByzantinePeer:
    """Floods: each new round it sends a request to every honest peer, on the k coordinates where its crafted
    vector is farthest from the honest mean, and it answers every request on the requester's coordinates. With
    `replay` it also resends, to the same peer, its update of two rounds before."""

    def __init__(
        self,
        transport: SimTransport,
        honest: list[str],
        state: dict[str, torch.Tensor],
        attack: Attack,
        replay: bool,
    ) -> None:
        self.transport = transport
        self.honest = honest
        self.state = state
        self.attack = attack
        self.replay = replay
        self.inbox = transport.listen(PROTOCOL)
        self.k = math.ceil(DENSITY * NUMEL)
        self.sent: dict[tuple[str, int], SparseUpdate] = {}

    async def send(self, peer: str, round_: int, reply: bool, indices: torch.Tensor | None) -> None:
        if (peer, round_) in self.sent:
            return
        xs = torch.stack(list(self.state.values()))
        mean = xs.mean(0)
        target = self.attack(mean, xs.std(0), round_)
        if indices is None:
            indices = torch.sort(torch.topk((target - mean).abs(), self.k).indices).values
        update = SparseUpdate("sim", round_, FP, reply, pack_sparse(indices, target[indices], NUMEL, "fp32"), round_)
        self.sent[(peer, round_)] = update
        with trio.move_on_after(ROUND_DEADLINE_S):
            await self.transport.send(peer, PROTOCOL, SCHEMA.encode(update))
            stale = self.sent.get((peer, round_ - 2))
            if self.replay and stale is not None:
                await self.transport.send(peer, PROTOCOL, SCHEMA.encode(stale))

    async def run(self) -> None:
        started: set[int] = set()
        async for delivery in self.inbox:
            msg = SCHEMA.decode(delivery.payload)
            assert isinstance(msg, SparseUpdate)
            if not msg.reply:
                indices, _ = unpack_sparse(msg.payload, NUMEL)
                await self.send(delivery.peer, msg.round, True, indices)
            if msg.round not in started:
                started.add(msg.round)
                for peer in self.honest:
                    await self.send(peer, msg.round, False, None)


def sign_flip(mean: torch.Tensor, std: torch.Tensor, round_: int) -> torch.Tensor:
    return -mean


def alie(mean: torch.Tensor, std: torch.Tensor, round_: int) -> torch.Tensor:
    """A little is enough (arXiv 1902.06156): stay within the honest spread, always on the same side."""
    return mean - 1.0 * std


def ipm(mean: torch.Tensor, std: torch.Tensor, round_: int) -> torch.Tensor:
    """Inner product manipulation (arXiv 1903.03936): a negative multiple of the honest mean."""
    return -0.5 * mean


def noise(mean: torch.Tensor, std: torch.Tensor, round_: int) -> torch.Tensor:
    return torch.randn(mean.shape, generator=torch.Generator().manual_seed(round_)) * 100.0


def honest_looking(mean: torch.Tensor, std: torch.Tensor, round_: int) -> torch.Tensor:
    return mean.clone()


async def test_consensus_distance_shrinks_geometrically_with_error_feedback_and_stalls_without(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rounds = 80
    # The plain mean isolates what compression does; the clipped default converges too, more slowly (attack tests).
    with_ef = (await run_swarm(rounds, error_feedback=True, aggregation="mean")).spread
    without = (await run_swarm(rounds, error_feedback=False, aggregation="mean")).spread
    ratio = [with_ef[r] / with_ef[0] for r in range(0, rounds + 1, 20)]
    print(f"\nspread / initial, every 20 rounds, error feedback: {[f'{x:.3f}' for x in ratio]}")
    print(f"without: {[f'{without[r] / without[0]:.3f}' for r in range(0, rounds + 1, 20)]}")
    # geometric: every 20-round block shrinks the spread by a similar factor, and it keeps shrinking
    factors = [ratio[i + 1] / ratio[i] for i in range(len(ratio) - 1)]
    assert all(f < 0.87 for f in factors), factors  # measured 0.82, 0.78, 0.80, 0.81
    assert ratio[-1] < 0.5
    assert without[-1] / without[0] > 0.95


ATTACK_ROUNDS = 30


@pytest.mark.parametrize("attack", [sign_flip, alie, ipm, noise])
async def test_attack_fails_the_plain_mean_but_not_the_clipped_default(
    autojump_clock: trio.testing.MockClock, attack: Attack
) -> None:
    plain = await run_swarm(ATTACK_ROUNDS, byzantine=4, attack=attack, aggregation="mean")
    robust = await run_swarm(ATTACK_ROUNDS, byzantine=4, attack=attack)
    print(
        f"\n{attack.__name__}: mean rule deviation {plain.deviation:.3f} drift {plain.drift:.3f} spread "
        f"{plain.spread[-1] / plain.spread[0]:.3f}; clipped deviation {robust.deviation:.3f} drift "
        f"{robust.drift:.3f} spread {robust.spread[-1] / robust.spread[0]:.3f}"
    )
    assert robust.deviation <= ROBUST_DEVIATION_BOUND[attack.__name__]
    if attack is not alie:  # ALIE stays inside the honest spread: it barely moves either rule (see docs/gossip.md)
        assert plain.deviation > 1.2 * robust.deviation
        assert plain.drift > 1.5 * robust.drift
    assert not plain.remote_errors and not robust.remote_errors  # crafted values are well formed


async def test_replayed_stale_rounds_are_rejected_and_score_only_the_replayers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = await run_swarm(ATTACK_ROUNDS, byzantine=4, attack=honest_looking, replay=True)
    assert set(out.remote_errors) == {f"p{i}" for i in range(12, 16)}
    assert sum(out.remote_errors.values()) > 100
    assert out.deviation < 1.0
