"""The passive server's pending list, and the window of applied UUIDs.

``Pending`` holds client updates (KVSET frames) that reached the passive's
collector but have not yet come back on the active's stream.  It is indexed
by UUID (matching is O(1)), keeps arrival order, and is bounded by size
and by age: an entry the active never confirms is dropped once it is older than ``max_age`` or pushed out by
``max_size`` newer ones, and each drop is counted.

``Applied`` is a bounded window of UUIDs already applied (by us, or by the
active as seen on its stream).  It serves two rules with one structure: a
client update whose UUID is in the window is a repeat and is dropped (the
active's copy already came, or a client resent after a failover), and an
update seen from the active before the client's own copy arrived is held
there so that the copy, when it comes, is dropped.

Updates with an empty UUID (allowed by CHP) can never be matched: they are
held until they age out, and are never treated as repeats.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence


class Applied:
    """The last ``limit`` UUIDs applied, oldest evicted first.

    A set plus a ring of the same UUIDs in arrival order: O(1) to add, test
    and evict, and about 110 bytes a UUID (an OrderedDict costs 170).
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._uuids: set[bytes] = set()
        self._order: deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self._uuids)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._uuids

    def add(self, uuid: bytes) -> None:
        if not uuid or uuid in self._uuids:
            return
        self._uuids.add(uuid)
        self._order.append(uuid)
        if len(self._order) > self.limit:
            self._uuids.discard(self._order.popleft())

    def clear(self) -> None:
        self._uuids.clear()
        self._order.clear()


class Pending:
    """Client updates waiting for the active's copy, oldest first."""

    def __init__(self, max_size: int = 100_000, max_age: float = 30.0) -> None:
        self.max_size = max_size
        self.max_age = max_age
        self.dropped = 0
        # uuid -> (time held, frames, the active's sequence when held)
        self._entries: OrderedDict[bytes | int, tuple[float, Sequence[bytes], int]] = (
            OrderedDict()
        )
        self._anonymous = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def hold(
        self, uuid: bytes, frames: Sequence[bytes], now: float, sequence: int = 0
    ) -> None:
        """Keep a client update until the active confirms it.

        ``sequence`` is the active's sequence as known when it arrived: a
        write to the same key applied later than that supersedes it.
        """
        entries = self._entries
        if uuid in entries:
            return  # a resend: keep the first copy's place
        entries[uuid or next(self._anonymous)] = (now, frames, sequence)
        if len(entries) > self.max_size:
            entries.popitem(last=False)
            self.dropped += 1

    def match(self, uuid: bytes) -> bool:
        """The active published ``uuid``: forget our copy (True if held)."""
        return bool(uuid) and self._entries.pop(uuid, None) is not None

    def expire(self, now: float) -> int:
        """Drop entries held ``max_age`` seconds or more; return how many."""
        entries = self._entries
        limit = now - self.max_age
        count = 0
        while entries:
            held_at = next(iter(entries.values()))[0]
            if held_at > limit:
                break
            entries.popitem(last=False)
            count += 1
        self.dropped += count
        return count

    def drain(self) -> list[Sequence[bytes]]:
        """Every held update, oldest first; the list is left empty."""
        return [frames for frames, _ in self.drain_with_sequences()]

    def drain_with_sequences(self) -> list[tuple[Sequence[bytes], int]]:
        """As ``drain``, each with the sequence it was held at."""
        held = [(frames, seq) for _, frames, seq in self._entries.values()]
        self._entries.clear()
        return held

    def clear(self) -> None:
        self._entries.clear()
