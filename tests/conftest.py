from collections.abc import Iterator
from typing import Any

import pytest
import zmq


class _Socket(zmq.Socket):  # type: ignore[type-arg]
    """Frees its inproc names when closed.

    libzmq frees a closed socket's inproc names later, in its reaper thread
    (a real thread: under the autojump clock, a bind to the same name right
    after a close fails with EADDRINUSE or not depending on real time).
    ``unbind`` frees a name at once, in the calling thread, so a server
    restarted at the same names can always bind once the old one has closed.
    """

    _inproc: list[str] | None = None  # declared here: not a zmq option

    def bind(self, addr: str) -> Any:
        bound = super().bind(addr)
        if addr.startswith("inproc://"):
            self._inproc = [*(self._inproc or ()), addr]
        return bound

    def close(self, linger: int | None = None) -> None:
        if not self.closed:
            for addr in self._inproc or ():
                self.unbind(addr)
        super().close(linger)


class _Context(zmq.Context):  # type: ignore[type-arg]
    _socket_class = _Socket


@pytest.fixture
def context() -> Iterator[zmq.Context]:  # type: ignore[type-arg]
    """A context for inproc:// tests: no I/O thread, so tcp:// fails loudly.

    Its sockets free their inproc names as soon as they are closed.
    """
    ctx = _Context(io_threads=0)
    yield ctx
    ctx.destroy(linger=0)
