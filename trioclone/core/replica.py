"""Following a Clone server, sans-IO: the core that clients and the passive share.

The Binary Star design says the passive server is a client of the active
one, so the snapshot, stream, gap, reset and failover rules live here once.
``ClientCore`` builds on it with a dict for a map; the passive server with
its ``Store`` and repeat window.

Rules
-----
* INITIAL -> SYNCING: pick the next server, subscribe (``Connect``), then ask
  for a snapshot of each subtree in turn (``Request``), then for each extra
  request (a passive asks for the active's repeat window).  Subscribing
  first means the stream holds every update published after the snapshot.
* SYNCING: KVSYNCs fill a fresh map; each KTHXBAI gives the subtree's
  sequence and the map's lineage.  Stream updates wait in a backlog.  When
  every reply is in, the backlog is applied to the fresh map in bounded
  steps (``catch_up``): an update its subtree's snapshot already holds is
  only confirmed, a newer one is applied.  Then the fresh map replaces the
  live one.  -> ACTIVE.
* A stream update counts as confirmed (``_confirm``) only once the map that
  holds it is the live map.  An update seen during a sync that fails stays
  in the backlog for the next attempt on the same server: it is dropped only
  when the client moves to another server or the server's map is replaced,
  or when the backlog overflows ``backlog_limit`` (counted).  A passive that
  takes over applies what is left on top of its last complete map.
* SYNCING, no reply for ``request_timeout``: the server is down or rejected
  our vote.  Try the next server; after a whole round of failures wait
  ``backoff`` (doubling up to ``max_backoff``).  Never give up.
* ACTIVE: an update is applied only if newer than the last one applied;
  anything heard keeps the server alive; ``silence_timeout`` without a word
  -> the next server, SYNCING.
* Missed updates -> snapshot again on the same connection:
  - the stream went live after the snapshot (its first message says from
    when: a HUGZ with sequence h, from h; an update u, from u - 1);
  - whole map: a sequence gap (an update that skips one, a HUGZ ahead);
  - a subtree: its subtree heartbeat names a later update than we have.
* A server that lost or replaced its map is a reset: the HUGZ (or KTHXBAI)
  lineage changed, or a sequence went backwards on the stream (a HUGZ with
  sequence 0, the RFC's form, says nothing).  The backlog is dropped and
  the client snapshots again.
* With several subtrees each snapshot has its own sequence; until the
  stream passes the newest, an update is applied only if it is newer than
  the snapshot of its own subtree.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

from trioclone.core.chp import (
    COUNT,
    HUGZ,
    KTHXBAI,
    LAST,
    SUBTREE_HUGZ,
    KVMsg,
    decode_kvmsg,
    integer_property,
    is_subtree_hugz,
    lineage_of,
    map_of,
)
from trioclone.errors import LocalProtocolError

M = TypeVar("M")

#: Backlog entries applied per ``catch_up`` step.
CATCH_UP_STEP = 1024


class Phase(enum.Enum):
    INITIAL = "initial"
    SYNCING = "syncing"
    ACTIVE = "active"


@dataclass(frozen=True)
class Timings:
    """When a replica gives up on a reply, on a silent server, and backs off."""

    request_timeout: float = 1.0
    silence_timeout: float = 2.0
    backoff: float = 0.5
    max_backoff: float = 5.0

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if not (isinstance(value, int | float) and 0 < value < math.inf):
                raise LocalProtocolError(
                    f"{spec.name} must be a positive number of seconds, got {value!r}"
                )


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
    """Publish ``frames`` (a KVSET) to every collector (clients only)."""

    frames: list[bytes]


Action = Connect | Request | Send


def _outermost(subtrees: Sequence[bytes]) -> tuple[bytes, ...]:
    """The subtrees, in order, less those inside another: the snapshot of
    "/a/" holds "/a/b/", and two snapshots of one key disagree."""
    unique = list(dict.fromkeys(subtrees))
    return tuple(
        sub
        for sub in unique
        if not any(sub.startswith(other) for other in unique if other != sub)
    )


def _same(a: str | None, b: str | None) -> bool:
    """Two histories (``chp.map_of``) are one map's: the same lineage, and
    the same branch where both name one (a HUGZ sent during a takeover, or
    by an older server, names none)."""
    if a is None or b is None:
        return a is b
    lineage_a, _, branch_a = a.partition("/")
    lineage_b, _, branch_b = b.partition("/")
    return lineage_a == lineage_b and (
        not branch_a or not branch_b or branch_a == branch_b
    )


def _live_from(msg: KVMsg) -> int:
    """A stream whose first message is ``msg`` holds every update after this:
    a HUGZ with sequence h, from h; an update u, from u - 1."""
    return msg.sequence if msg.key == HUGZ else msg.sequence - 1


class Replica(Generic[M]):
    """A live copy of one server's map (or of some subtrees of it).

    Subclasses say what a map is (``_new_map``, ``_put``) and what to do when
    an update is confirmed or a fresh map goes live.
    """

    def __init__(
        self,
        server_count: int,
        subtrees: Sequence[bytes],
        timings: Timings,
        live: M,
        *,
        extra: Sequence[bytes] = (),
        backlog_limit: int = 1_000_000,
    ) -> None:
        if server_count < 1:
            raise LocalProtocolError("a client needs at least one server")
        if not subtrees:
            raise LocalProtocolError("a client needs at least one subtree")
        self.server_count = server_count
        self.subtrees = _outermost(subtrees)
        self.whole_tree = self.subtrees == (b"",)
        self.timings = timings
        self.backlog_limit = backlog_limit
        self.phase = Phase.INITIAL
        self.server = -1
        #: The last complete map; the sequence and lineage of its last update.
        self.live = live
        self.sequence = 0
        self.lineage: str | None = None
        #: The history the live map follows (``chp.map_of``).
        self.history: str | None = None
        #: Every update with a sequence up to this one is in ``live``.
        self.contiguous = 0
        self.actions: list[Action] = []
        self.stats: Counter[str] = Counter()
        self._requests = (*self.subtrees, *extra)
        self._deadline = 0.0  # INITIAL: connect at once
        self._failures = 0
        # one sync attempt
        self._incoming: M | None = None
        self._incoming_lineage: str | None = None
        self._incoming_history: str | None = None
        self._asked = 0
        self._in_flight = False  # a request on this connection awaits KTHXBAI
        self._extras: deque[tuple[bytes, KVMsg]] = deque()  # loaded in steps
        self._thresholds: dict[bytes, int] = {}
        self._snapshot_at = 0
        self._contiguous = 0
        self._catching_up = False
        self._settling = False
        self._caught_sequence = 0
        self._gap = False
        self._confirming: list[KVMsg] = []
        # confirmations of a map that went live, done a step at a time
        self._to_confirm: deque[tuple[M, KVMsg]] = deque()
        # the stream
        self._backlog: deque[KVMsg] = deque()
        self._live_from: int | None = None
        self._high = 0
        self._numbered_hugz = False  # this server's HUGZ carry its sequence
        self._heard_history: str | None = None
        # Updates kept from this connection before its HUGZ said whose map
        # it carries (counted from ``_kept``); None once it said ours.
        self._kept = 0
        self._unconfirmed_since: int | None = None
        self._seen: dict[bytes, int] = {}  # subtree -> newest sequence held
        # subtree -> COUNT on its last heartbeat, and updates applied since
        self._heard_counts: dict[bytes, int] = {}
        self._counted: dict[bytes, int] = {}
        self._incoming_counts: dict[bytes, int] = {}
        self._new_connection = False

    # -- what a subclass provides ---------------------------------------------

    def _new_map(self) -> M:
        raise NotImplementedError

    def _put(self, target: M, msg: KVMsg, now: float) -> None:
        """Store ``msg`` in ``target`` (delete the key if its body is empty)."""
        raise NotImplementedError

    def _confirm(self, target: M, msg: KVMsg, now: float) -> None:
        """The stream update ``msg`` is in the live map ``target`` now."""

    def _confirm_live(self, msg: KVMsg, now: float) -> None:
        """``_confirm``, for an update that ``_put`` just stored in ``live``."""
        self._confirm(self.live, msg, now)

    def _check_extra(self, request: bytes, msg: KVMsg) -> None:
        """A reply to one of the ``extra`` requests, as it arrives: raise
        ``RemoteProtocolError`` if it is malformed."""

    def _extra(self, request: bytes, msg: KVMsg, now: float) -> int:
        """Take in a reply to one of the ``extra`` requests, once the whole
        snapshot is in; return how much work it was (``catch_up`` steps)."""
        return 1

    def _adopting(self, end: KVMsg, now: float) -> bool:
        """The first KTHXBAI of a snapshot (its map's lineage): go on?"""
        return True

    def _updated(self, msg: KVMsg) -> None:
        """``msg`` was applied to the live map as it arrived."""

    def _swapped(self, old: M, now: float) -> None:
        """A fresh map became ``self.live``; ``old`` is the one it replaced."""

    # -- state ----------------------------------------------------------------

    @property
    def synced_once(self) -> bool:
        """A snapshot went live once at least."""
        return self.stats["syncs"] > 0

    @property
    def incoming(self) -> M | None:
        """The map a snapshot in progress is building, if any."""
        return self._incoming

    @property
    def busy(self) -> bool:
        """``catch_up`` has work: a backlog to apply, or updates to confirm."""
        return self._catching_up or bool(self._to_confirm)

    def covers(self, key: bytes) -> bool:
        return any(key.startswith(subtree) for subtree in self.subtrees)

    def next_deadline(self) -> float:
        return self._deadline

    # -- timers ---------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Act on the timeout due at ``now``, if any."""
        if now < self._deadline:
            return
        if self.phase is Phase.INITIAL:
            self._connect(now)
        elif self.phase is Phase.SYNCING and not self._catching_up:
            self._give_up_on_server(now)
        else:
            self.stats["failovers"] += 1
            self._connect(now)

    def _connect(self, now: float) -> None:
        """Move to the next server: a new connection, then snapshots."""
        server = (self.server + 1) % self.server_count
        if server != self.server:  # another server's stream says nothing here
            self._backlog.clear()
            self._heard_history = None
        self.server = server
        self._in_flight = False
        self._reconnect()
        self._request_snapshots(now)

    def _reconnect(self) -> None:
        """A new connection to ``self.server``: its stream starts afresh."""
        self.actions.append(Connect(self.server))
        self._unconfirmed_since = self._kept
        self._live_from = None
        self._high = 0
        self._numbered_hugz = False
        self._new_connection = True

    def _request_snapshots(self, now: float) -> None:
        """Ask the current server for every subtree (and extra) again."""
        self.phase = Phase.SYNCING
        if self._in_flight:
            # A reply to the request in flight may still come on this DEALER
            # (or never: the server may be new): a new connection, so that
            # what comes next answers the new request.
            self._reconnect()
        self._in_flight = True
        self._extras.clear()
        self._incoming = self._new_map()
        self._incoming_lineage = self._incoming_history = None
        self._asked = 0
        self._thresholds = {}
        self._catching_up = False
        self._confirming = []
        self._seen.clear()
        self._heard_counts.clear()
        self._counted.clear()
        self._incoming_counts = {}
        self.actions.append(Request(self._requests[0]))
        self._deadline = now + self.timings.request_timeout

    def _give_up_on_server(self, now: float) -> None:
        self._failures += 1
        if self._failures % self.server_count:
            self._connect(now)
            return
        rounds = self._failures // self.server_count
        delay = min(self.timings.backoff * 2 ** (rounds - 1), self.timings.max_backoff)
        self.phase = Phase.INITIAL
        self._incoming = None
        self._deadline = now + delay

    # -- the snapshot socket --------------------------------------------------

    def on_reply(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the snapshot socket (KVSYNC or KTHXBAI)."""
        if self.phase is not Phase.SYNCING or self._catching_up:
            return  # a late reply from an abandoned attempt
        msg = decode_kvmsg(frames)
        incoming = self._incoming
        assert incoming is not None
        self._deadline = now + self.timings.request_timeout
        request = self._requests[self._asked]
        if msg.key != KTHXBAI:
            if request not in self.subtrees:
                self._check_extra(request, msg)
                self._extras.append((request, msg))
            elif msg.key.startswith(request):
                self._put(incoming, msg, now)
            return
        if request in self.subtrees:
            history = map_of(msg)
            if self._thresholds and not _same(history, self._incoming_history):
                self._in_flight = False  # (that was its KTHXBAI)
                self._reset(now)  # the map changed between two subtrees
                return
            if not self._thresholds and not self._adopting(msg, now):
                self._in_flight = False  # (that was its KTHXBAI)
                self._give_up_on_server(now)
                return
            self._incoming_lineage = lineage_of(msg)
            self._incoming_history = history
            self._thresholds[request] = msg.sequence
            count = integer_property(msg, COUNT)
            if count is not None:
                self._incoming_counts[request] = count
        self._asked += 1
        if self._asked < len(self._requests):
            self.actions.append(Request(self._requests[self._asked]))
        else:
            self._in_flight = False
            self._start_catch_up(now)

    def _start_catch_up(self, now: float) -> None:
        heard = self._heard_history
        if heard is not None and not _same(heard, self._incoming_history):
            # The stream and the snapshot are different maps: the server
            # restarted between them.  Take the next snapshot as it comes,
            # unless the stream contradicts that one too.
            self._heard_history = None
            self._reset(now)
            return
        self._catching_up = True
        self._caught_sequence = self._snapshot_at = min(self._thresholds.values())
        self._contiguous = self._snapshot_at
        self._gap = False
        self._deadline = now + self.timings.silence_timeout
        self.catch_up(now)

    def catch_up(self, now: float, limit: int = CATCH_UP_STEP) -> None:
        """Up to ``limit`` steps of work: confirm what a map that went live
        holds, then apply backlog entries; go live once the backlog is empty."""
        to_confirm = self._to_confirm
        for _ in range(min(limit, len(to_confirm))):
            target, msg = to_confirm.popleft()
            self._confirm(target, msg, now)
            limit -= 1
        if not self._catching_up or limit <= 0:
            return
        extras = self._extras
        while extras and limit > 0:
            request, extra = extras.popleft()
            limit -= self._extra(request, extra, now)
        if extras:
            return
        incoming = self._incoming
        assert incoming is not None
        backlog = self._backlog
        for _ in range(min(limit, len(backlog))):
            self._absorb(incoming, backlog.popleft(), now)
        if not backlog:
            self._finish(now)

    def _absorb(self, incoming: M, msg: KVMsg, now: float) -> None:
        """One backlog entry onto the fresh map (or only confirmed)."""
        if msg.sequence <= self._caught_sequence:
            if self._held_by(msg) is not None:
                self._confirming.append(msg)  # already in the snapshot
            return
        if self.whole_tree and msg.sequence != self._caught_sequence + 1:
            self._gap = True
        if msg.sequence == self._contiguous + 1:
            self._contiguous = msg.sequence
        self._caught_sequence = msg.sequence
        threshold = self._held_by(msg)
        if threshold is None:
            return  # outside our subtrees
        if msg.sequence > threshold:
            self._put(incoming, msg, now)
            if not self.whole_tree:
                self._note(msg)
        self._confirming.append(msg)

    def _held_by(self, msg: KVMsg) -> int | None:
        """The newest snapshot sequence of the subtrees holding ``msg.key``."""
        matching = [
            seq for sub, seq in self._thresholds.items() if msg.key.startswith(sub)
        ]
        return max(matching) if matching else None

    def _finish(self, now: float) -> None:
        incoming = self._incoming
        assert incoming is not None
        old, self.live = self.live, incoming
        self.lineage = self._incoming_lineage
        self.history = self._incoming_history
        self.sequence = self._caught_sequence
        self.contiguous = self._contiguous
        self._incoming = None
        self._catching_up = False
        self._to_confirm.extend((incoming, msg) for msg in self._confirming)
        self._confirming = []
        self.catch_up(now, CATCH_UP_STEP)  # the first step of them at once
        if self._settling:
            return
        for subtree, seq in self._thresholds.items():
            self._seen[subtree] = max(self._seen.get(subtree, 0), seq)
        # counted from the snapshot's count, or from the next heartbeat
        self._heard_counts = self._incoming_counts
        self._incoming_counts = {}
        if max(self._thresholds.values()) <= self.sequence:
            self._thresholds = {}  # past every snapshot: plain order from now
        self.phase = Phase.ACTIVE
        self._unconfirmed_since = None  # its snapshot said whose map it is
        self._failures = 0
        self._deadline = now + self.timings.silence_timeout
        self.stats["syncs"] += 1
        self._swapped(old, now)
        self._new_connection = False
        late = self._live_from is not None and self._live_from > self._snapshot_at
        if late or self._gap:
            self.stats["gaps"] += 1
            self._request_snapshots(now)

    # -- the stream -------------------------------------------------------------

    def on_update(self, frames: Sequence[bytes], now: float) -> None:
        """A message on the stream (KVPUB, HUGZ or a subtree heartbeat)."""
        msg = decode_kvmsg(frames)
        if self.phase is Phase.INITIAL:
            self._between_attempts(msg)
            return
        live = self.phase is Phase.ACTIVE or self._catching_up
        if live:
            self._deadline = now + self.timings.silence_timeout
        if is_subtree_hugz(msg.key):
            self._check_subtree(msg, now)
            return
        if self._is_reset(msg):
            self._reset(now, msg)
            return
        if msg.sequence or msg.key != HUGZ:
            self._high = max(self._high, msg.sequence)
        if self._live_from is None:
            self._live_from = _live_from(msg)
            if self.phase is Phase.ACTIVE and self._live_from > self.sequence:
                if msg.key != HUGZ:
                    self._keep(msg)
                self._missed(now)  # the stream started late
                return
        if msg.key == HUGZ:
            if (
                self.phase is Phase.ACTIVE
                and self.whole_tree
                and msg.sequence > self.sequence
            ):
                self._missed(now)
            return
        if self.phase is not Phase.ACTIVE:
            self._keep(msg)
        elif msg.sequence > self.sequence:
            if self.whole_tree and msg.sequence != self.sequence + 1:
                self._keep(msg)
                self._missed(now)
                return
            self._apply(msg, now)

    def _between_attempts(self, msg: KVMsg) -> None:
        """Backing off after failed sync attempts, the connection to the
        server still carries its stream: keep it for the next attempt on
        this server (or a takeover), unless the server's map changed."""
        if self.server < 0 or is_subtree_hugz(msg.key):
            return
        backlog = self._backlog
        if backlog and 0 < msg.sequence < backlog[-1].sequence:
            backlog.clear()  # the stream went back: a server that restarted
        if msg.key == HUGZ:
            if self._hear_history(map_of(msg)):
                backlog.clear()  # another map's updates
            return
        if msg.sequence:
            self._keep(msg)

    def _hear_history(self, history: str | None) -> bool:
        """A HUGZ named the map the connection carries (``map_of``): True if
        it is not the one named before.  If it is the live map's, what the
        connection carried before it is ours too."""
        if history is None:
            return False
        heard, self._heard_history = self._heard_history, history
        if _same(history, self.history):
            self._unconfirmed_since = None
        return heard is not None and not _same(heard, history)

    def _is_reset(self, msg: KVMsg) -> bool:
        """Did the server lose or replace its map?"""
        if msg.key == HUGZ:
            history = map_of(msg)
            if self._hear_history(history):
                return True
            live = self.history
            if (
                self.phase is Phase.ACTIVE
                and live
                and history
                and not _same(live, history)
            ):
                return True
            if msg.sequence:
                self._numbered_hugz = True
            elif not self._numbered_hugz:
                return False  # the RFC's HUGZ: no sequence to compare
        return msg.sequence < self._high

    def _reset(self, now: float, msg: KVMsg | None = None) -> None:
        """Another map is behind the same address: start again from it."""
        self.stats["resets"] += 1
        self._backlog.clear()
        self._seen.clear()
        self._heard_counts.clear()
        self._counted.clear()
        self._high = 0 if msg is None else msg.sequence
        self._live_from = None
        if msg is not None:
            self._live_from = _live_from(msg)
            if msg.key != HUGZ:
                self._backlog.append(msg)
        self._request_snapshots(now)

    def _check_subtree(self, msg: KVMsg, now: float) -> None:
        subtree = msg.key[: -len(SUBTREE_HUGZ)]
        if self.phase is not Phase.ACTIVE or subtree not in self.subtrees:
            return
        last = integer_property(msg, LAST)
        if last is not None and last > self._seen.get(subtree, 0):
            self._missed(now)
            return
        # Between two heartbeats the server published ``count`` - its last
        # ``count`` updates under the subtree, all on this stream in order:
        # fewer applied here means some were dropped on the way.
        count = integer_property(msg, COUNT)
        if count is None:
            return
        previous = self._heard_counts.get(subtree)
        self._heard_counts[subtree] = count
        applied = self._counted.pop(subtree, 0)
        # (A count that went down: the server began counting again, as it
        # does when the subtree's subscriptions all went away and came back,
        # a connection that broke and so may have lost updates in flight.)
        if previous is not None and not 0 <= count - previous <= applied:
            self._missed(now)

    def _missed(self, now: float) -> None:
        self.stats["gaps"] += 1
        self._request_snapshots(now)

    def _keep(self, msg: KVMsg) -> None:
        """Hold a stream update until a snapshot it can be applied to."""
        backlog = self._backlog
        backlog.append(msg)
        self._kept += 1
        if len(backlog) > self.backlog_limit:
            backlog.popleft()
            self.stats["backlog_dropped"] += 1

    def _apply(self, msg: KVMsg, now: float) -> None:
        """A live update newer than ``self.sequence``."""
        if self.contiguous == msg.sequence - 1:
            self.contiguous = msg.sequence
        self.sequence = msg.sequence
        if self._thresholds:
            threshold = self._held_by(msg)
            if msg.sequence >= max(self._thresholds.values()):
                self._thresholds = {}  # past every snapshot: plain order now
            if threshold is None or msg.sequence <= threshold:
                return  # outside our subtrees, or already in the snapshot
        elif not (self.whole_tree or self.covers(msg.key)):
            return
        self._put(self.live, msg, now)
        if not self.whole_tree:
            self._note(msg)
        self._confirm_live(msg, now)
        self._updated(msg)

    def _note(self, msg: KVMsg) -> None:
        """Remember the newest sequence held under each of our subtrees, and
        count the updates (the whole map has none: a gap in its sequences
        says what was missed)."""
        for subtree in self.subtrees:
            if subtree and msg.key.startswith(subtree):
                self._seen[subtree] = msg.sequence
                self._counted[subtree] = self._counted.get(subtree, 0) + 1

    # -- a takeover -----------------------------------------------------------

    def settle(self, now: float) -> None:
        """Stop following: bring the backlog into the newest complete map.

        After ``settle``, call ``catch_up`` until ``busy`` is False;
        ``live`` then holds every update the server published that reached
        us, gaps or not.  No more requests or connections are made.
        """
        self.phase = Phase.SYNCING
        self._deadline = math.inf
        self._settling = True
        since = self._unconfirmed_since
        if since is not None:  # the connection never said whose map it carries
            for _ in range(min(self._kept - since, len(self._backlog))):
                self._backlog.pop()
        if self._catching_up:
            return  # the snapshot in hand is newer than ``live``
        heard = self._heard_history
        if (
            heard is not None
            and self.history is not None
            and not _same(heard, self.history)
        ):
            self._backlog.clear()  # another map's updates: not for ours
        self._incoming = self.live
        self._incoming_lineage = self.lineage
        self._incoming_history = self.history
        self._thresholds = {subtree: self.sequence for subtree in self.subtrees}
        self._catching_up = True
        self._caught_sequence = self._snapshot_at = self.sequence
        self._contiguous = self.contiguous
        self._gap = False
        self._live_from = None
        self.catch_up(now)
