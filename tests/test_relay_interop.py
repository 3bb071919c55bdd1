"""A relay of another libp2p implementation serves swarmgrad: go-libp2p's daemon (`p2pd`, shipped inside the
`hivemind` wheel on PyPI) grants a swarmgrad host a circuit relay v2 reservation, and another swarmgrad host reaches
it through that relay, on 127.0.0.1 (a public swarm: py-libp2p's pnet does not interoperate with go-libp2p's).

The wheel is fetched once with `pip download --no-deps` (no install, nothing of hivemind is imported) into
`~/.cache/swarmgrad/`; where it cannot be fetched (no network) the test is skipped, saying why.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from libp2p.abc import IHost

from p2p.addrs import parse_peer_addr
from p2p.host import HostConfig, running_host
from p2p.relay import RelayServiceConfig, Reserved
from p2p.relay_host import RelayHost

HIVEMIND = "hivemind==1.1.12"
CACHE = Path.home() / ".cache" / "swarmgrad" / "p2pd-hivemind-1.1.12"
DOWNLOAD_S = 180
START_S = 30.0


def _p2pd() -> Path:
    binary = CACHE / "p2pd"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), HIVEMIND],
            check=True,
            capture_output=True,
            timeout=DOWNLOAD_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot fetch {HIVEMIND} for its p2pd binary: {exc}")
    (wheel,) = CACHE.glob("hivemind-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        binary.write_bytes(archive.read("hivemind/hivemind_cli/p2pd"))
    binary.chmod(0o755)
    wheel.unlink()
    return binary


@pytest.fixture
def p2pd_relay(tmp_path: Path) -> Iterator[str]:
    """A running go-libp2p daemon with its relay service; its dialable address, ending in /p2p/<id>."""
    proc = subprocess.Popen(
        [
            str(_p2pd()),
            "-hostAddrs",
            "/ip4/127.0.0.1/tcp/0",
            "-listen",
            f"/unix{tmp_path}/p2pd.sock",
            "-relayService=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        peer_id = addr = None
        for line in proc.stdout:  # the daemon prints its id, then its addresses, at start
            if found := re.match(r"Peer ID: (\S+)", line):
                peer_id = found.group(1)
            elif line.startswith("/ip4/127.0.0.1/tcp/"):
                addr = line.strip()
                break
        assert peer_id is not None and addr is not None, "p2pd printed no address"
        yield f"{addr}/p2p/{peer_id}"
    finally:
        proc.kill()
        proc.wait(10)


@asynccontextmanager
async def relay_capable_host(tmp: Path, name: str) -> AsyncIterator[tuple[IHost, RelayHost]]:
    config = HostConfig(key_path=tmp / name / "identity.key")
    async with running_host(config) as host, trio.open_nursery() as nursery:
        relay_host = RelayHost(host, RelayServiceConfig(), config)
        await nursery.start(relay_host.run)
        yield host, relay_host
        nursery.cancel_scope.cancel()


async def test_a_go_libp2p_relay_serves_a_swarmgrad_reservation_and_circuit(p2pd_relay: str, tmp_path: Path) -> None:
    relay = parse_peer_addr("relay", p2pd_relay)
    bare = str(relay.addrs[0]).split("/p2p/")[0]
    with trio.fail_after(START_S):
        async with (
            relay_capable_host(tmp_path, "listener") as (listener, listener_relay),
            relay_capable_host(tmp_path, "dialler") as (dialler, dialler_relay),
        ):
            outcome = await listener_relay.reserve(relay.peer_id.to_base58(), (bare,))
            assert isinstance(outcome, Reserved) and outcome.ttl_s > 0, outcome
            target = listener.get_id()
            addr = f"{p2pd_relay}/p2p-circuit/p2p/{target.to_base58()}"
            assert await dialler_relay.dial(target.to_base58(), addr) is None
            (conn,) = dialler.get_network().get_connections(target)
            assert any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
