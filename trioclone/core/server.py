"""What a Clone server does with each input: the sans-IO server core.

The Trio shell feeds it frames and the time; it answers with frames to
publish.  It knows whether it is active; input that does not fit the current
role (a late step of a task whose role scope is being cancelled) is ignored.

Active: a client KVSET gets the next sequence, is stored and is returned as
the KVPUB to publish (key, UUID, properties and body kept as received).
TTL deadlines expire into deletes with fresh sequences.

Passive: a client KVSET waits on the pending list.  The active's stream is
mirrored once a snapshot is loaded; until then it is kept in a backlog so
nothing published after the snapshot's sequence is missed.  A snapshot is
loaded into a fresh store that replaces the current one only when complete,
so a sync that fails half-way leaves the last good copy in place.  A gap in
the active's sequence asks the shell for a resync.

Both: a KVSET already applied (by us, or seen on the active's stream) is a
repeat and is dropped.  A repeat is recognised by UUID: either it is the UUID
the key was last written with (kept in the store's record), or it is in a
bounded window of UUIDs whose writes were since overwritten, deleted or
expired.  Only superseded writes cost window space, so a map of many keys
written once costs nothing extra.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from trioclone.core.chp import (
    HUGZ,
    KTHXBAI,
    SEQUENCE,
    KVMsg,
    decode_kvmsg,
    hugz,
    kthxbai,
)
from trioclone.core.pending import Applied, Pending
from trioclone.core.store import Store
from trioclone.errors import RemoteProtocolError

Frames = list[bytes]

RULE_RESERVED = "a client may not write the reserved keys HUGZ and KTHXBAI"
RULE_UNEXPECTED = "a snapshot reply is KVSYNC messages ending with KTHXBAI"


class ServerCore:
    """The state of one Clone server and the rules that change it."""

    def __init__(
        self,
        *,
        applied_window: int = 100_000,
        pending_size: int = 100_000,
        pending_age: float = 30.0,
        backlog_limit: int = 1_000_000,
    ) -> None:
        self.store = Store()
        self.applied = Applied(applied_window)
        self.pending = Pending(pending_size, pending_age)
        self.backlog_limit = backlog_limit
        self.active = False
        self.synced = False
        self.stats: Counter[str] = Counter()
        #: Set when a completed sync found a gap after the snapshot.
        self.resync_wanted = False
        self._incoming: Store | None = None
        self._incoming_uuids: list[bytes] = []
        self._stream_sequence = 0
        self._backlog: list[tuple[KVMsg, Sequence[bytes], float]] = []

    # -- client updates (both roles) ---------------------------------------

    def collect(self, frames: Sequence[bytes], now: float) -> Frames | None:
        """A client's KVSET: the KVPUB to publish, or None (held or dropped).

        Raises ``RemoteProtocolError`` for a malformed update; nothing changes.
        """
        msg = decode_kvmsg(frames)
        if msg.key in (HUGZ, KTHXBAI):
            raise RemoteProtocolError(RULE_RESERVED)
        current = self.store.uuid_of(msg.key)
        uuid = msg.uuid
        if uuid and (uuid == current or uuid in self.applied):
            self.stats["duplicates"] += 1
            return None
        if self.active:
            return self._apply(msg, frames, now, current)
        self.pending.hold(uuid, frames, now, self._known_sequence())
        return None

    def _apply(
        self,
        msg: KVMsg,
        frames: Sequence[bytes],
        now: float,
        current: bytes | None = None,
    ) -> Frames:
        sequence = self.store.next_sequence()
        self._put(self.store, msg, sequence, frames[3], now, current)
        self.stats["updates"] += 1
        return [frames[0], SEQUENCE.pack(sequence), frames[2], frames[3], frames[4]]

    # -- active work -------------------------------------------------------

    def expire(self, now: float) -> list[Frames]:
        """Deletes to publish for every key whose TTL has passed."""
        if not self.active:
            return []
        store = self.store
        deletes = []
        for key, uuid in store.expire_with_uuids(now):
            self.applied.add(uuid)
            deletes.append([key, SEQUENCE.pack(store.next_sequence()), b"", b"", b""])
        self.stats["expired"] += len(deletes)
        return deletes

    def hugz(self) -> Frames:
        return hugz(self.store.sequence)

    def kthxbai(self, subtree: bytes) -> Frames:
        return kthxbai(self.store.sequence, subtree)

    # -- role changes ------------------------------------------------------

    def become_active(self, now: float) -> list[Frames]:
        """Take over: apply the pending list in order; return what to publish."""
        if self.active:
            return []
        self.active = True
        self.pending.expire(now)
        if not self.synced:
            self._catch_up(self.store)  # best effort: the last good copy
        self._incoming = None
        self._backlog.clear()
        self.synced = True
        published = []
        for frames, held_at in self.pending.drain_with_sequences():
            msg = decode_kvmsg(frames)
            if self._is_repeat(msg.key, msg.uuid):
                continue
            if self.store.sequence_of(msg.key) > held_at:
                self.stats["pending_superseded"] += 1  # a later write won
                continue
            published.append(self._apply(msg, frames, now))
        self.stats["takeover_applied"] += len(published)
        return published

    def become_passive(self) -> None:
        """Step down: from now on mirror the active, after a fresh snapshot."""
        self.active = False
        self.begin_sync()

    # -- passive work ------------------------------------------------------

    def begin_sync(self) -> None:
        """A snapshot request is about to go out: load into a fresh store."""
        if self.active:
            return
        self.synced = False
        self.resync_wanted = False
        self._incoming = Store()
        self._incoming_uuids = []
        self._backlog.clear()

    def load(self, frames: Sequence[bytes], now: float) -> bool:
        """One message of the snapshot reply; True once it is complete."""
        incoming = self._incoming
        if incoming is None or self.active:
            return False
        msg = decode_kvmsg(frames)
        if msg.key == KTHXBAI:
            incoming.sequence = msg.sequence
            return self._finish_sync(incoming)
        if msg.key == HUGZ:
            raise RemoteProtocolError(RULE_UNEXPECTED, "got HUGZ")
        self._put(incoming, msg, msg.sequence, frames[3], now)
        if msg.uuid:
            self._incoming_uuids.append(msg.uuid)
        return False

    def _finish_sync(self, incoming: Store) -> bool:
        # Only a complete snapshot may match pending updates: if the active
        # dies mid-snapshot, we take over with the last good store and must
        # still hold every update that store lacks.
        for uuid in self._incoming_uuids:
            self.pending.match(uuid)
        self._incoming_uuids = []
        self.resync_wanted = self._catch_up(incoming)
        if self.resync_wanted:
            self.stats["gaps"] += 1
        self.store = incoming
        self._incoming = None
        self.synced = True
        self.stats["syncs"] += 1
        return True

    def _catch_up(self, store: Store) -> bool:
        """Apply the backlog entries newer than ``store``; True on a gap."""
        gap = False
        for msg, frames, arrived in self._backlog:
            if msg.sequence > store.sequence:
                gap = gap or msg.sequence != store.sequence + 1
                self._mirror_into(store, msg, frames, arrived)
        self._backlog.clear()
        return gap

    def mirror(self, frames: Sequence[bytes], now: float) -> bool:
        """One message of the active's stream; True when a resync is needed.

        Raises ``RemoteProtocolError`` for a malformed message.
        """
        if self.active:
            return False
        msg = decode_kvmsg(frames)
        store = self.store
        self._stream_sequence = max(self._stream_sequence, msg.sequence)
        if msg.key == HUGZ:
            return self.synced and msg.sequence > store.sequence
        self.pending.match(msg.uuid)
        if not self.synced:
            self.applied.add(msg.uuid)  # until it is in our store
            self._backlog.append((msg, frames, now))
            if len(self._backlog) > self.backlog_limit:
                self.stats["backlog_overflows"] += 1
                return True
            return False
        if msg.sequence <= store.sequence:
            return False
        gap = msg.sequence != store.sequence + 1
        self._mirror_into(store, msg, frames, now)
        if gap:
            self.stats["gaps"] += 1
        return gap

    def _mirror_into(
        self, store: Store, msg: KVMsg, frames: Sequence[bytes], now: float
    ) -> None:
        self._put(store, msg, msg.sequence, frames[3], now)
        store.sequence = msg.sequence

    def _put(
        self,
        store: Store,
        msg: KVMsg,
        sequence: int,
        properties: bytes,
        now: float,
        current: bytes | None = None,
    ) -> None:
        """Store ``msg``; the UUID it supersedes (``current``) moves to the window."""
        self.applied.add(store.uuid_of(msg.key) if current is None else current)
        if not msg.body:
            self.applied.add(msg.uuid)  # a delete leaves no record to hold it
        store.put(msg.key, sequence, msg.uuid, properties, msg.body, msg.ttl, now)

    def _known_sequence(self) -> int:
        """The newest sequence of the active's that we know of."""
        return max(self.store.sequence, self._stream_sequence)

    def _is_repeat(self, key: bytes, uuid: bytes) -> bool:
        """Was this write (by UUID) applied already?"""
        return bool(uuid) and (uuid in self.applied or self.store.uuid_of(key) == uuid)
