"""The dial-back check's machines (`p2p.reachability`), stepped by hand: no sockets, no clock, no trio.

Asking: two agreeing votes decide; a lying server is outvoted; a disagreement asks a third server and re-checks
sooner; a timeout, a lost connection or "cannot serve" is no vote and the next candidate is asked; too few servers
leave no verdict and the next member to come up starts a new check; an observed IP that is not ours is a vote for
private; one server per IP, never one on our own IP; a changed address starts a new check; a verdict is re-checked
on schedule. Serving: only the requester's observed IP is dialled, a peer that cannot serve says so, requests are
rate limited per requester and per IP. The wire messages are bounded and typed."""

from __future__ import annotations

import random

import pytest

from p2p.reachability import (
    CANNOT_SERVE,
    DIALLED,
    NOT_DIALLED,
    SCHEMA,
    AddressesChanged,
    Answer,
    AskDialBack,
    CheckInconclusive,
    DialAddrs,
    DialBackAnswered,
    DialBackFailed,
    DialBackRequest,
    DialBackResponse,
    DialBackServer,
    MemberUp,
    ReachabilityChanged,
    ReachabilityCheck,
    ReachabilityConfig,
)
from swarmgrad.core.codec import encode_frame_header
from swarmgrad.core.errors import ConfigError, DecodeError
from swarmgrad.core.machine import Action, Notify, PeerDown, SetTimer, TimerFired

OWN_IP = "198.18.0.5"
ADDRS = (f"/ip4/{OWN_IP}/tcp/7400",)
CONFIG = ReachabilityConfig(answer_timeout_s=10.0, recheck_s=600.0, retry_s=30.0, dial_timeout_s=5.0)


def _machine(members: int = 3, seed: int = 1) -> tuple[ReachabilityCheck, list[Action]]:
    machine = ReachabilityCheck(CONFIG, random.Random(seed))
    for index in range(members):
        assert machine.step(0.0, MemberUp(f"s{index}", f"198.18.0.{10 + index}")) == []
    return machine, machine.step(0.0, AddressesChanged(ADDRS, (OWN_IP, "127.0.0.1")))


def _asks(actions: list[Action]) -> list[AskDialBack]:
    return [a for a in actions if isinstance(a, AskDialBack)]


def _verdicts(actions: list[Action]) -> list[ReachabilityChanged]:
    return [a.event for a in actions if isinstance(a, Notify) and isinstance(a.event, ReachabilityChanged)]


def _answer(ask: AskDialBack, status: int, observed_ip: str = OWN_IP) -> DialBackAnswered:
    return DialBackAnswered(ask.peer, ask.nonce, DialBackResponse(ask.nonce, status, observed_ip, "because"))


def _recheck_at(actions: list[Action]) -> float:
    (timer,) = [a for a in actions if isinstance(a, SetTimer) and a.key == ("reachability", "recheck")]
    return timer.deadline


def test_two_agreeing_answers_decide_public_and_the_verdict_is_rechecked_on_schedule() -> None:
    machine, actions = _machine()
    asks = _asks(actions)
    assert sorted(a.peer for a in asks) == ["s0", "s1", "s2"] and all(a.addrs == ADDRS for a in asks)
    assert machine.step(1.0, _answer(asks[0], DIALLED)) == []  # one vote decides nothing
    decided = machine.step(1.5, _answer(asks[1], DIALLED))
    assert _verdicts(decided) == [ReachabilityChanged("public", "2 of 2 servers: dialled back")]
    assert machine.verdict == "public" and _recheck_at(decided) == 601.5
    assert machine.step(2.0, _answer(asks[2], NOT_DIALLED)) == []  # late: the check is over
    again = _asks(machine.step(601.5, TimerFired(("reachability", "recheck"))))
    assert len(again) == 3
    same = machine.step(602.0, _answer(again[0], DIALLED)) + machine.step(602.0, _answer(again[1], DIALLED))
    assert _verdicts(same) == []  # the same verdict again is not announced


def test_two_agreeing_not_dialled_answers_decide_private() -> None:
    machine, actions = _machine()
    asks = _asks(actions)
    machine.step(1.0, _answer(asks[0], NOT_DIALLED))
    verdicts = _verdicts(machine.step(1.0, _answer(asks[1], NOT_DIALLED)))
    assert [v.reachability for v in verdicts] == ["private"] and "not dialled back" in verdicts[0].reason


def test_a_lying_server_is_outvoted_and_the_disagreement_brings_the_recheck_forward() -> None:
    machine, actions = _machine()
    liar, honest_a, honest_b = _asks(actions)
    assert machine.step(1.0, _answer(liar, DIALLED)) == []
    assert machine.step(1.0, _answer(honest_a, NOT_DIALLED)) == []
    decided = machine.step(2.0, _answer(honest_b, NOT_DIALLED))
    assert [v.reachability for v in _verdicts(decided)] == ["private"]
    assert _verdicts(decided)[0].reason.startswith("2 of 3 servers")
    assert _recheck_at(decided) == 2.0 + CONFIG.retry_s  # answers disagreed: checked again soon


def test_disagreement_with_no_server_left_is_inconclusive_and_retried() -> None:
    machine, actions = _machine(members=2)
    first, second = _asks(actions)
    machine.step(1.0, _answer(first, DIALLED))
    ended = machine.step(1.0, _answer(second, NOT_DIALLED))
    assert _verdicts(ended) == [] and machine.verdict is None
    (note,) = [a.event for a in ended if isinstance(a, Notify)]
    assert isinstance(note, CheckInconclusive) and note.retry_at == 31.0
    assert _asks(machine.step(31.0, TimerFired(("reachability", "recheck")))) == []  # their votes still count
    assert len(_asks(machine.step(61.0, TimerFired(("reachability", "recheck"))))) == 2  # now too old: asked again


def test_timeouts_failures_and_cannot_serve_are_no_votes_and_the_next_candidate_is_asked() -> None:
    machine, actions = _machine(members=5)
    asks = _asks(actions)
    assert len(asks) == 3
    timer = [a for a in actions if isinstance(a, SetTimer) and a.key == ("dialback", asks[0].peer, asks[0].nonce)]
    assert timer and timer[0].deadline == 10.0
    replaced = _asks(machine.step(10.0, TimerFired(timer[0].key)))
    replaced += _asks(machine.step(10.0, DialBackFailed(asks[1].peer, asks[1].nonce, "stream reset")))
    assert len(replaced) == 2 and {a.peer for a in replaced}.isdisjoint(a.peer for a in asks)
    assert _asks(machine.step(11.0, _answer(asks[2], CANNOT_SERVE))) == []  # nobody left to ask
    machine.step(11.0, _answer(replaced[0], DIALLED))
    assert [v.reachability for v in _verdicts(machine.step(11.0, _answer(replaced[1], DIALLED)))] == ["public"]
    assert machine.statistics()["no_votes"] == 3


def test_too_few_servers_leave_no_verdict_until_another_member_comes_up() -> None:
    machine, actions = _machine(members=1)
    (only,) = _asks(actions)
    ended = machine.step(1.0, _answer(only, DIALLED))
    assert _verdicts(ended) == [] and any(isinstance(a, Notify) for a in ended)
    (late,) = _asks(machine.step(5.0, MemberUp("late", "198.18.0.99")))  # s0's vote still counts: not asked again
    assert late.peer == "late"
    verdicts = _verdicts(machine.step(6.0, _answer(late, DIALLED)))
    assert [v.reachability for v in verdicts] == ["public"] and verdicts[0].reason.startswith("2 of 2")


def test_the_votes_of_an_inconclusive_check_expire_after_retry_s() -> None:
    machine, actions = _machine(members=1)
    (only,) = _asks(actions)
    machine.step(1.0, _answer(only, DIALLED))
    assert _asks(machine.step(20.0, TimerFired(("reachability", "recheck")))) == []  # s0's vote of t=1 still counts
    again = _asks(machine.step(61.0, TimerFired(("reachability", "recheck"))))
    assert [a.peer for a in again] == ["s0"]  # its vote of t=1 is older than 2 x retry_s: asked again


def test_a_recheck_timer_during_a_running_check_does_not_restart_it() -> None:
    machine, actions = _machine(members=3)
    asks = _asks(actions)
    assert machine.step(0.5, TimerFired(("reachability", "recheck"))) == []
    machine.step(1.0, _answer(asks[0], DIALLED))
    assert _verdicts(machine.step(1.0, _answer(asks[1], DIALLED)))  # the answers still belong to the running check


def test_no_member_at_all_is_inconclusive_without_any_question() -> None:
    _, actions = _machine(members=0)
    assert _asks(actions) == [] and any(isinstance(a, Notify) for a in actions)


def test_a_lost_server_is_no_vote() -> None:
    machine, actions = _machine(members=3)
    asks = _asks(actions)
    machine.step(1.0, PeerDown(asks[0].peer))
    machine.step(1.0, _answer(asks[1], NOT_DIALLED))
    verdicts = _verdicts(machine.step(1.0, _answer(asks[2], NOT_DIALLED)))
    assert [v.reachability for v in verdicts] == ["private"]
    assert machine.step(2.0, _answer(asks[0], DIALLED)) == []  # its late answer counts for nothing


def test_an_observed_ip_that_is_not_ours_says_private_at_once_and_is_confirmed_soon() -> None:
    machine, actions = _machine()
    asks = _asks(actions)
    decided = machine.step(1.0, _answer(asks[0], DIALLED, observed_ip="198.18.0.201"))  # whatever the server says
    verdicts = _verdicts(decided)
    assert [v.reachability for v in verdicts] == ["private"] and "seen from 198.18.0.201" in verdicts[0].reason
    assert _recheck_at(decided) == 1.0 + CONFIG.retry_s
    again = _asks(machine.step(31.0, TimerFired(("reachability", "recheck"))))
    machine.step(32.0, _answer(again[0], NOT_DIALLED, observed_ip="198.18.0.201"))
    assert _verdicts(machine.step(32.0, _answer(again[1], NOT_DIALLED, observed_ip="198.18.0.201"))) == []
    assert machine.verdict == "private"


def test_once_there_is_a_verdict_a_lying_observed_ip_is_only_one_vote() -> None:
    machine, actions = _machine()
    asks = _asks(actions)
    machine.step(1.0, _answer(asks[0], DIALLED))
    machine.step(1.0, _answer(asks[1], DIALLED))
    assert machine.verdict == "public"
    again = _asks(machine.step(601.0, TimerFired(("reachability", "recheck"))))
    assert _verdicts(machine.step(602.0, _answer(again[0], NOT_DIALLED, observed_ip="203.0.113.66"))) == []
    machine.step(602.0, _answer(again[1], DIALLED))
    assert _verdicts(machine.step(602.0, _answer(again[2], DIALLED))) == [] and machine.verdict == "public"


def test_one_server_per_ip_and_never_one_on_our_own_ip() -> None:
    machine = ReachabilityCheck(CONFIG, random.Random(3))
    for peer, ip in (("a", "198.18.0.10"), ("b", "198.18.0.10"), ("c", OWN_IP), ("d", "198.18.0.11"), ("e", None)):
        machine.step(0.0, MemberUp(peer, ip))
    asks = _asks(machine.step(0.0, AddressesChanged(ADDRS, (OWN_IP,))))
    peers = sorted(a.peer for a in asks)
    assert len(peers) == 2 and peers[1] == "d" and peers[0] in ("a", "b")


def test_the_choice_of_servers_is_seeded() -> None:
    def chosen(seed: int) -> list[str]:
        _, actions = _machine(members=8, seed=seed)
        return sorted(a.peer for a in _asks(actions))

    assert chosen(7) == chosen(7)
    assert len({tuple(chosen(seed)) for seed in range(8)}) > 1


def test_changed_addresses_start_a_new_check_and_the_same_ones_do_not() -> None:
    machine, actions = _machine()
    old = _asks(actions)
    assert machine.step(1.0, AddressesChanged(ADDRS, (OWN_IP, "127.0.0.1"))) == []
    new = _asks(machine.step(1.0, AddressesChanged(("/ip4/198.18.0.5/tcp/7500",), (OWN_IP,))))
    assert len(new) == 3 and new[0].addrs == ("/ip4/198.18.0.5/tcp/7500",)
    assert machine.step(2.0, _answer(old[0], DIALLED)) == []  # an answer to the abandoned check


# ---- serving ------------------------------------------------------------------------------------------------------


def test_the_server_dials_only_addresses_on_the_observed_ip() -> None:
    server = DialBackServer(CONFIG)
    request = DialBackRequest(1, ("/ip4/198.18.0.5/tcp/7400", "/ip4/203.0.113.9/tcp/22", "/ip4/198.18.0.5/tcp/1/x"))
    assert server.decide(0.0, "p", "198.18.0.5", request, True) == DialAddrs(("/ip4/198.18.0.5/tcp/7400",))
    other = server.decide(0.0, "q", "198.18.0.7", request, True)
    assert isinstance(other, Answer) and other.response.status == NOT_DIALLED
    assert other.response.observed_ip == "198.18.0.7"


def test_a_server_that_cannot_serve_says_so() -> None:
    server = DialBackServer(CONFIG)
    request = DialBackRequest(4, ("/ip4/198.18.0.5/tcp/7400",))
    refused = server.decide(0.0, "p", "198.18.0.5", request, False)
    assert isinstance(refused, Answer) and refused.response == DialBackResponse(
        4, CANNOT_SERVE, "198.18.0.5", "this peer is not known to be publicly dialable"
    )
    relayed = server.decide(0.0, "p", None, request, True)
    assert isinstance(relayed, Answer) and relayed.response.status == CANNOT_SERVE


def test_the_server_rate_limits_per_requester_and_per_ip() -> None:
    config = ReachabilityConfig(serve_interval_s=30.0, max_requests_per_ip=2)
    server = DialBackServer(config)
    request = DialBackRequest(1, ("/ip4/198.18.0.5/tcp/7400",))
    assert isinstance(server.decide(0.0, "p", "198.18.0.5", request, True), DialAddrs)
    again = server.decide(10.0, "p", "198.18.0.5", request, True)
    assert isinstance(again, Answer) and again.response.status == CANNOT_SERVE
    assert isinstance(server.decide(10.0, "q", "198.18.0.5", request, True), DialAddrs)
    third = server.decide(11.0, "r", "198.18.0.5", request, True)  # a third identity on one IP
    assert isinstance(third, Answer) and "rate limited" in third.response.reason
    assert isinstance(server.decide(30.0, "p", "198.18.0.5", request, True), DialAddrs)
    assert server.counters["rate_limited"] == 2


# ---- wire and config ----------------------------------------------------------------------------------------------


def test_wire_messages_round_trip_and_bad_ones_are_decode_errors() -> None:
    for msg in (DialBackRequest(7, ADDRS), DialBackResponse(7, DIALLED, OWN_IP, "dialled")):
        assert SCHEMA.decode(SCHEMA.encode(msg)) == msg
    with pytest.raises(ValueError):
        DialBackRequest(1, ())
    with pytest.raises(ValueError):
        DialBackRequest(1, tuple(f"/ip4/1.2.3.4/tcp/{p}" for p in range(1, 10)))
    bad = [
        b"\x01",
        encode_frame_header(3),
        SCHEMA.encode(DialBackRequest(1, ADDRS))[:-3],
        SCHEMA.encode(DialBackResponse(1, DIALLED, "", "x")).replace(b"\x01\xa0", b"\x09\xa0"),  # status 9
        SCHEMA.encode(DialBackRequest(1, ADDRS))[:2] + b"\x92\xc3\x90",  # a bool nonce
        b"\x01\x00\x92\x01\x91\xda\x01\x2c" + b"a" * 300,  # a request with one address of 300 characters
    ]
    for body in bad:
        with pytest.raises(DecodeError):
            SCHEMA.decode(body)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        ReachabilityConfig(confirmations=4, servers=3)
    with pytest.raises(ConfigError):
        ReachabilityConfig(answer_timeout_s=2.0, dial_timeout_s=5.0)
    with pytest.raises(ConfigError):
        ReachabilityConfig(retry_s=float("inf"))
