"""Peer models of the simulator: how fast each peer computes, and what a Byzantine peer gossips instead of the truth.

A `Behaviour` is what a Byzantine peer does to the vector it hands its (real, unmodified) `GossipRound` machine:
the machine then tells its neighbours values of the corrupted vector, exactly as an attacker running the real
protocol with a lying training loop would. Behaviours are registered by name in `BEHAVIOURS`, so a scenario names
one (`byzantine.behaviour = "sign_flip"`) and new attacks (ALIE, IPM, replay) are one class and one entry each.
Churn (join, leave, crash, restart) is scheduled by `sim.swarm` from the scenario's `[[churn]]` entries. Each model
draws only from the `random.Random` or `torch.Generator` it is handed.
"""

from __future__ import annotations

import math
import random
from typing import ClassVar, Protocol

import torch

from swarmgrad.core.machine import PeerId


def compute_speeds(peers: list[PeerId], spread: float, rng: random.Random) -> dict[PeerId, float]:
    """A slowdown factor per peer (1 = nominal): lognormal with sigma `spread`, drawn in sorted peer order."""
    return {peer: math.exp(rng.gauss(0.0, spread)) if spread else 1.0 for peer in sorted(peers)}


class Behaviour(Protocol):
    """What a Byzantine peer gossips: `corrupt` returns a new flat fp32 tensor (never `x` itself, which the peer
    keeps training)."""

    name: ClassVar[str]

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


class SignFlip:
    """Tell the negated vector, scaled: `-scale * x`."""

    name: ClassVar[str] = "sign_flip"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x * -self.scale


class Noise:
    """Tell the vector plus Gaussian noise of standard deviation `scale` per coordinate."""

    name: ClassVar[str] = "noise"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x + self.scale * torch.randn(x.shape, generator=generator)


BEHAVIOURS: dict[str, type[SignFlip] | type[Noise]] = {cls.name: cls for cls in (SignFlip, Noise)}
"""Behaviour name -> class taking `scale`."""
