"""A late joiner starts from the swarm's newest certified checkpoint, in real `swarmgrad peer` processes.

4 founders train digits (epochs of 48 rounds) and certify epochs; two of them serve joiners forged offers
(`consensus.test_forge_offers`): one a chain whose newest certificate carries an altered signature, one chunks of
another body under the certified root. They are the two a joiner asks first (it asks in peer id order). A fifth
peer, not a founder, then starts with an empty data directory: it must refuse both, logging one line each naming the
peer and the reason, adopt the newest certified epoch of the third founder, keep a chain file that `swarmgrad
verify-chain` accepts, and train on past its next epoch boundary.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consensus.provenance import read_chain
from p2p.identity import load_or_create_identity, peer_id_of, public_key_of_peer_id
from swarmgrad.demo import BOOTSTRAP_RETRY_S, START_TIMEOUT_S, PeerProcess, peer_args, start_swarm

pytestmark = pytest.mark.slow

# Epochs of ~3 s here, so that consensus (0.2-1.3 s an epoch on a busy 2-core box) keeps up with training. With
# epochs of 16 rounds (~1 s) it fell behind, epoch after epoch, until the proposer's own tree of the epoch being
# agreed had been evicted from the 4 trees its sample fetch holds; voters could no longer sample it and no epoch was
# certified after that (a limit of the peer when training outpaces consensus, not of the join).
EPOCH = ["--set", "training.epoch_rounds=48"]
WAIT_S = 180.0


def test_a_late_joiner_adopts_the_newest_certified_epoch_and_refuses_forged_offers(tmp_path: Path) -> None:
    ids = [peer_id_of(load_or_create_identity(tmp_path / f"peer-{i}" / "identity.key")) for i in range(4)]
    order = sorted(range(4), key=lambda i: ids[i])
    forged_chain, forged_body, honest = order[0], order[1], order[2]
    hostile = {
        forged_chain: ["--set", 'consensus.test_forge_offers="certificate"'],
        forged_body: ["--set", 'consensus.test_forge_offers="body"'],
    }
    founders, address = start_swarm(
        tmp_path, 4, swarm_id="join", rounds=0, extra=[*EPOCH, "--set", "network.min_peers=3"], extra_of=hostile
    )
    joiner: PeerProcess | None = None
    try:
        founders[0].read_until("certified", WAIT_S)
        for i in hostile:  # each hostile founder keeps a certified body, so it has an offer to forge
            founders[i].read_until("certified", WAIT_S)
        args = peer_args(tmp_path / "joiner", swarm_id="join", rounds=0, bootstrap=address)
        args += ["--founders", ",".join(ids), *EPOCH, "--set", "network.min_peers=4"]
        args += ["--set", f"network.bootstrap_attempts={int(START_TIMEOUT_S / BOOTSTRAP_RETRY_S)}"]
        args += ["--set", f"network.bootstrap_retry_s={BOOTSTRAP_RETRY_S}"]
        joiner = PeerProcess("joiner", args, tmp_path / "joiner.log")
        model = joiner.read_until("model", WAIT_S)
        assert model["source"] == "certified" and model["peer"] == ids[honest], joiner.tail()
        assert model["verified_from"] == "genesis" and model["epoch"] >= 1
        after = joiner.read_until("epoch", WAIT_S, lambda e: e["epoch"] > model["epoch"])  # it trains on
        assert after["round"] > model["round"]
        joiner.read_until("certified", WAIT_S, lambda e: e["epoch"] > model["epoch"])  # and follows the chain
        # it asks to vote: a value admits it, and the epochs after that have 5 voters, itself one of them
        admitted = joiner.read_until("certified", WAIT_S, lambda e: e["members"] == 5)
        # it takes part: the next values' attendance names it. Two epochs: a voter whose check is still running when
        # the other 4 of the 5 have decided never votes in that epoch (docs/consensus.md, "The silence rule"); a
        # loaded run once saw that in the joiner's first epoch, when it also waited for late votes it is not sent
        joiner.read_until("certified", WAIT_S, lambda e: e["epoch"] > admitted["epoch"] + 1)
    finally:
        if joiner is not None:
            assert joiner.stop() == 0, joiner.tail()
        for founder in founders:
            founder.stop()
    log = (tmp_path / "joiner" / "peer.log").read_text()
    assert f"refused the certified offer of {ids[forged_chain]}: chain does not verify: epoch " in log
    assert "forged or wrong signature of member" in log
    assert f"refused the certified offer of {ids[forged_body]}: body: chunk 0: proof does not lead to the root" in log
    assert log.count("refused the certified offer of") == 2
    assert f"adopted certified epoch {model['epoch']} (round {model['round']}, root " in log
    assert f"from {ids[honest]}, chain verified from genesis" in log
    chain = tmp_path / "joiner" / "consensus" / "chain"
    _, certificates = read_chain(chain)
    assert [c.epoch for c in certificates][: model["epoch"] + 1] == list(range(1, model["epoch"] + 2))
    assert certificates[model["epoch"] - 1].value.checkpoint_root.hex() == model["root"]
    key = public_key_of_peer_id(peer_id_of(load_or_create_identity(tmp_path / "joiner" / "identity.key")))
    admitting = next(c for c in certificates if key in c.next_members)
    assert admitting.value.joiner_keys == (key,) and admitting.epoch == admitted["epoch"] - 1
    assert any(key in c.value.attendees for c in certificates[admitted["epoch"] :])  # it votes
    assert "admits voters from epoch" in log
    verify = subprocess.run(
        [sys.executable, "-m", "swarmgrad.cli", "verify-chain", str(chain)], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
