"""One snapshot reply in progress: KVSYNC for each key, then KTHXBAI.

The key list is taken when the request is accepted (a point in time), and
KTHXBAI carries the sequence of that moment, so the client applies every
update published after it.  Values are read as they are sent: a key changed
meanwhile goes out with its newer value (the client's stream replays the
changes in order, so it converges); a key deleted meanwhile is skipped.

``peek`` / ``advance`` let the shell retry a message the socket could not
take yet without losing or repeating any.  ``peek`` looks at no more than
``SKIP`` deleted keys per call (after a mass expiry most of a key list may
be gone) and ``examined`` counts every key looked at, so the shell can bound
the work it does per schedule point.  ``idle_since`` says when the client
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
    ) -> None:
        self.identity = identity
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
        keys, store = self._keys, self._store
        stop = min(len(keys), self._position + SKIP)
        while self._position < stop:
            frames = store.frames(keys[self._position], now, self.identity)
            self._position += 1
            self.examined += 1
            if frames is not None:
                return frames
        if self._position < len(keys):
            return None  # a long run of deleted keys: the rest later
        for frames in self._extra:
            return [self.identity, *frames]
        end, self._end = self._end, None
        return end
