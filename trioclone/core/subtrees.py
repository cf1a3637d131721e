"""Subtree heartbeats: how a client of a subtree learns that it missed one.

A whole-map client sees every sequence number, so a gap tells it that an
update was dropped on the way (a PUB drops at its high-water mark).  A
subtree client sees only its subtree's updates, whose sequences are not
consecutive.  So the server's publisher (an XPUB) reads the subscriptions
clients make, tracks the last sequence published under each subscribed
prefix (from the map's sequence when the prefix was subscribed: a
subscriber that comes back may have missed the update before), and with
every HUGZ publishes one subtree heartbeat per tracked prefix (none for a
prefix at 0, after a role change, until an update under it): key
``prefix + b"\\x00HUGZ"``, sequence 0 (so every client,
the Guide's included, drops it as old), property ``last=N``.  It reaches
exactly the clients of that prefix (and whole-map clients).  A client whose
last sequence under its subtree is below ``N`` missed an update.

XPUB passes up the first subscription to a prefix and the last
unsubscription, so the set of tracked prefixes follows the clients.  A
snapshot of a subtree tracks it too (its client subscribes, counted from
the snapshot on), but only for ``PROVISIONAL`` heartbeats unless a
subscription to it comes: a client that only asks for snapshots (or a
stranger naming subtrees) does not make the server send heartbeats for
ever.  A prefix longer than ``MAX_PREFIX`` bytes is not tracked (counted
in ``untracked``, like those beyond ``limit``): each heartbeat carries its
prefix to every whole-map subscriber.  The cost is one dict lookup per
distinct prefix length for each update published, and one small message
per tracked prefix per HUGZ interval.
"""

from __future__ import annotations

from collections.abc import Callable

from trioclone.core.chp import HUGZ, subtree_hugz
from trioclone.errors import RemoteProtocolError

RULE_SUBSCRIPTION = "a subscription message is one frame: 0 or 1, then a prefix"
#: Heartbeats a subtree tracked from a snapshot alone gets.
PROVISIONAL = 3
#: Longer prefixes are not tracked.
MAX_PREFIX = 1024

Frames = list[bytes]


def parse_subscription(frames: Frames) -> tuple[bool, bytes]:
    """(subscribe, prefix) of a message read from an XPUB."""
    if len(frames) != 1 or not frames[0] or frames[0][0] > 1:
        raise RemoteProtocolError(RULE_SUBSCRIPTION, f"{len(frames)} frames")
    return frames[0][0] == 1, frames[0][1:]


class Subtrees:
    """Subscribed prefixes and the last sequence published under each."""

    def __init__(
        self, limit: int = 10_000, sequence: Callable[[], int] = lambda: 0
    ) -> None:
        self.limit = limit
        #: The map's sequence now: where a newly tracked prefix starts.
        self.sequence = sequence
        self.untracked = 0  # subscriptions beyond ``limit``
        #: prefix -> the last sequence published under it (0: none yet);
        #: the server tests it before calling ``published`` (no call if empty)
        self.tracked: dict[bytes, int] = {}
        #: prefix -> updates published under it since it was tracked
        self.counts: dict[bytes, int] = {}
        self._lengths: dict[int, int] = {}  # prefix length -> prefixes of it
        #: prefix tracked from a snapshot, no subscription seen -> heartbeats left
        self._provisional: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.tracked)

    def on_subscription(self, frames: Frames) -> None:
        """A message read from the XPUB; ``RemoteProtocolError`` if not one."""
        subscribe, prefix = parse_subscription(frames)
        if not prefix or HUGZ.startswith(prefix) or prefix.startswith(HUGZ):
            return  # whole-map clients see every sequence; HUGZ is for everyone
        if subscribe:
            self.track(prefix)
        else:
            self._forget(prefix)

    def _forget(self, prefix: bytes) -> None:
        self._provisional.pop(prefix, None)
        if self.tracked.pop(prefix, None) is not None:
            del self.counts[prefix]
            self._lengths[len(prefix)] -= 1
            if not self._lengths[len(prefix)]:
                del self._lengths[len(prefix)]

    def track(self, prefix: bytes, *, snapshot: bool = False) -> None:
        """Track ``prefix``: a subscription to it came up; or (``snapshot``)
        a snapshot of it is served, whose client subscribes to it, counted
        from then on: provisionally, until its subscription comes."""
        if prefix in self.tracked:
            if not snapshot:
                self._provisional.pop(prefix, None)  # subscribed: for good
            return
        if not prefix or prefix == HUGZ:
            return
        if len(self.tracked) >= self.limit or len(prefix) > MAX_PREFIX:
            self.untracked += 1
            return
        if snapshot:
            self._provisional[prefix] = PROVISIONAL
        # Not 0: a subscriber that comes back (its SUB reconnected, losing
        # what was in flight) may have missed the last update under the
        # prefix, and a prefix at 0 gets no heartbeat until the next one.
        # Starting from the map's sequence costs at most one snapshot for
        # a subscriber that missed nothing but holds an older sequence.
        self.tracked[prefix] = self.sequence()
        self.counts[prefix] = 0
        self._lengths[len(prefix)] = self._lengths.get(len(prefix), 0) + 1

    def published(self, key: bytes, sequence: int) -> None:
        """An update to ``key`` went out at ``sequence``."""
        tracked, counts = self.tracked, self.counts
        for length in self._lengths:
            prefix = key[:length]
            if prefix in tracked:
                tracked[prefix] = sequence
                counts[prefix] += 1

    def heartbeats(self) -> list[Frames]:
        """One subtree heartbeat per tracked prefix that saw an update (a
        provisional prefix is forgotten after its last one)."""
        counts, provisional = self.counts, self._provisional
        for prefix, left in list(provisional.items()):
            if left <= 0:
                self._forget(prefix)
            else:
                provisional[prefix] = left - 1
        return [
            subtree_hugz(prefix, seq, counts[prefix])
            for prefix, seq in self.tracked.items()
            if seq
        ]

    def clear(self) -> None:
        """Forget the sequences (a new role publishes a new history)."""
        for prefix in self.tracked:
            self.tracked[prefix] = 0
