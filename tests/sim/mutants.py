"""Known bugs, put back on purpose: the simulation must catch each one.

Each mutant patches the production code for the length of a ``with`` block
and brings back a bug: one that the issue "Nothing lost, nothing stale,
nothing twice" fixed, or one the simulation itself found.
``tests/sim/test_sim.py`` checks that the first seed that caught each one
still does (and passes without it), so the simulation's power to find
bugs is itself tested.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from trioclone.core import chp, client, pending, replica, server, subtrees
from trioclone.core.chp import KVMsg


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def backlog_dropped_on_every_attempt() -> contextlib.AbstractContextManager[None]:
    """Case 1: the passive (and every client) empties its backlog whenever
    it asks for a snapshot again, so an update heard during a failed
    attempt is gone."""
    original = replica.Replica._request_snapshots

    def request(self: replica.Replica[Any], now: float) -> None:
        self._backlog.clear()
        original(self, now)

    return _patched(replica.Replica, "_request_snapshots", request)


def lineage_ignored() -> contextlib.AbstractContextManager[None]:
    """Case 2: a server that lost its map is noticed only by a sequence
    that goes backwards, never by its lineage."""

    def is_reset(self: replica.Replica[Any], msg: KVMsg) -> bool:
        if msg.key == b"HUGZ" and not msg.sequence:
            return False
        return msg.sequence < self._high

    return _patched(replica.Replica, "_is_reset", is_reset)


def window_ignored() -> contextlib.AbstractContextManager[None]:
    """Case 3: a write is a repeat only while its key still holds it, so a
    resend of a replaced write is applied again."""

    def is_repeat(self: server.ServerMap, uuid: bytes, current: bytes) -> bool:
        return bool(uuid) and uuid == current

    return _patched(server.ServerMap, "is_repeat", is_repeat)


def subtree_gaps_ignored() -> contextlib.AbstractContextManager[None]:
    """Case 4: a subtree client never notices that it missed an update."""

    def check_subtree(self: replica.Replica[Any], msg: KVMsg, now: float) -> None:
        return None

    return _patched(replica.Replica, "_check_subtree", check_subtree)


def split_writes_discarded() -> contextlib.AbstractContextManager[None]:
    """Case 6: the side that steps down after dual actives hands nothing
    over: what it accepted while active is gone."""

    def start_handoff(self: server.ServerCore, now: float) -> None:
        self._tombstones.clear()

    return _patched(server.ServerCore, "_start_handoff", start_handoff)


def confirmed_before_live() -> contextlib.AbstractContextManager[None]:
    """A write is confirmed as soon as it is heard, before the map that
    holds it is live (the rule the replica core keeps)."""
    original = replica.Replica._keep

    def keep(self: replica.Replica[Any], msg: KVMsg) -> None:
        original(self, msg)
        self._confirm(self.live, msg, 0.0)

    return _patched(replica.Replica, "_keep", keep)


# -- bugs the simulation found (each one's fix, taken back) -------------------


def timer_float() -> contextlib.AbstractContextManager[None]:
    """Seed 2's bug: a resend was due by ``sent_at <= now - interval`` while
    ``next_deadline`` said ``sent_at + interval``; one ulp apart, the timer
    task woke at one instant for ever (the simulation's livelock check)."""

    def poll(self: client.ClientCore, now: float) -> None:
        replica.Replica.poll(self, now)
        writes, by_send = self.writes, self._by_send
        horizon = now - self.timings.write_horizon
        while writes and next(iter(writes.values())).first_sent <= horizon:
            uuid, _ = writes.popitem(last=False)
            del by_send[uuid]
            self.events.append(client.Unconfirmed(uuid))
        if self.phase is replica.Phase.ACTIVE:
            due = now - self.timings.resend_interval
            resends = []
            for write in by_send.values():
                if write.sent_at > due:
                    break
                resends.append(write)
            for write in sorted(resends, key=lambda w: w.number):
                self._send(write, now)

    return _patched(client.ClientCore, "poll", poll)


def retracked_from_zero() -> contextlib.AbstractContextManager[None]:
    """A prefix subscribed again was tracked from 0: no subtree heartbeat
    until its next update, so a subscriber whose SUB reconnected never
    learned of the update it missed."""
    original = subtrees.Subtrees.track

    def track(self: subtrees.Subtrees, prefix: bytes) -> None:
        new = prefix not in self.tracked
        original(self, prefix)
        if new and prefix in self.tracked:
            self.tracked[prefix] = 0

    return _patched(subtrees.Subtrees, "track", track)


def window_not_handed_over() -> contextlib.AbstractContextManager[None]:
    """After a split, the loser handed over its records but not the UUIDs
    it replaced: a late copy of one was applied again at the winner."""

    def hand_over_window(
        self: server.ServerCore, now: float, handed: set[bytes]
    ) -> None:
        return None

    return _patched(server.ServerCore, "_hand_over_window", hand_over_window)


def expiry_not_handed_over() -> contextlib.AbstractContextManager[None]:
    """A TTL expiry on the loser of a split left no tombstone, so a late
    copy of an older write to the key outlived it at the winner."""
    original = server.ServerCore.expire

    def expire(self: server.ServerCore, now: float, limit: int = server.STEP) -> Any:
        self._tombstone = lambda key, sequence, uuid, expired=False: None  # type: ignore[method-assign]
        try:
            return original(self, now, limit)
        finally:
            del self._tombstone

    return _patched(server.ServerCore, "expire", expire)


def branch_ignored() -> contextlib.AbstractContextManager[None]:
    """A client told maps apart by lineage only: after a split, the loser
    resynced from the winner and took over again later, and a client still
    connected to it mixed the two histories."""
    return _patched(replica, "map_of", chp.lineage_of)


def pending_replayed_over_newer() -> contextlib.AbstractContextManager[None]:
    """A takeover replayed a pending write over a write to its key that
    reached the passive after it (so undoing a newer, confirmed write)."""
    return _patched(pending.Pending, "arrived_after", lambda self, held: False)


def backoff_drops_the_stream() -> contextlib.AbstractContextManager[None]:
    """Between failed sync attempts the replica dropped what its still open
    connection carried; a takeover then lost updates its passive heard."""
    return _patched(replica.Replica, "_between_attempts", lambda self, msg: None)


MUTANTS: dict[str, Callable[[], contextlib.AbstractContextManager[None]]] = {
    "backlog-dropped": backlog_dropped_on_every_attempt,
    "lineage-ignored": lineage_ignored,
    "window-ignored": window_ignored,
    "subtree-gaps-ignored": subtree_gaps_ignored,
    "split-writes-discarded": split_writes_discarded,
    "confirmed-before-live": confirmed_before_live,
    "timer-float": timer_float,
    "retracked-from-zero": retracked_from_zero,
    "window-not-handed-over": window_not_handed_over,
    "expiry-not-handed-over": expiry_not_handed_over,
    "branch-ignored": branch_ignored,
    "pending-replayed-over-newer": pending_replayed_over_newer,
    "backoff-drops-the-stream": backoff_drops_the_stream,
}
