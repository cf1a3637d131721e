"""One snapshot reply in progress: KVSYNC for each key, then KTHXBAI.

The key list is taken when the request is accepted (a point in time), and
KTHXBAI carries the sequence of that moment, so the client applies every
update published after it.  Values are read as they are sent: a key changed
meanwhile goes out with its newer value (the client's stream replays the
changes in order, so it converges); a key deleted meanwhile is skipped.

``peek`` / ``advance`` let the shell retry a message the socket could not
take yet without losing or repeating any.
"""

from __future__ import annotations

from trioclone.core.chp import kthxbai
from trioclone.core.store import Store

Frames = list[bytes]


class Transfer:
    """The reply to one ICANHAZ, addressed to ``identity`` on a ROUTER."""

    def __init__(
        self,
        identity: bytes,
        store: Store,
        subtree: bytes,
        keys: list[bytes] | None = None,
    ) -> None:
        self.identity = identity
        self.subtree = subtree
        self.sequence = store.sequence
        self.sent = 0
        self._store = store
        self._keys = keys if keys is not None else store.keys(subtree)
        self._position = 0
        self._head: Frames | None = None
        self._ended = False

    @property
    def done(self) -> bool:
        return self._ended and self._head is None

    def peek(self, now: float) -> Frames | None:
        """The next message to send (identity first), None when finished."""
        if self._head is None and not self._ended:
            self._head = self._next(now)
        return self._head

    def advance(self) -> None:
        """The message from ``peek`` was sent."""
        self._head = None
        self.sent += 1

    def _next(self, now: float) -> Frames:
        keys, store = self._keys, self._store
        while self._position < len(keys):
            frames = store.frames(keys[self._position], now, self.identity)
            self._position += 1
            if frames is not None:
                return frames
        self._ended = True
        return [self.identity, *kthxbai(self.sequence, self.subtree)]
