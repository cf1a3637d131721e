"""The changes a console pushes to its pages, in batches; pure.

The console reads the client's events (``CloneClient.watch``) into a
``Feed``: each change marks its key, and every tick (a tenth of a second)
``take`` turns the marked keys into rows of their values now, so a key
changed many times in one tick is sent once.  A resync, or a batch too big
to be worth sending, tells pages to reload what they show instead.

The feed also pins each value's TTL deadline when the value arrives (the
client's ``ttl`` property is the time it had left then), and counts the
updates of each second for the pages' sparkline.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from trioclone.client.events import CloneEvent, DeleteEvent, ResyncEvent, SetEvent
from trioclone.console.listing import entry_row, ttl_of
from trioclone.core.client import Entry

#: Changes in one batch above which pages are told to reload instead.
BATCH_LIMIT = 2000
#: Seconds of per-second update counts kept for the sparkline.
HISTORY = 60

Lookup = Callable[[str], Entry | None]


class Feed:
    """Marked keys, TTL deadlines and update counts (time passed in)."""

    def __init__(self, now: float) -> None:
        self._marked: dict[str, int] = {}  # key -> sequence of its last event
        self._reload = False
        #: key -> (the sequence of the value, its deadline)
        self._deadlines: dict[str, tuple[int, float]] = {}
        self._second = int(now)
        self._counting = 0
        self._counts: deque[int] = deque([0] * HISTORY, maxlen=HISTORY)
        self.updates = 0  # every set and delete seen

    def note(self, event: CloneEvent, now: float, lookup: Lookup) -> None:
        """Take in one of the client's events, as soon as it arrives."""
        if isinstance(event, ResyncEvent):
            self._reload = True
            for key in event.changes:
                self._pin(key, lookup(key), now)
            return
        assert isinstance(event, SetEvent | DeleteEvent)
        self._count(now)
        self._marked[event.key] = event.sequence
        self._pin(event.key, lookup(event.key), now)

    def take(self, now: float, lookup: Lookup) -> tuple[list[dict[str, object]], bool]:
        """The rows of the keys changed since the last take (``d``: deleted,
        at sequence ``s``), and whether pages must reload instead."""
        marked, self._marked = self._marked, {}
        reload, self._reload = self._reload, False
        if reload or len(marked) > BATCH_LIMIT:
            return [], True
        rows: list[dict[str, object]] = []
        for key, sequence in marked.items():
            entry = lookup(key)
            if entry is None:
                rows.append({"k": key, "s": sequence, "d": 1})
            else:
                rows.append(entry_row(key, entry, self.ttl_left(key, entry, now)))
        return rows, False

    def ttl_left(self, key: str, entry: Entry, now: float) -> float | None:
        """Seconds ``key``'s value has left, or None if it never expires."""
        pinned = self._pin(key, entry, now)
        return None if pinned is None else max(pinned - now, 0.0)

    def _pin(self, key: str, entry: Entry | None, now: float) -> float | None:
        """The deadline of ``entry``, fixed the first time it is seen."""
        held = self._deadlines.get(key)
        if entry is None:
            self._deadlines.pop(key, None)
            return None
        if held is not None and held[0] == entry.sequence:
            return held[1]
        ttl = ttl_of(entry.properties)
        if ttl is None:
            self._deadlines.pop(key, None)
            return None
        self._deadlines[key] = (entry.sequence, now + ttl)
        return now + ttl

    def _count(self, now: float) -> None:
        self.rates(now)
        self._counting += 1
        self.updates += 1

    def rates(self, now: float) -> list[int]:
        """Updates in each of the last ``HISTORY`` whole seconds, oldest first."""
        second = int(now)
        if second > self._second:
            self._counts.append(self._counting)
            self._counts.extend([0] * min(second - self._second - 1, HISTORY))
            self._second, self._counting = second, 0
        return list(self._counts)
