"""The one exception hierarchy of swarmgrad.

Every error the project raises on purpose derives from `SwarmgradError`. The split follows who is at fault:

- `ConfigError`: the user gave a bad value; it names the field, the value and what was expected.
- `LocalProtocolError`: our own code misused a machine or a transport (a bug): fail loudly.
- `RemoteProtocolError`: a peer sent malformed, oversized, out-of-state or badly signed data: the driver drops the
  message, reports the peer and goes on. One bad peer never stops a node.
- `DecodeError`: bytes that are not a valid frame or message. The decoder does not know who sent them; whoever
  received them turns it into a `RemoteProtocolError` naming the peer.
"""

from __future__ import annotations


class SwarmgradError(Exception):
    """Root of every exception swarmgrad raises on purpose."""


class ConfigError(SwarmgradError, ValueError):
    """A configuration value is invalid: names the field, the value and what was expected."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"`{field}` must be {expected}, got {value!r}")


class LocalProtocolError(SwarmgradError):
    """Our own code broke a protocol's rules (a bug): never caught by the driver."""


class RemoteProtocolError(SwarmgradError):
    """A peer misbehaved: the message is dropped, the peer is reported, the node goes on."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"peer {peer}: {reason}")


class DecodeError(SwarmgradError, ValueError):
    """Bytes from the network are not a valid frame or message."""


class TransportError(SwarmgradError):
    """A transport could not do what was asked (peer unreachable, transport closed, message too large)."""


class PeerUnreachable(TransportError):
    """No connection to the peer could be opened or kept."""


class TransportClosed(TransportError):
    """The transport was closed: nothing more can be sent or received."""


class MessageTooLarge(TransportError):
    """A payload exceeds the size limit of its protocol."""
