"""One snapshot reply in progress: KVSYNC for each key, then KTHXBAI.

The key list is taken when the transfer starts (a point in time), and
KTHXBAI carries the sequence of that moment, so the client applies every
update published after it.  Values are read as they are sent: a key changed
meanwhile goes out with its newer value (the client's stream replays the
changes in order, so it converges); a key deleted meanwhile is skipped.

A ``KeyIndex`` holds the list of every key of one point in time, shared by
the transfers that start while nothing changes.  A subtree's keys are picked
from it by a ``Scan`` a bounded number of keys at a time, as the transfers
that want them go: no request costs a scan of the whole map at once, and
sibling subtrees asked for together (clients of /svc/1/, /svc/2/, ...) share
one pass.

``peek`` / ``advance`` let the shell retry a message the socket could not
take yet without losing or repeating any.  ``peek`` looks at no more than
``SKIP`` keys per call (deleted since, or scanned for its subtree) and
``examined`` counts every key looked at, so the shell can bound the work it
does per schedule point.  ``idle_since`` says when the client last took a
message (or the transfer last made progress for it): a client that stops
reading is dropped after a while instead of holding its transfer for ever.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from trioclone.core.store import Store

Frames = list[bytes]

#: Deleted keys skipped per ``peek`` before it returns None for now.
SKIP = 256


class Scan:
    """The keys under some subtrees of one length, picked from a key list a
    bounded number of keys per ``advance``."""

    def __init__(self, keys: list[bytes], length: int) -> None:
        self.keys = keys
        self.length = length
        self.position = 0
        self.found: dict[bytes, list[bytes]] = {}

    @property
    def done(self) -> bool:
        return self.position >= len(self.keys)

    def advance(self, count: int) -> int:
        """Look at up to ``count`` more keys; return how many."""
        keys, found, length = self.keys, self.found, self.length
        start = self.position
        stop = min(len(keys), start + count)
        for key in keys[start:stop]:
            group = found.get(key[:length])
            if group is not None:
                group.append(key)
        self.position = stop
        return stop - start


class KeyIndex:
    """Every key of a store at one point in time, and scans of it."""

    def __init__(self, keys: list[bytes]) -> None:
        self.keys = keys
        self._scans: dict[int, list[Scan]] = {}

    def source(self, subtree: bytes) -> tuple[list[bytes], Scan | None]:
        """The keys under ``subtree`` (a list that grows while its scan runs),
        and that scan (None for the whole map: the list is complete)."""
        if not subtree:
            return self.keys, None
        scans = self._scans.setdefault(len(subtree), [])
        for scan in scans:  # asked for already: the same keys
            if subtree in scan.found:
                return scan.found[subtree], scan
        fresh = next((scan for scan in scans if not scan.position), None)
        if fresh is None:  # a sibling's scan has begun: one of its own
            fresh = Scan(self.keys, len(subtree))
            scans.append(fresh)
        keys = fresh.found[subtree] = []
        return keys, fresh


class Transfer:
    """The reply to one ICANHAZ, addressed to ``identity`` on a ROUTER."""

    def __init__(
        self,
        identity: bytes,
        store: Store,
        keys: list[bytes],
        end: Frames,
        now: float,
        extra: Iterator[Frames] | None = None,
        scan: Scan | None = None,
    ) -> None:
        """``keys``: what to send (a subtree's, growing while ``scan`` runs)."""
        self.identity = identity
        self.sent = 0
        self.examined = 0
        self.started = now
        self.idle_since = now
        self._store = store
        self._keys = keys
        self._scan = scan
        self._extra = extra if extra is not None else iter(())
        self._end: Frames | None = [identity, *end]
        self._position = 0
        self._head: Frames | None = None

    @property
    def done(self) -> bool:
        return self._end is None and self._head is None

    def peek(self, now: float) -> Frames | None:
        """The next message to send (identity first).

        None when finished (``done``), or when ``SKIP`` deleted keys in a row
        were passed over: call again later.
        """
        if self._head is None:
            self._head = self._next(now)
        return self._head

    def advance(self, now: float) -> None:
        """The message from ``peek`` was sent."""
        self._head = None
        self.sent += 1
        self.idle_since = now

    def pump(self, send: Callable[[Frames], bool], limit: int, now: float) -> None:
        """``peek``, ``send`` and ``advance`` up to ``limit`` times: until
        ``send`` finds no room (False: the message stays next), the
        transfer is done, or ``peek`` has nothing yet.  What ``send``
        raises propagates, its message still next."""
        head = self._head
        for _ in range(limit):
            if head is None:
                head = self._head = self._next(now)
                if head is None:
                    return
            if not send(head):
                return
            head = self._head = None
            self.sent += 1
            self.idle_since = now

    def _next(self, now: float) -> Frames | None:
        keys, store, scan = self._keys, self._store, self._scan
        budget = SKIP
        while budget > 0:
            if self._position < len(keys):
                key = keys[self._position]
                self._position += 1
                self.examined += 1
                budget -= 1
                frames = store.frames(key, now, self.identity)
                if frames is not None:
                    return frames
            elif scan is not None and not scan.done:
                moved = scan.advance(budget)
                self.examined += moved
                budget -= moved
            else:
                break
        if self._position < len(keys) or (scan is not None and not scan.done):
            return None  # a bounded step passed over keys: the rest later
        for frames in self._extra:
            return [self.identity, *frames]
        end, self._end = self._end, None
        return end
