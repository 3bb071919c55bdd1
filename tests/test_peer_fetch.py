"""The model-fetch machine: asks neighbours one at a time, hands offers to the application, serves requests, and
treats unsolicited or foreign messages as the sender's fault."""

from __future__ import annotations

import pytest

from p2p.model_fetch import (
    SCHEMA,
    DeclineRequest,
    FetchFailed,
    FetchModel,
    ModelFetch,
    ModelOffer,
    ModelOffered,
    ModelRequest,
    ModelRequested,
    ModelUnavailable,
    RejectOffer,
    ServeModel,
)
from swarmgrad.core.errors import LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import CancelTimer, Notify, PeerDown, Received, Send, SendFailed, SetTimer, TimerFired


def test_asks_candidates_in_sorted_order_until_an_offer_arrives() -> None:
    machine = ModelFetch(timeout_s=5.0)
    actions = machine.step(10.0, FetchModel(("c", "a", "b", "a")))
    assert actions == [Send("a", ModelRequest(1), deadline=15.0), SetTimer("model-fetch", 15.0)]
    actions = machine.step(15.0, TimerFired("model-fetch"))
    assert actions == [Send("b", ModelRequest(2), deadline=20.0), SetTimer("model-fetch", 20.0)]
    offer = ModelOffer(2, 40, "digits", b"body")
    actions = machine.step(16.0, Received("b", offer))
    assert actions == [CancelTimer("model-fetch"), Notify(ModelOffered("b", offer))]
    assert not machine.fetching


def test_rejected_unavailable_and_lost_candidates_lead_to_failure_with_reasons() -> None:
    machine = ModelFetch(timeout_s=1.0)
    machine.step(0.0, FetchModel(("a", "b", "c", "d")))
    machine.step(0.1, Received("a", ModelOffer(1, 3, "digits", b"x")))
    actions = machine.step(0.2, RejectOffer("a"))
    assert actions[0] == Send("b", ModelRequest(2), deadline=1.2)
    actions = machine.step(0.3, Received("b", ModelUnavailable(2, "no model yet")))
    assert actions[:2] == [CancelTimer("model-fetch"), Send("c", ModelRequest(3), deadline=1.3)]
    actions = machine.step(0.4, PeerDown("c"))
    assert actions[:2] == [CancelTimer("model-fetch"), Send("d", ModelRequest(4), deadline=1.4)]
    actions = machine.step(0.5, SendFailed("d", "unreachable"))
    assert actions == [
        CancelTimer("model-fetch"),
        Notify(
            FetchFailed(
                (
                    ("a", "offer refused"),
                    ("b", "unavailable: no model yet"),
                    ("c", "disconnected"),
                    ("d", "request not sent: unreachable"),
                )
            )
        ),
    ]
    assert not machine.fetching


def test_no_candidates_fails_at_once() -> None:
    assert ModelFetch(1.0).step(0.0, FetchModel(())) == [Notify(FetchFailed(()))]


def test_unsolicited_offers_are_the_senders_fault_and_change_nothing() -> None:
    machine = ModelFetch(timeout_s=1.0)
    with pytest.raises(RemoteProtocolError):
        machine.step(0.0, Received("a", ModelOffer(1, 0, "digits", b"")))
    machine.step(0.0, FetchModel(("a",)))
    with pytest.raises(RemoteProtocolError):
        machine.step(0.1, Received("b", ModelOffer(1, 0, "digits", b"")))  # not the one asked
    with pytest.raises(RemoteProtocolError):
        machine.step(0.1, Received("a", ModelOffer(7, 0, "digits", b"")))  # stale nonce
    with pytest.raises(RemoteProtocolError):
        machine.step(0.1, Received("a", "hello"))
    assert machine.fetching
    offer = ModelOffer(1, 0, "digits", b"")
    assert machine.step(0.2, Received("a", offer))[-1] == Notify(ModelOffered("a", offer))


def test_serving_goes_through_the_application() -> None:
    machine = ModelFetch(timeout_s=1.0)
    assert machine.step(0.0, Received("x", ModelRequest(9))) == [Notify(ModelRequested("x", 9))]
    assert machine.step(0.0, ServeModel("x", 9, 12, "digits", b"abc")) == [
        Send("x", ModelOffer(9, 12, "digits", b"abc"))
    ]
    assert machine.step(0.0, DeclineRequest("x", 9, "starting")) == [Send("x", ModelUnavailable(9, "starting"))]


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ModelFetch(timeout_s=0.0)
    machine = ModelFetch(timeout_s=1.0)
    machine.step(0.0, FetchModel(("a",)))
    with pytest.raises(LocalProtocolError):
        machine.step(0.0, FetchModel(("b",)))


def test_messages_round_trip_through_the_codec_and_negative_rounds_are_refused() -> None:
    for msg in (ModelRequest(1), ModelOffer(2, 5, "digits", b"\x00\x01"), ModelUnavailable(3, "later")):
        assert SCHEMA.decode(SCHEMA.encode(msg)) == msg
    with pytest.raises(ValueError):
        ModelOffer(1, -1, "digits", b"")
