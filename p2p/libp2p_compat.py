"""The received-address gate, which reaches past py-libp2p's public API; checked by `tests/test_libp2p_compat.py`.

py-libp2p 0.8.1 is pinned (constraints.txt); what this module touches is not part of its documented API and may
change in another release. The test exercises it against the installed version (and checks that identify and the
signed peer record advertise what `p2p.addrs` computes), so an upgrade that breaks it fails there, by name, rather
than somewhere in a swarm run.

* `filter_received_addrs`: every address py-libp2p learns about another peer (identify, Kademlia peer routing and
  provider records, `host.connect`) enters the peerstore through its `add_addrs` (its `add_addr` calls it too).
  Wrapping that one method on the host's peerstore instance is the single gate in front of the dialer. Whether a
  peer is on this host is read from its connections' remote address (yamux's `get_remote_address`, not on the
  `IMuxedConn` interface).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
from libp2p.abc import IHost
from libp2p.peer.id import ID

from p2p.addrs import AddressPolicy

log = logging.getLogger(__name__)


def filter_received_addrs(host: IHost, policy: AddressPolicy) -> None:
    """Drop, before they reach `host`'s peerstore, the addresses `policy` says are not dialable from here. A peer is
    local when one of its current connections comes from loopback or from one of this host's addresses."""
    peerstore = host.get_peerstore()
    original = peerstore.add_addrs
    own_id = host.get_id()
    reported: set[tuple[ID, str]] = set()

    def peer_is_local(peer_id: ID) -> bool:
        for conn in host.get_network().get_connections(peer_id):
            remote = getattr(conn.muxed_conn, "get_remote_address", lambda: None)()
            if remote is not None and policy.is_local_ip(remote[0]):
                return True
        return False

    def add_addrs(peer_id: ID, addrs: Sequence[multiaddr.Multiaddr], ttl: int = 0) -> None:
        if peer_id == own_id:
            return
        local = peer_is_local(peer_id)
        kept = []
        for addr in addrs:
            reason = policy.dialable(addr, local)
            if reason is None:
                kept.append(addr)
            elif (peer_id, str(addr)) not in reported and len(reported) < 4096:
                reported.add((peer_id, str(addr)))
                log.info("not dialling %s at %s: %s", peer_id, addr, reason)
        if kept:
            original(peer_id, kept, ttl)

    peerstore.add_addrs = add_addrs  # type: ignore[method-assign]
