"""`sim.network`: transfer time is size / bandwidth + latency, messages on one uplink queue, latency models, loss
and duplication rates, and a partition blocks exactly its links until healed -- also through the event core with
a real gossip message, whose size is its wire encoding."""

from __future__ import annotations

import random

import pytest

from sim.network import NetworkConfig, NetworkModel, links_between
from swarmgrad.core.errors import ConfigError

MB = 1_000_000
TEN_MBIT_BYTES_PER_S = 10e6 / 8
TOLERANCE_S = 1e-9  # the model is exact arithmetic: the stated tolerance is float rounding


def model(**kwargs: object) -> NetworkModel:
    return NetworkModel(NetworkConfig(**kwargs), random.Random(0))  # type: ignore[arg-type]


def test_transfer_takes_size_over_bandwidth_plus_latency() -> None:
    net = model(latency_s=0.1, uplink_bytes_per_s=TEN_MBIT_BYTES_PER_S, downlink_bytes_per_s=8 * TEN_MBIT_BYTES_PER_S)
    (arrival,) = net.transmit(2.0, "a", "b", 6 * MB)
    assert arrival == pytest.approx(2.0 + 6 * MB / TEN_MBIT_BYTES_PER_S + 0.1, abs=TOLERANCE_S)  # 6 MB: 4.8 s + 0.1


def test_the_slower_side_is_the_bottleneck() -> None:
    net = model(latency_s=0.0, uplink_bytes_per_s=10 * MB, downlink_bytes_per_s=MB)
    assert net.transmit(0.0, "a", "b", MB) == [pytest.approx(1.0)]


def test_two_messages_on_one_uplink_queue() -> None:
    net = model(latency_s=0.1, uplink_bytes_per_s=TEN_MBIT_BYTES_PER_S)
    (first,) = net.transmit(0.0, "a", "b", 6 * MB)
    (second,) = net.transmit(0.0, "a", "c", 6 * MB)
    assert first == pytest.approx(4.9, abs=TOLERANCE_S)
    assert second == pytest.approx(9.7, abs=TOLERANCE_S)
    (other_sender,) = net.transmit(0.0, "d", "c", 6 * MB)  # another uplink does not wait
    assert other_sender == pytest.approx(4.9, abs=TOLERANCE_S)


def test_two_messages_into_one_downlink_queue() -> None:
    net = model(latency_s=0.0, downlink_bytes_per_s=MB)
    assert net.transmit(0.0, "a", "c", MB) == [pytest.approx(1.0)]
    assert net.transmit(0.0, "b", "c", MB) == [pytest.approx(2.0)]


def test_partition_blocks_exactly_its_links_and_heal_restores_them() -> None:
    peers = ["a", "b", "c", "d"]
    net = model(latency_s=0.01)
    cut = links_between([["a", "b"], ["c", "d"]])
    assert sorted(cut) == [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    net.block(cut)
    delivered = {(s, r) for s in peers for r in peers if s != r and net.transmit(0.0, s, r, 10)}
    assert delivered == {("a", "b"), ("b", "a"), ("c", "d"), ("d", "c")}
    net.heal(cut)
    assert all(net.transmit(0.0, s, r, 10) for s in peers for r in peers if s != r)


def test_loss_and_duplication_rates_and_determinism() -> None:
    def arrivals(seed: int) -> list[int]:
        net = NetworkModel(NetworkConfig(loss=0.2, duplicate=0.1), random.Random(seed))
        return [len(net.transmit(0.0, "a", "b", 1)) for _ in range(10_000)]

    counts = arrivals(1)
    assert counts.count(0) / len(counts) == pytest.approx(0.2, abs=0.02)
    assert counts.count(2) / len(counts) == pytest.approx(0.8 * 0.1, abs=0.015)
    assert arrivals(1) == counts and arrivals(2) != counts


def test_reordering_lets_messages_overtake() -> None:
    net = model(latency_s=0.01, reorder_jitter_s=0.5)
    times = [net.transmit(i * 0.01, "a", "b", 1)[0] for i in range(50)]
    assert times != sorted(times)


def test_latency_models() -> None:
    regions = NetworkModel(
        NetworkConfig(regions=("eu", "us"), region_latency_s=((0.01, 0.08), (0.09, 0.02))),
        random.Random(0),
        region_of={"a": "eu", "b": "us", "c": "eu"},
    )
    assert regions.transmit(0.0, "a", "b", 1) == [pytest.approx(0.08)]
    assert regions.transmit(0.0, "b", "a", 1) == [pytest.approx(0.09)]
    assert regions.transmit(0.0, "a", "c", 1) == [pytest.approx(0.01)]
    uniform = model(latency_s=0.1, latency_distribution="uniform", latency_spread=0.5)
    drawn = [uniform.latency_s("a", f"p{i}") for i in range(200)]
    assert min(drawn) >= 0.05 and max(drawn) <= 0.15 and len(set(drawn)) > 100
    assert uniform.latency_s("a", "p0") == drawn[0]  # fixed per link once drawn


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"uplink_bytes_per_s": -1.0}, "network.uplink_bytes_per_s"),
        ({"loss": 1.0}, "network.loss"),
        ({"latency_distribution": "pareto"}, "network.latency_distribution"),
        ({"regions": ("eu",), "region_latency_s": ()}, "network.region_latency_s"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        NetworkConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_a_real_gossip_message_through_the_event_core_takes_its_encoded_size() -> None:
    import torch

    from gossip.messages import SCHEMA, SparseUpdate, model_fingerprint
    from sim.events import EventLoop, Simulator
    from swarmgrad.core.machine import Action, Event, Received, Send, TimerFired
    from training.topk import pack_sparse

    indices = torch.arange(0, 100_000, 2, dtype=torch.int64)
    payload = pack_sparse(indices, torch.ones(indices.numel()), 100_000, value_format="fp16")
    msg = SparseUpdate("s", 0, model_fingerprint([(100_000,)]), False, payload, 0)
    size = len(SCHEMA.encode(msg))
    seen: list[tuple[float, Event]] = []

    class Once:
        def step(self, now: float, event: Event) -> list[Action]:
            seen.append((now, event))
            return [Send("b", msg)] if isinstance(event, TimerFired) else []

    loop = EventLoop()
    sim = Simulator(loop, model(latency_s=0.2, uplink_bytes_per_s=MB), size_bytes=lambda m: len(SCHEMA.encode(m)))
    sim.add("a", Once())
    sim.add("b", Once())
    sim.step("a", TimerFired("go"))
    loop.run()
    assert size > 50_000 * 2  # indices and fp16 values: the bytes are the wire's
    assert sim.bytes_sent["a"] == size
    assert seen[-1] == (pytest.approx(0.2 + size / MB, abs=TOLERANCE_S), Received("a", msg))
