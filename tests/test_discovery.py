"""Discovery: member records (signing, tampering, expiry, swarm and peer binding), the DHT validator, config
checks, and a small swarm of real hosts in one process (join, lookup, records that expire after a peer leaves)."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from p2p.addrs import parse_peer_addr
from p2p.discovery import (
    CLOCK_SKEW_S,
    MAX_RECORD_TTL_S,
    RECORD_SCHEMA,
    BootstrapFailed,
    Discovery,
    DiscoveryConfig,
    MemberRecordValidator,
    bounded_connect,
    make_member_record,
    member_key,
    resolve_dns_addrs,
    verify_member_record,
)
from p2p.host import HostConfig, listen_multiaddrs, running_host
from p2p.identity import load_or_create_identity
from p2p.membership import CandidateFound, MembershipConfig, PeerForgotten
from p2p.node import NodeConfig, open_node
from swarmgrad.core.errors import ConfigError, DecodeError

NOW = 1_000_000.0
KEYS = create_new_key_pair(b"\x01" * 32)
OTHER = create_new_key_pair(b"\x02" * 32)


def record_bytes(swarm: str = "s1", expires: float = NOW + 60, keys=KEYS) -> tuple[str, bytes]:
    record = make_member_record(keys, swarm, ("/ip4/127.0.0.1/tcp/1",), expires)
    return member_key(swarm, record.peer_id), RECORD_SCHEMA.encode(record)


def test_a_signed_record_verifies() -> None:
    key, value = record_bytes()
    record = verify_member_record(key, value, NOW)
    assert record.swarm_id == "s1" and record.addrs == ("/ip4/127.0.0.1/tcp/1",)


def test_a_record_is_bound_to_its_swarm_and_peer() -> None:
    key, value = record_bytes(swarm="s1")
    peer = key.rsplit("/", 1)[1]
    with pytest.raises(DecodeError, match="stored under"):
        verify_member_record(member_key("s2", peer), value, NOW)
    other_peer = member_key("s1", make_member_record(OTHER, "s1", (), NOW + 1).peer_id)
    with pytest.raises(DecodeError, match="stored under"):
        verify_member_record(other_peer, value, NOW)
    with pytest.raises(DecodeError, match="not a member record key"):
        verify_member_record("/pk/whatever", value, NOW)


def test_tampered_or_foreign_signed_records_are_rejected() -> None:
    record = make_member_record(KEYS, "s1", ("/ip4/127.0.0.1/tcp/1",), NOW + 60)
    key = member_key("s1", record.peer_id)
    moved = dataclasses.replace(record, addrs=("/ip4/6.6.6.6/tcp/1",))
    with pytest.raises(DecodeError, match="bad signature"):
        verify_member_record(key, RECORD_SCHEMA.encode(moved), NOW)
    forged = dataclasses.replace(record, public_key=OTHER.public_key.serialize())
    with pytest.raises(DecodeError, match="does not belong"):
        verify_member_record(key, RECORD_SCHEMA.encode(forged), NOW)
    with pytest.raises(DecodeError):
        verify_member_record(key, b"\x01\x00garbage", NOW)


def test_records_expire_and_cannot_claim_a_long_life() -> None:
    key, value = record_bytes(expires=NOW + 10)
    verify_member_record(key, value, NOW + 10 + CLOCK_SKEW_S - 1)  # within the tolerated clock skew
    with pytest.raises(DecodeError, match="expired"):
        verify_member_record(key, value, NOW + 10 + CLOCK_SKEW_S)
    key, value = record_bytes(expires=NOW + MAX_RECORD_TTL_S + CLOCK_SKEW_S + 1)
    with pytest.raises(DecodeError, match="beyond"):
        verify_member_record(key, value, NOW)


def test_validator_rejects_bad_records_and_selects_the_latest() -> None:
    validator = MemberRecordValidator(lambda: NOW)
    key, old = record_bytes(expires=NOW + 10)
    _, new = record_bytes(expires=NOW + 50)
    validator.validate(key, new)
    with pytest.raises(ValueError, match="invalid swarmgrad record"):
        validator.validate(key, b"junk")
    assert validator.select(key, [old, b"junk", new]) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"swarm_id": "Has Space"}, "swarm_id"),
        ({"swarm_id": "s", "bootstrap_addrs": ("/ip4/127.0.0.1/tcp/1",)}, "bootstrap"),
        ({"swarm_id": "s", "bootstrap_addrs": ("not a multiaddr",)}, "bootstrap"),
        ({"swarm_id": "s", "record_ttl_s": 10.0, "republish_interval_s": 10.0}, "republish_interval_s"),
        ({"swarm_id": "s", "bootstrap_retry_s": 0}, "bootstrap_retry_s"),
        ({"swarm_id": "s", "record_ttl_s": MAX_RECORD_TTL_S * 2}, "record_ttl_s"),
    ],
)
def test_config_errors_name_the_value(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        DiscoveryConfig(**kwargs)
    assert info.value.field == field


def test_bootstrap_addr_parses() -> None:
    peer = make_member_record(KEYS, "s", (), NOW).peer_id
    info = parse_peer_addr("bootstrap", f"/ip4/127.0.0.1/tcp/4001/p2p/{peer}")
    assert info.peer_id.to_base58() == peer


# ---- real hosts in one process ----------------------------------------------------------------------------------


def node_config(tmp: Path, name: str, swarm: str, bootstrap: tuple[str, ...] = (), **discovery: float) -> NodeConfig:
    return NodeConfig(
        host=HostConfig(key_path=tmp / name / "identity.key"),
        discovery=DiscoveryConfig(swarm_id=swarm, bootstrap_addrs=bootstrap, **discovery),  # type: ignore[arg-type]
    )


async def test_unreachable_bootstrap_fails_fast_naming_the_address(tmp_path: Path) -> None:
    peer = make_member_record(KEYS, "s", (), NOW).peer_id
    addr = f"/ip4/127.0.0.1/tcp/1/p2p/{peer}"
    with trio.fail_after(15):
        with pytest.RaisesGroup(pytest.RaisesExc(BootstrapFailed, match="tcp/1/p2p"), flatten_subgroups=True):
            async with open_node(node_config(tmp_path, "a", "s", (addr,))):
                pytest.fail("the node must not start")


async def test_every_bootstrap_attempt_dials_again(tmp_path: Path) -> None:
    """py-libp2p refuses, for 60 s and without dialling, a peer whose addresses all failed once (its "negative
    cache"): a retry must dial again, and a failure must keep its real cause."""
    peer = make_member_record(KEYS, "s", (), NOW).peer_id
    info = parse_peer_addr("bootstrap", f"/ip4/127.0.0.1/tcp/1/p2p/{peer}")
    config = HostConfig(key_path=tmp_path / "a" / "identity.key")
    async with running_host(config) as host:
        reasons = [await bounded_connect(host, info, config) for _ in range(2)]
    for reason in reasons:
        assert reason is not None and "negative cache" not in reason and "connection failed" in reason


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(b"\x01" * 32, b"\x02" * 32), (None, b"\x02" * 32), (b"\x01" * 32, None)],
    ids=["another-key", "no-key-here", "no-key-there"],
)
async def test_a_wrong_or_missing_swarm_key_fails_within_the_handshake_timeout_naming_the_key(
    tmp_path: Path, ours: bytes | None, theirs: bytes | None
) -> None:
    """TCP comes up at once on loopback, and the handshake never completes: the dial ends after the handshake's
    bound, not the (much longer) TCP connect's, with a reason that names the swarm key."""
    listener = HostConfig(key_path=tmp_path / "b" / "identity.key", psk=theirs)
    dialer = HostConfig(key_path=tmp_path / "a" / "identity.key", psk=ours, connect_timeout_s=60.0)
    async with running_host(listener) as b, running_host(dialer) as a:
        info = parse_peer_addr("bootstrap", listen_multiaddrs(b)[0])
        started = trio.current_time()
        with trio.fail_after(30):
            reason = await bounded_connect(a, info, dialer)
        elapsed_s = trio.current_time() - started
    assert reason is not None and "swarm key" in reason and "TCP connected" in reason, reason
    assert elapsed_s < dialer.handshake_timeout_s + 3.0, elapsed_s  # 1.5 s and a loaded box's slack; TCP's is 60


async def test_a_tcp_connect_that_hangs_is_bounded_by_the_connect_timeout_and_not_blamed_on_the_key(
    tmp_path: Path,
) -> None:
    """A listener whose accept queue is full drops further SYNs, as a distant or dead host does: the dial ends at
    `connect_timeout_s`, saying TCP never connected."""
    with socket.socket() as full, contextlib.ExitStack() as fillers:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        for _ in range(4):  # more than the queue holds; the connects that do not fit stay pending
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        peer = make_member_record(KEYS, "s", (), NOW).peer_id
        info = parse_peer_addr("bootstrap", f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
        config = HostConfig(key_path=tmp_path / "a" / "identity.key", connect_timeout_s=1.0)
        async with running_host(config) as host:
            with trio.fail_after(30):
                reason = await bounded_connect(host, info, config)
    assert reason is not None and reason.startswith("no TCP connection within 1.0 s"), reason
    assert "swarm key" not in reason


async def test_the_same_swarm_key_connects_within_the_bounds(tmp_path: Path) -> None:
    key = b"\x03" * 32
    listener = HostConfig(key_path=tmp_path / "b" / "identity.key", psk=key)
    dialer = HostConfig(key_path=tmp_path / "a" / "identity.key", psk=key)
    async with running_host(listener) as b, running_host(dialer) as a:
        info = parse_peer_addr("bootstrap", listen_multiaddrs(b)[0])
        with trio.fail_after(30):
            assert await bounded_connect(a, info, dialer) is None
        assert a.get_network().get_connections(info.peer_id)


async def test_dns_bootstrap_addresses_resolve_through_the_system_resolver(tmp_path: Path) -> None:
    """`/dns4/<name>` as in the Kubernetes manifest: resolved by getaddrinfo (hosts file, search domains), which
    py-libp2p's own resolver does not consult; a name that does not resolve is a reason naming that."""
    async with open_node(node_config(tmp_path, "a", "s")) as a:
        port = a.listen_multiaddrs[0].split("/tcp/")[1].split("/")[0]
        by_name = f"/dns4/localhost/tcp/{port}/p2p/{a.peer_id}"
        async with open_node(node_config(tmp_path, "b", "s", (by_name,))) as b:
            assert b.host.get_network().get_connections(ID.from_base58(a.peer_id))
        unresolvable = parse_peer_addr("bootstrap", f"/dns4/no-such-host.invalid/tcp/{port}/p2p/{a.peer_id}")
        reason = await bounded_connect(a.host, unresolvable, a.config.host)
        assert reason is not None and reason.startswith("cannot resolve its address"), reason
    ip4 = multiaddr.Multiaddr("/ip4/192.0.2.1/tcp/7")
    assert await resolve_dns_addrs([ip4, multiaddr.Multiaddr("/dns4/localhost/tcp/7")]) == [
        ip4,
        multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/7"),
    ]


class SharedClock:
    """A wall clock for every Discovery of a test, which the test moves forward."""

    def __init__(self) -> None:
        self.now_unix_s = NOW

    def __call__(self) -> float:
        return self.now_unix_s


@asynccontextmanager
async def discovery_on_host(
    tmp: Path, name: str, bootstrap: tuple[str, ...], clock: SharedClock, found: Callable[[CandidateFound], None]
) -> AsyncIterator[Discovery]:
    config = HostConfig(key_path=tmp / name / "identity.key")
    key_pair = load_or_create_identity(config.key_path)
    async with running_host(config) as host, trio.open_nursery() as nursery:
        discovery = Discovery(
            host,
            key_pair,
            DiscoveryConfig(swarm_id="s", bootstrap_addrs=bootstrap, record_ttl_s=10.0, republish_interval_s=0.5),
            config,
            found,
            clock_unix_s=clock,
        )
        await nursery.start(discovery.run)
        yield discovery
        nursery.cancel_scope.cancel()


async def test_a_departed_peer_disappears_from_lookups_when_its_record_expires(tmp_path: Path) -> None:
    clock = SharedClock()
    found_send, found_by_a = trio.open_memory_channel[CandidateFound](64)
    with trio.fail_after(60):
        async with discovery_on_host(tmp_path, "boot", (), clock, lambda c: None) as boot:
            addr = listen_multiaddrs(boot.host)[0]
            async with discovery_on_host(tmp_path, "a", (addr,), clock, found_send.send_nowait) as a:
                async with discovery_on_host(tmp_path, "b", (addr,), clock, lambda c: None) as b:
                    b_id = b.local_peer
                    async for candidate in found_by_a:  # a's lookups find b through the DHT
                        if candidate.peer == b_id:
                            assert candidate.via == "dht"
                            break
                # b left and stopped republishing; boot and a go on. Move every clock past b's record's expiry.
                clock.now_unix_s += 10.0 + CLOCK_SKEW_S + 1.0
                await a.publish()
                await boot.publish()
                assert await a.check_peer(boot.local_peer, "dht")
                assert not await a.check_peer(b_id, "dht")
                assert a.statistics()["records_rejected"] >= 1, a.statistics()  # found in the DHT, refused as expired


async def test_a_forced_reachability_is_the_nodes_verdict_from_the_start(tmp_path: Path) -> None:
    """`reachability="private"`: the node holds that verdict once joined; "auto" leaves it None (nothing here
    establishes one)."""
    config = dataclasses.replace(node_config(tmp_path, "a", "s"), reachability="private")
    async with open_node(config) as a:
        assert a.reachability == "private"
    async with open_node(node_config(tmp_path, "b", "s")) as b:
        assert b.reachability is None
    with pytest.raises(ConfigError, match="reachability"):
        dataclasses.replace(config, reachability="dialable")  # type: ignore[arg-type]


async def test_a_member_restarted_after_it_was_forgotten_is_live_again_without_waiting_for_its_old_record(
    tmp_path: Path,
) -> None:
    """B goes away; A's dials fail until A forgets B. B comes back (same identity) and connects: A counts it live at
    once, not after B's earlier member record expires (`record_ttl_s`, 60 s: the wait seen before the fix)."""
    quick = MembershipConfig(redial_base_s=0.05, redial_max_s=0.1, max_dial_failures=2)
    a_config = dataclasses.replace(node_config(tmp_path, "a", "s"), membership=quick)
    async with open_node(a_config) as a:
        events = a.subscribe()
        b_config = node_config(tmp_path, "b", "s", tuple(a.listen_multiaddrs))
        with trio.fail_after(10):
            async with open_node(b_config) as b:
                b_id = b.peer_id
                await a.wait_for_peers(1)
            while not isinstance(event := await events.receive(), PeerForgotten) or event.peer != b_id:
                pass
        assert a.live_peers() == []
        with trio.fail_after(10):  # well under the 60 s of record_ttl_s
            async with open_node(b_config) as b:
                assert b.peer_id == b_id
                await a.wait_for_peers(1)
                assert a.live_peers() == [b_id]
