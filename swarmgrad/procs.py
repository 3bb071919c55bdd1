"""Child processes that print one JSON event per line, and free TCP ports for them: the one harness of the demo, the
end-to-end tests and the benchmarks.

`ChildProcess` starts a command with its stderr appended to a log file and a reader thread that parses its stdout
into `events` (a line that is not JSON becomes `{"event": "unparsed"}`; the end of its stdout, `{"event": "exited"}`).
Waiting is on a condition variable the reader notifies, never a polling sleep, and always bounded: `wait_for` until a
predicate over all events so far holds, `read_until` for the next event of a kind (a cursor, for callers that
consume events in order, such as the demo's progress display). Both raise `ChildFailed` at their timeout, or as soon
as the child has exited without the awaited event. Whoever starts a `ChildProcess` stops it (`stop`, `kill`).
`reserve_port` picks a port that no outgoing connection can take first. Nothing here knows what the child does.
"""

from __future__ import annotations

import json
import os
import random
import signal as signals
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Event = dict[str, Any]
EXITED: Event = {"event": "exited"}
"""The last event of every child: its stdout was closed (it exited, or closed it)."""
STOP_GRACE_S = 60.0
"""How long `stop` waits after SIGTERM before the kill. A peer finishes its round, saves and evaluates first: 20 s
was once too short on a 2-core machine running at a load of 14."""


class ChildFailed(Exception):
    """A child process exited or went silent before doing what was waited for."""


class ChildProcess:
    """`command` as a child process (stdin closed, stderr appended to `log_path`, Python unbuffered). `on_event` is
    called in the reader thread with each event as it arrives, before any waiter wakes."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.spawned_at = time.time()
        self._events: list[Event] = []
        self._cursor = 0  # events before it were read by `next_event` / `read_until`
        self._on_event = on_event
        self._cond = threading.Condition()
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(command),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None  # we asked for a pipe
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": raw.decode(errors="replace").rstrip()}
            self._append(event)
        self._append(dict(EXITED))

    def _append(self, event: Event) -> None:
        with self._cond:
            if self._on_event is not None:
                self._on_event(event)
            self._events.append(event)
            self._cond.notify_all()

    def snapshot(self) -> list[Event]:
        """Every event so far."""
        with self._cond:
            return list(self._events)

    def exited(self) -> bool:
        with self._cond:
            return self._exited_locked()

    def wait_for(self, predicate: Callable[[list[Event]], bool], timeout_s: float, what: str) -> list[Event]:
        """Every event so far once `predicate(events)` holds; `ChildFailed` if it does not within `timeout_s`, or
        the child exits first."""
        with self._cond:
            done = self._cond.wait_for(lambda: predicate(self._events) or self._exited_locked(), timeout=timeout_s)
            if done and predicate(self._events):
                return list(self._events)
        why = "exited" if self.exited() else f"timed out after {timeout_s} s"
        raise ChildFailed(f"{self.name}: {why} waiting for {what}; last events: {self.snapshot()[-10:]}; {self.tail()}")

    def next_event(self, timeout_s: float) -> Event | None:
        """The next event not read yet, or None if none came within `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._cursor < len(self._events), timeout=timeout_s):
                return None
            self._cursor += 1
            return self._events[self._cursor - 1]

    def read_until(self, kind: str, timeout_s: float, where: Callable[[Event], bool] = lambda e: True) -> Event:
        """Read events until one of `kind` that satisfies `where`; `ChildFailed` at exit or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while (event := self.next_event(max(0.0, deadline - time.monotonic()))) is not None:
            if event["event"] == kind and where(event):
                return event
            if event["event"] == EXITED["event"]:
                raise ChildFailed(f"{self.name} exited (status {self.proc.wait(10.0)}) before {kind!r}; {self.tail()}")
        raise ChildFailed(f"{self.name}: no {kind!r} event within {timeout_s} s; {self.tail()}")

    def seen(self, kind: str) -> list[Event]:
        """Events of `kind` read so far (by `next_event` / `read_until`)."""
        with self._cond:
            return [e for e in self._events[: self._cursor] if e["event"] == kind]

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit (killing it after `timeout_s`) and for its last events; its status."""
        try:
            status = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait(timeout=10.0)
        self._reader.join(timeout=10.0)
        return status

    def stop(self) -> int:
        """SIGTERM, then the kill after `STOP_GRACE_S`: for cleanup, and for tests that expect a clean exit."""
        self.signal(signals.SIGTERM)
        return self.wait(STOP_GRACE_S)

    def kill(self) -> int:
        """SIGKILL (which also ends a stopped process) and reap it."""
        self.signal(signals.SIGKILL)
        return self.wait(10.0)

    def tail(self, chars: int = 2000) -> str:
        """The end of the child's log, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"log {self.log_path}: {text[-chars:]}"

    def _exited_locked(self) -> bool:
        return bool(self._events) and self._events[-1]["event"] == EXITED["event"]


def reserve_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now, from below the kernel's ephemeral range, so that no outgoing connection can
    take it before the process it is meant for binds it (a port from bind(0) could be)."""
    low, _high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = list(range(max(1024, low - 12_000), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise ChildFailed(f"no free TCP port on {host} below {low}")
