"""The gossip wire protocol: one message type, its schema, and the model-shape fingerprint. No I/O, no state.

A `SparseUpdate` carries what a peer tells one neighbour in one round: the *values* of its parameter vector at a
few coordinates (a top-k `SparsePayload`), tagged with the swarm id, the round number and a fingerprint of the
model's shape. The sender is not in the message: it is the transport's authenticated peer id (Noise on libp2p).
`reply=False` asks the receiver to answer with its own update for the same round (push-pull); `reply=True` is that
answer. `clock` is the sender's own round when it sent the message: equal to `round` in a request, and in a reply
the replier's round, which may differ from the requester's (a peer answers requests for other rounds too). The
round machine (`gossip.round`) decides what is stale, replayed or mismatched; this module only checks that each
field is well formed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from swarmgrad.core.codec import Schema
from swarmgrad.core.swarm_id import MAX_SWARM_ID_CHARS, SWARM_ID_RULE, is_valid_swarm_id
from training.topk import SparsePayload

PROTOCOL = "/swarmgrad/gossip/3.0.0"
"""2.0.0 added `clock`; 3.0.0 changed the pair coin that decides who may pick whom (`gossip.round.pair_coin`).
A peer of another version cannot negotiate this protocol, so the versions never mix."""
FINGERPRINT_BYTES = 16


@dataclass(frozen=True)
class SparseUpdate:
    """A peer's parameter values at a few coordinates, for one round of one swarm."""

    swarm_id: str
    round: int
    fingerprint: bytes
    reply: bool
    payload: SparsePayload
    clock: int

    def __post_init__(self) -> None:
        if not is_valid_swarm_id(self.swarm_id):
            raise ValueError(f"swarm_id must be {SWARM_ID_RULE}, got {self.swarm_id[: MAX_SWARM_ID_CHARS + 1]!r}")
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")
        if self.clock < 0:
            raise ValueError(f"clock must be >= 0, got {self.clock}")
        if not self.reply and self.clock != self.round:
            raise ValueError(f"a request's clock is its round ({self.round}), got {self.clock}")
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(self.fingerprint)}")


SCHEMA = Schema("gossip", {1: SparseUpdate})


def model_fingerprint(shapes: Sequence[Sequence[int]], dtype: str = "float32") -> bytes:
    """A 16-byte digest of the parameter shapes (in order) and dtype: peers with different models never mix."""
    text = dtype + ";" + ";".join(",".join(str(int(d)) for d in shape) for shape in shapes)
    return hashlib.sha256(text.encode()).digest()[:FINGERPRINT_BYTES]
