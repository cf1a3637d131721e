"""Fixtures of the process tests: servers stopped by PID, a ZeroMQ context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.integration.procs import Processes, time_limit, zmq_context


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    """Starts server processes and stops each by PID at the end, under a hard
    time limit (the test module's ``TIME_LIMIT``, 60 s unless it says)."""
    limit = getattr(request.module, "TIME_LIMIT", 60)
    with Processes(tmp_path) as processes, time_limit(limit):
        yield processes


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    with zmq_context() as context:
        yield context
