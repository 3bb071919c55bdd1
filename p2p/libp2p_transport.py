"""`LibP2PTransport`: the `Transport` contract (swarmgrad/core/transport.py) over a py-libp2p host
(Noise + yamux over TCP).

Wire format: each protocol is a libp2p stream protocol; on a stream, a message is one frame, the 12-byte header of
`swarmgrad.core.codec.encode_frame_header` followed by the body. Outbound, one stream per (peer, protocol) is opened on
first use, kept open and reused, and guarded by a lock so that only one task writes to it (yamux interleaves concurrent
writes, docs/libp2p.md #4); bodies are written in chunks of `WRITE_CHUNK_BYTES`. A send cancelled or failed midway
resets that stream, so the receiver sees a truncated frame and drops it, and the next send opens a fresh stream.

Inbound, each stream is read by its own handler: it parses the header with the limit of that protocol *before*
holding any buffer, reserves the body size from the sender's in-flight budget (`max_in_flight_bytes_per_peer`:
beyond it, reading pauses and yamux flow control holds the sender back), then reads the body in bounded reads
(py-libp2p's own framed reads stop near 6.8 MB, docs/libp2p.md #8). A bad header or an oversized announcement resets
the stream, is counted in `remote_errors` and reported to the `PeerPolicy`. A truncated frame resets the stream and
is counted (`truncated_frames`) but not reported: honest senders leave one whenever a send is cut at its deadline or
a connection drops, so it is no evidence of misbehaviour, and it cost no more than was sent. A stream on
which no byte arrives for `stream_idle_timeout_s` is reset (`idle_streams`), and, given the node's `IpLimits`, a
stream beyond the remote IP's cap of concurrent inbound streams is reset on arrival (`refused_streams`). Every handler
runs behind a boundary that catches, logs and counts anything unexpected and resets the stream, because an
exception escaping a py-libp2p stream handler kills the whole host (docs/libp2p.md #2).

This module must not decode messages (the driver does, with a `Schema`) nor hold protocol logic.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from p2p.addrs import parse_peer_addr
from p2p.host import ConnectionNotifee, HostConfig, listen_multiaddrs, running_host
from p2p.limits import IpLimits
from swarmgrad.core.codec import FRAME_HEADER_SIZE, encode_frame_header, parse_frame_header
from swarmgrad.core.errors import (
    ConfigError,
    DecodeError,
    LocalProtocolError,
    MessageTooLarge,
    PeerUnreachable,
    TransportClosed,
)
from swarmgrad.core.machine import PeerDown, PeerId, PeerUp
from swarmgrad.core.transport import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_QUEUE_LEN, Delivery, PeerPolicy, Transport

log = logging.getLogger(__name__)

WRITE_CHUNK_BYTES = 1024 * 1024
"""Bodies are written to a stream in pieces of this size (yamux then splits by its flow-control window)."""
READ_CHUNK_BYTES = 1024 * 1024
"""The most one read asks a stream for."""
CLEANUP_TIMEOUT_S = 2.0
"""Bound on resetting a stream after a failure or a cancellation (done shielded, so it must be bounded)."""
_MAX_FRAME_BODY_BYTES = 2**64 - 1
"""What a frame header can announce at all (u64): used to tell an oversized frame from a malformed one."""

# Errors py-libp2p raises when a stream or connection fails under us (reset, EOF, closed, dial failure, ...).
_STREAM_FAILURES = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class _Truncated(Exception):
    """The stream ended inside a frame (a cancelled send, a crashed peer, or a hostile one)."""


class _StreamIdle(Exception):
    """No byte arrived on an inbound stream within `stream_idle_timeout_s` (idle, or stalled inside a frame)."""


@dataclass
class _Frame:
    """One payload waiting for its writer; `done` is set once it was written whole, abandoned, or failed."""

    payload: bytes
    done: trio.Event = field(default_factory=trio.Event)
    error: PeerUnreachable | TransportClosed | None = None
    abandoned: bool = False


@dataclass
class _Outbound:
    """The kept-open stream for one (peer, protocol) and the queue of its only writer task."""

    queue: trio.MemorySendChannel[_Frame]
    stream: INetStream | None = None
    closed: bool = False


@dataclass
class _Inbox:
    channel: trio.MemorySendChannel[Delivery]
    max_message_bytes: int


async def _reset_quietly(stream: INetStream) -> None:
    """Reset `stream`, shielded from cancellation and bounded in time; a stream already gone is fine."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
        try:
            await stream.reset()
        except _STREAM_FAILURES as exc:
            log.debug("reset of a failed stream failed too: %s", exc)


class LibP2PTransport(Transport):
    """The `Transport` contract on a py-libp2p host. Open it with `async with LibP2PTransport.open(config)`."""

    def __init__(
        self,
        host: IHost,
        config: HostConfig,
        policy: PeerPolicy | None,
        nursery: trio.Nursery,
        *,
        ip_limits: IpLimits | None = None,
    ) -> None:
        """Wrap a host that is already running (`running_host`, or a node that runs one); writer tasks run in
        `nursery`. `open` does all of this for a host of its own. `aclose()` closes the host too. `ip_limits`
        (a node's) caps the concurrent inbound streams per remote IP; None: no per-IP cap."""
        self._host = host
        self._config = config
        self._policy = policy
        self._ip_limits = ip_limits
        self._nursery = nursery
        self._local_peer = str(host.get_id())
        self._inboxes: dict[str, _Inbox] = {}
        self._outbound: dict[tuple[PeerId, str], _Outbound] = {}
        self._watchers: list[trio.MemorySendChannel[PeerUp | PeerDown]] = []
        self._connected: set[PeerId] = set()
        self._in_flight_bytes: Counter[PeerId] = Counter()
        self._in_flight_released: dict[PeerId, trio.Event] = {}
        self._counters: Counter[str] = Counter()
        self._closed = False
        host.get_network().register_notifee(ConnectionNotifee(self._on_connected, self._on_disconnected))

    @classmethod
    @asynccontextmanager
    async def open(cls, config: HostConfig, policy: PeerPolicy | None = None) -> AsyncIterator[LibP2PTransport]:
        """Run a host for `config` and a transport on it; on exit, close both and release every socket."""
        async with running_host(config) as host, trio.open_nursery() as nursery:
            transport = cls(host, config, policy, nursery)
            try:
                yield transport
            finally:
                await transport.aclose()
                nursery.cancel_scope.cancel()

    # ---- what other components use ------------------------------------------------------------------------------

    @property
    def host(self) -> IHost:
        """The py-libp2p host, for components that register their own protocols or run the DHT on it."""
        return self._host

    @property
    def listen_multiaddrs(self) -> list[str]:
        """Where other peers can reach this one: full multiaddrs with the bound port, ending in `/p2p/<peer id>`."""
        return listen_multiaddrs(self._host)

    # ---- the Transport contract ---------------------------------------------------------------------------------

    @property
    def local_peer(self) -> PeerId:
        return self._local_peer

    def listen(
        self, protocol: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, queue_len: int = DEFAULT_QUEUE_LEN
    ) -> trio.MemoryReceiveChannel[Delivery]:
        self._check_open()
        if protocol in self._inboxes:
            raise LocalProtocolError(f"{protocol} already has a listener")
        if not 1 <= max_message_bytes <= self._config.max_in_flight_bytes_per_peer:
            raise ConfigError(
                "max_message_bytes",
                max_message_bytes,
                f"in [1, max_in_flight_bytes_per_peer = {self._config.max_in_flight_bytes_per_peer}]",
            )
        send, recv = trio.open_memory_channel[Delivery](queue_len)
        inbox = _Inbox(send, max_message_bytes)
        self._inboxes[protocol] = inbox

        async def handler(stream: INetStream) -> None:
            await self._guard(stream, protocol, inbox)

        self._host.set_stream_handler(TProtocol(protocol), handler)
        return recv

    async def send(self, peer: PeerId, protocol: str, payload: bytes) -> None:
        self._check_open()
        if len(payload) > self._config.max_message_bytes:
            raise MessageTooLarge(f"payload of {len(payload)} bytes exceeds {self._config.max_message_bytes}")
        if not self._allows(peer):
            raise PeerUnreachable(f"peer {peer} is refused by the peer policy")
        outbound = self._outbound.get((peer, protocol))
        if outbound is None:
            send, recv = trio.open_memory_channel[_Frame](math.inf)  # bounded by the callers waiting on it
            outbound = self._outbound[(peer, protocol)] = _Outbound(send)
            self._nursery.start_soon(self._write_queue, outbound, peer, protocol, recv)
        frame = _Frame(payload)
        outbound.queue.send_nowait(frame)
        try:
            await frame.done.wait()
        except BaseException:
            frame.abandoned = True  # cancelled: the writer drops it, or resets the stream if it is half written
            raise
        if frame.error is not None:
            raise frame.error
        self._counters["messages_out"] += 1
        self._counters["bytes_out"] += len(payload)

    async def connect(self, address: str) -> PeerId:
        self._check_open()
        try:
            info = parse_peer_addr("address", address)
        except ConfigError as exc:
            raise PeerUnreachable(str(exc)) from exc
        peer = str(info.peer_id)
        if peer == self._local_peer:
            raise PeerUnreachable(f"{address} is this peer itself")
        if not self._allows(peer):
            raise PeerUnreachable(f"peer {peer} at {address} is refused by the peer policy")
        with trio.move_on_after(self._config.connect_timeout_s) as scope:
            try:
                await self._host.connect(info)
            except _STREAM_FAILURES as exc:
                self._check_open()
                raise PeerUnreachable(f"cannot connect to {address}: {exc}") from exc
        if scope.cancelled_caught:
            raise PeerUnreachable(
                f"cannot connect to {address}: no connection within {self._config.connect_timeout_s} s"
            )
        return peer

    def peer_events(self) -> trio.MemoryReceiveChannel[PeerUp | PeerDown]:
        send, recv = trio.open_memory_channel[PeerUp | PeerDown](DEFAULT_QUEUE_LEN)
        if self._closed:
            send.close()
        else:
            self._watchers.append(send)
        return recv

    def connected_peers(self) -> list[PeerId]:
        return sorted(self._connected)

    def statistics(self) -> dict[str, int]:
        return dict(self._counters)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes.values():
            inbox.channel.close()
        for outbound in self._outbound.values():
            outbound.closed = True
            outbound.queue.close()
        await self._host.close()
        for watcher in self._watchers:
            watcher.close()
        self._watchers.clear()
        self._connected.clear()
        for event in self._in_flight_released.values():
            event.set()

    # ---- sending ------------------------------------------------------------------------------------------------

    async def _write_queue(
        self, outbound: _Outbound, peer: PeerId, protocol: str, queue: trio.MemoryReceiveChannel[_Frame]
    ) -> None:
        """The only writer of `outbound`'s stream. It runs in the transport's nursery, so a caller's cancellation
        never interrupts a py-libp2p write: a write cut midway would leave half a yamux or Noise frame on the
        connection and break every stream on it. An abandoned frame is cut at a chunk boundary instead, by a reset."""
        frame: _Frame | None = None
        try:
            async for frame in queue:
                if not frame.abandoned:
                    try:
                        await self._write_with_retry(outbound, peer, protocol, frame)
                    except (PeerUnreachable, TransportClosed) as exc:
                        frame.error = exc
                    except Exception as exc:
                        # The outbound counterpart of a stream-handler boundary: an error py-libp2p was not
                        # expected to raise must not escape into the transport's nursery and stop the peer.
                        self._counters["writer_errors"] += 1
                        log.exception("writing to %s under %s failed unexpectedly; stream reset", peer, protocol)
                        if outbound.stream is not None:
                            await _reset_quietly(outbound.stream)
                            outbound.stream = None
                        frame.error = PeerUnreachable(f"sending to {peer} under {protocol} failed: {exc!r}")
                frame.done.set()
                frame = None
        finally:
            # Cancelled with the transport, or the queue was closed: nobody may wait forever.
            stopped = TransportClosed(f"transport of {self._local_peer} is closed")
            pending = [] if frame is None else [frame]
            while True:
                try:
                    pending.append(queue.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            for waiting in pending:
                waiting.error = stopped if self._closed else PeerUnreachable(f"the connection to {peer} closed")
                waiting.done.set()
            if outbound.stream is not None:
                await _reset_quietly(outbound.stream)
                outbound.stream = None

    async def _write_with_retry(self, outbound: _Outbound, peer: PeerId, protocol: str, frame: _Frame) -> None:
        reused = outbound.stream is not None
        try:
            await self._write_on_stream(outbound, peer, protocol, frame)
        except PeerUnreachable:
            if not reused:
                raise
            # The kept stream had died (the receiver reset it, or the connection was replaced). The frame did not
            # get through whole, so the receiver dropped it: one retry on a fresh stream keeps the order.
            self._counters["stream_retries"] += 1
            await self._write_on_stream(outbound, peer, protocol, frame)

    async def _write_on_stream(self, outbound: _Outbound, peer: PeerId, protocol: str, frame: _Frame) -> None:
        """Write `frame` on the kept stream (opened if needed), in chunks; reset the stream if it fails or the frame
        is abandoned midway."""
        if outbound.closed:
            self._check_open()
            raise PeerUnreachable(f"the connection to {peer} closed")
        if outbound.stream is None:
            outbound.stream = await self._open_stream(peer, protocol)
        stream = outbound.stream
        payload = frame.payload
        first = WRITE_CHUNK_BYTES - FRAME_HEADER_SIZE
        try:
            await stream.write(encode_frame_header(len(payload)) + payload[:first])
            for start in range(first, len(payload), WRITE_CHUNK_BYTES):
                if frame.abandoned:
                    self._counters["abandoned_frames"] += 1
                    outbound.stream = None
                    await _reset_quietly(stream)
                    return
                await stream.write(payload[start : start + WRITE_CHUNK_BYTES])
        except _STREAM_FAILURES as exc:
            outbound.stream = None
            await _reset_quietly(stream)
            self._check_open()
            raise PeerUnreachable(f"sending to {peer} under {protocol} failed: {exc!r}") from exc

    async def _open_stream(self, peer: PeerId, protocol: str) -> INetStream:
        try:
            peer_id = ID.from_base58(peer)
        except ValueError as exc:
            raise PeerUnreachable(f"{peer!r} is not a peer id: {exc}") from exc
        stream: INetStream | None = None
        with trio.move_on_after(self._config.connect_timeout_s + self._config.stream_open_timeout_s):
            try:
                stream = await self._host.new_stream(peer_id, [TProtocol(protocol)])
            except _STREAM_FAILURES as exc:
                self._check_open()
                raise PeerUnreachable(f"cannot open a {protocol} stream to {peer}: {exc}") from exc
        if stream is None:
            raise PeerUnreachable(f"cannot open a {protocol} stream to {peer}: timed out")
        return stream

    # ---- receiving ----------------------------------------------------------------------------------------------

    async def _guard(self, stream: INetStream, protocol: str, inbox: _Inbox) -> None:
        """The boundary around one inbound stream: nothing escapes into py-libp2p, which would kill the host."""
        peer = str(stream.muxed_conn.peer_id)
        remote = getattr(stream, "get_remote_address", lambda: None)()
        ip = None if remote is None or self._ip_limits is None else str(remote[0])
        if ip is not None and self._ip_limits is not None:
            refusal = self._ip_limits.admit_stream(ip, trio.current_time())
            if refusal is not None:
                self._counters["refused_streams"] += 1
                log.debug("resetting a %s stream from %s: %s", protocol, peer, refusal.reason)
                await _reset_quietly(stream)
                return
        try:
            await self._serve(stream, peer, protocol, inbox)
        except _StreamIdle as exc:
            self._counters["idle_streams"] += 1
            log.debug("resetting a %s stream from %s: %s", protocol, peer, exc)
            await _reset_quietly(stream)
        except DecodeError as exc:
            self._remote_error(peer, f"bad frame under {protocol}: {exc}")
            await _reset_quietly(stream)
        except _Truncated as exc:
            # not reported (module docstring): charged to the sender's IP, four honest peers on 127.0.0.1 whose sends
            # were cut at round deadlines got that IP banned for 10 minutes
            self._counters["truncated_frames"] += 1
            log.debug("peer %s: truncated frame under %s: %s", peer, protocol, exc)
            await _reset_quietly(stream)
        except Exception:
            self._counters["handler_errors"] += 1
            log.exception("stream handler for %s from %s failed; stream reset, host kept", protocol, peer)
            await _reset_quietly(stream)
        finally:
            if ip is not None and self._ip_limits is not None:
                self._ip_limits.release_stream(ip)

    async def _serve(self, stream: INetStream, peer: PeerId, protocol: str, inbox: _Inbox) -> None:
        if not self._allows(peer):
            self._counters["refused_streams"] += 1
            await _reset_quietly(stream)
            return
        while not self._closed:
            first = await self._read_some(stream, FRAME_HEADER_SIZE)
            if not first:
                break  # the sender closed the stream between frames
            header = first + await self._read_exactly(stream, FRAME_HEADER_SIZE - len(first), FRAME_HEADER_SIZE)
            try:
                size = parse_frame_header(header, inbox.max_message_bytes)
            except DecodeError:
                # Well formed but over this protocol's limit? Then skip its body unread, so the stream (and the
                # messages queued behind it) stays usable; anything else desynchronises the stream: reset it.
                oversize = parse_frame_header(header, _MAX_FRAME_BODY_BYTES)
                self._remote_error(peer, f"frame of {oversize} bytes over the {inbox.max_message_bytes} limit")
                if await self._skip(stream, peer, oversize):
                    continue
                await _reset_quietly(stream)
                return
            await self._reserve(peer, size)
            try:
                body = await self._read_exactly(stream, size, size)
                self._deliver(inbox, Delivery(peer, protocol, body))
            finally:
                self._release(peer, size)
        with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
            try:
                await stream.close()
            except _STREAM_FAILURES as exc:
                log.debug("closing a finished inbound stream failed: %s", exc)

    async def _skip(self, stream: INetStream, peer: PeerId, size: int) -> bool:
        """Read and discard `size` bytes without holding them. False when the stream ended first or the policy
        refused the peer meanwhile (the frame is already reported: the caller just drops the stream)."""
        remaining = size
        while remaining:
            if not self._allows(peer):
                return False
            piece = await self._read_some(stream, min(remaining, READ_CHUNK_BYTES))
            if not piece:
                return False
            remaining -= len(piece)
        self._counters["skipped_bytes"] += size
        return True

    async def _read_some(self, stream: INetStream, limit: int) -> bytes:
        """Up to `limit` bytes; empty when the stream has ended (closed or reset); `_StreamIdle` when nothing
        arrives within `stream_idle_timeout_s`."""
        with trio.move_on_after(self._config.stream_idle_timeout_s):
            try:
                return await stream.read(limit)
            except StreamError:
                return b""
        raise _StreamIdle(f"no byte within stream_idle_timeout_s ({self._config.stream_idle_timeout_s:g} s)")

    async def _read_exactly(self, stream: INetStream, size: int, frame_part_bytes: int) -> bytes:
        """Exactly `size` bytes, in reads of at most `READ_CHUNK_BYTES`; `_Truncated` if the stream ends first."""
        pieces: list[bytes] = []
        remaining = size
        while remaining:
            piece = await self._read_some(stream, min(remaining, READ_CHUNK_BYTES))
            if not piece:
                got = frame_part_bytes - remaining
                raise _Truncated(f"the stream ended after {got} of {frame_part_bytes} bytes")
            pieces.append(piece)
            remaining -= len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _deliver(self, inbox: _Inbox, delivery: Delivery) -> None:
        try:
            inbox.channel.send_nowait(delivery)
        except trio.WouldBlock:
            self._counters["dropped_full"] += 1
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._counters["dropped_no_listener"] += 1
            return
        self._counters["messages_in"] += 1
        self._counters["bytes_in"] += len(delivery.payload)

    async def _reserve(self, peer: PeerId, size: int) -> None:
        """Wait until `peer` has room for `size` more bytes in flight, then take it."""
        limit = self._config.max_in_flight_bytes_per_peer
        while self._in_flight_bytes[peer] + size > limit and not self._closed:
            self._counters["in_flight_waits"] += 1
            await self._in_flight_released.setdefault(peer, trio.Event()).wait()
        self._in_flight_bytes[peer] += size

    def _release(self, peer: PeerId, size: int) -> None:
        self._in_flight_bytes[peer] -= size
        if self._in_flight_bytes[peer] <= 0:
            del self._in_flight_bytes[peer]
        event = self._in_flight_released.pop(peer, None)
        if event is not None:
            event.set()

    # ---- peers --------------------------------------------------------------------------------------------------

    def _allows(self, peer: PeerId) -> bool:
        return self._policy is None or self._policy.allows(peer)

    def _remote_error(self, peer: PeerId, reason: str) -> None:
        self._counters["remote_errors"] += 1
        log.info("peer %s: %s", peer, reason)
        if self._policy is not None:
            self._policy.report(peer, reason)
            if not self._policy.allows(peer) and not self._closed:
                self._nursery.start_soon(self._disconnect, ID.from_base58(peer))

    def _on_connected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        peer = str(peer_id)
        if self._closed or peer in self._connected:
            return
        if not self._allows(peer):
            self._counters["refused_connections"] += 1
            self._nursery.start_soon(self._disconnect, peer_id)
            return
        self._connected.add(peer)
        self._emit(PeerUp(peer))

    def _on_disconnected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        peer = str(peer_id)
        if self._host.get_network().get_connections(peer_id):
            return  # a duplicate connection closed; the peer is still connected
        for key in [key for key in self._outbound if key[0] == peer]:
            # Its streams died with the connection. Frames already queued fail; the next send starts a new writer.
            outbound = self._outbound.pop(key)
            outbound.closed = True
            outbound.queue.close()
        if peer in self._connected:
            self._connected.discard(peer)
            self._emit(PeerDown(peer))

    async def _disconnect(self, peer_id: ID) -> None:
        try:
            await self._host.disconnect(peer_id)
        except _STREAM_FAILURES as exc:
            log.debug("closing the refused connection of %s failed: %s", peer_id, exc)

    def _emit(self, event: PeerUp | PeerDown) -> None:
        for watcher in self._watchers:
            try:
                watcher.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._counters["dropped_peer_events"] += 1

    def _check_open(self) -> None:
        if self._closed:
            raise TransportClosed(f"transport of {self._local_peer} is closed")
