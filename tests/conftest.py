"""Fixtures shared by the test modules: the built-in `digits` task, the native top-k kernel built and loaded once,
and a group of `swarmgrad node` processes that is killed at the end of each test whatever happened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node_processes import NodeGroup, node_group
from training.tasks import Task, load_task
from training.topk.build import load_extension


@pytest.fixture(scope="session")
def digits() -> Task:
    return load_task("digits")


@pytest.fixture(scope="session")
def native_topk() -> None:
    """Build (if needed) and load the native top-k extension before the test: a failed build fails loudly here."""
    load_extension()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeGroup]:
    """`swarmgrad node` processes with their data and logs under `tmp_path`; every one is killed on teardown."""
    with node_group(tmp_path) as group:
        yield group
