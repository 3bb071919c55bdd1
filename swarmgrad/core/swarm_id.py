"""The one rule for a swarm id, shared by every layer that carries one (discovery's DHT keys and stream protocols,
gossip's messages and rounds, the config and the CLI).

A swarm id is a short lowercase name: it is a path segment of every DHT key and stream protocol of its swarm, so it
must be safe there, and short enough that keys stay small. This module owns that rule and nothing else.
"""

from __future__ import annotations

import re

from swarmgrad.core.errors import ConfigError

MAX_SWARM_ID_CHARS = 63
SWARM_ID_RULE = "1 to 63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
_SWARM_ID = re.compile(rf"[a-z0-9][a-z0-9._-]{{0,{MAX_SWARM_ID_CHARS - 1}}}")


def is_valid_swarm_id(swarm_id: object) -> bool:
    """Whether `swarm_id` is a string that follows `SWARM_ID_RULE`."""
    return isinstance(swarm_id, str) and _SWARM_ID.fullmatch(swarm_id) is not None


def validate_swarm_id(swarm_id: str) -> str:
    """Return `swarm_id` if it is a valid swarm id, else raise `ConfigError` naming it."""
    if not is_valid_swarm_id(swarm_id):
        raise ConfigError("swarm_id", swarm_id, SWARM_ID_RULE)
    return swarm_id
