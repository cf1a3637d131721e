"""The console's live state: its client, the feed, the open pages.

Three tasks keep it (``run``): one reads the client's events into the
``Feed``; one, every tick, sends the changed rows to every open page; one,
every second, asks each server for its status and sends that.  A page that
falls too far behind (its queue full) is dropped; its browser reconnects
and reloads what it shows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import trio
import zmq

from trioclone.client.agent import CloneClient
from trioclone.client.events import ResyncEvent
from trioclone.client.status import ServerStatus, ask_all
from trioclone.console.feed import Feed
from trioclone.core.client import Entry
from trioclone.curve import Curve
from trioclone.endpoints import Endpoints

log = logging.getLogger("trioclone.console")

TICK = 0.1  # seconds between batches
STATUS_EVERY = 1.0  # seconds between status requests
#: Messages a page may have queued before it is dropped (about 20 s), and
#: characters (a batch of big values is big: 2,000 rows of 4 KiB each).
PAGE_QUEUE = 256
PAGE_CHARS = 16 * 1024 * 1024
#: How long a page shows that the console's client failed over or resynced.
NEWS_FOR = 60.0


class Console:
    """What the pages are told, and the writes they ask for."""

    def __init__(
        self,
        clone: CloneClient,
        servers: Sequence[Endpoints],
        *,
        subtree: str = "",
        read_only: bool = False,
        timeout: float = 5.0,
        curve: Curve | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.clone = clone
        self.servers = list(servers)
        self.subtree = subtree
        self.read_only = read_only
        self.timeout = timeout
        self._curve = curve
        self._context = context
        self.started = trio.current_time()
        self.feed = Feed(self.started)
        self._pages: set[PageStream] = set()
        self._statuses: list[ServerStatus] = []
        self._synced_on: str | None = None  # the server of the last sync
        #: (when, what happened) of the last failover or resync, for pages
        self._news: tuple[float, str] | None = None

    def config(self) -> dict[str, object]:
        from trioclone import __version__

        return {
            "read_only": self.read_only,
            "servers": [str(s) for s in self.servers],
            "subtree": self.subtree,
            "version": __version__,
        }

    def state(self) -> dict[str, object]:
        """The console's client as the pages show it (the banner's facts)."""
        clone, now = self.clone, trio.current_time()
        news = None
        if self._news is not None and now - self._news[0] < NEWS_FOR:
            news = {"ago": round(now - self._news[0], 1), "text": self._news[1]}
        return {
            "phase": clone.phase,
            "synced": clone.synced,
            "server": clone.server,
            "sequence": clone.sequence,
            "keys": len(clone.view()),
            "failovers": clone.failovers,
            "updates": self.feed.updates,
            "news": news,
        }

    def ttl_left(self, key: str, entry: Entry, now: float) -> float | None:
        return self.feed.ttl_left(key, entry, now)

    def statuses(self) -> list[dict[str, object]]:
        return [
            {
                "server": str(s.server),
                "error": s.error,
                "in_use": str(s.server) == self.clone.server,
                **(s.status or {}),
            }
            for s in self._statuses
        ]

    # -- the pages -----------------------------------------------------------

    def open_page(self) -> PageStream:
        """A new page's events, from a first ``status`` on (its ``close``
        ends them: the HTTP response calls it when the page goes away)."""
        page = PageStream()
        page.offer(self._status_message())
        self._pages.add(page)
        return page

    def _broadcast(self, message: str) -> None:
        for page in list(self._pages):
            if not page.offer(message):
                if not page.gone:
                    log.warning("a page fell behind and was dropped; it reconnects")
                self._pages.discard(page)
                page.drop()

    def _status_message(self) -> str:
        now = trio.current_time()
        return _event(
            "status",
            {
                "servers": self.statuses(),
                "rates": self.feed.rates(now),
                "running": round(now - self.started, 1),  # seconds of rates
                "state": self.state(),
            },
        )

    # -- the tasks -----------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow)
            nursery.start_soon(self._tick)
            nursery.start_soon(self._poll_status)

    async def _follow(self) -> None:
        clone, feed = self.clone, self.feed
        async for event in clone.watch(""):
            feed.note(event, trio.current_time(), clone.entry)
            if isinstance(event, ResyncEvent):
                self._resynced(event)

    def _resynced(self, event: ResyncEvent) -> None:
        """Keep, for the pages' banner, what a sync after the first meant."""
        server = event.server or self.clone.server
        before, self._synced_on = self._synced_on, server
        if before is None or server is None:
            return
        if server != before:
            text = f"failed over from {before} to {server}"
        else:
            text = (
                f"resynced with {server} ({len(event.changes)} keys "
                "changed): it restarted, or this console missed updates"
            )
        log.warning("console: the client %s", text)
        self._news = (trio.current_time(), text)

    async def _tick(self) -> None:
        clone, feed = self.clone, self.feed
        last_state: dict[str, object] | None = None
        while True:
            await trio.sleep(TICK)
            rows, reload = feed.take(trio.current_time(), clone.entry)
            state = self.state()
            news = state["news"]
            # (a batch with no rows goes out when the state changed; the age
            # of the news alone is not a change: status messages carry it)
            unaged = {**state, "news": news and news["text"]}  # type: ignore[index]
            if rows or reload or unaged != last_state:
                batch = {"rows": rows, "reload": reload, "state": state}
                self._broadcast(_event("batch", batch))
                last_state = unaged

    async def _poll_status(self) -> None:
        while True:
            self._statuses = await ask_all(
                self.servers, STATUS_EVERY, self._context, self._curve
            )
            self._broadcast(self._status_message())
            await trio.sleep(STATUS_EVERY)


class PageStream:
    """The messages queued for one page, as an async iterator (not a
    generator: a response cut short by its client leaves nothing to
    finalize), at most ``PAGE_QUEUE`` of them and ``PAGE_CHARS`` in all."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[str](PAGE_QUEUE)
        self._chars = 0
        self.gone = False

    def offer(self, message: str) -> bool:
        """Queue ``message``; False if the page is gone or too far behind."""
        if self.gone or self._chars + len(message) > PAGE_CHARS:
            return False
        try:
            self._send.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._chars += len(message)
        return True

    def drop(self) -> None:
        """End the page's stream once it has what is queued."""
        self._send.close()

    def __aiter__(self) -> PageStream:
        return self

    async def __anext__(self) -> str:
        try:
            message = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None
        self._chars -= len(message)
        return message

    async def close(self) -> None:
        """The page went away: the next broadcast forgets it."""
        self.gone = True
        await self._receive.aclose()


def _event(name: str, data: object) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
