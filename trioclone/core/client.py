"""The client's state machine, sans-IO: snapshot, stream, failover, writes.

Rules
-----
* INITIAL -> SYNCING: pick the next server, subscribe (``Connect``), then ask
  for a snapshot of each subtree in turn (``Request``).  Subscribing first
  means the stream holds every update published after the snapshot.
* SYNCING: KVSYNCs fill a fresh map; each KTHXBAI gives the subtree's
  sequence.  Stream updates are buffered.  When every subtree is in, the
  buffer is applied (each update only if newer than its subtree's snapshot),
  the fresh map replaces the old one, and a ``Resynced`` event says what
  changed (sent after every new connection, else only if anything did).
  -> ACTIVE.
* SYNCING, no reply for ``request_timeout`` (the first reply, or between two
  replies): the server is down or rejected our vote.  Try the next server;
  after a whole round of failures wait ``backoff`` (doubling up to
  ``max_backoff``) before the next round.  Never give up.
* ACTIVE: an update is applied only if its sequence is newer than the last
  one applied.  Anything heard (update or HUGZ) keeps the server alive;
  ``silence_timeout`` without a word -> the next server, SYNCING.
* A new subscription may start after the snapshot was taken.  The first
  message on the stream tells from when it is live (a HUGZ with sequence h:
  from h; an update u: from u - 1).  If that is after the snapshot's
  sequence, updates may have been missed: snapshot again on the same
  connection (its stream is live now, so once is enough).  A client of the
  whole tree also snapshots again on any gap in the sequence (a HUGZ ahead
  of us, or an update that skips one).
* With several subtrees each snapshot has its own sequence; until the
  stream passes the newest, an update is applied only if it is newer than
  the snapshot of its own subtree.
* Writes get a UUID and are sent to every server's collector.  A write is
  confirmed when its UUID comes back on the stream or in a snapshot; until
  then it is resent every ``resend_interval`` and right after a resync.
  The servers drop repeats by UUID, so a resend is never applied twice.
  The local map changes only from what the server sends.
"""

from __future__ import annotations

import enum
import uuid as uuidlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from trioclone.core.chp import (
    HUGZ,
    KTHXBAI,
    KVMsg,
    decode_kvmsg,
    encode_kvmsg,
    format_ttl,
)
from trioclone.errors import LocalProtocolError


class Phase(enum.Enum):
    INITIAL = "initial"
    SYNCING = "syncing"
    ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class Entry:
    """A value in the client's map, as the server last sent it."""

    value: bytes
    sequence: int
    uuid: bytes
    properties: Mapping[str, str]


# -- actions for the shell ---------------------------------------------------


@dataclass(frozen=True)
class Connect:
    """Close the old connection; open DEALER and SUB to ``servers[server]``."""

    server: int


@dataclass(frozen=True)
class Request:
    """Send ICANHAZ for ``subtree`` on the DEALER."""

    subtree: bytes


@dataclass(frozen=True)
class Send:
    """Publish ``frames`` (a KVSET) to every collector."""

    frames: list[bytes]


Action = Connect | Request | Send


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


Event = Updated | Deleted | Resynced | Confirmed


@dataclass
class Write:
    frames: list[bytes]
    sent_at: float


@dataclass(frozen=True)
class ClientTimings:
    request_timeout: float = 1.0
    silence_timeout: float = 2.0
    backoff: float = 0.5
    max_backoff: float = 5.0
    resend_interval: float = 1.0


class ClientCore:
    """One client's view of the map and its conversation with the servers."""

    def __init__(
        self,
        server_count: int,
        subtrees: Sequence[bytes] = (b"",),
        timings: ClientTimings | None = None,
    ) -> None:
        if server_count < 1:
            raise LocalProtocolError("a client needs at least one server")
        if not subtrees:
            raise LocalProtocolError("a client needs at least one subtree")
        self.server_count = server_count
        self.subtrees = tuple(dict.fromkeys(subtrees))
        self.timings = timings or ClientTimings()
        self.phase = Phase.INITIAL
        self.server = -1
        self.entries: dict[bytes, Entry] = {}
        self.sequence = 0
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.writes: dict[bytes, Write] = {}
        self.failovers = 0
        self._deadline = 0.0  # INITIAL: connect at once
        self._failures = 0
        self._incoming: dict[bytes, Entry] = {}
        self._thresholds: list[tuple[bytes, int]] = []
        self._buffer: list[KVMsg] = []
        self._live_from: int | None = None
        self._snapshot_sequence = 0
        self._new_connection = False
        self._synced_once = False

    @property
    def whole_tree(self) -> bool:
        return b"" in self.subtrees

    def covers(self, key: bytes) -> bool:
        return any(key.startswith(subtree) for subtree in self.subtrees)

    def next_deadline(self) -> float:
        """When ``poll`` next has work (a timeout or a resend)."""
        deadline = self._deadline
        if self.writes and self.phase is Phase.ACTIVE:
            oldest = min(w.sent_at for w in self.writes.values())
            deadline = min(deadline, oldest + self.timings.resend_interval)
        return deadline

    # -- timers --------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Act on every timer due at ``now``."""
        if now >= self._deadline:
            if self.phase is Phase.INITIAL:
                self._connect(now)
            elif self.phase is Phase.SYNCING:
                self._give_up_on_server(now)
            else:
                self._server_silent(now)
        if self.phase is Phase.ACTIVE:
            self._resend_due(now)

    def _connect(self, now: float) -> None:
        """Move to the next server: a new connection, then snapshots."""
        self.server = (self.server + 1) % self.server_count
        self._live_from = None
        self._new_connection = True
        self.actions.append(Connect(self.server))
        self._request_snapshots(now)

    def _request_snapshots(self, now: float) -> None:
        """Ask the current server for every subtree again, in turn."""
        self.phase = Phase.SYNCING
        self._incoming = {}
        self._thresholds = []
        self._buffer = []
        self.actions.append(Request(self.subtrees[0]))
        self._deadline = now + self.timings.request_timeout

    def _give_up_on_server(self, now: float) -> None:
        self._failures += 1
        if self._failures % self.server_count:
            self._connect(now)
            return
        rounds = self._failures // self.server_count
        delay = min(self.timings.backoff * 2 ** (rounds - 1), self.timings.max_backoff)
        self.phase = Phase.INITIAL
        self._deadline = now + delay

    def _server_silent(self, now: float) -> None:
        self.failovers += 1
        self._connect(now)

    def _resend_due(self, now: float) -> None:
        due = now - self.timings.resend_interval
        for write in self.writes.values():
            if write.sent_at <= due:
                write.sent_at = now
                self.actions.append(Send(write.frames))

    # -- input ---------------------------------------------------------------

    def on_reply(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the snapshot socket (KVSYNC or KTHXBAI)."""
        if self.phase is not Phase.SYNCING:
            return  # a late reply from an abandoned attempt
        msg = decode_kvmsg(frames)
        self._deadline = now + self.timings.request_timeout
        if msg.key != KTHXBAI:
            if self.covers(msg.key):
                self._incoming[msg.key] = _entry(msg)
            self._confirm(msg.uuid, msg.sequence)
            return
        self._thresholds.append((self.subtrees[len(self._thresholds)], msg.sequence))
        if len(self._thresholds) < len(self.subtrees):
            self.actions.append(Request(self.subtrees[len(self._thresholds)]))
        else:
            self._finish_sync(now)

    def on_update(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the stream (KVPUB or HUGZ)."""
        msg = decode_kvmsg(frames)
        if self.phase is Phase.INITIAL:
            return
        active = self.phase is Phase.ACTIVE
        if active:
            self._deadline = now + self.timings.silence_timeout
        if self._live_from is None:
            self._live_from = msg.sequence if msg.key == HUGZ else msg.sequence - 1
            if active and self._live_from > self._snapshot_sequence:
                self._request_snapshots(now)  # the stream started late
                return
        if msg.key == HUGZ:
            if active and self.whole_tree and msg.sequence > self.sequence:
                self._request_snapshots(now)  # we missed updates
            return
        self._confirm(msg.uuid, msg.sequence)
        if not active:
            self._buffer.append(msg)
        elif msg.sequence > self.sequence:
            if self.whole_tree and msg.sequence != self.sequence + 1:
                self._request_snapshots(now)
                return
            self._accept(msg, self.entries, announce=True)

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
        if key in (HUGZ, KTHXBAI):
            raise LocalProtocolError(f"{key!r} is a reserved key")
        if confirm and not self.covers(key):
            raise LocalProtocolError(
                f"key {key!r} is outside this client's subtrees, so its update "
                "cannot be confirmed; write it without confirmation"
            )
        props = dict(properties or {})
        if ttl is not None:
            if not ttl > 0:
                raise LocalProtocolError(f"ttl must be positive, got {ttl}")
            props["ttl"] = format_ttl(ttl)
        uuid = uuidlib.uuid4().bytes
        frames = encode_kvmsg(KVMsg(key, 0, uuid, props, value))
        if confirm:
            self.writes[uuid] = Write(frames, now)
        self.actions.append(Send(frames))
        return uuid

    def forget(self, uuid: bytes) -> None:
        """Stop resending a write (its caller gave up waiting)."""
        self.writes.pop(uuid, None)

    # -- internals -----------------------------------------------------------

    def _confirm(self, uuid: bytes, sequence: int) -> None:
        if uuid and self.writes.pop(uuid, None) is not None:
            self.events.append(Confirmed(uuid, sequence))

    def _finish_sync(self, now: float) -> None:
        fresh = self._incoming
        self._snapshot_sequence = min(seq for _, seq in self._thresholds)
        self.sequence = self._snapshot_sequence
        gap = False
        for msg in self._buffer:
            if msg.sequence > self.sequence:
                gap = gap or msg.sequence != self.sequence + 1
                self._accept(msg, fresh, announce=False)
        old, self.entries = self.entries, fresh
        self._buffer = []
        self._incoming = {}
        self.phase = Phase.ACTIVE
        self._failures = 0
        self._deadline = now + self.timings.silence_timeout
        changes = _changes(old, fresh)
        if changes or self._new_connection:  # a no-op resnapshot is not news
            self.events.append(Resynced(self.server, changes))
        self._new_connection = False
        late = self._live_from is not None and self._live_from > self._snapshot_sequence
        if late or (gap and self.whole_tree):
            self._request_snapshots(now)
            return
        for write in self.writes.values():  # a failover may have lost them
            write.sent_at = now
            self.actions.append(Send(write.frames))

    def _accept(
        self, msg: KVMsg, entries: dict[bytes, Entry], *, announce: bool
    ) -> None:
        """Apply a stream update newer than ``self.sequence`` to ``entries``.

        With several subtrees, each snapshot has its own sequence: an update
        already contained in its subtree's snapshot is skipped.
        """
        self.sequence = msg.sequence
        thresholds = self._thresholds
        if thresholds:
            if msg.sequence >= max(seq for _, seq in thresholds):
                self._thresholds = []  # past every snapshot: plain order now
            matching = [seq for sub, seq in thresholds if msg.key.startswith(sub)]
            if not matching or msg.sequence <= max(matching):
                return  # outside our subtrees, or already in the snapshot
        elif not self.covers(msg.key):
            return
        _put(entries, msg)
        if not announce:
            return
        if msg.body:
            self.events.append(Updated(msg.key, msg.body, msg.sequence, msg.properties))
        else:
            self.events.append(Deleted(msg.key, msg.sequence))


def _entry(msg: KVMsg) -> Entry:
    return Entry(msg.body, msg.sequence, msg.uuid, msg.properties)


def _put(entries: dict[bytes, Entry], msg: KVMsg) -> None:
    if msg.body:
        entries[msg.key] = _entry(msg)
    else:
        entries.pop(msg.key, None)


def _changes(
    old: Mapping[bytes, Entry], new: Mapping[bytes, Entry]
) -> dict[bytes, bytes | None]:
    changes: dict[bytes, bytes | None] = {
        key: entry.value
        for key, entry in new.items()
        if key not in old or old[key].value != entry.value
    }
    changes.update((key, None) for key in old if key not in new)
    return changes
