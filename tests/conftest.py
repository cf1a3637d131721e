from collections.abc import Iterator

import pytest
import zmq


@pytest.fixture
def context() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    """A context for inproc:// tests: no I/O thread, so tcp:// fails loudly."""
    ctx = zmq.Context(io_threads=0)
    yield ctx
    ctx.destroy(linger=0)
