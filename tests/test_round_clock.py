"""The swarm-wide round clock of `gossip.round`, from arbitrary starts, in virtual time, deterministic per seed.

A small discrete-event loop (a heap of timed events, one `random.Random` per run: no trio, no wall clock) runs
`GossipRound` machines that start at chosen rounds, with per-message latency, a compute time between rounds, and
optionally Byzantine peers that claim huge clocks. For every scenario and seed it checks the bounds stated in the
module docstring of `gossip.round`:

* the honest peers end within `max_future_rounds` of each other (a common round), and got there quickly;
* no honest round waited its deadline (every neighbour was live and reachable, whatever round it was in);
* no honest peer ever numbered a round above what honest peers alone could reach (Byzantine clocks move nobody);
* honest peers never raised `RemoteProtocolError` against each other.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Hashable
from dataclasses import dataclass, field

import pytest
import torch

from gossip.messages import SparseUpdate, model_fingerprint
from gossip.round import GossipConfig, GossipRound, RoundCompleted, StartRound
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import Action, CancelTimer, Notify, PeerUp, Received, Send, SetTimer, TimerFired, settle
from training.topk import TopKSelector, pack_sparse

NUMEL = 32
SELECTOR = TopKSelector()
FP = model_fingerprint([(NUMEL,)])
DEADLINE_S = 1.0
COMPUTE_S = 0.05  # local steps between rounds
LATENCY_S = (0.002, 0.02)
MAX_FUTURE = 4
BYZANTINE_CLOCK = 10**9


@dataclass
class Honest:
    name: str
    machine: GossipRound
    params: torch.Tensor
    loop_round: int  # the training loop's round: where it started, then one past the last round it ran
    rounds: list[int] = field(default_factory=list)  # numbers of the rounds it ran
    timed_out_after: list[float] = field(default_factory=list)  # when rounds that waited their deadline started
    round_started_at: float = 0.0
    held: int = 0


class Run:
    """One virtual-time run: honest peers starting at `starts`, plus `byzantine` peers claiming huge clocks."""

    def __init__(self, starts: list[int], byzantine: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._cancelled: set[tuple[str, Hashable]] = set()
        self.errors: list[str] = []
        honest_names = [f"h{i}" for i in range(len(starts))]
        self.byzantine = [f"z{i}" for i in range(byzantine)]
        everyone = honest_names + self.byzantine
        cfg = GossipConfig(
            swarm_id="clock", density=0.25, round_deadline_s=DEADLINE_S, seed=seed, value_format="fp32",
            max_future_rounds=MAX_FUTURE,
        )  # fmt: skip
        self.peers: dict[str, Honest] = {}
        for name, start in zip(honest_names, starts, strict=True):
            machine = GossipRound(cfg, name, NUMEL, FP, random.Random(f"{seed}-{name}"), SELECTOR)
            for other in everyone:
                if other != name:
                    settle(machine, 0.0, PeerUp(other))
            params = torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))
            self.peers[name] = Honest(name, machine, params, loop_round=start)
            self._at(self.rng.uniform(0, COMPUTE_S), "start", name)
        for name in self.byzantine:
            self._at(self.rng.uniform(0, COMPUTE_S), "byzantine", name)

    def _at(self, when: float, kind: str, payload: object) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), kind, payload))

    def run(self, until_s: float) -> None:
        while self._queue and self._queue[0][0] <= until_s:
            self.now, _, kind, payload = heapq.heappop(self._queue)
            if kind == "start":
                peer = self.peers[str(payload)]
                peer.round_started_at = self.now
                self._carry_out(peer, settle(peer.machine, self.now, StartRound(peer.params, peer.loop_round)))
            elif kind == "timer":
                name, key = payload  # type: ignore[misc]
                if (name, key) in self._cancelled:
                    self._cancelled.discard((name, key))
                    continue
                peer = self.peers[name]
                self._carry_out(peer, settle(peer.machine, self.now, TimerFired(key)))
            elif kind == "deliver":
                sender, receiver, msg = payload  # type: ignore[misc]
                if receiver in self.peers:
                    self._deliver(sender, self.peers[receiver], msg)
                else:
                    self._byzantine_answer(receiver, sender, msg)
            elif kind == "byzantine":
                self._byzantine_request(str(payload))

    def _deliver(self, sender: str, peer: Honest, msg: SparseUpdate) -> None:
        try:
            actions = settle(peer.machine, self.now, Received(sender, msg))
        except RemoteProtocolError as exc:
            if sender in self.peers:
                self.errors.append(f"{peer.name} blamed honest {sender}: {exc}")
            return
        self._carry_out(peer, actions)

    def _carry_out(self, peer: Honest, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._at(self.now + self.rng.uniform(*LATENCY_S), "deliver", (peer.name, action.peer, action.msg))
            elif isinstance(action, SetTimer):
                self._at(action.deadline, "timer", (peer.name, action.key))
            elif isinstance(action, CancelTimer):
                self._cancelled.add((peer.name, action.key))
            elif isinstance(action, Notify) and isinstance(action.event, RoundCompleted):
                done = action.event
                peer.params = done.params
                if done.held:
                    peer.held += 1
                else:
                    peer.rounds.append(done.round)
                    peer.loop_round = max(peer.loop_round, done.round + 1)
                    if done.timed_out:
                        peer.timed_out_after.append(peer.round_started_at)
                self._at(self.now + COMPUTE_S * self.rng.uniform(0.8, 1.2), "start", peer.name)

    def _byzantine_update(self, round_: int, reply: bool, clock: int) -> SparseUpdate:
        indices = torch.arange(0, NUMEL, 4, dtype=torch.int64)
        payload = pack_sparse(indices, torch.full((indices.numel(),), 1e3), NUMEL, value_format="fp32")
        return SparseUpdate("clock", round_, FP, reply, payload, clock)

    def _byzantine_answer(self, byzantine: str, requester: str, msg: SparseUpdate) -> None:
        if not msg.reply:  # answer every request at once, claiming a huge clock
            reply = self._byzantine_update(msg.round, True, BYZANTINE_CLOCK + self.rng.randrange(1000))
            self._at(self.now + self.rng.uniform(*LATENCY_S), "deliver", (byzantine, requester, reply))

    def _byzantine_request(self, byzantine: str) -> None:
        """Requests for huge rounds (their clock is their round), to every honest peer, every compute period."""
        round_ = BYZANTINE_CLOCK + int(self.now / COMPUTE_S)
        for name in self.peers:
            self._at(self.now + self.rng.uniform(*LATENCY_S), "deliver", (byzantine, name, self._byzantine_update(
                round_, False, round_
            )))  # fmt: skip
        self._at(self.now + COMPUTE_S, "byzantine", byzantine)

    def clocks(self) -> list[int]:
        return [peer.machine.clock for peer in self.peers.values()]


SCENARIOS: dict[str, tuple[list[int], int]] = {
    # name: (honest start rounds, Byzantine peers)
    "three, one far ahead (the 2,400-round incident)": ([2400, 0, 2], 0),
    "four, one far ahead": ([200, 0, 1, 2], 0),
    "one ahead, two behind": ([10, 9, 8, 8], 0),
    "two behind": ([50, 50, 50, 48, 0], 0),
    "split halves": ([0, 0, 0, 300, 300, 300], 0),
    "spread": ([0, 37, 120, 5, 260, 80, 199], 0),
    "two Byzantine clocks among seven honest": ([0, 0, 30, 30, 60, 60, 90], 2),
}
SEEDS = range(3)
LONG_SEEDS = range(3, 40)
RUN_S = 20.0


def _max_honest_reach(starts: list[int], rounds_run: int) -> int:
    """The highest round honest peers alone could number: the top start plus every round any of them ran."""
    return max(starts) + rounds_run


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("seed", SEEDS)
def test_honest_peers_reach_a_common_round_without_waiting_deadlines(scenario: str, seed: int) -> None:
    _check(scenario, seed)


@pytest.mark.long
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("seed", LONG_SEEDS)
def test_honest_peers_reach_a_common_round_over_many_seeds(scenario: str, seed: int) -> None:
    _check(scenario, seed)


def _check(scenario: str, seed: int) -> None:
    starts, byzantine = SCENARIOS[scenario]
    run = Run(starts, byzantine, seed)
    run.run(RUN_S)
    assert run.errors == []
    clocks = run.clocks()
    assert max(clocks) - min(clocks) <= MAX_FUTURE, (scenario, clocks)
    peers = list(run.peers.values())
    # never a deadline waited: every neighbour was live and answered, whatever round it was in
    assert [p.timed_out_after for p in peers] == [[] for _ in peers], scenario
    # the swarm made progress: every honest peer ran rounds (holding is bounded)
    assert min(len(p.rounds) for p in peers) >= 50, [len(p.rounds) for p in peers]
    most_rounds = max(len(p.rounds) for p in peers)
    assert max(clocks) <= _max_honest_reach(starts, most_rounds), (clocks, starts)
    for peer in peers:
        assert peer.rounds == sorted(set(peer.rounds)), "a peer's rounds strictly increase"


def test_a_common_round_is_reached_within_a_few_rounds_when_f_plus_1_peers_lead() -> None:
    """Split halves of 3 (f = 1 of 6): the half behind hears 2 clocks of the half ahead and joins it at once."""
    for seed in SEEDS:
        run = Run([0, 0, 0, 300, 300, 300], 0, seed)
        run.run(2.0)
        clocks = run.clocks()
        assert min(clocks) >= 300 and max(clocks) - min(clocks) <= MAX_FUTURE, (seed, clocks)
