"""Run `swarmgrad node` processes for end-to-end tests and read their JSON event lines.

`NodeProcess` is the `swarmgrad.procs.ChildProcess` of one `swarmgrad node` (`wait_for` blocks on the reader's
condition variable, never a polling sleep, until a predicate over the events holds, with a ceiling). `NodeGroup`
kills every process it started on exit, whatever happened.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from swarmgrad.procs import EXITED, ChildFailed, ChildProcess, Event


def discovered_at_least(count: int) -> Callable[[list[Event]], bool]:
    """A `wait_for` predicate: at least `count` distinct peers discovered."""
    return lambda events: len({e["peer"] for e in events if e["event"] == "peer_discovered"}) >= count


def peer_down(peer: str) -> Callable[[list[Event]], bool]:
    """A `wait_for` predicate: `peer` reported down."""
    return lambda events: any(e["event"] == "peer_down" and e["peer"] == peer for e in events)


class NodeProcess(ChildProcess):
    def __init__(self, name: str, args: list[str], log_dir: Path, wrap: Sequence[str] = ()) -> None:
        self.args = args
        self.stderr_path = log_dir / f"{name}.err"
        command = [*wrap, sys.executable, "-m", "swarmgrad.cli", "--log-level", "INFO", *args]
        super().__init__(name, command, self.stderr_path)

    def wait_listening(self, timeout_s: float = 180.0) -> Event:
        events = self.wait_for(
            lambda ev: any(e["event"] in ("listening", EXITED["event"]) for e in ev), timeout_s, "listening"
        )
        for event in events:
            if event["event"] == "listening":
                return event
        raise ChildFailed(f"{self.name} exited before listening; {self.tail()}")

    def discovered(self) -> dict[str, str]:
        """peer -> how it was first found."""
        return {e["peer"]: e["via"] for e in self.snapshot() if e["event"] == "peer_discovered"}

    def down(self) -> set[str]:
        return {e["peer"] for e in self.snapshot() if e["event"] == "peer_down"}

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_exit(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)


class NodeGroup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.nodes: list[NodeProcess] = []

    def start(
        self,
        name: str,
        *args: str,
        swarm_id: str = "test",
        listen: str = "/ip4/127.0.0.1/tcp/0",
        wrap: Sequence[str] = (),
    ) -> NodeProcess:
        node = NodeProcess(
            name,
            ["node", "--json", "--data-dir", str(self.tmp / name), "--listen", listen, "--swarm-id", swarm_id, *args],
            self.tmp,
            wrap,
        )
        self.nodes.append(node)
        return node


@contextmanager
def node_group(tmp: Path) -> Iterator[NodeGroup]:
    group = NodeGroup(tmp)
    try:
        yield group
    finally:
        for node in group.nodes:
            node.kill()
