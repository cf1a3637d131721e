from collections.abc import Iterator
from typing import Any

import pytest
import zmq


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    """A context with an I/O thread, for tests over loopback TCP (the
    relay's: a relay must reconnect to a restarted server, which libzmq
    does over TCP only)."""
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)
