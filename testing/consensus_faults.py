"""The seeded fault harness of the epoch consensus: the real `EpochChain` machines on the simulator's event core.

One seed draws one scenario and runs it in virtual time on `sim.events` (an `EventLoop` and its `Simulator` driver)
with `sim.network.NetworkModel` for the links; no trio, no clock reads, every draw from one `random.Random(seed)`.
Every honest member runs `consensus.epochs.EpochChain`, the machine a real peer's consensus service runs, fed what
the service feeds it (its checkpoints, messages, timers, `PeerUp` of the others, answers to its checks); the
`Equivocator` and `Silent` roles are `sim.consensus`'s, shared with the swarm simulation; this module draws the
scenarios, injects the faults and checks the properties.

A scenario: n in {4, 7, 10, 31} founders (the chain's membership rule may drop a proven equivocator from a later
epoch; nobody is silent long enough to be dropped in these few epochs), up to f = (n - 1) // 3 Byzantine ones,
each of one behaviour --

* `equivocate`: for every round it hears of, signs prevotes and precommits for values of that round drawn at random
  per receiver (nil among them), again whenever it hears of a new value; as proposer it sends either two different
  valid values to two random halves or (lock breaking) one fresh valid value to all members but the next round's
  proposer (so that it proposes another value there), backed by its
  prevotes to them, while its precommit for it goes to a single random victim (in the other rounds it backs the
  round's newest value to all);
* `silent`: never sends anything;
* `poison`: runs the honest code, but proposes a poisoned checkpoint that honest validity checks refuse;
* `twins`: two copies of the honest code under one key, each with its own state (the Twins method), placed on
  different sides of the partition when there is one --

and, for the honest members: crash-restarts at random times and at random `Persist` points (the restarted machine
gets exactly what was persisted, and actions after the `Persist` are lost with the crash), a partition of the
members into two sides that heals, and message loss, duplication, reordering and random latency until then.
`heal_s` is when the last partition, loss and crash end (GST); after it links keep their latency and jitter.
Several epochs run back to back: every node holds its checkpoints of all of them from the start, so its chain
starts E+1 as soon as it has E's certificate and E's attendance (every member's vote, or `vote_timeout_s`).

Checked on every run:

* **agreement**: no two different values certified for one epoch, among every node's decisions (twins included)
  and every `Certificate` message sent by anyone;
* **validity**: every certified value was proposed and passed the validity check of at least f+1 honest members;
* **liveness**: every honest member (restarted ones included) decides every epoch by
  `heal_s + (isolate_decider_s + LIVENESS_BOUND_S) * epochs` of virtual time.

`python -m testing.consensus_faults --seed N [--count K] [--variant NAME]` runs seeds and prints each violation
with its seed and a one-line replay command; `--chains DIR` writes each honest node's decided certificates as a
provenance chain file (`consensus.provenance`), one per node, which `swarmgrad verify-chain` checks.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, replace
from pathlib import Path

from consensus.agreement import (
    AgreementConfig,
    Candidate,
    CheckProposal,
    EquivocationFound,
    Persist,
    ProposalChecked,
    StartEpoch,
    VoterState,
)
from consensus.certificate import verify_certificate
from consensus.epochs import Certified, Checkpoint, EpochChain
from consensus.errors import CertificateError
from consensus.messages import (
    SCHEMA,
    Certificate,
    Proposal,
    Vote,
    max_faulty,
)
from consensus.provenance import ChainGenesis, append_certificate, create_chain
from consensus.signing import SignatureVerifier, Signer
from sim.consensus import Equivocator, MemoSigner, Silent, chain_candidate
from sim.events import EventLoop, Simulator
from sim.network import NetworkConfig, NetworkModel, links_between
from swarmgrad.core.machine import Action, Effect, Event, PeerId, PeerUp, Send

SIZES = (4, 7, 10, 31)
SIZE_WEIGHTS = (0.47, 0.3, 0.2, 0.03)
BEHAVIOURS = ("equivocate", "silent", "poison", "twins")
BEHAVIOUR_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
VARIANTS = ("honest", "weak_quorum", "ignore_lock")
SWARM_ID = "faults"
SPEC_HASH = hashlib.sha256(b"model spec").digest()
LIVENESS_BOUND_S = 60.0
"""Virtual seconds per epoch, after `heal_s`, by which every honest member must have decided (see docs/consensus.md:
after GST a round whose proposer is honest decides once its timeouts exceed the ~0.5 s of a round trip and a
check; an honest proposer comes within f+1 rounds, and rounds started before GST are at most a few seconds long
at these durations)."""
ISOLATE_MAX_S = 8.0
CHECK_DELAY_S = (0.005, 0.1)


def _root(label: str, epoch: int) -> bytes:
    return hashlib.sha256(f"{label}/{epoch}".encode()).digest()


class Twinned:
    """A node's `EpochChain` with its sends carried to every copy of their receiver (one key run twice is one
    address that reaches both copies: what the network does for Twins)."""

    def __init__(self, chain: EpochChain, copies_of: dict[PeerId, tuple[PeerId, ...]]) -> None:
        self.chain = chain
        self.copies_of = copies_of

    def step(self, now: float, event: Event) -> list[Action]:
        out: list[Action] = []
        for action in self.chain.step(now, event):
            if isinstance(action, Send) and action.peer in self.copies_of:
                out.extend(Send(peer, action.msg) for peer in self.copies_of[action.peer])
            else:
                out.append(action)
        return out


@dataclass
class Scenario:
    seed: int
    n: int
    behaviour_of: dict[int, str]
    epochs: int
    latency_s: float
    loss: float
    duplicate: float
    jitter_s: float
    partition: tuple[tuple[int, ...], tuple[int, ...]] | None
    partition_s: tuple[float, float]
    crashes: list[tuple[int, float, float, bool]]  # (member, at_s, down_s, at_persist)
    heal_s: float
    isolate_decider_s: float
    flap_period_s: float
    """> 0: until `heal_s`, the links are re-partitioned at random every this many seconds (into two random sides,
    or not at all), so that members in one round see different subsets of the votes."""
    """> 0: when the first node decides an epoch, cut all its links for this long (a targeted partition: the
    decider's news must not save the others from a broken protocol); liveness then allows this much more per epoch."""

    @classmethod
    def draw(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        n = rng.choices(SIZES, SIZE_WEIGHTS)[0]
        f = max_faulty(n)
        byzantine = rng.sample(range(n), rng.randint(0, f) if rng.random() < 0.3 else f)
        behaviour_of = {i: rng.choices(BEHAVIOURS, BEHAVIOUR_WEIGHTS)[0] for i in sorted(byzantine)}
        partition = None
        partition_s = (0.0, 0.0)
        if rng.random() < 0.6:
            side = set(rng.sample(range(n), rng.randint(1, n - 1)))
            for i, kind in behaviour_of.items():
                if kind == "twins":  # twin copies go on different sides: one copy per side
                    side.discard(i)
            partition = (tuple(sorted(side)), tuple(sorted(set(range(n)) - side)))
            start = rng.uniform(0.0, 3.0)
            partition_s = (start, start + rng.uniform(0.5, 8.0))
        crashes = []
        honest = [i for i in range(n) if i not in behaviour_of]
        for i in honest:
            if rng.random() < 0.25:
                crashes.append((i, rng.uniform(0.0, 6.0), rng.uniform(0.05, 3.0), rng.random() < 0.5))
        lossy = rng.random() < 0.7
        loss = rng.uniform(0.0, 0.3) if lossy else 0.0
        end = max([partition_s[1], *(at + down for _, at, down, _ in crashes)], default=0.0)
        heal_s = max(end, rng.uniform(0.0, 5.0) if lossy else 0.0)
        return cls(
            seed=seed,
            n=n,
            behaviour_of=behaviour_of,
            epochs=3 if n == 4 else 2 if n <= 10 else 1,
            latency_s=rng.uniform(0.01, 0.1),
            loss=loss,
            duplicate=rng.uniform(0.0, 0.1) if rng.random() < 0.5 else 0.0,
            jitter_s=rng.uniform(0.0, 0.1) if rng.random() < 0.6 else 0.0,
            partition=partition,
            partition_s=partition_s,
            crashes=crashes,
            heal_s=heal_s,
            isolate_decider_s=rng.uniform(0.5, ISOLATE_MAX_S) if rng.random() < 0.5 else 0.0,
            flap_period_s=rng.uniform(0.1, 1.0) if rng.random() < 0.4 else 0.0,
        )


@dataclass
class Violation:
    seed: int
    variant: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return (
            f"seed {self.seed} ({self.variant}): {self.kind}: {self.detail}\n"
            f"  replay: python -m testing.consensus_faults --seed {self.seed} --variant {self.variant}"
        )


@dataclass
class RunResult:
    seed: int
    violations: list[Violation]
    decided_at: dict[int, float]
    certificates: dict[PeerId, list[Certificate]]
    events_run: int
    virtual_s: float
    scenario: Scenario
    stats: Counter[str]


class FaultRun:
    """One seeded run of a scenario; `result()` runs it and checks the properties."""

    def __init__(self, scenario: Scenario, variant: str = "honest") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.scenario = scenario
        self.variant = variant
        self.rng = random.Random(scenario.seed * 7919 + 1)
        s = scenario
        self.signers: list[Signer] = [MemoSigner.from_seed(f"{s.seed}/member {i}".encode()) for i in range(s.n)]
        self.members = tuple(sorted(signer.public_key for signer in self.signers))
        self.genesis = ChainGenesis(SWARM_ID, self.members)
        self.genesis_parent = self.genesis.parent_hash
        self.index_of = {signer.public_key: i for i, signer in enumerate(self.signers)}
        self.name_of = {signer.public_key: f"n{i:02d}" for i, signer in enumerate(self.signers)}
        self.peer_of = dict(self.name_of)
        self.copies_of: dict[PeerId, tuple[PeerId, ...]] = {}
        self.swarm_id = SWARM_ID
        self.verifier = SignatureVerifier(max_entries=1 << 18)
        honest_config = AgreementConfig(planted_bug=None if variant == "honest" else variant)
        self.honest = [i for i in range(s.n) if i not in s.behaviour_of]
        self.valid_roots: set[bytes] = set()
        self.checks_passed: dict[bytes, set[int]] = {}
        self.proposed: set[bytes] = set()
        self.certified: dict[int, dict[bytes, str]] = {}
        self.first_certificate: dict[int, Certificate] = {}  # the run's chain: each epoch's first certificate seen
        self.decided_at: dict[tuple[PeerId, int], float] = {}
        self.chains: dict[PeerId, list[Certificate]] = {}
        self.persisted_states: dict[PeerId, VoterState] = {}
        self.crash_at_persist: dict[PeerId, tuple[float, float]] = {}
        self.violations: list[Violation] = []
        self._flapped: list[tuple[PeerId, PeerId]] = []
        self.complete = 0  # honest members that decided every epoch
        self.stats: Counter[str] = Counter()  # faults injected and detected, for the tests
        self.honest_names = [self.name_of[self.signers[i].public_key] for i in self.honest]
        self.loop = EventLoop()
        self.network = NetworkModel(
            NetworkConfig(
                latency_s=s.latency_s,
                latency_distribution="uniform",
                latency_spread=0.5,
                loss=s.loss,
                duplicate=s.duplicate,
                reorder_jitter_s=s.jitter_s,
            ),
            random.Random(s.seed * 7919 + 2),
        )
        self._last_msg: object = None
        self._vote_sizes: dict[tuple[int, int, int], int] = {}
        self._last_size = 0
        self.sim = Simulator(self.loop, self.network, self._size_bytes, host=self)
        self.nodes: dict[PeerId, tuple[int, str, AgreementConfig]] = {}
        self.equivocators: list[PeerId] = []
        for i in range(s.n):
            name = self.name_of[self.signers[i].public_key]
            kind = s.behaviour_of.get(i, "honest")
            if kind == "silent":
                self.sim.add(name, Silent())
            elif kind == "equivocate":
                self.equivocators.append(name)
                rng = random.Random(s.seed * 31 + i)
                self.sim.add(name, Equivocator(self, self.signers[i], rng, split=rng.random() < 0.3))
            else:
                label = f"poison/{i}" if kind == "poison" else f"honest/{i}"
                if kind != "poison":
                    self.valid_roots.update(_root(label, e) for e in range(1, s.epochs + 1))
                config = honest_config if kind == "honest" else AgreementConfig()
                self.nodes[name] = (i, label, config)
                if kind == "twins":
                    twin = name + "b"
                    self.copies_of[name] = (name, twin)
                    self.nodes[twin] = (i, f"twin/{i}", config)
                    self.valid_roots.update(_root(f"twin/{i}", e) for e in range(1, s.epochs + 1))
        self.all_peers = sorted(self.nodes) + sorted(
            self.name_of[self.signers[i].public_key]
            for i in s.behaviour_of
            if s.behaviour_of[i] in ("silent", "equivocate")
        )
        self.all_peers = sorted(set(self.all_peers))

    # ---- the host -----------------------------------------------------------------------------------------------

    def _size_bytes(self, msg: object) -> int:
        if msg is self._last_msg:
            return self._last_size
        if isinstance(msg, Vote):  # a vote's encoding depends only on these lengths: encode one of each shape
            shape = (len(msg.value_hash), msg.epoch.bit_length(), msg.consensus_round.bit_length())
            size = self._vote_sizes.get(shape)
            if size is None:
                size = self._vote_sizes[shape] = len(SCHEMA.encode(msg))
            return size
        if isinstance(msg, Proposal):
            value_hash = msg.value.hash()
            self.proposed.add(value_hash)
            index = self.index_of[msg.proposer]
            if index in self.honest and msg.value.checkpoint_root in self.valid_roots:
                self.checks_passed.setdefault(value_hash, set()).add(index)  # its own checkpoint, or one it checked
        elif isinstance(msg, Certificate):
            self._observe_certificate(msg, "sent")
        self._last_msg, self._last_size = msg, len(SCHEMA.encode(msg))
        return self._last_size

    # ---- sim.consensus.EquivocatorWorld -------------------------------------------------------------------------

    def members_of(self, epoch: int) -> tuple[bytes, ...]:
        return self.members if epoch == 1 else self.first_certificate[epoch - 1].next_members

    def current_epoch(self) -> int:
        return 1 + max((e for e, values in self.certified.items() if values), default=0)

    def forge(self, signer: Signer, tag: str, epoch: int) -> Candidate:
        checkpoint = Checkpoint(epoch, epoch * 100, _root(tag, epoch), SPEC_HASH)
        self.valid_roots.add(checkpoint.root)
        certificates = [self.first_certificate[e] for e in range(1, epoch)]
        return chain_candidate(
            AgreementConfig(), signer, self.genesis, certificates, self.peer_of.__getitem__, self.verifier, checkpoint
        )

    def parent_of(self, epoch: int) -> bytes | None:
        if epoch == 1:
            return self.genesis_parent
        cert = self.first_certificate.get(epoch - 1)
        return None if cert is None else cert.value.hash()

    def _observe_certificate(self, cert: Certificate, where: str) -> None:
        epoch = cert.epoch
        value_hash = cert.value.hash()
        known = self.certified.setdefault(epoch, {})
        if value_hash in known:
            return
        parent = self.parent_of(epoch)
        if parent is None:
            return
        members = self.members_of(epoch)
        if where == "sent":
            try:
                verify_certificate(cert, members, parent, self.verifier, epoch=epoch)
            except CertificateError:
                return  # not a certificate under the real rules (a planted bug's own decisions are counted anyway)
        known[value_hash] = where
        self.first_certificate.setdefault(epoch, cert)
        if len(known) > 1:
            self._violate("agreement", f"epoch {epoch} has {len(known)} certified values ({where})")
        honest_passes = self.checks_passed.get(value_hash, set())
        f = max_faulty(len(members))
        if value_hash not in self.proposed or len(honest_passes) < f + 1:
            self._violate(
                "validity",
                f"epoch {epoch}: certified value passed {len(honest_passes)} honest checks (f+1 = {f + 1})",
            )

    def _violate(self, kind: str, detail: str) -> None:
        self.violations.append(Violation(self.scenario.seed, self.variant, kind, detail))

    def notified(self, peer: PeerId, event: object) -> None:
        if isinstance(event, Certified):
            cert = event.certificate
            chain = self.chains.setdefault(peer, [])
            if cert.epoch != len(chain) + 1:
                return
            chain.append(cert)
            if cert.epoch == self.scenario.epochs and peer in self.honest_names:
                self.complete += 1
            self.decided_at[(peer, cert.epoch)] = self.loop.now
            first = not self.certified.get(cert.epoch)
            if first and self.scenario.isolate_decider_s > 0:
                cut = [(peer, other) for other in self.all_peers if other != peer]
                self.network.block(cut)
                self.loop.at(self.loop.now + self.scenario.isolate_decider_s, lambda: self.network.heal(cut))
            self._observe_certificate(cert, f"decided by {peer}")
            if first:
                self._kick()
        elif isinstance(event, EquivocationFound):
            self.stats["equivocations_found"] += 1
            offender = event.evidence.offender
            index = self.index_of[offender]
            if self.scenario.behaviour_of.get(index) not in ("equivocate", "twins"):
                self._violate("evidence", f"{peer} blamed honest member {index}")

    def effect(self, peer: PeerId, effect: Effect) -> None:
        if isinstance(effect, Persist):
            self.persisted_states[peer] = effect.state
            window = self.crash_at_persist.get(peer)
            if window is not None and window[0] <= self.loop.now:
                del self.crash_at_persist[peer]
                self.stats["crashes_at_persist"] += 1
                self._crash(peer, window[1])
        elif isinstance(effect, CheckProposal):
            value = effect.proposal.value
            ok = value.checkpoint_root in self.valid_roots  # the chain refused another spec, attendance or member set
            index = self.nodes[peer][0]
            if ok and index in self.honest and not peer.endswith("b"):
                self.checks_passed.setdefault(value.hash(), set()).add(index)
            delay = self.rng.uniform(*CHECK_DELAY_S)
            answer = ProposalChecked(value.epoch, value.hash(), ok, "" if ok else "root outside tolerance")
            self.loop.at(self.loop.now + delay, lambda: self.sim.step(peer, answer))

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0

    # ---- faults -------------------------------------------------------------------------------------------------

    def _spawn(self, name: PeerId) -> None:
        """Start (or restart) `name`'s chain on the certificates it decided (its chain file), resuming its persisted
        votes, told of every other node and handed its checkpoints of every epoch."""
        index, label, config = self.nodes[name]
        chain = EpochChain(
            config,
            self.signers[index],
            self.genesis,
            self.chains.setdefault(name, []),
            self.peer_of.__getitem__,
            verifier=self.verifier,
            state=self.persisted_states.get(name),
        )
        self.sim.add(name, Twinned(chain, self.copies_of) if self.copies_of else chain)
        self.stats["restored_from_persisted"] += name in self.persisted_states
        for other in self.all_peers:
            if other != name:
                self.sim.step(name, PeerUp(other))
        for epoch in range(1, self.scenario.epochs + 1):
            self.sim.step(name, Checkpoint(epoch, epoch * 100, _root(label, epoch), SPEC_HASH))

    def _crash(self, name: PeerId, down_s: float) -> None:
        if not self.sim.has(name):
            return
        self.stats["crashes"] += 1
        self.sim.remove(name)
        self.loop.at(self.loop.now + down_s, lambda: self._spawn(name))

    def _flap(self) -> None:
        if self._flapped:
            self.network.heal(self._flapped)
        self._flapped = []
        if self.loop.now >= self.scenario.heal_s:
            return
        if self.rng.random() < 0.8:
            peers = list(self.all_peers)
            side = set(self.rng.sample(peers, self.rng.randint(1, len(peers) - 1)))
            self._flapped = links_between([sorted(side), sorted(set(peers) - side)])
            self.network.block(self._flapped)
        self.loop.at(self.loop.now + self.scenario.flap_period_s, self._flap)

    def _kick(self) -> None:
        for name in self.equivocators:
            self.loop.at(self.loop.now, lambda name=name: self.sim.step(name, StartEpoch()))  # type: ignore[misc]

    def _heal(self) -> None:
        self.network.config = replace(self.network.config, loss=0.0)

    def result(self) -> RunResult:
        s = self.scenario
        for name in sorted(self.nodes):
            self.loop.at(0.0, lambda name=name: self._spawn(name))  # type: ignore[misc]
        self.loop.at(0.0, self._kick)
        if s.partition is not None:
            left = [self.name_of[self.signers[i].public_key] for i in s.partition[0]]
            right = [self.name_of[self.signers[i].public_key] for i in s.partition[1]]
            right += [self.name_of[self.signers[i].public_key] + "b" for i, k in s.behaviour_of.items() if k == "twins"]
            cut = links_between([left, right])
            self.loop.at(s.partition_s[0], lambda: self.network.block(cut))
            self.loop.at(s.partition_s[1], lambda: self.network.heal(cut))
        for i, at_s, down_s, at_persist in s.crashes:
            name = self.name_of[self.signers[i].public_key]
            if at_persist:
                self.crash_at_persist[name] = (at_s, down_s)
            else:
                self.loop.at(at_s, lambda name=name, down_s=down_s: self._crash(name, down_s))  # type: ignore[misc]
        if s.flap_period_s > 0:
            self.loop.at(0.0, self._flap)
        self.loop.at(s.heal_s, self._heal)
        self.loop.at(s.heal_s, lambda: self.crash_at_persist.clear())
        deadline = s.heal_s + (s.isolate_decider_s + LIVENESS_BOUND_S) * s.epochs
        honest_names = self.honest_names

        def done() -> bool:
            return bool(self.violations) or self.complete >= len(honest_names)

        self.loop.run(until_s=deadline, stop=done)
        if not self.violations:
            for name in honest_names:
                have = len(self.chains.get(name, ()))
                if have < s.epochs:
                    self._violate("liveness", f"{name} decided {have} of {s.epochs} epochs by {deadline:.1f} s")
                    break
        decided_at: dict[int, float] = {}
        for (_, epoch), when in self.decided_at.items():
            decided_at[epoch] = max(decided_at.get(epoch, 0.0), when)
        return RunResult(
            s.seed,
            self.violations,
            decided_at,
            {name: list(self.chains.get(name, [])) for name in honest_names},
            self.loop.events_run,
            self.loop.now,
            s,
            self.stats,
        )


def run_seed(seed: int, variant: str = "honest") -> RunResult:
    return FaultRun(Scenario.draw(seed), variant).result()


def write_chains(result: RunResult, members: tuple[bytes, ...], directory: Path) -> list[Path]:
    """Write each honest node's decided certificates as a provenance chain file, `directory/seed<S>-<node>.chain`
    (genesis record: the harness's swarm id and `members`), which `swarmgrad verify-chain` checks."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, certs in sorted(result.certificates.items()):
        path = directory / f"seed{result.seed}-{name}.chain"
        path.unlink(missing_ok=True)
        chain = create_chain(path, ChainGenesis(SWARM_ID, members))
        for cert in certs:
            append_certificate(chain, cert)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.consensus_faults", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--variant", choices=VARIANTS, default="honest")
    parser.add_argument("--chains", type=Path, default=None, metavar="DIR", help="write each node's chain file here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    failures = 0
    for seed in range(args.seed, args.seed + args.count):
        run = FaultRun(Scenario.draw(seed), args.variant)
        result = run.result()
        for violation in result.violations:
            print(violation)
        failures += bool(result.violations)
        if args.chains is not None:
            write_chains(result, run.members, args.chains)
    elapsed = time.perf_counter() - started
    rate = args.count / elapsed if elapsed > 0 else math.inf
    print(f"{args.count - failures} of {args.count} seeds without violation ({rate:.1f} seeds/s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
