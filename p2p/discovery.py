"""Swarm discovery over the libp2p Kademlia DHT: join, advertise, look the others up.

py-libp2p always speaks `/ipfs/kad/1.0.0` (its `protocol_prefix` is ignored, docs/libp2p.md #6), so one DHT may carry
many swarms; what keeps them apart is the key namespace and a validator:

* Every peer publishes a signed **member record** under `/swarmgrad/<swarm-id>/member/<peer-id>`: its swarm id,
  peer id, public key, listen addresses and an absolute expiry (`record_ttl_s` ahead, republished every
  `republish_interval_s`). `MemberRecordValidator`, registered for the `swarmgrad` namespace, rejects a record that
  is malformed, not signed by the peer its key names, stored under another swarm's or peer's key, expired, or
  valid for longer than `MAX_RECORD_TTL_S`. A peer that left stops republishing, so its record expires and it
  disappears from lookups.
* Every peer also announces itself as a **provider** of `/swarmgrad/<swarm-id>/members` (a Kademlia provider
  record). A lookup asks the DHT for that key's providers (deduplicated, docs/libp2p.md #6), then fetches and
  verifies each new provider's member record; only a verified, unexpired record of our swarm becomes a
  `CandidateFound(via="dht")`. Provider records live 48 h in py-libp2p: the member record is what expires.

A peer also hands out its own member record on `record_protocol(swarm_id)`: a peer connected to us (a bootstrap
peer, or one that dialled in) is verified by asking it directly, which is faster than a DHT lookup and works before
its record has spread; the record must still verify exactly as one from the DHT.

Joining: the DHT's routing table stays empty after a plain connect (docs/libp2p.md #6), so discovery dials each
bootstrap multiaddr (`bounded_connect`: the TCP connect and the handshake each within its own bound of the host's
config), adds it to the DHT explicitly and looks up its own id; a bootstrap peer whose own member record verifies is
reported `via="bootstrap"`.

This module owns the DHT and the record format, and carries out the effects of `p2p.schedule.DiscoverySchedule`
(run by the one driver), which decides when to dial, retry, publish and look up. It must not decide who is live
(that is `p2p.membership`) and it must not dial peers it found (the node does that when the membership machine
asks).
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_public_key
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.utils import read_exactly
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from p2p.addrs import parse_peer_addr
from p2p.host import HostConfig
from p2p.libp2p_compat import (
    closest_known_peers,
    dht_key,
    fill_routing_table,
    forget_dial_failure,
    local_providers,
    on_outbound_upgrade,
    query_providers,
)
from p2p.membership import VIA_BOOTSTRAP, VIA_DHT, CandidateFound
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
from swarmgrad.core.codec import FRAME_HEADER_SIZE, Schema, encode_frame_header, parse_frame_header
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError, PeerUnreachable
from swarmgrad.core.machine import Effect, Event
from swarmgrad.core.swarm_id import validate_swarm_id

if TYPE_CHECKING:  # libp2p installs trio-typing, whose stale `trio-stubs` hide trio's own `TaskStatus` from mypy
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

NAMESPACE = "swarmgrad"
MAX_RECORD_TTL_S = 3600.0
"""A record may claim to be valid at most this far ahead (plus `CLOCK_SKEW_S`): nobody can pin a stale entry."""
CLOCK_SKEW_S = 30.0
"""Tolerated difference between two peers' wall clocks when checking record expiry."""
_MAX_ADDRS = 16
MAX_RECORD_BYTES = 16 * 1024
"""A member record is a few hundred bytes; anything announced larger is refused before it is read."""


def record_protocol(swarm_id: str) -> TProtocol:
    """The stream protocol on which a member of `swarm_id` hands out its own member record. A peer of another
    swarm does not speak it, so protocol negotiation alone keeps swarms apart on a shared connection."""
    return TProtocol(f"/swarmgrad/{swarm_id}/member-record/1.0.0")


def member_key(swarm_id: str, peer_id: str) -> str:
    """The DHT key of `peer_id`'s member record in swarm `swarm_id`."""
    return f"/{NAMESPACE}/{swarm_id}/member/{peer_id}"


def members_key(swarm_id: str) -> str:
    """The DHT key every member of `swarm_id` provides."""
    return f"/{NAMESPACE}/{swarm_id}/members"


@dataclass(frozen=True)
class MemberRecord:
    """A peer's signed claim to be a member of a swarm, reachable at `addrs` until `expires_at_unix_s`."""

    swarm_id: str
    peer_id: str
    public_key: bytes
    addrs: tuple[str, ...]
    expires_at_unix_s: float
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.addrs) > _MAX_ADDRS:
            raise ValueError(f"{len(self.addrs)} addresses, at most {_MAX_ADDRS}")
        if not math.isfinite(self.expires_at_unix_s):
            raise ValueError("expiry is not finite")


RECORD_SCHEMA = Schema("swarmgrad-member-record", {1: MemberRecord})
_SIGNING_CONTEXT = b"swarmgrad member record v1\x00"


def _signed_bytes(record: MemberRecord) -> bytes:
    return _SIGNING_CONTEXT + RECORD_SCHEMA.encode(replace(record, signature=b""))


def make_member_record(
    key_pair: KeyPair, swarm_id: str, addrs: tuple[str, ...], expires_at_unix_s: float
) -> MemberRecord:
    """A member record for the owner of `key_pair`, signed with its private key."""
    unsigned = MemberRecord(
        swarm_id=swarm_id,
        peer_id=ID.from_pubkey(key_pair.public_key).to_base58(),
        public_key=key_pair.public_key.serialize(),
        addrs=addrs,
        expires_at_unix_s=expires_at_unix_s,
        signature=b"",
    )
    return replace(unsigned, signature=key_pair.private_key.sign(_signed_bytes(unsigned)))


def verify_member_record(key: str, value: bytes, now_unix_s: float) -> MemberRecord:
    """Decode and check a member record stored under `key`. Raises `DecodeError` saying what is wrong."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != "" or parts[1] != NAMESPACE or parts[3] != "member":
        raise DecodeError(f"{key!r} is not a member record key")
    record = RECORD_SCHEMA.decode(value)
    if not isinstance(record, MemberRecord):
        raise DecodeError("not a member record")
    if record.swarm_id != parts[2] or record.peer_id != parts[4]:
        raise DecodeError(f"record of {record.peer_id} in swarm {record.swarm_id!r} stored under {key!r}")
    try:
        public_key = deserialize_public_key(record.public_key)
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"bad public key: {exc}") from exc
    if ID.from_pubkey(public_key).to_base58() != record.peer_id:
        raise DecodeError(f"public key does not belong to {record.peer_id}")
    if not public_key.verify(_signed_bytes(record), record.signature):
        raise DecodeError(f"bad signature on the record of {record.peer_id}")
    if record.expires_at_unix_s <= now_unix_s - CLOCK_SKEW_S:
        raise DecodeError(f"record of {record.peer_id} expired")
    if record.expires_at_unix_s > now_unix_s + MAX_RECORD_TTL_S + CLOCK_SKEW_S:
        raise DecodeError(f"record of {record.peer_id} claims validity beyond {MAX_RECORD_TTL_S} s")
    return record


class MemberRecordValidator(Validator):
    """The DHT validator of the `swarmgrad` namespace (see `verify_member_record`); prefers the latest record."""

    def __init__(self, clock_unix_s: Callable[[], float]) -> None:
        self._clock_unix_s = clock_unix_s

    def validate(self, key: str, value: bytes) -> None:
        try:
            verify_member_record(key, value, self._clock_unix_s())
        except DecodeError as exc:
            raise ValueError(f"invalid swarmgrad record: {exc}") from exc

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_expiry = 0, -math.inf
        for index, value in enumerate(values):
            try:
                expiry = verify_member_record(key, value, self._clock_unix_s()).expires_at_unix_s
            except DecodeError:
                continue
            if expiry > best_expiry:
                best, best_expiry = index, expiry
        return best


@dataclass(frozen=True)
class DiscoveryConfig:
    """How a peer joins, advertises and looks up its swarm."""

    swarm_id: str
    bootstrap_addrs: tuple[str, ...] = ()
    """Multiaddrs ending in `/p2p/<peer id>`. Empty for the first peer of a swarm."""
    bootstrap_attempts: int = 3
    """Rounds of dialling the bootstrap addresses before giving up (a busy bootstrap peer may miss one dial)."""
    bootstrap_retry_s: float = 1.0
    """Pause between two rounds."""
    record_ttl_s: float = 60.0
    republish_interval_s: float = 20.0
    min_lookup_interval_s: float = 0.5
    """First gap between lookups; it doubles after each lookup that finds nobody new, up to the maximum, and falls
    back to the minimum when a peer connects to us (it may be a new member)."""
    max_lookup_interval_s: float = 8.0
    lookup_timeout_s: float = 10.0
    """Bound on one lookup round, and on fetching one member record."""
    provider_query_timeout_s: float = 2.0
    """Bound on asking one peer for the providers of the members key."""

    def __post_init__(self) -> None:
        validate_swarm_id(self.swarm_id)
        if not isinstance(self.bootstrap_addrs, tuple):
            raise ConfigError("bootstrap_addrs", self.bootstrap_addrs, "a tuple of multiaddr strings")
        for addr in self.bootstrap_addrs:
            parse_peer_addr("bootstrap", addr)
        if not (isinstance(self.bootstrap_attempts, int) and self.bootstrap_attempts >= 1):
            raise ConfigError("bootstrap_attempts", self.bootstrap_attempts, "an integer >= 1")
        for name in (
            "bootstrap_retry_s",
            "record_ttl_s",
            "republish_interval_s",
            "min_lookup_interval_s",
            "max_lookup_interval_s",
            "lookup_timeout_s",
            "provider_query_timeout_s",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(name, value, "a finite number of seconds > 0")
        if self.record_ttl_s > MAX_RECORD_TTL_S:
            raise ConfigError("record_ttl_s", self.record_ttl_s, f"<= {MAX_RECORD_TTL_S}")
        if self.republish_interval_s >= self.record_ttl_s:
            raise ConfigError(
                "republish_interval_s", self.republish_interval_s, f"< record_ttl_s ({self.record_ttl_s})"
            )
        if self.max_lookup_interval_s < self.min_lookup_interval_s:
            raise ConfigError(
                "max_lookup_interval_s",
                self.max_lookup_interval_s,
                f">= min_lookup_interval_s ({self.min_lookup_interval_s})",
            )


class BootstrapFailed(PeerUnreachable):
    """No bootstrap peer could be reached; the message names every address and why it failed."""


class Discovery:
    """The DHT service of one peer. `run()` joins and then advertises and looks up until cancelled; each verified
    member found is handed to `on_found` as a `CandidateFound`."""

    def __init__(
        self,
        host: IHost,
        key_pair: KeyPair,
        config: DiscoveryConfig,
        host_config: HostConfig,
        on_found: Callable[[CandidateFound], None],
        clock_unix_s: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.config = config
        self.host_config = host_config
        self._key_pair = key_pair
        self._on_found = on_found
        self._clock_unix_s = clock_unix_s
        self.local_peer = host.get_id().to_base58()
        self.dht = KadDHT(host, DHTMode.SERVER)
        self.dht.register_validator(NAMESPACE, MemberRecordValidator(clock_unix_s))
        self._reported: dict[str, float] = {}  # peer -> expiry of the record last reported
        self._own_record = b""
        self._provided: list[str] = []  # provide_also: keys provided beside the members key
        self._record_addrs: tuple[str, ...] | None = None  # set_record_addrs
        self._driver = Driver(
            DiscoverySchedule(
                ScheduleConfig(
                    bootstrap_addrs=config.bootstrap_addrs,
                    bootstrap_attempts=config.bootstrap_attempts,
                    bootstrap_retry_s=config.bootstrap_retry_s,
                    republish_interval_s=config.republish_interval_s,
                    min_lookup_interval_s=config.min_lookup_interval_s,
                    max_lookup_interval_s=config.max_lookup_interval_s,
                )
            ),
            run_effect=self._carry_out,
        )
        self._nursery: trio.Nursery | None = None
        host.set_stream_handler(record_protocol(config.swarm_id), self._serve_record)
        self._counters: Counter[str] = Counter()

    def statistics(self) -> dict[str, int]:
        """Counters: lookups, providers seen, records verified or rejected, publishes, bootstrap dials."""
        stats = dict(self._counters)
        stats["routing_table_size"] = self.dht.get_routing_table_size()
        stats["known_members"] = len(self._reported)
        return stats

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the DHT and join through the bootstrap peers; `task_status.started()` then, while this peer's
        records are published and lookups run (when, is `p2p.schedule.DiscoverySchedule`'s policy), until
        cancelled. Raises `BootstrapFailed` when bootstrap addresses were given and none could be reached."""
        self._own_record = self._sign_record()  # served at once, to the peers we dial while joining
        async with background_trio_service(self.dht), trio.open_nursery() as nursery:
            self._nursery = nursery
            started = trio.current_time()
            await nursery.start(self._driver.run)
            if self.config.bootstrap_addrs:
                log.info(
                    "joining swarm %s through %d bootstrap address(es), up to %d attempts",
                    self.config.swarm_id,
                    len(self.config.bootstrap_addrs),
                    self.config.bootstrap_attempts,
                )
            self._driver.submit(Start())
            async for note in self._driver.notifications:
                if isinstance(note, BootstrapAttemptFailed):
                    # every new cause, and the last attempt, at WARNING; a repeated one (a peer not up yet) at INFO
                    log.log(
                        logging.INFO if note.repeated else logging.WARNING,
                        "bootstrap peer %s (attempt %d of %d): %s",
                        note.addr,
                        note.attempt,
                        note.attempts,
                        note.reason,
                    )
                elif isinstance(note, JoinFailed):
                    raise BootstrapFailed(note.message)
                elif isinstance(note, Joined):
                    elapsed_s = trio.current_time() - started
                    log.info("joined through %d bootstrap peer(s) in %.2f s", len(note.peers), elapsed_s)
                    task_status.started()
                else:
                    raise LocalProtocolError(f"unknown notification from the discovery schedule: {note!r}")

    async def _carry_out(self, effect: Effect) -> Event | None:
        """The effects of the schedule, over the DHT."""
        if isinstance(effect, DialBootstrap):
            info = parse_peer_addr("bootstrap", effect.addr)
            self._counters["bootstrap_dials"] += 1
            reason = await bounded_connect(self.host, info, self.host_config)
            if reason is None:
                await self.dht.add_peer(info.peer_id)
            return BootstrapDialed(effect.addr, info.peer_id.to_base58(), reason)
        if isinstance(effect, JoinDht):
            assert self._nursery is not None, "effects run only inside run()"
            # A lookup of our own id fills the routing table with our neighbours (docs/libp2p.md #6); the DHT's own
            # maintenance loop refreshes it later.
            await fill_routing_table(self.dht, self.host.get_id())
            for peer in effect.peers:
                self._nursery.start_soon(self.check_peer, peer, VIA_BOOTSTRAP)
            return DhtJoined()
        if isinstance(effect, Lookup):
            new, unverified = await self.lookup()
            return LookupDone(new, unverified)
        if isinstance(effect, Publish):
            started = trio.current_time()
            await self.publish()
            log.debug("published in %.2f s", trio.current_time() - started)
            return Published()
        raise LocalProtocolError(f"discovery cannot carry out {effect!r}")

    def set_record_addrs(self, addrs: tuple[str, ...] | None) -> None:
        """Put `addrs` in the member record instead of the host's advertised addresses (a private peer's relayed
        addresses; None: the host's again), and publish it now (when running)."""
        self._record_addrs = None if addrs is None else addrs[:_MAX_ADDRS]
        self._own_record = self._sign_record()
        if self._nursery is not None:
            self._nursery.start_soon(self.publish)

    def provide_also(self, key: str) -> None:
        """Provide `key` too, now (when running) and at each publish: a relay provides the relays key."""
        if key in self._provided:
            return
        self._provided.append(key)
        if self._nursery is not None:
            self._nursery.start_soon(self.dht.provide, key)

    def _sign_record(self) -> bytes:
        addrs = self._record_addrs
        if addrs is None:
            addrs = tuple(sorted(str(addr) for addr in self.host.get_addrs()))[:_MAX_ADDRS]
        expires_at = self._clock_unix_s() + self.config.record_ttl_s
        return RECORD_SCHEMA.encode(make_member_record(self._key_pair, self.config.swarm_id, addrs, expires_at))

    async def publish(self) -> None:
        """Put a fresh member record and announce this peer as a provider of the swarm's members key. A record
        without addresses (a private peer before its first relay reservation) is handed to connected peers but not
        put in the DHT: a peer that looked it up there would keep that copy, with nothing to dial, until it
        expired."""
        self._own_record = self._sign_record()
        async with trio.open_nursery() as nursery:
            if self._record_addrs is None or self._record_addrs:
                key = member_key(self.config.swarm_id, self.local_peer)
                nursery.start_soon(self.dht.put_value, key, self._own_record)
            nursery.start_soon(self.dht.provide, members_key(self.config.swarm_id))
            for key in self._provided:
                nursery.start_soon(self.dht.provide, key)
        self._counters["publishes"] += 1

    async def lookup(self) -> tuple[int, int]:
        """One round: ask the peers closest to the members key (and our own store) for its providers, and verify
        each provider not yet reported as soon as one answer names it (a slow or silent peer delays nobody's
        verification). Returns (members newly reported, providers whose record did not verify)."""
        self._counters["lookups"] += 1
        started = trio.current_time()
        now = self._clock_unix_s()
        for peer in sorted(p for p, expiry in self._reported.items() if expiry <= now):
            del self._reported[peer]  # its record expired: report it again only if a fresh one turns up
        seen: set[str] = {self.local_peer}
        results: dict[str, bool] = {}

        async def check(peer: str, addrs: list[multiaddr.Multiaddr]) -> None:
            results[peer] = await self.check_peer(peer, VIA_DHT, addrs)

        async with trio.open_nursery() as nursery:

            def found(peer: str, addrs: list[multiaddr.Multiaddr]) -> None:
                if peer in seen:
                    return
                seen.add(peer)
                self._counters["providers_seen"] += 1
                if peer not in self._reported:
                    nursery.start_soon(check, peer, addrs)

            with trio.move_on_after(self.config.lookup_timeout_s):
                await self._find_providers(members_key(self.config.swarm_id), found)
            providers_s = trio.current_time() - started
        new = sum(results.values())
        log.debug(
            "lookup: %d providers in %.2f s, %d new verified, %d not verified, in %.2f s in all",
            len(seen) - 1,
            providers_s,
            new,
            len(results) - new,
            trio.current_time() - started,
        )
        return new, len(results) - new

    async def find_providers(self, key: str) -> dict[str, list[multiaddr.Multiaddr]]:
        """The providers of `key` (peer -> addresses; see `_find_providers`), within `lookup_timeout_s`."""
        providers: dict[str, list[multiaddr.Multiaddr]] = {}

        def found(peer: str, addrs: list[multiaddr.Multiaddr]) -> None:
            if addrs or peer not in providers:
                providers[peer] = addrs

        with trio.move_on_after(self.config.lookup_timeout_s):
            await self._find_providers(key, found)
        return providers

    async def _find_providers(self, text_key: str, found: Callable[[str, list[multiaddr.Multiaddr]], None]) -> None:
        """Hand `found(peer, addresses)` each provider of `text_key`: from our own store, then from each of
        the peers of our routing table closest to the key as it answers, each asked within
        `provider_query_timeout_s`.

        py-libp2p's `find_providers` returns the local store alone whenever it holds any provider, and every member
        provides the key itself, so it would never ask the network; its iterative lookups also wait 10 s on each
        unresponsive peer. So this asks the closest known peers directly (in a swarm smaller than the bucket size
        k = 20, that is every DHT peer), with the one-peer query of `p2p.libp2p_compat.query_providers`.
        """
        key = dht_key(text_key)
        for info in local_providers(self.dht, key):
            found(info.peer_id.to_base58(), list(info.addrs))
        closest = closest_known_peers(self.dht, key)

        async def ask(peer: ID) -> None:
            with trio.move_on_after(self.config.provider_query_timeout_s):
                for info in await query_providers(self.dht, peer, key):
                    found(info.peer_id.to_base58(), list(info.addrs))

        async with trio.open_nursery() as nursery:
            for peer in sorted(closest, key=lambda p: p.to_base58()):
                if peer != self.dht.local_peer_id:
                    nursery.start_soon(ask, peer)

    async def check_peer(self, peer: str, via: str, addrs: Sequence[multiaddr.Multiaddr] = ()) -> bool:
        """Fetch and verify `peer`'s member record; report it (once) as found `via` when it is a member. Returns
        whether a record verified.

        The record comes from the peer itself when we are connected to it or can dial it at `addrs` (the addresses
        of its provider record) with `bounded_connect`, within `provider_query_timeout_s`: one dial, which the
        membership machine would make anyway, instead of a DHT walk that waits on every slow peer. Otherwise it
        comes from the DHT. Either way it must verify: signed by `peer`, of our swarm, unexpired.
        """
        key = member_key(self.config.swarm_id, peer)
        peer_id = ID.from_base58(peer)
        with trio.move_on_after(self.config.lookup_timeout_s):
            value = None
            reachable = bool(self.host.get_network().get_connections(peer_id))
            if not reachable and addrs:
                # bounded like a provider query: a private peer's provider record names its unreachable address,
                # where a NAT may drop the connection attempt silently; its record is in the DHT
                with trio.move_on_after(self.config.provider_query_timeout_s):
                    reason = await bounded_connect(self.host, PeerInfo(peer_id, list(addrs)), self.host_config)
                    reachable = reason is None
            if reachable:
                value = await self._fetch_record(peer)
            if value is None:
                # quorum 1: the first valid answer ends the query instead of waiting on every peer (docs/libp2p.md #6)
                value = await self.dht.get_value(key, quorum=1)
            if value is None:
                self._counters["records_missing"] += 1
                return False
            try:
                record = verify_member_record(key, value, self._clock_unix_s())
            except DecodeError as exc:
                self._counters["records_rejected"] += 1
                log.info("member record of %s rejected: %s", peer, exc)
                return False
            self._counters["records_verified"] += 1
            first = peer not in self._reported
            self._reported[peer] = record.expires_at_unix_s
            if first:
                self._on_found(CandidateFound(peer, record.addrs, via))
            return True
        self._counters["record_timeouts"] += 1
        return False

    async def _fetch_record(self, peer: str) -> bytes | None:
        """Ask `peer` for its member record over `record_protocol`; None when it does not speak it (another swarm,
        or not a swarmgrad member) or the stream fails."""
        try:
            stream = await self.host.new_stream(ID.from_base58(peer), [record_protocol(self.config.swarm_id)])
        except (BaseLibp2pError, OSError) as exc:
            log.debug("%s does not serve a member record of swarm %s: %s", peer, self.config.swarm_id, exc)
            return None
        try:
            size = parse_frame_header(await read_exactly(stream, FRAME_HEADER_SIZE), MAX_RECORD_BYTES)
            return await read_exactly(stream, size)
        except (BaseLibp2pError, OSError, DecodeError) as exc:
            log.info("bad member record stream from %s: %s", peer, exc)
            self._counters["record_stream_errors"] += 1
            return None
        finally:
            await stream.close()

    async def _serve_record(self, stream: INetStream) -> None:
        """Stream-handler boundary: write our member record and close. An error here must never reach py-libp2p,
        which would take the whole host down (docs/libp2p.md #2)."""
        try:
            if not self._own_record:  # not published yet: nothing to vouch for
                await stream.reset()
                return
            await stream.write(encode_frame_header(len(self._own_record)) + self._own_record)
            await stream.close()
        except Exception as exc:  # noqa: BLE001 - the handler boundary: log, count, reset, keep the host alive
            self._counters["record_serve_errors"] += 1
            log.info("serving our member record failed: %s: %s", type(exc).__name__, exc)
            await stream.reset()

    def forget(self, peer: str) -> None:
        """Membership dropped `peer` (too many failed dials): the next lookup that finds it, or a connection from it,
        verifies and reports it again, instead of waiting for the record reported before to expire. Without this, a
        member restarted after it was forgotten stayed out of the live set for up to `record_ttl_s`."""
        self._reported.pop(peer, None)

    def wake(self) -> None:
        """Look up now, and at the shortest interval again (a new connection may be a new member)."""
        self._driver.submit(Wake())


_DNS_FAMILIES = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6, "dns": socket.AF_UNSPEC}


async def resolve_dns_addrs(addrs: Sequence[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """`addrs` with every `/dns4/`, `/dns6/` or `/dns/<name>` resolved by the system resolver (getaddrinfo: the
    hosts file, the resolver's search domains), the other addresses as they are. py-libp2p 0.8.1 resolves with
    dnspython, which reads no hosts file and applies no search domain, so `localhost` or a Kubernetes headless
    service name (`swarmgrad-0.swarmgrad`) never resolves there. Raises `OSError` for a name that does not
    resolve."""
    resolved: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        first = addr.protocols()[0].name
        if first not in _DNS_FAMILIES:
            resolved.append(addr)
            continue
        _, _, name, rest = str(addr).split("/", 3)  # "/dns4/<name>/tcp/7400" -> "<name>", "tcp/7400"
        infos = await trio.socket.getaddrinfo(name, None, _DNS_FAMILIES[first], socket.SOCK_STREAM)
        for family, _type, _proto, _canonical, sockaddr in infos:
            ip = "ip4" if family == socket.AF_INET else "ip6"
            candidate = multiaddr.Multiaddr(f"/{ip}/{sockaddr[0]}/{rest}")
            if candidate not in resolved:
                resolved.append(candidate)
    return resolved


WRONG_KEY_HINT = (
    "likely a wrong or missing swarm key (the peer is in a private swarm with another key, or only one side has "
    "one: check --swarm-key / network.swarm_key)"
)
"""Ends every failed dial whose TCP connection was up: in a handshake between two peers of one swarm, nothing
else fails that way."""


async def bounded_connect(host: IHost, info: PeerInfo, config: HostConfig) -> str | None:
    """Dial `info` in two bounded phases: the TCP connect within `config.connect_timeout_s` (a slow link), then the
    handshake (pnet, Noise, yamux) within `config.handshake_timeout_s` from the moment TCP is up. Returns None on
    success, else a reason naming the phase and the likely cause: a peer that accepts TCP but does not complete the
    handshake is, in practice, one with another swarm key (or none), so that reason says so (`WRONG_KEY_HINT`).
    Logs nothing; the caller decides.

    Our callers own the re-dial policy (bootstrap attempts, the membership machine's backoff), so the peer is first
    lifted from py-libp2p's own negative cache, which otherwise refuses every dial to it for 60 s after one failure
    without touching the network."""
    forget_dial_failure(host, info.peer_id)
    tcp_up = False

    def handshake_started() -> None:
        nonlocal tcp_up
        if not tcp_up:  # py-libp2p may retry on a fresh TCP connection: the first one starts the clock
            tcp_up = True
            scope.deadline = trio.current_time() + config.handshake_timeout_s

    with (
        trio.move_on_after(config.connect_timeout_s) as scope,
        on_outbound_upgrade(host, info.peer_id, handshake_started),
    ):
        try:
            addrs = await resolve_dns_addrs(info.addrs)
        except OSError as exc:
            return f"cannot resolve its address: {type(exc).__name__}: {exc}"
        try:
            await host.connect(PeerInfo(info.peer_id, addrs))
        except (BaseLibp2pError, OSError) as exc:
            if tcp_up:
                return f"TCP connected, but the handshake failed ({type(exc).__name__}: {exc}); {WRONG_KEY_HINT}"
            return f"connection failed: {type(exc).__name__}: {exc}"
    if scope.cancelled_caught:
        if tcp_up:
            return (
                f"TCP connected, but the handshake did not complete within {config.handshake_timeout_s} s "
                f"(network.handshake_timeout_s); {WRONG_KEY_HINT}"
            )
        return (
            f"no TCP connection within {config.connect_timeout_s} s (network.connect_timeout_s): the peer is "
            "unreachable or the link is slow"
        )
    return None
