"""Run gossip peers as separate OS processes on 127.0.0.1: the harness of the real-process tests and the benchmark.

`python -m testing.gossip_loopback --index I --peers N --dir D ...` runs one peer: a `LibP2PTransport` (Noise +
yamux, its identity in `D/peer<I>.key`), writes its multiaddr to `D/peer<I>.addr`, connects to the peers of lower index,
waits until it sees all `N - 1` others, then runs `--rounds` rounds over a heterogeneous `--numel` vector (peer I
starts at `randn + I`), with the `GossipService` (`--mode sparse`) or, as the baseline over the same transport, a
dense exchange of the whole fp32 vector with its two neighbours on a ring (`--mode dense`). After every round it
prints one JSON event on stdout, `{"event": "round", ...}`: wall-clock time, round, seconds taken, bytes sent,
neighbours heard, the vector's mean; after the last, `{"event": "done"}`. `spawn_peers` / `stop_peers` start and end
such a group (`swarmgrad.procs.ChildProcess`es, whose events the tests and the benchmark wait on). It holds no
protocol logic (the machine and the service do) and no peer uses it in production.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import trio

from gossip.messages import model_fingerprint
from gossip.round import GossipConfig
from gossip.service import GossipService
from p2p.host import HostConfig
from p2p.libp2p_transport import LibP2PTransport
from swarmgrad.core.codec import Schema
from swarmgrad.core.errors import LocalProtocolError, TransportError
from swarmgrad.procs import ChildProcess

DENSE_PROTOCOL = "/swarmgrad/gossip-dense-baseline/1.0.0"
_ROOT = Path(__file__).resolve().parent.parent
SETUP_TIMEOUT_S = 60.0
"""Bound on starting, finding and connecting to the other peers (imports of torch and libp2p take seconds)."""


@dataclasses.dataclass(frozen=True)
class DenseVector:
    """The dense baseline's message: a whole fp32 vector for one round."""

    round: int
    values: np.ndarray


DENSE_SCHEMA = Schema("gossip-dense-baseline", {1: DenseVector})


def spawn_peers(directory: Path, peers: int, options: Sequence[str]) -> list[ChildProcess]:
    """Start `peers` processes of this module sharing `directory` (each one's stderr in `peer<I>.err` there), with
    `options` (`--numel`, `--rounds`, `--deadline-s`, ...) on every command line. End them with `stop_peers`."""
    procs = []
    for index in range(peers):
        command = [sys.executable, "-m", "testing.gossip_loopback", "--index", str(index)]
        command += ["--peers", str(peers), "--dir", str(directory), *options]
        procs.append(ChildProcess(f"peer{index}", command, directory / f"peer{index}.err", cwd=_ROOT))
    return procs


def stop_peers(procs: Sequence[ChildProcess]) -> None:
    """Kill whichever of `procs` still run (SIGKILL also ends a SIGSTOPped process) and reap them."""
    for proc in procs:
        proc.kill()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--deadline-s", type=float, default=2.0)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--mode", choices=("sparse", "dense"), default="sparse")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's intra-op threads: 1, since the peers of a group share one machine's cores",
    )
    return parser.parse_args(argv)


def _record(line: dict[str, float | int]) -> None:
    print(json.dumps({"event": "round", **line}), flush=True)


async def _connect_all(transport: LibP2PTransport, args: argparse.Namespace) -> None:
    addr_path = args.dir / f"peer{args.index}.addr"
    tmp = addr_path.with_suffix(".tmp")
    tmp.write_text(transport.listen_multiaddrs[0])
    tmp.rename(addr_path)
    with trio.fail_after(SETUP_TIMEOUT_S):
        for other in range(args.index):
            other_path = args.dir / f"peer{other}.addr"
            while not other_path.exists():
                await trio.sleep(0.05)  # another process: polling a file is the only signal there is
            await transport.connect(other_path.read_text())
        while len(transport.connected_peers()) < args.peers - 1:
            await trio.sleep(0.05)


async def _sparse_rounds(transport: LibP2PTransport, args: argparse.Namespace, x: torch.Tensor) -> None:
    config = GossipConfig(
        swarm_id="loopback",
        density=args.density,
        round_deadline_s=args.deadline_s,
        seed=args.index,
        neighbours_per_round=args.neighbours,
    )
    service = GossipService(transport, config, x.numel(), model_fingerprint([(x.numel(),)]))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        for _ in range(args.rounds):
            sent_before = transport.statistics().get("bytes_out", 0)
            start = time.perf_counter()
            x = (await service.average_async(x)).params
            done = service.last_round
            if done is None:
                raise LocalProtocolError("average returned without a completed round")
            _record(
                {
                    "time": time.time(),
                    "round": done.round,
                    "seconds": time.perf_counter() - start,
                    "bytes_sent": transport.statistics().get("bytes_out", 0) - sent_before,
                    "heard": len(done.contributors),
                    "timed_out": int(done.timed_out),
                    "mean": float(x.mean()),
                },
            )
        nursery.cancel_scope.cancel()


async def _send_counting_failure(transport: LibP2PTransport, peer: str, body: bytes) -> None:
    """A dense send that fails (the neighbour finished and closed first) loses that contribution, as in gossip."""
    try:
        await transport.send(peer, DENSE_PROTOCOL, body)
    except TransportError as exc:
        logging.getLogger(__name__).warning("dense send to %s failed: %s", peer, exc)


async def _dense_rounds(transport: LibP2PTransport, args: argparse.Namespace, x: torch.Tensor) -> None:
    inbox = transport.listen(DENSE_PROTOCOL, max_message_bytes=x.numel() * 4 + 4096, queue_len=8)
    ring = sorted([*transport.connected_peers(), transport.local_peer])  # the same ring in every process
    me = ring.index(transport.local_peer)
    neighbours = sorted({ring[me - 1], ring[(me + 1) % len(ring)]})  # symmetric: each receives from both
    pending: dict[int, list[np.ndarray]] = {}
    for number in range(args.rounds):
        sent_before = transport.statistics().get("bytes_out", 0)
        start = time.perf_counter()
        body = DENSE_SCHEMA.encode(DenseVector(number, x.numpy()))
        with trio.move_on_after(args.deadline_s):
            async with trio.open_nursery() as nursery:
                for peer in neighbours:
                    nursery.start_soon(_send_counting_failure, transport, peer, body)
            while len(pending.get(number, [])) < len(neighbours):
                delivery = await inbox.receive()
                msg = DENSE_SCHEMA.decode(delivery.payload)
                if isinstance(msg, DenseVector) and msg.round >= number:
                    pending.setdefault(msg.round, []).append(msg.values)
        got = pending.pop(number, [])
        x = torch.stack([x, *(torch.from_numpy(v.copy()) for v in got)]).mean(0)
        _record(
            {
                "time": time.time(),
                "round": number,
                "seconds": time.perf_counter() - start,
                "bytes_sent": transport.statistics().get("bytes_out", 0) - sent_before,
                "heard": len(got),
                "timed_out": int(len(got) < len(neighbours)),
                "mean": float(x.mean()),
            },
        )


async def run_peer(args: argparse.Namespace) -> None:
    gen = torch.Generator().manual_seed(args.index)
    x = torch.randn(args.numel, generator=gen) + float(args.index)
    config = HostConfig(key_path=args.dir / f"peer{args.index}.key")
    async with LibP2PTransport.open(config) as transport:
        await _connect_all(transport, args)
        if args.mode == "sparse":
            await _sparse_rounds(transport, args, x)
        else:
            await _dense_rounds(transport, args, x)
        print(json.dumps({"event": "done"}), flush=True)
        # Stay up a little so that the others' last replies and reads do not fail on a closed connection.
        await trio.sleep(min(2.0, args.deadline_s))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = _parse(argv)
    if not (0 <= args.index < args.peers and math.isfinite(args.deadline_s) and args.torch_threads >= 1):
        raise SystemExit(f"bad arguments: {args}")
    torch.set_num_threads(args.torch_threads)
    trio.run(run_peer, args)


if __name__ == "__main__":
    main()
