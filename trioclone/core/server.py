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

Both: UUIDs applied (by us, or seen on the active's stream) go into a
bounded window; a KVSET whose UUID is in it is a repeat and is dropped.
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
        self._backlog: list[tuple[KVMsg, Sequence[bytes], float]] = []

    # -- client updates (both roles) ---------------------------------------

    def collect(self, frames: Sequence[bytes], now: float) -> Frames | None:
        """A client's KVSET: the KVPUB to publish, or None (held or dropped).

        Raises ``RemoteProtocolError`` for a malformed update; nothing changes.
        """
        msg = decode_kvmsg(frames)
        if msg.key in (HUGZ, KTHXBAI):
            raise RemoteProtocolError(RULE_RESERVED)
        if msg.uuid in self.applied:
            self.stats["duplicates"] += 1
            return None
        if self.active:
            return self._apply(msg, frames, now)
        self.pending.hold(msg.uuid, frames, now)
        return None

    def _apply(self, msg: KVMsg, frames: Sequence[bytes], now: float) -> Frames:
        sequence = self.store.next_sequence()
        self.store.put(msg.key, sequence, msg.uuid, frames[3], msg.body, msg.ttl, now)
        self.applied.add(msg.uuid)
        self.stats["updates"] += 1
        return [frames[0], SEQUENCE.pack(sequence), frames[2], frames[3], frames[4]]

    # -- active work -------------------------------------------------------

    def expire(self, now: float) -> list[Frames]:
        """Deletes to publish for every key whose TTL has passed."""
        if not self.active:
            return []
        store = self.store
        deletes = [
            [key, SEQUENCE.pack(store.next_sequence()), b"", b"", b""]
            for key in store.expire(now)
        ]
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
        for frames in self.pending.drain():
            msg = decode_kvmsg(frames)
            if msg.uuid not in self.applied:
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
        incoming.put(msg.key, msg.sequence, msg.uuid, frames[3], msg.body, msg.ttl, now)
        if msg.uuid:
            self._incoming_uuids.append(msg.uuid)
        return False

    def _finish_sync(self, incoming: Store) -> bool:
        # Only a complete snapshot may match pending updates: if the active
        # dies mid-snapshot, we take over with the last good store and must
        # still hold every update that store lacks.
        for uuid in self._incoming_uuids:
            self._seen(uuid)
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
        if msg.key == HUGZ:
            return self.synced and msg.sequence > store.sequence
        self._seen(msg.uuid)
        if not self.synced:
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

    @staticmethod
    def _mirror_into(
        store: Store, msg: KVMsg, frames: Sequence[bytes], now: float
    ) -> None:
        store.put(msg.key, msg.sequence, msg.uuid, frames[3], msg.body, msg.ttl, now)
        store.sequence = msg.sequence

    def _seen(self, uuid: bytes) -> None:
        self.applied.add(uuid)
        self.pending.match(uuid)
