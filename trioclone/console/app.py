"""The console's HTTP surface: one static page, a JSON API and an event stream.

* ``GET /``, ``/static/...``: the page (HTML, CSS, JavaScript; no CDN).
* ``GET /api/config``: whether writes are allowed, the servers, the subtree.
* ``GET /api/tree?prefix=&filter=&limit=``: folders and rows under a prefix
  (``total`` keys under it, ``leaves`` of them directly, ``rows`` at most
  ``limit`` of those; ``subfolders`` folders, ``folders`` at most ``limit``).
* ``GET /api/key?key=``: one key's whole value.
* ``GET /api/events``: Server-Sent Events: ``batch`` (changed rows, the
  client's state) every tick with news, ``status`` (each server's status,
  the updates-per-second history) every second.
* ``POST /api/set`` ``{key, value, encoding, ttl}`` and ``POST /api/delete``
  ``{key}``: confirmed writes; the answer holds the sequence or the error.

Writes are refused with ``--read-only``.  A write must be JSON, and from the
console's own page if the browser says where it comes from (``Origin``), so
another site open in the same browser cannot write (a cross-site form
cannot send JSON, and a cross-site ``fetch`` of JSON is not allowed to).
On loopback, requests must name a loopback host, so a web page cannot reach
the console through a DNS name that points at 127.0.0.1.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import aclosing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import trio
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from trioclone.client.events import key_bytes
from trioclone.console.hub import Console
from trioclone.console.listing import entry_row, list_prefix
from trioclone.errors import (
    ClientClosedError,
    LocalProtocolError,
    PermissionDeniedError,
    WriteTimeoutError,
)

log = logging.getLogger("trioclone.console")

STATIC = Path(__file__).parent / "static"
#: Rows a listing may ask for at most.
MAX_LIMIT = 5000
#: The largest write request accepted (its value is base64 or hex at worst).
MAX_BODY = 8 * 1024 * 1024
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGI = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class Json(JSONResponse):
    """JSON in ASCII: a key that is not UTF-8 is text with lone surrogates
    (``key_text``), which JSON escapes (``\\udcff``) and UTF-8 cannot hold;
    the page sends the same escapes back to write or delete it."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


class BadRequest(Exception):
    """A request the console refuses; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def build_app(console: Console, *, loopback: bool, host: str = "127.0.0.1") -> ASGI:
    """The console's ASGI app, serving ``console`` bound to ``host``."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def config(request: Request) -> Response:
        return Json(console.config())

    async def tree(request: Request) -> Response:
        params = _query(request)
        prefix, text = params.get("prefix", ""), params.get("filter", "")
        limit = _limit(params.get("limit", "500"))
        clone, now = console.clone, trio.current_time()
        listing = list_prefix(clone.view(prefix), prefix, text, limit)
        rows = []
        for key in listing.keys:
            entry = clone.entry(key)
            if entry is not None:
                rows.append(entry_row(key, entry, console.ttl_left(key, entry, now)))
        return Json(
            {
                "prefix": prefix,
                "filter": text,
                "folders": listing.folders,
                "subfolders": listing.subfolders,
                "rows": rows,
                "total": listing.total,
                "leaves": listing.leaves,
                "state": console.state(),
            }
        )

    async def key(request: Request) -> Response:
        name = _query(request).get("key", "")
        entry = console.clone.entry(name)
        if entry is None:
            raise BadRequest(f"{name!r}: no such key", 404)
        # the whole value: text or not is said of all of it, not of a row's part
        ttl = console.ttl_left(name, entry, trio.current_time())
        row = entry_row(name, entry, ttl, shown_bytes=len(entry.value))
        return Json(row)

    async def events(request: Request) -> Response:
        page = console.open_page()
        return StreamingResponse(
            page,
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},
            background=BackgroundTask(page.close),
        )

    async def set_key(request: Request) -> Response:
        body = await _write_request(request, console)
        name = _key(body)
        value = _value(body)
        ttl = _ttl(body)
        return await _confirmed(request, console, "set", name, value, ttl)

    async def delete_key(request: Request) -> Response:
        body = await _write_request(request, console)
        return await _confirmed(request, console, "delete", _key(body), b"", None)

    async def bad_request(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BadRequest)
        return Json({"error": str(exc)}, status_code=exc.status)

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/config", config),
            Route("/api/tree", tree),
            Route("/api/key", key),
            Route("/api/events", events),
            Route("/api/set", set_key, methods=["POST"]),
            Route("/api/delete", delete_key, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC)),
        ],
        middleware=(
            [Middleware(TrustedHostMiddleware, allowed_hosts=loopback_names(host))]
            if loopback
            else []
        ),
        exception_handlers={BadRequest: bad_request},
    )
    return _with_headers(app)


def loopback_names(host: str) -> list[str]:
    """The hosts a request to a console bound to loopback ``host`` may name:
    the loopback names, and the address it is bound to (``127.5.6.7``)."""
    bound = host.lower()
    return sorted({*LOOPBACK_HOSTS, bound, bound.strip("[]")})


def _with_headers(app: ASGI) -> ASGI:
    """``app``, adding ``HEADERS`` to every response."""
    extra = [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]

    async def wrapped(
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await app(
            scope, receive, send_with_headers if scope["type"] == "http" else send
        )

    return wrapped


def _query(request: Request) -> dict[str, str]:
    """The query's parameters, their bytes read as keys are (``key_text``):
    a key that is not UTF-8 is named by its bytes (``%FF``), where
    Starlette's ``query_params`` would make them U+FFFD, another key."""
    raw: bytes = request.scope["query_string"]
    text = "".join(chr(b) if b < 0x80 else f"%{b:02X}" for b in raw)  # ASCII
    pairs = parse_qsl(
        text, keep_blank_values=True, encoding="utf-8", errors="surrogateescape"
    )
    return dict(pairs)


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit must be a whole number, got {text!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be 1 to {MAX_LIMIT}, got {limit}")
    return limit


async def _write_request(request: Request, console: Console) -> dict[str, Any]:
    """A write's JSON body, once the request may write at all."""
    if console.read_only:
        raise BadRequest("this console is read-only (--read-only)", 403)
    if request.headers.get("content-type", "").split(";")[0] != "application/json":
        raise BadRequest(
            "a write is a JSON request (Content-Type: application/json)", 415
        )
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
        raise BadRequest(f"a write from another site ({origin}) is refused", 403)
    size = 0
    chunks = []
    async with aclosing(request.stream()) as stream:  # closed when cut short
        async for chunk in stream:
            size += len(chunk)
            if size > MAX_BODY:
                raise BadRequest(f"a write request is at most {MAX_BODY} bytes", 413)
            chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"the request is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request is not a JSON object")
    return body


def _key(body: dict[str, Any]) -> str:
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise BadRequest("key: a non-empty string is needed")
    try:
        key_bytes(key)
    except UnicodeEncodeError:  # a lone surrogate that no key's bytes make
        raise BadRequest(f"key: not a valid key ({key!r})") from None
    return key


def _value(body: dict[str, Any]) -> bytes:
    value, encoding = body.get("value"), body.get("encoding", "text")
    if not isinstance(value, str):
        raise BadRequest("value: a string is needed")
    try:
        if encoding == "text":
            data = value.encode()
        elif encoding == "base64":
            data = base64.b64decode(value, validate=True)
        elif encoding == "hex":
            data = bytes.fromhex(value)
        else:
            raise BadRequest(f"encoding: text, base64 or hex, not {encoding!r}")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise BadRequest(f"value: not valid {encoding} ({exc})") from None
    if not data:
        raise BadRequest("value: an empty value is a delete (use Delete)")
    return data


def _ttl(body: dict[str, Any]) -> float | None:
    """The TTL asked for, or None; its range is the client's to check."""
    ttl = body.get("ttl")
    if ttl is None or ttl == "":
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise BadRequest(f"ttl: a number of seconds, got {ttl!r}")
    return float(ttl)


async def _confirmed(
    request: Request,
    console: Console,
    what: str,
    key: str,
    value: bytes,
    ttl: float | None,
) -> Response:
    """Write through the client, and say the sequence it got or why not."""
    peer = request.client.host if request.client else "?"
    try:
        sequence = await console.clone.set(key, value, ttl=ttl, timeout=console.timeout)
    except LocalProtocolError as exc:
        raise BadRequest(str(exc)) from None
    except PermissionDeniedError as exc:
        raise BadRequest(f"refused by the server: {exc}", 403) from None
    except WriteTimeoutError as exc:
        log.warning("console %s of %r from %s: %s", what, key, peer, exc)
        raise BadRequest(f"{exc}; it may still have been applied", 504) from None
    except ClientClosedError as exc:
        raise BadRequest(str(exc), 503) from None
    log.info(
        "console %s of %r (%d bytes, ttl %s) from %s: sequence %d",
        what,
        key,
        len(value),
        "none" if ttl is None else f"{ttl:g} s",
        peer,
        sequence,
    )
    return Json({"key": key, "sequence": sequence})
