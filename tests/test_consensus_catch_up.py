"""`EpochChain` catching up a chain that is behind: a peer that hears a message of an epoch past its next one (after
a restart, say) asks that sender for the missing certificates one epoch at a time, and a peer that has them answers.
Sans-IO: the machines are stepped by hand."""

from __future__ import annotations

import pytest

from consensus.agreement import AgreementConfig
from consensus.epochs import Certified, EpochChain
from consensus.messages import PREVOTE, Certificate, CertificateRequest
from consensus.provenance import ChainGenesis
from swarmgrad.core.errors import RemoteProtocolError
from swarmgrad.core.machine import Notify, Received, Send
from tests.consensus_helpers import SWARM, Members, chain

MEMBERS = Members.make(4)
GENESIS = ChainGenesis(SWARM, MEMBERS.keys)
CONFIG = AgreementConfig()
CERTS = chain(MEMBERS, 5)


def _machine(index: int, epochs: int) -> EpochChain:
    return EpochChain(CONFIG, MEMBERS.signers[index], GENESIS, CERTS[:epochs], MEMBERS.name)


def test_a_peer_behind_asks_the_sender_epoch_by_epoch_until_its_chain_is_whole() -> None:
    behind, ahead = _machine(0, 1), _machine(1, 5)
    later_vote = MEMBERS.signers[1].vote(SWARM, 6, 0, PREVOTE, CERTS[4].value.hash())
    actions = behind.step(10.0, Received("p1", later_vote))
    assert actions == [Send("p1", CertificateRequest(SWARM, 2))]
    assert behind.step(10.1, Received("p1", later_vote)) == []  # asked once per rebroadcast_s per peer and epoch
    certified: list[int] = []
    asks = [a for a in actions if isinstance(a, Send)]
    while asks:
        (ask,) = asks
        (answer,) = ahead.step(11.0, Received("p0", ask.msg))  # the peer that has it sends the certificate
        assert isinstance(answer, Send) and answer.peer == "p0" and isinstance(answer.msg, Certificate)
        actions = behind.step(11.0, Received("p1", answer.msg))
        certified += [
            a.event.certificate.epoch for a in actions if isinstance(a, Notify) and isinstance(a.event, Certified)
        ]
        asks = [a for a in actions if isinstance(a, Send) and isinstance(a.msg, CertificateRequest)]
        assert all(a.peer == "p1" for a in asks)
    assert certified == [2, 3, 4, 5] and behind.chain == CERTS  # whole, and it stops asking once it is
    assert behind.next_epoch == 6


def test_a_request_for_an_undecided_epoch_gets_nothing_and_another_swarms_is_refused() -> None:
    ahead = _machine(1, 5)
    assert ahead.step(0.0, Received("p0", CertificateRequest(SWARM, 6))) == []
    assert ahead.step(0.0, Received("p0", CertificateRequest(SWARM, 3))) == [Send("p0", CERTS[2])]
    with pytest.raises(RemoteProtocolError, match="certificate request of swarm 'other'"):
        ahead.step(0.0, Received("p0", CertificateRequest("other", 3)))


def test_a_message_of_the_next_epoch_is_no_reason_to_ask() -> None:
    peer = _machine(0, 1)
    vote = MEMBERS.signers[1].vote(SWARM, 2, 0, PREVOTE, CERTS[1].value.hash())
    assert peer.step(0.0, Received("p1", vote)) == []  # its own training reaches epoch 2 and it votes then
