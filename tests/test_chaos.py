"""Chaos, end to end: real `swarmgrad peer` processes on 127.0.0.1 train `digits` through a freeze, a crash and a
late joiner, and end on one swarm round, one epoch and the demo's target accuracy.

One run of 4 peers (the demo's `start_swarm`: a bootstrap peer and three that find the rest through the DHT):

1. once every peer trains with the other three live and the one to be killed has checkpointed an epoch, one peer
   is SIGSTOPped and, at the same moment, another is SIGKILLed and started again on its data directory (same peer
   id: it resumes from its checkpoint) and a fifth peer starts (it asks a neighbour for the model);
2. the frozen peer is continued `FREEZE_S` after its SIGSTOP;
3. once all five have trained `SETTLE_ROUNDS` swarm rounds together (each with at least 3 of the 4 others live),
   every peer is sent SIGTERM in the middle of an epoch, finishes the round it is in, saves and exits 0.

Then every peer's final round lies within `ROUND_BOUND` of every other's, every peer's last `epoch` event names
the same epoch (that of its final round), and every final test accuracy reaches the demo's target.

The bound follows from the round clock of `gossip.round` (module docstring) with five live peers, so f = 1: a peer
never numbers a round more than `max_future_rounds` (M = 4) past the clock of every other live peer (it holds,
running no round, instead), and a peer behind takes the second-largest clock it has heard at its next round start.
So at any instant the peers' rounds lie within M + 1 (M, plus the round a peer is finishing as the others move
on). The SIGTERMs land a few milliseconds apart and each peer finishes the round it is in, one more:
`ROUND_BOUND` = M + 2 = 6. Without the common round clock the frozen peer would end hundreds of rounds behind (it
ran no round while stopped), the restarted one at its checkpoint's count and the late one at the round it fetched.

It also checks what the first end-to-end test used to: the bootstrap peer, with no checkpoint and nobody to fetch
from, says it starts from the initial model; every peer sends fewer bytes than dense exchange would; a peer stopped
by SIGTERM saves a checkpoint. 1.5-2 minutes on 2 cores with little else running (2-6 minutes on a loaded one),
most of it the two waves of interpreter start-up (torch and libp2p imports) that a restart and a late joiner need.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gossip.round import GossipConfig
from swarmgrad.demo import BOOTSTRAP_RETRY_S, DEFAULT_TARGET, START_TIMEOUT_S, PeerProcess, peer_args, start_swarm
from swarmgrad.procs import ChildFailed, Event

pytestmark = pytest.mark.slow

SWARM = "chaos"
EPOCH_ROUNDS = 30
FREEZE_S = 10.0
SETTLE_ROUNDS = 60  # swarm rounds all five train together before the stop, for the held-out accuracy to settle
ROUND_BOUND = GossipConfig.max_future_rounds + 2
START_S = 150.0  # interpreter start + torch/libp2p imports, several processes on 2 busy cores
STEP_S = 120.0  # ceiling for any one awaited event once a peer trains: only a hang exceeds it
SETTINGS = ["--set", f"training.epoch_rounds={EPOCH_ROUNDS}"]
JOIN = [  # as start_swarm's joiners: keep dialling the bootstrap peer while it starts
    "--set",
    f"network.bootstrap_attempts={int(START_TIMEOUT_S / BOOTSTRAP_RETRY_S)}",
    "--set",
    f"network.bootstrap_retry_s={BOOTSTRAP_RETRY_S}",
]


def reached(round_: int, peers: int = 0) -> Callable[[Event], bool]:
    """A `read_until` filter: a round event at or past `round_`, with at least `peers` live peers."""
    return lambda event: bool(event["round"] >= round_ and event["peers"] >= peers)


def mid_epoch(event: Event) -> bool:
    """A `read_until` filter: a round event a fifth to a half into its epoch, so that peers within `ROUND_BOUND` of
    it, allowing for some rounds between this event and the signals, are all in the same epoch."""
    return bool(EPOCH_ROUNDS // 5 <= event["round"] % EPOCH_ROUNDS <= EPOCH_ROUNDS // 2)


def latest(peer: PeerProcess, kind: str) -> Event:
    """The latest event of `kind` that `peer` printed so far, read or not."""
    events = [e for e in peer.snapshot() if e["event"] == kind]
    if not events:
        raise ChildFailed(f"{peer.name} printed no {kind!r} event; {peer.tail()}")
    return events[-1]


def joiner(tmp_path: Path, name: str, data_dir: str, bootstrap: str, founders: list[str]) -> PeerProcess:
    """A peer that joins the swarm through `bootstrap`, on the data directory `data_dir` (a killed peer's: it
    restarts), with the swarm's founders (its chain's genesis must be the swarm's)."""
    extra = [*JOIN, *SETTINGS, "--founders", ",".join(founders)]
    args = peer_args(tmp_path / data_dir, swarm_id=SWARM, rounds=0, bootstrap=bootstrap, extra=extra)
    return PeerProcess(name, args, tmp_path / f"{name}.log")


def test_a_frozen_a_killed_and_a_late_peer_end_on_one_round_one_epoch_and_the_target(tmp_path: Path) -> None:
    started = time.monotonic()
    peers, address = start_swarm(
        tmp_path, 4, swarm_id=SWARM, rounds=0, extra=["--set", "network.min_peers=3", *SETTINGS]
    )
    frozen, victim = peers[2], peers[3]
    try:
        for peer in peers:
            peer.read_until("round", START_S, reached(0, peers=3))
        # the bootstrap peer had no checkpoint and nobody to fetch from: it says it starts from the initial model
        assert [(e["source"], e["round"]) for e in peers[0].seen("model")] == [("initial", 0)]
        victim_id = victim.seen("listening")[0]["peer_id"]
        victim.read_until("epoch", STEP_S)  # it has a checkpoint to resume from

        # 1. freeze one, kill another and start it again, start a fifth
        frozen.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        victim.proc.kill()
        assert victim.wait(30.0) == -signal.SIGKILL
        founders = [peer.seen("listening")[0]["peer_id"] for peer in peers]
        restarted = joiner(tmp_path, "peer-3b", "peer-3", address, founders)
        peers.append(restarted)
        late = joiner(tmp_path, "peer-4", "peer-4", address, founders)
        peers.append(late)
        survivors = peers[:2]
        marks = {peer.name: latest(peer, "round")["round"] for peer in survivors}

        # 2. the freeze lasts FREEZE_S from the SIGSTOP: the scenario's own duration, not a synchronisation
        time.sleep(max(0.0, frozen_at + FREEZE_S - time.monotonic()))
        frozen.signal(signal.SIGCONT)
        frozen_s = time.monotonic() - frozen_at
        swarm_at_thaw = max(int(latest(peer, "round")["round"]) for peer in survivors)
        assert all(latest(peer, "round")["round"] > marks[peer.name] for peer in survivors), marks  # they went on

        assert restarted.read_until("listening", START_S)["peer_id"] == victim_id
        resumed = restarted.read_until("model", START_S)
        assert resumed["source"] == "checkpoint" and resumed["round"] >= EPOCH_ROUNDS, resumed
        # from a neighbour, or (when its one request fails: seen on a loaded box) the initial model; both must end
        # on the swarm's round and at the target
        joined = late.read_until("model", START_S)
        thawed = frozen.read_until("round", STEP_S, reached(swarm_at_thaw))

        # 3. all five together, then a stop in the middle of an epoch
        running = [*survivors, frozen, restarted, late]
        goal = max(int(latest(peer, "round")["round"]) for peer in survivors) + SETTLE_ROUNDS
        # each with all 4 others live: the restarted peer too (its survivors had forgotten it, and count it live
        # again as soon as it connects)
        for peer in running:
            peer.read_until("round", STEP_S, reached(goal, peers=4))
        stop_at = peers[0].read_until("round", STEP_S, mid_epoch)
        for peer in running:
            peer.signal(signal.SIGTERM)
        finished = {peer.name: peer.read_until("finished", STEP_S) for peer in running}
        assert {peer.name: peer.wait(30.0) for peer in running} == {peer.name: 0 for peer in running}
        rounds = {name: int(event["round"]) for name, event in finished.items()}
        epochs = {peer.name: int(latest(peer, "epoch")["epoch"]) for peer in running}
        accuracy = {name: round(float(event["value"]), 4) for name, event in finished.items()}
        print(
            f"chaos run {time.monotonic() - started:.0f} s: frozen {frozen_s:.1f} s, thawed at round"
            f" {thawed['round']} (swarm at {swarm_at_thaw}); resumed at {resumed['round']}, joined with the"
            f" {joined['source']} model of round {joined['round']}; stopped after round {stop_at['round']}"
        )
        print(f"final rounds {rounds}; last epochs {epochs}; test accuracy {accuracy}")

        assert max(rounds.values()) - min(rounds.values()) <= ROUND_BOUND, rounds
        assert len(set(epochs.values())) == 1, epochs
        assert all(epoch == rounds[name] // EPOCH_ROUNDS for name, epoch in epochs.items()), (epochs, rounds)
        assert all(value >= DEFAULT_TARGET for value in accuracy.values()), accuracy
        for name, event in finished.items():
            assert event["stopped_by_signal"] is True, (name, event)
            assert 0 < event["bytes_sent"] < event["dense_bytes_equivalent"], (name, event)
        assert sorted((tmp_path / "peer-4" / "checkpoints").glob("*.json")), "a peer stopped by SIGTERM saves"
    finally:
        frozen.signal(signal.SIGCONT)
        for peer in peers:
            peer.stop()
