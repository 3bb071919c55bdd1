"""Run `swarmgrad node` processes for end-to-end tests and read their JSON event lines.

Each process prints one JSON object per line on stdout; a reader thread collects them, and `wait_for` blocks on a
condition variable (no polling sleeps) until a predicate over the events holds or a deadline passes. `NodeGroup`
kills every process it started on exit, whatever happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Event = dict[str, Any]


def discovered_at_least(count: int) -> Callable[[list[Event]], bool]:
    """A `wait_for` predicate: at least `count` distinct peers discovered."""
    return lambda events: len({e["peer"] for e in events if e["event"] == "peer_discovered"}) >= count


def peer_down(peer: str) -> Callable[[list[Event]], bool]:
    """A `wait_for` predicate: `peer` reported down."""
    return lambda events: any(e["event"] == "peer_down" and e["peer"] == peer for e in events)


class NodeProcess:
    def __init__(self, name: str, args: list[str], log_dir: Path, wrap: Sequence[str] = ()) -> None:
        self.name = name
        self.args = args
        self.stderr_path = log_dir / f"{name}.err"
        self._stderr = self.stderr_path.open("w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "swarmgrad.cli", "--log-level", "INFO", *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": line}
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"event": "exited"})
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout_s: float, what: str) -> list[Event]:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.events), timeout=timeout_s):
                raise AssertionError(
                    f"{self.name}: no {what} within {timeout_s} s; events: {self.events[-20:]}; "
                    f"stderr: {self.stderr()[-2000:]}"
                )
            return list(self.events)

    def wait_listening(self, timeout_s: float = 60.0) -> Event:
        events = self.wait_for(
            lambda ev: any(e["event"] in ("listening", "exited") for e in ev), timeout_s, "listening"
        )
        for event in events:
            if event["event"] == "listening":
                return event
        raise AssertionError(f"{self.name} exited before listening: {self.stderr()[-2000:]}")

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self.events)

    def discovered(self) -> dict[str, str]:
        """peer -> how it was first found."""
        return {e["peer"]: e["via"] for e in self.snapshot() if e["event"] == "peer_discovered"}

    def down(self) -> set[str]:
        return {e["peer"] for e in self.snapshot() if e["event"] == "peer_down"}

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()

    def wait_exit(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._stderr.close()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


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
            ["node", "--data-dir", str(self.tmp / name), "--listen", listen, "--swarm-id", swarm_id, *args],
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
