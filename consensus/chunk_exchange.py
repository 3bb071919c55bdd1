"""`ChunkExchange`: the one machine on the chunk protocol, holding a `SampleFetch`, a `BodyFetch` and a
`CertifiedJoin`.

Voters' samples, certified-body downloads and joins from certified state share `consensus.chunks.PROTOCOL` (one
driver per protocol), so this machine routes: `FetchSample`/`HoldTree` and every `ChunkRequest` (serving) go to the
sample fetch (except those for the body the join offers), `FetchBody` to the body fetch, `JoinCertified`/`HoldChain`,
chain messages and `Computed` to the join;
a chunk answer goes to the join when its own body fetch `expects` it, else to the body fetch when that `expects` it
(a reply with the very indices it asked for; a refusal only when no sample of that root is asked of that peer), else
to the sample fetch (which blames an answer nobody asked for); timers and `PeerDown` go to all three (each ignores
the others' timer keys), `SendFailed` to the sample fetch and the join. No I/O.
"""

from __future__ import annotations

from consensus.body_fetch import BodyFetch, BodyFetchConfig, FetchBody
from consensus.certified_join import CertifiedJoin, CertifiedJoinConfig, HoldChain, JoinCertified
from consensus.chunks import ChunkRefusal
from consensus.sample_fetch import SampleFetch, SampleFetchConfig
from swarmgrad.core.machine import Action, Computed, Event, PeerDown, Received, SendFailed, TimerFired


class ChunkExchange:
    """The sample fetch, the body fetch and the certified join of one peer, on one protocol; see the module
    docstring."""

    def __init__(
        self, sample: SampleFetchConfig, body: BodyFetchConfig, join: CertifiedJoinConfig | None = None
    ) -> None:
        self.sample = SampleFetch(sample)
        self.body = BodyFetch(body)
        self.join = CertifiedJoin(join or CertifiedJoinConfig(body.swarm_id), body)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchBody):
            return self.body.step(now, event)
        if isinstance(event, JoinCertified | HoldChain | Computed):
            return self.join.step(now, event)
        if isinstance(event, Received):
            msg = event.msg
            asked = isinstance(msg, ChunkRefusal) and self.sample.asking(event.peer, msg.epoch, msg.root)
            if self.join.expects(event.peer, msg) and not asked:
                return self.join.step(now, event)
            if self.body.expects(event.peer, msg) and not asked:
                return self.body.step(now, event)
        if isinstance(event, TimerFired | PeerDown):
            return [*self.sample.step(now, event), *self.body.step(now, event), *self.join.step(now, event)]
        if isinstance(event, SendFailed):
            return [*self.sample.step(now, event), *self.join.step(now, event)]
        return self.sample.step(now, event)
