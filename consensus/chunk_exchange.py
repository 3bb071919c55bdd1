"""`ChunkExchange`: the one machine on the chunk protocol, holding a `SampleFetch` and a `BodyFetch`.

Voters' samples and certified-body downloads share `consensus.chunks.PROTOCOL` (one driver per protocol), so this
machine routes: `FetchSample`/`HoldTree` and every `ChunkRequest` (serving) go to the sample fetch, `FetchBody` to
the body fetch; an answer goes to the body fetch when it `expects` it (a reply with the very indices it asked
for; a refusal only when no sample of that root is asked of that peer), else to the sample fetch (which blames an
answer nobody asked for); timers and `PeerDown` go to both (each ignores the other's timer keys). No I/O.
"""

from __future__ import annotations

from consensus.body_fetch import BodyFetch, BodyFetchConfig, FetchBody
from consensus.chunks import ChunkRefusal
from consensus.sample_fetch import SampleFetch, SampleFetchConfig
from swarmgrad.core.machine import Action, Event, PeerDown, Received, TimerFired


class ChunkExchange:
    """The sample fetch and the body fetch of one peer, on one protocol; see the module docstring."""

    def __init__(self, sample: SampleFetchConfig, body: BodyFetchConfig) -> None:
        self.sample = SampleFetch(sample)
        self.body = BodyFetch(body)

    def step(self, now: float, event: Event) -> list[Action]:
        if isinstance(event, FetchBody):
            return self.body.step(now, event)
        if isinstance(event, Received) and self.body.expects(event.peer, event.msg):
            msg = event.msg
            if not (isinstance(msg, ChunkRefusal) and self.sample.asking(event.peer, msg.epoch, msg.root)):
                return self.body.step(now, event)
        if isinstance(event, TimerFired | PeerDown):
            return [*self.sample.step(now, event), *self.body.step(now, event)]
        return self.sample.step(now, event)
