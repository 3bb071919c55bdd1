"""The errors of the consensus layer, under the project's root exception.

Bad network input (a malformed, unsigned, out-of-epoch or wrongly signed message) is a `RemoteProtocolError` from
`swarmgrad.core.errors`: the driver drops the message and reports the peer. The errors here are for things checked
offline: a certificate or a chain of them that does not hold, and equivocation evidence or an attendance that
proves nothing.
"""

from __future__ import annotations

from swarmgrad.core.errors import SwarmgradError


class CertificateError(SwarmgradError):
    """A certificate, or a link of a certificate chain, does not verify; names the epoch and the problem."""

    def __init__(self, epoch: int, problem: str) -> None:
        self.epoch = epoch
        self.problem = problem
        super().__init__(f"epoch {epoch}: {problem}")


class EvidenceError(SwarmgradError):
    """Equivocation evidence that does not prove a member signed two conflicting votes."""


class AttendanceError(SwarmgradError):
    """A value's attendance (`EpochValue.attendance`) that does not prove who took part in the parent epoch."""
