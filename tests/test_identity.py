"""The persistent identity file: same peer id across restarts, refused when exposed or corrupt."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from libp2p.crypto.secp256k1 import create_new_key_pair as create_new_secp256k1_key_pair

from p2p.identity import IdentityError, load_or_create_identity, peer_id_of


def test_first_use_creates_a_private_key_file_and_directory(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "nested" / "peer.key"
    key_pair = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert peer_id_of(key_pair).startswith("12D3KooW")  # an Ed25519 peer id
    assert [p.name for p in path.parent.iterdir()] == ["peer.key"], "no temporary file is left behind"


def test_restart_yields_the_same_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    first = peer_id_of(load_or_create_identity(path))
    content = path.read_bytes()
    for _ in range(3):
        assert peer_id_of(load_or_create_identity(path)) == first
    assert path.read_bytes() == content, "loading never rewrites the key"
    assert peer_id_of(load_or_create_identity(tmp_path / "other.key")) != first


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_key_open_to_group_or_others_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "peer.key"
    load_or_create_identity(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert f"{mode:04o}" in str(info.value)
    assert stat.S_IMODE(path.stat().st_mode) == mode, "the file is not silently repaired"


@pytest.mark.parametrize("content", [b"", b"not a key at all", bytes(64), b"\x08\x01\x12\x03abc"])
def test_a_corrupt_file_gives_an_error_naming_the_path(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "peer.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value)
    assert path.read_bytes() == content, "a corrupt key is never overwritten"


def test_a_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    path.write_bytes(create_new_secp256k1_key_pair().private_key.serialize())
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="Ed25519"):
        load_or_create_identity(path)


def test_a_directory_in_place_of_the_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    path.mkdir(mode=0o700)
    with pytest.raises(IdentityError) as info:
        load_or_create_identity(path)
    assert str(path) in str(info.value)


def test_a_peer_id_gives_back_its_public_key_and_the_signing_seed_signs_as_it(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey as Crypto

    from consensus.signing import Signer
    from p2p.identity import peer_id_of_public_key, public_key_of_peer_id, signing_seed

    key_pair = load_or_create_identity(tmp_path / "identity.key")
    peer_id = peer_id_of(key_pair)
    raw = public_key_of_peer_id(peer_id)
    assert len(raw) == 32 and peer_id_of_public_key(raw) == peer_id
    assert Signer(Crypto.from_private_bytes(signing_seed(key_pair))).public_key == raw  # votes sign as the peer id
    for bad in ("xyz", "0OIl", "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"):
        with pytest.raises(ValueError):
            public_key_of_peer_id(bad)
