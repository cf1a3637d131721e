from collections.abc import Iterator

import pytest
import zmq


@pytest.fixture
def context() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    """A context for inproc:// tests: no I/O thread, so tcp:// fails loudly.

    Sockets made through ``trioclone._zmq.Sockets`` free their inproc names
    as soon as they are closed, so a server restarted at the same names can
    bind them at once.
    """
    ctx = zmq.Context(io_threads=0)
    yield ctx
    ctx.destroy(linger=0)
