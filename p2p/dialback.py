"""The trio side of the dial-back check (`p2p.reachability`): `/swarmgrad/dialback/1.0.0` on a libp2p host.

`DialBackService` runs, for one node, both halves:

* the server: a stream handler that reads one framed `DialBackRequest` (bounded: `MAX_MESSAGE_BYTES`, within
  `READ_TIMEOUT_S`), lets `DialBackServer` decide, dials the chosen addresses with a fresh connection
  (`p2p.libp2p_compat.dial_fresh`) within `dial_timeout_s` and closes it, then writes one `DialBackResponse`. A
  malformed or hostile request (bad frame, undecodable body, a response where a request belongs) is a
  `RemoteProtocolError` handed to `on_peer_error` (the node's scoring policy) and the stream is reset. Nothing
  escapes the handler: an exception out of a py-libp2p stream handler would stop the host (docs/libp2p.md #2).
* the asking side, only when the verdict is left to the node (`network.reachability = "auto"`): the `Reachability`
  machine on a `Driver`, whose `AskDialBack` effects this module carries out (one stream per question, bounded by
  the machine's `answer_timeout_s`) and whose verdicts go to `on_verdict` (the node's `set_reachability`).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from p2p.libp2p_compat import dial_fresh, stream_remote_ip
from p2p.reachability import (
    CANNOT_SERVE,
    DIALLED,
    MAX_MESSAGE_BYTES,
    NOT_DIALLED,
    PROTOCOL,
    SCHEMA,
    AddressesChanged,
    Answer,
    AskDialBack,
    CheckInconclusive,
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
from swarmgrad.core.codec import FRAME_HEADER_SIZE, encode_frame_header, parse_frame_header
from swarmgrad.core.driver import Driver
from swarmgrad.core.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import Effect, Event, PeerDown, PeerId

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
"""Bound on reading a request once its stream is open (it is one small frame)."""
MAX_CONCURRENT_DIALS = 8
"""Dial-backs in progress at once; a request beyond them is answered "cannot serve" (the per-requester and per-IP
rate limits bound each source, this bounds them all together)."""
_CLEANUP_TIMEOUT_S = 2.0
_FAILURES = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class _Ended(Exception):
    """The stream ended inside a frame."""


async def _read_exactly(stream: INetStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            piece = await stream.read(size - len(data))
        except StreamError as exc:
            raise _Ended(f"stream ended after {len(data)} of {size} bytes: {exc}") from exc
        if not piece:
            raise _Ended(f"stream ended after {len(data)} of {size} bytes")
        data += piece
    return data


async def read_message(stream: INetStream) -> object:
    """One framed message of the dial-back schema; `DecodeError` for a bad frame or body, `_Ended` when cut."""
    size = parse_frame_header(await _read_exactly(stream, FRAME_HEADER_SIZE), MAX_MESSAGE_BYTES)
    return SCHEMA.decode(await _read_exactly(stream, size))


async def write_message(stream: INetStream, msg: object) -> None:
    body = SCHEMA.encode(msg)
    await stream.write(encode_frame_header(len(body)) + body)


async def _close(stream: INetStream, reset: bool) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
        try:
            await (stream.reset() if reset else stream.close())
        except _FAILURES as exc:
            log.debug("closing a dial-back stream failed: %s", exc)


class DialBackService:
    """Both halves of the dial-back check for one node (module docstring). `can_serve()` says whether this peer may
    serve right now (`p2p.reachability`, "Serving"); `addrs()` gives what it advertises and `own_ips()` every IP
    that is its own, read when the asking side starts."""

    def __init__(
        self,
        host: IHost,
        config: ReachabilityConfig,
        *,
        ask: bool,
        seed: int,
        can_serve: Callable[[], bool],
        addrs: Callable[[], tuple[str, ...]],
        own_ips: Callable[[], tuple[str, ...]],
        on_verdict: Callable[[ReachabilityChanged], None],
        on_peer_error: Callable[[PeerId, str], None],
    ) -> None:
        self.host = host
        self.config = config
        self.server = DialBackServer(config)
        self._can_serve = can_serve
        self._addrs = addrs
        self._own_ips = own_ips
        self._on_verdict = on_verdict
        self._on_peer_error = on_peer_error
        self._counters: Counter[str] = Counter()
        self._dialling = 0
        self._last_inconclusive = ""
        self.machine: ReachabilityCheck | None = None
        self.driver: Driver | None = None
        if ask:
            self.machine = ReachabilityCheck(config, random.Random(seed))
            self.driver = Driver(self.machine, run_effect=self.ask)

    def statistics(self) -> dict[str, int]:
        stats = {**self._counters, **self.server.counters}
        if self.machine is not None:
            stats.update({f"ask_{key}": value for key, value in self.machine.statistics().items()})
        return stats

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve dial-back requests (and ask, when built to) until cancelled."""
        self.host.set_stream_handler(TProtocol(PROTOCOL), self._handle)
        async with trio.open_nursery() as nursery:
            if self.driver is not None:
                await nursery.start(self.driver.run)
                nursery.start_soon(self._follow_verdicts)
                self._submit(AddressesChanged(self._addrs(), self._own_ips()))
            task_status.started()

    def member_up(self, peer: PeerId, ip: str | None) -> None:
        self._submit(MemberUp(peer, ip))

    def member_down(self, peer: PeerId) -> None:
        self._submit(PeerDown(peer))

    def _submit(self, event: Event) -> None:
        if self.driver is not None and not self.driver.submit(event):
            log.warning("reachability input queue full: dropped %r", event)

    async def _follow_verdicts(self) -> None:
        assert self.driver is not None
        async for note in self.driver.notifications:
            if isinstance(note, ReachabilityChanged):
                self._on_verdict(note)
            elif isinstance(note, CheckInconclusive):
                if note.reason == self._last_inconclusive:
                    continue  # logged once per reason: a lone peer would say the same every retry_s
                self._last_inconclusive = note.reason
                log.info(
                    "reachability check inconclusive (%s): next one in %.0f s",
                    note.reason,
                    note.retry_at - trio.current_time(),
                )
            else:
                raise LocalProtocolError(f"unknown notification from the reachability machine: {note!r}")

    # ---- asking -------------------------------------------------------------------------------------------------

    async def ask(self, effect: Effect) -> Event | None:
        """Carry out `AskDialBack`: its answer as `DialBackAnswered`, or `DialBackFailed` (a bad answer is also
        reported to `on_peer_error`)."""
        if not isinstance(effect, AskDialBack):
            raise LocalProtocolError(f"the dial-back service cannot carry out {effect!r}")
        reason = f"no answer within {self.config.answer_timeout_s:g} s"
        with trio.move_on_after(self.config.answer_timeout_s):
            try:
                return await self._ask(effect)
            except RemoteProtocolError as exc:
                self._counters["remote_errors"] += 1
                self._on_peer_error(exc.peer, exc.reason)
                reason = exc.reason
            except (_Ended, *_FAILURES) as exc:
                reason = f"{type(exc).__name__}: {exc}"
        self._counters["asks_failed"] += 1
        log.debug("dial-back request to %s failed: %s", effect.peer, reason)
        return DialBackFailed(effect.peer, effect.nonce, reason)

    async def _ask(self, effect: AskDialBack) -> Event:
        stream = await self.host.new_stream(ID.from_base58(effect.peer), [TProtocol(PROTOCOL)])
        reset = True
        try:
            await write_message(stream, DialBackRequest(effect.nonce, effect.addrs))
            try:
                answer = await read_message(stream)
            except DecodeError as exc:
                raise RemoteProtocolError(effect.peer, f"bad dial-back answer: {exc}") from exc
            if not isinstance(answer, DialBackResponse) or answer.nonce != effect.nonce:
                raise RemoteProtocolError(effect.peer, f"unexpected dial-back answer {answer!r}")
            reset = False
            log.debug("dial-back answer from %s: %s", effect.peer, answer)
            return DialBackAnswered(effect.peer, effect.nonce, answer)
        finally:
            await _close(stream, reset)

    # ---- serving ------------------------------------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        reset = True
        try:
            request: object = None
            with trio.move_on_after(READ_TIMEOUT_S):
                try:
                    request = await read_message(stream)
                except DecodeError as exc:
                    raise RemoteProtocolError(peer, f"bad dial-back request: {exc}") from exc
            if request is None:
                self._counters["idle_requests"] += 1
                return
            if not isinstance(request, DialBackRequest):
                raise RemoteProtocolError(peer, f"bad dial-back request: a {type(request).__name__}")
            response = await self._serve(peer, stream_remote_ip(stream), request)
            await write_message(stream, response)
            reset = False
        except RemoteProtocolError as exc:
            self._counters["remote_errors"] += 1
            log.info("peer %s: %s", exc.peer, exc.reason)
            self._on_peer_error(exc.peer, exc.reason)
        except (_Ended, *_FAILURES) as exc:
            log.debug("dial-back request from %s: %s", peer, exc)
        except Exception:
            self._counters["handler_errors"] += 1
            log.exception("dial-back handler for %s failed; stream reset, host kept", peer)
        finally:
            await _close(stream, reset)

    async def _serve(self, peer: PeerId, ip: str | None, request: DialBackRequest) -> DialBackResponse:
        decision = self.server.decide(trio.current_time(), peer, ip, request, self._can_serve())
        if isinstance(decision, Answer):
            return decision.response
        assert ip is not None, "DialBackServer dials only with an observed IP"
        if self._dialling >= MAX_CONCURRENT_DIALS:
            self._counters["busy"] += 1
            return DialBackResponse(request.nonce, CANNOT_SERVE, ip, f"busy: {MAX_CONCURRENT_DIALS} dial-backs running")
        self._dialling += 1
        try:
            return await self._dial_back(peer, ip, request, decision.addrs)
        finally:
            self._dialling -= 1

    async def _dial_back(
        self, peer: PeerId, ip: str, request: DialBackRequest, addrs: tuple[str, ...]
    ) -> DialBackResponse:
        failures: list[str] = []
        with trio.move_on_after(self.config.dial_timeout_s):
            for addr in addrs:
                try:
                    conn = await dial_fresh(self.host, multiaddr.Multiaddr(addr), ID.from_base58(peer))
                except (*_FAILURES, ValueError) as exc:
                    failures.append(f"{addr}: {type(exc).__name__}")
                    continue
                with trio.CancelScope(shield=True), trio.move_on_after(_CLEANUP_TIMEOUT_S):
                    try:
                        await conn.close()
                    except _FAILURES as exc:
                        log.debug("closing a dial-back connection to %s failed: %s", peer, exc)
                self._counters["dialled"] += 1
                return DialBackResponse(request.nonce, DIALLED, ip, f"dialled {addr}")
        self._counters["not_dialled"] += 1
        reason = "; ".join(failures) if failures else f"no connection within {self.config.dial_timeout_s:g} s"
        return DialBackResponse(request.nonce, NOT_DIALLED, ip, reason[:256])
