"""The certified join, sans-IO: a joiner asks neighbours one at a time for their newest certified checkpoint, refuses
forged chains and bodies that are not the certified root's (naming the peer and the reason), passes over silent
neighbours at the timeout, and reports when nobody has certified anything yet."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable

import pytest
import torch

from consensus import chain_offer
from consensus.agreement import AgreementConfig
from consensus.body_fetch import BodyFetchConfig
from consensus.canonical import model_spec_hash, spec_layout
from consensus.certified_join import (
    CertifiedJoin,
    CertifiedJoinConfig,
    HoldChain,
    JoinCertified,
    Joined,
    JoinFailed,
    JoinOfferRefused,
    NothingCertified,
)
from consensus.certified_offer import TaskOfferChecks
from consensus.chain_offer import OFFER_VERSION, ChainOffer, ChainQuery, offer_page
from consensus.chunk_exchange import ChunkExchange
from consensus.chunks import SCHEMA
from consensus.epochs import AdoptChain, ChainAdopted, EpochChain
from consensus.membership import genesis_parent_hash
from consensus.merkle import CheckpointTree, chunk_count_of
from consensus.messages import PRECOMMIT, Certificate, CertificateRequest, EpochValue, Signed, members_hash
from consensus.provenance import ChainGenesis
from consensus.sample_fetch import SampleFetchConfig
from swarmgrad.core.errors import DecodeError, LocalProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Compute,
    Computed,
    Notify,
    PeerDown,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)
from tests.consensus_helpers import SWARM, Members, attendance_of
from training.tasks.base import TensorSpec

MEMBERS = Members.make(4)
GENESIS = ChainGenesis(SWARM, MEMBERS.keys)
STATE = {"w": torch.randn(300, 100, generator=torch.Generator().manual_seed(1)), "b": torch.zeros(100)}
SPEC = {n: TensorSpec(tuple(t.shape), "float32") for n, t in STATE.items()}
TREE = CheckpointTree.from_state(STATE)
CHUNKS = chunk_count_of(spec_layout(SPEC).total_size_bytes)
TIMEOUT_S = 3.0
ME = "joiner"


def _chain(epochs: int, root: bytes = TREE.root) -> tuple[Certificate, ...]:
    parent, certs = genesis_parent_hash(SWARM, MEMBERS.keys), list[Certificate]()
    for epoch in range(1, epochs + 1):
        attendance = attendance_of(certs[-1]) if certs else ()
        value = EpochValue(
            SWARM, epoch, 10 * epoch, root, model_spec_hash(SPEC), members_hash(MEMBERS.keys), parent, attendance
        )
        votes = [s.vote(SWARM, epoch, 0, PRECOMMIT, value.hash()) for s in MEMBERS.signers[:3]]
        certs.append(Certificate(value, MEMBERS.keys, 0, tuple(Signed(v.voter, v.signature) for v in votes)))
        parent = value.hash()
    return tuple(certs)


CHAIN = _chain(3)


def _server(
    chain: tuple[Certificate, ...] = CHAIN, tree: CheckpointTree | None = TREE, body_epoch: int | None = None
) -> ChunkExchange:
    server = ChunkExchange(SampleFetchConfig(SWARM), BodyFetchConfig(SWARM))
    if chain and tree is not None:
        server.step(0.0, HoldChain(GENESIS, chain, len(chain) if body_epoch is None else body_epoch, tree))
    else:
        server.step(0.0, HoldChain(GENESIS, chain))
    return server


def _forged_chain() -> tuple[Certificate, ...]:
    last = CHAIN[-1]
    first = last.precommits[0]
    altered = Signed(first.member, bytes([first.signature[0] ^ 1]) + first.signature[1:])
    return (*CHAIN[:-1], dataclasses.replace(last, precommits=(altered, *last.precommits[1:])))


def _mislabelled_tree() -> CheckpointTree:
    data = bytearray(TREE.data)
    data[-1] ^= 1
    forged = CheckpointTree(memoryview(data), TREE.layout)
    forged.root = TREE.root
    return forged


class Net:
    """The joiner and its neighbours (`servers`; a name without a server is silent) in virtual time: sends are
    delivered at once, computations run in place, timers fire when nothing else is left."""

    def __init__(self, servers: dict[str, ChunkExchange], *, trusted_hash: bytes | None = None) -> None:
        self.joiner = ChunkExchange(
            SampleFetchConfig(SWARM), BodyFetchConfig(SWARM, timeout_s=1.0), CertifiedJoinConfig(SWARM, TIMEOUT_S)
        )
        self.servers = servers
        self.checks = TaskOfferChecks(GENESIS, SPEC, 1 << 22, trusted_hash)
        self.now = 0.0
        self.timers: dict[Hashable, float] = {}
        self.notes: list[object] = []
        self.sent: list[Send] = []

    def join(self, peers: tuple[str, ...], own: tuple[Certificate, ...] = ()) -> object:
        events: list[object] = [JoinCertified(peers, CHUNKS, own, self.checks)]
        while True:
            while events:
                events += self._carry_out(self.joiner.step(self.now, events.pop(0)))  # type: ignore[arg-type]
                final = [n for n in self.notes if isinstance(n, Joined | NothingCertified | JoinFailed)]
                if final:
                    return final[0]
            key, self.now = min(self.timers.items(), key=lambda item: item[1])
            del self.timers[key]
            events.append(TimerFired(key))

    def _carry_out(self, actions: list[Action]) -> list[object]:
        events: list[object] = []
        for action in actions:
            if isinstance(action, Send):
                self.sent.append(action)
                server = self.servers.get(action.peer)
                if server is not None:
                    encoded = SCHEMA.decode(SCHEMA.encode(action.msg))  # everything crosses the real codec
                    for answer in server.step(self.now, Received(ME, encoded)):
                        assert isinstance(answer, Send) and answer.peer == ME
                        events.append(Received(action.peer, SCHEMA.decode(SCHEMA.encode(answer.msg))))
            elif isinstance(action, SetTimer):
                self.timers[action.key] = action.deadline
            elif isinstance(action, CancelTimer):
                self.timers.pop(action.key, None)
            elif isinstance(action, Compute):
                events.append(Computed(action.key, action.work()))
            elif isinstance(action, Notify):
                self.notes.append(action.event)
        return events

    def refusals(self) -> list[tuple[str, str, bool]]:
        return [(n.peer, n.reason, n.misbehaved) for n in self.notes if isinstance(n, JoinOfferRefused)]


def test_a_forged_certificate_and_a_wrong_body_are_refused_and_the_next_neighbour_is_asked() -> None:
    net = Net({"a": _server(_forged_chain()), "b": _server(tree=_mislabelled_tree()), "c": _server()})
    joined = net.join(("c", "b", "a"))  # asked in peer id order
    assert isinstance(joined, Joined) and joined.peer == "c"
    assert joined.certificates == CHAIN and joined.genesis == GENESIS
    assert joined.checkpoint.certificate == CHAIN[-1] and [s.epoch for s in joined.checkpoint.summaries] == [1, 2, 3]
    assert torch.equal(joined.checkpoint.state["w"], STATE["w"]) and joined.checkpoint.tree.root == TREE.root
    refusals = net.refusals()
    assert [(peer, misbehaved) for peer, _, misbehaved in refusals] == [("a", True), ("b", True)]
    assert refusals[0][1].startswith("chain does not verify: epoch 3: forged or wrong signature of member")
    assert refusals[1][1] == "body: chunk 0: proof does not lead to the root"
    # the forged chain was refused before any chunk of its body was asked for
    assert not [s for s in net.sent if s.peer == "a" and not isinstance(s.msg, ChainQuery)]


def test_a_silent_or_departed_neighbour_is_passed_over() -> None:
    net = Net({"b": _server()})
    joined = net.join(("a", "b"))
    assert isinstance(joined, Joined) and joined.peer == "b" and net.now == TIMEOUT_S
    assert net.refusals() == [("a", f"no answer to its chain query in {TIMEOUT_S} s", False)]
    net = Net({"b": _server()})
    first = net.joiner.step(0.0, JoinCertified(("a", "b"), CHUNKS, (), net.checks))
    assert [s.peer for s in first if isinstance(s, Send)] == ["a"]
    after = net.joiner.step(1.0, PeerDown("a"))
    assert next(n for n in after if isinstance(n, Notify)).event == JoinOfferRefused("a", "peer disconnected", False)
    assert [s.peer for s in after if isinstance(s, Send)] == ["b"]


def test_nothing_certified_only_when_no_neighbour_offers_an_epoch() -> None:
    assert Net({"a": _server(()), "b": _server(())}).join(("a", "b", "c")) == NothingCertified(("a", "b", "c"))
    assert Net({}).join(("a", "b")) == NothingCertified(("a", "b"))  # silent ones offer nothing either
    joiner = CertifiedJoin(CertifiedJoinConfig(SWARM), BodyFetchConfig(SWARM))
    joiner.step(0.0, JoinCertified(("a",), CHUNKS, (), Net({}).checks))
    out = joiner.step(0.0, SendFailed("a", "protocol not supported"))  # a peer that does not speak it: at once
    assert [a.event for a in out if isinstance(a, Notify)] == [
        JoinOfferRefused("a", "query not sent: protocol not supported", False),
        NothingCertified(("a",)),
    ]
    # a neighbour with a (forged) certified epoch means the swarm has one: no fallback to the uncertified model
    refused = Net({"a": _server(()), "b": _server(_forged_chain())}).join(("a", "b"))
    assert isinstance(refused, JoinFailed) and refused.reasons[1][0] == "b"


def test_a_body_the_server_does_not_hold_is_refused_without_blame() -> None:
    elsewhere = CheckpointTree.from_state({name: tensor + 1 for name, tensor in STATE.items()})
    net = Net({"a": _server(tree=elsewhere), "b": _server()})
    joined = net.join(("a", "b"))
    assert isinstance(joined, Joined) and joined.peer == "b"
    assert net.refusals() == [("a", "body: refused: unknown root: no checkpoint with that root", False)]


def test_the_whole_chain_is_adopted_when_the_body_lags_it() -> None:
    chain = _chain(5)
    joined = Net({"a": _server(chain, body_epoch=3)}).join(("a",))
    assert isinstance(joined, Joined) and joined.certificates == chain
    assert joined.checkpoint.certificate == chain[2] and [s.epoch for s in joined.checkpoint.summaries] == [1, 2, 3]


def test_a_long_chain_is_read_page_by_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain_offer, "MAX_CERTIFICATES_PER_OFFER", 2)
    chain = _chain(5)
    net = Net({"a": _server(chain)})
    joined = net.join(("a",))
    assert isinstance(joined, Joined) and joined.certificates == chain
    queries = [s.msg.from_epoch for s in net.sent if isinstance(s.msg, ChainQuery)]
    assert queries == [1, 3, 5]


def test_a_chain_that_differs_from_ours_or_a_page_out_of_place_is_refused() -> None:
    other = _chain(2, root=bytes(32))
    net = Net({"a": _server(), "b": _server(other[:1] + CHAIN[1:])})
    assert isinstance(net.join(("a", "b"), own=other[:1]), JoinFailed)
    assert net.refusals()[0] == ("a", "its epoch 1 differs from our chain's", True)
    joiner = CertifiedJoin(CertifiedJoinConfig(SWARM), BodyFetchConfig(SWARM))
    joiner.step(0.0, JoinCertified(("a",), CHUNKS, (), Net({}).checks))
    out = joiner.step(0.0, Received("a", ChainOffer(OFFER_VERSION, SWARM, MEMBERS.keys, 3, 3, CHAIN[1:])))
    assert next(n.event for n in out if isinstance(n, Notify)) == JoinOfferRefused(
        "a", "page starts at epoch 2, not the asked 1", True
    )
    assert joiner.step(0.0, Received("z", offer_page(SWARM, MEMBERS.keys, CHAIN, 3, 1))) == []  # nobody asked z
    joiner.step(0.0, JoinCertified(("a",), CHUNKS, (), Net({}).checks))
    with pytest.raises(LocalProtocolError, match="already running"):
        joiner.step(0.0, JoinCertified(("a",), CHUNKS, (), Net({}).checks))


def test_a_trusted_hash_skips_the_epochs_before_it() -> None:
    forged_early = (dataclasses.replace(CHAIN[0], precommits=CHAIN[0].precommits[:1]), *CHAIN[1:])
    assert isinstance(Net({"a": _server(forged_early)}).join(("a",)), JoinFailed)
    joined = Net({"a": _server(forged_early)}, trusted_hash=CHAIN[0].value.hash()).join(("a",))
    assert isinstance(joined, Joined) and [s.epoch for s in joined.checkpoint.summaries] == [2, 3]


def test_offer_messages_are_bounded_and_versioned() -> None:
    offer = offer_page(SWARM, MEMBERS.keys, CHAIN, 2, 2)
    assert (offer.newest_epoch, offer.body_epoch) == (3, 2) and [c.epoch for c in offer.certificates] == [2, 3]
    assert SCHEMA.decode(SCHEMA.encode(offer)) == offer
    nothing = ChainOffer(OFFER_VERSION, SWARM, MEMBERS.keys, 0, 0, ())
    assert offer_page(SWARM, MEMBERS.keys, (), 0, 1) == offer_page(SWARM, MEMBERS.keys, CHAIN, 0, 1) == nothing
    with pytest.raises(ValueError, match="body_epoch"):
        ChainOffer(OFFER_VERSION, SWARM, MEMBERS.keys, 3, 4, CHAIN)
    future = SCHEMA.encode(ChainQuery(OFFER_VERSION, SWARM, 1)).replace(b"\x01", b"\x02", 1)
    with pytest.raises(DecodeError):
        SCHEMA.decode(future)
    with pytest.raises(ValueError, match="consecutive"):
        ChainOffer(OFFER_VERSION, SWARM, MEMBERS.keys, 3, 3, (CHAIN[0], CHAIN[2]))
    with pytest.raises(ValueError, match="beyond the offered epoch"):
        ChainOffer(OFFER_VERSION, SWARM, MEMBERS.keys, 2, 2, CHAIN)


def test_the_epoch_chain_adopts_a_verified_chain_and_follows_on() -> None:
    outsider = Members.make(1, "outsider").signers[0]
    machine = EpochChain(AgreementConfig(), outsider, GENESIS, [], lambda key: key.hex()[:8])
    out = machine.step(0.0, AdoptChain(CHAIN[:2]))
    assert [n.event for n in out if isinstance(n, Notify)] == [ChainAdopted(CHAIN[:2])]
    assert machine.next_epoch == 3 and machine.step(0.0, AdoptChain(CHAIN[:2])) == []
    out = machine.step(0.0, Received("p", CHAIN[2]))  # the next certificate arrives as to any non-member
    assert machine.next_epoch == 4 and any(isinstance(a, Notify) for a in out)
    later = _chain(6)
    # held for its turn, and the sender, past an epoch this chain lacks, is asked for it (the catch-up)
    assert machine.step(0.0, Received("p", later[5])) == [Send("p", CertificateRequest(SWARM, 4))]
    assert machine.next_epoch == 4
    machine.step(0.0, AdoptChain(later[:4]))  # epochs 5 and 6 are missing still: 6 waits in the buffer
    out = machine.step(0.0, Received("q", later[4]))  # 5 arrives late: 5, then the buffered 6
    assert [n.event.certificate.epoch for n in out if isinstance(n, Notify)] == [5, 6] and machine.next_epoch == 7
    with pytest.raises(LocalProtocolError, match="differs"):
        machine.step(0.0, AdoptChain(_chain(1, root=bytes(32))))
    with pytest.raises(LocalProtocolError, match="does not continue"):
        machine.step(0.0, AdoptChain(_chain(8)[7:]))
