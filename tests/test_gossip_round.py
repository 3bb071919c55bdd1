"""The gossip round machine with no I/O: feed events, assert the exact actions, deadlines and counters."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gossip.messages import SparseUpdate, model_fingerprint
from gossip.round import (
    ACCEPT_FACTOR,
    ELIGIBLE_FACTOR,
    GossipConfig,
    GossipRound,
    PeersUp,
    RoundCompleted,
    StartRound,
    pair_coin,
    pair_coins,
)
from swarmgrad.core.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Compute,
    Computed,
    Event,
    Notify,
    PeerDown,
    PeerUp,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
    settle,
)
from training.topk import TopKSelector, pack_sparse, unpack_sparse

NUMEL = 200
FP = model_fingerprint([(NUMEL,)])
DEADLINE_S = 2.0


def config(**overrides: object) -> GossipConfig:
    values: dict[str, object] = {
        "swarm_id": "test",
        "density": 0.05,
        "round_deadline_s": DEADLINE_S,
        "seed": 1,
        "neighbours_per_round": 2,
        "value_format": "fp32",
    }
    values.update(overrides)
    return GossipConfig(**values)  # type: ignore[arg-type]


def machine(peers: list[str], seed: int = 1, **overrides: object) -> GossipRound:
    m = GossipRound(config(**overrides), "me", NUMEL, FP, random.Random(seed), TopKSelector())
    for peer in peers:
        settle(m, 0.0, PeerUp(peer))
    return m


def update(round_: int, value: float = 1.0, reply: bool = False, numel: int = NUMEL, **fields: object) -> SparseUpdate:
    indices = torch.arange(0, NUMEL, NUMEL // 10, dtype=torch.int64)
    payload = pack_sparse(indices, torch.full((indices.numel(),), value), numel, value_format="fp32")
    args: dict[str, object] = {"swarm_id": "test", "round": round_, "fingerprint": FP, "reply": reply, "clock": round_}
    args.update(fields)
    return SparseUpdate(payload=payload, **args)  # type: ignore[arg-type]


def body(send: Send) -> SparseUpdate:
    assert isinstance(send.msg, SparseUpdate)
    return send.msg


def sends(actions: list[Action]) -> list[Send]:
    return [a for a in actions if isinstance(a, Send)]


def completed(actions: list[Action]) -> RoundCompleted | None:
    done = [a.event for a in actions if isinstance(a, Notify) and isinstance(a.event, RoundCompleted)]
    assert len(done) <= 1
    return done[0] if done else None


def test_config_rejects_bad_values_naming_the_field() -> None:
    for field, value in [
        ("density", 0.0),
        ("density", 1.5),
        ("round_deadline_s", float("inf")),
        ("neighbours_per_round", 0),
        ("step_size", 1.5),
        ("aggregation", "median"),
        ("clip_radius", -1.0),
        ("value_format", "fp64"),
        ("max_future_rounds", -1),
        ("miss_backoff_rounds", -1),
        ("swarm_id", ""),
    ]:
        with pytest.raises(ConfigError) as info:
            config(**{field: value})
        assert info.value.field == field


def test_start_sends_to_chosen_neighbours_with_the_round_deadline() -> None:
    m = machine(["a", "b", "c", "d"])
    actions = settle(m, 10.0, StartRound(torch.randn(NUMEL)))
    out = sends(actions)
    assert len(out) == 2 and len({s.peer for s in out}) == 2
    assert all(s.deadline == 10.0 + DEADLINE_S for s in out)
    assert all(isinstance(s.msg, SparseUpdate) and s.msg.round == 0 and not s.msg.reply for s in out)
    assert SetTimer(("gossip-round", 0), 10.0 + DEADLINE_S) in actions
    with pytest.raises(LocalProtocolError):
        settle(m, 10.5, StartRound(torch.randn(NUMEL)))


def test_neighbour_choice_is_deterministic_per_seed_and_fresh_each_round() -> None:
    def choices(seed: int) -> list[tuple[str, ...]]:
        m = machine([f"p{i:02d}" for i in range(12)], seed=seed)
        rounds = []
        for r in range(8):
            rounds.append(tuple(s.peer for s in sends(settle(m, float(r), StartRound(torch.randn(NUMEL))))))
            settle(m, float(r) + DEADLINE_S, TimerFired(("gossip-round", r)))
        return rounds

    assert choices(5) == choices(5)
    assert choices(5) != choices(6)
    assert len(set(choices(5))) > 4  # a fresh choice most rounds


def test_round_never_waits_past_its_deadline_and_keeps_own_params() -> None:
    m = machine(["a", "b"])
    params = torch.randn(NUMEL)
    handed = params.clone()
    settle(m, 0.0, StartRound(handed))
    assert settle(m, DEADLINE_S - 0.1, TimerFired(("gossip-round", 7))) == []  # another round's timer: ignored
    done = completed(settle(m, DEADLINE_S, TimerFired(("gossip-round", 0))))
    assert done is not None and done.timed_out and done.round == 0
    assert done.missing == ("a", "b") and done.contributors == ()
    assert torch.equal(done.params, params) and done.params.data_ptr() == handed.data_ptr()  # no copy
    assert m.statistics()["rounds_timed_out"] == 1


def test_a_neighbour_that_missed_the_deadline_is_avoided_for_a_few_rounds() -> None:
    m = machine(["a", "b", "c"], miss_backoff_rounds=2)
    first = sorted(s.peer for s in sends(settle(m, 0.0, StartRound(torch.zeros(NUMEL)))))
    answered, missed = first
    settle(m, 0.1, Received(answered, update(0, reply=True)))
    settle(m, DEADLINE_S, TimerFired(("gossip-round", 0)))
    for r in (1, 2):  # the two others are asked, not the one that missed
        asked = sorted(s.peer for s in sends(settle(m, 10.0 * r, StartRound(torch.zeros(NUMEL)))))
        assert missed not in asked and len(asked) == 2
        for peer in asked:
            settle(m, 10.0 * r + 0.1, Received(peer, update(r, reply=True)))
    alone = machine(["a"], miss_backoff_rounds=2)
    settle(alone, 0.0, StartRound(torch.zeros(NUMEL)))
    settle(alone, DEADLINE_S, TimerFired(("gossip-round", 0)))
    # the only eligible peer is still asked: a backed-off peer fills a place nobody else can
    assert [s.peer for s in sends(settle(alone, 10.0, StartRound(torch.zeros(NUMEL))))] == ["a"]


def test_two_peers_exchange_and_move_toward_each_other_before_the_deadline() -> None:
    a, b = machine(["b"], seed=1), machine(["a"], seed=2)
    xa, xb = torch.zeros(NUMEL), torch.ones(NUMEL)
    out_a = sends(settle(a, 0.0, StartRound(xa)))
    out_b = sends(settle(b, 0.0, StartRound(xb)))
    assert [s.peer for s in out_a] == ["b"] and [s.peer for s in out_b] == ["a"]
    # Both chose each other: each completes on the other's request, and still replies to it (its own request might
    # have reached the other in another round); the crossing replies then come late and change nothing.
    got_b = settle(b, 0.1, Received("a", out_a[0].msg))
    got_a = settle(a, 0.1, Received("b", out_b[0].msg))
    (reply_a,), (reply_b,) = sends(got_a), sends(got_b)
    assert (reply_a.peer, body(reply_a).reply, reply_b.peer, body(reply_b).reply) == ("b", True, "a", True)
    assert sends(settle(a, 0.2, Received("b", reply_b.msg))) == [] and a.statistics()["late_dropped"] == 1
    done_a, done_b = completed(got_a), completed(got_b)
    assert done_a is not None and done_b is not None and not done_a.timed_out
    assert CancelTimer(("gossip-round", 0)) in got_a
    moved_a = done_a.params.ne(0).nonzero().flatten()
    assert moved_a.numel() == a.k  # moved exactly on b's support, by step_size / 2 of the difference
    assert torch.allclose(done_a.params[moved_a], torch.full((a.k,), 0.5 * 0.5))


def test_batched_pair_coins_equal_the_single_coin_and_are_uniform() -> None:
    receivers = [f"peer-{i}" for i in range(2000)] + ["π-peer", ""]
    coins = pair_coins("test", 7, "me", receivers)
    assert coins.tolist() == [pair_coin("test", 7, "me", r) for r in receivers]  # bit for bit
    assert 0 <= coins.min() and coins.max() < 1 and abs(float(coins.mean()) - 0.5) < 0.02
    assert pair_coins("test", 7, "me", []).tolist() == []


def test_pair_coins_are_independent_of_the_pair_order_and_fresh_each_round() -> None:
    peers = [f"peer-{i}" for i in range(400)]
    forward = pair_coins("test", 3, "me", peers)
    backward = [pair_coin("test", 3, p, "me") for p in peers]
    later = pair_coins("test", 4, "me", peers)
    other_swarm = pair_coins("other", 3, "me", peers)
    for coins in (backward, later, other_swarm):  # correlation ~ N(0, 1/400) for independent coins
        assert abs(float(np.corrcoef(forward, coins)[0, 1])) < 0.2
    bound = ELIGIBLE_FACTOR * 3 / len(peers)
    assert 2 <= int((forward < bound).sum()) <= 12  # about 2m = 6 eligible


def test_peers_up_at_once_is_a_peer_up_for_each_other_peer() -> None:
    peers = [f"p{i}" for i in range(30)]
    one_by_one, at_once = machine(peers), machine([])
    assert settle(at_once, 0.0, PeersUp((*peers[:12], "me", *peers[12:]))) == []
    assert at_once.live_peers == one_by_one.live_peers == sorted(peers)
    x = torch.randn(NUMEL)
    chosen = [(s.peer, s.deadline) for s in sends(settle(at_once, 0.0, StartRound(x.clone())))]
    assert len(chosen) == 2  # neighbours_per_round
    assert chosen == [(s.peer, s.deadline) for s in sends(settle(one_by_one, 0.0, StartRound(x.clone())))]


def test_requests_get_one_reply_on_their_coordinates_and_count_only_if_the_sender_was_eligible() -> None:
    peers = [f"p{i}" for i in range(20)]
    m = machine(peers, neighbours_per_round=2)
    chosen_sends = sends(settle(m, 0.0, StartRound(torch.randn(NUMEL))))
    assert all(pair_coin("test", 0, "me", s.peer) < ELIGIBLE_FACTOR * 2 / len(peers) for s in chosen_sends)
    chosen, second = chosen_sends[0].peer, chosen_sends[1].peer
    others = [p for p in peers if p not in (chosen, second)]
    bound = ACCEPT_FACTOR * 2 / len(peers)
    eligible = next(p for p in others if pair_coin("test", 0, p, "me") < bound)
    ineligible = next(p for p in others if pair_coin("test", 0, p, "me") >= bound)
    for peer in (eligible, ineligible):
        reply = sends(settle(m, 0.1, Received(peer, update(0))))
        assert len(reply) == 1 and reply[0].peer == peer and body(reply[0]).reply and reply[0].deadline == DEADLINE_S
        assert _indices(body(reply[0])) == _indices(update(0))  # answered on the requester's coordinates
    assert completed(settle(m, 0.2, Received(chosen, update(0, reply=True)))) is None
    done = completed(settle(m, 0.3, Received(second, update(0, reply=True))))
    assert done is not None and done.contributors == tuple(sorted([chosen, second, eligible]))
    assert m.statistics()["unsolicited_answered"] == 1


def test_replayed_stale_and_mismatched_updates_are_remote_errors_and_change_nothing() -> None:
    m = machine(["a", "b"])
    settle(m, 0.0, StartRound(torch.randn(NUMEL)))
    settle(m, 0.1, Received("a", update(0)))
    before = m.statistics()
    for peer, msg in [
        ("a", update(0)),  # replay of the same round
        ("b", update(0, swarm_id="other")),
        ("b", update(0, fingerprint=b"x" * 16)),
        ("b", update(0, numel=NUMEL + 1)),
        ("b", "not an update"),
    ]:
        with pytest.raises(RemoteProtocolError) as info:
            settle(m, 0.2, Received(peer, msg))
        assert info.value.peer == peer
    assert m.statistics() == before
    settle(m, 1.0, TimerFired(("gossip-round", 0)))
    # a request and a reply for one round can both be honest (a request answered from another round), two replies not
    settle(m, 1.1, Received("a", update(0, reply=True, clock=7)))
    with pytest.raises(RemoteProtocolError, match="replayed round 0"):
        settle(m, 1.2, Received("a", update(0, reply=True, clock=8)))


def test_a_late_reply_after_the_senders_next_request_is_aggregated_but_far_older_requests_are_stale() -> None:
    m = machine(["a"], neighbours_per_round=1, max_future_rounds=2)
    assert [s.peer for s in sends(settle(m, 0.0, StartRound(torch.zeros(NUMEL))))] == ["a"]
    # a finished round 0 (without us) and already asks for round 1, then answers our round-0 request late
    assert settle(m, 0.1, Received("a", update(1))) == []
    done = completed(settle(m, 0.2, Received("a", update(0, reply=True))))
    assert done is not None and done.contributors == ("a",) and not done.timed_out
    assert m.statistics()["future_buffered"] == 1
    for r in (3, 5):
        settle(m, 0.3, Received("a", update(r)))
    settle(m, 0.35, Received("a", update(1, reply=True)))  # replies carry our rounds: never stale, only late
    with pytest.raises(RemoteProtocolError, match="stale round 2"):  # 5 - 2 is beyond max_future_rounds = 2
        settle(m, 0.4, Received("a", update(2)))


def test_late_updates_are_dropped_and_counted_but_a_late_request_still_gets_an_answer() -> None:
    m = machine(["a", "b"], neighbours_per_round=1)
    chosen = sends(settle(m, 0.0, StartRound(torch.randn(NUMEL))))[0].peer
    other = "b" if chosen == "a" else "a"
    settle(m, DEADLINE_S, TimerFired(("gossip-round", 0)))
    answer = sends(settle(m, 2.5, Received(other, update(0))))
    assert [s.peer for s in answer] == [other] and body(answer[0]).round == 0 and body(answer[0]).reply
    assert answer[0].deadline == 2.5 + DEADLINE_S
    assert sends(settle(m, 2.6, Received(chosen, update(0, reply=True)))) == []
    assert m.statistics()["late_dropped"] == 2


def test_a_late_request_for_an_older_round_is_answered_from_the_public_copy() -> None:
    m = machine(["a", "b", "c"], neighbours_per_round=1, max_future_rounds=2)
    x = torch.linspace(-1.0, 1.0, NUMEL)
    asked = []
    for r in range(2):
        asked.append(sends(settle(m, 10.0 * r, StartRound(x)))[0].peer)
        settle(m, 10.0 * r + DEADLINE_S, TimerFired(("gossip-round", r)))
    # round 0 is two rounds back: a peer that was not sent anything in round 0 still gets an answer
    other = next(p for p in ["a", "b", "c"] if p not in asked)
    answer = sends(settle(m, 30.0, Received(other, update(0))))
    assert len(answer) == 1 and body(answer[0]).round == 0 and body(answer[0]).reply
    indices, values = unpack_sparse(body(answer[0]).payload, NUMEL)
    # on the requester's coordinates that this peer has told (never a 0 it did not say), with the told values
    assert indices.size and set(indices.tolist()) < _indices(update(0))
    assert np.array_equal(values, x.numpy()[indices])
    # also the peer asked in round 0: that request may have reached it in another round, where it did not count
    assert len(sends(settle(m, 30.1, Received(asked[0], update(0))))) == 1
    assert m.statistics()["late_replies_sent"] == 2


def test_future_updates_are_buffered_up_to_a_bound_and_used_in_their_round() -> None:
    m = machine(["a", "b", "c"], neighbours_per_round=3, max_future_rounds=2, max_buffered_updates=2)
    assert settle(m, 0.0, Received("a", update(1, value=5.0))) == []  # next round is 0: round 1 is future
    assert settle(m, 0.0, Received("b", update(1))) == []
    assert settle(m, 0.0, Received("c", update(1))) == []  # buffer full (2)
    # beyond the window: answered at once with what this peer has told (nothing yet) and its clock
    (answer,) = sends(settle(m, 0.0, Received("c", update(9))))
    assert (body(answer).round, body(answer).reply, body(answer).clock, body(answer).payload.k) == (9, True, 0, 0)
    stats = m.statistics()
    assert (stats["future_buffered"], stats["buffer_full_dropped"], stats["future_dropped"]) == (2, 1, 1)
    # The peers are in round 1 already (lower median of 1, 1, 9): this peer joins round 1 and uses the buffer.
    actions = settle(m, 3.0, StartRound(torch.zeros(NUMEL)))
    assert {body(s).round for s in sends(actions)} == {1} and completed(actions) is None
    done = completed(settle(m, 3.0 + DEADLINE_S, TimerFired(("gossip-round", 1))))
    assert done is not None and done.contributors == ("a", "b") and done.missing == ("c",)
    assert float(done.params.max()) > 0


def test_a_lagging_peer_catches_up_to_the_median_round_of_its_peers() -> None:
    m = machine(["a", "b", "c"], max_future_rounds=0)
    for peer, round_ in [("a", 40), ("b", 41), ("c", 10**6)]:
        settle(m, 0.0, Received(peer, update(round_)))  # too far ahead to buffer, but remembered
    out = sends(settle(m, 1.0, StartRound(torch.zeros(NUMEL))))
    assert {body(s).round for s in out} == {41}  # lower median of (40, 41, 10**6): the outlier cannot drag it


def test_send_failure_and_peer_down_stop_the_wait_for_that_neighbour() -> None:
    m = machine(["a", "b"], neighbours_per_round=2)
    settle(m, 0.0, StartRound(torch.zeros(NUMEL)))
    assert completed(settle(m, 0.1, SendFailed("a", "deadline passed"))) is None
    done = completed(settle(m, 0.2, PeerDown("b")))
    assert done is not None and not done.timed_out and done.missing == ()
    assert m.live_peers == ["a"]


def test_error_feedback_cycles_through_coordinates_and_its_absence_repeats_them() -> None:
    def supports(error_feedback: bool) -> list[set[int]]:
        m = machine(["a"], error_feedback=error_feedback, miss_backoff_rounds=0)
        x = torch.linspace(1.0, 2.0, NUMEL)
        seen = []
        for r in range(4):
            seen.append(_indices(body(sends(settle(m, float(r), StartRound(x)))[0])))
            settle(m, float(r) + DEADLINE_S, TimerFired(("gossip-round", r)))
        return seen

    with_ef, without = supports(True), supports(False)
    assert all(not (with_ef[i] & with_ef[j]) for i in range(4) for j in range(i + 1, 4))
    assert all(s == without[0] for s in without)


def _indices(msg: SparseUpdate) -> set[int]:
    indices, _ = unpack_sparse(msg.payload, NUMEL)
    return set(indices.tolist())


def test_machine_rejects_misuse() -> None:
    m = machine(["a"])
    with pytest.raises(LocalProtocolError):
        settle(m, 0.0, StartRound(torch.zeros(NUMEL + 1)))
    with pytest.raises(LocalProtocolError):
        settle(m, 0.0, StartRound(torch.full((NUMEL,), float("nan"))))
    bogus: Event = TimerFired(("gossip-round", 0))
    assert settle(m, 0.0, bogus) == []


class RecordingSelector:
    """A compressor that counts its calls, to show the machine leaves the tensor work to `Compute`."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = TopKSelector()

    def __call__(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.inner(x, k)


def computes(actions: list[Action]) -> list[Compute]:
    return [a for a in actions if isinstance(a, Compute)]


def test_a_round_hands_its_tensor_work_out_and_buffers_its_messages_meanwhile() -> None:
    selector = RecordingSelector()
    m = GossipRound(config(), "me", NUMEL, FP, random.Random(1), selector)
    for peer in ["a", "b"]:
        m.step(0.0, PeerUp(peer))
    params = torch.randn(NUMEL)
    start = m.step(1.0, StartRound(params))
    assert [type(a) for a in start] == [Compute] and selector.calls == 0  # nothing selected inside the step
    # a request for the round that arrives while its support is being selected waits for the round
    assert m.step(1.1, Received("a", update(0, 5.0))) == []
    began = m.step(1.2, Computed(start[0].key, start[0].work()))
    assert selector.calls == 1
    assert sorted(s.peer for s in sends(began) if body(s).reply) == ["a"]  # the buffered request is answered
    assert m.statistics()["updates_aggregated"] == 1
    finish = m.step(1.3, Received("b", update(0, 3.0, reply=True)))
    (aggregation,) = computes(finish)
    assert completed(finish) is None and m.clock == 1  # the round is over; its result comes with the computation
    # a request for the finished round, before the aggregation is back: answered from the public copy
    late = m.step(1.4, Received("c", update(0, 1.0)))
    (reply,) = sends(late)
    told_indices, told_values = unpack_sparse(body(reply).payload, NUMEL)
    told_before = {i for s in sends(began) for i in unpack_sparse(body(s).payload, NUMEL)[0].tolist()}
    assert told_indices.size and set(told_indices.tolist()) <= told_before
    assert np.array_equal(told_values, params.numpy()[told_indices])  # what this peer told, not the vector being mixed
    done = completed(m.step(1.5, Computed(aggregation.key, aggregation.work())))
    assert done is not None and done.round == 0 and done.contributors == ("a", "b")
    assert done.params.data_ptr() == params.data_ptr()
    with pytest.raises(LocalProtocolError):
        m.step(1.6, Computed(aggregation.key, aggregation.work()))  # a result nobody asked for: our bug


def test_no_step_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    m = machine(["a"])
    monkeypatch.setenv("SWARMGRAD_TOPK_FALLBACK", "not-a-choice")  # read only when a selector is built
    done = completed(
        settle(m, 0.0, StartRound(torch.randn(NUMEL))) + settle(m, DEADLINE_S, TimerFired(("gossip-round", 0)))
    )
    assert done is not None and done.timed_out
    with pytest.raises(ConfigError):
        TopKSelector()


def test_a_peer_that_holds_answers_at_once_the_requests_it_buffered_for_the_rounds_it_skipped() -> None:
    """Found by `tests/test_round_clock.py` ("four, one far ahead", seed 15): the three peers behind asked the leader
    before its first start, for rounds 0-2, which were then its future rounds (buffered). It started at round 200 and
    held, and the buffered requests were answered only when a round began: each peer behind waited out its deadline."""
    m = machine(["a", "b", "c"], neighbours_per_round=3)  # 4 peers: f = 1, so 3 far behind make it hold
    for peer, round_ in [("a", 0), ("b", 1), ("c", 2)]:
        assert settle(m, 0.0, Received(peer, update(round_))) == []  # within max_future_rounds of round 0: buffered
    actions = settle(m, 0.01, StartRound(torch.zeros(NUMEL), not_before=200))
    done = completed(actions)
    assert done is not None and done.held and done.round == 200
    answers = sorted((s.peer, body(s).round, body(s).reply, body(s).clock, s.deadline) for s in sends(actions))
    assert answers == [(peer, r, True, 200, 0.01 + DEADLINE_S) for peer, r in [("a", 0), ("b", 1), ("c", 2)]]
    assert m.statistics()["late_replies_sent"] == 3
    # held still at the next start: nothing is buffered any more, so nothing is answered twice
    again = settle(m, 0.05, StartRound(torch.zeros(NUMEL), not_before=200))
    assert (held := completed(again)) is not None and held.held and sends(again) == []
