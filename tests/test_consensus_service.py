"""The consensus service over a simulated network: 4 peers certify epochs from their own parameters, keep the
chain and the certified body, refuse a poisoned proposal, and a restarted peer resumes its persisted votes."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch
import trio

from consensus.agreement import STATE_SCHEMA, AgreementConfig
from consensus.body_fetch import BodyFetched
from consensus.certified_join import Joined
from consensus.epochs import ChainAdopted
from consensus.membership import genesis_members
from consensus.merkle import CheckpointTree
from consensus.provenance import ChainGenesis, read_chain, verify_file
from consensus.service import CertifiedEpoch, ConsensusService, ConsensusSettings, Divergence, body_path
from consensus.signing import Signer
from sim.transport import SimNetwork
from training.tasks.base import TensorSpec

SWARM = "svc"
SIGNERS = [Signer.from_seed(bytes([i]) * 32) for i in range(4)]
NAMES = {s.public_key: f"p{i}" for i, s in enumerate(SIGNERS)}
GENESIS = ChainGenesis(SWARM, genesis_members(NAMES))
SETTINGS = ConsensusSettings(AgreementConfig(propose_timeout_s=2.0, vote_timeout_s=1.0))


def _state(epoch: int, peer: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    base = torch.randn(40_000, generator=torch.Generator().manual_seed(epoch))
    noise = 0.01 * torch.randn(40_000, generator=torch.Generator().manual_seed(100 * epoch + peer))
    return {"w": scale * (base + noise), "b": torch.zeros(3)}


def _tell_kept_bodies(service: ConsensusService, news: trio.MemorySendChannel[str]) -> None:
    """Send to `news` each time `service` has written a fetched certified body (its own bodies are written before
    `on_certified` is called)."""
    keep = service._keep_body

    async def keep_and_tell(note: BodyFetched) -> None:
        await keep(note)
        news.send_nowait("body")

    setattr(service, "_keep_body", keep_and_tell)  # noqa: B010 (a test hook on one instance, not a method type)


def _collect(
    into: list[Divergence], news: trio.MemorySendChannel[str] | None = None
) -> Callable[[Divergence], Awaitable[None]]:
    async def collect(divergence: Divergence) -> None:
        into.append(divergence)
        if news is not None:
            news.send_nowait("diverged")

    return collect


async def _swarm(
    tmp: Path,
    epochs: int,
    poisoned: int | None = None,
    spec: dict[str, TensorSpec] | None = None,
    diverged: dict[str, list[Divergence]] | None = None,
) -> dict[str, list[CertifiedEpoch]]:
    """4 services certify `epochs` epochs (peer `poisoned` hands its parameters sign-flipped); with `diverged`, each
    peer's divergences are collected there, and the poisoned peer's of the last epoch is awaited."""
    seen: dict[str, list[CertifiedEpoch]] = {f"p{i}": [] for i in range(4)}
    found: dict[str, list[Divergence]] = diverged if diverged is not None else {}
    news_in, news = trio.open_memory_channel[str](math.inf)

    def certified(name: str) -> Callable[[CertifiedEpoch], None]:
        def record(epoch: CertifiedEpoch) -> None:
            seen[name].append(epoch)
            news_in.send_nowait("certified")

        return record

    net = SimNetwork(seed=3)
    async with net.run(), contextlib.AsyncExitStack() as stack:
        transports = [await stack.enter_async_context(net.open_transport(f"p{i}")) for i in range(4)]
        services = [
            ConsensusService(
                t,
                SIGNERS[i],
                GENESIS,
                tmp / f"p{i}",
                SETTINGS,
                NAMES.__getitem__,
                on_certified=certified(f"p{i}"),
                spec=spec,
                on_diverged=None if diverged is None else _collect(found.setdefault(f"p{i}", []), news_in),
            )
            for i, t in enumerate(transports)
        ]
        for service in services:
            _tell_kept_bodies(service, news_in)
        async with trio.open_nursery() as nursery:
            for service in services:
                await nursery.start(service.run)
                for other in NAMES.values():
                    if other != service.transport.local_peer:
                        service.peer_up(other)
            for epoch in range(1, epochs + 1):
                for i, service in enumerate(services):
                    scale = -1.0 if i == poisoned else 1.0
                    await trio.to_thread.run_sync(service.submit_checkpoint, epoch, 10 * epoch, _state(epoch, i, scale))
                with trio.fail_after(60):  # a ceiling only a hang reaches: each certificate or body sends news
                    while min(len(v) for v in seen.values()) < epoch:
                        await news.receive()
            with trio.fail_after(60):  # the certified bodies arrive
                while not all(body_path(tmp / name, r.epoch, r.root).exists() for name, rs in seen.items() for r in rs):
                    await news.receive()
            with trio.fail_after(60):  # the poisoned peer's repair of the last epoch (no later epoch drops its tree)
                while (
                    poisoned is not None
                    and diverged is not None
                    and epochs not in [d.epoch for d in found[f"p{poisoned}"]]
                ):
                    await news.receive()
            nursery.cancel_scope.cancel()
    return seen


async def test_four_services_certify_the_same_chain_and_keep_each_body(tmp_path: Path) -> None:
    seen = await _swarm(tmp_path, epochs=3)
    chains = [[c.value for c in read_chain(tmp_path / f"p{i}" / "chain")[1]] for i in range(4)]
    # the same certified values (each peer may hold a different 2f+1 subset of the precommits)
    assert all(chain == chains[0] for chain in chains) and [v.epoch for v in chains[0]] == [1, 2, 3]
    for i in range(4):
        _, summaries = verify_file(tmp_path / f"p{i}" / "chain")
        assert len(summaries) == 3
    for record in seen["p0"]:
        assert record.signers >= 3 and record.members == 4 and record.commit_latency_s is not None
        body = body_path(tmp_path / "p1", record.epoch, record.root).read_bytes()
        held = CheckpointTree.from_state(_state(record.epoch, 0))
        assert CheckpointTree(memoryview(body), held.layout).root == record.root  # the body is the certified one
    assert {r.round for r in seen["p2"]} == {10, 20, 30}


async def test_a_poisoned_proposal_is_refused_and_another_commits(tmp_path: Path) -> None:
    diverged: dict[str, list[Divergence]] = {}
    seen = await _swarm(tmp_path, epochs=3, poisoned=0, diverged=diverged)
    poisoned_roots = {CheckpointTree.from_state(_state(e, 0, -1.0)).root for e in (1, 2, 3)}
    for records in seen.values():
        assert [r.epoch for r in records] == [1, 2, 3]
        assert not {r.root for r in records} & poisoned_roots
        assert all(r.proposer != "p0" for r in records)
    # divergence repair: the sign-flipped peer lies 2.0 from each certified checkpoint and is handed it (an epoch
    # certified before its body arrived has no own tree left to compare: at least the last one); the others, within
    # the honest spread, keep their own state
    assert all(not diverged[f"p{i}"] for i in (1, 2, 3)), diverged
    repairs = diverged["p0"]
    assert repairs and len({d.epoch for d in repairs}) == len(repairs) and repairs[-1].epoch == 3
    certified = {r.epoch: r for r in seen["p0"]}
    for divergence in repairs:
        record = certified[divergence.epoch]
        assert (divergence.root, divergence.round) == (record.root, record.round) and not divergence.at_start
        assert divergence.decision.adopt and divergence.decision.distance > SETTINGS.tolerance
        assert body_path(tmp_path / "p0", divergence.epoch, divergence.root).read_bytes() == divergence.body


async def test_a_restarted_peer_far_from_the_newest_certified_body_repairs_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = await _swarm(tmp_path, epochs=2)
    newest = seen["p1"][-1]
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("p1") as t:
        found: list[Divergence] = []
        restarted = ConsensusService(
            t, SIGNERS[1], GENESIS, tmp_path / "p1", SETTINGS, NAMES.__getitem__, on_diverged=_collect(found)
        )
        await restarted.repair_at_start(_state(2, 1))  # resumed where it left: within the spread, kept
        assert found == []
        await restarted.repair_at_start(_state(2, 1, scale=-1.0))  # an old, far state: repaired
        (divergence,) = found
        assert divergence.at_start and (divergence.epoch, divergence.root) == (2, newest.root)
        assert divergence.body == body_path(tmp_path / "p1", 2, newest.root).read_bytes()
        # a certified body damaged on disk is never handed over: a warning names the file
        path = body_path(tmp_path / "p1", 2, newest.root)
        damaged = bytearray(path.read_bytes())
        damaged[-5] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with caplog.at_level(logging.WARNING):
            await restarted.repair_at_start(_state(2, 1, scale=-1.0))
        assert len(found) == 1 and f"{path}: does not hash to epoch 2's certified root" in caplog.text


async def test_the_persisted_voter_state_survives_and_is_resumed(tmp_path: Path) -> None:
    await _swarm(tmp_path, epochs=1)
    state = STATE_SCHEMA.decode((tmp_path / "p1" / "voter-state").read_bytes())
    assert state.epoch == 1 and state.precommit is not None  # written before its precommit left
    net = SimNetwork(seed=1)
    async with net.run(), net.open_transport("p1") as t:
        restarted = ConsensusService(t, SIGNERS[1], GENESIS, tmp_path / "p1", SETTINGS, NAMES.__getitem__)
        assert restarted.machine._state == state and len(restarted.machine.chain) == 1


async def test_a_joiner_starts_from_a_restarted_peers_kept_body_and_follows_the_chain(tmp_path: Path) -> None:
    spec = {"b": TensorSpec((3,), "float32"), "w": TensorSpec((40_000,), "float32")}
    seen = await _swarm(tmp_path, epochs=2, spec=spec)
    newest = seen["p1"][-1]
    net = SimNetwork(seed=2)
    joiner_key = Signer.from_seed(b"j" * 32)
    names = {**NAMES, joiner_key.public_key: "j"}
    damaged = body_path(tmp_path / "p2", 2, seen["p2"][-1].root)
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x01")
    async with (
        net.run(),
        net.open_transport("p1") as t1,
        net.open_transport("p2") as t2,
        net.open_transport("j") as tj,
    ):
        # p1 restarts: it serves the newest body it kept, read back from its directory; p0 is gone
        server = ConsensusService(t1, SIGNERS[1], GENESIS, tmp_path / "p1", SETTINGS, names.__getitem__, spec=spec)
        # p2's newest body was damaged on disk: it offers the one before
        other = ConsensusService(t2, SIGNERS[2], GENESIS, tmp_path / "p2", SETTINGS, names.__getitem__, spec=spec)
        joiner = ConsensusService(tj, joiner_key, GENESIS, tmp_path / "j", SETTINGS, names.__getitem__, spec=spec)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            await nursery.start(other.run)
            await nursery.start(joiner.run)
            assert server.offered_epoch == 2 and other.offered_epoch == 1
            adopted = trio.Event()
            write_adopted = joiner._chain_adopted

            def write_and_tell(note: ChainAdopted) -> None:
                write_adopted(note)
                adopted.set()

            setattr(joiner, "_chain_adopted", write_and_tell)  # noqa: B010 (a test hook on one instance)
            with trio.fail_after(30):
                joined = await joiner.join_certified(["p0", "p1"], spec, max_body_bytes=1 << 20)
            assert isinstance(joined, Joined) and joined.peer == "p1"
            assert joined.checkpoint.certificate.value.checkpoint_root == newest.root
            with trio.fail_after(30):  # the adopted chain reaches the joiner's machine and its chain file
                await adopted.wait()
            assert len(read_chain(tmp_path / "j" / "chain")[1]) == 2
            assert joiner.machine.next_epoch == 3 and joiner.offered_epoch == 2
            nursery.cancel_scope.cancel()
    _, summaries = verify_file(tmp_path / "j" / "chain")
    assert [s.epoch for s in summaries] == [1, 2]
    assert body_path(tmp_path / "j", 2, newest.root).exists()
