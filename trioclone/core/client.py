"""The client's state machine, sans-IO: a replica of the map, plus writes.

Following the servers (snapshot, stream, gaps, resets, failover) is the
``Replica`` core's job; this module adds the client's map of ``Entry``
values, the events an application sees, and writes.

Writes
------
* A write gets a UUID and is sent to every server's collector.  It carries
  ``ttl=0`` when it has no expiry: the Guide's C servers read a missing
  ``ttl`` as a random expiry, and every server reads 0 as "never" (trioclone
  servers store and publish the canonical form, without it).
* A write is confirmed when its UUID reaches the live map: on the stream,
  or in a snapshot.  Until then it is resent every ``resend_interval`` and
  right after every sync.  The servers drop repeats by UUID, so a resend is
  never applied twice, and never after the write was replaced: a server
  remembers replaced writes for longer than ``write_horizon``, and the
  client stops resending a write once it is that old (``Unconfirmed``).
* The local map changes only from what the server sends.
"""

from __future__ import annotations

import math
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from trioclone.core.chp import (
    MIN_TTL,
    KVMsg,
    encode_kvmsg,
    format_ttl,
    is_reserved,
)
from trioclone.core.replica import (
    Action as Action,
    Connect as Connect,
    Phase as Phase,
    Replica,
    Request as Request,
    Send as Send,
    Timings,
)
from trioclone.errors import LocalProtocolError


@dataclass(frozen=True, slots=True)
class Entry:
    """A value in the client's map, as the server last sent it."""

    value: bytes
    sequence: int
    uuid: bytes
    properties: Mapping[str, str]


# -- events for the application ---------------------------------------------


@dataclass(frozen=True)
class Updated:
    key: bytes
    value: bytes
    sequence: int
    properties: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Deleted:
    key: bytes
    sequence: int


@dataclass(frozen=True)
class Resynced:
    """The map was replaced by a snapshot; ``changes``: key -> value or None."""

    server: int
    changes: Mapping[bytes, bytes | None]


@dataclass(frozen=True)
class Confirmed:
    """The write ``uuid`` was applied by the active server at ``sequence``."""

    uuid: bytes
    sequence: int


@dataclass(frozen=True)
class Unconfirmed:
    """The write ``uuid`` reached its horizon unconfirmed: no more resends."""

    uuid: bytes


Event = Updated | Deleted | Resynced | Confirmed | Unconfirmed


@dataclass
class Write:
    frames: list[bytes]
    first_sent: float
    sent_at: float
    number: int  # the order written in


@dataclass(frozen=True)
class ClientTimings(Timings):
    """Timings of a client; every one a positive, finite number of seconds."""

    resend_interval: float = 1.0
    write_horizon: float = 30.0


Entries = dict[bytes, Entry]


def _random_uuid() -> bytes:
    return uuidlib.uuid4().bytes


class ClientCore(Replica[Entries]):
    """One client's view of the map and its conversation with the servers."""

    timings: ClientTimings

    def __init__(
        self,
        server_count: int,
        subtrees: Sequence[bytes] = (b"",),
        timings: ClientTimings | None = None,
        *,
        new_uuid: Callable[[], bytes] = _random_uuid,
    ) -> None:
        super().__init__(server_count, subtrees, timings or ClientTimings(), {})
        self.events: list[Event] = []
        #: Unconfirmed writes, in the order written (so by ``first_sent``).
        self.writes: OrderedDict[bytes, Write] = OrderedDict()
        # the same writes, least recently sent first (so by ``sent_at``)
        self._by_send: OrderedDict[bytes, Write] = OrderedDict()
        self._written = 0
        self._new_uuid = new_uuid

    @property
    def entries(self) -> Entries:
        return self.live

    @property
    def failovers(self) -> int:
        return self.stats["failovers"]

    def next_deadline(self) -> float:
        """When ``poll`` next has work (a timeout, a resend, a horizon)."""
        deadline = super().next_deadline()
        if self.writes:
            timings = self.timings
            first = next(iter(self.writes.values()))
            deadline = min(deadline, first.first_sent + timings.write_horizon)
            if self.phase is Phase.ACTIVE:
                oldest = next(iter(self._by_send.values()))
                deadline = min(deadline, oldest.sent_at + timings.resend_interval)
        return deadline

    def poll(self, now: float) -> None:
        """Act on every timer due at ``now``; the work is the writes due."""
        super().poll(now)
        # Due exactly as ``next_deadline`` says (``a + b <= now``, never
        # ``a <= now - b``: in floats the two can differ, and a timer that
        # is due by one and not by the other fires again and again).
        writes, by_send = self.writes, self._by_send
        horizon = self.timings.write_horizon
        while writes and next(iter(writes.values())).first_sent + horizon <= now:
            uuid, _ = writes.popitem(last=False)
            del by_send[uuid]
            self.events.append(Unconfirmed(uuid))
        if self.phase is Phase.ACTIVE:
            interval = self.timings.resend_interval
            resends = []
            for write in by_send.values():
                if write.sent_at + interval > now:
                    break
                resends.append(write)
            for write in sorted(resends, key=attrgetter("number")):  # as written
                self._send(write, now)

    # -- writes --------------------------------------------------------------

    def write(
        self,
        key: bytes,
        value: bytes,
        now: float,
        *,
        ttl: float | None = None,
        properties: Mapping[str, str] | None = None,
        confirm: bool = True,
    ) -> bytes:
        """Send a KVSET; return its UUID.  Empty ``value`` deletes."""
        if is_reserved(key):
            raise LocalProtocolError(f"{key!r} is a reserved key")
        if confirm and not self.covers(key):
            raise LocalProtocolError(
                f"key {key!r} is outside this client's subtrees, so its update "
                "cannot be confirmed; write it without confirmation"
            )
        props = dict(properties or {})
        if ttl is not None and not MIN_TTL <= ttl < math.inf:
            raise LocalProtocolError(
                f"ttl must be a finite number of seconds, at least {MIN_TTL:g} "
                f"(shorter goes out as 0, which means never), got {ttl}"
            )
        props["ttl"] = "0" if ttl is None else format_ttl(ttl)
        uuid = self._new_uuid()
        frames = encode_kvmsg(KVMsg(key, 0, uuid, props, value))
        if confirm:
            self._written += 1
            self.writes[uuid] = self._by_send[uuid] = Write(
                frames, now, now, self._written
            )
        self.actions.append(Send(frames))
        return uuid

    def forget(self, uuid: bytes) -> None:
        """Stop resending a write (its caller gave up waiting)."""
        self._unwrite(uuid)

    def _unwrite(self, uuid: bytes) -> Write | None:
        self._by_send.pop(uuid, None)
        return self.writes.pop(uuid, None)

    def _send(self, write: Write, now: float) -> None:
        write.sent_at = now
        self._by_send.move_to_end(write.frames[2])  # its UUID
        self.actions.append(Send(write.frames))

    # -- the replica's hooks -------------------------------------------------

    def _new_map(self) -> Entries:
        return {}

    def _put(self, target: Entries, msg: KVMsg, now: float) -> None:
        if msg.body:
            target[msg.key] = Entry(msg.body, msg.sequence, msg.uuid, msg.properties)
        else:
            target.pop(msg.key, None)

    def _confirm(self, target: Entries, msg: KVMsg, now: float) -> None:
        if msg.uuid and self._unwrite(msg.uuid) is not None:
            self.events.append(Confirmed(msg.uuid, msg.sequence))

    def _updated(self, msg: KVMsg) -> None:
        if msg.body:
            self.events.append(Updated(msg.key, msg.body, msg.sequence, msg.properties))
        else:
            self.events.append(Deleted(msg.key, msg.sequence))

    def _swapped(self, old: Entries, now: float) -> None:
        fresh = self.live
        for uuid, write in list(self.writes.items()):
            entry = fresh.get(write.frames[0])
            if entry is not None and entry.uuid == uuid:  # the snapshot holds it
                self._unwrite(uuid)
                self.events.append(Confirmed(uuid, entry.sequence))
        changes = _changes(old, fresh)
        if changes or self._new_connection:  # a no-op resnapshot is not news
            self.events.append(Resynced(self.server, changes))
        for write in self.writes.values():  # a failover may have lost them
            self._send(write, now)


def _changes(old: Entries, new: Entries) -> dict[bytes, bytes | None]:
    changes: dict[bytes, bytes | None] = {
        key: entry.value
        for key, entry in new.items()
        if key not in old or old[key].value != entry.value
    }
    changes.update((key, None) for key in old if key not in new)
    return changes
