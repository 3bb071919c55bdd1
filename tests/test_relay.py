"""Machine tests for `p2p.relay.RelayClient` (which relays a private peer reserves on, when it renews, what it
advertises) and the relay configs: feed inputs, assert the actions. No trio, no sockets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2p.relay import (
    FindRelays,
    ReachabilityIs,
    RelayAddrsChanged,
    RelayClient,
    RelayClientConfig,
    RelayDown,
    RelayDropped,
    RelayInfo,
    RelayServiceConfig,
    RelaysFound,
    Reserve,
    Reserved,
    ReserveFailed,
    circuit_addr,
    relays_key,
)
from swarmgrad.core.errors import ConfigError, LocalProtocolError
from swarmgrad.core.machine import CancelTimer, Effect, Notify, SetTimer, TimerFired
from swarmgrad.netconfig import NetworkConfig

RELAYS = tuple(RelayInfo(f"r{i}", (f"/ip4/198.18.0.{i}/tcp/7400",)) for i in range(1, 5))


def make(seed: int = 1, **overrides: object) -> RelayClient:
    return RelayClient("me", RelayClientConfig(**overrides), random.Random(seed))  # type: ignore[arg-type]


def outputs(actions: list) -> list:
    """The notifications and effects, in order."""
    return [a.event if isinstance(a, Notify) else a for a in actions if isinstance(a, Notify | Effect)]


def reserves(actions: list) -> list[str]:
    return sorted(a.relay for a in actions if isinstance(a, Reserve))


def private_with_relays(client: RelayClient, relays: tuple[RelayInfo, ...] = RELAYS) -> list[str]:
    """Turn `client` private, answer its lookup with `relays`; the relays it then asks."""
    assert outputs(client.step(0.0, ReachabilityIs("private"))) == [FindRelays()]
    return reserves(client.step(0.1, RelaysFound(relays)))


def test_a_private_peer_looks_up_and_reserves_on_two_relays_then_advertises_their_circuit_addresses() -> None:
    client = make()
    asked = private_with_relays(client)
    assert len(asked) == 2 and set(asked) <= {r.peer for r in RELAYS}
    first, second = asked
    actions = client.step(0.2, Reserved(first, 600.0))
    assert SetTimer(("relay", "refresh", first), 0.2 + 300.0) in actions
    assert outputs(actions) == [
        RelayAddrsChanged((circuit_addr(f"/ip4/198.18.0.{first[1]}/tcp/7400", first, "me"),), (first,))
    ]
    actions = client.step(0.3, Reserved(second, 600.0))
    (changed,) = outputs(actions)
    assert changed.relays == (first, second) and len(changed.addrs) == 2
    assert changed.addrs[1] == f"/ip4/198.18.0.{second[1]}/tcp/7400/p2p/{second}/p2p-circuit/p2p/me"
    assert client.reserved_relays() == [first, second]
    assert client.statistics()["reserved"] == 2


def test_the_choice_is_seeded_and_does_not_depend_on_the_order_relays_are_found() -> None:
    picks = {tuple(private_with_relays(make(seed=7), RELAYS)) for _ in range(3)}
    picks.add(tuple(private_with_relays(make(seed=7), tuple(reversed(RELAYS)))))
    assert len(picks) == 1
    by_seed = {tuple(private_with_relays(make(seed=seed))) for seed in range(20)}
    assert len(by_seed) > 1, "different seeds spread the peers over the relays"


def test_a_public_peer_or_one_without_a_verdict_reserves_nothing() -> None:
    client = make()
    assert client.step(0.0, RelaysFound(RELAYS)) == []
    assert client.step(0.0, ReachabilityIs("public")) == []
    assert client.step(1.0, RelaysFound(RELAYS)) == []


def test_a_reservation_is_renewed_after_half_its_lifetime_without_a_new_advertisement() -> None:
    client = make(relays=1)
    (relay,) = private_with_relays(client)
    client.step(1.0, Reserved(relay, 100.0))
    addrs = {r.peer: r.addrs for r in RELAYS}[relay]
    assert outputs(client.step(51.0, TimerFired(("relay", "refresh", relay)))) == [Reserve(relay, addrs)]
    actions = client.step(52.0, Reserved(relay, 100.0))
    assert outputs(actions) == []  # same addresses: nothing to republish
    assert SetTimer(("relay", "refresh", relay), 102.0) in actions
    assert client.statistics()["renewals"] == 1


def test_a_relay_that_goes_down_is_replaced_and_not_asked_again_before_retry_s() -> None:
    client = make(relays=1, retry_s=30.0)
    (relay,) = private_with_relays(client, RELAYS[:2])
    other = ({"r1", "r2"} - {relay}).pop()
    client.step(1.0, Reserved(relay, 600.0))
    actions = client.step(5.0, RelayDown(relay))
    assert CancelTimer(("relay", "refresh", relay)) in actions
    assert outputs(actions) == [
        RelayDropped(relay, "the relay went down"),
        Reserve(other, {r.peer: r.addrs for r in RELAYS}[other]),
        RelayAddrsChanged((), ()),
    ]
    actions = client.step(6.0, ReserveFailed(other, "refused with status RESOURCE_LIMIT_EXCEEDED"))
    assert reserves(actions) == []  # both failed within retry_s: wait, look up again later
    assert SetTimer(("relay", "find"), 6.0 + 5.0) in actions
    assert outputs(client.step(11.0, TimerFired(("relay", "find")))) == [FindRelays()]
    assert reserves(client.step(12.0, RelaysFound(RELAYS[:2]))) == []  # still within retry_s of both failures
    client.step(17.0, TimerFired(("relay", "find")))
    assert reserves(client.step(35.5, RelaysFound(RELAYS[:2]))) == [relay]  # 30 s after it went down, not the other


def test_no_relay_found_means_looking_up_again_every_find_interval_s() -> None:
    client = make(find_interval_s=2.0)
    client.step(0.0, ReachabilityIs("private"))
    actions = client.step(1.0, RelaysFound(()))
    assert actions == [SetTimer(("relay", "find"), 3.0)]
    assert outputs(client.step(3.0, TimerFired(("relay", "find")))) == [FindRelays()]
    assert reserves(client.step(3.5, RelaysFound(RELAYS[:1]))) == ["r1"]


def test_the_peer_itself_and_relays_without_addresses_are_never_chosen() -> None:
    client = make()
    found = (RelayInfo("me", ("/ip4/198.18.0.9/tcp/1",)), RelayInfo("r9", ()), RELAYS[0])
    assert private_with_relays(client, found) == ["r1"]


def test_turning_public_drops_every_reservation_and_the_circuit_addresses() -> None:
    client = make()
    for relay in private_with_relays(client):
        client.step(1.0, Reserved(relay, 600.0))
    actions = client.step(2.0, ReachabilityIs("public"))
    out = outputs(actions)
    assert [type(o) for o in out] == [RelayDropped, RelayDropped, RelayAddrsChanged]
    assert out[-1] == RelayAddrsChanged((), ())
    assert client.reserved_relays() == []
    late = client.step(3.0, Reserved("r1", 600.0))
    assert outputs(late) == []  # an answer to a request of the private days changes nothing


def test_circuit_addresses_are_capped_at_eight_over_the_relays() -> None:
    many = tuple(RelayInfo(f"r{i}", tuple(f"/ip4/198.18.0.{i}/tcp/{p}" for p in range(1, 9))) for i in (1, 2))
    client = make()
    for relay in private_with_relays(client, many):
        actions = client.step(1.0, Reserved(relay, 600.0))
    (changed,) = outputs(actions)
    assert len(changed.addrs) == 8 and {a.split("/p2p/")[1].split("/")[0] for a in changed.addrs} == {"r1", "r2"}


def test_an_unknown_event_or_timer_is_a_local_error() -> None:
    client = make()
    with pytest.raises(LocalProtocolError):
        client.step(0.0, TimerFired(("relay", "nope")))
    with pytest.raises(LocalProtocolError):
        client.step(0.0, object())  # type: ignore[arg-type]


def test_relays_key_is_per_swarm() -> None:
    assert relays_key("a") == "/swarmgrad/a/relays" != relays_key("b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_reservations", 0),
        ("max_circuits_per_peer", -1),
        ("max_circuit_bytes", 1.5),
        ("max_circuit_duration_s", 0),
        ("reservation_ttl_s", True),
    ],
)
def test_relay_service_limits_are_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RelayServiceConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        NetworkConfig(**{f"relay_{field}": value})  # type: ignore[arg-type]
    assert info.value.field == f"network.relay_{field}"


@pytest.mark.parametrize(
    ("field", "value"), [("relays", 0), ("refresh_fraction", 1.0), ("find_interval_s", 0), ("retry_s", float("inf"))]
)
def test_relay_client_config_is_validated(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        RelayClientConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field


def test_the_network_config_carries_the_relay_limits_to_the_node(tmp_path: Path) -> None:
    config = NetworkConfig(relay_max_reservations=3, relay_max_circuit_bytes=1024).node_config(tmp_path / "id.key")
    assert config.relay == RelayServiceConfig(max_reservations=3, max_circuit_bytes=1024)
