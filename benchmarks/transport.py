"""Throughput of LibP2PTransport against its own baselines, between two processes on 127.0.0.1.

One 100 MB payload, sent (median of `RUNS` runs) from this process to a receiver child process three ways:

* `libp2p_transport`: `LibP2PTransport.send` (frame header, chunked writes, kept stream), acknowledged by a tiny
  message back over the transport once the receiver has the whole payload in its inbox;
* `raw_libp2p_stream`: a plain py-libp2p stream on the same kind of host (Noise + yamux, `p2p.host.running_host`),
  written in the same chunk size and read in the same read size, acknowledged by one byte on the stream;
* `raw_tcp`: a plain trio TCP socket, the same chunks, acknowledged by one byte.

Streams and connections are opened before the clock starts. Prints one JSON line: MB/s (10^6 bytes) for each way,
each run's figure, and the ratios: of the medians, and the median of the per-run ratios (each transport run
against the raw-stream run right after it, which a drifting load on a shared machine skews less). The goal:
libp2p_transport >= 0.8 x raw_libp2p_stream.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2p.host import HostConfig, listen_multiaddrs, running_host
from p2p.libp2p_transport import READ_CHUNK_BYTES, WRITE_CHUNK_BYTES, LibP2PTransport
from swarmgrad.core.transport import Delivery

PAYLOAD_BYTES = 100_000_000
RUNS = 5
DATA_PROTOCOL = "/swarmgrad/bench/data/1.0.0"
ACK_PROTOCOL = "/swarmgrad/bench/ack/1.0.0"
RAW_PROTOCOL = TProtocol("/swarmgrad/bench/raw/1.0.0")
_LENGTH = struct.Struct("<Q")
TIMEOUT_S = 300


async def _read_exactly_libp2p(stream: INetStream, size: int) -> None:
    remaining = size
    while remaining:
        piece = await stream.read(min(remaining, READ_CHUNK_BYTES))
        if not piece:
            raise EOFError(f"stream ended {remaining} bytes early")
        remaining -= len(piece)


async def _read_exactly_tcp(stream: trio.SocketStream, size: int) -> bytes:
    pieces = []
    remaining = size
    while remaining:
        piece = await stream.receive_some(min(remaining, READ_CHUNK_BYTES))
        if not piece:
            raise EOFError(f"socket closed {remaining} bytes early")
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


# ---- receiver (child process) -------------------------------------------------------------------------------------


async def serve(keys: Path) -> None:
    async def raw_handler(stream: INetStream) -> None:
        header = b""
        while len(header) < _LENGTH.size:
            header += await stream.read(_LENGTH.size - len(header))
        await _read_exactly_libp2p(stream, _LENGTH.unpack(header)[0])
        await stream.write(b"k")
        await stream.close()

    async def tcp_handler(stream: trio.SocketStream) -> None:
        (size,) = _LENGTH.unpack(await _read_exactly_tcp(stream, _LENGTH.size))
        await _read_exactly_tcp(stream, size)
        await stream.send_all(b"k")

    async with (
        LibP2PTransport.open(HostConfig(key_path=keys / "receiver.key")) as transport,
        running_host(HostConfig(key_path=keys / "raw-receiver.key")) as raw_host,
        trio.open_nursery() as nursery,
    ):
        inbox = transport.listen(DATA_PROTOCOL, max_message_bytes=PAYLOAD_BYTES)
        raw_host.set_stream_handler(RAW_PROTOCOL, raw_handler)
        (listener,) = await nursery.start(functools.partial(trio.serve_tcp, tcp_handler, 0, host="127.0.0.1"))

        async def acknowledge() -> None:
            async for delivery in inbox:
                await transport.send(delivery.peer, ACK_PROTOCOL, str(len(delivery.payload)).encode())

        nursery.start_soon(acknowledge)
        addresses = {
            "transport": transport.listen_multiaddrs[0],
            "raw": listen_multiaddrs(raw_host)[0],
            "tcp_port": listener.socket.getsockname()[1],
        }
        print(json.dumps(addresses), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # the parent closes our stdin when it is done
        nursery.cancel_scope.cancel()


# ---- sender (this process) ----------------------------------------------------------------------------------------


def _mb_per_s(seconds: float) -> float:
    return PAYLOAD_BYTES / seconds / 1e6


async def _time_transport(
    transport: LibP2PTransport, acks: trio.MemoryReceiveChannel[Delivery], receiver: str, payload: bytes
) -> float:
    start = trio.current_time()
    await transport.send(receiver, DATA_PROTOCOL, payload)
    ack = await acks.receive()
    speed = _mb_per_s(trio.current_time() - start)
    if ack.payload != str(len(payload)).encode():
        raise RuntimeError(f"the receiver got {ack.payload!r} bytes")
    return speed


async def _time_raw_stream(host: IHost, peer_id: ID, payload: bytes) -> float:
    stream = await host.new_stream(peer_id, [RAW_PROTOCOL])  # opened before the clock starts
    start = trio.current_time()
    await stream.write(_LENGTH.pack(len(payload)))
    for offset in range(0, len(payload), WRITE_CHUNK_BYTES):
        await stream.write(payload[offset : offset + WRITE_CHUNK_BYTES])
    if await stream.read(1) != b"k":
        raise RuntimeError("no acknowledgement on the raw stream")
    speed = _mb_per_s(trio.current_time() - start)
    await stream.close()
    return speed


async def _time_tcp(port: int, payload: bytes) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)  # connected before the clock starts
    async with stream:
        start = trio.current_time()
        await stream.send_all(_LENGTH.pack(len(payload)))
        for offset in range(0, len(payload), WRITE_CHUNK_BYTES):
            await stream.send_all(payload[offset : offset + WRITE_CHUNK_BYTES])
        if await stream.receive_some(1) != b"k":
            raise RuntimeError("no acknowledgement on the TCP socket")
        return _mb_per_s(trio.current_time() - start)


async def run_sender(keys: Path, addresses: dict[str, object]) -> dict[str, object]:
    payload = os.urandom(PAYLOAD_BYTES)
    runs: dict[str, list[float]] = {"libp2p_transport": [], "raw_libp2p_stream": [], "raw_tcp": []}
    with trio.fail_after(TIMEOUT_S):
        async with (
            LibP2PTransport.open(HostConfig(key_path=keys / "sender.key")) as transport,
            running_host(HostConfig(key_path=keys / "raw-sender.key")) as raw_host,
        ):
            acks = transport.listen(ACK_PROTOCOL)
            receiver = await transport.connect(str(addresses["transport"]))
            await transport.send(receiver, DATA_PROTOCOL, b"warm-up")  # opens the kept streams both ways
            if (await acks.receive()).payload != b"7":
                raise RuntimeError("the warm-up message was not acknowledged")
            raw_info = info_from_p2p_addr(multiaddr.Multiaddr(str(addresses["raw"])))
            await raw_host.connect(raw_info)
            # Interleaved, so that the load of this shared machine weighs on the three ways alike.
            for _ in range(RUNS):
                runs["libp2p_transport"].append(await _time_transport(transport, acks, receiver, payload))
                runs["raw_libp2p_stream"].append(await _time_raw_stream(raw_host, raw_info.peer_id, payload))
                runs["raw_tcp"].append(await _time_tcp(int(str(addresses["tcp_port"])), payload))
    medians = {name: round(statistics.median(speeds), 1) for name, speeds in runs.items()}
    return {
        "benchmark": "transport",
        "payload_bytes": PAYLOAD_BYTES,
        "write_chunk_bytes": WRITE_CHUNK_BYTES,
        "processes": 2,
        "runs": RUNS,
        "mb_per_s": medians,
        "runs_mb_per_s": {name: [round(s, 1) for s in speeds] for name, speeds in runs.items()},
        "ratio_transport_vs_raw_stream": round(medians["libp2p_transport"] / medians["raw_libp2p_stream"], 3),
        # Each run's transport figure against the raw-stream run right after it: robust to the load drifting.
        "paired_ratio_transport_vs_raw_stream": round(
            statistics.median(t / r for t, r in zip(runs["libp2p_transport"], runs["raw_libp2p_stream"], strict=True)),
            3,
        ),
        "ratio_transport_vs_tcp": round(medians["libp2p_transport"] / medians["raw_tcp"], 4),
        "ratio_raw_stream_vs_tcp": round(medians["raw_libp2p_stream"] / medians["raw_tcp"], 4),
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        trio.run(serve, Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory(prefix="swarmgrad-bench-") as keys:
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", keys], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            if not line:
                raise RuntimeError("the receiver process exited before it was ready")
            result = trio.run(run_sender, Path(keys), json.loads(line))
            child.stdin.close()
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
