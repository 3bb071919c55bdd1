"""The dial-back protocol (`p2p.dialback`) between real py-libp2p hosts on 127.0.0.1, and what a host advertises now
that identify's observed addresses are on.

A server that may serve dials the requester back with a fresh connection (the connection the request came on stays
the only one afterwards) and answers "dialled"; an offered port where nothing listens is "not dialled", within the
dial bound; an address on another IP than the one the request came from is never dialled; a server that may not
serve answers "cannot serve"; a malformed request is reported to the server's peer policy and its host keeps
serving. The addresses identify observed for a host never reach what it advertises (identify's listen addresses,
`listen_multiaddrs`, the member record built from `host.get_addrs()`)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import _mk_identify_protobuf
from libp2p.peer.peerinfo import PeerInfo

from p2p.dialback import DialBackService
from p2p.host import HostConfig, listen_multiaddrs, running_host
from p2p.reachability import (
    CANNOT_SERVE,
    DIALLED,
    NOT_DIALLED,
    PROTOCOL,
    AskDialBack,
    DialBackAnswered,
    DialBackFailed,
    ReachabilityConfig,
)
from swarmgrad.core.codec import encode_frame_header

TIMEOUT_S = 30
CONFIG = ReachabilityConfig(dial_timeout_s=3.0, answer_timeout_s=8.0, serve_interval_s=0.001, max_requests_per_ip=16)


class _Server:
    def __init__(self) -> None:
        self.serving = True
        self.errors: list[tuple[str, str]] = []
        self.reported = trio.Event()

    def report(self, peer: str, reason: str) -> None:
        self.errors.append((peer, reason))
        self.reported.set()


def _service(host: IHost, server: _Server) -> DialBackService:
    return DialBackService(
        host,
        CONFIG,
        ask=False,
        seed=0,
        can_serve=lambda: server.serving,
        addrs=lambda: (),
        own_ips=lambda: (),
        on_verdict=lambda change: None,
        on_peer_error=server.report,
    )


@asynccontextmanager
async def _pair(tmp_path: Path) -> AsyncIterator[tuple[IHost, IHost, DialBackService, DialBackService, _Server]]:
    """A server host and a requester host, connected, each running a dial-back service."""
    async with (
        running_host(HostConfig(tmp_path / "server.key")) as server_host,
        running_host(HostConfig(tmp_path / "requester.key")) as requester_host,
        trio.open_nursery() as nursery,
    ):
        state = _Server()
        served = _service(server_host, state)
        asking = _service(requester_host, _Server())
        await nursery.start(served.run)
        await nursery.start(asking.run)
        await requester_host.connect(PeerInfo(server_host.get_id(), server_host.get_transport_addrs()))
        yield server_host, requester_host, served, asking, state
        nursery.cancel_scope.cancel()


def _own_addr(host: IHost) -> str:
    return listen_multiaddrs(host)[0].rsplit("/p2p/", 1)[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_server_dials_back_with_a_fresh_connection_and_keeps_the_first(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, requester_host, served, asking, _):
            first = requester_host.get_network().get_connections(server_host.get_id())
            result = await asking.ask(AskDialBack(server_host.get_id().to_base58(), 7, (_own_addr(requester_host),)))
            after = requester_host.get_network().get_connections(server_host.get_id())
    assert isinstance(result, DialBackAnswered), result
    assert result.response.status == DIALLED and result.response.observed_ip == "127.0.0.1"
    assert served.statistics()["dialled"] == 1
    assert len(first) == 1 and after == first  # the dial-back connection is closed, the first one kept


async def test_a_port_where_nothing_listens_is_not_dialled_within_the_bound(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, _, served, asking, _):
            started = trio.current_time()
            result = await asking.ask(
                AskDialBack(server_host.get_id().to_base58(), 8, (f"/ip4/127.0.0.1/tcp/{_free_port()}",))
            )
            took_s = trio.current_time() - started
    assert isinstance(result, DialBackAnswered) and result.response.status == NOT_DIALLED
    assert took_s < CONFIG.dial_timeout_s + 1.0
    assert served.statistics()["not_dialled"] == 1


async def test_an_address_on_another_ip_is_never_dialled(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, _, served, asking, _):
            result = await asking.ask(AskDialBack(server_host.get_id().to_base58(), 9, ("/ip4/198.51.100.3/tcp/22",)))
    assert isinstance(result, DialBackAnswered) and result.response.status == NOT_DIALLED
    assert "observed IP 127.0.0.1" in result.response.reason
    assert served.statistics().get("dialled", 0) == 0 and served.statistics()["no_matching_addr"] == 1


async def test_a_peer_that_may_not_serve_answers_cannot_serve(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, requester_host, _, asking, state):
            state.serving = False
            result = await asking.ask(AskDialBack(server_host.get_id().to_base58(), 3, (_own_addr(requester_host),)))
    assert isinstance(result, DialBackAnswered) and result.response.status == CANNOT_SERVE


@pytest.mark.parametrize(
    "payload", [b"garbage that is no frame", encode_frame_header(9999), encode_frame_header(4) + b"\x02\x00\x90\x00"]
)
async def test_a_malformed_request_is_reported_and_the_server_keeps_serving(tmp_path: Path, payload: bytes) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, requester_host, _, asking, state):
            stream = await requester_host.new_stream(server_host.get_id(), [TProtocol(PROTOCOL)])
            await stream.write(payload)
            await stream.close()
            await state.reported.wait()
            result = await asking.ask(AskDialBack(server_host.get_id().to_base58(), 4, (_own_addr(requester_host),)))
    ((peer, reason),) = state.errors
    assert peer == requester_host.get_id().to_base58() and reason.startswith("bad dial-back request")
    assert isinstance(result, DialBackAnswered) and result.response.status == DIALLED


async def test_asking_a_peer_without_the_protocol_fails_as_no_vote(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            running_host(HostConfig(tmp_path / "a.key")) as bare,
            running_host(HostConfig(tmp_path / "b.key")) as asker,
        ):
            await asker.connect(PeerInfo(bare.get_id(), bare.get_transport_addrs()))
            result = await _service(asker, _Server()).ask(
                AskDialBack(bare.get_id().to_base58(), 1, (_own_addr(asker),))
            )
    assert isinstance(result, DialBackFailed) and result.nonce == 1


async def test_observed_addresses_are_recorded_but_never_advertised(tmp_path: Path) -> None:
    observed = multiaddr.Multiaddr("/ip4/198.51.100.9/tcp/40123")
    with trio.fail_after(TIMEOUT_S):
        async with running_host(HostConfig(tmp_path / "k", listen_addrs=("/ip4/0.0.0.0/tcp/0",))) as host:
            manager = host._observed_addr_manager  # type: ignore[attr-defined]
            assert manager is not None, "identify's observed-address discovery is off"
            manager.addrs = lambda min_observers=4: [observed]  # as if four peers had seen us there
            advertised = [str(addr) for addr in host.get_addrs()]
            in_identify = [str(multiaddr.Multiaddr(raw)) for raw in _mk_identify_protobuf(host, None).listen_addrs]
            listed = listen_multiaddrs(host)
            port = host.get_transport_addrs()[0].value_for_protocol("tcp")
    for addrs in (advertised, in_identify, listed):
        assert addrs and not any("198.51.100.9" in addr or "40123" in addr for addr in addrs)
        assert all(f"/tcp/{port}" in addr for addr in addrs)


async def test_a_server_with_all_its_dial_backs_running_answers_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("p2p.dialback.MAX_CONCURRENT_DIALS", 0)
    with trio.fail_after(TIMEOUT_S):
        async with _pair(tmp_path) as (server_host, requester_host, served, asking, _):
            result = await asking.ask(AskDialBack(server_host.get_id().to_base58(), 5, (_own_addr(requester_host),)))
    assert isinstance(result, DialBackAnswered) and result.response.status == CANNOT_SERVE
    assert result.response.reason.startswith("busy") and served.statistics()["busy"] == 1
