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


@pytest.fixture(autouse=True)
def _own_data_dirs(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test's server processes keep their durable maps in a data
    folder of their own (the default folder is under ``XDG_DATA_HOME``), so
    no test reads a map that another test, or another run, left behind."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("data")))
