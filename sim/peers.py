"""Peer models of the simulator: how fast each peer computes, and what a Byzantine peer gossips instead of the truth.

A `Behaviour` is what a Byzantine peer does to the vector it hands its (real, unmodified) `GossipRound` machine:
the machine then tells its neighbours values of the corrupted vector, exactly as an attacker running the real
protocol with a lying training loop would. Behaviours are registered by name in `BEHAVIOURS`, so a scenario names
one (`byzantine.behaviour = "sign_flip"`); each is one class taking `scale`:

* `sign_flip`: `-scale * x` (its own vector negated);
* `noise`: `x + scale * N(0, 1)` per coordinate;
* `alie` ("a little is enough", Baruch et al. 2019): `mean - scale * std` of the honest peers' vectors, per
  coordinate: inside the honest spread, always on the same side;
* `ipm` (inner product manipulation, Xie et al. 2020): `-scale * mean` of the honest peers' vectors;
* `replay`: tells its own vector honestly, but with every update it sends a peer it also resends the one it sent
  that peer `max(1, round(scale))` rounds before (`ReplayingMachine`), which honest machines must refuse.

ALIE and IPM are omniscient: they read the mean and standard deviation of the live honest peers' vectors
(`HonestView`, recomputed once per swarm round), as the project's attack suite does.
Churn (join, leave, crash, restart) is scheduled by `sim.swarm` from the scenario's `[[churn]]` entries. Each model
draws only from the `random.Random` or `torch.Generator` it is handed.
"""

from __future__ import annotations

import math
import random
from typing import ClassVar, Protocol

import torch

from gossip.messages import SparseUpdate
from swarmgrad.core.machine import Action, Event, Machine, PeerId, Send


def compute_speeds(peers: list[PeerId], spread: float, rng: random.Random) -> dict[PeerId, float]:
    """A slowdown factor per peer (1 = nominal): lognormal with sigma `spread`, drawn in sorted peer order."""
    return {peer: math.exp(rng.gauss(0.0, spread)) if spread else 1.0 for peer in sorted(peers)}


class HonestView(Protocol):
    """What an omniscient attacker knows: the per-coordinate mean and standard deviation of the live honest peers'
    vectors."""

    @property
    def mean(self) -> torch.Tensor: ...

    @property
    def std(self) -> torch.Tensor: ...


class Behaviour(Protocol):
    """What a Byzantine peer gossips: `corrupt` returns a new flat fp32 tensor (never `x` itself, which the peer
    keeps training). `replays_rounds_back` > 0: its machine is wrapped in a `ReplayingMachine`."""

    name: ClassVar[str]
    replays_rounds_back: int

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor: ...


class SignFlip:
    """Tell the negated vector, scaled: `-scale * x`."""

    name: ClassVar[str] = "sign_flip"
    replays_rounds_back = 0

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor:
        return x * -self.scale


class Noise:
    """Tell the vector plus Gaussian noise of standard deviation `scale` per coordinate."""

    name: ClassVar[str] = "noise"
    replays_rounds_back = 0

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor:
        return x + self.scale * torch.randn(x.shape, generator=generator)


class Alie:
    """Tell `mean - scale * std` of the honest vectors (a little is enough)."""

    name: ClassVar[str] = "alie"
    replays_rounds_back = 0

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor:
        return honest.mean - self.scale * honest.std


class Ipm:
    """Tell `-scale * mean` of the honest vectors (inner product manipulation)."""

    name: ClassVar[str] = "ipm"
    replays_rounds_back = 0

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor:
        return honest.mean * -self.scale


class Replay:
    """Tell the own vector, and resend each peer the update sent it `max(1, round(scale))` rounds before."""

    name: ClassVar[str] = "replay"

    def __init__(self, scale: float) -> None:
        self.replays_rounds_back = max(1, round(scale))

    def corrupt(self, x: torch.Tensor, generator: torch.Generator, honest: HonestView) -> torch.Tensor:
        return x.clone()


class ReplayingMachine:
    """A `GossipRound` (or any machine) whose every `SparseUpdate` to a peer is followed by the one it sent that
    peer `rounds_back` rounds earlier: a replay attack on the real protocol's messages."""

    def __init__(self, inner: Machine, rounds_back: int) -> None:
        self.inner = inner
        self.rounds_back = rounds_back
        self._sent: dict[tuple[PeerId, int, bool], SparseUpdate] = {}

    def step(self, now: float, event: Event) -> list[Action]:
        actions = self.inner.step(now, event)
        out: list[Action] = []
        for action in actions:
            out.append(action)
            if isinstance(action, Send) and isinstance(action.msg, SparseUpdate):
                msg = action.msg
                self._sent[(action.peer, msg.round, msg.reply)] = msg
                self._sent.pop((action.peer, msg.round - 2 * self.rounds_back, msg.reply), None)  # bounded memory
                stale = self._sent.get((action.peer, msg.round - self.rounds_back, msg.reply))
                if stale is not None:
                    out.append(Send(action.peer, stale, action.deadline))
        return out


BEHAVIOURS: dict[str, type[SignFlip] | type[Noise] | type[Alie] | type[Ipm] | type[Replay]] = {
    cls.name: cls for cls in (SignFlip, Noise, Alie, Ipm, Replay)
}
"""Behaviour name -> class taking `scale`."""
