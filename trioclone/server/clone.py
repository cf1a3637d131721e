"""The Clone server: a Trio shell around ``ServerCore`` and ``BinaryStar``.

Sockets and the tasks every role needs live as long as the server: the
collector (client KVSETs), the snapshot socket (ICANHAZ, which are also the
Binary Star votes), the Binary Star heartbeat sender and peer listener, and
the publisher (one owner, gated).  Work that belongs to one role runs in a
role scope that the supervisor cancels and starts again on every Binary
Star state change:

* ACTIVE: opens the publisher gate, sends HUGZ, expires TTLs;
* PASSIVE: subscribes to the active's stream, fetches a snapshot (with a
  timeout and retries, never blocking the other tasks), mirrors the stream
  and resyncs on a gap.

The supervisor re-reads the current state after every scope exit, so a
quick ACTIVE -> PASSIVE -> ACTIVE flap still ends with the right scope.
State changes are applied to the core synchronously by whichever task saw
the event, so the core never acts in the wrong role, even while an old
role scope is still winding down.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

import trio
import zmq
from trio_util import AsyncValue

from trioclone._log import Limited
from trioclone._zmq import ROUTER_RETRY_INTERVAL, Socket, Sockets, UnroutableError
from trioclone.core.bstar import BinaryStar, Outcome, State, decode_state, encode_state
from trioclone.core.chp import decode_request, encode_request
from trioclone.core.server import ServerCore
from trioclone.core.snapshot import Transfer
from trioclone.core.store import Store
from trioclone.errors import RemoteProtocolError
from trioclone.server.publisher import Publisher
from trioclone.server.settings import PairSettings, ServerSettings

log = logging.getLogger("trioclone.server")

BATCH = 512  # messages drained per schedule point on the busy sockets
CHUNK = 256  # snapshot messages sent to one client before the next one's turn
SNAPSHOT_HWM = 10_000

Context = zmq.Context[zmq.Socket[bytes]]


class CloneServer:
    """One Clone server: standalone, or one side of a Binary Star pair."""

    def __init__(self, settings: ServerSettings, *, context: Context | None = None):
        self.settings = settings
        self.core = ServerCore(
            applied_window=settings.applied_window,
            pending_size=settings.pending_size,
            pending_age=settings.pending_age,
            backlog_limit=settings.backlog_limit,
        )
        self.bstar: BinaryStar | None = None
        self.state = AsyncValue(
            State.ACTIVE if settings.pair is None else _start(settings.pair)
        )
        self.synced = AsyncValue(False)
        #: Called with ("active" | "passive", "enter" | "exit"); for tests.
        self.trace: Callable[[str, str], None] | None = None
        self._context = context
        self._log = Limited(log)
        self._transfers: deque[Transfer] = deque()
        self._key_list: tuple[Store, int, bytes, list[bytes]] | None = None
        self._role_scope: trio.CancelScope | None = None
        self._state_sock: Socket | None = None
        self._expiry_at = math.inf
        self._expiry_wakeup = trio.Event()
        self._resync = trio.Event()
        self._attempt: trio.CancelScope | None = None
        self._sockets: Sockets
        self.publisher: Publisher
        self.peer_listener: Socket | None = None

    @property
    def pair(self) -> PairSettings | None:
        return self.settings.pair

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Serve until cancelled; ``nursery.start`` returns once bound."""
        s = self.settings
        with Sockets(self._context) as sockets:
            self._sockets = sockets
            router = sockets.open(
                zmq.ROUTER,
                bind=[s.bind.snapshot],
                options=[(zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, SNAPSHOT_HWM)],
            )
            self.publisher = Publisher(
                sockets.open(
                    zmq.PUB,
                    bind=[s.bind.publisher],
                    options=[(zmq.SNDHWM, s.publisher_hwm)],
                )
            )
            collector = sockets.open(
                zmq.SUB,
                bind=[s.bind.collector],
                subscribe=[b""],
                options=[(zmq.RCVHWM, s.collector_hwm)],
            )
            async with trio.open_nursery() as nursery:
                now = trio.current_time()
                if s.pair is None:
                    self.publisher.publish_all(self.core.become_active(now))
                else:
                    self.bstar = BinaryStar(
                        s.pair.primary, now, s.pair.heartbeat, s.pair.expiry_heartbeats
                    )
                    self._state_sock = sockets.open(zmq.PUB, bind=[s.pair.state_bind])
                    self.peer_listener = sockets.open(
                        zmq.SUB, connect=[s.pair.state_peer], subscribe=[b""]
                    )
                    nursery.start_soon(self._send_state, s.pair.heartbeat)
                    nursery.start_soon(self._hear_peer, self.peer_listener)
                nursery.start_soon(self._collect, collector)
                nursery.start_soon(self._serve_snapshots, router)
                nursery.start_soon(self._supervise)
                nursery.start_soon(self._report, s.status_interval)
                log.info("%s listening: %s", s.name, s.bind)
                task_status.started(self)
        raise AssertionError("the server's tasks never return")

    def status(self) -> dict[str, object]:
        """Figures for operators: role, sequence, sizes, counters."""
        core = self.core
        return {
            "state": self.state.value.name,
            "sequence": core.store.sequence,
            "keys": len(core.store),
            "pending": len(core.pending),
            "pending_dropped": core.pending.dropped,
            "published": self.publisher.published,
            **core.stats,
            **({} if self.bstar is None else dict(self.bstar.faults)),
        }

    # -- the role supervisor ----------------------------------------------

    async def _supervise(self) -> NoReturn:
        work = {State.ACTIVE: self._active, State.PASSIVE: self._passive}
        while True:
            role = self.state.value  # re-read after every exit: flaps end right
            with trio.CancelScope() as scope:
                self._role_scope = scope
                await work.get(role, trio.sleep_forever)()
            self._role_scope = None

    def _on_bstar(self, outcome: Outcome, now: float) -> None:
        if outcome.fault:
            self._log.log(
                logging.ERROR,
                outcome.fault,
                "Binary Star fault: %s (%s -> %s); converging",
                outcome.fault,
                outcome.previous.name,
                outcome.state.name,
            )
        if not outcome.changed:
            return
        state = outcome.state
        log.info("Binary Star: %s -> %s", outcome.previous.name, state.name)
        if state == State.ACTIVE:
            if outcome.previous == State.PASSIVE and not self.core.synced:
                self.core.stats["unsynced_takeovers"] += 1
                log.error(
                    "taking over before any complete snapshot from the peer: "
                    "serving the last complete copy (%d keys); newer keys are lost",
                    len(self.core.store),
                )
            self.publisher.publish_all(self.core.become_active(now))
        elif state == State.PASSIVE:
            self.core.become_passive()
            self.publisher.close(discard=True)
            self._transfers.clear()
            self._key_list = None
            self.synced.value = False
        self.state.value = state
        if self._state_sock is not None:
            self._state_sock.refresh()
            self._state_sock.try_send([encode_state(state)])
        if self._role_scope is not None:
            self._role_scope.cancel()

    def _trace(self, role: str, step: str) -> None:
        if self.trace is not None:
            self.trace(role, step)

    # -- tasks for the server's whole life ----------------------------------

    async def _collect(self, sock: Socket) -> NoReturn:
        core, publish = self.core, self.publisher.publish
        while True:
            batch = await sock.receive_batch(BATCH)
            now = trio.current_time()
            self.publisher.admit()
            for frames in batch:
                try:
                    update = core.collect(frames, now)
                except RemoteProtocolError as exc:
                    self._reject("collector", exc)
                    continue
                if update is not None:
                    publish(update)
            if core.active:
                deadline = core.store.next_deadline()
                if deadline is not None and deadline < self._expiry_at:
                    self._expiry_wakeup.set()
            else:
                core.pending.expire(now)

    async def _serve_snapshots(self, router: Socket) -> NoReturn:
        transfers = self._transfers
        while True:
            if transfers:
                requests = router.receive_nowait(64)
            else:
                requests = await router.receive_batch(64)
            now = trio.current_time()
            for frames in requests:
                self._on_request(frames, now)
            if not transfers:
                continue
            if self._pump(router, now):
                await trio.lowlevel.checkpoint()
            else:  # every client's queue is full: poll, but wake for requests
                with trio.move_on_after(ROUTER_RETRY_INTERVAL):
                    await router.wait(zmq.POLLIN)

    def _on_request(self, frames: list[bytes], now: float) -> None:
        identity, request = frames[0], frames[1:]
        try:
            subtree = decode_request(request)
        except RemoteProtocolError as exc:
            self._reject("snapshot", exc)
            return
        if self.bstar is not None:
            outcome = self.bstar.on_vote(now)
            self._on_bstar(outcome, now)
            if not outcome.accepted:
                log.debug("vote rejected in state %s", outcome.state.name)
                return
        store = self.core.store
        self._transfers.append(Transfer(identity, store, subtree, self._keys(subtree)))

    def _keys(self, subtree: bytes) -> list[bytes]:
        """The subtree's key list, shared by requests while nothing changed."""
        store, cached = self.core.store, self._key_list
        if cached is not None and cached[:3] == (store, store.sequence, subtree):
            return cached[3]
        keys = store.keys(subtree)
        self._key_list = (store, store.sequence, subtree, keys)
        return keys

    def _pump(self, router: Socket, now: float) -> bool:
        """Send the next chunk of every snapshot in turn; True if any moved."""
        transfers = self._transfers
        moved = False
        for _ in range(len(transfers)):
            transfer = transfers.popleft()
            try:
                for _ in range(CHUNK):
                    frames = transfer.peek(now)
                    if frames is None or not router.try_send(frames):
                        break
                    transfer.advance()
                    moved = True
            except UnroutableError:
                log.info("snapshot client went away after %d messages", transfer.sent)
                continue
            if not transfer.done:
                transfers.append(transfer)
        return moved

    async def _send_state(self, heartbeat: float) -> NoReturn:
        assert self.bstar is not None and self._state_sock is not None
        deadline = trio.current_time()
        while True:
            self._state_sock.refresh()
            self._state_sock.try_send([encode_state(self.bstar.state)])
            deadline = max(deadline + heartbeat, trio.current_time())
            await trio.sleep_until(deadline)

    async def _hear_peer(self, sock: Socket) -> NoReturn:
        assert self.bstar is not None
        while True:
            batch = await sock.receive_batch(64)
            now = trio.current_time()
            for frames in batch:
                try:
                    peer = decode_state(frames)
                except RemoteProtocolError as exc:
                    self._reject("peer heartbeat", exc)
                    continue
                self._on_bstar(self.bstar.on_peer(peer, now), now)

    async def _report(self, interval: float) -> NoReturn:
        while True:
            await trio.sleep(interval)
            log.info("status %s", self.status())

    def _reject(self, where: str, exc: RemoteProtocolError) -> None:
        self.core.stats["rejected"] += 1
        self._log.log(
            logging.WARNING, where, "rejected on the %s socket: %s", where, exc
        )

    # -- ACTIVE ------------------------------------------------------------

    async def _active(self) -> None:
        self._trace("active", "enter")
        self.publisher.open()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_hugz, self.settings.hugz_interval)
                nursery.start_soon(self._expire)
        finally:
            self.publisher.close()
            self._trace("active", "exit")

    async def _send_hugz(self, interval: float) -> NoReturn:
        deadline = trio.current_time()
        while True:
            self.publisher.admit()
            self.publisher.publish(self.core.hugz())
            deadline = max(deadline + interval, trio.current_time())
            await trio.sleep_until(deadline)

    async def _expire(self) -> NoReturn:
        core = self.core
        while True:
            self.publisher.publish_all(core.expire(trio.current_time()))
            deadline = core.store.next_deadline()
            self._expiry_at = math.inf if deadline is None else deadline
            self._expiry_wakeup = trio.Event()
            with trio.move_on_at(self._expiry_at):
                await self._expiry_wakeup.wait()

    # -- PASSIVE -----------------------------------------------------------

    async def _passive(self) -> None:
        assert self.pair is not None
        self._trace("passive", "enter")
        stream = self._sockets.open(
            zmq.SUB,
            connect=[self.pair.peer.publisher],
            subscribe=[b""],
            options=[(zmq.RCVHWM, self.settings.publisher_hwm)],
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._mirror, stream)
                nursery.start_soon(self._sync)
        finally:
            stream.close()
            self._trace("passive", "exit")

    async def _mirror(self, stream: Socket) -> NoReturn:
        core = self.core
        while True:
            batch = await stream.receive_batch(BATCH)
            now = trio.current_time()
            resync = False
            for frames in batch:
                try:
                    resync |= core.mirror(frames, now)
                except RemoteProtocolError as exc:
                    self._reject("active's stream", exc)
            if resync:
                self._request_resync()

    def _request_resync(self) -> None:
        if self.core.synced:
            log.warning("missed updates on the active's stream; resyncing")
            self._resync.set()
        elif self._attempt is not None:
            log.warning("backlog overflow during the snapshot; starting again")
            self._attempt.cancel()

    async def _sync(self) -> NoReturn:
        retry = self.settings.sync_retry
        while True:
            self._resync = trio.Event()
            with trio.CancelScope() as self._attempt:
                if await self._fetch_snapshot():
                    self._attempt = None
                    self.synced.value = True
                    if self.core.resync_wanted:
                        log.warning(
                            "missed updates right after the snapshot; resyncing"
                        )
                    else:
                        await self._resync.wait()
                    self.synced.value = False
                    continue
            self._attempt = None
            await trio.sleep(retry)

    async def _fetch_snapshot(self) -> bool:
        assert self.pair is not None
        core, timeout = self.core, self.settings.sync_timeout
        core.begin_sync()
        dealer = self._sockets.open(zmq.DEALER, connect=[self.pair.peer.snapshot])
        try:
            await dealer.send(encode_request(b""))
            while True:
                with trio.move_on_after(timeout) as waited:
                    batch = await dealer.receive_batch(BATCH)
                if waited.cancelled_caught:
                    log.warning(
                        "no snapshot from the active within %.1f s; retrying", timeout
                    )
                    return False
                now = trio.current_time()
                for frames in batch:
                    if core.load(frames, now):
                        log.info(
                            "synced from the active: %d keys, sequence %d",
                            len(core.store),
                            core.store.sequence,
                        )
                        return True
        except RemoteProtocolError as exc:
            self._reject("snapshot reply", exc)
            return False
        finally:
            dealer.close()


def _start(pair: PairSettings) -> State:
    return State.PRIMARY if pair.primary else State.BACKUP
