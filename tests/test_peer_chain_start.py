"""A peer's own chain file at start, through real `swarmgrad peer` processes (run side by side): a truncated tail is
cut back with a warning and the peer trains on (the whole certificates kept, the cut bytes kept aside); a flipped
byte, a genesis other than the swarm's (another swarm id, other founders) and a certificate of another swarm stop
the peer at start with exit status 1 and one error line naming the file, and the file is left as it was. And a
peer whose resumed checkpoint lies far from the newest certified body on disk adopts that body before training."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consensus.chain import FILE_HEADER_BYTES, RECORD_HEADER_BYTES
from consensus.membership import genesis_parent_hash
from consensus.merkle import CheckpointTree
from consensus.messages import PRECOMMIT, Attendance, Certificate, EpochValue, Signed, members_hash
from consensus.provenance import SCHEMA, ChainGenesis, append_certificate, create_chain, read_chain
from consensus.service import body_path, model_spec_hash
from consensus.signing import Signer
from p2p.identity import load_or_create_identity, signing_seed
from swarmgrad.demo import peer_args
from tests.consensus_helpers import SWARM, Members, attendance_of, certificate
from training.checkpoint import CheckpointMeta, CheckpointStore, canonical_model_hash
from training.tasks import load_task
from training.tasks.base import model_spec

pytestmark = pytest.mark.slow

START_S = 240.0  # five interpreters importing torch and libp2p at once on a busy 2-core box


def _founder(data_dir: Path) -> Members:
    """The peer of `data_dir` as the only founder (a peer with no bootstrap names itself): its own signer."""
    key_pair = load_or_create_identity(data_dir / "identity.key")
    return Members([Signer(Ed25519PrivateKey.from_private_bytes(signing_seed(key_pair)))])


def _chain(data_dir: Path, genesis: ChainGenesis, members: Members, epochs: int = 3) -> Path:
    path = data_dir / "consensus" / "chain"
    log = create_chain(path, genesis)
    parent = genesis.parent_hash
    attendance: tuple[Attendance, ...] = ()
    for epoch in range(1, epochs + 1):
        cert = certificate(epoch, parent, members, attendance=attendance)
        append_certificate(log, cert)
        parent, attendance = cert.value.hash(), attendance_of(cert)
    return path


def _far_from_its_chain(data_dir: Path, members: Members) -> dict[str, torch.Tensor]:
    """A data directory whose chain certifies the initial digits model at epoch 1 (its body kept beside the chain)
    while its own newest checkpoint (round 50) is that model sign-flipped, 2.0 away: a peer restarted from an old
    or broken state. Returns the certified state."""
    certified = dict(load_task("digits").build_model().state_dict())
    tree = CheckpointTree.from_state(certified)
    genesis = ChainGenesis(SWARM, members.keys)
    value = EpochValue(SWARM, 1, 50, tree.root, model_spec_hash(tree), members_hash(members.keys), genesis.parent_hash)
    vote = members.signers[0].vote(SWARM, 1, 0, PRECOMMIT, value.hash())
    log = create_chain(data_dir / "consensus" / "chain", genesis)
    append_certificate(log, Certificate(value, members.keys, 0, (Signed(vote.voter, vote.signature),)))
    body = body_path(data_dir / "consensus", 1, tree.root)
    body.parent.mkdir(parents=True, exist_ok=True)
    body.write_bytes(bytes(tree.data))
    far = {name: -t if t.is_floating_point() else t for name, t in certified.items()}
    store = CheckpointStore(data_dir / "checkpoints", keep=3, max_bytes=1 << 26)
    store.save(far, CheckpointMeta(50, 1, canonical_model_hash(far), "digits", "old"))
    return certified


def _start(data_dir: Path, swarm_id: str = SWARM, rounds: int = 3) -> subprocess.Popen[str]:
    args = peer_args(data_dir, swarm_id=swarm_id, rounds=rounds)
    command = [sys.executable, "-m", "swarmgrad.cli", "peer", "--json", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_damaged_or_foreign_chain_files_at_start(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("cut", "flipped", "swarm", "founders", "foreign")}
    own = {name: _founder(path) for name, path in dirs.items()}
    genesis = {name: ChainGenesis(SWARM, members.keys) for name, members in own.items()}
    paths = {name: _chain(path, genesis[name], own[name]) for name, path in dirs.items()}
    last = len(SCHEMA.encode(read_chain(paths["cut"])[1][-1])) + RECORD_HEADER_BYTES
    whole, kept = paths["cut"].read_bytes(), read_chain(paths["cut"])[1][:2]
    paths["cut"].write_bytes(whole[: len(whole) - last // 2])  # a crash while appending the last certificate
    flipped = bytearray(paths["flipped"].read_bytes())
    second = FILE_HEADER_BYTES + RECORD_HEADER_BYTES + len(SCHEMA.encode(genesis["flipped"]))
    flipped[second + RECORD_HEADER_BYTES + 7] ^= 0x01  # inside the first certificate's body
    paths["flipped"].write_bytes(bytes(flipped))
    others = Members.make(1, tag="someone-else")
    paths["founders"].unlink()
    _chain(dirs["founders"], ChainGenesis(SWARM, others.keys), others)  # a chain of a swarm founded by another
    paths["foreign"].unlink()
    log = create_chain(paths["foreign"], genesis["foreign"])
    first = certificate(1, genesis["foreign"].parent_hash, own["foreign"])
    stolen = dataclasses.replace(
        first,
        value=EpochValue(
            "other", *dataclasses.astuple(first.value)[1:6], genesis_parent_hash("other", own["foreign"].keys)
        ),
    )
    append_certificate(log, stolen)
    before = {name: path.read_bytes() for name, path in paths.items()}
    far = tmp_path / "far"
    certified = _far_from_its_chain(far, _founder(far))

    procs = {name: _start(path, swarm_id="lab2" if name == "swarm" else SWARM) for name, path in dirs.items()}
    procs["far"] = _start(far, rounds=53)  # resumes at round 50, trains 3 rounds
    try:
        results = {name: (proc.wait(START_S), *reversed(proc.communicate())) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()

    # divergence repair at start: the resumed state is 2.0 from the newest certified body, so it adopts that
    status, stderr, stdout = results["far"]
    assert status == 0, stderr
    assert "epoch 1: own parameters are 2 from the certified checkpoint (> tolerance 0.4): adopting it" in stderr
    (repaired,) = [e for e in map(json.loads, stdout.splitlines()) if e["event"] == "repaired"]
    assert repaired["at_start"] is True and repaired["epoch"] == 1 and repaired["distance"] == pytest.approx(2.0)
    store = CheckpointStore(far / "checkpoints", keep=3, max_bytes=1 << 26)
    final = store.latest(model_spec(load_task("digits").build_model()), task="digits")
    assert final is not None and final.meta.round == 53
    flat = torch.cat([t.flatten().float() for _, t in sorted(final.state.items())])
    start = torch.cat([t.flatten().float() for _, t in sorted(certified.items())])
    assert float((flat - start).norm() / start.norm()) < 0.4  # it trained on from the certified state

    status, stderr, _ = results["cut"]
    assert status == 0, stderr  # repaired, and it trained its 3 rounds
    assert "a truncated last record" in stderr and ".tail-" in stderr
    assert read_chain(paths["cut"])[1] == kept
    assert (paths["cut"].with_name(f"chain.tail-{len(whole) - last}")).read_bytes() == whole[
        len(whole) - last : len(whole) - last // 2
    ]
    expected = {
        "flipped": f"chain file {paths['flipped']}: at byte {second}: record 1: checksum does not match its bytes",
        "swarm": f"chain file {paths['swarm']}: record 0: the genesis record differs from the swarm's configured"
        " genesis: swarm_id is 'lab', expected 'lab2'",
        "founders": f"chain file {paths['founders']}: record 0: the genesis record differs from the swarm's"
        " configured genesis: members differ: 1 founders where 1 are expected (1 unknown",
        "foreign": f"chain file {paths['foreign']}: record 1: a certificate of swarm 'other' in the chain of 'lab'",
    }
    for name, line in expected.items():
        status, stderr, _ = results[name]
        assert status == 1, (name, stderr)
        assert f"swarmgrad peer: error: {line}" in stderr, (name, stderr)
        assert paths[name].read_bytes() == before[name], name  # nothing deleted, nothing repaired
