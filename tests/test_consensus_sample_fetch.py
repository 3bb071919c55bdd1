"""The chunk-fetch machine: exact actions for asking (deadline, retries, failure), answers, and serving."""

from __future__ import annotations

import pytest
import torch
import trio
import trio.testing

from consensus.chunks import (
    DEFAULT_SAMPLE_COUNT,
    MAX_MESSAGE_BYTES,
    PROTOCOL,
    SCHEMA,
    ChunkRefusal,
    ChunkReply,
    ChunkRequest,
    Refusal,
    UnsolicitedChunkReply,
    check_sample,
    sample_indices,
    serve,
)
from consensus.merkle import CheckpointTree
from consensus.sample_fetch import (
    FetchSample,
    HoldTree,
    ReleaseBelow,
    SampleFailed,
    SampleFetch,
    SampleFetchConfig,
    SampleFetched,
)
from sim.transport import SimNetwork
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import CancelTimer, Notify, PeerDown, Received, Send, SetTimer, TimerFired

SWARM = "lab"


def _tree(seed: int) -> CheckpointTree:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(60_000, generator=gen)
    return CheckpointTree.from_state({"w": base + 0.01 * torch.randn(60_000, generator=gen.manual_seed(seed))})


@pytest.fixture(scope="module")
def proposal() -> CheckpointTree:
    return _tree(1)


def _request(tree: CheckpointTree, epoch: int = 2) -> ChunkRequest:
    return ChunkRequest(SWARM, epoch, tree.root, sample_indices(b"sig", tree.chunk_count, DEFAULT_SAMPLE_COUNT))


def test_a_fetch_sends_with_a_deadline_and_its_answer_is_notified(proposal: CheckpointTree) -> None:
    voter = SampleFetch(SampleFetchConfig(SWARM, timeout_s=2.0))
    request = _request(proposal)
    timer = ("sample-fetch", ("prop", 2, proposal.root))
    assert voter.step(10.0, FetchSample("prop", request)) == [
        Send("prop", request, deadline=12.0),
        SetTimer(timer, 12.0),
    ]
    answer = serve(request, proposal)
    assert voter.step(10.5, Received("prop", answer)) == [
        CancelTimer(timer),
        Notify(SampleFetched("prop", request, answer)),
    ]
    assert voter.in_flight == 0
    assert voter.step(10.6, Received("prop", answer)) == []  # a duplicate (a retry crossed it): dropped, not blamed
    with pytest.raises(UnsolicitedChunkReply):
        voter.step(11.0, Received("other", answer))


def test_timeouts_retry_then_fail(proposal: CheckpointTree) -> None:
    voter = SampleFetch(SampleFetchConfig(SWARM, timeout_s=1.0, attempts=2))
    request = _request(proposal)
    timer = ("sample-fetch", ("prop", 2, proposal.root))
    voter.step(0.0, FetchSample("prop", request))
    assert voter.step(1.0, TimerFired(timer)) == [Send("prop", request, deadline=2.0), SetTimer(timer, 2.0)]
    assert voter.step(2.0, TimerFired(timer)) == [
        Notify(SampleFailed("prop", request, "no answer to 2 requests of 1.0 s each"))
    ]
    assert voter.step(3.0, TimerFired(timer)) == [] and voter.in_flight == 0
    with pytest.raises(UnsolicitedChunkReply):  # too late: the fetch was given up, the answer was never taken
        voter.step(3.5, Received("prop", serve(request, proposal)))


def test_peer_down_fails_only_that_peers_fetches(proposal: CheckpointTree) -> None:
    voter = SampleFetch(SampleFetchConfig(SWARM))
    one, two = _request(proposal, epoch=2), _request(proposal, epoch=3)
    voter.step(0.0, FetchSample("a", one))
    voter.step(0.0, FetchSample("a", two))
    voter.step(0.0, FetchSample("b", one))
    assert voter.step(0.1, PeerDown("a")) == [
        CancelTimer(("sample-fetch", ("a", 2, proposal.root))),
        Notify(SampleFailed("a", one, "peer disconnected")),
        CancelTimer(("sample-fetch", ("a", 3, proposal.root))),
        Notify(SampleFailed("a", two, "peer disconnected")),
    ]
    assert voter.in_flight == 1


def test_serving_held_trees_and_refusing_the_rest(proposal: CheckpointTree) -> None:
    server = SampleFetch(SampleFetchConfig(SWARM, max_held_trees=1))
    request = _request(proposal)
    [send] = server.step(0.0, Received("voter", request))
    assert isinstance(send, Send) and isinstance(send.msg, ChunkRefusal) and send.msg.code == Refusal.UNKNOWN_ROOT
    server.step(0.0, HoldTree(2, proposal))
    assert server.step(0.0, Received("voter", request)) == [Send("voter", serve(request, proposal))]
    other_swarm = ChunkRequest("other", 2, proposal.root, request.indices)
    [send] = server.step(0.0, Received("voter", other_swarm))
    assert isinstance(send, Send) and isinstance(send.msg, ChunkRefusal) and send.msg.swarm_id == "other"
    server.step(0.0, HoldTree(3, _tree(2)))
    server.step(0.0, HoldTree(4, _tree(3)))  # 3 held: none is released yet, none is evicted
    assert server.step(0.0, Received("voter", request)) == [Send("voter", serve(request, proposal))]
    server.step(0.0, ReleaseBelow(4))  # epochs 2 and 3 released: 1 kept of them, the oldest (2) goes
    [send] = server.step(0.0, Received("voter", request))
    assert isinstance(send, Send) and isinstance(send.msg, ChunkRefusal)
    for epoch in range(5, 9):  # undecided epochs are held however many training runs ahead
        server.step(0.0, HoldTree(epoch, _tree(epoch)))
    assert len(server._held) == 6  # epoch 3 (released, kept), 4 (newest certified) and 5-8
    with pytest.raises(RemoteProtocolError, match="unexpected message"):
        server.step(0.0, Received("voter", "hello"))


def test_a_voter_and_a_proposer_machine_end_to_end(proposal: CheckpointTree) -> None:
    proposer, voter = SampleFetch(SampleFetchConfig(SWARM)), SampleFetch(SampleFetchConfig(SWARM))
    proposer.step(0.0, HoldTree(2, proposal))
    own = _tree(2)  # the voter's own, slightly different parameters at the same boundary
    request = ChunkRequest(SWARM, 2, proposal.root, sample_indices(b"voter sig", proposal.chunk_count, 3))
    [ask, _] = voter.step(0.0, FetchSample("prop", request))
    assert isinstance(ask, Send)
    [answer] = proposer.step(0.01, Received("voter", ask.msg))
    assert isinstance(answer, Send) and isinstance(answer.msg, ChunkReply)
    [_, notify] = voter.step(0.02, Received("prop", answer.msg))
    assert isinstance(notify, Notify) and isinstance(notify.event, SampleFetched)
    fetched = notify.event
    assert check_sample(proposal.root, proposal.chunk_count, request.indices, fetched.answer, own) is None


def test_config_and_commands_are_checked(proposal: CheckpointTree) -> None:
    with pytest.raises(ConfigError):
        SampleFetchConfig("Not A Swarm")
    for kwargs in ({"timeout_s": 0.0}, {"attempts": 0}, {"max_held_trees": 0}):
        with pytest.raises(LocalProtocolError):
            SampleFetchConfig(SWARM, **kwargs)  # type: ignore[arg-type]
    voter = SampleFetch(SampleFetchConfig(SWARM))
    voter.step(0.0, FetchSample("prop", _request(proposal)))
    with pytest.raises(LocalProtocolError, match="already asked"):
        voter.step(0.0, FetchSample("prop", _request(proposal)))
    with pytest.raises(LocalProtocolError, match="swarm"):
        voter.step(0.0, FetchSample("prop", ChunkRequest("other", 1, proposal.root, (0,))))


async def test_a_sample_travels_through_two_drivers(autojump_clock: trio.testing.MockClock) -> None:
    """The machines on the trio driver over the in-memory transport: the codec, the message limit and the
    notification path carry a real sample end to end."""
    proposal, own = _tree(1), _tree(2)
    request = ChunkRequest(SWARM, 2, proposal.root, sample_indices(b"sig", proposal.chunk_count, 4))
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("prop") as tp, net.open_transport("voter") as tv:
        async with trio.open_nursery() as nursery:
            drivers = [
                Driver(SampleFetch(SampleFetchConfig(SWARM)), t, PROTOCOL, SCHEMA, max_message_bytes=MAX_MESSAGE_BYTES)
                for t in (tp, tv)
            ]
            for driver in drivers:
                await nursery.start(driver.run)
            drivers[0].submit(HoldTree(2, proposal))
            drivers[1].submit(FetchSample("prop", request))
            with trio.fail_after(5.0):
                fetched = await drivers[1].notifications.receive()
            assert isinstance(fetched, SampleFetched) and isinstance(fetched.answer, ChunkReply)
            assert check_sample(proposal.root, proposal.chunk_count, request.indices, fetched.answer, own) is None
            nursery.cancel_scope.cancel()
