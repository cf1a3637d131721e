"""The window of applied writes: UUIDs a server must recognise as repeats.

A client resends a write it has not seen confirmed, for at most its write
horizon (``ClientTimings.write_horizon``).  A resend must never be applied
again, and must never bring back a value that a later write replaced.  A
write whose value is still stored is recognised by the UUID in its record;
this window holds the UUIDs of writes whose value is gone (overwritten,
deleted or expired) for ``horizon`` seconds after they went, which covers
every resend when ``horizon`` is at least the clients' write horizon.

Memory is bounded too: beyond ``limit`` UUIDs the oldest are evicted before
their time and counted in ``evicted_early``; from then on the guarantee above
holds only for writes newer than the oldest UUID kept.  While ``retain`` is
set (the active of a pair whose peer is not following it, so that a split
can be reconciled later), nothing is evicted by age at all.

The window is replicated: a passive loads the active's with its snapshot
(``export`` and ``load``), so a takeover recognises resends of writes that
were replaced before the passive synced.
"""

from __future__ import annotations

from collections import deque

#: Width of one time bucket: ages are kept to this precision.
BUCKET = 1.0


class Applied:
    """UUIDs of writes replaced within the last ``horizon`` seconds."""

    def __init__(
        self, horizon: float = 120.0, limit: int = 1_000_000, *, journal: bool = False
    ) -> None:
        self.horizon = horizon
        self.limit = limit
        self.retain = False
        self.evicted = 0
        self.evicted_early = 0
        self._uuids: set[bytes] = set()
        self._order: deque[bytes] = deque()
        # (time of the bucket's first UUID, how many UUIDs it holds), oldest first
        self._buckets: deque[list[float | int]] = deque()
        #: ``(uuid, when)`` added since the durable copy last took them (or
        #: None); it drops what is older than ``oldest`` by itself.
        self.journal: list[tuple[bytes, float]] | None = [] if journal else None

    def __len__(self) -> int:
        return len(self._uuids)

    def __contains__(self, uuid: bytes) -> bool:
        return uuid in self._uuids

    def add(self, uuid: bytes, now: float) -> None:
        """Remember ``uuid`` from ``now`` on (anonymous writes are ignored)."""
        if not uuid or uuid in self._uuids:
            return
        self._uuids.add(uuid)
        self._order.append(uuid)
        if self.journal is not None:
            self.journal.append((uuid, now))
        buckets = self._buckets
        last = buckets[-1] if buckets else None  # the newest bucket
        if last is not None and now - last[0] < BUCKET:
            last[1] += 1
        else:
            buckets.append([now, 1])
            self.evict(now)
        if len(self._order) > self.limit:
            self._pop(1)
            self.evicted_early += 1

    @property
    def oldest(self) -> float | None:
        """When the oldest UUID held was added (to its bucket's precision)."""
        buckets = self._buckets
        return float(buckets[0][0]) if buckets else None

    def evict(self, now: float, limit: int = 65_536) -> None:
        """Forget UUIDs that went more than ``horizon`` seconds ago (at most
        about ``limit`` a call: after a long split, the rest next time)."""
        if self.retain:
            return
        buckets = self._buckets
        # a bucket goes once its newest possible entry is past the horizon
        while buckets and buckets[0][0] + BUCKET <= now - self.horizon and limit > 0:
            count = min(int(buckets[0][1]), limit)
            self._pop(count)
            self.evicted += count
            limit -= count

    def _pop(self, count: int) -> None:
        """Drop the ``count`` oldest UUIDs."""
        order, uuids, buckets = self._order, self._uuids, self._buckets
        for _ in range(count):
            uuids.discard(order.popleft())
            buckets[0][1] -= 1
            if not buckets[0][1]:
                buckets.popleft()

    def export(self, now: float) -> list[tuple[float, list[bytes]]]:
        """Every UUID held, in batches of the same age (seconds before ``now``)."""
        batches = []
        start = 0
        order = list(self._order)
        for when, count in self._buckets:
            end = start + int(count)
            batches.append((now - when, order[start:end]))
            start = end
        return batches

    def load(self, batches: list[tuple[float, list[bytes]]], now: float) -> None:
        """Add another server's window (``export`` output, ages on its clock)."""
        for age, uuids in sorted(batches, key=lambda batch: -batch[0]):
            for uuid in uuids:
                self.add(uuid, now - age)
