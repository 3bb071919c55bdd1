"""The model-fetch machine: asks neighbours one at a time, checks each offer with the injected validator (as a
`Compute`), adopts the first valid one, serves requests, and treats unsolicited or foreign messages as the sender's
fault."""

from __future__ import annotations

import pytest

from p2p.model_fetch import (
    SCHEMA,
    DeclineRequest,
    FetchFailed,
    FetchModel,
    ModelAdopted,
    ModelFetch,
    ModelOffer,
    ModelRequest,
    ModelRequested,
    ModelUnavailable,
    OfferRefused,
    ServeModel,
)
from swarmgrad.core.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
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
    settle,
)


def validate(offer: ModelOffer) -> bytes:
    """A stand-in for the peer's check: a body starting with b"ok" is valid, and what is adopted is the body."""
    if not offer.body.startswith(b"ok"):
        raise DecodeError(f"bad body {offer.body!r}")
    return offer.body


def test_asks_candidates_in_sorted_order_until_a_valid_offer_is_adopted() -> None:
    machine = ModelFetch(timeout_s=5.0, validate=validate)
    actions = machine.step(10.0, FetchModel(("c", "a", "b", "a")))
    assert actions == [Send("a", ModelRequest(1), deadline=15.0), SetTimer("model-fetch", 15.0)]
    actions = machine.step(15.0, TimerFired("model-fetch"))
    assert actions == [Send("b", ModelRequest(2), deadline=20.0), SetTimer("model-fetch", 20.0)]
    actions = machine.step(16.0, Received("b", ModelOffer(2, 40, "digits", b"ok body")))
    assert actions[0] == CancelTimer("model-fetch") and isinstance(actions[1], Compute) and len(actions) == 2
    assert machine.fetching  # until the check is back
    (adopted,) = machine.step(16.5, Computed(actions[1].key, actions[1].work()))
    assert isinstance(adopted, Notify) and isinstance(adopted.event, ModelAdopted)
    assert (adopted.event.peer, adopted.event.round, adopted.event.state) == ("b", 40, b"ok body")
    assert not machine.fetching
    with pytest.raises(LocalProtocolError):
        machine.step(17.0, Computed(actions[1].key, actions[1].work()))  # a check nobody asked for


def test_refused_unavailable_and_lost_candidates_lead_to_failure_with_reasons() -> None:
    machine = ModelFetch(timeout_s=1.0, validate=validate)
    machine.step(0.0, FetchModel(("a", "b", "c", "d")))
    actions = settle(machine, 0.2, Received("a", ModelOffer(1, 3, "digits", b"x")))
    assert actions[:2] == [CancelTimer("model-fetch"), Notify(OfferRefused("a", "bad body b'x'"))]
    assert actions[2] == Send("b", ModelRequest(2), deadline=1.2)
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
                    ("a", "offer refused: bad body b'x'"),
                    ("b", "unavailable: no model yet"),
                    ("c", "disconnected"),
                    ("d", "request not sent: unreachable"),
                )
            )
        ),
    ]
    assert not machine.fetching


def test_no_candidates_fails_at_once() -> None:
    assert ModelFetch(1.0, validate).step(0.0, FetchModel(())) == [Notify(FetchFailed(()))]


def test_unsolicited_offers_are_the_senders_fault_and_change_nothing() -> None:
    machine = ModelFetch(timeout_s=1.0, validate=validate)
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
    done = settle(machine, 0.2, Received("a", ModelOffer(1, 0, "digits", b"ok")))[-1]
    assert isinstance(done, Notify) and isinstance(done.event, ModelAdopted) and done.event.peer == "a"


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
    with pytest.raises(LocalProtocolError):
        ModelFetch(timeout_s=1.0).step(0.0, FetchModel(("a",)))  # a serving-only machine cannot fetch
    machine = ModelFetch(timeout_s=1.0, validate=validate)
    machine.step(0.0, FetchModel(("a",)))
    with pytest.raises(LocalProtocolError):
        machine.step(0.0, FetchModel(("b",)))


def test_messages_round_trip_through_the_codec_and_negative_rounds_are_refused() -> None:
    for msg in (ModelRequest(1), ModelOffer(2, 5, "digits", b"\x00\x01"), ModelUnavailable(3, "later")):
        assert SCHEMA.decode(SCHEMA.encode(msg)) == msg
    with pytest.raises(ValueError):
        ModelOffer(1, -1, "digits", b"")
