"""Circuit relay v2 on a swarmgrad host: the services a node runs and the I/O of `p2p.relay.RelayClient`'s effects.

* `RelayHost.run` serves the stop side on every peer (py-libp2p's `CircuitV2Protocol`: an inbound circuit becomes a
  connection the swarm holds like any other, upgraded inside pnet when the swarm has a key), until cancelled.
* `RelayHost.serve_hop` adds the hop side, the relay itself, under `p2p.relay.RelayServiceConfig`'s limits.
* `RelayHost.reserve` asks a relay for a reservation: one RESERVE request on a fresh hop stream, bounded in time,
  answered `Reserved(ttl)` or `ReserveFailed` naming the relay's status (RESOURCE_LIMIT_EXCEEDED, ...). It is ours,
  not py-libp2p's `CircuitV2Transport.reserve`, because that one starts a renewal loop of its own, and renewal is the
  machine's decision.
* `RelayHost.dial` dials a circuit address through `p2p.libp2p_compat.dial_relayed` (pnet on the relayed
  connection in a private swarm), bounded like a direct dial.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import multiaddr
import trio
from google.protobuf.message import DecodeError as ProtobufDecodeError
from libp2p.abc import IHost
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from p2p.addrs import parse_peer_addr
from p2p.discovery import bounded_connect
from p2p.host import HostConfig
from p2p.libp2p_compat import dial_relayed
from p2p.relay import RelayServiceConfig, Reserved, ReserveFailed
from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError
from swarmgrad.core.machine import PeerId

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

CIRCUIT = "/p2p-circuit"


def is_circuit_addr(addr: str) -> bool:
    """Whether `addr` reaches its peer through a relay."""
    return f"{CIRCUIT}/" in addr


def relay_limits(config: RelayServiceConfig) -> RelayLimits:
    """py-libp2p's limits for `config`."""
    return RelayLimits(
        duration=config.max_circuit_duration_s,
        data=config.max_circuit_bytes,
        max_circuit_conns=config.max_circuits_per_peer,
        max_reservations=config.max_reservations,
        reservation_ttl=config.reservation_ttl_s,
    )


class RelayHost:
    """Circuit relay v2 on `host`. `run` it in a nursery first (the stop side); see the module docstring."""

    def __init__(self, host: IHost, service: RelayServiceConfig, host_config: HostConfig) -> None:
        self.host = host
        self.service_config = service
        self.host_config = host_config
        self._stop = CircuitV2Protocol(host, relay_limits(service), allow_hop=False)
        self._transport = CircuitV2Transport(host, self._stop, RelayConfig(roles=RelayRole.STOP))
        self._hop: CircuitV2Protocol | None = None

    @property
    def relaying(self) -> bool:
        """Whether the hop side runs."""
        return self._hop is not None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the stop side until cancelled."""
        async with background_trio_service(self._stop):
            task_status.started()
            await trio.sleep_forever()

    async def serve_hop(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay for others until cancelled (it also serves the stop side, the same way `run` does)."""
        if self._hop is not None:
            raise LocalProtocolError("the hop side already runs")
        self._hop = CircuitV2Protocol(self.host, relay_limits(self.service_config), allow_hop=True)
        config = self.service_config
        log.info(
            "relaying for private peers: up to %d reservations, %d circuits per peer, %d bytes and %d s per circuit",
            config.max_reservations,
            config.max_circuits_per_peer,
            config.max_circuit_bytes,
            config.max_circuit_duration_s,
        )
        async with background_trio_service(self._hop):
            task_status.started()
            await trio.sleep_forever()

    async def reserve(self, relay: PeerId, addrs: tuple[str, ...]) -> Reserved | ReserveFailed:
        """Ask `relay`, listening at `addrs`, for a reservation (or to renew ours)."""
        peer_id = ID.from_base58(relay)
        try:
            info = PeerInfo(peer_id, [multiaddr.Multiaddr(addr) for addr in addrs])
        except (ValueError, multiaddr.exceptions.Error) as exc:
            return ReserveFailed(relay, f"bad relay address: {exc}")
        if not self.host.get_network().get_connections(peer_id):
            reason = await bounded_connect(self.host, info, self.host_config)
            if reason is not None:
                return ReserveFailed(relay, reason)
        try:
            status, expires_at_unix_s = await reserve_slot(self.host, peer_id, self.host_config.stream_open_timeout_s)
        except (BaseLibp2pError, OSError, DecodeError, trio.TooSlowError) as exc:
            return ReserveFailed(relay, f"reservation request failed: {type(exc).__name__}: {exc}")
        if status != StatusCode.OK:
            return ReserveFailed(relay, f"refused with status {status.name}")
        return Reserved(relay, max(expires_at_unix_s - time.time(), 0.0))

    async def dial(self, peer: PeerId, addr: str) -> str | None:
        """Connect to `peer` through the circuit address `addr`; None on success, else why not. Bounded by the
        host's `connect_timeout_s` (relay leg and circuit) plus `handshake_timeout_s`."""
        relay_part, _, rest = addr.partition(CIRCUIT)
        if rest != f"/p2p/{peer}":
            return f"{addr} is not a circuit address of {peer}"
        try:
            relay = parse_peer_addr("circuit address", relay_part)
        except ConfigError as exc:
            return f"bad circuit address {addr}: {exc}"
        psk = self.host_config.psk
        timeout_s = self.host_config.connect_timeout_s + self.host_config.handshake_timeout_s
        with trio.move_on_after(timeout_s):
            try:
                await dial_relayed(self.host, self._transport, relay, ID.from_base58(peer), psk)
            except (BaseLibp2pError, OSError, ConnectionError) as exc:
                return f"relayed dial through {relay.peer_id} failed: {type(exc).__name__}: {exc}"
            return None
        return f"relayed dial through {relay.peer_id} did not complete within {timeout_s} s"


async def reserve_slot(host: IHost, relay: ID, timeout_s: float) -> tuple[StatusCode, float]:
    """One circuit relay v2 RESERVE request to `relay` (a connection to it must be open): the relay's status and,
    when OK, the reservation's expiry (Unix seconds). Raises `trio.TooSlowError` past `timeout_s`, `DecodeError`
    for an answer that is not a status."""
    with trio.fail_after(timeout_s):
        stream = await host.new_stream(relay, [HOP_PROTOCOL_ID])
        try:
            await write_delimited_msg(
                stream, HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=host.get_id().to_bytes()))
            )
            try:
                answer = await read_delimited_msg(stream, HopMessage)
            except (ProtobufDecodeError, ValueError) as exc:
                raise DecodeError(f"a malformed answer to a RESERVE: {exc}") from exc
        finally:
            await stream.close()
    if answer.type != HopMessage.STATUS:
        raise DecodeError(f"the relay answered a RESERVE with message type {answer.type}")
    try:
        status = StatusCode(answer.status)
    except ValueError as exc:
        raise DecodeError(f"unknown relay status {answer.status}") from exc
    expires = float(answer.reservation.expire) if answer.HasField("reservation") else 0.0
    return status, expires
