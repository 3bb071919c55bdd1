"""Machine tests for `p2p.hole_punch.HolePunch`: feed inputs, assert the exact actions. No trio, no sockets."""

from __future__ import annotations

import random

import pytest

from p2p.hole_punch import (
    CloseRelayed,
    ConnectionsChanged,
    HolePunch,
    HolePunchConfig,
    PunchDone,
    PunchFailed,
    PunchSucceeded,
    UpgradeDirect,
)
from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import CancelTimer, SetTimer, TimerFired

PUNCH_B = ("punch", "b")
CLOSE_B = ("close-relayed", "b")


def make(**overrides: object) -> HolePunch:
    defaults: dict[str, object] = {"jitter": 0.0}
    defaults.update(overrides)
    return HolePunch(HolePunchConfig(**defaults), random.Random(7))  # type: ignore[arg-type]


def relayed(peer: str = "b", initiator: bool = True) -> ConnectionsChanged:
    return ConnectionsChanged(peer, relayed=True, direct=False, initiator=initiator)


def test_a_relayed_peer_is_punched_after_the_first_delay_and_the_relay_closed_after_success() -> None:
    m = make(first_delay_s=1.0, punch_timeout_s=8.0, relay_close_grace_s=5.0)
    assert m.step(10.0, relayed()) == [SetTimer(PUNCH_B, 11.0)]
    assert m.relayed_peers() == ["b"]
    assert m.step(11.0, TimerFired(PUNCH_B)) == [UpgradeDirect("b", 8.0)]
    actions = m.step(13.5, PunchDone("b", direct=True))
    assert actions[0].event == PunchSucceeded("b", attempt=1, elapsed_s=3.5, attempt_s=2.5)  # type: ignore[attr-defined]
    assert actions[1:] == [SetTimer(CLOSE_B, 18.5)]
    assert m.step(13.6, ConnectionsChanged("b", relayed=True, direct=True, initiator=True)) == []
    assert m.step(18.5, TimerFired(CLOSE_B)) == [CloseRelayed("b")]
    assert m.step(18.6, ConnectionsChanged("b", relayed=False, direct=True, initiator=False)) == []
    assert m.relayed_peers() == []
    assert m.statistics() == {"punches_tried": 1, "punches_succeeded": 1, "relayed_closed": 1}


def test_only_the_side_that_accepted_the_relayed_connection_punches() -> None:
    m = make()
    assert m.step(0.0, relayed(initiator=False)) == []
    assert m.step(5.0, TimerFired(PUNCH_B)) == []
    assert m.relayed_peers() == []


def test_zero_attempts_turns_punching_off() -> None:
    m = make(max_attempts=0)
    assert m.step(0.0, relayed()) == []
    assert m.step(5.0, TimerFired(PUNCH_B)) == []
    assert m.step(6.0, ConnectionsChanged("b", relayed=True, direct=True, initiator=True)) == []
    assert m.relayed_peers() == [] and m.statistics() == {}


def test_failures_back_off_exponentially_and_the_peer_stays_relayed_after_max_attempts() -> None:
    m = make(max_attempts=3, first_delay_s=0.0, retry_base_s=2.0, retry_max_s=3.0)
    assert m.step(0.0, relayed()) == [SetTimer(PUNCH_B, 0.0)]
    deadlines = []
    now = 0.0
    for attempt in (1, 2, 3):
        assert m.step(now, TimerFired(PUNCH_B)) == [UpgradeDirect("b", 15.0)]
        now += 1.0
        actions = m.step(now, PunchDone("b", direct=False, reason="refused"))
        final = attempt == 3
        assert actions[0].event == PunchFailed("b", attempt, "refused", final)  # type: ignore[attr-defined]
        if final:
            assert actions[1:] == []
        else:
            (timer,) = actions[1:]
            assert isinstance(timer, SetTimer) and timer.key == PUNCH_B
            deadlines.append(timer.deadline - now)
            now = timer.deadline
    assert deadlines == [2.0, 3.0]  # 2 s, then 4 s capped at retry_max_s
    assert m.step(now + 100, TimerFired(PUNCH_B)) == []  # given up: no further attempt
    assert m.step(now + 100, relayed()) == []  # the same relayed connection reported again: still given up
    assert m.statistics() == {"punches_tried": 3, "punches_failed": 3, "peers_given_up": 1}
    assert m.relayed_peers() == ["b"]


def test_jitter_comes_from_the_seeded_random_and_stays_in_bounds() -> None:
    def first_deadline(seed: int) -> float:
        m = HolePunch(HolePunchConfig(first_delay_s=4.0, jitter=0.25), random.Random(seed))
        (timer,) = m.step(0.0, relayed())
        assert isinstance(timer, SetTimer)
        return timer.deadline

    assert first_deadline(3) == first_deadline(3)
    deadlines = {first_deadline(seed) for seed in range(20)}
    assert len(deadlines) > 1
    assert all(3.0 <= d <= 5.0 for d in deadlines)


def test_a_direct_connection_from_elsewhere_stops_the_schedule() -> None:
    m = make(relay_close_grace_s=2.0)
    m.step(0.0, relayed())
    actions = m.step(0.5, ConnectionsChanged("b", relayed=True, direct=True, initiator=True))
    assert actions == [CancelTimer(PUNCH_B), SetTimer(CLOSE_B, 2.5)]
    assert m.step(1.0, TimerFired(PUNCH_B)) == []


def test_a_failure_reported_after_a_direct_connection_appeared_is_not_retried() -> None:
    m = make(first_delay_s=0.0)
    m.step(0.0, relayed())
    m.step(0.0, TimerFired(PUNCH_B))
    m.step(1.0, ConnectionsChanged("b", relayed=True, direct=True, initiator=True))
    actions = m.step(2.0, PunchDone("b", direct=False, reason="timed out"))
    assert [a.event for a in actions] == [PunchFailed("b", 1, "timed out", final=True)]  # type: ignore[attr-defined]


def test_a_peer_that_disconnects_is_forgotten_and_a_late_outcome_ignored() -> None:
    m = make(first_delay_s=0.0)
    m.step(0.0, relayed())
    m.step(0.0, TimerFired(PUNCH_B))
    gone = ConnectionsChanged("b", relayed=False, direct=False, initiator=False)
    assert m.step(1.0, gone) == [CancelTimer(PUNCH_B), CancelTimer(CLOSE_B)]
    assert m.step(2.0, PunchDone("b", direct=False, reason="x")) == []
    assert m.relayed_peers() == []
    assert m.step(3.0, relayed()) == [SetTimer(PUNCH_B, 3.0)]  # a new relayed connection starts afresh


def test_a_lost_direct_connection_with_the_relay_still_up_is_punched_again() -> None:
    m = make(first_delay_s=1.0)
    m.step(0.0, relayed())
    m.step(0.5, ConnectionsChanged("b", relayed=True, direct=True, initiator=True))
    assert m.step(3.0, relayed()) == [CancelTimer(CLOSE_B), SetTimer(PUNCH_B, 4.0)]


def test_peers_are_independent() -> None:
    m = make(first_delay_s=0.0)
    m.step(0.0, relayed("b"))
    m.step(0.0, relayed("a"))
    assert m.step(0.0, TimerFired(("punch", "a"))) == [UpgradeDirect("a", 15.0)]
    assert m.step(0.0, TimerFired(PUNCH_B)) == [UpgradeDirect("b", 15.0)]
    assert m.relayed_peers() == ["a", "b"]


def test_unexpected_events_are_a_local_bug() -> None:
    with pytest.raises(LocalProtocolError):
        make().step(0.0, TimerFired("other"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_attempts", -1),
        ("first_delay_s", -1.0),
        ("retry_base_s", 0.0),
        ("punch_timeout_s", float("inf")),
        ("jitter", 1.0),
        ("retry_max_s", 1.0),
    ],
)
def test_config_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        HolePunchConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
