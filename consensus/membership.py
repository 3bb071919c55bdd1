"""Who votes: the genesis rule and the next member set, as pure functions. No I/O, no state.

Genesis. The voters of epoch 1 are the swarm's *founders*: the sorted, distinct Ed25519 keys listed in the swarm's
genesis configuration (in a private swarm, the key holders the operator names; in a public swarm, the peers that
start it). Every peer must be given the same list; its anchor is `genesis_parent_hash(swarm_id, founders)`, the
parent link of epoch 1, so a chain built on another founder list fails at its first link.

Next member set. Each certificate of epoch E carries the member set of E+1 (`next_members`, bound by the value's
`next_members_hash`), so E+1 starts only once E is decided and every honest peer then knows the same voters. The
proposer computes it with `next_members` from what it saw in E, and the voters' validity check recomputes it:

* a member stays unless the value proves it equivocated (`EpochValue.evidence`) or it missed the last
  `drop_after_missed` epochs in which it was a voter: a dead key must not keep counting towards n. A member *took
  part* in epoch E-1 when E's value attests it (`EpochValue.attendance`: a signed vote of the member for E-1's
  certified value), and missed it otherwise. Presence is read from the decided values alone, not from a
  certificate's signers: a certificate holds only the first 2f+1 precommits its maker gathered, so the slowest
  honest member would sign none of them and be dropped although it voted every time, and two honest peers may
  hold different signer sets of one epoch;
* a *joiner* is a live key holder that asked to join with a signed `JoinRequest` naming the chain it holds; the
  value of E carries the requests its proposer admits (`EpochValue.joiners`), so voters compute the same set;
  equivocators (the offenders any value of the chain proves) never join;
* private swarm: every such joiner is admitted (the swarm key already limits who can connect);
* public swarm: at most `max_new_voters(n)` joiners per epoch, the lowest keys first by `sha256(parent link, key)`
  (so a joiner cannot grind its way to the head of the queue without knowing the parent hash).

Why a bound in a public swarm: an open swarm cannot stop Sybil identities, it can only slow them. With at most
`max(1, n // 32)` new voters per epoch the member set grows by at most ~3 % an epoch, so an attacker who starts
with no members needs at least log(1.5) / log(1 + 1/32), about 13 epochs, of admissions in which every joiner is
its own before it can hold a third of the votes -- time for operators, ban lists and robust aggregation to react --
and a certificate of one epoch is never signed by a set that differs from its parent's by more than that fraction
plus the dropped members, which keeps each link of the chain checkable by the previous set's honest majority.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from consensus.messages import MAX_MEMBERS, check_members, members_hash
from swarmgrad.core.errors import ConfigError

_GENESIS_DOMAIN = b"swarmgrad/consensus/genesis/v1\x00"
_QUEUE_DOMAIN = b"swarmgrad/consensus/join-order/v1\x00"
PUBLIC_GROWTH_DIVISOR = 32


def genesis_members(founders: Iterable[bytes]) -> tuple[bytes, ...]:
    """The voters of epoch 1: the founders' keys, sorted and distinct. Raises `ConfigError` on a bad list."""
    members = tuple(sorted(set(founders)))
    try:
        check_members(members)
    except ValueError as exc:
        raise ConfigError("consensus.founders", len(members), f"a valid member set ({exc})") from exc
    return members


def genesis_parent_hash(swarm_id: str, members: tuple[bytes, ...]) -> bytes:
    """The parent link of epoch 1: binds the chain to its swarm id and founder set."""
    swarm = swarm_id.encode()
    return hashlib.sha256(_GENESIS_DOMAIN + bytes((len(swarm),)) + swarm + members_hash(members)).digest()


def max_new_voters(num_members: int) -> int:
    """The most joiners a public swarm admits in one epoch of `num_members` voters (see the module docstring)."""
    return max(1, num_members // PUBLIC_GROWTH_DIVISOR)


@dataclass(frozen=True)
class MembershipPolicy:
    """`public`: bound the joiners per epoch (`max_new_voters`); `drop_after_missed`: k, the consecutive epochs a
    member may miss before it is dropped."""

    public: bool = False
    drop_after_missed: int = 3

    def __post_init__(self) -> None:
        if self.drop_after_missed < 1:
            raise ConfigError("consensus.drop_after_missed", self.drop_after_missed, "an int >= 1")


def next_members(
    policy: MembershipPolicy,
    current: tuple[bytes, ...],
    parent_hash: bytes,
    missed_epochs: Mapping[bytes, int],
    joiners: Iterable[bytes],
    equivocators: Iterable[bytes],
) -> tuple[bytes, ...]:
    """The member set of the next epoch (sorted). `missed_epochs[key]`: consecutive epochs up to now in which the
    member took no attested part (`missed_epochs`); `joiners`: live key holders that asked to join with a verified
    chain. Never empty and never above `MAX_MEMBERS`: if every member would go, the current set stays."""
    banned = set(equivocators)
    stay = [m for m in current if m not in banned and missed_epochs.get(m, 0) < policy.drop_after_missed]
    if not stay:
        stay = [m for m in current if m not in banned] or list(current)
    kept = set(stay)
    new = sorted(
        {j for j in joiners if j not in kept and j not in banned},
        key=lambda key: hashlib.sha256(_QUEUE_DOMAIN + parent_hash + key).digest(),
    )
    room = MAX_MEMBERS - len(stay)
    if policy.public:
        room = min(room, max_new_voters(len(current)))
    members = tuple(sorted([*stay, *new[: max(0, room)]]))
    check_members(members)
    return members


def missed_epochs(
    members: tuple[bytes, ...], epochs: Iterable[tuple[Iterable[bytes], Iterable[bytes]]]
) -> dict[bytes, int]:
    """For each member, how many of the most recent epochs it missed in a row. `epochs`: the (voters, attendees) of
    each recent epoch, oldest first; an epoch in which a key was not a voter is not one it missed (a joiner is not
    silent about the epochs before its admission)."""
    missed = {m: 0 for m in members}
    for voters, present in epochs:
        voted = set(voters)
        took_part = set(present)
        for m in members:
            missed[m] = 0 if m in took_part or m not in voted else missed[m] + 1
    return missed
