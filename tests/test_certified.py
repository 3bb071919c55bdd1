"""Certified checkpoints in real peers: 4 `swarmgrad peer` processes train digits and agree on every epoch's
checkpoint, on one host (127.0.0.1) and across 4 network-namespace hosts.

Each run: epochs of 16 rounds, 160 rounds. Epochs 1-4 must be certified while training goes on; an epoch of 16
rounds lasts about 0.5 s here, less than a consensus round with a timeout, so the runs train on well past the
fourth boundary (a peer that finishes may exit before the epochs after it commit). Every peer's chain must hold
the same certified values for epochs 1-4, `swarmgrad verify-chain` must exit 0 on each, each certified body must be
kept beside the chain, and every peer must reach the demo's accuracy target.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consensus.agreement import proposer_of
from consensus.membership import genesis_members, genesis_parent_hash
from consensus.messages import quorum
from consensus.provenance import read_chain
from consensus.service import body_path
from p2p.identity import load_or_create_identity, peer_id_of, public_key_of_peer_id
from swarmgrad.demo import DEFAULT_TARGET, PeerProcess, peer_args, start_swarm
from swarmgrad.procs import Event
from testing.netns import bridged_hosts, unavailable_reason

pytestmark = pytest.mark.slow

ROUNDS = 160
EPOCH = ["--set", "training.epoch_rounds=16"]
CERTIFIED = 4
FINISH_S = 300.0


def _finish(peers: list[PeerProcess]) -> dict[str, list[Event]]:
    """Each peer's events up to its `finished` event (read in turn; every peer runs meanwhile), then its exit
    status, which must be 0."""
    events = {}
    for peer in peers:
        peer.read_until("finished", FINISH_S)
    for peer in peers:
        assert peer.wait(60.0) == 0, peer.tail()
        events[peer.name] = peer.snapshot()
    return events


def _check(
    data_dirs: dict[str, Path], events: dict[str, list[Event]], members: frozenset[int] = frozenset({4})
) -> None:
    values = {}
    for name, data_dir in data_dirs.items():
        finished = next(e for e in events[name] if e["event"] == "finished")
        assert finished["value"] >= DEFAULT_TARGET, (name, finished)
        chain = data_dir / "consensus" / "chain"
        _, certificates = read_chain(chain)
        assert [c.epoch for c in certificates][:CERTIFIED] == [1, 2, 3, 4], name
        values[name] = [c.value for c in certificates[:CERTIFIED]]
        for cert in certificates[:CERTIFIED]:
            assert body_path(data_dir / "consensus", cert.epoch, cert.value.checkpoint_root).stat().st_size > 0
        verify = subprocess.run(
            [sys.executable, "-m", "swarmgrad.cli", "verify-chain", str(chain)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr
        certified = [e for e in events[name] if e["event"] == "certified"]
        assert [e["epoch"] for e in certified][:CERTIFIED] == [1, 2, 3, 4]
        assert all(e["members"] in members and e["signers"] >= quorum(e["members"]) for e in certified), certified
    first = next(iter(values.values()))
    assert all(v == first for v in values.values()), "peers certified different checkpoints"


@pytest.mark.long  # 23-33 s: make test-long; the same across 4 network namespaces stays in make test
def test_four_local_peers_certify_every_epoch_with_the_same_chain(tmp_path: Path) -> None:
    extra = [*EPOCH, "--set", "network.min_peers=3"]
    peers, _ = start_swarm(tmp_path, 4, swarm_id="cert", rounds=ROUNDS, extra=extra)
    try:
        events = _finish(peers)
    finally:
        for peer in peers:
            peer.stop()
    # all 4 stay members: the always-slowest honest peer signs few certificates, but each next value attests its
    # late votes (docs/consensus.md, "Membership")
    _check({p.name: tmp_path / p.name for p in peers}, events)


def test_the_epoch_of_the_last_round_is_certified_before_the_peers_leave(tmp_path: Path) -> None:
    # 48 rounds, epochs of 16: epoch 3 ends at `max_rounds`; each peer stays (consensus.pending_epoch_wait_s) until
    # it is certified, where leaving at once left it uncertified everywhere
    extra = [*EPOCH, "--set", "network.min_peers=3"]
    peers, _ = start_swarm(tmp_path, 4, swarm_id="last", rounds=48, extra=extra)
    try:
        events = _finish(peers)
    finally:
        for peer in peers:
            peer.stop()
    for name, peer_events in events.items():
        _, certificates = read_chain(tmp_path / name / "consensus" / "chain")
        assert [c.epoch for c in certificates] == [1, 2, 3], name
        finished = next(e for e in peer_events if e["event"] == "finished")
        assert finished["epochs"] == 3, finished
        assert 0 < finished["consensus_bytes_sent"] < finished["bytes_sent"], finished
        assert 0 < finished["gossip_bytes_sent"] <= finished["bytes_sent"] - finished["consensus_bytes_sent"], finished


@pytest.mark.long  # 21 s of real processes; a poisoned proposal is refused in-process by test_consensus_service
def test_a_poisoning_proposer_is_refused_and_the_others_checkpoints_commit(tmp_path: Path) -> None:
    extra = [*EPOCH, "--set", "network.min_peers=3"]
    # the hostile peer is the one that proposes first in epoch 1 (the order follows from the genesis alone)
    ids = [peer_id_of(load_or_create_identity(tmp_path / f"peer-{i}" / "identity.key")) for i in range(4)]
    keys = [public_key_of_peer_id(i) for i in ids]
    members = genesis_members(keys)
    first = proposer_of(members, genesis_parent_hash("poison", members), 0)
    bad = keys.index(first)
    hostile = {bad: ["--set", "consensus.test_poison_proposals=true"]}
    peers, _ = start_swarm(tmp_path, 4, swarm_id="poison", rounds=ROUNDS, extra=extra, extra_of=hostile)
    try:
        events = _finish(peers)
    finally:
        for peer in peers:
            peer.stop()
    hostile_id = ids[bad]
    honest = {p.name: tmp_path / p.name for p in peers if p.name != f"peer-{bad}"}
    # honest peers: epochs 1-4 certified alike, verified, bodies kept, accuracy reached; the hostile member never
    # votes for a certified value (it refuses them all), so no value attests it, and after `drop_after_missed` (3)
    # epochs it is no longer a member: later epochs have 3 voters
    _check(honest, events, members=frozenset({3, 4}))
    for name in honest:
        certified = [e for e in events[name] if e["event"] == "certified"]
        assert all(e["proposer"] != hostile_id for e in certified), certified
    # it proposed epoch 1's round 0: every honest voter refused it, and a later round committed another checkpoint
    refused = f"refused the proposal of {hostile_id}"
    for name in honest:
        assert refused in (tmp_path / name / "peer.log").read_text(), name
        assert read_chain(tmp_path / name / "consensus" / "chain")[1][0].consensus_round >= 1
    # divergence repair: what it handed consensus lies 2.0 from each certified checkpoint, so it adopts them
    assert [e for e in events[f"peer-{bad}"] if e["event"] == "repaired"], events[f"peer-{bad}"][-10:]
    finished = next(e for e in events[f"peer-{bad}"] if e["event"] == "finished")
    assert finished["value"] >= DEFAULT_TARGET  # its own training is unaffected (it adopts honest checkpoints)


def test_four_hosts_certify_every_epoch_across_hosts(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    names = ["a", "b", "c", "d"]
    ids = [peer_id_of(load_or_create_identity(tmp_path / n / "identity.key")) for n in names]
    with bridged_hosts(4) as hosts:
        boot = f"/ip4/{hosts[0].ip}/tcp/7400/p2p/{ids[0]}"
        peers: list[PeerProcess] = []
        try:
            for index, (name, host) in enumerate(zip(names, hosts, strict=True)):
                args = peer_args(
                    tmp_path / name,
                    swarm_id="certhosts",
                    rounds=ROUNDS,
                    bootstrap=None if index == 0 else boot,
                    listen="/ip4/0.0.0.0/tcp/7400",
                    extra=[*EPOCH, "--founders", ",".join(ids), "--set", "network.min_peers=3"],
                )
                args += ["--set", "network.bootstrap_attempts=120", "--set", "network.bootstrap_retry_s=0.5"]
                peers.append(PeerProcess(name, args, tmp_path / f"{name}.log", host.wrap([])))
            events = _finish(peers)
        finally:
            for peer in peers:
                peer.stop()
    _check({n: tmp_path / n for n in names}, events)
