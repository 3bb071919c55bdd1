"""Whether other peers can dial this one: the verdict the NAT-traversal parts (relay service, relay reservations,
hole punching) act on.

`network.reachability` either forces the verdict ("public": this host is dialable at its advertised addresses;
"private": it is behind NAT or a firewall) or leaves it to the node ("auto"). The node announces each verdict once to
its subscribers as `ReachabilityChanged`; with "auto" no verdict exists until something establishes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reachability = Literal["public", "private"]
ReachabilitySetting = Literal["auto", "public", "private"]
REACHABILITY_SETTINGS: tuple[ReachabilitySetting, ...] = ("auto", "public", "private")


@dataclass(frozen=True)
class ReachabilityChanged:
    """This peer's verdict is now `reachability`, for `reason` (one line, for logs and `--json`)."""

    reachability: Reachability
    reason: str
