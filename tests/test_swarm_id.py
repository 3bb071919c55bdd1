"""The one swarm-id rule (`swarmgrad.core.swarm_id`), and that every layer carrying a swarm id applies it: an id
one layer rejects, every other rejects too."""

from __future__ import annotations

import pytest
import torch

from gossip.messages import SparseUpdate
from gossip.round import GossipConfig
from p2p.discovery import DiscoveryConfig
from swarmgrad.config import NetworkConfig
from swarmgrad.core.errors import ConfigError
from swarmgrad.core.swarm_id import MAX_SWARM_ID_CHARS, is_valid_swarm_id, validate_swarm_id
from training.topk import pack_sparse

VALID = ["a", "digits-2", "team.x_1", "0" * MAX_SWARM_ID_CHARS]
INVALID = ["", "A", "-x", "a/b", "a b", "0" * (MAX_SWARM_ID_CHARS + 1), "0" * 128, "é", "a\n"]


@pytest.mark.parametrize("swarm_id", VALID)
def test_valid_swarm_ids(swarm_id: str) -> None:
    assert is_valid_swarm_id(swarm_id)
    assert validate_swarm_id(swarm_id) == swarm_id


@pytest.mark.parametrize("swarm_id", [*INVALID, None, 7])
def test_invalid_swarm_ids_name_the_value(swarm_id: str) -> None:
    assert not is_valid_swarm_id(swarm_id)
    with pytest.raises(ConfigError) as info:
        validate_swarm_id(swarm_id)
    assert info.value.field == "swarm_id" and info.value.value == swarm_id


def _gossip_config(swarm_id: str) -> GossipConfig:
    return GossipConfig(swarm_id=swarm_id, density=0.1, round_deadline_s=1.0, seed=0)


def _update(swarm_id: str) -> SparseUpdate:
    payload = pack_sparse(torch.tensor([0]), torch.tensor([1.0]), 4, "fp32")
    return SparseUpdate(swarm_id, 0, bytes(16), False, payload, 0)


@pytest.mark.parametrize("swarm_id", VALID)
def test_every_layer_accepts_a_valid_swarm_id(swarm_id: str) -> None:
    DiscoveryConfig(swarm_id=swarm_id)
    NetworkConfig(swarm_id=swarm_id)
    _gossip_config(swarm_id)
    assert _update(swarm_id).swarm_id == swarm_id


@pytest.mark.parametrize("swarm_id", INVALID)
def test_every_layer_rejects_an_invalid_swarm_id(swarm_id: str) -> None:
    for config in (DiscoveryConfig, NetworkConfig, _gossip_config):
        with pytest.raises(ConfigError):
            config(swarm_id=swarm_id)  # type: ignore[operator]
    with pytest.raises(ValueError, match="swarm_id"):  # a message is remote data: the codec makes it a DecodeError
        _update(swarm_id)
