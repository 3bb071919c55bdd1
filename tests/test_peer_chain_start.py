"""A peer's own chain file at start, through real `swarmgrad peer` processes (run side by side): a truncated tail is
cut back with a warning and the peer trains on (the whole certificates kept, the cut bytes kept aside); a flipped
byte, a genesis other than the swarm's (another swarm id, other founders) and a certificate of another swarm stop
the peer at start with exit status 1 and one error line naming the file, and the file is left as it was."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from consensus.chain import FILE_HEADER_BYTES, RECORD_HEADER_BYTES
from consensus.membership import genesis_parent_hash
from consensus.messages import EpochValue
from consensus.provenance import SCHEMA, ChainGenesis, append_certificate, create_chain, read_chain
from consensus.signing import Signer
from p2p.identity import load_or_create_identity, signing_seed
from swarmgrad.demo import peer_args
from tests.consensus_helpers import SWARM, Members, certificate

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
    for epoch in range(1, epochs + 1):
        cert = certificate(epoch, parent, members)
        append_certificate(log, cert)
        parent = cert.value.hash()
    return path


def _start(data_dir: Path, swarm_id: str = SWARM) -> subprocess.Popen[str]:
    args = peer_args(data_dir, swarm_id=swarm_id, rounds=3)
    command = [sys.executable, "-m", "swarmgrad.cli", "peer", *args]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


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

    procs = {name: _start(path, swarm_id="lab2" if name == "swarm" else SWARM) for name, path in dirs.items()}
    try:
        results = {name: (proc.wait(START_S), proc.communicate()[1]) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()

    status, stderr = results["cut"]
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
        status, stderr = results[name]
        assert status == 1, (name, stderr)
        assert f"swarmgrad peer: error: {line}" in stderr, (name, stderr)
        assert paths[name].read_bytes() == before[name], name  # nothing deleted, nothing repaired
