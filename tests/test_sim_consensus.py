"""Epoch consensus inside the swarm simulation (`sim.consensus.SwarmConsensus`): the real `EpochAgreement` machines
decide one checkpoint per epoch over the simulated network, checked by real sampled chunks; a silent, poisoning or
equivocating member slows an epoch but never splits it, and the poisoner's checkpoint is never certified; the CLI
writes the per-epoch table and the commit latency figures."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from consensus.agreement import proposer_of
from sim.__main__ import main as sim_main
from sim.scenario import scenario_from_dict
from sim.swarm import SwarmRun
from swarmgrad.core.errors import ConfigError

BASE: dict[str, Any] = {
    "swarm": {"peers": 7, "rounds": 40},
    "model": {"dim": 1000, "local_steps": 2},
    "gossip": {"density": 0.05},
    "network": {"latency_s": 0.05, "uplink_bytes_per_s": 1.25e6},
    "consensus": {"epoch_rounds": 10},
}
LATENCY_S = 0.05


def run(seed: int = 0, **consensus: object) -> SwarmRun:
    swarm = SwarmRun(scenario_from_dict({**BASE, "consensus": {"epoch_rounds": 10, **consensus}}), seed)
    swarm.run()
    return swarm


def test_every_epoch_commits_with_every_honest_member_and_a_quorum_of_signers() -> None:
    swarm = run()
    assert swarm.consensus is not None
    rows = swarm.consensus.epoch_rows()
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # boundaries 10, 20, 30 of 40 rounds
    for row in rows:
        assert row["honest_decided"] == row["honest_members"] == 7
        assert row["signers"] == 5  # 2f + 1 of 7
        assert row["consensus_rounds"] == 1
        # propose, sample request and reply, prevote, precommit: 5 message delays of 50 ms, plus queueing
        assert 4 * LATENCY_S <= float(row["commit_latency_s"]) < 10 * LATENCY_S  # type: ignore[arg-type]
        assert int(row["consensus_bytes"]) > 0  # type: ignore[call-overload]
    chains = swarm.consensus.chains
    assert len({tuple(c.value.hash() for c in chain) for chain in chains.values()}) == 1  # one chain for all
    # each certified checkpoint is one member's own parameters at the boundary
    for cert in chains["p0"]:
        roots = {trees[cert.epoch].root for trees in swarm.consensus.checkpoints.values()}
        assert cert.value.checkpoint_root in roots
    assert swarm.consensus.stats["honest_checks_passed"] >= 3 * 6
    # the per-epoch columns count every send (a broadcast once per receiver): all the consensus traffic
    summary = swarm.consensus.summary()
    assert sum(int(r["consensus_bytes"]) for r in rows) == summary["bytes_sent"]  # type: ignore[call-overload]
    assert sum(int(r["consensus_messages"]) for r in rows) == summary["messages_sent"]  # type: ignore[call-overload]


def _byzantine_proposes_round_0(swarm: SwarmRun, peer: str) -> list[int]:
    """Epochs whose round-0 proposer is `peer`."""
    assert swarm.consensus is not None
    consensus = swarm.consensus
    key = consensus.signers[peer].public_key
    chain = consensus.chains["p0"]
    parents = [consensus.genesis_parent, *(c.value.hash() for c in chain)]
    return [
        e + 1
        for e, parent in enumerate(parents[: len(chain)])
        if proposer_of(consensus.members_of(e + 1), parent, 0) == key
    ]


@pytest.mark.parametrize("role", ["silent", "poison", "equivocate"])
def test_byzantine_members_slow_an_epoch_but_never_split_it(role: str) -> None:
    byzantine = ["p1", "p4"]  # f = 2 of 7
    slowed = []
    for seed in range(3):
        swarm = run(seed, byzantine_peers=byzantine, byzantine_role=role)
        assert swarm.consensus is not None
        consensus = swarm.consensus
        assert consensus.conflicting_certificates == 0
        rows = consensus.epoch_rows()
        assert all(r["honest_decided"] == 5 for r in rows), rows  # every honest member decides every epoch
        chain = consensus.chains["p0"]
        values = [c.value.hash() for c in chain]
        assert all([c.value.hash() for c in consensus.chains[p]] == values for p in consensus.honest)
        for cert in chain:
            for peer in byzantine:  # a poisoner's sign-flipped checkpoint never passes
                if role == "poison" and cert.epoch in consensus.checkpoints[peer]:
                    assert cert.value.checkpoint_root != consensus.checkpoints[peer][cert.epoch].root
        led = [epoch for peer in byzantine for epoch in _byzantine_proposes_round_0(swarm, peer)]
        for epoch in led:
            if role != "equivocate":  # an equivocator's round-0 proposals are valid: they may well win
                assert rows[epoch - 1]["consensus_rounds"] >= 2
        if role == "poison" and led:  # this seed's poisoned proposals were refused by the honest checks
            assert consensus.stats["honest_checks_refused"] > 0
        slowed.extend(led)
    assert slowed, f"no seed gave a {role} member round 0 of an epoch"


@pytest.mark.parametrize("role", ["silent", "poison"])
def test_members_that_never_vote_for_the_decided_value_leave_after_three_epochs(role: str) -> None:
    # the real EpochChain's rule (consensus.membership): a member no decided value attests for the last 3 epochs
    # is dropped; a poisoner's checks refuse every honest checkpoint, so it votes nil only and counts as absent
    swarm = SwarmRun(
        scenario_from_dict(
            {
                **BASE,
                "swarm": {"peers": 7, "rounds": 60},
                "consensus": {"epoch_rounds": 10, "byzantine_peers": ["p1", "p4"], "byzantine_role": role},
            }
        ),
        0,
    )
    swarm.run()
    assert swarm.consensus is not None
    rows = swarm.consensus.epoch_rows()
    # a dropped poisoner is live and runs the chain, so it asks to join again at once and epoch 5's value admits it
    # (it then has 3 epochs to attend); a silent one sends nothing, so it never asks
    rejoined = 7 if role == "poison" else 5
    assert [(r["members"], r["next_members"]) for r in rows] == [(7, 7), (7, 7), (7, 7), (7, 5), (5, rejoined)]
    assert all(r["honest_decided"] == 5 for r in rows)
    assert rows[-1]["signers"] == 4  # 2f + 1 of the 5 honest members left (f = 1)
    gone = {swarm.consensus.signers[p].public_key for p in ("p1", "p4")}
    assert not gone & set(swarm.consensus.members_of(5))
    assert swarm.consensus.summary()["final_members"] == rejoined


def test_cli_writes_the_epoch_table_and_commit_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = """
[swarm]
peers = 4
rounds = 14
[model]
dim = 200
[gossip]
density = 0.2
[network]
latency_s = 0.01
[compute]
step_time_s = 0.5
[consensus]
epoch_rounds = 5
byzantine_peers = ["p3"]
byzantine_role = "silent"
"""
    scenario = tmp_path / "c.toml"
    scenario.write_text(text)
    # 14 rounds (about 7 virtual s) leave epoch 2 (boundary round 10, about 5.1 s) time for a round 0 whose
    # proposer is the silent member: who that is follows from the value hashes, so from the message encoding
    for out in ("a", "b"):
        assert sim_main(["run", str(scenario), "--seed", "2", "--out", str(tmp_path / out)]) == 0
    assert "consensus: 2 of 2 epochs committed" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "a" / "epochs.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["honest_decided"] == "3" for r in rows)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    figures = summary["consensus"]
    assert figures["epochs_committed"] == 2 and figures["byzantine_members"] == {"p3": "silent"}
    latency = figures["commit_latency_s"]
    assert 0 < latency["median"] <= latency["max"] and math.isfinite(latency["mean"])
    assert summary["scenario"]["consensus"]["epoch_rounds"] == 5
    for name in ("epochs.csv", "summary.json", "rounds.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("consensus", "field"),
    [
        ({"epoch_rounds": -1}, "consensus.epoch_rounds"),
        ({"epoch_rounds": 5, "byzantine_role": "lying"}, "consensus.byzantine_role"),
        ({"epoch_rounds": 5, "members": 3, "byzantine_peers": ["p5"]}, "consensus.byzantine_peers"),
        ({"epoch_rounds": 5, "members": 9}, "consensus.members"),
        ({"epoch_rounds": 5, "vote_timeout_s": 0.0}, "consensus.vote_timeout_s"),
        ({"epoch_rounds": 5, "quorum": 3}, "consensus.quorum"),
    ],
)
def test_bad_consensus_sections_name_the_field(consensus: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        scenario_from_dict({**BASE, "consensus": consensus})
    assert caught.value.field == field
