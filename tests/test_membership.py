"""Machine tests for `p2p.membership.Membership`: feed inputs, assert the exact actions. No trio, no sockets."""

from __future__ import annotations

import random

import pytest

from p2p.membership import (
    CandidateFound,
    ConnectionClosed,
    ConnectionOpened,
    DialFailed,
    Membership,
    MembershipConfig,
    PeerDiscovered,
    PeerForgotten,
    PingFailed,
    PingSucceeded,
    Start,
    redial_delay_s,
)
from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import Dial, Disconnect, Effect, Notify, PeerDown, PeerUp, Ping, SetTimer, TimerFired


def make(**overrides: object) -> Membership:
    return Membership("me", MembershipConfig(**overrides), random.Random(1))  # type: ignore[arg-type]


def notified(actions: list) -> list:
    """The notifications and effects, in order."""
    return [a.event if isinstance(a, Notify) else a for a in actions if isinstance(a, Notify | Effect)]


def test_candidate_is_dialled_and_comes_up_on_connection() -> None:
    m = make()
    assert m.step(0.0, Start()) == [SetTimer(("membership", "ping"), 2.0)]
    actions = m.step(0.0, CandidateFound("b", ("/ip4/127.0.0.1/tcp/1/p2p/b",), "dht"))
    assert notified(actions) == [Dial("b", ("/ip4/127.0.0.1/tcp/1/p2p/b",))]
    assert m.statistics()["dialing"] == 1
    actions = m.step(0.1, ConnectionOpened("b"))
    assert notified(actions) == [PeerDiscovered("b", "dht"), PeerUp("b")]
    assert m.live_peers() == ["b"]
    assert m.statistics()["up"] == 1


def test_existing_connection_comes_up_when_verified_without_a_dial() -> None:
    m = make()
    assert m.step(0.0, ConnectionOpened("boot")) == []
    actions = m.step(0.5, CandidateFound("boot", ("/ip4/127.0.0.1/tcp/9/p2p/boot",), "bootstrap"))
    assert notified(actions) == [PeerDiscovered("boot", "bootstrap"), PeerUp("boot")]


def test_self_is_never_a_candidate() -> None:
    m = make()
    assert m.step(0.0, CandidateFound("me", ("/x",), "dht")) == []
    assert m.statistics()["candidates"] == 0


def test_unverified_connection_is_not_up() -> None:
    m = make()
    m.step(0.0, ConnectionOpened("stranger"))
    assert m.live_peers() == []
    assert m.step(1.0, ConnectionClosed("stranger")) == []


def test_dial_failure_backs_off_then_redials_then_forgets() -> None:
    m = make(max_dial_failures=3, redial_base_s=1.0, redial_max_s=10.0)
    m.step(0.0, CandidateFound("b", ("/a",), "dht"))
    actions = m.step(1.0, DialFailed("b", "refused"))
    (timer,) = actions
    assert isinstance(timer, SetTimer) and timer.key == ("membership", "redial", "b")
    assert 1.5 <= timer.deadline < 2.0  # base 1 s, jitter in [0.5, 1)
    assert m.statistics()["waiting_redial"] == 1
    assert notified(m.step(timer.deadline, TimerFired(timer.key))) == [Dial("b", ("/a",))]
    actions = m.step(3.0, DialFailed("b", "refused"))
    (timer,) = actions
    assert isinstance(timer, SetTimer) and 4.0 <= timer.deadline < 5.0  # 2 s, jittered
    m.step(timer.deadline, TimerFired(timer.key))
    assert notified(m.step(6.0, DialFailed("b", "refused"))) == [PeerForgotten("b", 3)]
    assert m.statistics()["candidates"] == 0
    assert m.statistics()["forgotten"] == 1


def test_closed_connection_takes_peer_down_and_schedules_redial() -> None:
    m = make()
    m.step(0.0, CandidateFound("b", ("/a",), "dht"))
    m.step(0.0, ConnectionOpened("b"))
    actions = m.step(5.0, ConnectionClosed("b"))
    assert notified(actions) == [PeerDown("b")]
    assert any(isinstance(a, SetTimer) and a.key == ("membership", "redial", "b") for a in actions)
    assert m.live_peers() == []
    assert m.statistics()["peer_down"] == 1


def test_ping_failures_take_a_peer_down_and_request_disconnect() -> None:
    m = make(max_ping_failures=2)
    m.step(0.0, Start())
    m.step(0.0, CandidateFound("b", ("/a",), "dht"))
    m.step(0.0, ConnectionOpened("b"))
    actions = m.step(2.0, TimerFired(("membership", "ping")))
    assert actions == [Ping("b"), SetTimer(("membership", "ping"), 4.0)]
    assert m.step(2.1, PingFailed("b", "timeout")) == []
    m.step(2.2, PingSucceeded("b"))  # a success resets the count
    assert m.step(4.1, PingFailed("b", "timeout")) == []
    events = notified(m.step(6.1, PingFailed("b", "timeout")))
    assert events == [Disconnect("b", "2 pings failed"), PeerDown("b")]


def test_live_set_is_bounded_and_waiting_candidates_fill_free_slots_in_order() -> None:
    m = make(max_peers=2)
    dials = []
    for peer in ["d", "c", "b"]:
        dials += [e for e in notified(m.step(0.0, CandidateFound(peer, (f"/{peer}",), "dht")))]
    assert dials == [Dial("d", ("/d",)), Dial("c", ("/c",))]
    m.step(0.1, ConnectionOpened("c"))
    m.step(0.1, ConnectionOpened("d"))
    # an inbound connection from the third member beyond the bound is refused
    assert notified(m.step(0.2, ConnectionOpened("b"))) == [Disconnect("b", "live set is full (2 peers)")]
    m.step(0.3, ConnectionClosed("b"))
    events = notified(m.step(1.0, ConnectionClosed("c")))
    assert events == [PeerDown("c"), Dial("b", ("/b",))]


def test_unknown_timer_and_unknown_event_are_local_errors() -> None:
    m = make()
    with pytest.raises(LocalProtocolError):
        m.step(0.0, TimerFired("nope"))
    with pytest.raises(LocalProtocolError):
        CandidateFound("b", (), "carrier-pigeon")


def test_same_seed_same_actions() -> None:
    def run(seed: int) -> list:
        m = Membership("me", MembershipConfig(), random.Random(seed))
        out = []
        for i, peer in enumerate(["p3", "p1", "p2"]):
            out += m.step(float(i), CandidateFound(peer, ("/a",), "dht"))
            out += m.step(float(i), DialFailed(peer, "x"))
        return out

    assert run(5) == run(5)


def test_backoff_grows_and_is_capped() -> None:
    config = MembershipConfig(redial_base_s=1.0, redial_max_s=4.0)
    rng = random.Random(0)
    delays = [redial_delay_s(f, config, rng) for f in (1, 2, 3, 4, 5)]
    assert 0.5 <= delays[0] < 1.0 and 1.0 <= delays[1] < 2.0 and 2.0 <= delays[2] < 4.0
    assert all(2.0 <= d < 4.0 for d in delays[3:])


@pytest.mark.parametrize(
    ("field", "value"), [("max_peers", 0), ("ping_interval_s", float("nan")), ("redial_max_s", 0.1)]
)
def test_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        MembershipConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
