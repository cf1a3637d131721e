"""Trio <-> pyzmq: the only place in trioclone that waits on a file descriptor.

The rules (see the design notes) and where each is kept:

1. ``sock.FD`` is an edge notification, not readiness: ``_wait`` reads
   ``EVENTS`` before every wait and again after every wake-up.
2. A send, receive or ``EVENTS`` read may consume the edge of the other
   direction; every socket has one owning task, so only it can be affected,
   and rule 1 makes that harmless.
3. One waiter per FD: each ``Socket`` belongs to one task.  Trio itself raises
   ``BusyResourceError`` if that is ever broken.
4. Always ``NOBLOCK``, whole multipart messages, no checkpoint between frames.
   A message taken off the socket is always returned: the only schedule point
   after taking it is a cancel-shielded one.
5. ``receive_batch`` drains many messages per schedule point, so a flood costs
   one trip through the scheduler per batch, and other tasks still run
   between batches.
6. PUB drops at its high-water mark (by design of PUB/SUB).  ``send`` on
   DEALER and on ROUTER with ``ROUTER_MANDATORY`` waits for room instead of
   dropping, and an unroutable ROUTER message raises ``UnroutableError``.
7. ``close`` calls ``notify_closing`` first (waiters get
   ``trio.ClosedResourceError``), unbinds its ``inproc://`` names (libzmq
   would free them later, in its reaper thread, so a server restarted in
   the same process could not bind them at once), then closes with linger
   (0 unless the caller gives one: a server stopping gracefully lets its
   publisher linger, bounded); a ``Sockets`` group closes every socket
   before its context is terminated, and ``aclose`` waits for the lingering
   ones in a thread that a cancel abandons.
8. No protocol timing in zmq options: timeouts live on Trio's clock.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable, Sequence
from types import TracebackType

import trio
import zmq

from trioclone.curve import Curve
from trioclone.errors import CloneError

Frames = list[bytes]

# pyzmq's send_multipart/recv_multipart combine flags as enum.Flag members and
# read RCVMORE through the option machinery on every frame, which costs more
# than moving the data: for a 5-frame kvmsg here, 12 us to send and 12 us to
# receive, against 3 us and 5 us for the same work with plain int flags and
# each frame's own ``more`` bit.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)

#: How long a ROUTER send waits before retrying a peer whose queue is full
#: while the socket as a whole reports POLLOUT (libzmq sets POLLOUT on a
#: ROUTER when *any* peer has room, so the FD alone cannot wake us).
ROUTER_RETRY_INTERVAL = 0.002


class UnroutableError(CloneError):
    """A ROUTER message was addressed to a peer that is not connected."""


class Socket:
    """A pyzmq socket driven from one Trio task."""

    def __init__(self, sock: zmq.Socket[bytes], inproc: Sequence[str] = ()) -> None:
        self._sock = sock
        self._fd: int = sock.FD
        self._closed = False
        self._inproc = list(inproc)

    @property
    def raw(self) -> zmq.Socket[bytes]:
        """The pyzmq socket, for options; never wait on it directly."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")

    async def wait(self, flag: int) -> bool:
        """Wait until ``EVENTS`` has ``flag`` (``zmq.POLLIN``/``POLLOUT``).

        True if it had to wait (and so passed a schedule point).
        """
        self._check_open()
        flag = int(flag)  # int arithmetic: enum flags cost more than the read
        waited = False
        while not self._events() & flag:
            await trio.lowlevel.wait_readable(self._fd)
            waited = True
            self._check_open()
        return waited

    def _events(self) -> int:
        try:
            return int(_get(self._sock, _EVENTS))
        except zmq.ZMQError as exc:
            raise trio.ClosedResourceError(str(exc)) from exc

    async def receive(self) -> Frames:
        """The next whole multipart message."""
        return (await self.receive_batch(1))[0]

    async def receive_batch(
        self, max_messages: int = 256, users: list[str] | None = None
    ) -> list[Frames]:
        """At least one and at most ``max_messages`` messages (and, with
        ``users``, each one's sender as ``receive_nowait`` gives it).

        ``EVENTS`` is read before taking anything: an empty socket then
        costs no ``zmq.Again`` (an exception, dearer than the read) before
        the wait, so a wake-up for one message costs one."""
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            waited = await self.wait(_POLLIN) or waited
            batch = self.receive_nowait(max_messages, users)
            if batch:
                break
        if not waited:  # a schedule point for fairness, never a cancel point
            await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    def receive_nowait(
        self, max_messages: int = 256, users: list[str] | None = None
    ) -> list[Frames]:
        """Up to ``max_messages`` messages already queued; never waits.

        With ``users`` (a socket with CURVE only), the User-Id the ZAP
        handler gave each message's sender is appended to it, in order."""
        self._check_open()
        batch: list[Frames] = []
        sock = self._sock
        try:
            while len(batch) < max_messages:
                frame = _recv(sock, _NOBLOCK, copy=False)
                user = "" if users is None else _user_id(frame)
                message = [frame.bytes]
                while frame.more:  # the rest of a message is always queued
                    frame = _recv(sock, _NOBLOCK, copy=False)
                    message.append(frame.bytes)
                batch.append(message)
                if users is not None:
                    users.append(user)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if not batch:
                raise trio.ClosedResourceError(str(exc)) from exc
        return batch

    def refresh(self) -> int:
        """Let libzmq act on its pending commands now (a PUB takes in new
        subscribers), which it otherwise does at most once a millisecond
        while sending; return ``EVENTS``.  Only for sockets no task waits on
        (rule 2)."""
        return self._events()

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Send without waiting; False if the peer's queue is full."""
        self._check_open()
        try:
            _send_message(self._sock, frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            raise _send_error(exc) from exc
        return True

    def try_send_each(self, messages: Iterable[Sequence[bytes]]) -> int:
        """``try_send`` each message in turn (one that finds the peer's
        queue full is not sent); how many were sent."""
        self._check_open()
        sock, sent = self._sock, 0
        for frames in messages:
            try:
                _send_message(sock, frames)
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                raise _send_error(exc) from exc
            sent += 1
        return sent

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send a whole message, waiting for room rather than dropping it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.try_send(frames):
            if self._events() & _POLLOUT:
                await trio.sleep(ROUTER_RETRY_INTERVAL)
            else:
                await self.wait(_POLLOUT)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self, linger: int = 0) -> None:
        """Close now; a task waiting on this socket gets ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # outside Trio nobody can wait
            trio.lowlevel.notify_closing(self._fd)
        for endpoint in self._inproc:  # free the name now, not in the reaper
            with contextlib.suppress(zmq.ZMQError):
                self._sock.unbind(endpoint)
        self._sock.close(linger)


def _send_message(sock: zmq.Socket[bytes], frames: Sequence[bytes]) -> None:
    """Send a whole message without waiting; ``zmq.Again`` if there is no
    room (only the first frame can meet the high-water mark: once it is
    accepted, libzmq takes the rest of the message).  Five and six frames
    (a CHP message, and one with a ROUTER's identity first) unrolled: this
    is the hot path of publishing and of snapshots."""
    last = len(frames) - 1
    if last == 4:
        _send(sock, frames[0], _MORE)
        _send(sock, frames[1], _MORE)
        _send(sock, frames[2], _MORE)
        _send(sock, frames[3], _MORE)
        _send(sock, frames[4], _NOBLOCK)
    elif last == 5:
        _send(sock, frames[0], _MORE)
        _send(sock, frames[1], _MORE)
        _send(sock, frames[2], _MORE)
        _send(sock, frames[3], _MORE)
        _send(sock, frames[4], _MORE)
        _send(sock, frames[5], _NOBLOCK)
    else:
        _send(sock, frames[0], _MORE if last else _NOBLOCK)
        for index in range(1, last):
            _send(sock, frames[index], _MORE)
        if last:
            _send(sock, frames[last], _NOBLOCK)


def _send_error(exc: zmq.ZMQError) -> Exception:
    """What a failed send (other than ``zmq.Again``) raises."""
    if exc.errno == errno.EHOSTUNREACH:
        return UnroutableError("peer is not connected")
    return trio.ClosedResourceError(str(exc))


def _user_id(frame: zmq.Frame) -> str:
    """The User-Id libzmq attached to a message ("" if none: a message
    libzmq made itself, such as an XPUB's unsubscription of a subscriber
    that went away)."""
    try:
        return str(frame.get("User-Id"))
    except zmq.ZMQError:
        return ""


class Sockets:
    """Makes sockets on one context and closes them all, context last.

    Pass a ``zmq.Context`` to share it (``inproc://`` needs one context);
    otherwise a private context is made and terminated on ``close``.  With
    ``curve``, every socket but those opened ``secure=False`` uses CURVE:
    as its server if it binds, as a client if it connects.
    """

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: Curve | None = None,
    ):
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        self.curve = curve
        self._sockets: list[Socket] = []
        self._terminated = False

    def open(
        self,
        kind: int,
        *,
        bind: Iterable[str] = (),
        connect: Iterable[str] = (),
        subscribe: Iterable[bytes] = (),
        options: Iterable[tuple[int, int | bytes]] = (),
        secure: bool = True,
    ) -> Socket:
        """A new socket of ``kind``, configured, bound and connected."""
        bind = list(bind)
        raw: zmq.Socket[bytes] = self.context.socket(kind)
        try:
            raw.setsockopt(zmq.LINGER, 0)
            if self.curve is not None and secure:
                options = [*self.curve.options(binds=bool(bind)), *options]
            for option, value in options:
                raw.setsockopt(option, value)
            for prefix in subscribe:
                raw.setsockopt(zmq.SUBSCRIBE, prefix)
            for endpoint in bind:
                raw.bind(endpoint)
            for endpoint in connect:
                raw.connect(endpoint)
        except BaseException:
            raw.close(0)
            raise
        sock = Socket(raw, [e for e in bind if e.startswith("inproc://")])
        self._sockets = [s for s in self._sockets if not s.closed]
        self._sockets.append(sock)
        return sock

    def close(self) -> None:
        self.close_sockets()
        if self._own_context and not self._terminated:
            self._terminated = True
            self.context.term()

    def close_sockets(self) -> None:
        """Close every socket (with the linger each was closed with, if it
        was closed already: a socket is closed once); not the context."""
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    async def aclose(self) -> None:
        """``close``, with the wait for lingering sockets in a thread: a
        cancel abandons the wait (the context is then left to the process's
        exit), so what lingers never holds up a Trio task."""
        self.close_sockets()
        if self._own_context and not self._terminated:
            self._terminated = True
            await trio.to_thread.run_sync(self.context.term, abandon_on_cancel=True)

    def __enter__(self) -> Sockets:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
