"""The body fetch: every chunk proven against the root, bad or silent peers skipped, verified chunks kept."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from consensus.body_fetch import BodyFailed, BodyFetch, BodyFetchConfig, BodyFetched, BodyPeerFailed, FetchBody
from consensus.chunk_exchange import ChunkExchange
from consensus.chunks import ChunkReply, ChunkRequest, serve
from consensus.merkle import CheckpointTree
from consensus.sample_fetch import FetchSample, HoldTree, SampleFetchConfig, SampleFetched
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import Action, Notify, PeerDown, Received, Send, SetTimer, TimerFired

SWARM = "lab"


@pytest.fixture(scope="module")
def tree() -> CheckpointTree:
    return CheckpointTree.from_state({"w": torch.randn(100_000, generator=torch.Generator().manual_seed(0))})


def _sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def _notes(actions: list[Action]) -> list[object]:
    return [a.event for a in actions if isinstance(a, Notify)]


def _serve_all(machine: BodyFetch, tree: CheckpointTree, actions: list[Action], now: float = 0.0) -> list[object]:
    """Answer every request from `tree` until the machine stops asking; the notifications it made."""
    notes = _notes(actions)
    pending = _sends(actions)
    while pending:
        send = pending.pop(0)
        out = machine.step(now, Received(send.peer, serve(send.msg, tree)))
        notes += _notes(out)
        pending += _sends(out)
    return notes


def test_a_body_is_fetched_in_batches_and_every_chunk_matches(tree: CheckpointTree) -> None:
    machine = BodyFetch(BodyFetchConfig(SWARM, batch_chunks=2))
    first = machine.step(0.0, FetchBody(3, tree.root, tree.chunk_count, ("a", "b")))
    request = _sends(first)[0].msg
    assert isinstance(request, ChunkRequest) and request.indices == (0, 1) and _sends(first)[0].peer == "a"
    assert SetTimer(("body-fetch", (3, tree.root)), 5.0) in first
    notes = _serve_all(machine, tree, first)
    assert notes == [BodyFetched(3, tree.root, tuple(tree.chunk(i) for i in range(tree.chunk_count)))]
    assert b"".join(notes[0].chunks) == bytes(tree.data)  # type: ignore[attr-defined]
    assert machine.in_flight == 0


def test_a_bad_proof_moves_on_to_the_next_peer_keeping_verified_chunks(tree: CheckpointTree) -> None:
    machine = BodyFetch(BodyFetchConfig(SWARM, batch_chunks=3))
    first = machine.step(0.0, FetchBody(1, tree.root, tree.chunk_count, ("liar", "honest")))
    good = serve(_sends(first)[0].msg, tree)
    second = machine.step(0.0, Received("liar", good))
    request = _sends(second)[0].msg
    assert request.indices == (3, 4, 5)
    honest_reply = serve(request, tree)
    assert isinstance(honest_reply, ChunkReply)
    forged = dataclasses.replace(honest_reply.chunks[0], chunk=b"\x00" * len(honest_reply.chunks[0].chunk))
    bad = dataclasses.replace(honest_reply, chunks=(forged, *honest_reply.chunks[1:]))
    third = machine.step(0.0, Received("liar", bad))
    assert _notes(third)[0] == BodyPeerFailed(1, tree.root, "liar", "chunk 3: proof does not lead to the root", True)
    moved = _sends(third)[0]
    assert moved.peer == "honest" and moved.msg.indices == (3, 4, 5)  # chunks 0-2 kept
    notes = _serve_all(machine, tree, third[1:])
    assert isinstance(notes[-1], BodyFetched)
    assert b"".join(notes[-1].chunks) == bytes(tree.data)


def test_silence_refusals_and_disconnects_exhaust_the_peers(tree: CheckpointTree) -> None:
    machine = BodyFetch(BodyFetchConfig(SWARM, timeout_s=1.0, attempts=2))
    other = CheckpointTree.from_state({"w": torch.zeros(10)})
    key = ("body-fetch", (1, tree.root))
    first = machine.step(0.0, FetchBody(1, tree.root, tree.chunk_count, ("silent", "refuser", "gone")))
    assert _sends(first)[0].peer == "silent"
    assert _sends(machine.step(1.0, TimerFired(key)))[0].peer == "silent"  # the retry
    moved = machine.step(2.0, TimerFired(key))
    assert _notes(moved)[0].peer == "silent" and _sends(moved)[0].peer == "refuser"
    refused = machine.step(2.5, Received("refuser", serve(_sends(moved)[0].msg, other)))
    assert "refused: unknown root" in _notes(refused)[0].reason and _sends(refused)[0].peer == "gone"
    last = machine.step(3.0, PeerDown("gone"))
    failed = _notes(last)[-1]
    assert isinstance(failed, BodyFailed) and [peer for peer, _ in failed.reasons] == ["silent", "refuser", "gone"]
    assert machine.in_flight == 0
    with pytest.raises(LocalProtocolError):
        machine.step(0.0, FetchBody(1, tree.root, 0, ("a",)))


def test_the_exchange_routes_answers_to_the_machine_that_asked(tree: CheckpointTree) -> None:
    exchange = ChunkExchange(SampleFetchConfig(SWARM), BodyFetchConfig(SWARM, batch_chunks=1))
    sample_request = ChunkRequest(SWARM, 1, tree.root, (2,))
    exchange.step(0.0, FetchSample("p", sample_request))
    body_send = _sends(exchange.step(0.0, FetchBody(1, tree.root, tree.chunk_count, ("p",))))[0]
    assert body_send.msg.indices == (0,)
    # the body's answer goes to the body fetch (it asks for chunk 1 next), the sample's to the sample fetch
    out = exchange.step(0.0, Received("p", serve(body_send.msg, tree)))
    assert _sends(out)[0].msg.indices == (1,)
    sample_answer = serve(sample_request, tree)
    assert _notes(exchange.step(0.0, Received("p", sample_answer))) == [
        SampleFetched("p", sample_request, sample_answer)
    ]
    # and it serves what it holds
    exchange.step(0.0, HoldTree(1, tree))
    served = _sends(exchange.step(0.0, Received("q", sample_request)))
    assert served == [Send("q", sample_answer)]
