"""The console's HTTP API (``trioclone console``) against a server in-process.

A standalone ``CloneServer`` on loopback TCP and ``serve_console`` (its own
Trio client and Hypercorn on port 0) run in the test's nursery; the test
talks to it with ``httpx.AsyncClient`` (Trio, through anyio) and checks the
map with a separate Trio client or the server's own store.  Real clock,
as Hypercorn's sockets are real: every wait is bounded by ``GUARD`` and
waits on what shows its condition (a reply, an event on the stream).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import zmq

from tests.integration.procs import free_ports
from tests.shells.pair import Running
from tests.shells.test_relay import FAST_CLIENT, restart, standalone
from trioclone import open_client
from trioclone.cli import main
from trioclone.console.app import HEADERS, MAX_BODY, MAX_LIMIT
from trioclone.console.listing import SHOWN_BYTES
from trioclone.console.serve import check_bind, serve_console
from trioclone.endpoints import Endpoints
from trioclone.errors import ConfigError

GUARD = 20.0  # real seconds
JSON = {"Content-Type": "application/json"}


@dataclass
class Site:
    """A console of a running server, and an HTTP client of it."""

    http: httpx.AsyncClient
    url: str
    server: Running
    bind: Endpoints
    nursery: trio.Nursery

    @property
    def stored(self) -> int:
        """The server's sequence: it moves with every write it applies."""
        return self.server.server.core.store.sequence

    async def tree(self, **params: Any) -> dict[str, Any]:
        reply = await self.http.get("api/tree", params=params)
        assert reply.status_code == 200, reply.text
        result: dict[str, Any] = reply.json()
        return result

    async def set(self, **body: Any) -> httpx.Response:
        return await self.http.post("api/set", json=body)

    async def delete(self, key: str) -> httpx.Response:
        return await self.http.post("api/delete", json={"key": key})

    async def row(self, key: str) -> dict[str, Any] | None:
        listing = await self.tree(filter=key)
        rows = [r for r in listing["rows"] if r["k"] == key]
        return rows[0] if rows else None

    async def until(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read the whole listing until ``check`` holds of it (bounded)."""
        while True:
            listing = await self.tree(limit=MAX_LIMIT)
            if check(listing):
                return listing
            await trio.sleep(0.02)


@asynccontextmanager
async def console_site(ctx: zmq.Context[Any], **options: Any) -> AsyncIterator[Site]:
    """A standalone server and a console of it, synced; both stop after."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            bind = server.server.settings.bind
            url = await nursery.start(partial(serve_console, [bind], port=0, **options))
            async with httpx.AsyncClient(base_url=url) as http:
                site = Site(http, url, server, bind, nursery)
                await site.until(lambda listing: listing["state"]["synced"])
                yield site
            nursery.cancel_scope.cancel()


@pytest.fixture
async def site(ctx: zmq.Context[Any]) -> AsyncIterator[Site]:
    async with console_site(ctx) as running:
        yield running


async def read_back(site: Site, key: str) -> bytes | None:
    """``key`` as a separate client, synced from the server now, sees it."""
    async with open_client([site.bind], timings=FAST_CLIENT) as clone:
        await clone.wait_synced()
        return clone.get(key)


async def write(site: Site, items: dict[str | bytes, bytes], **options: Any) -> None:
    async with open_client([site.bind], timings=FAST_CLIENT) as clone:
        await clone.wait_synced()
        for key, value in items.items():
            await clone.set(key, value, **options)


class Events:
    """The Server-Sent Events of ``/api/events``, one (name, data) at a time.

    Read over a plain TCP stream as HTTP/1.0 (the body then ends only with
    the connection, unchunked): httpx's streamed body is a chain of async
    generators that cannot all be closed when a test stops reading an
    endless stream, and Trio warns of each one left unfinished.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.headers: dict[str, str] = {}

    async def _line(self) -> str:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                raise AssertionError("the event stream ended")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.rstrip(b"\r").decode()

    async def open(self, host: str) -> None:
        await self._stream.send_all(
            f"GET /api/events HTTP/1.0\r\nHost: {host}\r\n\r\n".encode()
        )
        status = await self._line()
        assert status.split()[1] == "200", status
        while line := await self._line():
            name, _, value = line.partition(":")
            self.headers[name.lower()] = value.strip()

    async def next(self) -> tuple[str, dict[str, Any]]:
        name, data = "", ""
        while True:
            line = await self._line()
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
            elif not line and name:
                return name, json.loads(data)

    async def until(
        self, check: Callable[[str, dict[str, Any]], bool]
    ) -> dict[str, Any]:
        while True:
            name, data = await self.next()
            if check(name, data):
                return data


@asynccontextmanager
async def events(site: Site) -> AsyncIterator[Events]:
    """A page's event stream, past the console's first sync; it leaves
    when the block ends.

    The first sync makes the feed tell pages to reload, at its next tick,
    and that reload stands for every change of the same tick: a write is
    made and seen in a batch first, so the test's own changes come as rows.
    """
    url = httpx.URL(site.url)
    assert url.host and url.port
    async with await trio.open_tcp_stream(url.host, url.port) as stream:
        reader = Events(stream)
        await reader.open(f"{url.host}:{url.port}")
        assert reader.headers["content-type"].startswith("text/event-stream")
        assert reader.headers["cache-control"] == "no-store"
        name, _ = await reader.next()
        assert name == "status"
        assert (await site.set(key="/settled", value="v")).status_code == 200
        await reader.until(
            lambda name, data: (
                name == "batch"
                and (data["reload"] or any(r["k"] == "/settled" for r in data["rows"]))
            )
        )
        yield reader


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


async def test_the_tree_lists_folders_and_rows_under_a_prefix(site: Site) -> None:
    await write(
        site,
        {"/app/db/host": b"db1", "/app/db/port": b"5432", "/app/name": b"shop"},
    )
    await site.until(lambda listing: listing["state"]["keys"] == 3)
    root = await site.tree()
    assert root["folders"] == [["/app/", 3]]
    assert root["rows"] == []
    assert (root["total"], root["leaves"]) == (3, 0)
    app = await site.tree(prefix="/app/")
    assert app["prefix"] == "/app/"
    assert app["folders"] == [["/app/db/", 2]]
    [row] = app["rows"]
    assert row == {"k": "/app/name", "s": row["s"], "n": 4, "v": "shop", "e": "text"}
    assert (app["total"], app["leaves"]) == (3, 1)
    assert app["state"]["synced"] is True
    assert app["state"]["server"] == str(site.bind.snapshot)


async def test_the_tree_filter_lists_matches_flat_and_the_limit_cuts(
    site: Site,
) -> None:
    await write(site, {f"/k/{i}/Port": str(i).encode() for i in range(5)})
    await site.until(lambda listing: listing["state"]["keys"] == 5)
    found = await site.tree(filter="port", limit=2)
    assert found["folders"] == []
    assert [r["k"] for r in found["rows"]] == ["/k/0/Port", "/k/1/Port"]
    assert (found["total"], found["leaves"]) == (5, 5)
    assert found["filter"] == "port"
    assert (await site.tree(filter="nothing"))["total"] == 0


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("many", "limit must be a whole number, got 'many'"),
        ("0", f"limit must be 1 to {MAX_LIMIT}, got 0"),
        (str(MAX_LIMIT + 1), f"limit must be 1 to {MAX_LIMIT}, got {MAX_LIMIT + 1}"),
        ("-3", f"limit must be 1 to {MAX_LIMIT}, got -3"),
    ],
)
async def test_a_bad_limit_is_refused(site: Site, limit: str, message: str) -> None:
    reply = await site.http.get("api/tree", params={"limit": limit})
    assert reply.status_code == 400
    assert reply.json() == {"error": message}


async def test_a_key_is_read_whole(site: Site) -> None:
    long = "é" * SHOWN_BYTES  # twice SHOWN_BYTES bytes: a row holds part of it
    await write(site, {"long": long.encode()})
    await site.until(lambda listing: listing["state"]["keys"] == 1)
    row = await site.row("long")
    assert row is not None
    assert row["cut"] is True
    assert len(row["v"]) == SHOWN_BYTES // 2
    reply = await site.http.get("api/key", params={"key": "long"})
    assert reply.status_code == 200
    whole = reply.json()
    assert whole == {
        "k": "long",
        "s": row["s"],
        "n": 2 * SHOWN_BYTES,
        "v": long,
        "e": "text",
    }


@pytest.mark.parametrize(
    "value",
    [
        b"a" * SHOWN_BYTES + b"\xff",  # text up to the cut, not UTF-8 after it
        b"a" * SHOWN_BYTES + b"\x1b[0m",  # a control character after the cut
    ],
)
async def test_a_long_value_that_is_text_only_up_to_the_cut_is_read_as_base64(
    site: Site, value: bytes
) -> None:
    await write(site, {"mixed": value})
    await site.until(lambda listing: listing["state"]["keys"] == 1)
    row = await site.row("mixed")
    assert row is not None
    assert (row["e"], row["cut"]) == ("text", True)
    reply = await site.http.get("api/key", params={"key": "mixed"})
    assert reply.status_code == 200, reply.text
    whole = reply.json()
    assert whole["e"] == "base64"
    assert base64.b64decode(whole["v"]) == value


async def test_a_missing_key_is_404(site: Site) -> None:
    reply = await site.http.get("api/key", params={"key": "nope"})
    assert reply.status_code == 404
    assert reply.json() == {"error": "'nope': no such key"}


async def test_a_key_that_is_not_utf8_is_listed_and_deleted(site: Site) -> None:
    """Keys are bytes; one that is not UTF-8 (written by another client)
    is shown as text with surrogate escapes (in JSON, ``\\udcff``)."""
    await write(site, {b"raw/\xff": b"v"})
    await site.until(lambda listing: listing["state"]["keys"] == 1)
    assert (await site.tree())["folders"] == [["raw/", 1]]
    listing = await site.tree(prefix="raw/")
    assert [r["k"] for r in listing["rows"]] == ["raw/\udcff"]
    # and the page can delete it by that name (JSON.stringify escapes it)
    reply = await site.http.post(
        "api/delete", content=json.dumps({"key": "raw/\udcff"}), headers=JSON
    )
    assert reply.status_code == 200, reply.text
    assert await read_back(site, "raw/\udcff") is None


async def test_a_key_that_is_not_utf8_is_named_in_a_query_by_its_bytes(
    site: Site,
) -> None:
    """A query names such a key (or a prefix, or a filter) by its bytes
    percent-encoded (``%FF``), as the page sends them: not as U+FFFD."""
    await write(site, {b"raw/\xff/k\xfe": b"v", b"raw/\xef\xbf\xbd/k": b"w"})
    await site.until(lambda listing: listing["state"]["keys"] == 2)
    reply = await site.http.get("api/key?key=raw%2F%FF%2Fk%FE")
    assert reply.status_code == 200, reply.text
    assert (reply.json()["k"], reply.json()["v"]) == ("raw/\udcff/k\udcfe", "v")
    reply = await site.http.get("api/tree?prefix=raw%2F%FF%2F")
    assert [r["k"] for r in reply.json()["rows"]] == ["raw/\udcff/k\udcfe"]
    reply = await site.http.get("api/tree?prefix=raw%2F&filter=%FE")
    assert [r["k"] for r in reply.json()["rows"]] == ["raw/\udcff/k\udcfe"]
    # and UTF-8 is read as UTF-8 (U+FFFD here is a real key)
    reply = await site.http.get("api/tree", params={"prefix": "raw/\ufffd/"})
    assert [r["k"] for r in reply.json()["rows"]] == ["raw/\ufffd/k"]


async def test_the_config_says_what_the_page_may_do(ctx: zmq.Context[Any]) -> None:
    async with console_site(ctx, read_only=True, subtree="/app/") as site:
        reply = await site.http.get("api/config")
        config = reply.json()
        assert config["read_only"] is True
        assert config["subtree"] == "/app/"
        assert config["servers"] == [str(site.bind)]


async def test_the_page_and_its_files_are_served_with_the_security_headers(
    site: Site,
) -> None:
    for path, kind in [
        ("", "text/html"),
        ("static/console.js", "javascript"),
        ("static/console.css", "text/css"),
        ("api/tree", "application/json"),
        ("api/key?key=nope", "application/json"),  # an error, too
    ]:
        reply = await site.http.get(path)
        assert kind in reply.headers["content-type"], path
        for name, value in HEADERS.items():
            assert reply.headers[name] == value, (path, name)
    assert "<html" in (await site.http.get("")).text.lower()
    assert (await site.http.get("static/nothing.js")).status_code == 404


@pytest.mark.parametrize("host", ["evil.example", "127.0.0.1.nip.io", "10.0.0.1"])
async def test_a_host_that_is_not_loopback_is_refused_on_a_loopback_bind(
    site: Site, host: str
) -> None:
    """A web page cannot reach the console through a DNS name of 127.0.0.1."""
    reply = await site.http.get("api/tree", headers={"Host": host})
    assert reply.status_code == 400
    assert reply.text == "Invalid host header"
    before = site.stored
    reply = await site.http.post(
        "api/set", json={"key": "k", "value": "v"}, headers={"Host": host}
    )
    assert reply.status_code == 400
    assert site.stored == before


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
async def test_loopback_hosts_are_served(site: Site, host: str) -> None:
    port = httpx.URL(site.url).port
    reply = await site.http.get("api/tree", headers={"Host": f"{host}:{port}"})
    assert reply.status_code == 200


async def test_a_console_bound_to_another_loopback_address_serves_it(
    ctx: zmq.Context[Any],
) -> None:
    """Any 127.x.y.z may be bound writable: the page names it as its host."""
    async with console_site(ctx, host="127.5.6.7") as site:
        assert httpx.URL(site.url).host == "127.5.6.7"
        assert (await site.http.get("api/config")).status_code == 200
        reply = await site.http.get("api/tree", headers={"Host": "127.5.6.8"})
        assert reply.status_code == 400


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


async def test_a_set_is_confirmed_with_its_sequence_and_seen_by_other_clients(
    site: Site,
) -> None:
    reply = await site.set(key="/a/greeting", value="hello ✓")
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["key"] == "/a/greeting"
    assert answer["sequence"] == site.stored
    assert await read_back(site, "/a/greeting") == "hello ✓".encode()
    listing = await site.until(lambda listing: listing["state"]["keys"] == 1)
    assert listing["state"]["sequence"] == answer["sequence"]


async def test_a_delete_is_confirmed_and_the_key_is_gone(site: Site) -> None:
    await write(site, {"doomed": b"x"})
    await site.until(lambda listing: listing["state"]["keys"] == 1)
    reply = await site.delete("doomed")
    assert reply.status_code == 200
    assert reply.json() == {"key": "doomed", "sequence": site.stored}
    assert await read_back(site, "doomed") is None
    await site.until(lambda listing: listing["state"]["keys"] == 0)
    missing = await site.http.get("api/key", params={"key": "doomed"})
    assert missing.status_code == 404


@pytest.mark.parametrize(
    ("value", "encoding", "stored"),
    [
        ("AP8Q", "base64", b"\x00\xff\x10"),
        ("00ff10", "hex", b"\x00\xff\x10"),
        ("00 FF 10", "hex", b"\x00\xff\x10"),
        ("bin\x00ary", "text", b"bin\x00ary"),
    ],
)
async def test_a_binary_value_is_written_by_its_encoding_and_read_as_base64(
    site: Site, value: str, encoding: str, stored: bytes
) -> None:
    reply = await site.set(key="bin", value=value, encoding=encoding)
    assert reply.status_code == 200, reply.text
    assert await read_back(site, "bin") == stored
    await site.until(lambda listing: listing["state"]["keys"] == 1)
    whole = (await site.http.get("api/key", params={"key": "bin"})).json()
    assert whole["e"] == "base64"
    assert base64.b64decode(whole["v"]) == stored
    assert whole["n"] == len(stored)


async def test_a_ttl_counts_down_in_the_rows_and_the_key_expires(
    site: Site,
) -> None:
    reply = await site.set(key="short", value="v", ttl=30)
    assert reply.status_code == 200
    first = await site.until(lambda listing: listing["state"]["keys"] == 1)
    [row] = first["rows"]
    assert 29 < row["t"] <= 30
    # the next reads count down from it (the deadline is fixed, not re-read)
    later = await site.until(lambda listing: listing["rows"][0]["t"] < row["t"])
    assert row["t"] - 1 < later["rows"][0]["t"] < row["t"]
    assert (await site.http.get("api/key", params={"key": "short"})).json()["t"] <= (
        later["rows"][0]["t"]
    )
    # a key with no TTL has none in its row
    assert (await site.set(key="forever", value="v")).status_code == 200
    forever = await site.row("forever")
    assert forever is not None
    assert "t" not in forever
    # a short TTL: the server deletes it, and the console follows
    async with events(site) as stream:
        reply = await site.set(key="brief", value="v", ttl=0.3)
        assert reply.status_code == 200
        batch = await stream.until(
            lambda name, data: (
                name == "batch"
                and any(r["k"] == "brief" and r.get("d") for r in data["rows"])
            )
        )
    assert batch["state"]["keys"] == 3  # with events()'s own key


# --------------------------------------------------------------------------
# refused writes: a clear reason, nothing written
# --------------------------------------------------------------------------


async def refused(
    site: Site, path: str, status: int, message: str, **request: Any
) -> None:
    before = site.stored
    reply = await site.http.post(path, **request)
    assert reply.status_code == status, reply.text
    assert reply.json() == {"error": message}
    assert site.stored == before
    listing = await site.tree()
    assert listing["state"]["sequence"] == before


async def test_a_read_only_console_refuses_writes(ctx: zmq.Context[Any]) -> None:
    async with console_site(ctx, read_only=True) as site:
        for path in ("api/set", "api/delete"):
            await refused(
                site,
                path,
                403,
                "this console is read-only (--read-only)",
                json={"key": "k", "value": "v"},
            )


@pytest.mark.parametrize("path", ["api/set", "api/delete"])
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded"]
)
async def test_a_write_that_is_not_json_is_refused(
    site: Site, path: str, content_type: str | None
) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    await refused(
        site,
        path,
        415,
        "a write is a JSON request (Content-Type: application/json)",
        content=b'{"key": "k", "value": "v"}',
        headers=headers,
    )


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "https://127.0.0.1:{port}", "http://127.0.0.1"],
)
async def test_a_write_from_another_origin_is_refused(site: Site, origin: str) -> None:
    origin = origin.format(port=httpx.URL(site.url).port)
    await refused(
        site,
        "api/set",
        403,
        f"a write from another site ({origin}) is refused",
        json={"key": "k", "value": "v"},
        headers={"Origin": origin},
    )


async def test_a_write_from_the_consoles_own_origin_is_served(site: Site) -> None:
    origin = site.url.rstrip("/")
    reply = await site.http.post(
        "api/set", json={"key": "k", "value": "v"}, headers={"Origin": origin}
    )
    assert reply.status_code == 200
    assert await read_back(site, "k") == b"v"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{nope", "the request is not JSON: "),
        (b"", "the request is not JSON: "),
        (b"\xff\xfe", "the request is not JSON: "),
        (b"[1, 2]", "the request is not a JSON object"),
        (b'"key"', "the request is not a JSON object"),
        (b"null", "the request is not a JSON object"),
    ],
)
async def test_a_write_whose_body_is_not_a_json_object_is_refused(
    site: Site, body: bytes, message: str
) -> None:
    before = site.stored
    reply = await site.http.post("api/set", content=body, headers=JSON)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(message)
    assert site.stored == before


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"value": "v"}, "key: a non-empty string is needed"),
        ({"key": "", "value": "v"}, "key: a non-empty string is needed"),
        ({"key": 5, "value": "v"}, "key: a non-empty string is needed"),
        ({"key": "k"}, "value: a string is needed"),
        ({"key": "k", "value": 5}, "value: a string is needed"),
        ({"key": "k", "value": ""}, "value: an empty value is a delete (use Delete)"),
        (
            {"key": "k", "value": "", "encoding": "hex"},
            "value: an empty value is a delete (use Delete)",
        ),
        (
            {"key": "k", "value": "abc", "encoding": "base64"},
            "value: not valid base64 (Incorrect padding)",
        ),
        (
            {"key": "k", "value": "ab!=", "encoding": "base64"},
            "value: not valid base64 (Only base64 data is allowed)",
        ),
        (
            {"key": "k", "value": "0g", "encoding": "hex"},
            "value: not valid hex (non-hexadecimal number found in fromhex() "
            "arg at position 1)",
        ),
        (
            {"key": "k", "value": "v", "encoding": "rot13"},
            "encoding: text, base64 or hex, not 'rot13'",
        ),
        (
            {"key": "k", "value": "v", "encoding": None},
            "encoding: text, base64 or hex, not None",
        ),
        (
            {"key": "k", "value": "v", "ttl": 0},
            "ttl must be a finite number of seconds, at least 0.001 (shorter goes out as 0, which means never), got 0.0",
        ),
        (
            {"key": "k", "value": "v", "ttl": -5},
            "ttl must be a finite number of seconds, at least 0.001 (shorter goes out as 0, which means never), got -5.0",
        ),
        ({"key": "k", "value": "v", "ttl": "5"}, "ttl: a number of seconds, got '5'"),
        ({"key": "k", "value": "v", "ttl": True}, "ttl: a number of seconds, got True"),
        ({"key": "k", "value": "v", "ttl": [5]}, "ttl: a number of seconds, got [5]"),
        # sent as ttl=0.000000, which servers read as "never expires"
        (
            {"key": "k", "value": "v", "ttl": 1e-7},
            "ttl must be a finite number of seconds, at least 0.001 (shorter goes out as 0, which means never), got 1e-07",
        ),
        ({"key": "HUGZ", "value": "v"}, "b'HUGZ' is a reserved key"),
        ({"key": "KTHXBAI", "value": "v"}, "b'KTHXBAI' is a reserved key"),
    ],
)
async def test_a_bad_set_is_refused_with_its_reason(
    site: Site, body: dict[str, Any], message: str
) -> None:
    await refused(site, "api/set", 400, message, json=body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"key": "k", "value": "v", "ttl": NaN}',
            "ttl must be a finite number of seconds, at least 0.001 (shorter goes out as 0, which means never), got nan",
        ),
        (
            b'{"key": "k", "value": "v", "ttl": Infinity}',
            "ttl must be a finite number of seconds, at least 0.001 (shorter goes out as 0, which means never), got inf",
        ),
        (
            b'{"key": "k", "value": "\\ud800"}',
            "value: not valid text ('utf-8' codec can't encode character '\\ud800' "
            "in position 0: surrogates not allowed)",
        ),
        (b'{"key": "\\ud800", "value": "v"}', "key: not a valid key ('\\ud800')"),
    ],
)
async def test_json_that_python_reads_but_is_no_value_is_refused(
    site: Site, body: bytes, message: str
) -> None:
    await refused(site, "api/set", 400, message, content=body, headers=JSON)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "key: a non-empty string is needed"),
        ({"key": ""}, "key: a non-empty string is needed"),
        ({"key": "HUGZ"}, "b'HUGZ' is a reserved key"),
    ],
)
async def test_a_bad_delete_is_refused_with_its_reason(
    site: Site, body: dict[str, Any], message: str
) -> None:
    await refused(site, "api/delete", 400, message, json=body)


async def test_a_write_outside_the_consoles_subtree_is_refused(
    ctx: zmq.Context[Any],
) -> None:
    async with console_site(ctx, subtree="/app/") as site:
        before = site.stored
        reply = await site.set(key="/other/k", value="v")
        assert reply.status_code == 400
        assert "outside this client's subtrees" in reply.json()["error"]
        assert site.stored == before
        assert (await site.set(key="/app/k", value="v")).status_code == 200


async def test_a_write_request_over_max_body_is_refused(site: Site) -> None:
    filler = b"a" * (MAX_BODY + 1 - len(b'{"key": "big", "value": ""}'))
    body = b'{"key": "big", "value": "' + filler + b'"}'
    assert len(body) == MAX_BODY + 1
    before = site.stored
    reply = await site.http.post("api/set", content=body, headers=JSON)
    assert reply.status_code == 413
    assert reply.json() == {"error": f"a write request is at most {MAX_BODY} bytes"}
    assert site.stored == before
    assert await read_back(site, "big") is None


# --------------------------------------------------------------------------
# the event stream
# --------------------------------------------------------------------------


async def test_the_event_stream_starts_with_a_status_and_sends_writes_in_batches(
    site: Site,
) -> None:
    async with events(site) as stream:
        status = await stream.until(lambda name, data: name == "status")
        assert status["state"]["synced"] is True
        assert len(status["rates"]) == 60
        assert isinstance(status["servers"], list)
        reply = await site.set(key="/live/k", value="hello")
        sequence = reply.json()["sequence"]
        batch = await stream.until(
            lambda name, data: (
                name == "batch" and any(r["k"] == "/live/k" for r in data["rows"])
            )
        )
        [row] = [r for r in batch["rows"] if r["k"] == "/live/k"]
        assert row == {"k": "/live/k", "s": sequence, "n": 5, "v": "hello", "e": "text"}
        assert batch["reload"] is False
        assert batch["state"]["sequence"] >= sequence
        assert batch["state"]["updates"] >= 1
        await site.delete("/live/k")
        batch = await stream.until(
            lambda name, data: (
                name == "batch" and any(r["k"] == "/live/k" for r in data["rows"])
            )
        )
        assert next(r for r in batch["rows"] if r["k"] == "/live/k")["d"] == 1


async def test_the_status_says_each_servers_status(site: Site) -> None:
    async with events(site) as stream:
        status = await stream.until(
            lambda name, data: name == "status" and data["servers"] != []
        )
    [server] = status["servers"]
    assert server["server"] == str(site.bind)
    assert server["error"] is None
    assert server["in_use"] is True


async def test_a_resync_tells_pages_to_reload_with_the_news(
    ctx: zmq.Context[Any],
) -> None:
    async with console_site(ctx) as site:
        await write(site, {"old": b"1"})
        await site.until(lambda listing: listing["state"]["keys"] == 1)
        async with events(site) as stream:
            site.server.kill()
            await site.server.stopped.wait()
            site.server = await restart(site.nursery, ctx, site.bind)  # a new map
            batch = await stream.until(
                lambda name, data: name == "batch" and data["reload"]
            )
            news = await stream.until(
                lambda name, data: data["state"]["news"] is not None
            )
        assert batch["rows"] == []
        assert "resynced with" in news["state"]["news"]["text"]
        listing = await site.until(lambda listing: listing["state"]["keys"] == 0)
        assert listing["state"]["news"] is not None


async def test_a_page_opened_after_another_left_gets_the_batches(site: Site) -> None:
    async with events(site):
        pass
    async with events(site) as stream:
        reply = await site.set(key="after", value="v")
        assert reply.status_code == 200
        await stream.until(
            lambda name, data: (
                name == "batch" and any(r["k"] == "after" for r in data["rows"])
            )
        )


# --------------------------------------------------------------------------
# binding and the command
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "::1", "[::1]", "127.5.6.7"]
)
def test_a_loopback_bind_may_write(host: str) -> None:
    check_bind(host, read_only=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.2", "example.com"])
def test_a_bind_beyond_loopback_needs_read_only(host: str) -> None:
    with pytest.raises(ConfigError, match=f"--bind {host} would let anyone"):
        check_bind(host, read_only=False)
    check_bind(host, read_only=True)


def test_the_console_command_refuses_a_writable_bind_beyond_loopback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["console", "--bind", "0.0.0.0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--bind 0.0.0.0 would let anyone who reaches it write the map" in err
    assert "add --read-only" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_the_console_command_on_a_taken_port_exits_1_saying_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        [nobody] = free_ports(1)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "trioclone",
                "console",
                "--port",
                str(port),
                "--server",
                f"tcp://127.0.0.1:{nobody}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert "cannot start the console" in done.stderr
    assert "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr
    assert "console at" not in done.stdout
