"""The discovery schedule machine with no I/O: join attempts, retries, lookup backoff, wake-ups and republishing."""

from __future__ import annotations

import pytest

from p2p.schedule import (
    BootstrapAttemptFailed,
    BootstrapDialed,
    DhtJoined,
    DialBootstrap,
    DiscoverySchedule,
    JoinDht,
    Joined,
    JoinFailed,
    Lookup,
    LookupDone,
    Publish,
    Published,
    ScheduleConfig,
    Start,
    Wake,
)
from swarmgrad.core.errors import LocalProtocolError
from swarmgrad.core.machine import CancelTimer, Notify, SetTimer, TimerFired

RETRY = ("discovery", "bootstrap-retry")
LOOKUP = ("discovery", "lookup")
PUBLISH = ("discovery", "publish")


def make(addrs: tuple[str, ...] = ("/a", "/b"), attempts: int = 3) -> DiscoverySchedule:
    return DiscoverySchedule(
        ScheduleConfig(
            bootstrap_addrs=addrs,
            bootstrap_attempts=attempts,
            bootstrap_retry_s=1.0,
            republish_interval_s=20.0,
            min_lookup_interval_s=0.5,
            max_lookup_interval_s=4.0,
        )
    )


def test_the_first_peer_of_a_swarm_joins_at_once_then_publishes_and_looks_up() -> None:
    m = make(addrs=())
    assert m.step(0.0, Start()) == [Notify(Joined(())), Publish(), Lookup()]
    assert m.step(0.3, Published()) == [SetTimer(PUBLISH, 20.3)]
    assert m.step(20.3, TimerFired(PUBLISH)) == [Publish()]


def test_an_attempt_dials_every_address_and_joins_through_those_that_answered() -> None:
    m = make()
    assert m.step(0.0, Start()) == [DialBootstrap("/a", 1), DialBootstrap("/b", 1)]
    failed = m.step(0.2, BootstrapDialed("/a", "A", "connection refused"))
    assert failed == [Notify(BootstrapAttemptFailed("/a", 1, 3, "connection refused", repeated=False))]
    assert m.step(0.3, BootstrapDialed("/b", "B", None)) == [JoinDht(("B",))]
    assert not m.joined  # published and looked up only once the routing table is filled
    assert m.step(0.9, DhtJoined()) == [Notify(Joined(("B",))), Publish(), Lookup()]
    assert m.joined


def test_failed_attempts_retry_after_the_pause_and_end_naming_every_reason() -> None:
    m = make(attempts=2)
    m.step(0.0, Start())
    m.step(0.1, BootstrapDialed("/a", "A", "refused"))
    assert m.step(0.2, BootstrapDialed("/b", "B", "timeout"))[-1] == SetTimer(RETRY, 1.2)
    assert m.step(1.2, TimerFired(RETRY)) == [DialBootstrap("/a", 2), DialBootstrap("/b", 2)]
    # the last attempt reports even a repeated reason as not repeated: it is the end
    assert m.step(1.3, BootstrapDialed("/a", "A", "refused")) == [
        Notify(BootstrapAttemptFailed("/a", 2, 2, "refused", repeated=False))
    ]
    actions = m.step(1.4, BootstrapDialed("/b", "B", "wrong key"))
    assert isinstance(actions[-1], Notify) and isinstance(actions[-1].event, JoinFailed)
    message = actions[-1].event.message
    assert "in 2 attempts" in message and "/a: refused" in message and "/b: timeout / wrong key" in message


def test_a_repeated_reason_with_attempts_left_is_marked_repeated() -> None:
    m = make(addrs=("/a",), attempts=3)
    m.step(0.0, Start())
    m.step(0.1, BootstrapDialed("/a", "A", "refused"))
    m.step(1.1, TimerFired(RETRY))
    assert m.step(1.2, BootstrapDialed("/a", "A", "refused"))[0] == Notify(
        BootstrapAttemptFailed("/a", 2, 3, "refused", repeated=True)
    )


def joined() -> DiscoverySchedule:
    m = make(addrs=())
    m.step(0.0, Start())
    return m


def test_lookups_back_off_while_they_find_nobody_and_reset_when_they_find_someone() -> None:
    m = joined()
    now, gaps = 0.0, []
    for new in (0, 0, 0, 0, 0, 1, 0):
        (timer,) = m.step(now, LookupDone(new=new, unverified=0))
        assert isinstance(timer, SetTimer) and timer.key == LOOKUP
        gaps.append(timer.deadline - now)
        now = timer.deadline
        assert m.step(now, TimerFired(LOOKUP)) == [Lookup()]
    assert gaps == [1.0, 2.0, 4.0, 4.0, 4.0, 0.5, 1.0]


def test_wake_looks_up_now_or_right_after_the_running_lookup() -> None:
    m = joined()
    assert m.step(0.1, Wake()) == []  # a lookup is running: another follows it at once
    assert m.step(0.4, LookupDone(new=0, unverified=0)) == [Lookup()]
    (timer,) = m.step(0.6, LookupDone(new=0, unverified=0))
    assert timer == SetTimer(LOOKUP, 1.6)
    assert m.step(0.7, Wake()) == [CancelTimer(LOOKUP), Lookup()]


def test_misuse_is_a_local_error() -> None:
    m = make()
    with pytest.raises(LocalProtocolError):
        m.step(0.0, BootstrapDialed("/a", "A", None))  # no dial running
    m.step(0.0, Start())
    with pytest.raises(LocalProtocolError):
        m.step(0.0, Start())
    with pytest.raises(LocalProtocolError):
        m.step(0.0, LookupDone(0, 0))
    with pytest.raises(LocalProtocolError):
        m.step(0.0, TimerFired(("discovery", "nothing")))
