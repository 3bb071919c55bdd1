"""`GossipRound`: the sans-IO machine of compressed, robust gossip averaging. No trio, no sockets, no clock reads.

Theory of operation
===================

Each peer i holds a flat fp32 parameter vector `x_i`. The training loop calls for a round after its local steps
(H local steps per round is the training loop's choice; a DiLoCo-style outer loop, arXiv 2311.08105, with the
averaging done by gossip as in NoLoCo, arXiv 2506.10911). One round r at peer i:

1. **Pick neighbours.** `neighbours_per_round` (m) peers drawn uniformly, without replacement (`rng.sample` on
   the sorted list), from the peers that are *eligible* this round: those whose pair coin (`pair_coin`: the
   receiver's fixed sha256 key mixed with the sender's sha256 word of the round) is below `2 m / live peers`
   (about 2m of them). A fresh random graph each round, which mixes like an expander -- and one that a receiver can
   check: it aggregates an unsolicited
   request only if the sender was eligible to pick it (with a little slack, `ACCEPT_FACTOR`), so a Byzantine peer
   cannot push its values into every honest peer every round: it reaches about 2.5m of them, an honest one m.
2. **Choose what to say: error-compensated top-k.** As in CHOCO-SGD (Koloskova, Stich, Jaggi, arXiv 1902.00340 and
   1907.09356) the peer keeps a *public copy* `p_i`: what it last told the swarm about each coordinate. It selects
   the support `S = top-k |x_i - p_i|` (k = density * n), so a coordinate that changed (by training or by
   averaging) but was not sent keeps its difference in `x_i - p_i` until it is large enough to be sent: that
   difference is the error-feedback memory. Unlike CHOCO, the peer sends the *values* `x_i[S]`, not the compressed
   difference, and sets `p_i[S] = x_i[S]` (as rounded for the wire).
3. **Push-pull.** It sends that `SparseUpdate` to each chosen neighbour; a peer receiving an update with
   `reply=False` answers (every request, also from a peer it asked itself: two peers that pick each other swap
   both ways) with its own values *on the requester's coordinates*. So an exchange is two-sided on the same
   coordinates, and each side mixes the other's values there (with equal weights the pair's sum is preserved).
4. **Aggregate at the round's end** -- when every chosen neighbour has answered (or failed to be reached), or at
   the deadline, whichever comes first. A chosen neighbour that did not answer is asked again within the next
   `miss_backoff_rounds` rounds only if there are not enough other eligible peers. The peer aggregates the
   updates of the neighbours it chose and of eligible requesters: for each such j, `d_j = x_j[S_j] - x_i[S_j]`
   (a sparse difference against the receiver's *own* exact values) and `x_i[U] += step_size * rule(d)` over the
   union U of the supports, with `rule` one of `gossip.aggregate` and per-coordinate weights `1/(c+1)`, c = how
   many of them sent that coordinate (the peer keeps an equal share for itself).

Why values and not CHOCO's compressed differences: CHOCO needs each receiver to hold the sender's public copy,
which stays consistent only if every receiver sees every message of the sender. With a fresh random neighbour set
each round and messages lost at deadlines, no two peers provably share such a copy (per-neighbour copies would cost
one model-sized buffer per peer ever met). Sending values against the receiver's own state needs no shared state
at all: a lost or late message loses only its contribution and can never desynchronise anything. The public copy
lives only on the sender, where it decides *which* coordinates are worth sending.

What converges to what: for `step_size` in (0, 1] every update of a coordinate is a convex combination of the
peer's value and values it received, so with honest peers each coordinate stays in the hull of the initial values,
and the spread (consensus distance) contracts whenever the coordinate is exchanged. Error compensation makes every
coordinate with a non-zero disagreement eventually selected, so the consensus distance shrinks geometrically
(`tests/test_gossip_sim.py` measures the rate at density 1 %). Without it (`error_feedback=False`, support
= top-k |x_i|) the same large-magnitude coordinates are sent every round and the rest never mix: the consensus
distance stalls. The common limit is a weighted average of the initial vectors -- exactly the mean in expectation
for symmetric exchanges, not exactly per run (one-sided exchanges at deadlines and the clipping move it), and the
step-size instability of CHOCO does not arise because receivers never extrapolate from an estimated copy. The
fp16 wire format rounds values to ~1e-4 relative, which is the floor of the consensus distance. With training in
between rounds this is local SGD with sparse gossip averaging; in the stationary case the peers track their
average to within the drift of H local steps.

Robustness: `aggregation="clipped"` (the default) bounds what any neighbour can do to a peer per round by
`step_size * tau / 2` in norm (a weight is at most 1/2); tau is adaptive, and the history it comes from is capped
so that a Byzantine minority cannot inflate it (`gossip.aggregate`). Dead, hung or slow neighbours only lose
their contribution: the round never waits past its deadline, and every send carries that deadline.

Messages: a peer's rounds strictly increase. Every message carries the sender's `clock`, its own round (in a
request, the request's round). Per sender, a second request for one round, or a second reply for one round, is a
replay, and a request more than `max_future_rounds` below that sender's latest request is stale:
`RemoteProtocolError` (the driver scores the peer). Other checks that raise it: wrong swarm id, wrong model
fingerprint, a payload that `unpack_sparse` rejects (wrong size, out of range or repeated indices, non-finite values,
more than k entries). A message for a past round is late: dropped and counted. One for a future round within
`max_future_rounds` is buffered (at most `max_buffered_updates` in all, decoded and checked first); further ahead it
is dropped and counted. But a *request* for a round this peer is not in, past or far ahead, is answered at once
from the public copy (the values this peer last told the swarm, on the requested coordinates it has told; once per
request): so a neighbour in another round never costs the requester its deadline.

The round clock
===============

A round's number is `max(next round, C)`, C the (f+1)-th largest clock heard from the live peers (the latest clock
each sent), where f = (n - 1) // 3 for n = live peers + 1 is the number of Byzantine peers the swarm tolerates. A
peer *holds* (`StartRound` completes at once, `held=True`, nothing sent, the round number kept) while fewer than
f + 1 peers, itself included, are within `max_future_rounds` of its next round or ahead of it. Where a peer is, it
judges by the age of what it heard: a peer that sent clock c, t seconds ago, is presumed at c + t / pace, the pace
being this peer's own seconds per round (a moving average of the intervals between the starts of the rounds it ran;
`round_deadline_s` until measured). A peer whose clock it has not heard counts as near; a peer alone never holds
(its rounds are the rounds of a swarm of one). Only the hold uses the presumed clocks; C uses the clocks as sent.
What follows, for at most f Byzantine live peers:

* **No push ahead.** At least one honest live peer's clock is >= C, so an honest peer never numbers a round above
  the largest honest clock (or its own next round): Byzantine clocks, however large, move nobody.
* **Catch-up in one round.** If f + 1 honest peers are at round H or beyond, every honest peer that has heard their
  clocks starts its next round at >= H. With n <= 3 (f = 0) that is the largest clock heard: a lagger joins the
  leader's round at its next round start.
* **No deadline spent on another round.** A request for a round the receiver is not in is answered at once (see
  above), so a round waits its deadline only for neighbours that are dead, hung, unreachable, or within
  `max_future_rounds` rounds behind it and slow; never for a live peer at a distant round. That includes requests
  buffered for a round that was then ahead and that the peer's number jumped past: they are answered at the jump,
  when its next round begins or its start holds (a held peer begins no round, for as long as it holds).
* **No lone drift.** A peer ahead of all but at most f - 1 others by more than `max_future_rounds` holds instead of
  numbering rounds nobody else is in. The peers behind, whose requests it answers at once, close the gap at their
  own round rate; then it resumes. (A peer that ran rounds alone, thousands a minute since a round without
  neighbours completes at once, is joined at its round by joiners arriving one at a time: the first sees f = 0, and
  each later one f + 1 clocks at that round. Only three or more joining at once make it hold.) A Byzantine minority
  cannot make an honest peer hold while f + 1 honest peers are near it (their clocks count, however low the
  Byzantine ones claim to be).
* **A hold ends.** A peer that sent clock c counts as near to `number` once `(number - max_future_rounds - c) *
  pace` seconds have passed without a newer clock from it, whether or not it sends again: a peer holding at `number`
  with gap g = number - (lowest clock heard) resumes at the latest g x pace seconds after the clocks it last heard.
  The peers behind keep it holding only while they keep telling it, by fresh clocks, that they are far behind.
  Without the presumption the views of a large swarm went stale into a deadlock: with 3 neighbours a round among
  64 peers, a peer hears from about 6 others a round, so most of the clocks it holds are many rounds old; a
  fault-free swarm saw more than 2/3 of itself as far behind and held, and a holding peer sends nothing, so no view
  got fresher (seed 0 of the simulator: 37 rounds in 15 virtual seconds, 1,529 starts held).

So from any start the honest live peers reach rounds within `max_future_rounds` of each other after at most
(largest gap) / (slowest honest round rate) of their own rounds (a leader holds at most (largest gap) x its pace
seconds past the last clock it heard from the peers behind), and no honest round on the way waits a deadline for
a live, reachable honest peer: `tests/test_round_clock.py` runs this from arbitrary starts (spread, one ahead, two
behind, split halves, with Byzantine clocks) over many seeds in virtual time, and a 64-peer swarm with 3 neighbours
a round that must not hold.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from gossip import aggregate
from gossip.messages import SparseUpdate
from swarmgrad.core.errors import ConfigError, DecodeError, LocalProtocolError, RemoteProtocolError
from swarmgrad.core.machine import (
    Action,
    CancelTimer,
    Command,
    Compute,
    Computed,
    Event,
    Notify,
    PeerDown,
    PeerId,
    PeerUp,
    Received,
    Send,
    SendFailed,
    SetTimer,
    TimerFired,
)
from swarmgrad.core.swarm_id import validate_swarm_id
from training.topk import pack_sparse, unpack_sparse
from training.topk.payload import VALUE_FORMATS, decoded_values

AGGREGATIONS = ("mean", "trimmed_mean", "clipped")
RADIUS_GROWTH = 2.0
"""Norms enter the clip history capped at this multiple of the current radius, so the radius can at most double
per history window, and only when a majority of neighbours' differences are that large."""
ELIGIBLE_FACTOR = 2.0
"""A sender picks its neighbours among the peers whose pair coin is below `ELIGIBLE_FACTOR * m / live peers`."""
ACCEPT_FACTOR = 2.5
"""A receiver aggregates an unsolicited request if the coin is below this bound (slack for differing peer views)."""
PACE_WEIGHT = 0.25
"""A peer's pace (seconds per round it runs) is a moving average: each new start-to-start interval weighs this much."""


_COIN_DOMAIN = "swarmgrad/gossip-coin/v2"
_MIX_1, _MIX_2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # the splitmix64 finalizer's multipliers
_MASK_64 = (1 << 64) - 1
_MAX_KEYS = 1 << 20
_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11))


def _word(text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{_COIN_DOMAIN}\x00{text}".encode()).digest()[:8], "little")


@functools.lru_cache(maxsize=64)
def _key_table(swarm_id: str) -> dict[PeerId, int]:
    """The keys computed so far in one swarm, shared (a pure function's memo: a simulated swarm's thousands of
    machines look up the same keys)."""
    return {}


def peer_key(swarm_id: str, peer: PeerId) -> int:
    """A peer's fixed 64-bit coin key in a swarm: the first 8 bytes of sha256(domain, swarm, peer), little-endian."""
    table = _key_table(swarm_id)
    key = table.get(peer)
    if key is None:
        if len(table) >= _MAX_KEYS:  # bounded whatever number of peer ids a swarm shows: start over
            table.clear()
        key = table[peer] = _word(f"{swarm_id}\x00key\x00{peer}")
    return key


def peer_keys(swarm_id: str, peers: Sequence[PeerId]) -> np.ndarray:
    """`peer_key` of each of `peers`, as uint64."""
    table = _key_table(swarm_id)
    if all(p in table for p in peers):
        return np.fromiter(map(table.__getitem__, peers), dtype=np.uint64, count=len(peers))
    return np.fromiter((peer_key(swarm_id, p) for p in peers), dtype=np.uint64, count=len(peers))


def sender_word(swarm_id: str, number: int, sender: PeerId) -> int:
    """The sender's 64-bit word of round `number`: the first 8 bytes of sha256(domain, swarm, round, sender)."""
    return _word(f"{swarm_id}\x00round\x00{number}\x00{sender}")


def coins_of_keys(word: int, keys: np.ndarray) -> np.ndarray:
    """The pair coins of one sender's round `word` with receivers of `keys` (uint64), as float64 in [0, 1): each
    key xor the word through the splitmix64 finalizer, the top 53 bits over 2**53 (exact in float64)."""
    z = keys ^ np.uint64(word)  # arrays (never numpy scalars): uint64 products wrap without a warning
    z = (z ^ (z >> _SHIFTS[0])) * np.uint64(_MIX_1)
    z = (z ^ (z >> _SHIFTS[1])) * np.uint64(_MIX_2)
    z ^= z >> _SHIFTS[2]
    return (z >> _SHIFTS[3]).astype(np.float64) * 2.0**-53


def pair_coins(swarm_id: str, number: int, sender: PeerId, receivers: Sequence[PeerId]) -> np.ndarray:
    """`pair_coin` of `sender` with each of `receivers`, in their order, as float64."""
    return coins_of_keys(sender_word(swarm_id, number, sender), peer_keys(swarm_id, receivers))


def pair_coin(swarm_id: str, number: int, sender: PeerId, receiver: PeerId) -> float:
    """A uniform number in [0, 1) that anyone can compute for (swarm, round, sender, receiver): the receiver's
    fixed key (`peer_key`) mixed with the sender's word of the round (`sender_word`, a fresh sha256 per sender
    and round) by `coins_of_keys`. A sender computes the coins of all its n live peers with one hash and a few
    vector operations (their keys are cached), where a sha256 per pair cost n hashes a round. Computed here with
    Python integers: the same bits as `coins_of_keys`, without its per-call numpy overhead."""
    z = peer_key(swarm_id, receiver) ^ sender_word(swarm_id, number, sender)
    z = ((z ^ (z >> 30)) * _MIX_1) & _MASK_64
    z = ((z ^ (z >> 27)) * _MIX_2) & _MASK_64
    z ^= z >> 31
    return (z >> 11) * 2.0**-53


@dataclass(frozen=True)
class GossipConfig:
    """How a peer gossips. Every swarm member must use the same `swarm_id`, `density` and `value_format`.

    Defaults: `step_size=0.5` lies well inside the convex range (0, 1] (a CHOCO step of 0.5 diverged in an early
    measurement, but that update extrapolates; this one is a convex combination); `neighbours_per_round=3`; a clip
    radius of 1x the median of the last 64 difference norms (in `tests/test_gossip_sim.py`, 2x let 4 flooding
    Byzantine peers of 16 double the honest spread with noise, 0.5x halved the consensus speed); the buffering
    bounds are small because honest peers run at most a round or two apart; a neighbour that missed a deadline
    is avoided for the next 4 rounds when others are eligible (a hung peer keeps its connection open and would
    cost a whole deadline in every round that picks it).
    """

    swarm_id: str
    density: float
    round_deadline_s: float
    seed: int
    neighbours_per_round: int = 3
    step_size: float = 0.5
    aggregation: str = "clipped"
    trim_count: int = 1
    clip_radius: float | None = None
    clip_multiplier: float = 1.0
    clip_history_len: int = 64
    error_feedback: bool = True
    value_format: str = "fp16"
    max_future_rounds: int = 4
    max_buffered_updates: int = 64
    miss_backoff_rounds: int = 4

    def __post_init__(self) -> None:
        validate_swarm_id(self.swarm_id)
        if not 0 < self.density <= 1:
            raise ConfigError("density", self.density, "in (0, 1]")
        if not (self.round_deadline_s > 0 and math.isfinite(self.round_deadline_s)):
            raise ConfigError("round_deadline_s", self.round_deadline_s, "a finite number > 0")
        if self.neighbours_per_round < 1:
            raise ConfigError("neighbours_per_round", self.neighbours_per_round, ">= 1")
        if not 0 < self.step_size <= 1:
            raise ConfigError("step_size", self.step_size, "in (0, 1]")
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError("aggregation", self.aggregation, f"one of {AGGREGATIONS}")
        if self.trim_count < 0:
            raise ConfigError("trim_count", self.trim_count, ">= 0")
        if self.clip_radius is not None and not (self.clip_radius > 0 and math.isfinite(self.clip_radius)):
            raise ConfigError("clip_radius", self.clip_radius, "None (adaptive) or a finite number > 0")
        if not (self.clip_multiplier > 0 and math.isfinite(self.clip_multiplier)):
            raise ConfigError("clip_multiplier", self.clip_multiplier, "a finite number > 0")
        if self.clip_history_len < 1:
            raise ConfigError("clip_history_len", self.clip_history_len, ">= 1")
        if self.value_format not in VALUE_FORMATS:
            raise ConfigError("value_format", self.value_format, f"one of {VALUE_FORMATS}")
        if self.max_future_rounds < 0:
            raise ConfigError("max_future_rounds", self.max_future_rounds, ">= 0")
        if self.max_buffered_updates < 0:
            raise ConfigError("max_buffered_updates", self.max_buffered_updates, ">= 0")
        if self.miss_backoff_rounds < 0:
            raise ConfigError("miss_backoff_rounds", self.miss_backoff_rounds, ">= 0")

    def k_for(self, numel: int) -> int:
        """How many coordinates a peer sends per round for a vector of `numel` elements."""
        return min(numel, max(1, math.ceil(self.density * numel)))


@dataclass(frozen=True, eq=False)
class StartRound(Command):
    """Begin the next round with this peer's current flat fp32 parameters. The machine takes the tensor: it mixes
    the neighbours' values into it in place and hands it back as `RoundCompleted.params`; the caller must not read
    or write it until then (no 40 MB copy per round at 10M parameters). `not_before` is the caller's own round
    (a resumed checkpoint's, or an adopted model's): the round is numbered at least that."""

    params: torch.Tensor
    not_before: int = 0


@dataclass(frozen=True)
class PeersUp(Command):
    """A `PeerUp` for each of `peers` at once (this peer itself, if listed, is skipped): a simulated swarm's start
    tells each of its n machines of the n - 1 others, n^2 events one by one."""

    peers: tuple[PeerId, ...]


@dataclass(frozen=True, eq=False)
class RoundCompleted:
    """A round ended: `params` is the new vector to load (`StartRound`'s tensor, mixed in place). `missing` are
    chosen neighbours that did not answer."""

    round: int
    params: torch.Tensor
    contributors: tuple[PeerId, ...]
    missing: tuple[PeerId, ...]
    clipped: int
    timed_out: bool
    held: bool = False
    """The peer held (see the round clock in the module docstring): no round ran, `round` is the one it waits to
    start, `params` is unchanged."""


@dataclass
class _Round:
    number: int
    deadline: float
    params: torch.Tensor
    chosen: frozenset[PeerId]
    expected: set[PeerId]
    received: dict[PeerId, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


Compressor = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""Indices (ascending) and values of the k largest magnitudes of a vector: `training.topk.TopKSelector`, built (its
kernels loaded) before it is handed to the machine."""


def _select_changed(
    compressor: Compressor, x: torch.Tensor, public: torch.Tensor, difference: torch.Tensor, k: int
) -> torch.Tensor:
    """The support with error feedback: top-k of |x - public|, the difference into a buffer kept across rounds (a
    fresh 40 MB tensor costs more in page faults than the subtraction)."""
    return compressor(torch.sub(x, public, out=difference), k)[0]


def _select_largest(compressor: Compressor, x: torch.Tensor, k: int) -> torch.Tensor:
    """The support without error feedback: top-k of |x|."""
    return compressor(x, k)[0]


@dataclass(frozen=True)
class _Mixed:
    """What an aggregation reports besides the vector it mixed in place."""

    clipped: int
    recorded_norms: list[float]


def _mix(
    config: GossipConfig,
    x: torch.Tensor,
    received: list[tuple[np.ndarray, np.ndarray]],
    norm_history: list[float],
) -> _Mixed:
    """Aggregate the neighbours' `(indices, values)` into `x` (a CPU tensor) in place (see the module docstring);
    `norm_history` is the clip radius's history, and the norms to record in it come back. numpy on a view of `x`
    (see `gossip.aggregate`: the view of a round is small)."""
    if not received:
        return _Mixed(0, [])
    own = x.numpy()
    supports = [indices for indices, _ in received]
    if all(np.array_equal(support, supports[0]) for support in supports[1:]):
        # The usual case: every neighbour answered on this peer's own coordinates: one dense block.
        union = supports[0]
        diffs = np.stack([values for _, values in received]) - own[union]
        mask = np.ones(diffs.shape, dtype=bool)
    else:
        union, position = np.unique(np.concatenate(supports), return_inverse=True)
        diffs = np.zeros((len(received), union.size), dtype=np.float32)
        mask = np.zeros((len(received), union.size), dtype=bool)
        start = 0
        for row, (indices, values) in enumerate(received):
            where = position[start : start + indices.size]
            start += indices.size
            diffs[row, where] = values - own[indices]
            mask[row, where] = True
    weights = aggregate.coordinate_weights(mask)
    clipped = 0
    recorded: list[float] = []
    if config.aggregation == "mean":
        move = aggregate.weighted_mean(diffs, mask, weights)
    elif config.aggregation == "trimmed_mean":
        move = aggregate.trimmed_mean(
            np.concatenate([np.zeros((1, union.size), dtype=np.float32), diffs]),
            np.concatenate([np.ones((1, union.size), dtype=bool), mask]),
            config.trim_count,
        )
    else:
        norms = aggregate.row_norms(diffs, mask)
        if norm_history:  # what enters the history is capped: a Byzantine minority cannot inflate the radius
            previous = aggregate.adaptive_clip_radius(norm_history, config.clip_multiplier)
            recorded = aggregate.capped(norms, RADIUS_GROWTH * previous)
        else:  # cold start from the smallest difference: the radius then grows by at most RADIUS_GROWTH a round
            recorded = [float(norms.min())]
        radius = config.clip_radius
        if radius is None:
            history = (norm_history + recorded)[-config.clip_history_len :]
            radius = aggregate.adaptive_clip_radius(history, config.clip_multiplier)
        clipped = int((norms > radius).sum())
        move = aggregate.clipped_gossip(diffs, mask, weights, radius)
    own[union] += config.step_size * move
    return _Mixed(clipped, recorded)


class GossipRound:
    """The gossip machine of one peer. Feed it `StartRound`, `Received`, `TimerFired`, peer events, `SendFailed`
    and the `Computed` results of its `Compute`s; it emits `Send`s (each bounded by the round deadline), its round
    timer, `Compute`s and `Notify(RoundCompleted)`.

    The tensor work of a round -- the top-k selection at its start and the aggregation at its end, each over the
    whole vector -- is handed out as `Compute` (a driver runs it in a worker thread), with `compressor` injected
    already built: no step reads the environment, loads a library or runs over millions of floats. While a
    selection runs, the round's messages are buffered as for a future round; while an aggregation runs, the round
    is over and requests for it are answered from the public copy, which is all the machine touches meanwhile."""

    def __init__(
        self,
        config: GossipConfig,
        local_peer: PeerId,
        numel: int,
        fingerprint: bytes,
        rng: random.Random,
        compressor: Compressor,
    ) -> None:
        if numel < 1:
            raise LocalProtocolError(f"numel must be >= 1, got {numel}")
        self.config = config
        self.numel = numel
        self.k = config.k_for(numel)
        self.fingerprint = fingerprint
        self.local_peer = local_peer
        self._rng = rng
        self._compressor = compressor
        self._live: set[PeerId] = set()
        self._sorted_live: tuple[PeerId, ...] | None = None  # `_live` in sorted order, rebuilt after it changes
        # the live peers but this one, sorted, and their coin keys: rebuilt after `_live` changes
        self._candidates: tuple[tuple[PeerId, ...], np.ndarray] | None = None
        self._public: torch.Tensor | None = None
        self._told = torch.empty(0, dtype=torch.bool)  # which coordinates the public copy holds a told value of
        self._difference = torch.empty(0)  # scratch for x - public, allocated with the public copy
        self._round: _Round | None = None
        self._starting: tuple[int, torch.Tensor] | None = None  # a round whose support is being selected
        self._finishing: tuple[_Round, bool] | None = None  # a round (and whether it timed out) being aggregated
        self._next_round = 0
        # request rounds heard per sender: its latest and those within `max_future_rounds` below it
        self._requests_from: dict[PeerId, set[int]] = {}
        # reply rounds heard per sender (rounds of ours), back to `max_future_rounds` below our next round
        self._replies_from: dict[PeerId, set[int]] = {}
        self._clock_of: dict[PeerId, int] = {}  # the largest clock each peer has sent
        self._heard_at: dict[PeerId, float] = {}  # when each peer last sent that clock
        self._pace_s: float | None = None  # seconds per round this peer runs (start to start), once measured
        self._last_start_s: float | None = None  # when its last round started, unless it held since
        self._backoff_until: dict[PeerId, int] = {}  # a chosen neighbour that did not answer is not asked again
        self._buffer: dict[int, dict[PeerId, tuple[SparseUpdate, np.ndarray, np.ndarray]]] = {}
        self._norms: deque[float] = deque(maxlen=config.clip_history_len)
        self._counters: Counter[str] = Counter()

    # ---- public -------------------------------------------------------------------------------------------------

    @property
    def live_peers(self) -> list[PeerId]:
        return list(self._sorted())

    @property
    def in_round(self) -> bool:
        return self._round is not None

    @property
    def clock(self) -> int:
        """This peer's round: the one it is in, or else the next one it will start."""
        return self._round.number if self._round is not None else self._next_round

    def statistics(self) -> dict[str, int]:
        """Counters: rounds, timeouts, updates received / aggregated / late / buffered / dropped, replies, clips."""
        return dict(self._counters)

    def step(self, now: float, event: Event) -> list[Action]:
        # Peer events first: a swarm of n peers starts with n - 1 of them per machine, far more than its messages.
        if isinstance(event, PeerUp):
            self._live.add(event.peer)
            self._sorted_live = self._candidates = None
            return []
        if isinstance(event, PeersUp):
            self._live.update(event.peers)
            self._live.discard(self.local_peer)
            self._sorted_live = self._candidates = None
            return []
        if isinstance(event, StartRound):
            return self._start(now, event.params, event.not_before)
        if isinstance(event, Received):
            return self._received(now, event.peer, event.msg)
        if isinstance(event, Computed):
            return self._computed(now, event)
        if isinstance(event, TimerFired):
            if self._round is not None and event.key == self._timer_key(self._round.number):
                return self._complete(timed_out=True)
            return []
        if isinstance(event, PeerDown):
            self._live.discard(event.peer)
            self._sorted_live = self._candidates = None
            return self._forget_expected(event.peer)
        if isinstance(event, SendFailed):
            self._counters["send_failed"] += 1
            return self._forget_expected(event.peer)
        raise LocalProtocolError(f"GossipRound cannot handle {type(event).__name__}")

    # ---- rounds -------------------------------------------------------------------------------------------------

    def _start(self, now: float, params: torch.Tensor, not_before: int) -> list[Action]:
        if self._round is not None or self._starting is not None or self._finishing is not None:
            raise LocalProtocolError(f"round {self.clock} is still running")
        if params.dtype != torch.float32 or params.dim() != 1 or params.numel() != self.numel or params.is_cuda:
            raise LocalProtocolError(
                f"params must be a flat float32 CPU tensor of {self.numel}, got {params.shape} {params.dtype} on "
                f"{params.device}"
            )
        number = max(self._next_number(), not_before)
        self._next_round = number  # until the selection below is computed, this round's messages are buffered
        if self._holds(now, number):
            self._counters["rounds_held"] += 1
            self._last_start_s = None  # the next interval spans the hold: it is no measure of the pace
            # no round begins, but the rounds below `number` are skipped all the same: their requesters are waiting
            actions = self._answer_skipped(now, number)
            actions.append(Notify(RoundCompleted(number, params, (), (), 0, False, held=True)))
            return actions
        if self._last_start_s is not None:
            interval_s = now - self._last_start_s
            previous_s = interval_s if self._pace_s is None else self._pace_s
            self._pace_s = previous_s + PACE_WEIGHT * (interval_s - previous_s)
        self._last_start_s = now
        x = params.detach()
        self._starting = (number, x)
        if self.config.error_feedback:
            if self._public is None:
                self._public = torch.zeros(self.numel)
                self._told = torch.zeros(self.numel, dtype=torch.bool)
                self._difference = torch.empty(self.numel)
            work = partial(_select_changed, self._compressor, x, self._public, self._difference, self.k)
        else:
            work = partial(_select_largest, self._compressor, x, self.k)
        return [Compute(("gossip-select", number), work)]

    def _computed(self, now: float, event: Computed) -> list[Action]:
        if self._starting is not None and event.key == ("gossip-select", self._starting[0]):
            (number, x), self._starting = self._starting, None
            if not isinstance(event.result, torch.Tensor):
                raise LocalProtocolError(f"a selection gave {type(event.result).__name__}, not indices")
            return self._begin(now, number, x, event.result.numpy())
        if self._finishing is not None and event.key == ("gossip-aggregate", self._finishing[0].number):
            (current, timed_out), self._finishing = self._finishing, None
            if not isinstance(event.result, _Mixed):
                raise LocalProtocolError(f"an aggregation gave {type(event.result).__name__}")
            self._norms.extend(event.result.recorded_norms)
            self._counters["clipped"] += event.result.clipped
            done = RoundCompleted(
                current.number,
                current.params,
                tuple(sorted(current.received)),
                tuple(sorted(current.expected)),
                event.result.clipped,
                timed_out,
            )
            return [Notify(done)]
        raise LocalProtocolError(f"GossipRound did not ask for the computation {event.key!r}")

    def _begin(self, now: float, number: int, x: torch.Tensor, indices: np.ndarray) -> list[Action]:
        # NaN and Inf rank first in top-k: `pack_sparse` refuses them
        update = self._pack(number, False, indices, x, number)
        # the coin bound is the same for every candidate (each is live): one vector pass, no set built per candidate
        candidates, keys = self._candidate_keys()
        bound = ELIGIBLE_FACTOR * self.config.neighbours_per_round / max(1, len(candidates))
        coins = coins_of_keys(sender_word(self.config.swarm_id, number, self.local_peer), keys)
        eligible = [candidates[i] for i in np.flatnonzero(coins < bound).tolist()]
        rested = [p for p in eligible if self._backoff_until.get(p, 0) <= number]
        backed_off = [p for p in eligible if self._backoff_until.get(p, 0) > number]
        m = self.config.neighbours_per_round
        chosen = self._rng.sample(rested, min(m, len(rested)))
        if len(chosen) < m:  # never fewer neighbours than possible: backed-off peers fill the remaining places
            chosen += self._rng.sample(backed_off, min(m - len(chosen), len(backed_off)))
        deadline = now + self.config.round_deadline_s
        current = _Round(number, deadline, x, frozenset(chosen), set(chosen))
        self._round = current
        self._counters["rounds"] += 1
        actions: list[Action] = [Send(peer, update, deadline) for peer in sorted(chosen)]
        actions.append(SetTimer(self._timer_key(number), deadline))
        actions.extend(self._answer_skipped(now, number))
        for peer, (msg, indices_in, values_in) in sorted(self._buffer.pop(number, {}).items()):
            actions.extend(self._accept(current, peer, msg, indices_in, values_in))
        if not current.expected:
            actions.extend(self._complete(timed_out=False))
        return actions

    def _answer_skipped(self, now: float, number: int) -> list[Action]:
        """The messages buffered for rounds below `number`, which this peer skipped (its number jumped past them):
        dropped as late, and each request answered from the public copy (`_answer_elsewhere`). Called when a round
        begins and when a start holds: a held peer begins no round, and its hold can last many deadlines."""
        actions: list[Action] = []
        for stale in sorted(r for r in self._buffer if r < number):
            for peer, (msg, indices, _) in sorted(self._buffer.pop(stale).items()):
                self._counters["late_dropped"] += 1
                actions.extend(self._answer_elsewhere(now, peer, msg, indices))
        return actions

    def _tolerated(self) -> int:
        """f: how many Byzantine peers a swarm of this peer and its live peers tolerates (n >= 3f + 1)."""
        return len(self._live) // 3

    def _next_number(self) -> int:
        """The next round's number: see the round clock in the module docstring."""
        clocks = sorted((clock for _, clock in self._live_clocks()), reverse=True)
        f = self._tolerated()
        return max(self._next_round, clocks[f]) if len(clocks) > f else self._next_round

    def _holds(self, now: float, number: int) -> bool:
        """Whether fewer than f + 1 peers, this one included, are near `number`: see the round clock in the module
        docstring. A peer last heard at clock c, t seconds ago, is presumed at c + t / pace (unheard: near)."""
        below = number - self.config.max_future_rounds
        pace_s = self.config.round_deadline_s if self._pace_s is None else self._pace_s
        far_behind = 0
        for peer, clock in self._live_clocks():  # a count: the order does not matter
            if clock < below and now - self._heard_at[peer] < (below - clock) * pace_s:
                far_behind += 1
        near = 1 + len(self._live) - far_behind
        return far_behind > 0 and near < self._tolerated() + 1

    def _live_clocks(self) -> Iterator[tuple[PeerId, int]]:
        """(peer, largest clock sent) of each live peer heard from, in no particular order: a pass over the
        smaller of the two sets (in a large swarm a peer has heard from few of its live peers)."""
        if len(self._clock_of) <= len(self._live):
            return ((p, clock) for p, clock in self._clock_of.items() if p in self._live)
        return ((p, self._clock_of[p]) for p in self._live if p in self._clock_of)

    def _sorted(self) -> tuple[PeerId, ...]:
        """The live peers in sorted order, sorted once per change of the set (not once per round)."""
        if self._sorted_live is None:
            self._sorted_live = tuple(sorted(self._live))
        return self._sorted_live

    def _candidate_keys(self) -> tuple[tuple[PeerId, ...], np.ndarray]:
        """The live peers other than this one, sorted, and their coin keys (`peer_key`), once per change of the set."""
        if self._candidates is None:
            # the sorted tuple itself unless this peer is listed: no second copy (10,000 simulated peers hold 10^8)
            peers = self._sorted()
            if self.local_peer in self._live:
                peers = tuple(p for p in peers if p != self.local_peer)
            self._candidates = (peers, peer_keys(self.config.swarm_id, peers))
        return self._candidates

    def _accept(
        self, current: _Round, peer: PeerId, msg: SparseUpdate, indices: np.ndarray, values: np.ndarray
    ) -> list[Action]:
        if not indices.size:  # an answer from a peer that has told the swarm nothing yet: nothing to mix
            current.expected.discard(peer)
            self._counters["empty_updates"] += 1
        elif peer in current.chosen or self._eligible(current.number, peer, self.local_peer, ACCEPT_FACTOR):
            current.received[peer] = (indices, values)
            current.expected.discard(peer)
            self._counters["updates_aggregated"] += 1
        else:
            self._counters["unsolicited_answered"] += 1
        # Every request gets its reply, also from a peer this peer asked too: its own request may have reached that
        # peer in another round (answered there, not counted in this round), and then that peer is still waiting.
        if msg.reply:
            return []
        self._counters["replies_sent"] += 1
        reply = self._pack(current.number, True, indices, current.params, current.number)
        return [Send(peer, reply, current.deadline)]

    def _forget_expected(self, peer: PeerId) -> list[Action]:
        current = self._round
        if current is None or peer not in current.expected:
            return []
        current.expected.discard(peer)
        return [] if current.expected else self._complete(timed_out=False)

    def _complete(self, timed_out: bool) -> list[Action]:
        current = self._round
        if current is None:
            raise LocalProtocolError("no round to complete")
        self._round = None
        self._next_round = current.number + 1
        for peer, rounds in self._replies_from.items():
            self._replies_from[peer] = {r for r in rounds if r >= self._next_round - self.config.max_future_rounds}
        for peer in current.expected:
            self._backoff_until[peer] = current.number + 1 + self.config.miss_backoff_rounds
        self._counters["rounds_timed_out"] += int(timed_out)
        self._counters["neighbours_answered"] += len(current.received)
        # The vector goes to the aggregation, then back to the caller; messages that arrive before the result are
        # handled as for a finished round (from the public copy), so nothing on this thread touches it meanwhile.
        self._finishing = (current, timed_out)
        received = [current.received[p] for p in sorted(current.received)]
        work = partial(_mix, self.config, current.params, received, list(self._norms))
        actions: list[Action] = [] if timed_out else [CancelTimer(self._timer_key(current.number))]
        actions.append(Compute(("gossip-aggregate", current.number), work))
        return actions

    # ---- messages -----------------------------------------------------------------------------------------------

    def _received(self, now: float, peer: PeerId, msg: object) -> list[Action]:
        if not isinstance(msg, SparseUpdate):
            raise RemoteProtocolError(peer, f"unexpected message {type(msg).__name__}")
        if msg.swarm_id != self.config.swarm_id:
            raise RemoteProtocolError(peer, f"update for swarm {msg.swarm_id!r}, this is {self.config.swarm_id!r}")
        if msg.fingerprint != self.fingerprint:
            raise RemoteProtocolError(peer, "update for a model of another shape (fingerprint mismatch)")
        heard = (self._replies_from if msg.reply else self._requests_from).get(peer, set())
        kind = "reply" if msg.reply else "request"
        if msg.round in heard:
            raise RemoteProtocolError(peer, f"replayed round {msg.round} (an honest peer sends one {kind} a round)")
        latest = max(heard) if heard and not msg.reply else None
        if latest is not None and msg.round < latest - self.config.max_future_rounds:
            raise RemoteProtocolError(peer, f"stale round {msg.round} (already had round {latest})")
        try:
            indices, values = unpack_sparse(msg.payload, self.numel, max_k=self.k)
        except DecodeError as exc:
            raise RemoteProtocolError(peer, f"bad sparse payload: {exc}") from exc
        # Valid: from here on the state may change.
        heard.add(msg.round)
        if msg.reply:
            self._replies_from[peer] = heard
        else:
            newest = max(heard)
            self._requests_from[peer] = {r for r in heard if r >= newest - self.config.max_future_rounds}
        if msg.clock >= self._clock_of.get(peer, 0):
            self._clock_of[peer] = msg.clock
            self._heard_at[peer] = now
        self._counters["updates_received"] += 1
        current = self._round
        if current is not None and msg.round == current.number:
            actions = self._accept(current, peer, msg, indices, values)
            if not current.expected:
                actions.extend(self._complete(timed_out=False))
            return actions
        base = current.number if current is not None else self._next_round
        if msg.round < base:
            self._counters["late_dropped"] += 1
            return self._answer_elsewhere(now, peer, msg, indices)
        if msg.round > base + self.config.max_future_rounds:
            self._counters["future_dropped"] += 1
            return self._answer_elsewhere(now, peer, msg, indices)
        if sum(len(b) for b in self._buffer.values()) >= self.config.max_buffered_updates:
            self._counters["buffer_full_dropped"] += 1
            return []
        self._buffer.setdefault(msg.round, {})[peer] = (msg, indices, values)
        self._counters["future_buffered"] += 1
        return []

    def _answer_elsewhere(self, now: float, peer: PeerId, msg: SparseUpdate, indices: np.ndarray) -> list[Action]:
        """A request for a round this peer is not in (finished, skipped, or far ahead) gets an answer at once, from
        the public copy (the values this peer last told the swarm), with this peer's clock: a one-sided exchange
        that spares the requester its deadline and tells it where this peer is. Also to a peer this peer sent its
        own request for that round: that request may have reached it in another round, and then it is still
        waiting (a second contribution of one peer to a round replaces the first). Without error feedback there is
        no copy to answer from. Only coordinates this peer has told are answered (possibly none: the answer still
        carries the clock)."""
        if msg.reply or not self.config.error_feedback:
            return []
        if self._public is None:
            self._public = torch.zeros(self.numel)
            self._told = torch.zeros(self.numel, dtype=torch.bool)
            self._difference = torch.empty(self.numel)
        indices = indices[self._told.numpy()[indices]]
        self._counters["late_replies_sent"] += 1
        reply = self._pack(msg.round, True, indices, self._public, self.clock)
        return [Send(peer, reply, now + self.config.round_deadline_s)]

    def _pack(self, number: int, reply: bool, indices: np.ndarray, x: torch.Tensor, clock: int) -> SparseUpdate:
        """An update with `x`'s values at `indices` (ascending, as the compressor gives them and `unpack_sparse`
        checks them: the payload keeps their order); the public copy records what was told (as rounded)."""
        payload = pack_sparse(indices, x.numpy()[indices], self.numel, value_format=self.config.value_format)
        if self._public is not None and x is not self._public:  # told values are already as rounded: no write
            self._public.numpy()[indices] = decoded_values(payload)
            self._told.numpy()[indices] = True
        return SparseUpdate(self.config.swarm_id, number, self.fingerprint, reply, payload, clock)

    def _eligible(self, number: int, sender: PeerId, receiver: PeerId, factor: float) -> bool:
        """Whether `sender` may pick `receiver` in round `number` (a coin both sides compute; see the docstring).
        The live count is that of this peer's live set with both ends and without itself, counted (no copy)."""
        ends = {sender, receiver} - {self.local_peer}
        live = len(self._live) - (self.local_peer in self._live) + sum(1 for p in ends if p not in self._live)
        return (
            pair_coin(self.config.swarm_id, number, sender, receiver) < factor * self.config.neighbours_per_round / live
        )

    @staticmethod
    def _timer_key(number: int) -> tuple[str, int]:
        return ("gossip-round", number)
