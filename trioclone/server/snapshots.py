"""The snapshot replies a server (or a relay) owes, and their pump.

Requests wait in a queue (at most ``MAX_QUEUED``) until one of at most
``MAX_TRANSFERS`` transfers is free; the shell says when it may start them
(a server once its takeover is done, a relay while its mirror serves) and
how (``begin``: the key list and the KTHXBAI of that moment).  ``pump``
sends the next chunk of each transfer in turn, never blocking: a client
whose queue is full waits its next turn, and one that took nothing for
``stall`` seconds is dropped.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

from trioclone._log import Limited
from trioclone._zmq import Socket, UnroutableError
from trioclone.core.snapshot import KeyIndex, Transfer
from trioclone.core.store import Store
from trioclone.server.durations import Durations

CHUNK = 256  # snapshot messages sent to one client before the next one's turn
PUMP = 1024  # snapshot messages sent, over all clients, per schedule point
MAX_TRANSFERS = 256  # snapshot replies in progress at once
MAX_QUEUED = 10_000  # snapshot requests waiting for one

#: Makes the transfer for ``(identity, subtree, now)``.
Begin = Callable[[bytes, bytes, float], Transfer]


class Snapshots:
    def __init__(self, stall: float, stats: Counter[str], log: Limited) -> None:
        self.stall = stall
        self.stats = stats
        self.log = log
        self.transfers: deque[Transfer] = deque()
        #: requests to answer once a transfer is free (or the shell allows)
        self.queued: deque[tuple[bytes, bytes]] = deque()
        #: How long replies took, from their first message to the last.
        self.durations = Durations()
        self._index: tuple[Store, int, KeyIndex] | None = None

    def queue(self, identity: bytes, subtree: bytes) -> bool:
        """Queue a request; False (counted, logged) if too many wait."""
        if len(self.queued) >= MAX_QUEUED:
            self.stats["snapshots_refused"] += 1
            self.log.log(
                logging.WARNING,
                "snapshot queue",
                "%d snapshot requests wait already: one more is not answered",
                MAX_QUEUED,
            )
            return False
        self.queued.append((identity, subtree))
        return True

    def start_queued(self, now: float, begin: Begin) -> bool:
        """Start waiting transfers while there is room; True if any started."""
        queued, transfers = self.queued, self.transfers
        started = False
        while queued and len(transfers) < MAX_TRANSFERS:
            identity, subtree = queued.popleft()
            transfers.append(begin(identity, subtree, now))
            started = True
        return started

    def index(self, store: Store) -> KeyIndex:
        """Every key, shared by the transfers that start while nothing changed
        (a subtree's are picked from it as the transfers go)."""
        cached = self._index
        if cached is not None and cached[:2] == (store, store.sequence):
            return cached[2]
        index = KeyIndex(store.keys(b""))
        self._index = (store, store.sequence, index)
        return index

    def release_index(self) -> None:
        """No transfer holds the key list now: let it go."""
        if not self.queued:
            self._index = None

    def clear(self) -> None:
        self.transfers.clear()
        self.queued.clear()
        self._index = None

    def pump(self, router: Socket, now: float) -> bool:
        """Send the next chunk of each snapshot in turn; True if any moved.

        At most ``PUMP`` messages in all, so other tasks run in between; a
        client that took nothing for ``stall`` seconds is dropped.
        """
        transfers, stall = self.transfers, self.stall
        budget = PUMP  # keys looked at, sent or found deleted
        moved = False
        for _ in range(len(transfers)):
            if budget <= 0:
                break
            transfer = transfers.popleft()
            examined, sent = transfer.examined, transfer.sent
            try:
                transfer.pump(router.try_send, min(CHUNK, budget), now)
            except UnroutableError:
                self.log.log(  # one per client: a crowd must not flood the log
                    logging.INFO,
                    "snapshot client gone",
                    "snapshot client went away after %d messages",
                    transfer.sent,
                )
                continue
            finally:
                work = max(transfer.examined - examined, transfer.sent - sent)
                budget -= max(work, 1)
                if work:  # progress for the client, even if nothing was sent
                    transfer.idle_since = now
                    moved = True
            if transfer.done:
                self.stats["snapshots_served"] += 1
                self.durations.observe(now - transfer.started)
                continue
            if now - transfer.idle_since >= stall:
                self.stats["snapshots_stalled"] += 1
                self.log.log(
                    logging.WARNING,
                    "snapshot client stalled",
                    "dropped a snapshot client that took nothing for %.0f s "
                    "(%d messages sent)",
                    stall,
                    transfer.sent,
                )
                continue
            transfers.append(transfer)
        return moved
