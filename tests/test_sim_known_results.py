"""A known result through the simulator: plain gossip averaging `x <- W x` (each peer replaces its vector by the
mean of its own and its neighbours', W = (I + A) / (d + 1) on a d-regular graph) shrinks the consensus distance by
the second largest eigenvalue modulus of W per round. So it converges much faster on a random 4-regular graph
than on a ring of the same size, and on the ring the measured rate matches the closed form
`(1 + 2 cos(2 pi / n)) / 3` within `RATE_TOLERANCE`.

The peers are small sans-IO machines on the event core (`sim.events.Simulator`) over the network model: each round
is messages through queued, latent links, so the test also checks that the core delivers every value of a round,
whatever the arrival order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from sim.events import EventLoop, Simulator
from sim.network import NetworkConfig, NetworkModel
from swarmgrad.core.machine import Action, Event, PeerId, Received, Send, TimerFired

NUM_PEERS = 32
DIM = 8
ROUNDS = 300
RATE_FROM, RATE_TO = 150, 300  # the measured window: by round 150 the ring's slowest mode dominates (the next one
# is smaller by (0.9495 / 0.9872) ** 150 ~ 0.3 %)
RATE_TOLERANCE = 0.002  # relative, on the per-round contraction factor (seed 1: 3e-8)
MAX_EVENTS = 200_000


@dataclass(frozen=True)
class Value:
    round: int
    vector: torch.Tensor


@dataclass
class Averager:
    """Round r: send its vector to every neighbour, wait for theirs of round r, then average (buffering early ones)."""

    name: PeerId
    neighbours: list[PeerId]
    vector: torch.Tensor
    rounds: int
    history: list[torch.Tensor] = field(default_factory=list)
    _inbox: dict[int, dict[PeerId, torch.Tensor]] = field(default_factory=dict)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, TimerFired):  # the start
            self.history.append(self.vector)
            return self._broadcast()
        assert isinstance(event, Received) and isinstance(event.msg, Value)
        self._inbox.setdefault(event.msg.round, {})[event.peer] = event.msg.vector
        actions: list[Action] = []
        while len(self.history) <= self.rounds and len(self._inbox.get(len(self.history) - 1, {})) == len(
            self.neighbours
        ):
            got = self._inbox.pop(len(self.history) - 1)
            self.vector = (self.vector + sum(got[p] for p in sorted(got))) / (len(self.neighbours) + 1)
            self.history.append(self.vector)
            if len(self.history) <= self.rounds:
                actions += self._broadcast()
        return actions

    def _broadcast(self) -> list[Action]:
        return [Send(p, Value(len(self.history) - 1, self.vector)) for p in self.neighbours]


def ring(n: int) -> dict[int, set[int]]:
    return {i: {(i - 1) % n, (i + 1) % n} for i in range(n)}


def random_regular(n: int, d: int, rng: random.Random) -> dict[int, set[int]]:
    """A random d-regular simple graph (d even): the union of d / 2 random Hamiltonian cycles, drawn again until
    no edge repeats."""
    for _ in range(1000):
        edges: set[tuple[int, int]] = set()
        for _cycle in range(d // 2):
            order = list(range(n))
            rng.shuffle(order)
            edges.update(tuple(sorted((order[i], order[(i + 1) % n]))) for i in range(n))  # type: ignore[misc]
        if len(edges) == n * d // 2:
            graph: dict[int, set[int]] = {i: set() for i in range(n)}
            for a, b in edges:
                graph[a].add(b)
                graph[b].add(a)
            return graph
    raise AssertionError("no simple d-regular graph drawn in 1000 tries")


def second_eigenvalue(graph: dict[int, set[int]]) -> float:
    n = len(graph)
    w = torch.eye(n, dtype=torch.float64)
    for i, others in graph.items():
        for j in others:
            w[i, j] = 1.0
    w /= w.sum(dim=1, keepdim=True)
    modulus = torch.linalg.eigvalsh(w).abs().sort(descending=True).values
    return float(modulus[1])


def consensus_distances(graph: dict[int, set[int]], seed: int) -> list[float]:
    """RMS distance of the peers' vectors to their mean, after each round of averaging through the simulator."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"p{i:02d}" for i in range(len(graph))]
    loop = EventLoop()
    network = NetworkModel(
        NetworkConfig(latency_s=0.02, latency_distribution="uniform", latency_spread=0.5, uplink_bytes_per_s=1e5),
        random.Random(seed),
    )
    sim = Simulator(loop, network, size_bytes=lambda msg: 8 * DIM + 16)
    machines = []
    for i, name in enumerate(names):
        vector = torch.randn(DIM, dtype=torch.float64, generator=gen)
        machines.append(Averager(name, sorted(names[j] for j in graph[i]), vector, ROUNDS))
        sim.add(name, machines[-1])
    for name in names:
        sim.step(name, TimerFired("start"))
    loop.run(max_events=MAX_EVENTS)
    assert all(len(m.history) == ROUNDS + 1 for m in machines), "every peer ran every round"
    distances = []
    for r in range(ROUNDS + 1):
        xs = torch.stack([m.history[r] for m in machines])
        distances.append(float((xs - xs.mean(dim=0)).pow(2).sum(dim=1).mean().sqrt()))
    return distances


def test_averaging_is_faster_on_a_random_regular_graph_and_the_ring_follows_its_spectral_gap() -> None:
    cycle = ring(NUM_PEERS)
    expander = random_regular(NUM_PEERS, 4, random.Random(7))
    on_ring = consensus_distances(cycle, seed=1)
    on_expander = consensus_distances(expander, seed=1)
    lambda_ring = (1 + 2 * math.cos(2 * math.pi / NUM_PEERS)) / 3
    assert second_eigenvalue(cycle) == pytest.approx(lambda_ring, rel=1e-9)
    print(f"\nsecond eigenvalues: expander {second_eigenvalue(expander):.4f}, ring {lambda_ring:.4f}")
    print(f"after 30 rounds: expander {on_expander[30] / on_expander[0]:.3g}, ring {on_ring[30] / on_ring[0]:.3g}")
    assert second_eigenvalue(expander) < 0.9 < lambda_ring  # a far larger spectral gap
    # after 30 rounds the expander is at least 100 times closer to consensus, relative to the start (seed 1: 315)
    assert on_expander[30] / on_expander[0] < 1e-2 * on_ring[30] / on_ring[0], (on_expander[30], on_ring[30])
    measured = (on_ring[RATE_TO] / on_ring[RATE_FROM]) ** (1 / (RATE_TO - RATE_FROM))
    print(f"\nring: measured rate {measured:.6f}, spectral {lambda_ring:.6f} ({measured / lambda_ring - 1:.1e})")
    assert abs(measured / lambda_ring - 1) < RATE_TOLERANCE, (measured, lambda_ring)
