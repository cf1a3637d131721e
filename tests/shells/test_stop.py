"""A graceful stop of the server shell (``CloneServer.stop``), in process.

Under the autojump clock over inproc, as the other shell tests: the writes
already queued in the collector at the stop are applied, published and
committed (and, with ``--fsync interval``, synced to disk) before ``run``
returns; nothing written after is taken; a snapshot client that reads
nothing does not hold the stop up.  The signal wiring and the linger of real
sockets are tested with real processes (tests/integration/test_stop_process.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq

from tests.chp import RawClient, settle, unique
from tests.shells.test_datadir import on_disk
from tests.shells.test_standalone import kvset
from trioclone._zmq import Sockets
from trioclone.core.chp import HUGZ, decode_kvmsg, encode_request
from trioclone.endpoints import Endpoints
from trioclone.server.clone import STOP_LIMIT, CloneServer
from trioclone.server.datadir import DataDir
from trioclone.server.settings import ServerSettings

Context = zmq.Context[Any]
GUARD = 60.0  # virtual seconds; reached only if a test waits for ever


async def run_until_stopped(server: CloneServer, stopped: trio.Event) -> None:
    await server.run()
    stopped.set()


async def test_a_stop_applies_the_writes_already_queued_then_takes_no_more(
    context: Context,
    autojump_clock: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trioclone.server")
    synced_at: list[float] = []
    sync = DataDir.sync

    def spy(data: DataDir) -> None:
        synced_at.append(trio.current_time())
        sync(data)

    monkeypatch.setattr(DataDir, "sync", spy)
    endpoints = Endpoints.inproc(unique("stop"))
    settings = ServerSettings(endpoints, data_dir=str(tmp_path), fsync="interval")
    server = CloneServer(settings, context=context)
    stopped = trio.Event()
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_until_stopped, server, stopped)
            await trio.sleep(0.1)  # bound
            client = RawClient(sockets, endpoints)
            await settle()
            writes = [kvset(b"/queued/%03d" % n, b"v%d" % n) for n in range(50)]
            for frames in writes:
                assert client.pub.try_send(frames)
            server.stop()  # no schedule point since: all 50 wait in the queue
            stop_at = trio.current_time()
            await server._collected.wait()
            client.set(b"/too-late", b"x")  # the collector is closed: not taken
            await stopped.wait()
            took = trio.current_time() - stop_at
            published = [
                decode_kvmsg(f) for f in client.sub.receive_nowait(1000) if f[0] != HUGZ
            ]
    assert took < STOP_LIMIT
    assert [(m.key, m.sequence) for m in published] == [
        (frames[0], n) for n, frames in enumerate(writes, 1)
    ]
    assert on_disk(tmp_path) == (50, [frames[0] for frames in writes])
    assert server.core.store.get(b"/too-late") is None
    assert synced_at and synced_at[-1] >= stop_at  # the last sync, at the stop
    assert synced_at[0] >= stop_at  # (the periodic one was not due yet)
    messages = [r.getMessage() for r in caplog.records]
    steps = [
        "stopping (active, sequence 0): no more writes taken",
        "the collector is closed (50 queued writes taken at the stop)",
        "the map is committed and synced to disk: 50 keys, sequence 50",
        "closing the sockets",
        "clone stopped",
    ]
    found = [next(i for i, m in enumerate(messages) if m.startswith(s)) for s in steps]
    assert found == sorted(found), messages


async def test_a_snapshot_client_that_reads_nothing_does_not_hold_up_the_stop(
    context: Context, autojump_clock: Any
) -> None:
    endpoints = Endpoints.inproc(unique("stop"))
    server = CloneServer(ServerSettings(endpoints), context=context)
    stopped = trio.Event()
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_until_stopped, server, stopped)
            await trio.sleep(0.1)
            client = RawClient(sockets, endpoints)
            await settle()
            for n in range(20_000):
                client.pub.try_send(kvset(b"/k/%05d" % n, b"x" * 100))
            while server.core.sequence < 20_000:
                await trio.sleep(0.1)
            sleeper = sockets.open(zmq.DEALER, connect=[endpoints.snapshot])
            sleeper.raw.setsockopt(zmq.RCVHWM, 10)
            await sleeper.send(encode_request(b""))
            while not server._transfers:  # its snapshot started, then stalls
                await trio.sleep(0.01)
            await trio.sleep(1.0)
            assert server._transfers
            server.stop()
            stop_at = trio.current_time()
            await stopped.wait()
            assert trio.current_time() - stop_at < STOP_LIMIT


async def test_a_stop_asked_before_the_server_serves_stops_it_once_bound(
    context: Context, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "trioclone.server")
    server = CloneServer(
        ServerSettings(Endpoints.inproc(unique("stop"))), context=context
    )
    server.stop()
    server.stop()  # a second call changes nothing
    with trio.fail_after(STOP_LIMIT):
        await server.run()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("clone listening") for m in messages)
    assert "clone stopped" in messages
