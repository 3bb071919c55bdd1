"""Epoch consensus costs in virtual time: one JSON line per swarm size n in {4, 16, 64, 256}, then the harness rate.

Each point runs n real `EpochAgreement` machines on the simulator's event core (`sim.events`) with fixed 50 ms
links, no loss, and a validity check that answers at once, so message delays are time / 50 ms:

* `good_case_delays`: proposal to the last member's certificate with an honest proposer (goal: 3 -- propose,
  prevote, precommit);
* `silent_proposer_delays`: the same when round 0's proposer never speaks (its propose timeout, then round 1), and
  `silent_proposer_message_delays`, that time less the propose and precommit timeouts it waits (goal: 5);
* `bytes_sent_per_peer`: mean wire bytes (`consensus.messages.SCHEMA` encoding) one member sends in the good case,
  and `max_bytes_sent_per_peer` (the proposer);
* `validity_check_bytes_per_voter`: what a voter fetches to check a proposal, modelled as s = 8 chunks of 64 KiB
  plus one Merkle proof per chunk (the chunk protocol is not part of this benchmark);
* `cpu_ms_per_peer`: real CPU milliseconds that one observed member spends signing and verifying (its own cache,
  every signature it receives checked once; the others share one cache so the run stays short).

The last line is the fault harness's seeds per second (`testing.consensus_faults`, CPU time of this process).
Takes well under a minute on an idle core.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Hashable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from consensus.agreement import (  # noqa: E402
    AgreementConfig,
    Candidate,
    CheckProposal,
    Decided,
    EpochAgreement,
    ProposalChecked,
    StartEpoch,
    proposer_of,
)
from consensus.membership import genesis_parent_hash  # noqa: E402
from consensus.messages import SCHEMA, EpochValue, Vote, members_hash  # noqa: E402
from consensus.signing import SignatureVerifier, Signer  # noqa: E402
from sim.events import EventLoop, Simulator  # noqa: E402
from sim.network import NetworkConfig, NetworkModel  # noqa: E402
from swarmgrad.core.machine import Action, Effect, Event, PeerId  # noqa: E402
from testing.consensus_faults import run_seed  # noqa: E402

SIZES = (4, 16, 64, 256)
LATENCY_S = 0.05
CHUNKS_SAMPLED = 8
CHUNK_BYTES = 64 * 1024
HARNESS_SEEDS = 200
CONFIG = AgreementConfig()


class Silent:
    def step(self, now: float, event: Event) -> list[Action]:
        return []


class Host:
    def __init__(self) -> None:
        self.sim: Simulator | None = None
        self.decided_at: dict[PeerId, float] = {}

    def notified(self, peer: PeerId, event: object) -> None:
        if isinstance(event, Decided) and self.sim is not None:
            self.decided_at[peer] = self.sim.loop.now

    def effect(self, peer: PeerId, effect: Effect) -> None:
        if isinstance(effect, CheckProposal) and self.sim is not None:
            answer = ProposalChecked(effect.proposal.value.epoch, effect.proposal.value.hash(), True)
            sim = self.sim
            sim.loop.at(sim.loop.now, lambda: sim.step(peer, answer))

    def compute_time_s(self, peer: PeerId, key: Hashable) -> float:
        return 0.0


def run_point(n: int, silent_proposer: bool) -> dict[str, float]:
    signers = [Signer.from_seed(f"bench {n} {i}".encode()) for i in range(n)]
    members = tuple(sorted(s.public_key for s in signers))
    parent = genesis_parent_hash("bench", members)
    names = {s.public_key: f"p{i:03d}" for i, s in enumerate(signers)}
    first = proposer_of(members, parent, 0)
    observed = next(s for s in signers if s.public_key != first)
    shared = SignatureVerifier(max_entries=1 << 20)
    own_verifier = SignatureVerifier(max_entries=1 << 20)
    host = Host()
    loop = EventLoop()
    sizes: dict[tuple[type, int], int] = {}

    def size_bytes(msg: object) -> int:
        if isinstance(msg, Vote):
            key = (Vote, len(msg.value_hash))
            if key not in sizes:
                sizes[key] = len(SCHEMA.encode(msg))
            return sizes[key]
        return len(SCHEMA.encode(msg))

    network = NetworkModel(NetworkConfig(latency_s=LATENCY_S), random.Random(n))
    sim = Simulator(loop, network, size_bytes, host=host)
    host.sim = sim
    for signer in signers:
        name = names[signer.public_key]
        if silent_proposer and signer.public_key == first:
            sim.add(name, Silent())
            continue
        value = EpochValue(
            "bench", 1, 100, hashlib.sha256(name.encode()).digest(), bytes(32), members_hash(members), parent
        )
        verifier = own_verifier if signer is observed else shared
        machine = EpochAgreement(CONFIG, signer, members, names, Candidate(value, members), verifier)
        sim.add(name, machine)
    cpu = {"ms": 0.0}
    observed_name = names[observed.public_key]
    original_step = sim.step

    def timed_step(peer: PeerId, event: Event) -> None:
        if peer != observed_name:
            original_step(peer, event)
            return
        started = time.process_time()
        original_step(peer, event)
        cpu["ms"] += (time.process_time() - started) * 1000

    sim.step = timed_step  # type: ignore[method-assign]
    for name in sim.peers:
        loop.at(0.0, lambda name=name: sim.step(name, StartEpoch()))  # type: ignore[misc]
    live = n - (1 if silent_proposer else 0)
    loop.run(until_s=60.0, stop=lambda: len(host.decided_at) >= live)
    honest_bytes = [
        sim.bytes_sent[names[s.public_key]] for s in signers if not (silent_proposer and s.public_key == first)
    ]
    return {
        "decided": len(host.decided_at),
        "last_decision_s": max(host.decided_at.values(), default=math.inf),
        "mean_bytes": sum(honest_bytes) / len(honest_bytes),
        "max_bytes": max(honest_bytes),
        "cpu_ms_machine": cpu["ms"],
        "signatures": observed.signatures_made,
        "verifications": own_verifier.verifications,
    }


def crypto_cost_us() -> tuple[float, float]:
    signer = Signer.from_seed(b"cost")
    verifier = SignatureVerifier(max_entries=4096)
    messages = [f"m{i}".encode() for i in range(2000)]
    started = time.process_time()
    signatures = [signer.sign(m) for m in messages]
    sign_us = (time.process_time() - started) / len(messages) * 1e6
    started = time.process_time()
    for m, sig in zip(messages, signatures, strict=True):
        verifier.verify(signer.public_key, m, sig)
    verify_us = (time.process_time() - started) / len(messages) * 1e6
    return sign_us, verify_us


def main() -> None:
    sign_us, verify_us = crypto_cost_us()
    for n in SIZES:
        good = run_point(n, silent_proposer=False)
        silent = run_point(n, silent_proposer=True)
        merkle_depth = 20  # proofs for up to 2^20 chunks (64 GiB of parameters)
        check_bytes = CHUNKS_SAMPLED * (CHUNK_BYTES + 32 * merkle_depth)
        crypto_ms = (good["signatures"] * sign_us + good["verifications"] * verify_us) / 1000
        print(
            json.dumps(
                {
                    "bench": "consensus",
                    "n": n,
                    "link_latency_s": LATENCY_S,
                    "good_case_delays": round(good["last_decision_s"] / LATENCY_S, 2),
                    "silent_proposer_delays": round(silent["last_decision_s"] / LATENCY_S, 2),
                    "silent_proposer_s": round(silent["last_decision_s"], 3),
                    "silent_proposer_message_delays": round(
                        (silent["last_decision_s"] - CONFIG.propose_timeout_s - CONFIG.vote_timeout_s) / LATENCY_S, 2
                    ),
                    "bytes_sent_per_peer": round(good["mean_bytes"]),
                    "max_bytes_sent_per_peer": good["max_bytes"],
                    "bytes_per_peer_per_member": round(good["mean_bytes"] / n, 1),
                    "validity_check_bytes_per_voter": check_bytes,
                    "signatures_per_peer": good["signatures"],
                    "verifications_per_peer": good["verifications"],
                    "cpu_ms_per_peer": round(crypto_ms, 2),
                    "cpu_ms_per_peer_machine_total": round(good["cpu_ms_machine"], 2),
                    "sign_us": round(sign_us, 1),
                    "verify_us": round(verify_us, 1),
                }
            ),
            flush=True,
        )
    started = time.process_time()
    violations = sum(bool(run_seed(seed).violations) for seed in range(HARNESS_SEEDS))
    elapsed = time.process_time() - started
    print(
        json.dumps(
            {
                "bench": "consensus_harness",
                "seeds": HARNESS_SEEDS,
                "violations": violations,
                "seeds_per_cpu_s": round(HARNESS_SEEDS / elapsed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
