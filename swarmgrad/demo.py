"""`make demo`: a swarm of 4 real peer processes on 127.0.0.1 trains `digits`, next to a single-process baseline.

It starts one bootstrap peer and three that find each other through it (DHT), shows the swarm's progress, and ends
with each peer's test accuracy beside a single process trained on as many samples as one peer, and the gossip bytes
each peer sent beside what the same messages would have cost dense (fp32, whole vector). Exit status: 0 when every peer
reaches `--target` accuracy, 1 when one misses it, 2 when a peer fails to start or finish in time.

It also owns `PeerProcess`, the `swarmgrad.procs.ChildProcess` of one `swarmgrad peer --json`, and `start_swarm`,
which the end-to-end tests and `benchmarks/train.py` use too. Everything it starts it stops. It contains no training
or protocol logic of its own.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from swarmgrad.procs import EXITED, ChildFailed, ChildProcess, Event, reserve_port

DEFAULT_PEERS = 4
DEFAULT_ROUNDS = 200
DEFAULT_TARGET = 0.90
START_TIMEOUT_S = 60.0
BOOTSTRAP_RETRY_S = 0.5
FINISH_TIMEOUT_S = 300.0


class PeerProcess(ChildProcess):
    """One `swarmgrad peer --json` child process; its stderr goes to `log_path`. `wrap` prefixes the command (e.g.
    `ip netns exec <namespace>` to run it on another simulated host)."""

    def __init__(self, name: str, args: Sequence[str], log_path: Path, wrap: Sequence[str] = ()) -> None:
        super().__init__(name, [*wrap, sys.executable, "-m", "swarmgrad.cli", "peer", "--json", *args], log_path)


def peer_args(
    data_dir: Path,
    *,
    swarm_id: str,
    rounds: int,
    bootstrap: str | None = None,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    extra: Sequence[str] = (),
) -> list[str]:
    """The flags of one local demo/test peer: loopback (a free port unless `listen` names one), one torch thread,
    plain progress."""
    args = [
        "--data-dir",
        str(data_dir),
        "--listen",
        listen,
        "--swarm-id",
        swarm_id,
        "--task",
        "digits",
        "--max-rounds",
        str(rounds),
        "--progress",
        "plain",
        "--set",
        "peer.torch_threads=1",
    ]
    if bootstrap is not None:
        args += ["--bootstrap", bootstrap]
    return [*args, *extra]


def start_swarm(
    workdir: Path,
    count: int,
    *,
    swarm_id: str,
    rounds: int,
    extra: Sequence[str] = (),
    extra_of: Mapping[int, Sequence[str]] | None = None,
) -> tuple[list[PeerProcess], str]:
    """Start `count` peers at once: a bootstrap peer and `count - 1` that join through it. As in a real swarm, the
    bootstrap peer's address is settled before it starts (its identity is created here, its port reserved), and the
    others keep dialling it (up to `START_TIMEOUT_S`) until it listens: nobody waits for its start-up first.
    `extra_of[i]` adds flags to peer i only. Every peer's identity is created here too, so that all `count` are
    listed as the consensus founders (the voters of epoch 1). Returns the processes and the bootstrap address. On
    failure, stops whatever it started."""
    from p2p.identity import load_or_create_identity, peer_id_of

    ids = [peer_id_of(load_or_create_identity(workdir / f"peer-{i}" / "identity.key")) for i in range(count)]
    peer_id = ids[0]
    extra = ["--founders", ",".join(ids), *extra]
    port = reserve_port()
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id}"
    attempts = ["--set", f"network.bootstrap_attempts={int(START_TIMEOUT_S / BOOTSTRAP_RETRY_S)}"]
    attempts += ["--set", f"network.bootstrap_retry_s={BOOTSTRAP_RETRY_S}"]
    peers: list[PeerProcess] = []
    try:
        args = peer_args(workdir / "peer-0", swarm_id=swarm_id, rounds=rounds, listen=address.split("/p2p/")[0])
        own = extra_of or {}
        peers.append(PeerProcess("peer-0", [*args, *extra, *own.get(0, ())], workdir / "peer-0.log"))
        for index in range(1, count):
            name = f"peer-{index}"
            args = peer_args(workdir / name, swarm_id=swarm_id, rounds=rounds, bootstrap=address)
            args = [*args, *attempts, *extra, *own.get(index, ())]
            peers.append(PeerProcess(name, args, workdir / f"{name}.log"))
    except BaseException:
        for peer in peers:
            peer.stop()
        raise
    return peers, address


def baseline_accuracy(samples: int) -> float:
    """Test accuracy of one process trained on `samples` examples drawn from the whole training set, with the same
    model, optimizer and batch size as the peers."""
    import torch

    from training.tasks.digits import DigitsTask, make_task

    task = DigitsTask(shard_fraction=1.0, optimizer=make_task().optimizer)
    model = task.build_model()
    optimizer = task.optimizer.build(list(model.parameters()))
    batches = task.shard("baseline").batches()
    torch.set_num_threads(1)
    for _ in range(max(1, samples // task.optimizer.batch_size)):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task.evaluate(model).value


def show_progress(peers: Sequence[PeerProcess], timeout_s: float) -> dict[str, Event]:
    """Print the swarm's evaluations as they come; return each peer's `finished` event. Raises `ChildFailed` when a
    peer exits without finishing or the swarm is not done within `timeout_s`."""
    finished: dict[str, Event] = {}
    latest: dict[str, Event] = {}
    deadline = time.monotonic() + timeout_s
    while len(finished) < len(peers):
        if time.monotonic() > deadline:
            raise ChildFailed(f"the swarm did not finish within {timeout_s:.0f} s")
        for peer in peers:
            if peer.name in finished:
                continue
            event = peer.next_event(0.05)
            if event is None:
                continue
            if event["event"] == EXITED["event"]:
                raise ChildFailed(f"{peer.name} exited with status {peer.wait(10.0)} (log: {peer.log_path})")
            if event["event"] == "finished":
                finished[peer.name] = event
            elif event["event"] == "round":
                latest[peer.name] = event
                if peer.name == peers[0].name and event["round"] % 50 == 0:
                    cells = "  ".join(f"{name} r{e['round']:4d} {e['value']:.3f}" for name, e in sorted(latest.items()))
                    peers_up = max(e["peers"] for e in latest.values())
                    print(f"  {cells}   (live peers seen: {peers_up})", flush=True)
            elif event["event"] == "certified" and peer.name == peers[0].name:
                print(
                    f"  certified epoch {event['epoch']}: round {event['round']}, root {event['root'][:16]},"
                    f" proposer ...{event['proposer'][-8:]}, signers {event['signers']}/{event['members']},"
                    f" commit latency {event['commit_latency_ms']} ms",
                    flush=True,
                )
            elif event["event"] == "model_refused":
                print(f"  {peer.name} refused a model from {event['peer']}: {event['reason']}", flush=True)
    return finished


def report(finished: dict[str, Event], baseline: float, target: float) -> bool:
    """Print the result table; return whether every peer reached `target`."""
    print()
    print(
        f"{'peer':8} {'rounds':>6} {'samples':>8} {'test acc':>9} {'gossip bytes':>12} {'dense would':>13} {'ratio':>7}"
    )
    ok = True
    for name in sorted(finished):
        e = finished[name]
        dense = e["dense_bytes_equivalent"]
        sent = e["gossip_bytes_sent"]  # what the dense figure prices: gossip's messages, not consensus'
        ratio = dense / sent if sent else float("inf")
        ok = ok and e["value"] >= target
        print(f"{name:8} {e['round']:6d} {e['samples']:8d} {e['value']:9.4f} {sent:12,d} {dense:13,d} {ratio:6.1f}x")
    samples = max(e["samples"] for e in finished.values())
    print(f"{'baseline':8} {'':6} {samples:8d} {baseline:9.4f}   (one process, same number of samples as one peer)")
    verdict = "every peer reached" if ok else "NOT every peer reached"
    print(f"\n{verdict} the target test accuracy of {target:.2f}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarmgrad.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--target", type=float, default=DEFAULT_TARGET, help="test accuracy every peer must reach")
    parser.add_argument("--keep", type=Path, help="keep the peers' data directories and logs here")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmgrad-demo-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"starting {args.peers} peers on 127.0.0.1 (logs in {workdir}) ...", flush=True)
        wait = ["--set", f"network.min_peers={args.peers - 1}"]
        try:
            peers, address = start_swarm(workdir, args.peers, swarm_id="demo", rounds=args.rounds, extra=wait)
        except ChildFailed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"bootstrap peer: {address}", flush=True)
            print(f"training digits for {args.rounds} rounds; test accuracy per peer:", flush=True)
            finished = show_progress(peers, FINISH_TIMEOUT_S)
        except ChildFailed as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for peer in peers:
                peer.stop()
        samples = max(e["samples"] for e in finished.values())
        ok = report(finished, baseline_accuracy(samples), args.target)
        chain = workdir / "peer-0" / "consensus" / "chain"
        if args.keep is None:  # the work directory goes away: keep a copy of the chain to verify
            kept = Path(tempfile.gettempdir()) / "swarmgrad-demo.chain"
            shutil.copyfile(chain, kept)
            chain = kept
        ok = show_chain(chain) and ok
    print(f"demo took {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


def show_chain(chain: Path) -> bool:
    """Print where the certified chain is and the command that verifies it; run that command. Whether it passed."""
    command = [sys.executable, "-m", "swarmgrad.cli", "verify-chain", str(chain)]
    print(f"\ncertified chain: {chain}\nverify it with:  swarmgrad verify-chain {chain}")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    last = (result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""])[-1]
    print(f"  -> exit {result.returncode}: {last}")
    return result.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
