"""The passive server's pending list.

``Pending`` holds client updates (KVSET frames) that reached the passive's
collector but have not yet reached its map from the active.  It is indexed
by UUID (matching is O(1)), keeps arrival order, and is bounded by size and
by age: an entry the active never confirms is dropped once it is older than
``max_age`` or pushed out by ``max_size`` newer ones, and each drop is
counted.  An entry is matched (removed) only when the active's copy is in
the passive's map, never merely seen on the stream: a copy that is lost
with a failed snapshot must still be replayed at a takeover.

Updates with an empty UUID (allowed by CHP) can never be matched, so they
are never held: the active applies them once and a takeover never replays
them.  A writer that may resend must give its writes a UUID.

Entries marked ``relay`` are the writes this server accepted while active
and handed over to its peer when it stepped down after a split.  They are
kept apart: bounded by age only (their number is bounded by the map they
came from, and pushing one out would lose a confirmed write), sent to the
active's collector again every ``interval`` until its copy arrives (the
first send can be lost while the link comes up), and replayed first, the
oldest writes, if this server takes over again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple


class Held(NamedTuple):
    since: float  # when it arrived
    frames: Sequence[bytes]
    sequence: int  # the active's sequence known when it arrived


class Pending:
    """Client updates waiting for the active's copy, oldest first."""

    def __init__(self, max_size: int = 100_000, max_age: float = 30.0) -> None:
        self.max_size = max_size
        self.max_age = max_age
        self.dropped = 0
        self._entries: OrderedDict[bytes, Held] = OrderedDict()
        self._relays: OrderedDict[bytes, Held] = OrderedDict()
        self._sent: OrderedDict[bytes, float] = OrderedDict()  # relay -> last sent

    def __len__(self) -> int:
        return len(self._entries) + len(self._relays)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._entries or uuid in self._relays

    def hold(
        self,
        uuid: bytes,
        frames: Sequence[bytes],
        now: float,
        sequence: int = 0,
        *,
        relay: bool = False,
    ) -> bool:
        """Keep a client update until the active's copy arrives.

        ``sequence`` is the active's sequence as known when it arrived: a
        write to the same key applied later than that supersedes it.
        False if it cannot be held (no UUID).
        """
        if not uuid:
            return False
        if relay:
            self._entries.pop(uuid, None)
            self._relays.setdefault(uuid, Held(now, frames, sequence))
            self._sent[uuid] = now
            self._sent.move_to_end(uuid)
            return True
        entries = self._entries
        if uuid not in entries and uuid not in self._relays:
            entries[uuid] = Held(now, frames, sequence)  # a resend keeps its place
            if len(entries) > self.max_size:
                entries.popitem(last=False)
                self.dropped += 1
        return True

    def match(self, uuid: bytes) -> bool:
        """The active's copy of ``uuid`` is in our map: forget ours."""
        if not uuid:
            return False
        if self._relays.pop(uuid, None) is not None:
            self._sent.pop(uuid, None)
            return True
        return self._entries.pop(uuid, None) is not None

    def expire(self, now: float) -> int:
        """Drop entries held ``max_age`` seconds or more; return how many."""
        limit = now - self.max_age
        count = 0
        for entries in (self._relays, self._entries):
            while entries:
                uuid, held = next(iter(entries.items()))
                if held.since > limit:
                    break
                del entries[uuid]
                self._sent.pop(uuid, None)
                count += 1
        self.dropped += count
        return count

    def due(
        self, now: float, interval: float, limit: int = 4096
    ) -> list[Sequence[bytes]]:
        """Relay entries last sent ``interval`` ago or more, oldest first and
        at most ``limit`` (marked sent now)."""
        sent, due = self._sent, list[Sequence[bytes]]()
        while sent and len(due) < limit:
            uuid, when = next(iter(sent.items()))
            if now - when < interval:
                break
            sent[uuid] = now
            sent.move_to_end(uuid)
            due.append(self._relays[uuid].frames)
        return due

    def take(self, limit: int) -> list[Held]:
        """Up to ``limit`` of the oldest held updates, removed from the list:
        hand-overs first (they were accepted before the rest arrived)."""
        taken: list[Held] = []
        for entries in (self._relays, self._entries):
            while entries and len(taken) < limit:
                uuid, held = entries.popitem(last=False)
                self._sent.pop(uuid, None)
                taken.append(held)
        return taken

    def drain(self) -> list[Held]:
        """Every held update, oldest first; the list is left empty."""
        return self.take(len(self))

    def uuids(self) -> list[bytes]:
        return [*self._relays, *self._entries]

    def key_of(self, uuid: bytes) -> bytes | None:
        held = self._relays.get(uuid) or self._entries.get(uuid)
        return None if held is None else held.frames[0]

    def relay_off(self) -> None:
        """Stop resending hand-over entries (we are the active now)."""
        self._sent.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._relays.clear()
        self._sent.clear()
