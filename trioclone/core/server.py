"""What a Clone server does with each input: the sans-IO server core.

The Trio shell feeds it frames and the time and carries out what it asks:
frames to publish (returned), requests and connections of the passive's
replica (``replica.actions``), hand-over writes for the peer's collector
(``relays``), and bounded steps of long work (``busy``, ``step``).

Role
----
One value, ``role``: WAITING (a pair's server before Binary Star decided),
ACTIVE or PASSIVE.  A standalone server is ACTIVE from ``start``.  In a
pair, the core owns the ``BinaryStar`` table and changes role as it says.
Input that does not fit the role (a late step of a task whose role scope is
being cancelled) is ignored.

Active: a client KVSET gets the next sequence, is stored and is returned as
the KVPUB to publish (key, UUID and body as received; properties too, but
``ttl=0``, which means no expiry, is dropped: the canonical form).  TTL
deadlines expire into deletes with fresh sequences, at most ``limit`` a call.

Passive: the server is a client of the active, through a ``Replica`` of its
whole map and its repeat window.  A client KVSET waits on the pending list
until the active's copy is in the passive's map.  Taking over (``busy``
until done, in steps): the replica's backlog is brought into its newest
complete map, then the pending list is replayed in order with fresh
sequences and published; client writes that arrive meanwhile queue behind.

Both: a write already applied is a repeat and is dropped.  A repeat is
recognised by UUID: either it is the UUID the key was last written with, or
it is in the ``Applied`` window of replaced writes (see applied.py for how
long).  Writes with no UUID cannot be recognised: the active applies each
one it receives and the passive never holds or replays them.

The map's lineage
-----------------
Every map has an identity, ``lineage``: made when a server founds a map
(starts with none and no peer to copy), inherited by a sync and by a
takeover.  It is sent on HUGZ and KTHXBAI, so clients notice a server that
lost or replaced its map.  A pair's HUGZ also carry ``branch`` (the newest
sequence of this lineage that came from the peer) and ``fresh`` (the map
was founded empty by this process): the claims that decide dual actives.

Splits that heal
----------------
When both servers were active and the link heals, the map that holds more
wins: if the lineages differ, a fresh map loses to one that was inherited;
otherwise the primary wins.  The side that steps down hands every write it
accepted while active (its records and deletes newer than the branch point)
to the winner's collector, keeps them on its pending list (resent until
they are in its map again), and then resyncs.  The winner drops what it
already has: by UUID, and by sequence below its own branch point.
"""

from __future__ import annotations

import enum
import logging
import math
import uuid as uuidlib
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from trioclone.core.applied import Applied
from trioclone.core.bstar import BinaryStar, Outcome, State, decode_state
from trioclone.core.chp import (
    BRANCH,
    COUNT,
    FRESH,
    HISTORY,
    HUGZ,
    LINEAGE,
    RESERVED,
    SEQUENCE,
    SUBTREE_HUGZ,
    TTL,
    KVMsg,
    check_history,
    decode_history,
    decode_kvmsg,
    encode_properties,
    history_batch,
    hugz,
    integer_property,
    kthxbai,
    lineage_of,
    ttl_seconds,
)
from trioclone.core.pending import Pending
from trioclone.core.replica import Phase, Replica, Timings
from trioclone.core.store import Store
from trioclone.core.subtrees import Subtrees
from trioclone.errors import RemoteProtocolError

Frames = list[bytes]

RULE_RESERVED = (
    "a client may not write the reserved keys: HUGZ, KTHXBAI, \\x00history "
    "and subtree heartbeats (a key ending in \\x00HUGZ)"
)
#: The passive's snapshot requests come from a DEALER whose routing id starts
#: with this: they are not Binary Star votes (a peer is not a client).
PEER_IDENTITY = b"trioclone-peer:"
#: Work done per ``step``: enough to be cheap per schedule point, small
#: enough that heartbeats are never late.
STEP = 512
#: Housekeeping (window eviction, pending ages, relay resends) this often.
HOUSEKEEPING = 1.0
HISTORY_BATCH = 4096
#: A hand-over property (between the two servers of a pair): this delete is
#: a TTL expiry on the peer, whose maps forked at the sequence it holds.
EXPIRED = "expired"
RULE_WINDOW = (
    "a window hand-over comes from the peer of a pair's active, for its map "
    f"or the peer's, with at most {HISTORY_BATCH} UUIDs"
)
#: A hand-over property: this write was made by a server before it was
#: killed, in an active period that began at the branch it holds; it yields
#: to what the receiver wrote in an active period that began later.
FORK = "fork"
RULE_EXPIRED = "a hand-over's expired or fork names the sequence where the maps forked"


class Role(enum.Enum):
    WAITING = "waiting"
    ACTIVE = "active"
    PASSIVE = "passive"


_NO_SEQUENCE = bytes(8)


def is_handover(frames: Sequence[bytes]) -> bool:
    """True if ``collect`` would take the KVSET ``frames`` as a hand-over
    from the peer (a sequence and a lineage): a secured server takes those
    from the pair's key only."""
    if len(frames) != 5 or frames[1] == _NO_SEQUENCE:
        return False
    props = frames[3]
    return props.startswith(b"lineage=") or b"\nlineage=" in props


def random_lineage() -> str:
    return uuidlib.uuid4().hex


@dataclass(frozen=True)
class Claim:
    """What the peer's HUGZ said about its map."""

    lineage: str | None
    branch: int
    fresh: bool
    sequence: int
    heard: float


@dataclass(frozen=True, slots=True)
class ServerMap:
    """A server's map and its window of replaced writes (what a passive
    replicates), and the rules that keep the two in step.  (Slots, not a
    named tuple: its fields are read on the update path.)"""

    store: Store
    applied: Applied

    def is_repeat(self, uuid: bytes, current: bytes) -> bool:
        """A write already applied: its UUID is the one its key holds
        (``current``, from ``store.uuid_of``) or is in the window."""
        if not uuid:
            return False  # anonymous: never recognised
        return uuid == current or uuid in self.applied

    def record(
        self,
        msg: KVMsg,
        sequence: int,
        properties: bytes,
        ttl: float | None,
        now: float,
        current: bytes,
    ) -> None:
        """Put a write in the map at ``sequence``: the write it replaces
        (``current``) goes to the window, and so does a delete (it leaves no
        record to hold its UUID)."""
        applied = self.applied
        if current and current != msg.uuid:
            applied.add(current, now)
        if not msg.body:
            applied.add(msg.uuid, now)
        self.store.put(msg.key, sequence, msg.uuid, properties, msg.body, ttl, now)

    def remember(self, key: bytes, uuid: bytes, now: float) -> None:
        """The write ``uuid`` to ``key`` was applied: keep it a repeat (in the
        window, unless the key still holds it)."""
        if uuid and self.store.uuid_of(key) != uuid:
            self.applied.add(uuid, now)


@dataclass
class Takeover:
    """The work of becoming active, done in steps."""

    replica: Mirror | None
    contiguous: int  # every update up to it was heard
    base: int = 0  # the store's sequence once the backlog is in
    arrivals: deque[Frames] = field(default_factory=deque)


class ServerCore:
    """The state of one Clone server and the rules that change it."""

    def __init__(
        self,
        *,
        bstar: BinaryStar | None = None,
        applied_horizon: float = 120.0,
        applied_limit: int = 1_000_000,
        pending_size: int = 100_000,
        pending_age: float = 30.0,
        backlog_limit: int = 1_000_000,
        replica_timings: Timings | None = None,
        new_lineage: Callable[[], str] = random_lineage,
        journal: bool = False,
    ) -> None:
        self.bstar = bstar
        #: Maps note what changes, for a durable copy (server/datadir.py).
        self.journal = journal
        #: The map served (active) or the last complete copy (passive).
        self.map = ServerMap(
            Store(journal=journal),
            Applied(applied_horizon, applied_limit, journal=journal),
        )
        self.pending = Pending(pending_size, pending_age)
        self.subtrees = Subtrees(sequence=lambda: self.store.sequence)
        self.backlog_limit = backlog_limit
        self.replica_timings = replica_timings or Timings(request_timeout=5.0)
        self.role = Role.WAITING
        self.lineage: str | None = None
        self.fresh = False
        self.branch = 0
        self.replica: Mirror | None = None
        self.peer_claim: Claim | None = None
        #: Hand-over writes for the peer's collector (the shell sends them).
        self.relays: list[Sequence[bytes]] = []
        #: (level, message) for the shell to log: things an operator must know.
        self.notices: list[tuple[int, str]] = []
        self.stats: Counter[str] = Counter()
        #: On a secured server: may this User-Id write these KVSET frames
        #: now?  Asked again of each held write a takeover replays.
        self.vet: Callable[[str, Sequence[bytes]], bool] | None = None
        self._new_lineage = new_lineage
        self._takeover: Takeover | None = None
        self._handoff: Iterator[tuple[Frames, Frames] | None] | None = None
        self._handoff_held_at = 0
        self._active_since = 0.0
        #: The window handed over at the last step-down, resent with the
        #: records until they are all in.
        self._window_relays: list[Frames] = []
        self._sweep: Iterator[bytes] | None = None
        self._tombstones: OrderedDict[bytes, tuple[int, bytes, int]] = OrderedDict()
        #: Keys whose tombstone changed, for a durable copy (None: not kept).
        self.tombstones_changed: set[bytes] | None = set() if journal else None
        self._following_since: float | None = None
        self._housekeeping_at = 0.0
        #: The map was loaded from disk and neither synced nor served since.
        self.restored = False
        #: ... and this server was its active when it stopped.
        self._restored_active = False
        #: Why this server must stop: its map on disk is not its peer's.
        self.conflict: str | None = None
        self._restored_history: str | None = None
        #: The map's sequence when this process's active period began.
        self._active_base = 0
        #: The map whose writes the last step-down hands over.
        self._handed_map: ServerMap | None = None

    # -- state ----------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self.map.store

    @property
    def applied(self) -> Applied:
        return self.map.applied

    @property
    def serving(self) -> bool:
        """Answering snapshots and applying writes (a takeover is done)."""
        return self.role is Role.ACTIVE and self._takeover is None

    @property
    def synced(self) -> bool:
        """Active, or passive with a complete copy of the active's map."""
        if self.role is Role.PASSIVE:
            replica = self.replica
            return replica is not None and replica.phase is Phase.ACTIVE
        return self.role is Role.ACTIVE

    @property
    def sequence(self) -> int:
        replica = self.replica
        return replica.sequence if replica is not None else self.store.sequence

    @property
    def busy(self) -> bool:
        """Bounded work waits for ``step``."""
        replica = self.replica
        return (
            self._takeover is not None
            or self._handoff is not None
            or self._sweep is not None
            or (replica is not None and replica.busy)
        )

    @property
    def incoming(self) -> ServerMap | None:
        """A map being built to replace ``map`` (the passive's sync): a
        durable copy writes it ahead, so the swap is cheap."""
        replica = self.replica
        if replica is None and self._takeover is not None:
            replica = self._takeover.replica
        incoming = None if replica is None else replica.incoming
        return None if incoming is self.map else incoming

    @property
    def own_writes(self) -> bool:
        """The map holds writes this server accepted as active, after
        ``branch`` (so it hands them over if it finds a peer active): it
        is active, or was when it stopped, or still hands them over."""
        takeover = self._takeover
        return (
            (
                self.role is Role.ACTIVE
                and (takeover is None or takeover.replica is None)
            )
            or self._restored_active
            or (
                (self._handoff is not None or self.pending.relaying)
                and self.map is self._handed_map
            )
        )

    @property
    def map_history(self) -> str | None:
        """The history the map belongs to (``chp.map_of``): a passive's, the
        active's it copied; else the lineage and branch it serves."""
        replica = self.replica
        if replica is not None and replica.history is not None:
            return replica.history
        if self.restored:
            return self._restored_history
        return None if self.lineage is None else f"{self.lineage}/{self.branch}"

    def tombstone(self, key: bytes) -> tuple[int, bytes, int] | None:
        """The delete (sequence, UUID, and for a TTL expiry the sequence of
        the write that expired, else 0) this server made
        of ``key`` while active, if it still hands it over after a split."""
        return self._tombstones.get(key)

    def restore(
        self,
        lineage: str,
        branch: int,
        active: bool,
        history: str | None,
        tombstones: Iterable[tuple[bytes, int, bytes, int]] = (),
    ) -> None:
        """The map (``store`` and ``applied``) was loaded from disk: its
        lineage, whether this server was its active (its own writes are
        those after ``branch``) or a passive (everything came from the
        peer) when it stopped, and the history it belongs to."""
        self.lineage = lineage
        self.fresh = False
        self.branch = branch if active else self.store.sequence
        self._restored_history = history
        self.restored = True
        if active:  # (a step-down hands them over with its writes)
            for key, sequence, uuid, expired in sorted(tombstones, key=lambda t: t[1]):
                self._tombstones[key] = (sequence, uuid, expired)
        self._restored_active = active
        if active:
            self._active_since = -math.inf  # its whole window is its own

    def start(self, now: float) -> None:
        """A standalone server founds its map and is active from now."""
        if self.bstar is None:
            self._become_active(now)

    # -- Binary Star ---------------------------------------------------------

    def on_request(
        self, now: float, *, from_peer: bool = False, subtree: bytes | None = None
    ) -> tuple[bool, Outcome | None]:
        """A snapshot request for ``subtree``: whether to answer it, and its
        Binary Star vote.

        A request from the peer (its passive syncing) is no vote: only the
        active answers it, and its request for our window (HISTORY, asked
        last) says that it has a complete copy of our map (``peer_synced``).
        Any other request is a client's vote.
        """
        if from_peer:
            answer = self.role is Role.ACTIVE
            if answer and subtree == HISTORY:
                self.peer_synced()
            return answer, None
        outcome = self.on_vote(now)
        return outcome is None or outcome.accepted, outcome

    def peer_synced(self) -> None:
        """The peer asked for our window: it completed a copy of our map, so
        the map is the pair's now, not one this server just founded."""
        if self.role is Role.ACTIVE:
            self.fresh = False

    def on_vote(self, now: float) -> Outcome | None:
        """A snapshot request (a vote); None for a standalone server.

        ``outcome.accepted`` says whether to answer it.
        """
        if self.bstar is None:
            return None
        outcome = self.bstar.on_vote(now)
        self._follow(outcome, now)
        return outcome

    def on_peer_state(self, frames: list[bytes], now: float) -> Outcome:
        """A Binary Star heartbeat from the peer (``RemoteProtocolError`` if bad)."""
        assert self.bstar is not None
        peer = decode_state(frames)
        if peer is not State.PASSIVE:
            self._following_since = None
        elif self._following_since is None:
            self._following_since = now
        outcome = self.bstar.on_peer(peer, now, keep_active=self._verdict(now))
        self._follow(outcome, now)
        return outcome

    def on_peer_hugz(self, frames: list[bytes], now: float) -> None:
        """A HUGZ from the peer's publisher: its claim, for dual actives."""
        msg = decode_kvmsg(frames)
        if msg.key != HUGZ:
            return
        self.peer_claim = Claim(
            lineage_of(msg),
            integer_property(msg, BRANCH) or 0,
            msg.properties.get(FRESH) == "1",
            msg.sequence,
            now,
        )
        self._restart_handoff(now)

    def _verdict(self, now: float) -> bool | None:
        """Should we stay active if both are?  None: cannot tell yet.

        A map handed down (synced, or kept on disk) beats a map founded
        empty by this process.  Without the peer's claim, a fresh map yields
        at once and a handed-down one waits (then Binary Star lets the
        primary win): so an empty, restarted server never wins, even when
        its peer's HUGZ do not reach it.
        """
        claim, bstar = self.peer_claim, self.bstar
        assert bstar is not None
        if claim is None or now - claim.heard > bstar.expiry:
            return False if self.fresh else None
        if claim.lineage != self.lineage and claim.fresh != self.fresh:
            return not self.fresh
        return bstar.primary

    def _follow(self, outcome: Outcome, now: float) -> None:
        if not outcome.changed:
            return
        if outcome.state is State.ACTIVE:
            self._become_active(now)
        elif outcome.state is State.PASSIVE:
            self._become_passive(now)

    # -- client updates (every role) -----------------------------------------

    def collect(
        self, frames: Sequence[bytes], now: float, user: str | None = None
    ) -> Frames | None:
        """A client's KVSET: the KVPUB to publish, or None (held or dropped).

        ``user``: its sender on a secured server; a passive holds it with
        the write, so ``vet`` checks it again if the write is replayed at a
        takeover.  Raises ``RemoteProtocolError`` for a malformed update;
        nothing changes.
        """
        msg = decode_kvmsg(frames)
        key = msg.key
        if key == HISTORY and msg.sequence and LINEAGE in msg.properties:
            self._window_handed_over(msg, now)
            return None
        if key in RESERVED or key.endswith(SUBTREE_HUGZ):  # is_reserved, inline
            raise RemoteProtocolError(RULE_RESERVED)
        if msg.sequence and LINEAGE in msg.properties:
            handed = self._handed_over(msg, now)
            if handed is None:
                return None
            msg, frames = handed
        smap = self.map
        current = smap.store.uuid_of(key)
        if smap.is_repeat(msg.uuid, current):
            self.stats["duplicates"] += 1
            return None
        if self.role is Role.ACTIVE:
            if self._takeover is None:
                return self._apply(msg, frames, now, current)
            self._takeover.arrivals.append(list(frames))
            return None
        if not self.pending.hold(
            msg.uuid, frames, now, self._heard_sequence(), user=user
        ):
            self.stats["anonymous_not_held"] += 1
        return None

    def _handed_over(self, msg: KVMsg, now: float) -> tuple[KVMsg, Frames] | None:
        """A write the peer accepted while both were active, as a client write."""
        if msg.properties[LINEAGE] == self.lineage and msg.sequence <= self.branch:
            self.stats["handoff_known"] += 1  # it came to us from the peer
            return None
        expired = msg.properties.get(EXPIRED, msg.properties.get(FORK))
        if expired is not None:
            try:
                fork = int(expired)
            except ValueError:
                raise RemoteProtocolError(RULE_EXPIRED, expired) from None
            restart = EXPIRED not in msg.properties
            if restart:
                # A restart's ``fork`` is the branch its sender's active
                # period began at.  If ours began later (we took over from
                # its map, after its writes there), what we wrote since is
                # newer.  If earlier (it took over from ours, once we had
                # stopped), only what we wrote since this process took over
                # again, after its restart, is newer.
                fork = self.branch if fork < self.branch else self._active_base
            if msg.properties[LINEAGE] == self.lineage and self._written_since(
                msg.key, fork, restart=restart
            ):
                # Written (or deleted) here after the maps forked, by a write
                # the peer did not replace (its window, handed over first,
                # would say so): newer than the expiry, or than the write of
                # a server whose active period ended before ours began, so
                # it stays; the write handed over is still one that was
                # applied (a late copy of it is a repeat).
                self.stats["handoff_superseded"] += 1
                self.applied.add(msg.uuid, now)
                return None
        self.stats["handoff_received"] += 1
        props = {
            k: v for k, v in msg.properties.items() if k not in (LINEAGE, EXPIRED, FORK)
        }
        encoded = encode_properties(props) if props else b""
        plain = msg._replace(sequence=0, properties=props)
        return plain, [msg.key, bytes(8), msg.uuid, encoded, msg.body]

    def _written_since(self, key: bytes, fork: int, *, restart: bool = False) -> bool:
        """``key`` was deleted here after sequence ``fork``, or written by a
        write that is not in our window of replaced ones (the peer's window,
        handed over first, would have put it there)."""
        store = self.store
        tombstone = self._tombstones.get(key)
        if tombstone is not None and tombstone[0] > fork:
            # deleted here since; or expired, which after a restart counts
            # only if the write that expired was made since (an expiry of a
            # value from our older map, which the peer's write replaced,
            # does not)
            return not (restart and tombstone[2]) or tombstone[2] > fork
        return store.sequence_of(key) > fork and store.uuid_of(key) not in self.applied

    def _window_handed_over(self, msg: KVMsg, now: float) -> None:
        """Writes the peer applied and replaced while both were active: a
        late copy of one (a client's pipe delivers it after the split
        heals) is a repeat here too, never applied over what replaced it.

        Only an active of a pair takes one, of its own lineage or its peer's,
        at most ``HISTORY_BATCH`` UUIDs a message."""
        uuids, age = decode_history(msg)
        claim, lineage = self.peer_claim, msg.properties[LINEAGE]
        if self.bstar is None or self.role is not Role.ACTIVE:
            raise RemoteProtocolError(RULE_WINDOW, "not the active of a pair")
        if lineage != self.lineage and (claim is None or lineage != claim.lineage):
            raise RemoteProtocolError(RULE_WINDOW, "another map's window")
        if len(uuids) > HISTORY_BATCH:
            raise RemoteProtocolError(RULE_WINDOW, f"{len(uuids)} UUIDs")
        self.applied.load([(age, uuids)], now)
        self.stats["handoff_window"] += len(uuids)

    def _apply(
        self, msg: KVMsg, frames: Sequence[bytes], now: float, current: bytes
    ) -> Frames:
        smap, props, ttl = self.map, frames[3], None
        sequence = smap.store.next_sequence()
        properties = msg.properties
        if TTL in properties:  # parsed once, and only if there
            ttl = ttl_seconds(properties)
            if ttl is None:  # ttl=0: no expiry, stored and published without it
                rest = {k: v for k, v in properties.items() if k != TTL}
                props = encode_properties(rest) if rest else b""
        smap.record(msg, sequence, props, ttl, now, current)
        key = msg.key
        if msg.body:
            tombstones = self._tombstones
            if tombstones and key in tombstones:
                del tombstones[key]
                if self.tombstones_changed is not None:
                    self.tombstones_changed.add(key)
        elif msg.uuid:
            self._tombstone(key, sequence, msg.uuid)
        if self.subtrees.tracked:
            self.subtrees.published(key, sequence)
        self.stats["updates"] += 1
        return [key, SEQUENCE.pack(sequence), frames[2], props, frames[4]]

    def _tombstone(
        self, key: bytes, sequence: int, uuid: bytes, *, expired: int = 0
    ) -> None:
        """Remember a client's delete (or a TTL expiry), for a hand-over after
        a split."""
        tombstones, changed = self._tombstones, self.tombstones_changed
        tombstones.pop(key, None)
        tombstones[key] = (sequence, uuid, expired)
        if changed is not None:
            changed.add(key)
        if len(tombstones) > self.pending.max_size:
            dropped, _ = tombstones.popitem(last=False)
            self.stats["tombstones_dropped"] += 1
            if changed is not None:
                changed.add(dropped)

    def _heard_sequence(self) -> int:
        """The newest sequence of the active's that we know of."""
        replica = self.replica
        return replica.heard_sequence if replica is not None else self.store.sequence

    # -- the passive's replica of the active ---------------------------------

    def on_reply(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the passive's snapshot connection to the active."""
        replica = self.replica
        if self.role is Role.PASSIVE and replica is not None:
            replica.on_reply(frames, now)
            if replica.refused_new_map and self.bstar is not None:
                replica.refused_new_map = False
                self.notices.append(
                    (
                        logging.ERROR,
                        "the active serves a map it founded empty after ours; "
                        "keeping ours: taking over (the other steps down when "
                        "it hears us, and hands over its writes)",
                    )
                )
                self._follow(self.bstar.seize(), now)

    def on_update(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the passive's subscription to the active's stream."""
        if self.role is Role.PASSIVE and self.replica is not None:
            self.replica.on_update(frames, now)

    # -- active work ---------------------------------------------------------

    def expire(self, now: float, limit: int = STEP) -> list[Frames]:
        """Deletes to publish for keys whose TTL has passed (at most ``limit``)."""
        if not self.serving:
            return []
        store, applied, subtrees = self.store, self.applied, self.subtrees
        deletes = []
        for key, uuid, written in store.expire_with_uuids(now, limit):
            applied.add(uuid, now)
            sequence = store.next_sequence()
            if uuid and self.bstar is not None:
                # A hand-over after a split carries it (as a delete by the
                # expired write's UUID): a late copy of an older write that
                # reaches the winner first must not outlive it.
                self._tombstone(key, sequence, uuid, expired=written)
            if subtrees.tracked:
                subtrees.published(key, sequence)
            deletes.append([key, SEQUENCE.pack(sequence), b"", b"", b""])
        self.stats["expired"] += len(deletes)
        return deletes

    def hugz(self) -> Frames:
        props = {LINEAGE: self.lineage or ""}
        if self.bstar is not None:
            if self._takeover is None:  # (its branch is set once it is done)
                props[BRANCH] = str(self.branch)
            if self.fresh:
                props[FRESH] = "1"
        return hugz(self.store.sequence, props)

    def kthxbai(self, subtree: bytes) -> Frames:
        props = {LINEAGE: self.lineage or ""}
        if subtree != HISTORY:
            self.subtrees.track(subtree, snapshot=True)
        count = self.subtrees.counts.get(subtree)
        if count is not None:  # where the client counts its heartbeats from
            props[COUNT] = str(count)
        if self.bstar is not None:
            props[BRANCH] = str(self.branch)  # as on HUGZ: the same history
            if self.fresh:
                props[FRESH] = "1"  # a passive holding another map keeps it
        return kthxbai(self.store.sequence, subtree, props)

    def history(self, now: float) -> Iterator[Frames]:
        """The reply to a HISTORY request: the window, in batches."""
        for age, uuids in self.applied.export(now):
            for start in range(0, len(uuids), HISTORY_BATCH):
                yield history_batch(uuids[start : start + HISTORY_BATCH], age)

    # -- timers --------------------------------------------------------------

    def next_deadline(self) -> float:
        replica = self.replica
        if replica is not None and self.role is Role.PASSIVE:
            return min(replica.next_deadline(), self._housekeeping_at)
        return self._housekeeping_at

    def poll(self, now: float) -> None:
        """Timers: the passive's replica, window and pending ages, relays."""
        replica = self.replica
        if replica is not None and self.role is Role.PASSIVE:
            replica.poll(now)
        if now < self._housekeeping_at:
            return
        self._housekeeping_at = now + HOUSEKEEPING
        self.applied.retain = self._retaining(now)
        if not self.applied.retain and self.role is Role.ACTIVE:
            if self.tombstones_changed is not None:
                self.tombstones_changed.update(self._tombstones)
            self._tombstones.clear()  # the peer follows us: no split to heal
        self.applied.evict(now)
        if self.role is not Role.ACTIVE:
            self.pending.expire(now)
        due = self.pending.due(now, HOUSEKEEPING)
        if not self.pending.relaying:
            self._window_relays = []  # every hand-over is in; or we took over
        elif due:  # resent like the records (the first send can be lost), first
            self.relays.extend(self._window_relays)
        self.relays.extend(due)

    def _retaining(self, now: float) -> bool:
        """Keep replaced writes while a split may have to be reconciled: while
        the peer is not heard following us, and for a while after."""
        bstar = self.bstar
        if bstar is None or self.role is not Role.ACTIVE:
            return False
        if bstar.peer_state is not State.PASSIVE or bstar.peer_expired(now):
            self._following_since = None
        since = self._following_since
        grace = self.pending.max_age + bstar.expiry
        return since is None or now - since < grace

    # -- role changes --------------------------------------------------------

    def _become_active(self, now: float) -> None:
        if self.role is Role.ACTIVE:
            return
        self.role = Role.ACTIVE
        self.restored = self._restored_active = False
        self._active_since = now
        self.subtrees.clear()
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.settle(now)
        # without a replica nothing was heard: contiguous up to what we hold
        self._takeover = Takeover(replica, self.store.sequence)
        if replica is None:
            self._begin_replay()
            if not self.pending:
                self._takeover = None

    def _become_passive(self, now: float) -> None:
        if self.role is Role.ACTIVE:
            self._start_handoff(now)
        self.role = Role.PASSIVE
        self._takeover = None
        self.subtrees.clear()
        self.replica = Mirror(self, self.map)
        self._restart_handoff(now)

    def _restart_handoff(self, now: float, history: str | None = None) -> None:
        """Restarted holding a map we served, and the peer is active: hand
        over what we accepted after the point its map forked from ours,
        once we know that point (its HUGZ, or the snapshot of its map)."""
        if not self._restored_active or self.role is not Role.PASSIVE:
            return
        if history is None:
            claim = self.peer_claim
            if claim is None or claim.lineage != self.lineage:
                return  # not yet (or another map: see Mirror._adopting)
            branch = claim.branch
        else:
            lineage, _, named = history.partition("/")
            if lineage != self.lineage:
                return
            branch = int(named) if named.isdigit() else 0
        self._restored_active = False
        self._start_handoff(now, restarted=True, peer_branch=branch)

    def step(self, now: float, limit: int = STEP) -> list[Frames]:
        """A bounded piece of the work in hand; frames to publish."""
        if self._handoff is not None:
            self._handoff_step(now, limit)
            return []
        if self._sweep is not None:
            self._sweep_step(limit)
            return []
        replica = self.replica
        if replica is not None and replica.busy:
            replica.catch_up(now, limit)
            return []
        takeover = self._takeover
        if takeover is None:
            return []
        if takeover.replica is not None:
            if takeover.replica.busy:
                takeover.replica.catch_up(now, limit)
                return []
            self._take_over_map(takeover.replica)
            takeover.replica = None
            self._begin_replay()
        return self._replay(now, limit)

    def _adopt(self, replica: Mirror) -> None:
        """The replica's newest complete map becomes the server's map, with
        its sequence and lineage."""
        self.map = replica.live
        self.store.sequence = replica.sequence
        if replica.lineage is not None:
            self.lineage = replica.lineage

    def _replica_synced(self, replica: Mirror, now: float) -> None:
        """The passive's replica has a fresh copy of the active's map."""
        self._restart_handoff(now, replica.history)  # (from the map we held)
        self._adopt(replica)
        self.fresh = self.restored = False
        self._sweep = iter(self.pending.uuids())  # matched a step at a time

    def _take_over_map(self, replica: Mirror) -> None:
        """Taking over: the replica's map, its backlog in, is ours to serve."""
        self._adopt(replica)
        assert self._takeover is not None
        self._takeover.contiguous = replica.contiguous
        if replica.synced_once:
            self.fresh = False
            self.branch = self.store.sequence
        elif self.restored:
            self.notices.append(
                (
                    logging.WARNING,
                    "taking over with the map kept on disk "
                    f"({len(self.store)} keys, sequence {self.store.sequence}) "
                    "and what arrived since: no complete snapshot from the peer",
                )
            )
        else:
            self.stats["unsynced_takeovers"] += 1
            self.notices.append(
                (
                    logging.ERROR,
                    "taking over before any complete snapshot from the peer: "
                    f"serving the last complete copy ({len(self.store)} keys) and "
                    "what arrived since; updates the peer published before that "
                    "and that did not reach us are lost",
                )
            )

    def _begin_replay(self) -> None:
        if self.lineage is None:  # no map was ever handed to us: found one
            self.lineage = self._new_lineage()
            self.fresh = True
            self.branch = 0
        assert self._takeover is not None
        self._takeover.base = self._active_base = self.store.sequence
        self.pending.relay_off()

    def _replay(self, now: float, limit: int) -> list[Frames]:
        """Apply and publish the pending list, then what arrived meanwhile."""
        takeover = self._takeover
        assert takeover is not None
        smap, store, published = self.map, self.store, []
        for held in self.pending.take(limit):
            msg = decode_kvmsg(held.frames)
            current = store.uuid_of(msg.key)
            if smap.is_repeat(msg.uuid, current):
                continue
            # Unmatched: not applied by the old active up to where we heard
            # it without a gap.  Replayed now, it keeps the active's order
            # (as if it reached the active late), unless a write to its key
            # that reached us after it was applied: then it was lost on the
            # way (a client's writes reach the active in order) or is stale
            # (held from a map that was lost), and replaying it would undo a
            # newer write.  Its writer, if still waiting, resends it.  Past a
            # gap it may have been applied before a later write to the key
            # that we heard: that one wins, and its resend is a repeat.
            written = store.sequence_of(msg.key)  # (0 if deleted)
            if held.sequence < written <= takeover.base and (
                written > takeover.contiguous
            ):
                self.stats["pending_superseded"] += 1
                self.applied.add(msg.uuid, now)
                continue
            if self.pending.arrived_after(held):
                self.stats["pending_superseded"] += 1
                continue
            vet = self.vet
            if (
                held.user is not None
                and vet is not None
                and not vet(held.user, held.frames)
            ):
                self.stats["pending_refused"] += 1  # permissions changed since
                continue
            published.append(self._apply(msg, held.frames, now, current))
        self.stats["takeover_applied"] += len(published)
        arrivals = takeover.arrivals
        while arrivals and len(published) < limit and not self.pending:
            frames = arrivals.popleft()
            msg = decode_kvmsg(frames)
            current = store.uuid_of(msg.key)
            if smap.is_repeat(msg.uuid, current):
                self.stats["duplicates"] += 1
                continue
            published.append(self._apply(msg, frames, now, current))
        if not self.pending and not arrivals:
            self._takeover = None
            self.pending.matched.clear()
        return published

    def _sweep_step(self, limit: int) -> None:
        """Match pending writes that a new snapshot holds or replaced."""
        sweep, pending, smap = self._sweep, self.pending, self.map
        assert sweep is not None
        for count, uuid in enumerate(sweep, 1):
            key = pending.key_of(uuid)
            if key is not None and smap.is_repeat(uuid, smap.store.uuid_of(key)):
                pending.match(uuid)
            if count >= limit:
                return
        self._sweep = None

    # -- a split that heals ----------------------------------------------------

    def _start_handoff(
        self, now: float, *, restarted: bool = False, peer_branch: int = 0
    ) -> None:
        """Stepping down from ACTIVE (or finding the peer active after a
        restart, holding a map we served): give the peer what we accepted.
        After a restart, each write yields to one the peer made after the
        fork: the peer took over once we had stopped, so after our writes."""
        bound = max(self.branch, peer_branch)
        claim = self.peer_claim
        if (
            claim is not None
            and self.lineage is not None
            and claim.lineage == self.lineage
        ):
            bound = max(bound, claim.branch)
        tombstones, self._tombstones = self._tombstones, OrderedDict()
        self._handed_map = self.map  # (kept as its own until a resync)
        why = (
            "restarted, the peer active"
            if restarted
            else "stepping down after dual actives"
        )
        self.notices.append(
            (
                logging.WARNING,
                f"{why}: handing the writes accepted while active "
                f"(after sequence {bound}) to the peer",
            )
        )
        # At a later takeover, a hand-over write yields to a write the winner
        # made to the same key after it (its sequence then was claim.sequence).
        self._handoff_held_at = claim.sequence if claim is not None else 2**63 - 1
        self._hand_over_window(now, {uuid for _, uuid, _ in tombstones.values()})
        self._handoff = _handoff_frames(
            self.store,
            tombstones,
            bound,
            self.lineage or "",
            now,
            fork=restarted,
            branch=self.branch,
        )

    def _handoff_step(self, now: float, limit: int) -> None:
        """Hand over up to ``limit`` records: each is sent, and held until
        the peer's copy is in our map.  Once a sync has replaced the map we
        hand over by a complete copy of the peer's, a write that copy holds
        or replaced is a repeat there: the peer never applies it, so never
        publishes it, and the sync's sweep saw only what was held before.
        It is sent, but not held."""
        handoff = self._handoff
        assert handoff is not None
        smap = self.map
        peers = smap if smap is not self._handed_map else None
        for count, forms in enumerate(handoff, 1):  # records looked at
            if forms is not None:
                client, peer = forms
                key, uuid = client[0], client[2]
                if peers is None or not peers.is_repeat(uuid, peers.store.uuid_of(key)):
                    held_at = self._handoff_held_at
                    self.pending.hold(uuid, client, now, held_at, relay=peer)
                self.relays.append(peer)
                self.stats["handoff_sent"] += 1
            if count >= limit:
                return
        self._handoff = None

    def _hand_over_window(self, now: float, handed: set[bytes]) -> None:
        """First, before any record (so no late copy of a replaced write can
        arrive between a record and the window), and from the map we served
        (a resync may replace it before the records are all out): the UUIDs
        we replaced while active, less the deletes handed over, which must
        still apply there."""
        stamp = {LINEAGE: self.lineage or ""}
        since = now - self._active_since + HOUSEKEEPING
        self._window_relays = []
        for age, uuids in self.applied.export(now):
            if age > since:
                continue
            fresh = [uuid for uuid in uuids if uuid not in handed]
            for start in range(0, len(fresh), HISTORY_BATCH):
                batch = history_batch(fresh[start : start + HISTORY_BATCH], age)
                props = encode_properties({**decode_kvmsg(batch).properties, **stamp})
                frames = [HISTORY, SEQUENCE.pack(1), b"", props, batch[4]]
                self._window_relays.append(frames)
                self.relays.append(frames)

    # -- status ----------------------------------------------------------------

    def status(self) -> dict[str, object]:
        return {
            "role": self.role.value,
            "lineage": self.lineage,
            "sequence": self.sequence,
            "keys": len(self.store),
            "pending": len(self.pending),
            "pending_dropped": self.pending.dropped,
            "window": len(self.applied),
            "window_evicted_early": self.applied.evicted_early,
            "subtrees_tracked": len(self.subtrees),
            "subtrees_untracked": self.subtrees.untracked,
            **self.stats,
            **({} if self.replica is None else _prefixed(self.replica.stats)),
        }


def _prefixed(stats: Counter[str]) -> dict[str, int]:
    return {f"sync_{name}": count for name, count in stats.items()}


def _handoff_frames(
    store: Store,
    tombstones: OrderedDict[bytes, tuple[int, bytes, int]],
    bound: int,
    lineage: str,
    now: float,
    *,
    fork: bool = False,
    branch: int = 0,
) -> Iterator[tuple[Frames, Frames] | None]:
    """Every client write newer than ``bound`` (values, then deletes), as the
    client wrote it and as handed over (our sequence, our ``lineage``, and
    with ``fork`` our ``branch``, where our active period began: each
    yields to the peer's writes if its period began later); None for each
    record passed over, so a step counts it."""
    zero = bytes(8)
    stamp = encode_properties(
        {LINEAGE: lineage, **({FORK: str(branch)} if fork else {})}
    )
    for key in store.keys(b""):
        msg = store.get(key, now) if store.sequence_of(key) > bound else None
        if msg is None or not msg.uuid:
            yield None
            continue
        props = encode_properties(msg.properties) if msg.properties else b""
        ours = SEQUENCE.pack(msg.sequence)
        client = [key, zero, msg.uuid, props, msg.body]
        yield client, [key, ours, msg.uuid, props + stamp, msg.body]
    expiry = encode_properties({LINEAGE: lineage, EXPIRED: str(bound)})
    for key, (sequence, uuid, expired) in tombstones.items():
        if sequence > bound and key not in store:
            client = [key, zero, uuid, b"", b""]
            props = expiry if expired else stamp
            yield client, [key, SEQUENCE.pack(sequence), uuid, props, b""]
        else:
            yield None


class Mirror(Replica[ServerMap]):
    """The passive's replica of the active's map and repeat window."""

    def __init__(self, core: ServerCore, live: ServerMap) -> None:
        super().__init__(
            1,
            (b"",),
            core.replica_timings,
            live,
            extra=(HISTORY,),
            backlog_limit=core.backlog_limit,
        )
        self.core = core
        self.sequence = live.store.sequence
        self.lineage = core.lineage
        if core.restored:  # what the map kept on disk belongs to
            self.history = core.map_history
        #: The active serves a map founded empty after ours: not adopted.
        self.refused_new_map = False

    @property
    def heard_sequence(self) -> int:
        return max(self.sequence, self._high)

    def _new_map(self) -> ServerMap:
        window, journal = self.core.applied, self.core.journal
        return ServerMap(
            Store(journal=journal),
            Applied(window.horizon, window.limit, journal=journal),
        )

    def _put(self, target: ServerMap, msg: KVMsg, now: float) -> None:
        props = encode_properties(msg.properties) if msg.properties else b""
        current = target.store.uuid_of(msg.key)
        target.record(msg, msg.sequence, props, msg.ttl, now, current)

    def _confirm(self, target: ServerMap, msg: KVMsg, now: float) -> None:
        self.core.pending.match(msg.uuid)
        target.remember(msg.key, msg.uuid, now)  # in the snapshot, then replaced

    def _confirm_live(self, msg: KVMsg, now: float) -> None:
        # ``_put`` just stored it: the key holds its UUID, or it was a delete
        # and ``_put`` put its UUID in the window.
        self.core.pending.match(msg.uuid)

    def _adopting(self, end: KVMsg, now: float) -> bool:
        """Never replace the map we hold by one the active founded empty
        since (a restarted server that got a vote while cut off from us):
        its KTHXBAI says ``fresh``."""
        core = self.core
        holding = core.lineage is not None and not core.fresh
        theirs = lineage_of(end)
        if holding and theirs != core.lineage:
            if end.properties.get(FRESH):
                self.refused_new_map = True  # the core takes over
                return False
            if core.restored:  # another pair's map, or ours was reset
                core.conflict = (
                    f"the map kept on disk (lineage {core.lineage}) is not the "
                    f"peer's (lineage {theirs}): neither is replaced; start "
                    "this server with --reset-data to copy the peer's map"
                )
                return False
        return True

    def _check_extra(self, request: bytes, msg: KVMsg) -> None:
        if request == HISTORY and msg.key == HISTORY:
            # RemoteProtocolError as it arrives; the UUIDs are cut out once,
            # by ``_extra`` (held as one body each meanwhile: 3x smaller)
            check_history(msg)

    def _extra(self, request: bytes, msg: KVMsg, now: float) -> int:
        """A batch of the active's window, into the incoming one."""
        if request != HISTORY or msg.key != HISTORY or self._incoming is None:
            return 1
        uuids, age = decode_history(msg)
        self._incoming.applied.load([(age, uuids)], now)
        return 1 + len(uuids) // 8

    def _updated(self, msg: KVMsg) -> None:
        # ``core.sequence`` is ours already; the store's is kept equal, as
        # the shell and its tests read it
        self.live.store.sequence = msg.sequence

    def _swapped(self, old: ServerMap, now: float) -> None:
        self.core._replica_synced(self, now)
