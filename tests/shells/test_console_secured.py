"""The console in front of a CURVE-secured server (tcp on 127.0.0.1, real
clock, every wait bounded): it reads, writes and asks for status with its
own client key, and shows a write the server refuses as refused."""

from __future__ import annotations

from functools import partial

import httpx
import trio

from tests.shells.test_security import GUARD, Keys, keys, secured, serving
from trioclone.console.serve import serve_console

__all__ = ["keys"]  # the fixture


async def test_the_console_uses_its_own_client_key(keys: Keys) -> None:
    settings = secured(keys, '[clients.console]\nwrite = ["config/"]\n')
    console_key = keys.client("console")
    with trio.fail_after(GUARD):
        async with serving(settings) as server, trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(serve_console, [settings.bind], port=0, curve=console_key)
            )
            async with httpx.AsyncClient(base_url=url) as http:
                written = await http.post(
                    "/api/set", json={"key": "config/colour", "value": "blue"}
                )
                assert written.status_code == 200, written.text
                assert server.core.store.get(b"config/colour") is not None

                refused = await http.post(
                    "/api/set", json={"key": "secret/x", "value": "1"}
                )
                assert refused.status_code == 403
                assert refused.json()["error"].startswith("refused by the server:")
                assert server.core.store.get(b"secret/x") is None

                tree = (await http.get("/api/tree")).json()
                assert tree["folders"] == [["config/", 1]]
                assert tree["state"]["synced"]

                status = await first_event(url, "status")
                assert '"state":"ACTIVE"' in status, status
                assert '"error":null' in status, status
            nursery.cancel_scope.cancel()
    assert server.core.stats["auth_denied"] == 0


async def first_event(url: str, name: str) -> str:
    """The data of the first ``name`` event on ``url``'s event stream, read
    over a plain TCP stream (httpx leaves its stream generators unclosed
    when a test stops reading an endless response)."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            f"GET /api/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        received = b""
        while True:
            chunk = await stream.receive_some()
            assert chunk, "the event stream ended"
            received += chunk
            marker = f"event: {name}\ndata: ".encode()
            start = received.find(marker)
            if start >= 0 and (end := received.find(b"\n", start + len(marker))) > 0:
                return received[start + len(marker) : end].decode()
