"""The `swarmgrad` command line: argument parsing, the subcommands' top level, exit codes.

Subcommands here: `id` (print this peer's id and the addresses others dial it at), `keygen` (write a new
private-swarm key), `verify-chain` (check a provenance chain file offline), `node` (run a discovery-only member of
a swarm: a bootstrap peer, or a probe for tests and benchmarks) and `sim` (the research simulator, run as
`python -m sim` in a subprocess: the product never imports a harness). Other modules add subcommands by
convention: a module listed in `PLUGIN_SUBCOMMANDS` defines `register(subparsers) -> None`, which adds its parser
(under the listed name) with
`set_defaults(run=<function(args) -> int>)`; it reuses `swarmgrad.netconfig.add_network_arguments` for the flags
every swarm member shares (`--config`, `--set`, `--json`, the data directory and the `[network]` flags), so `id`,
`node` and `peer` accept the same ones. A plugin module is imported only when its subcommand runs, so `swarmgrad id`
or `node` never pays for (or breaks on) torch and the training stack.

`node` prints one line per event on stdout (`listening`, `peer_discovered` with `via`, `peer_up`, `peer_down`,
`peer_forgotten`, `reachability` with `reason`, `stats`): `event key=value ...` for people, one JSON object with
`--json` for scripts and tests; logs go to stderr. `id` runs no node, so it cannot know the verdict: it shows the
configured `network.reachability` (in `--json`, and as a note on stderr). Every error the user can fix (malformed
or unreachable bootstrap address, wrong swarm key, bad swarm id, port in use, bad key file) is one line on stderr
naming the value, and a non-zero exit status: 2 for a bad argument, 1 for anything else. This is the one place where
`except SwarmgradError` ends the program; nothing here is protocol logic.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import multiaddr
import trio

from p2p.addrs import advertised_addrs, interface_ips, tcp_port_of
from p2p.host import HostConfig
from p2p.identity import load_or_create_identity, peer_id_of
from p2p.membership import PeerDiscovered, PeerForgotten
from p2p.node import NodeConfig, SwarmNode, open_node
from p2p.reachability import ReachabilityChanged
from p2p.relay import RelayAddrsChanged
from p2p.swarm import SwarmKey, write_swarm_key
from swarmgrad.core.errors import ConfigError, SwarmgradError
from swarmgrad.core.machine import PeerDown, PeerUp
from swarmgrad.netconfig import MemberConfig, add_network_arguments, load_member_config, network_overrides

PLUGIN_SUBCOMMANDS = {"peer": ("swarmgrad.peer", "run a training peer (see `swarmgrad peer --help`)")}
"""Subcommand name -> (module whose `register(subparsers)` adds it, one-line help shown by `swarmgrad --help`)."""

EXIT_USAGE = 2
EXIT_FAILURE = 1

log = logging.getLogger("swarmgrad.cli")


class UnknownSwarm(SwarmgradError):
    """Bootstrap peers answered, but no member of the swarm could be found through them."""


# ---- shared flags ---------------------------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def member_config_from_args(args: argparse.Namespace) -> MemberConfig:
    """The data directory and `[network]` that the shared flags (`swarmgrad.netconfig.add_network_arguments`) and
    the `--config` file describe. Raises `ConfigError` naming the field."""
    return load_member_config(args.config, network_overrides(args))


# ---- subcommands ----------------------------------------------------------------------------------------------------


def _run_id(args: argparse.Namespace) -> int:
    member = member_config_from_args(args)
    key_path, listen, announce = member.key_path, member.network.listen, member.network.announce
    HostConfig(key_path=key_path, listen_addrs=listen, announce_addrs=announce)  # validates them as the host would
    peer_id = peer_id_of(load_or_create_identity(key_path))
    dialable = advertised_addrs([multiaddr.Multiaddr(addr) for addr in listen], list(announce), interface_ips())
    addrs = [f"{addr}/p2p/{peer_id}" for addr in dialable]
    if any(tcp_port_of(addr) == 0 for addr in dialable):
        print("note: port 0 is chosen when the peer starts; its log shows the real address", file=sys.stderr)
    setting = member.network.reachability
    if args.json:
        print(json.dumps({"peer_id": peer_id, "addrs": addrs, "identity_file": str(key_path), "reachability": setting}))
    else:
        print(peer_id)
        for addr in addrs:
            print(addr)
        decided = "a running peer decides it by dial-backs (its `reachability` event)" if setting == "auto" else "set"
        print(f"note: network.reachability = {setting}: {decided}", file=sys.stderr)
    return 0


def _value_hash(text: str) -> bytes:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a value hash (64 hex digits)")
    return bytes.fromhex(text)


def _run_verify_chain(args: argparse.Namespace) -> int:
    from consensus.provenance import verify_file  # here: `swarmgrad id` and `node` never load the consensus layer

    genesis, epochs = verify_file(args.path, args.trust)
    start = "the trusted certificate" if args.trust is not None else f"genesis ({len(genesis.members)} members)"
    print(f"chain {args.path}: swarm {genesis.swarm_id!r}, verified from {start}")
    header = f"{'epoch':>6} {'round':>7} {'c.round':>7}  {'checkpoint root':<16} {'members':>7} {'signers':>7}"
    print(f"{header}  value hash")
    for e in epochs:
        print(
            f"{e.epoch:>6} {e.round:>7} {e.consensus_round:>7}  {e.checkpoint_root.hex()[:16]:<16} "
            f"{e.member_count:>7} {len(e.signers):>7}  {e.value_hash.hex()}"
        )
    print(f"ok: {len(epochs)} epochs, every link, signature, quorum, attendance, evidence and join request holds")
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    write_swarm_key(args.out, SwarmKey(secrets.token_bytes(32)))
    print(f"wrote a new swarm key to {args.out}; give it, over a secure channel, to every peer of the private swarm")
    return 0


class _Output:
    """`swarmgrad node`'s events on stdout: one JSON object per line with `--json`, else one readable line each."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, record: dict[str, object]) -> None:
        if self.as_json:
            print(json.dumps(record, sort_keys=True), flush=True)
            return
        fields = " ".join(f"{key}={value}" for key, value in sorted(record.items()) if key not in ("event", "t"))
        print(f"{record['event']} {fields}".rstrip(), flush=True)


async def _serve_node(config: NodeConfig, args: argparse.Namespace) -> None:
    output = _Output(args.json)
    async with open_node(config) as node:
        events = node.subscribe()
        output.emit(
            {
                "event": "listening",
                "peer_id": node.peer_id,
                "addrs": node.listen_multiaddrs,
                "swarm_id": config.discovery.swarm_id,
                "private": config.host.psk is not None,
                "t": time.time(),
            }
        )
        if node.reachability is not None:  # forced by network.reachability: announced before we subscribed
            output.emit(_reachability_record(node.reachability, "set by network.reachability"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_events, events, output)
            nursery.start_soon(_report_stats, node, args.stats_interval_s, output)
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            if config.discovery.bootstrap_addrs:
                await _require_members(node, config, args.join_timeout_s)
            if args.run_for_s is not None:
                await trio.sleep(args.run_for_s)
                nursery.cancel_scope.cancel()
        output.emit({"event": "stats", "t": time.time(), **node.statistics()})


async def _require_members(node: SwarmNode, config: NodeConfig, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        await node.wait_for_peers(1)  # also when the member came up before this was called
        return
    raise UnknownSwarm(
        f"no member of swarm {config.discovery.swarm_id!r} found within {timeout_s} s through "
        f"{', '.join(config.discovery.bootstrap_addrs)}: check --swarm-id (and --swarm-key)"
    )


async def _report_events(events: trio.MemoryReceiveChannel[object], output: _Output) -> None:
    async for event in events:
        now = time.time()
        if isinstance(event, PeerDiscovered):
            output.emit({"event": "peer_discovered", "peer": event.peer, "via": event.via, "t": now})
        elif isinstance(event, PeerUp):
            output.emit({"event": "peer_up", "peer": event.peer, "t": now})
        elif isinstance(event, RelayAddrsChanged):
            output.emit({"event": "relayed", "relays": list(event.relays), "addrs": list(event.addrs), "t": now})
        elif isinstance(event, PeerDown):
            output.emit({"event": "peer_down", "peer": event.peer, "t": now})
        elif isinstance(event, PeerForgotten):
            output.emit({"event": "peer_forgotten", "peer": event.peer, "failures": event.failures, "t": now})
        elif isinstance(event, ReachabilityChanged):
            output.emit(_reachability_record(event.reachability, event.reason))


def _reachability_record(reachability: str, reason: str) -> dict[str, object]:
    return {"event": "reachability", "reachability": reachability, "reason": reason, "t": time.time()}


async def _report_stats(node: SwarmNode, interval_s: float | None, output: _Output) -> None:
    if interval_s is None:
        return
    while True:
        await trio.sleep(interval_s)
        output.emit({"event": "stats", "t": time.time(), "live": node.live_peers(), **node.statistics()})


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


def _run_node(args: argparse.Namespace) -> int:
    member = member_config_from_args(args)
    config = member.network.node_config(member.key_path)
    trio.run(_serve_node, config, args)
    return 0


# ---- parser and entry point -----------------------------------------------------------------------------------------


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; the plugin subcommand `command` (if any) gets its real parser, the others a stub for `--help`."""
    parser = argparse.ArgumentParser(prog="swarmgrad", description="Peer-to-peer training with no coordinator.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--libp2p-log-level",
        default="ERROR",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="level of py-libp2p's own (noisy) logs; default ERROR",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    id_parser = subparsers.add_parser(
        "id",
        help="print this peer's id and the addresses others dial it at (creates the identity)",
        description="Print this peer's id and the addresses a joiner passes as --bootstrap: the --announce ones, "
        "else the listen addresses with 0.0.0.0 expanded into this host's interface addresses. Give it the same "
        "flags and --config as the peer or node.",
    )
    add_network_arguments(id_parser)
    id_parser.set_defaults(run=_run_id)

    keygen = subparsers.add_parser("keygen", help="write a new swarm key (libp2p pnet, /key/swarm/psk/1.0.0/)")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE", help="where to write it (mode 0600)")
    keygen.set_defaults(run=_run_keygen)

    verify = subparsers.add_parser(
        "verify-chain",
        help="check a provenance chain file offline: every certificate's signatures, quorum and parent link, and "
        "the attendance, evidence and join requests its value carries",
        description="Verify a chain file (a peer's data directory holds one) from its genesis record, or from a "
        "certificate you trust, named by its value hash. Exit status 0 only when every link, signature and quorum "
        "holds and every attendance, evidence entry and join request of a verified value verifies (the next member "
        "sets are not recomputed: the membership policy is not in the file); otherwise one line names the record "
        "or epoch and the problem, exit status 1.",
    )
    verify.add_argument("path", type=Path, metavar="PATH")
    verify.add_argument(
        "--trust", type=_value_hash, metavar="HASH", help="verify from the certificate with this value hash"
    )
    verify.set_defaults(run=_run_verify_chain)

    node = subparsers.add_parser("node", help="run a discovery-only member of a swarm (e.g. a bootstrap peer)")
    add_network_arguments(node)
    node.add_argument(
        "--join-timeout-s",
        type=_positive_float,
        default=15.0,
        help="with --bootstrap: fail unless a member of the swarm is found within this time (default 15)",
    )
    node.add_argument("--run-for-s", type=_positive_float, help="stop after this many seconds (default: run on)")
    node.add_argument("--stats-interval-s", type=_positive_float, help="print a stats line this often")
    node.set_defaults(run=_run_node)

    # The simulator is a harness the product must not import: `swarmgrad sim ...` is `python -m sim ...`.
    sim = subparsers.add_parser("sim", help="run the research simulator (`swarmgrad sim run --help`)", add_help=False)
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    sim.set_defaults(run=lambda args: subprocess.run([sys.executable, "-m", "sim", *args.sim_args]).returncode)

    for name, (module_name, help_text) in PLUGIN_SUBCOMMANDS.items():
        if name == command:
            importlib.import_module(module_name).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `swarmgrad` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_known_args(argv)[0].command
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(args.libp2p_log_level)
    try:
        status: int = args.run(args)
    except (SwarmgradError, BaseExceptionGroup) as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"swarmgrad {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return status


def _user_error(exc: BaseException) -> SwarmgradError | None:
    """The `SwarmgradError` that `exc` is, or the first one of an exception group made only of them (trio nurseries
    wrap what their tasks raise); None for anything else (a bug, which propagates with its traceback)."""
    if isinstance(exc, SwarmgradError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(SwarmgradError)
        if matched is not None and rest is None:
            return _user_error(matched.exceptions[0])
    return None


if __name__ == "__main__":
    sys.exit(main())
