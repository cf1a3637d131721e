"""The single owner of the server's publisher socket, with a gate.

Only the ACTIVE role scope opens the gate.  Updates produced while it is
closed (the takeover's pending list, client updates applied between the
Binary Star flip and the start of the ACTIVE scope) are held in order and
flushed when the gate opens, so nothing is published while the PASSIVE
scope may still be running.  Stepping down discards what is held: the
server resyncs from the active anyway.

The socket is an XPUB: to subscribers it is a PUB, and it also hands up the
subscriptions they make, which feed the subtree heartbeats (see
core/subtrees.py).  Publishing never blocks (it drops at its high-water
mark for a subscriber that does not keep up), so it is a plain synchronous
call and no task ever waits on this socket.  With a durable map, ``before``
commits it first: nothing is published that a crash could lose.

With ``vet`` (a secured server with permissions), the XPUB applies no
subscription by itself (``XPUB_MANUAL``): each one is handed up with its
sender's User-Id, and applied only if ``vet(user, prefix)`` allows it, so a
client reads on the stream only what it may read in a snapshot.  libzmq
then hands up each subscriber's every (un)subscription, not a prefix's
first and last, so they no longer tell when the last subscriber of a
prefix went away: a prefix once tracked for subtree heartbeats stays
tracked (within the ``Subtrees`` limit).

libzmq applies a SUBSCRIBE option to the subscriber of the last message
read, and keeps that subscriber in a queue beside the messages; but for a
message that is not a subscription (an XSUB may send anything) it queues
the message and no subscriber, so the two queues fall out of step until
both are empty, and a SUBSCRIBE would go to another subscriber than the
one whose subscription was vetted.  So once such a message is read, the
subscriptions read with it are dropped, not applied, until a read finds
the queue empty (counted in ``subscriptions_dropped``; the sender named
in the log, and banned by the server).  Their clients hear nothing on the
stream and, after their silence timeout, connect and subscribe again.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence

import zmq

from trioclone._zmq import Socket
from trioclone.core.subtrees import Subtrees, parse_subscription
from trioclone.errors import RemoteProtocolError

Frames = list[bytes]
POLLIN = int(zmq.POLLIN)
DRAIN = 256  # subscriptions read at a time


class Publisher:
    def __init__(
        self,
        sock: Socket,
        subtrees: Subtrees,
        reject: Callable[[str, RemoteProtocolError], None],
        *,
        before: Callable[[], None] | None = None,
        vet: Callable[[str, bytes], bool] | None = None,
        stats: MutableMapping[str, int] | None = None,
        stray: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._vet = vet
        self._stats = stats if stats is not None else {}
        #: Called with the sender of a message that is not a subscription.
        self._stray = stray
        #: libzmq's queues are out of step (see above) until a read finds
        #: the queue empty.
        self._astray = False
        if vet is not None:
            sock.raw.setsockopt(zmq.XPUB_MANUAL, 1)
        #: Called before anything is sent: the map is made durable first.
        self._before = before
        self._subtrees = subtrees
        self._reject = reject
        self._open = False
        self._held: list[Sequence[bytes]] = []
        self.published = 0
        #: Called with each message published (tests observe the stream).
        self.observer: Callable[[Sequence[bytes]], None] | None = None

    def admit(self) -> None:
        """Take in subscribers (and their subscriptions) since the last call.

        A PUB does so by itself at most once a millisecond while sending;
        reading EVENTS makes it happen before the next batch is published,
        so a client that just subscribed misses nothing sent after it did.
        """
        sock = self._sock
        if not sock.refresh() & POLLIN:
            return  # the usual case: nothing to read, and no exception raised
        if self._vet is not None:
            self._admit_vetted(self._vet)
            return
        for _ in range(4):  # bounded: a flood of them waits for the next call
            messages = sock.receive_nowait(DRAIN)
            for frames in messages:
                try:
                    self._subtrees.on_subscription(frames)
                except RemoteProtocolError as exc:
                    self._reject("publisher", exc)
            if len(messages) < DRAIN:
                return  # that was all of them

    def _admit_vetted(self, vet: Callable[[str, bytes], bool]) -> None:
        """One at a time: libzmq applies a SUBSCRIBE option to the
        subscriber of the last subscription read."""
        sock, raw = self._sock, self._sock.raw
        for _ in range(4 * DRAIN):
            users: list[str] = []
            messages = sock.receive_nowait(1, users)
            if not messages:
                self._astray = False  # both queues are empty: in step again
                return
            frames = messages[0]
            try:
                subscribe, prefix = parse_subscription(frames)
            except RemoteProtocolError as exc:
                self._astray = True
                if users[0] and self._stray is not None:
                    self._stray(users[0])
                sender = users[0] or "unknown"
                self._reject(
                    "publisher", RemoteProtocolError(exc.rule, f"from {sender}")
                )
                continue
            if self._astray:
                self._stats["subscriptions_dropped"] = (
                    self._stats.get("subscriptions_dropped", 0) + 1
                )
                continue
            if not subscribe:
                raw.setsockopt(zmq.UNSUBSCRIBE, prefix)
            elif vet(users[0], prefix):
                raw.setsockopt(zmq.SUBSCRIBE, prefix)
                self._subtrees.on_subscription(frames)

    def publish_all(self, messages: Sequence[Sequence[bytes]]) -> None:
        """Publish ``messages`` in order, subscribers that came meanwhile
        taken in first; held while the gate is closed."""
        if not messages:
            return
        if not self._open:
            self._held.extend(messages)
            return
        if self._before is not None:
            self._before()
        self.admit()
        self._sock.try_send_each(messages)  # at its high-water mark, a PUB drops
        observer = self.observer
        if observer is not None:
            for frames in messages:
                observer(frames)
        self.published += len(messages)

    def open(self) -> None:
        self._open = True
        held, self._held = self._held, []
        self.publish_all(held)

    def close(self, *, discard: bool = False) -> None:
        self._open = False
        if discard:
            self._held.clear()

    def close_socket(self, linger: int) -> None:
        """At a graceful stop: close the socket, letting libzmq deliver
        what was published for up to ``linger`` milliseconds."""
        self.close(discard=True)
        self._sock.close(linger)
