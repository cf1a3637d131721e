"""The server's map: key -> latest kvmsg, the sequence counter, TTL deadlines.

Memory matters (a server may hold millions of keys), so each entry is one
packed ``bytes`` record (sequence, UUID, properties, body) rather than an
object per field.  TTL deadlines live in a side dict plus a min-heap keyed by
deadline, so expiry costs O(log n) per expired key, never a sweep of the map.
Heap items made stale by an overwrite or delete are skipped when popped and
compacted away when they outnumber the live deadlines.

Time is always passed in (``now``, in seconds on the caller's clock).  A key
with deadline ``d`` is expired from ``now >= d``.

A store made with ``journal=True`` notes every key it changes (``journal``),
so a durable copy (server/datadir.py) writes only those; the records
themselves are what it keeps on disk (``record``, ``load``).
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable

from trioclone.core.chp import (
    SEQUENCE,
    KVMsg,
    decode_properties,
    encode_properties,
    with_ttl,
)

# A record: sequence (8 bytes, exactly the wire frame), UUID length (1 byte),
# properties length (1 byte, or 255 and then 4 bytes), UUID, properties, body.
# Ten bytes of header in the usual case: with a 16-byte UUID and a 100-byte
# value the record is a 159-byte object, inside pymalloc's 160-byte class.
_LONG = 255
_LENGTH = struct.Struct("!I")


def _pack(sequence: int, uuid: bytes, properties: bytes, body: bytes) -> bytes:
    size = len(properties)
    lengths = (
        bytes((len(uuid), size))
        if size < _LONG
        else bytes((len(uuid), _LONG)) + _LENGTH.pack(size)
    )
    return b"".join((SEQUENCE.pack(sequence), lengths, uuid, properties, body))


def _layout(record: bytes) -> tuple[int, int, int]:
    """Where the UUID starts and ends and where the properties end."""
    size, start = record[9], 10
    if size == _LONG:
        size, start = _LENGTH.unpack_from(record, 10)[0], 14
    uuid_end = start + record[8]
    return start, uuid_end, uuid_end + size


def _unpack(record: bytes) -> tuple[int, bytes, bytes, bytes]:
    start, uuid_end, props_end = _layout(record)
    return (
        SEQUENCE.unpack_from(record)[0],
        record[start:uuid_end],
        record[uuid_end:props_end],
        record[props_end:],
    )


class CorruptRecord(ValueError):
    """A stored record whose lengths do not fit it."""


def check_record(record: bytes) -> int:
    """A record's sequence, once its lengths are seen to fit it."""
    if len(record) < 10 or (record[9] == _LONG and len(record) < 14):
        raise CorruptRecord("a record shorter than its header")
    _, _, props_end = _layout(record)
    if props_end > len(record):
        raise CorruptRecord("a record shorter than its UUID and properties")
    if props_end == len(record):
        raise CorruptRecord("a record with no value")
    return int(SEQUENCE.unpack_from(record)[0])


class Store:
    """Key -> kvmsg, with the sequence counter and TTL deadlines."""

    def __init__(self, *, journal: bool = False) -> None:
        self.sequence = 0
        self._records: dict[bytes, bytes] = {}
        self._deadlines: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        #: Keys changed since the durable copy last took them (or None).
        self.journal: set[bytes] | None = set() if journal else None

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def next_sequence(self) -> int:
        self.sequence += 1
        return self.sequence

    def put(
        self,
        key: bytes,
        sequence: int,
        uuid: bytes,
        properties: bytes,
        body: bytes,
        ttl: float | None,
        now: float,
    ) -> None:
        """Store a value (or delete the key when ``body`` is empty)."""
        if not body:
            self.remove(key)
            return
        if self.journal is not None:
            self.journal.add(key)
        self._records[key] = _pack(sequence, uuid, properties, body)
        if ttl:
            deadline = now + ttl
            self._deadlines[key] = deadline
            heapq.heappush(self._heap, (deadline, key))
            if len(self._heap) > 2 * len(self._deadlines) + 64:
                self._compact()
        elif self._deadlines:
            self._deadlines.pop(key, None)

    def remove(self, key: bytes) -> bool:
        """Delete ``key``; True if it was there."""
        if self.journal is not None:
            self.journal.add(key)
        self._deadlines.pop(key, None)
        return self._records.pop(key, None) is not None

    def clear(self) -> None:
        if self.journal is not None:
            self.journal.update(self._records)
        self.sequence = 0
        self._records.clear()
        self._deadlines.clear()
        self._heap.clear()

    def get(self, key: bytes, now: float | None = None) -> KVMsg | None:
        """The stored kvmsg; with ``now``, its ``ttl`` is the time remaining."""
        record = self._records.get(key)
        if record is None:
            return None
        sequence, uuid, properties, body = _unpack(record)
        props = decode_properties(properties) if properties else {}
        if now is not None and key in self._deadlines:
            props = with_ttl(props, max(self._deadlines[key] - now, 0.001))
        return KVMsg(key, sequence, uuid, props, body)

    def deadline(self, key: bytes) -> float | None:
        return self._deadlines.get(key)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when no key has a TTL."""
        heap = self._heap
        while heap and self._deadlines.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def expire_with_uuids(
        self, now: float, limit: int | None = None
    ) -> list[tuple[bytes, bytes, int]]:
        """Remove the keys whose deadline is ``<= now``, oldest first, and at
        most ``limit`` (the rest stay due for the next call); return each
        with the UUID and sequence it was last written with."""
        expired: list[tuple[bytes, bytes, int]] = []
        heap = self._heap
        room = len(heap) if limit is None else limit
        while heap and heap[0][0] <= now and len(expired) < room:
            deadline, key = heapq.heappop(heap)
            if self._deadlines.get(key) == deadline:
                uuid, written = self.uuid_of(key), self.sequence_of(key)
                del self._deadlines[key]
                del self._records[key]
                expired.append((key, uuid, written))
                if self.journal is not None:
                    self.journal.add(key)
        return expired

    def sequence_of(self, key: bytes) -> int:
        """The sequence ``key`` was last written at; 0 if absent."""
        record = self._records.get(key)
        return 0 if record is None else int(SEQUENCE.unpack_from(record)[0])

    def uuid_of(self, key: bytes) -> bytes:
        """The UUID ``key`` was last written with; empty if none or absent."""
        record = self._records.get(key)
        if record is None:
            return b""
        start, uuid_end, _ = _layout(record)
        return record[start:uuid_end]

    def keys(self, subtree: bytes = b"") -> list[bytes]:
        """A point-in-time list of the keys under ``subtree``."""
        if not subtree:
            return list(self._records)
        return [key for key in self._records if key.startswith(subtree)]

    def frames(
        self, key: bytes, now: float, identity: bytes | None = None
    ) -> list[bytes] | None:
        """The five KVSYNC frames for ``key`` (remaining TTL), None if gone.

        With ``identity``, it comes first (ready for a ROUTER).  This is the
        snapshot's inner loop: the record's first 8 bytes already are the
        sequence frame, so nothing is unpacked but two lengths.
        """
        record = self._records.get(key)
        if record is None:
            return None
        start, uuid_end, props_end = _layout(record)
        properties = record[uuid_end:props_end]
        if self._deadlines and key in self._deadlines:
            remaining = max(self._deadlines[key] - now, 0.001)  # ttl=0: "never"
            properties = encode_properties(
                with_ttl(decode_properties(properties), remaining)
            )
        if identity is not None:
            return [
                identity,
                key,
                record[:8],
                record[start:uuid_end],
                properties,
                record[props_end:],
            ]
        return [key, record[:8], record[start:uuid_end], properties, record[props_end:]]

    def drain(
        self, offset: float
    ) -> tuple[list[tuple[bytes, bytes, float | None]], list[tuple[bytes]]]:
        """Empty the journal: ``(key, record, deadline + offset)`` for each
        changed key still held (``offset`` turns deadlines to another clock),
        and ``(key,)`` for each one gone."""
        journal, records, deadlines = self.journal, self._records, self._deadlines
        kept: list[tuple[bytes, bytes, float | None]] = []
        gone: list[tuple[bytes]] = []
        if not journal:
            return kept, gone
        self.journal = set()
        for key in journal:
            record = records.get(key)
            if record is None:
                gone.append((key,))
            elif deadlines and key in deadlines:
                kept.append((key, record, deadlines[key] + offset))
            else:
                kept.append((key, record, None))
        return kept, gone

    def load(
        self, rows: Iterable[tuple[bytes, bytes, float | None]], sequence: int
    ) -> None:
        """Fill an empty store from ``(key, record, deadline)`` rows kept by a
        durable copy; ``CorruptRecord`` if a record does not parse or is
        newer than ``sequence``."""
        records, deadlines = self._records, self._deadlines
        for key, record, deadline in rows:
            if check_record(record) > sequence:
                raise CorruptRecord(
                    f"a record newer than the map's sequence {sequence}"
                )
            records[key] = record
            if deadline is not None:
                deadlines[key] = deadline
        self.sequence = sequence
        self._compact()

    def _compact(self) -> None:
        self._heap = [(deadline, key) for key, deadline in self._deadlines.items()]
        heapq.heapify(self._heap)
