"""A peer's persistent identity: one Ed25519 key pair in one file, the same peer id on every start.

The file holds the private key in libp2p's protobuf encoding (the format of `libp2p.identity_utils.save_identity`),
so other libp2p tools can read it. It is created on first use with mode 0600 (its directory with 0700), written to a
temporary file and linked into place so that a crash or a second process starting at the same moment never leaves a
half-written key. A key file that group or others may read or write is refused, never silently repaired: someone
else may already have copied it.

This module owns only the key file; it must not build hosts or touch the network.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as create_new_ed25519_key_pair
from libp2p.crypto.exceptions import CryptographyError
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from swarmgrad.core.errors import SwarmgradError

_KEY_FILE_MODE = 0o600
_KEY_DIR_MODE = 0o700


class IdentityError(SwarmgradError):
    """The identity file at `path` cannot be used; the message says why and how to fix it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"identity file {path}: {reason}")


def load_or_create_identity(path: Path) -> KeyPair:
    """Load the Ed25519 key pair stored at `path`, creating it (and its directory) on first use.

    Raises `IdentityError` naming the path when the file is readable or writable by group or others (the message
    gives the `chmod 600` that fixes it), when it does not hold an Ed25519 private key, or when it cannot be read.
    """
    try:
        return _load(path)
    except FileNotFoundError:
        pass
    _create(path)
    return _load(path)


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 peer id that `key_pair` gives a host."""
    return ID.from_pubkey(key_pair.public_key).to_base58()


def _load(path: Path) -> KeyPair:
    """Read the key at `path`. Raises `FileNotFoundError` when there is none, `IdentityError` when it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(path, f"cannot be opened ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityError(path, "is not a regular file")
        loose_bits = stat.S_IMODE(info.st_mode) & 0o077
        if loose_bits:
            raise IdentityError(
                path,
                f"mode {stat.S_IMODE(info.st_mode):04o} lets group or others read or write the private key; "
                f"fix it with `chmod 600 {path}` (and replace the key if others may have copied it)",
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read()
    finally:
        os.close(fd)
    try:
        private_key = deserialize_private_key(data)
    except (ProtobufDecodeError, CryptographyError, ValueError) as exc:
        raise IdentityError(
            path, f"is corrupt, not a libp2p private key ({exc}); move it away to make a new one"
        ) from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IdentityError(path, f"holds a {private_key.get_type().name} key; swarmgrad identities are Ed25519")
    return KeyPair(private_key, private_key.get_public_key())


def _create(path: Path) -> None:
    """Write a fresh key to `path` unless another process got there first (then its key wins)."""
    try:
        path.parent.mkdir(mode=_KEY_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(path, f"its directory cannot be created ({exc.strerror})") from exc
    key_pair = create_new_ed25519_key_pair()
    data = key_pair.private_key.serialize()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _KEY_FILE_MODE)
        try:
            os.fchmod(fd, _KEY_FILE_MODE)  # the umask may only remove bits, but be explicit
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # a concurrent start created it: load that one
    except OSError as exc:
        raise IdentityError(path, f"cannot be created ({exc.strerror})") from exc
    finally:
        tmp.unlink(missing_ok=True)


def public_key_of_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key a base58 peer id embeds (swarmgrad ids are identity multihashes of the
    key). Raises `ValueError` for text that is not such a peer id."""
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except (ValueError, ProtobufDecodeError) as exc:
        raise ValueError(f"{peer_id[:60]!r} is not a peer id: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{peer_id[:60]!r} does not embed an Ed25519 public key")
    return key.to_bytes()


def peer_id_of_public_key(raw: bytes) -> str:
    """The base58 peer id of a raw 32-byte Ed25519 public key (the inverse of `public_key_of_peer_id`)."""
    return ID.from_pubkey(Ed25519PublicKey.from_bytes(raw)).to_base58()


def signing_seed(key_pair: KeyPair) -> bytes:
    """The 32-byte Ed25519 private seed of an identity, for the consensus signer (the same key signs votes)."""
    private = key_pair.private_key
    if not isinstance(private, Ed25519PrivateKey):
        raise IdentityError(Path("?"), "swarmgrad identities are Ed25519")
    return bytes(private.impl)
