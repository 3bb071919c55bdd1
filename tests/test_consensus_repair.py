"""Divergence repair: a peer inside the honest spread keeps its state; one restarted from an old state or cut off
by a partition adopts the certified checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from consensus.chunks import DEFAULT_TOLERANCE
from consensus.merkle import CheckpointTree
from consensus.repair import repair_decision
from swarmgrad.core.errors import LocalProtocolError


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": scale * torch.randn(256, 300, generator=generator),  # ~300 KB: several chunks
        "a.bias": scale * torch.randn(256, generator=generator),
        "b.weight": scale * torch.randn(10, 256, generator=generator),
    }


def _near(state: dict[str, torch.Tensor], seed: int, relative: float) -> dict[str, torch.Tensor]:
    """`state` plus Gaussian noise of `relative` times each tensor's RMS (a pairwise relative distance ~`relative`)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        n: t + relative * t.pow(2).mean().sqrt() * torch.randn(t.shape, generator=generator) for n, t in state.items()
    }


BASE = _state(0)
CERTIFIED = CheckpointTree.from_state(_near(BASE, 1, 0.05))  # the proposer's parameters at the boundary


def test_the_certified_peer_itself_stays() -> None:
    decision = repair_decision(CERTIFIED, CERTIFIED)
    assert not decision.adopt and decision.distance == 0.0


def test_a_peer_just_averaged_stays() -> None:
    # gossip leaves honest peers ~0.1 to 0.25 apart (docs/consensus.md): both sides of that stay
    for relative in (0.05, 0.2):
        own = CheckpointTree.from_state(_near(BASE, 2, relative))
        decision = repair_decision(own, CERTIFIED)
        assert not decision.adopt, decision
        assert 0 < decision.distance < DEFAULT_TOLERANCE
        assert "within tolerance" in decision.reason


def test_a_peer_restarted_from_its_initial_weights_repairs() -> None:
    decision = repair_decision(CheckpointTree.from_state(_state(7)), CERTIFIED)
    assert decision.adopt and decision.distance > 1.0
    assert f"lies {decision.distance:.3g} from the certified checkpoint" in decision.reason


def test_a_peer_cut_off_by_a_partition_repairs() -> None:
    drifted = CheckpointTree.from_state(_near(BASE, 3, 0.6))  # trained apart for many rounds
    decision = repair_decision(drifted, CERTIFIED)
    assert decision.adopt and decision.distance > DEFAULT_TOLERANCE


def test_one_diverged_region_is_enough() -> None:
    own = _near(BASE, 2, 0.05)
    own["a.weight"][100:160] *= -1.0  # 72 KB gone wrong (more than a chunk), the rest close
    decision = repair_decision(CheckpointTree.from_state(own), CERTIFIED)
    assert decision.adopt and decision.distance > 1.0


def test_the_tolerance_is_the_threshold() -> None:
    own = CheckpointTree.from_state(_near(BASE, 4, 0.3))
    at_default = repair_decision(own, CERTIFIED)
    assert not at_default.adopt
    assert repair_decision(own, CERTIFIED, tolerance=at_default.distance * 0.99).adopt
    assert not repair_decision(own, CERTIFIED, tolerance=at_default.distance).adopt
    with pytest.raises(LocalProtocolError):
        repair_decision(own, CERTIFIED, tolerance=math.nan)


def test_another_layout_repairs() -> None:
    other = dict(BASE)
    other["c.extra"] = torch.zeros(3)
    decision = repair_decision(CheckpointTree.from_state(other), CERTIFIED)
    assert decision.adopt and decision.distance == math.inf
    smaller = {"a.weight": BASE["a.weight"][:2], "a.bias": BASE["a.bias"], "b.weight": BASE["b.weight"]}
    assert repair_decision(CheckpointTree.from_state(smaller), CERTIFIED).adopt
