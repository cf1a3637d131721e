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

Entries marked ``relay`` were handed over by this server when it stepped
down after a split: they are sent to the active's collector again every
``interval`` until its copy arrives, since the first send can be lost while
the link to it is still coming up.
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
        self._relay: dict[bytes, float] = {}  # uuid -> last sent

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._entries

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
        entries = self._entries
        if uuid not in entries:  # a resend keeps the first copy's place
            entries[uuid] = Held(now, frames, sequence)
            if len(entries) > self.max_size:
                self._relay.pop(entries.popitem(last=False)[0], None)
                self.dropped += 1
        if relay:
            self._relay[uuid] = now
        return True

    def match(self, uuid: bytes) -> bool:
        """The active's copy of ``uuid`` is in our map: forget ours."""
        if not uuid or self._entries.pop(uuid, None) is None:
            return False
        self._relay.pop(uuid, None)
        return True

    def expire(self, now: float) -> int:
        """Drop entries held ``max_age`` seconds or more; return how many."""
        entries = self._entries
        limit = now - self.max_age
        count = 0
        while entries:
            uuid, held = next(iter(entries.items()))
            if held.since > limit:
                break
            del entries[uuid]
            self._relay.pop(uuid, None)
            count += 1
        self.dropped += count
        return count

    def due(self, now: float, interval: float) -> list[Sequence[bytes]]:
        """Relay entries last sent ``interval`` ago or more (marked sent now)."""
        due = [uuid for uuid, sent in self._relay.items() if now - sent >= interval]
        for uuid in due:
            self._relay[uuid] = now
        return [self._entries[uuid].frames for uuid in due]

    def take(self, limit: int) -> list[Held]:
        """Up to ``limit`` of the oldest held updates, removed from the list."""
        entries = self._entries
        taken: list[Held] = []
        while entries and len(taken) < limit:
            uuid, held = entries.popitem(last=False)
            self._relay.pop(uuid, None)
            taken.append(held)
        return taken

    def drain(self) -> list[Held]:
        """Every held update, oldest first; the list is left empty."""
        return self.take(len(self._entries))

    def uuids(self) -> list[bytes]:
        return list(self._entries)

    def key_of(self, uuid: bytes) -> bytes:
        return self._entries[uuid].frames[0]

    def relay_off(self) -> None:
        """Stop resending hand-over entries (we are the active now)."""
        self._relay.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._relay.clear()
