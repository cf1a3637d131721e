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

Hand-overs (``relay``: the frames to send) are the writes this server
accepted while active and handed to its peer when it stepped down after a
split.  They are kept apart: not bounded by size (their number is bounded
by the map they came from, and pushing one out would lose a confirmed
write), sent to the active's collector again every ``interval`` until its
copy arrives (the first send can be lost while the link comes up), dropped
by age only once sent ``RELAY_TRIES`` times, and replayed first, the oldest
writes, if this server takes over again.  Every call does bounded work.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

#: A hand-over is sent at least this many times before it may age out.
RELAY_TRIES = 3
#: At most this many entries are dropped by age in one call.
EXPIRE_STEP = 65_536
#: Two clients' writes may reach the two servers in different orders, but
#: not this many seconds apart: a write that reached the passive this much
#: after another was sent after it (see ``arrived_after``).
ORDER_SKEW = 1.0


class Held(NamedTuple):
    since: float  # when it arrived
    frames: Sequence[bytes]
    sequence: int  # the active's sequence known when it arrived
    #: Its sender's User-Id on a secured server (checked again at a
    #: takeover: permissions may have changed); None: not checked again.
    user: str | None = None


class Pending:
    """Client updates waiting for the active's copy, oldest first."""

    def __init__(self, max_size: int = 100_000, max_age: float = 30.0) -> None:
        self.max_size = max_size
        self.max_age = max_age
        self.dropped = 0
        self._entries: OrderedDict[bytes, Held] = OrderedDict()
        self._relays: OrderedDict[bytes, Held] = OrderedDict()
        # relay -> [last sent, times sent, frames to send], least recent first
        self._sent: OrderedDict[bytes, list[Any]] = OrderedDict()
        #: key -> when the latest-arrived write to it that the active applied
        #: (matched) reached us; forgotten when the list empties.
        self.matched: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self._entries) + len(self._relays)

    def hold(
        self,
        uuid: bytes,
        frames: Sequence[bytes],
        now: float,
        sequence: int = 0,
        *,
        relay: Sequence[bytes] | None = None,
        user: str | None = None,
    ) -> bool:
        """Keep a client update until the active's copy arrives.

        ``sequence`` is the active's sequence as known when it arrived: a
        write to the same key applied later than that supersedes it.
        ``relay``: a hand-over, sent now as these frames (``frames`` are the
        client's form, replayed at a takeover).  False if it cannot be held
        (no UUID).
        """
        if not uuid:
            return False
        if relay is not None:
            self._entries.pop(uuid, None)
            self._relays.setdefault(uuid, Held(now, frames, sequence))
            self._sent[uuid] = [now, 1, relay]
            self._sent.move_to_end(uuid)
            return True
        entries = self._entries
        if uuid not in entries and uuid not in self._relays:
            entries[uuid] = Held(
                now, frames, sequence, user
            )  # a resend keeps its place
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
        held = self._entries.pop(uuid, None)
        if held is None:
            return False
        matched, key = self.matched, held.frames[0]
        if held.since > matched.get(key, -math.inf):
            matched[key] = held.since
        if not self._entries:
            matched.clear()  # no write left that an older one could undo
        return True

    def arrived_after(self, held: Held) -> bool:
        """A write to ``held``'s key that reached us well after it (so was
        sent after it) was applied by the active: ``held`` was lost on its
        way there, or is stale.  (Writes that reached us close together may
        have reached the active in the other order: no verdict.)"""
        latest = self.matched.get(held.frames[0], -math.inf)
        return latest > held.since + ORDER_SKEW

    def expire(self, now: float) -> int:
        """Drop entries held ``max_age`` seconds or more (hand-overs only once
        sent ``RELAY_TRIES`` times), at most ``EXPIRE_STEP``; return how many."""
        limit = now - self.max_age
        count = 0
        sent, relays = self._sent, self._relays
        while sent and count < EXPIRE_STEP:  # the least recently sent first
            uuid, (_, times, _) = next(iter(sent.items()))
            if times < RELAY_TRIES or relays[uuid].since > limit:
                break
            del sent[uuid], relays[uuid]
            count += 1
        entries = self._entries
        while entries and count < EXPIRE_STEP:
            uuid, held = next(iter(entries.items()))
            if held.since > limit:
                break
            del entries[uuid]
            count += 1
        if not entries:
            self.matched.clear()
        self.dropped += count
        return count

    def due(
        self, now: float, interval: float, limit: int = 4096
    ) -> list[Sequence[bytes]]:
        """Relay entries last sent ``interval`` ago or more, oldest first and
        at most ``limit`` (marked sent now)."""
        sent, due = self._sent, list[Sequence[bytes]]()
        while sent and len(due) < limit:
            uuid, record = next(iter(sent.items()))
            if now - record[0] < interval:
                break
            record[0] = now
            record[1] += 1
            sent.move_to_end(uuid)
            due.append(record[2])
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
        return taken  # (``matched`` still speaks for what was taken)

    def uuids(self) -> list[bytes]:
        return [*self._relays, *self._entries]

    def key_of(self, uuid: bytes) -> bytes | None:
        held = self._relays.get(uuid) or self._entries.get(uuid)
        return None if held is None else held.frames[0]

    @property
    def relaying(self) -> bool:
        """Hand-overs are still sent (none is in the peer's map yet)."""
        return bool(self._sent)

    def relay_off(self) -> None:
        """Stop resending hand-over entries (we are the active now)."""
        self._sent.clear()
