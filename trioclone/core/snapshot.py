"""One snapshot reply in progress: KVSYNC for each key, then KTHXBAI.

The key list is taken when the transfer starts (a point in time: the list of
every key, shared by the transfers that start while nothing changes), and
KTHXBAI carries the sequence of that moment, so the client applies every
update published after it.  A subtree's keys are picked from that list as
the transfer goes, so no request costs a scan of the whole map at once.  Values are read as they are sent: a key changed
meanwhile goes out with its newer value (the client's stream replays the
changes in order, so it converges); a key deleted meanwhile is skipped.

``peek`` / ``advance`` let the shell retry a message the socket could not
take yet without losing or repeating any.  ``peek`` passes over no more than
``SKIP`` keys per call (deleted since, or outside the subtree) and
``examined`` counts every key looked at, so the shell can bound the work it
does per schedule point.  ``idle_since`` says when the client
last took a message: a client that stops reading is dropped after a while
instead of holding its transfer for ever.
"""

from __future__ import annotations

from collections.abc import Iterator

from trioclone.core.store import Store

Frames = list[bytes]

#: Deleted keys skipped per ``peek`` before it returns None for now.
SKIP = 256


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
        subtree: bytes = b"",
    ) -> None:
        self.identity = identity
        self.subtree = subtree
        self.sent = 0
        self.examined = 0
        self.idle_since = now
        self._store = store
        self._keys = keys
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

    def _next(self, now: float) -> Frames | None:
        keys, store, subtree = self._keys, self._store, self.subtree
        stop = min(len(keys), self._position + SKIP)
        while self._position < stop:
            key = keys[self._position]
            self._position += 1
            self.examined += 1
            if subtree and not key.startswith(subtree):
                continue
            frames = store.frames(key, now, self.identity)
            if frames is not None:
                return frames
        if self._position < len(keys):
            return None  # a long run of keys passed over: the rest later
        for frames in self._extra:
            return [self.identity, *frames]
        end, self._end = self._end, None
        return end
