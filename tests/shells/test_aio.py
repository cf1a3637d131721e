"""The asyncio client (``trioclone.aio``) under ``asyncio.run``.

The servers run in a thread of the test (``ServerThread``: over TCP on
127.0.0.1, real clock); each test is a plain function that runs its own
event loop, every wait in it bounded by ``GUARD``.  A test that needs no
server points the client at a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import trioclone
import trioclone.aio
from tests.integration.procs import HOST, free_base_ports
from tests.shells.server_thread import ServerThread, tcp_pair, tcp_standalone
from trioclone import (
    ClientClosedError,
    ClientTimings,
    CloneClient,
    ConfigError,
    DeleteEvent,
    LocalProtocolError,
    NoServerError,
    ResyncEvent,
    SetEvent,
    WriteTimeoutError,
)
from trioclone.aio import AsyncioClient
from trioclone.client import agent as agent_module

T = TypeVar("T")

GUARD = 30.0  # seconds any one test's event loop may run
#: Quick failure detection, for the failover test (the pair's heartbeat and
#: HUGZ are 0.25 s: a silent server is one that missed four).
QUICK = ClientTimings(
    request_timeout=0.5, silence_timeout=1.0, backoff=0.1, max_backoff=0.5
)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())``, bounded by GUARD."""

    async def bounded() -> T:
        async with asyncio.timeout(GUARD):
            return await main()

    return asyncio.run(bounded())


async def until(condition: Callable[[], object], what: str, limit: float = 10) -> None:
    """Wait until ``condition()`` holds (set by another thread: polled)."""
    try:
        async with asyncio.timeout(limit):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {limit} s: {what}") from None


async def in_agent(clone: AsyncioClient, fn: Callable[[CloneClient], T]) -> T:
    """``fn(client)`` in the agent thread, after every call scheduled before."""

    async def call(client: CloneClient) -> T:
        return fn(client)

    return await clone._call(call)


def tracked_writes(clone: AsyncioClient) -> int:
    """Writes the client is still waiting for (and resending)."""
    client = clone._agent.client
    return len(client._core.writes) + len(client._waiters)


@pytest.fixture
def standalone() -> Iterator[ServerThread]:
    with ServerThread(tcp_standalone(hugz_interval=0.25)) as servers:
        yield servers


@pytest.fixture
def nowhere() -> list[str]:
    """A server address where nothing listens."""
    return [f"tcp://{HOST}:{free_base_ports(1, 3)[0]}"]


def agent_threads() -> int:
    return sum(t.name == "trioclone-agent" for t in threading.enumerate())


# -- reading and writing ---------------------------------------------------


def test_reads_writes_and_deletes(standalone: ServerThread) -> None:
    async def main() -> AsyncioClient:
        async with trioclone.aio.connect(standalone.servers) as clone:
            assert clone.synced is True
            assert (clone.phase, clone.server) == ("active", standalone.servers[0])
            assert clone.failovers == 0
            first = await clone.set("/aio/a", "1")
            assert clone.get("/aio/a") == b"1"
            assert clone.sequence >= first
            second = await clone.set("/aio/b", b"2", ttl=60)
            assert second > first
            assert clone.items("/aio/") == [("/aio/a", b"1"), ("/aio/b", b"2")]
            assert clone.keys("/aio/") == ["/aio/a", "/aio/b"]
            assert clone.items("/none/") == []
            gone = await clone.delete("/aio/a")
            assert gone > second
            assert clone.get("/aio/a") is None
            assert clone.get("/aio/a", b"gone") == b"gone"
        return clone

    clone = run(main)
    with pytest.raises(ClientClosedError):
        clone.get("/aio/b")
    with trioclone.connect(standalone.servers) as other:
        assert other.get("/aio/b") == b"2"
        assert other.get("/aio/a") is None


def test_a_write_by_another_client_shows_up(standalone: ServerThread) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            watch = clone.watch("/other/")
            with trioclone.connect(standalone.servers) as other:
                written = await asyncio.to_thread(other.set, "/other/k", "v")
            assert await anext(watch) == SetEvent("/other/k", b"v", written)
            assert clone.get("/other/k") == b"v"

    run(main)


# -- watching ----------------------------------------------------------------


def test_a_watch_yields_the_changes_under_its_prefix_in_order(
    standalone: ServerThread,
) -> None:
    """A write awaited after ``watch()`` shows in the watch: the watch is
    set up in the agent before the write is."""

    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            watch = clone.watch("/w/")
            a = await clone.set("/w/a", "1")
            b = await clone.set("/w/b", "2")
            gone = await clone.delete("/w/a")
            await clone.set("/elsewhere", "x")
            last = await clone.set("/w/c", "3")
            got = [await anext(watch) for _ in range(4)]
            assert got == [
                SetEvent("/w/a", b"1", a),
                SetEvent("/w/b", b"2", b),
                DeleteEvent("/w/a", gone),
                SetEvent("/w/c", b"3", last),
            ]
            with_state = clone.watch("/w/", state=True)
            assert await anext(with_state) == ResyncEvent(
                standalone.servers[0], {"/w/b": b"2", "/w/c": b"3"}
            )

    run(main)


def test_a_watcher_that_falls_behind_gets_a_resync_instead(
    standalone: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events wait in the agent, whose bound (WATCH_BUFFER) holds: a
    watch nobody iterates does not grow without end in the event loop."""
    monkeypatch.setattr("trioclone.client.agent.WATCH_BUFFER", 5)

    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            watch = clone.watch("/w/")  # nobody iterates it for a while
            sequences = [await clone.set(f"/w/{n % 3}", f"{n}") for n in range(8)]
            await clone.set("/other", "x")  # not under the prefix
            events = [await anext(watch) for _ in range(4)]
            # five sets were queued; the sixth overflowed the buffer: what
            # was queued is replaced by the state then (the sixth applied),
            # and the events from the sixth on follow
            state = {"/w/0": b"3", "/w/1": b"4", "/w/2": b"5"}
            assert events == [
                ResyncEvent(standalone.servers[0], state),
                SetEvent("/w/2", b"5", sequences[5]),
                SetEvent("/w/0", b"6", sequences[6]),
                SetEvent("/w/1", b"7", sequences[7]),
            ]

    run(main)


def test_breaking_out_of_a_watch_stops_it_in_the_agent(
    standalone: ServerThread,
) -> None:
    def counts(clone: AsyncioClient) -> Callable[[CloneClient], tuple[int, int]]:
        return lambda client: (len(client._watchers), len(clone._watches))

    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            kept = clone.watch("/kept/")
            assert await in_agent(clone, counts(clone)) == (1, 1)
            async for event in clone.watch("/b/", state=True):
                assert event == ResyncEvent(standalone.servers[0], {})
                assert await in_agent(clone, counts(clone)) == (2, 2)
                break
            assert await in_agent(clone, counts(clone)) == (1, 1)
            await kept.aclose()
            assert await in_agent(clone, counts(clone)) == (0, 0)
            with pytest.raises(StopAsyncIteration):
                await anext(kept)

    run(main)


def test_closing_the_client_ends_a_watch_being_iterated(
    standalone: ServerThread,
) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            got: list[object] = []

            async def consume() -> str:
                async for event in clone.watch("/c/", state=True):
                    got.append(event)
                return "ended"

            consumer = asyncio.create_task(consume())
            await until(lambda: got, "the watch's first event")
            await clone.aclose()
            assert await consumer == "ended"
            assert got == [ResyncEvent(standalone.servers[0], {})]

    run(main)


def test_one_watch_is_iterated_by_one_task_at_a_time(nowhere: list[str]) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(nowhere, sync_timeout=None) as clone:
            watch = clone.watch("/")
            first = asyncio.create_task(anext(watch))
            await until(lambda: watch._taking, "the first task waiting")
            with pytest.raises(LocalProtocolError, match="another task"):
                await anext(watch)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first

    run(main)


# -- cancelling --------------------------------------------------------------


def test_a_cancelled_set_is_no_longer_tracked_nor_resent(nowhere: list[str]) -> None:
    """Cancelled, a write waiting for its confirmation is forgotten in the
    agent before ``CancelledError`` comes out (so not resent), whether by
    ``Task.cancel`` or by an ``asyncio.timeout``."""

    async def main() -> None:
        async with trioclone.aio.connect(nowhere, sync_timeout=None) as clone:
            writing = asyncio.create_task(clone.set("/k", "v", timeout=60))
            await until(lambda: tracked_writes(clone) == 2, "the write tracked")
            writing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await writing
            assert tracked_writes(clone) == 0
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await clone.set("/k", "v", timeout=60)
            assert tracked_writes(clone) == 0

    run(main)


def test_a_cancelled_watch_step_loses_no_event(standalone: ServerThread) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            watch = clone.watch("/cw/")
            for _ in range(3):  # cancelled while waiting in the agent
                step = asyncio.create_task(anext(watch))
                await until(lambda: watch._taking, "the step waiting")
                step.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await step
            a = await clone.set("/cw/a", "1")
            assert await anext(watch) == SetEvent("/cw/a", b"1", a)

    run(main)


# -- errors ------------------------------------------------------------------


def test_errors_cross_over_as_raised_in_the_agent(nowhere: list[str]) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(
            nowhere, subtree="/mine/", sync_timeout=None
        ) as clone:
            with pytest.raises(WriteTimeoutError, match=r"not confirmed within 0\.2 s"):
                await clone.set("/mine/k", "v", timeout=0.2)
            with pytest.raises(LocalProtocolError, match="timeout must be"):
                await clone.set("/mine/k", "v", timeout=0)
            with pytest.raises(LocalProtocolError, match="ttl must be"):
                await clone.set("/mine/k", "v", ttl=-1)
            with pytest.raises(LocalProtocolError, match="outside this client's"):
                await clone.set("/theirs/k", "v")
            assert tracked_writes(clone) == 0
            assert (clone.synced, clone.server) == (False, nowhere[0])

    run(main)


def test_a_closed_client_refuses_calls_and_fails_those_under_way(
    nowhere: list[str],
) -> None:
    async def main() -> None:
        clone = trioclone.aio.connect(nowhere, sync_timeout=None)
        with pytest.raises(ClientClosedError):  # not opened yet
            await clone.set("/k", "v")
        async with clone:
            writing = asyncio.create_task(clone.set("/k", "v", timeout=60))
            await until(lambda: tracked_writes(clone) == 2, "the write tracked")
        with pytest.raises(ClientClosedError):
            await writing
        with pytest.raises(ClientClosedError):
            await clone.set("/k", "v")
        with pytest.raises(ClientClosedError):
            clone.watch("/")
        with pytest.raises(ClientClosedError):
            clone.synced  # noqa: B018
        await clone.aclose()  # closing twice is harmless
        with pytest.raises(LocalProtocolError, match="opened already"):
            await clone.open()

    before = agent_threads()
    run(main)
    assert agent_threads() == before


def test_connect_without_a_server_raises_no_server_error(
    nowhere: list[str],
) -> None:
    async def main() -> None:
        with pytest.raises(NoServerError, match=r"within 0\.5 s"):
            async with trioclone.aio.connect(nowhere, sync_timeout=0.5):
                raise AssertionError("not reached")

    before = agent_threads()
    run(main)
    assert agent_threads() == before  # the agent was stopped and joined


def test_a_bad_server_address_raises_on_entry() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="not a server address"):
            async with trioclone.aio.connect(["tcp://127.0.0.1:notaport"]):
                raise AssertionError("not reached")

    run(main)


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf])
def test_connect_rejects_a_bad_sync_timeout(value: float) -> None:
    with pytest.raises(LocalProtocolError, match="sync_timeout"):
        trioclone.aio.connect(["tcp://127.0.0.1:9"], sync_timeout=value)


# -- failover ----------------------------------------------------------------


def test_the_client_carries_on_when_the_active_server_dies() -> None:
    """Kill the primary: a write awaited meanwhile is confirmed by the
    backup, and the watch shows it."""
    settings = tcp_pair(heartbeat=0.25, hugz_interval=0.25)
    with ServerThread(settings) as pair:

        async def main() -> None:
            async with trioclone.aio.connect(pair.servers, timings=QUICK) as clone:
                watch = clone.watch("/fo/")
                before = await clone.set("/fo/a", "1")
                assert await anext(watch) == SetEvent("/fo/a", b"1", before)
                assert clone.server == pair.servers[0]
                await asyncio.to_thread(pair.kill, 0)
                after = await clone.set("/fo/b", "2", timeout=20)
                assert (clone.server, clone.synced) == (pair.servers[1], True)
                assert clone.failovers >= 1
                assert clone.get("/fo/a") == b"1"
                assert clone.get("/fo/b") == b"2"
                # the watch shows it: as an update, or in the resync from
                # the backup if the backup applied it before the client synced
                seen: dict[str, bytes | None] = {"/fo/a": b"1"}
                while seen.get("/fo/b") != b"2":
                    event = await anext(watch)
                    if isinstance(event, ResyncEvent):
                        assert event.server == pair.servers[1]
                        seen.update(event.changes)
                    else:
                        assert event == SetEvent("/fo/b", b"2", after)
                        seen[event.key] = event.value
                assert seen == {"/fo/a": b"1", "/fo/b": b"2"}

        run(main)


# -- races: the agent held in a callback, so the order is fixed ------------


async def hold_agent(clone: AsyncioClient) -> threading.Event:
    """Block the agent thread until the returned event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(GUARD)

    clone._agent.run_soon(hold)
    await until(held.is_set, "the agent held")
    return release


@pytest.mark.parametrize("cancels", [1, 2])
def test_a_batch_taken_as_the_step_is_cancelled_is_kept(
    standalone: ServerThread, cancels: int
) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            watch = clone.watch("/r/")
            step = asyncio.create_task(anext(watch))
            await until(lambda: watch._taking, "the step waiting")
            await in_agent(clone, lambda c: None)
            release = await hold_agent(clone)
            event = SetEvent("/r/a", b"1", 1)
            client = clone._agent.client
            # an update the agent applies just as the cancel arrives
            clone._agent.run_soon(lambda: clone._watches[watch._id].put(event, client))
            for _ in range(cancels):
                step.cancel()
                await asyncio.sleep(0)
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await step
            async with asyncio.timeout(5):
                assert await anext(watch) == event

    run(main)


def test_a_set_cancelled_twice_is_forgotten_before_cancelled_error(
    nowhere: list[str],
) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(nowhere, sync_timeout=None) as clone:
            writing = asyncio.create_task(clone.set("/k", "v", timeout=60))
            await until(lambda: tracked_writes(clone) == 2, "the write tracked")
            release = await hold_agent(clone)
            writing.cancel()
            await asyncio.sleep(0)
            writing.cancel()
            asyncio.get_running_loop().call_soon(release.set)
            with pytest.raises(asyncio.CancelledError):
                await writing
            assert tracked_writes(clone) == 0

    run(main)


@pytest.mark.parametrize("phase", ["starting", "syncing"])
def test_a_cancelled_connect_leaves_no_agent_thread(
    nowhere: list[str], phase: str
) -> None:
    async def main() -> None:
        clone = trioclone.aio.connect(nowhere, sync_timeout=10)
        opening = asyncio.create_task(clone.open())
        if phase == "syncing":
            await until(lambda: clone._agent._client is not None, "the agent runs")
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert not clone._agent._thread.is_alive()

    before = agent_threads()
    run(main)
    assert agent_threads() == before


def test_an_agent_that_fails_is_not_silently_stale(
    standalone: ServerThread,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An internal error ends the agent: the client must not go on
    answering from a frozen map as if synced, and the error must show."""
    original = agent_module.CloneClient._deliver

    def failing(self: object, event: object) -> None:
        if getattr(event, "key", b"") == b"/boom":
            raise RuntimeError("agent bug")
        original(self, event)  # type: ignore[arg-type]

    monkeypatch.setattr(agent_module.CloneClient, "_deliver", failing)

    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            await clone.set("/a", "1")
            with contextlib.suppress(trioclone.ClientClosedError):
                await clone.set("/boom", "x")  # confirmed, then the agent fails
            await asyncio.to_thread(clone._agent._thread.join, GUARD)
            assert not clone._agent._thread.is_alive()
            assert "agent bug" in caplog.text
            with pytest.raises(trioclone.ClientClosedError):
                clone.synced  # noqa: B018

    run(main)


def test_a_set_cancelled_before_the_agent_began_it_is_not_sent(
    standalone: ServerThread,
) -> None:
    async def main() -> None:
        async with trioclone.aio.connect(standalone.servers) as clone:
            release = await hold_agent(clone)
            writing = asyncio.create_task(clone.set("/never", "x"))
            await asyncio.sleep(0)  # submitted: begin() waits in the agent
            writing.cancel()
            await asyncio.sleep(0)
            release.set()
            with pytest.raises(asyncio.CancelledError):
                await writing
            after = await clone.set("/after", "y")
            assert clone.get("/never") is None, after

    run(main)


# -- in an ASGI application ----------------------------------------------------


def test_a_starlette_app_reads_and_writes_the_map_through_the_client(
    standalone: ServerThread,
) -> None:
    """A FastAPI-style app: the client is opened in the app's lifespan; a
    GET handler reads a key and a PUT handler awaits a write."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        async with trioclone.aio.connect(standalone.servers) as clone:
            app.state.clone = clone
            yield

    async def read(request: Request) -> Response:
        clone: AsyncioClient = request.app.state.clone
        value = clone.get("/app/" + request.path_params["key"])
        if value is None:
            return PlainTextResponse("no such key", status_code=404)
        return PlainTextResponse(value)

    async def write(request: Request) -> Response:
        clone: AsyncioClient = request.app.state.clone
        key = "/app/" + request.path_params["key"]
        sequence = await clone.set(key, await request.body())
        return JSONResponse({"sequence": sequence})

    app = Starlette(
        routes=[
            Route("/keys/{key:path}", read, methods=["GET"]),
            Route("/keys/{key:path}", write, methods=["PUT"]),
        ],
        lifespan=lifespan,
    )
    with trioclone.connect(standalone.servers) as other:
        other.set("/app/greeting", "hello")

    async def main() -> int:
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://app") as http,
        ):
            got = await http.get("/keys/greeting")
            assert (got.status_code, got.text) == (200, "hello")
            assert (await http.get("/keys/missing")).status_code == 404
            put = await http.put("/keys/colour", content=b"blue")
            assert put.status_code == 200
            got = await http.get("/keys/colour")
            assert (got.status_code, got.text) == (200, "blue")
            sequence: int = put.json()["sequence"]
            return sequence

    sequence = run(main)
    with trioclone.connect(standalone.servers) as other:
        assert other.get("/app/colour") == b"blue"
        assert other.sequence >= sequence


# -- the README's example ------------------------------------------------------

README = Path(__file__).parents[2] / "README.md"
README_SERVERS = 'SERVERS = ["tcp://localhost:5556", "tcp://localhost:5566"]'


def readme_asyncio_example() -> str:
    """The README's code block that uses ``trioclone.aio``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    (example,) = [b for b in blocks if "trioclone.aio.connect" in b]
    return example


@pytest.mark.slow
def test_the_readme_asyncio_example_runs(standalone: ServerThread) -> None:
    """Run as a program against a server: it writes, prints, then prints
    what changes under /config/ until it is stopped."""
    example = readme_asyncio_example()
    assert example.count(README_SERVERS) == 1
    code = example.replace(README_SERVERS, f"SERVERS = {standalone.servers!r}")
    program = subprocess.Popen(
        [sys.executable, "-u", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in program.stdout or []:
            lines.put(line)
        lines.put("")  # the program ended

    reader = threading.Thread(target=read)
    reader.start()
    try:
        written = lines.get(timeout=GUARD)
        assert written, program.communicate(timeout=GUARD)[1]  # its traceback
        sequence, rest = written.split(" ", 1)
        assert rest == "b'db1.internal' [('/config/db-host', b'db1.internal')]\n"
        with trioclone.connect(standalone.servers) as other:
            assert other.get("/config/db-host") == b"db1.internal"
            assert other.sequence >= int(sequence)
            event = None
            for attempt in range(50):  # until the program's watch is running
                other.set("/config/probe", f"{attempt}")
                try:
                    event = lines.get(timeout=0.2)
                    break
                except queue.Empty:
                    continue
            assert event is not None, "the program printed no change"
            shown = r"SetEvent\(key='/config/probe', value=b'\d+', sequence=\d+\)\n"
            assert re.fullmatch(shown, event), event
            last = other.set("/config/last", "x")
            while (event := lines.get(timeout=GUARD)).startswith(
                "SetEvent(key='/config/probe'"
            ):
                continue  # (probes still in flight)
            assert event == f"{SetEvent('/config/last', b'x', last)!r}\n"
    finally:
        program.terminate()
        try:
            program.wait(10)
        except subprocess.TimeoutExpired:
            program.kill()
            program.wait()
        reader.join(10)
        for stream in (program.stdout, program.stderr):
            if stream is not None:
                stream.close()
