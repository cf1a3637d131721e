"""The Clone server: a Trio shell around ``ServerCore``.

Sockets and the tasks every role needs live as long as the server: the
collector (client KVSETs), the snapshot socket (ICANHAZ, which are also the
Binary Star votes), the Binary Star heartbeat sender and peer listener, the
listener for the peer's HUGZ (its claims) and the publisher (one owner,
gated; what its subscribers send it is read at least once a HUGZ
interval, in every role).  A timer task drives the core's timeouts; a
work task runs its long work (a takeover, catching up a backlog, a
hand-over) in bounded steps with a schedule point between them, so
heartbeats are never late.

Work that belongs to one role runs in a role scope that the supervisor
cancels and starts again on every role change:

* ACTIVE: opens the publisher gate, sends HUGZ and subtree heartbeats,
  expires TTLs;
* PASSIVE: runs the connections the core's replica of the active asks for.

The supervisor re-reads the current role after every scope exit, so a
quick ACTIVE -> PASSIVE -> ACTIVE flap still ends with the right scope.

``stop`` asks for a graceful stop (the command line calls it on SIGTERM or
SIGINT), bounded by ``STOP_LIMIT`` seconds: no more writes are taken (the
collector stops reading, takes what is queued in it already, and is
closed); every task is cancelled; the map is committed, and synced to disk
with ``--fsync interval``; the publisher and the hand-over socket linger
(at most ``STOP_LINGER`` seconds) so the passive and the clients get what
was published; then ``run`` returns.  Cancelling ``run`` instead stops at
once, as before.
Role changes happen in the core, synchronously, in whichever task fed it
the event, so the core never acts in the wrong role, even while an old
role scope is still winding down.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio
import zmq
from trio_util import AsyncValue

from trioclone._follow import Follower, feed
from trioclone._log import Limited
from trioclone._zmq import ROUTER_RETRY_INTERVAL, Socket, Sockets, UnroutableError
from trioclone.core.bstar import BinaryStar, Outcome, State, encode_state
from trioclone.core.chp import HISTORY, HUGZ, decode_request, encode_denial
from trioclone.core.permissions import PAIR
from trioclone.core.replica import Timings
from trioclone.core.server import PEER_IDENTITY, Role, ServerCore, is_handover
from trioclone.core.snapshot import Transfer
from trioclone.core.status import (
    check_status_request,
    encode_status_reply,
    is_status_request,
)
from trioclone.curve import Curve, read_key_pair
from trioclone.errors import ConfigError, RemoteProtocolError
from trioclone.server.datadir import SYNC_INTERVAL, DataDir, DataDirError, wall_clock
from trioclone.server.durations import Durations
from trioclone.server.publisher import Publisher
from trioclone.server.settings import PairSettings, ServerSettings
from trioclone.server.snapshots import Snapshots
from trioclone.server.zap import ZAP_ENDPOINT, ZapHandler, client_name

if TYPE_CHECKING:
    from trioclone.server.metrics import MetricsEndpoint

log = logging.getLogger("trioclone.server")

BATCH = 512  # messages drained per schedule point on the busy sockets
SNAPSHOT_HWM = 10_000
#: The largest message a subscriber may send the publisher or the Binary
#: Star heartbeat PUB (a subscription is one): libzmq does a subscription's
#: work, a trie node per byte, in the server's event loop (about 0.2 s a
#: megabyte); a subscriber that sends a larger one is disconnected.
MAX_SUBSCRIPTION = 65_536
#: A graceful stop takes at most this long (seconds), whatever the disk and
#: the peers do; then ``run`` returns.  ``serve --pair``'s supervisor waits
#: longer than this before it kills a child (``Supervisor.grace``).
STOP_LIMIT = 3.0
#: How long the publisher and the hand-over socket may linger at a graceful
#: stop, delivering what was already sent (a subscriber that reads nothing
#: cannot hold it up longer).
STOP_LINGER = 1.0
#: At most this many writes queued in the collector are taken at a stop.
STOP_DRAIN = 100_000
#: Refusals waiting to be sent to the clients they are for, and the routing
#: ids of each client's snapshot sockets kept to send them to.
MAX_DENIALS = 1024
ROUTES_PER_USER = 16

Context = zmq.Context[zmq.Socket[bytes]]


class CloneServer:
    """One Clone server: standalone, or one side of a Binary Star pair."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        context: Context | None = None,
        sockets: Callable[[], Sockets] | None = None,
        wall: Callable[[], float] = wall_clock,
    ):
        self.settings = settings
        self.core = ServerCore(
            applied_horizon=settings.applied_horizon,
            applied_limit=settings.applied_limit,
            pending_size=settings.pending_size,
            pending_age=settings.pending_age,
            backlog_limit=settings.backlog_limit,
            journal=settings.data_dir is not None,
            replica_timings=Timings(
                request_timeout=settings.sync_timeout,
                silence_timeout=2 * settings.hugz_interval + 1.0,
                backoff=settings.sync_retry,
                max_backoff=max(settings.sync_retry, 5.0),
            ),
        )
        pair = settings.pair
        self.state = AsyncValue(
            State.ACTIVE
            if pair is None
            else State.PRIMARY
            if pair.primary
            else State.BACKUP
        )
        self.synced = AsyncValue(False)
        #: Called with ("active" | "passive", "enter" | "exit"); for tests.
        self.trace: Callable[[str, str], None] | None = None
        self._context = context
        #: With keys: who may connect (a ZAP handler) and what each may do.
        self.zap: ZapHandler | None = None
        curve = self._curve(settings, context)
        #: Makes the server's sockets (a simulated network can stand in).
        self._open_sockets = sockets or (lambda: Sockets(context, curve))
        self._denials: deque[list[bytes]] = deque(maxlen=MAX_DENIALS)
        self._routes: dict[str, deque[bytes]] = {}
        #: The wall clock, for what is kept on disk (a simulation's is Trio's).
        self._wall = wall
        self._log = Limited(log)
        #: Messages rejected, by the socket they came in on.
        self.rejections: Counter[str] = Counter()
        #: ... and by socket and the rule they broke.
        self.rejected_rules: Counter[tuple[str, str]] = Counter()
        #: Snapshot replies owed and in progress.
        self.snapshots = Snapshots(settings.snapshot_stall, self.core.stats, self._log)
        #: How long snapshot replies took (from their first message to the
        #: last), and commits of the map on disk.
        self.snapshot_durations = self.snapshots.durations
        self.commit_durations = Durations()
        #: Trio time when the sockets were bound (for the uptime).
        self.started_at: float | None = None
        #: The Prometheus endpoint, with ``settings.metrics_port``.
        self.metrics: MetricsEndpoint | None = None
        self._role = Role.WAITING
        self._transfers = self.snapshots.transfers
        self._queued = self.snapshots.queued
        self._role_scope: trio.CancelScope | None = None
        self._snapshot_wait: trio.CancelScope | None = None
        self._state_sock: Socket | None = None
        self._relay_sock: Socket | None = None
        self._follower: Follower | None = None
        self._expiry_at = math.inf
        self._expiry_wakeup = trio.Event()
        self._timer_wakeup = trio.Event()
        self._work_wakeup = trio.Event()
        #: Set by ``stop``; the collector's scope, cancelled to stop it, and
        #: set once it took what was queued and closed.
        self._stop_requested = False
        self._stop_wakeup: trio.Event | None = None
        self._collecting = trio.CancelScope()
        self._collected = trio.Event()
        #: The map on disk, when ``settings.data_dir`` is set.
        self.data: DataDir | None = None
        self._sockets: Sockets
        self.publisher: Publisher

    @property
    def pair(self) -> PairSettings | None:
        return self.settings.pair

    def _curve(self, s: ServerSettings, context: Context | None) -> Curve | None:
        """Read the keys and permissions (``ConfigError`` naming the file at
        fault) and make the ZAP handler; None for a plain server."""
        if s.curve_secret is None or s.curve_clients is None:
            return None
        if context is not None:
            raise ConfigError(
                "a server with CURVE needs a ZeroMQ context of its own "
                "(its ZAP handler is the context's)"
            )
        keys = read_key_pair(Path(s.curve_secret))
        self.zap = ZapHandler(
            keys,
            Path(s.curve_clients),
            None if s.permissions is None else Path(s.permissions),
            self.core.stats,
        )
        self.core.vet = self._may_write  # a takeover's replay asks again
        return Curve.for_server(keys)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled, or until ``stop`` is called and the
        graceful stop is done; ``nursery.start`` returns once bound.

        With a data folder, the map it kept is loaded first; a folder that
        cannot be used raises ``DataDirError`` (naming the file) before any
        socket is bound."""
        s = self.settings
        if s.metrics_port is not None:
            from trioclone.server.metrics import require_prometheus

            require_prometheus()  # before anything is bound or loaded
        if s.data_dir is None:
            await self._serve(task_status)
            return
        self.data = self._open_data(s.data_dir, s.fsync, s.reset_data)
        try:
            await self._serve(task_status)
        finally:  # (no last flush here: each input's was whole, as at a SIGKILL)
            self.data.close()

    def stop(self) -> None:
        """Stop gracefully (see the module's docstring); ``run`` returns
        once done.  Called before ``run`` binds, the server stops as soon
        as it is serving; a second call changes nothing."""
        if self._stop_requested:
            return
        self._stop_requested = True
        log.info(
            "stopping (%s, sequence %d): no more writes taken",
            self.core.role.value,
            self.core.sequence,
        )
        self._collecting.cancel()
        if self._stop_wakeup is not None:
            self._stop_wakeup.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested

    def _open_data(self, folder: str, fsync: str, reset: bool) -> DataDir:
        data = DataDir(Path(folder), fsync, reset=reset)
        if reset:
            log.warning(
                "starting with an empty map: --reset-data deleted %s", data.path
            )
        try:
            kept = data.load(self.core, trio.current_time(), self._wall())
        except BaseException:
            data.close()
            raise
        if kept is None:
            log.info("no map kept in %s yet: it keeps this server's map", data.path)
        else:
            log.info(
                "loaded the map kept in %s: %d keys, sequence %d, lineage %s, "
                "%d replaced writes remembered (this server was its %s)",
                data.path,
                kept.keys,
                kept.sequence,
                kept.lineage,
                kept.window,
                "active" if kept.active else "passive",
            )
        return data

    def _persist(self) -> None:
        """Commit what changed in the map (before anything shows it)."""
        data = self.data
        if data is not None:
            now = trio.current_time()
            if data.flush(self.core, now, self._wall()):
                self.commit_durations.observe(trio.current_time() - now)

    async def _serve(self, task_status: Any) -> None:
        s, core = self.settings, self.core
        self._stop_wakeup = trio.Event()
        if self._stop_requested:
            self._stop_wakeup.set()
        with self._open_sockets() as sockets:
            self._sockets = sockets
            zap = None
            if self.zap is not None:  # first: it vets every handshake
                zap = sockets.open(zmq.ROUTER, bind=[ZAP_ENDPOINT], secure=False)
            router = sockets.open(
                zmq.ROUTER,
                bind=[s.bind.snapshot],
                options=[(zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, SNAPSHOT_HWM)],
            )
            self.publisher = Publisher(
                sockets.open(
                    zmq.XPUB,
                    bind=[s.bind.publisher],
                    options=[
                        (zmq.SNDHWM, s.publisher_hwm),
                        (zmq.MAXMSGSIZE, MAX_SUBSCRIPTION),
                    ],
                ),
                core.subtrees,
                self._reject,
                before=None if self.data is None else self._persist,
                vet=None if s.permissions is None else self._may_subscribe,
                stats=core.stats,
                stray=None if self.zap is None else self.zap.ban,
            )
            collector = sockets.open(
                zmq.SUB,
                bind=[s.bind.collector],
                subscribe=[b""],
                options=[(zmq.RCVHWM, s.collector_hwm)],
            )
            async with trio.open_nursery() as nursery:
                if self.zap is not None and zap is not None:
                    nursery.start_soon(self.zap.run, zap)
                now = trio.current_time()
                if s.pair is not None:
                    self._start_pair(nursery, sockets, s.pair, now)
                core.start(now)
                self._after(now)
                nursery.start_soon(self._collect, collector)
                nursery.start_soon(self._serve_snapshots, router)
                nursery.start_soon(self._supervise)
                nursery.start_soon(self._timers)
                nursery.start_soon(self._work)
                nursery.start_soon(self._report, s.status_interval)
                nursery.start_soon(self._tend_publisher, s.hugz_interval)
                if self.data is not None and self.data.fsync == "interval":
                    nursery.start_soon(self._sync_disk, self.data)
                if s.metrics_port is not None:
                    await nursery.start(self._serve_metrics, s)
                self.started_at = trio.current_time()
                log.info("%s listening: %s", s.name, s.bind)
                task_status.started(self)
                await self._stop_wakeup.wait()
                with trio.move_on_after(STOP_LIMIT) as bound:
                    await self._collected.wait()
                nursery.cancel_scope.cancel()
            # Every task has ended: nothing publishes or commits any more.
            with trio.move_on_at(bound.deadline) as bound:
                await self._finish(sockets)
            if bound.cancelled_caught:
                log.warning(
                    "stopping took %g s: the last steps were cut short", STOP_LIMIT
                )
        log.info("%s stopped", s.name)

    # -- a graceful stop ------------------------------------------------------

    async def _finish(self, sockets: Sockets) -> None:
        """The map committed and on disk, then the sockets closed, letting
        the publisher and the hand-over socket deliver what they hold."""
        data = self.data
        if data is not None:
            self._persist()
            # (in the event loop, as every commit: nothing else runs now)
            data.sync()
            log.info(
                "the map is committed%s: %d keys, sequence %d",
                " and synced to disk" if data.fsync != "off" else "",
                len(self.core.store),
                self.core.sequence,
            )
        linger = int(STOP_LINGER * 1000)
        self.publisher.close_socket(linger)
        if self._relay_sock is not None:
            self._relay_sock.close(linger)
        log.info(
            "closing the sockets (what was published is delivered for up to %g s)",
            STOP_LINGER,
        )
        await sockets.aclose()

    def _start_pair(
        self, nursery: trio.Nursery, sockets: Sockets, pair: PairSettings, now: float
    ) -> None:
        self.core.bstar = BinaryStar(
            pair.primary, now, pair.heartbeat, pair.expiry_heartbeats
        )
        self._state_sock = sockets.open(
            zmq.PUB,
            bind=[pair.state_bind],
            options=[(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)],
        )
        peer_states = sockets.open(zmq.SUB, connect=[pair.state_peer], subscribe=[b""])
        claims = sockets.open(
            zmq.SUB, connect=[pair.peer.publisher], subscribe=[b"HUGZ"]
        )
        self._relay_sock = sockets.open(
            zmq.PUB, connect=[pair.peer.collector], options=[(zmq.SNDHWM, 0)]
        )
        nursery.start_soon(self._send_state, pair.heartbeat)
        nursery.start_soon(self._hear_peer, peer_states)
        nursery.start_soon(self._hear_claims, claims)

    def status(self) -> dict[str, object]:
        """Figures for operators: role, sequence, sizes, counters."""
        bstar = self.core.bstar
        return {
            "state": self.state.value.name,
            **self.core.status(),
            "published": self.publisher.published,
            **({} if bstar is None else dict(bstar.faults)),
        }

    def status_report(self, now: float) -> dict[str, object]:
        """The answer to a status request (docs/monitoring.md says what
        each field means): cheap, whatever the map's size."""
        from trioclone import __version__  # (the package imports its parts)

        core, s, bstar = self.core, self.settings, self.core.bstar
        heard = None
        if bstar is not None and bstar.peer_state is not None:
            heard = max(now - (bstar.peer_expiry - bstar.expiry), 0.0)
        replica = core.replica
        counters: dict[str, int] = {
            **core.stats,
            **(
                {}
                if replica is None
                else {f"sync_{k}": v for k, v in replica.stats.items()}
            ),
            "published": self.publisher.published,
            "pending_dropped": core.pending.dropped,
            "window_evicted_early": core.applied.evicted_early,
            "subtrees_untracked": core.subtrees.untracked,
        }
        return {
            "name": s.name,
            "version": __version__,
            "pair": bstar is not None,
            "state": State.ACTIVE.name if bstar is None else bstar.state.name,
            "role": core.role.value,
            "serving": core.serving,
            "synced": core.synced,
            "sequence": core.sequence,
            "keys": len(core.store),
            "lineage": core.lineage,
            "pending": len(core.pending),
            "window": len(core.applied),
            "peer_state": None
            if bstar is None or bstar.peer_state is None
            else bstar.peer_state.name,
            "peer_heartbeat_age": heard,
            "peer_expired": None if bstar is None else bstar.peer_expired(now),
            "snapshot_transfers": len(self._transfers),
            "snapshot_queued": len(self._queued),
            "subtrees_tracked": len(core.subtrees),
            "uptime": 0.0 if self.started_at is None else now - self.started_at,
            "data_dir": None if self.data is None else str(self.data.path),
            "fsync": None if self.data is None else self.data.fsync,
            "rejected": dict(self.rejections),
            "faults": {} if bstar is None else dict(bstar.faults),
            "counters": counters,
        }

    # -- after every input: carry out what the core asks ---------------------

    def _after(self, now: float) -> None:
        core = self.core
        if core.conflict is not None:
            where = self.data.path if self.data is not None else "memory"
            raise DataDirError(f"{where}: {core.conflict}")
        self._persist()
        if core.role is not self._role:
            self._role_changed(core.role)
        if core.notices:
            notices, core.notices = core.notices, []
            for level, message in notices:
                log.log(level, "%s", message)
        replica, follower = core.replica, self._follower
        if replica is not None and replica.actions and follower is not None:
            actions, replica.actions = replica.actions, []
            connection = follower.current
            follower.apply(actions)  # a passive's replica only connects, requests
            if connection is not None and follower.current is not connection:
                self._log.log(
                    logging.WARNING,
                    "resync",
                    "no snapshot or stream from the active in time; "
                    "connecting again (synced %d times so far)",
                    replica.stats["syncs"],
                )
            self._timer_wakeup.set()
        if core.relays and self._relay_sock is not None:
            relays, core.relays = core.relays, []
            self._relay_sock.refresh()
            for frames in relays:
                self._relay_sock.try_send(frames)
        if core.busy:
            self._work_wakeup.set()
        elif self._queued:
            self._start_queued(now)
        synced = core.synced
        if synced and not self.synced.value and core.role is Role.PASSIVE:
            log.info(
                "synced from the active: %d keys, sequence %d, lineage %s",
                len(core.store),
                core.sequence,
                core.lineage,
            )
        self.synced.value = synced

    def _role_changed(self, role: Role) -> None:
        if role is Role.ACTIVE and self._role is Role.PASSIVE:
            self.core.stats["takeovers"] += 1
        self._role = role
        if role is Role.PASSIVE:
            self.publisher.close(discard=True)
            self.snapshots.clear()
        bstar = self.core.bstar
        self.state.value = State.ACTIVE if bstar is None else bstar.state
        if self._state_sock is not None and bstar is not None:
            self._state_sock.refresh()
            self._state_sock.try_send([encode_state(bstar.state)])
        self._timer_wakeup.set()
        if self._role_scope is not None:
            self._role_scope.cancel()

    def _on_bstar(self, outcome: Outcome | None) -> None:
        if outcome is None:
            return
        if outcome.fault:
            self._log.log(
                logging.ERROR,
                outcome.fault,
                "Binary Star fault: %s (%s -> %s); converging",
                outcome.fault,
                outcome.previous.name,
                outcome.state.name,
            )
        if outcome.changed:
            log.info("Binary Star: %s -> %s", outcome.previous.name, outcome.state.name)

    # -- the role supervisor ----------------------------------------------

    async def _supervise(self) -> NoReturn:
        work = {Role.ACTIVE: self._active, Role.PASSIVE: self._passive}
        while True:
            role = self.core.role  # re-read after every exit: flaps end right
            with trio.CancelScope() as scope:
                self._role_scope = scope
                await work.get(role, trio.sleep_forever)()
            self._role_scope = None

    def _trace(self, role: str, step: str) -> None:
        if self.trace is not None:
            self.trace(role, step)

    # -- tasks for the server's whole life ----------------------------------

    async def _collect(self, sock: Socket) -> None:
        """Take client writes until a stop; then take those queued already
        (at most ``STOP_DRAIN``) and close the collector."""
        secured = self.zap is not None
        with self._collecting:
            while True:
                users: list[str] | None = [] if secured else None
                self._take(await sock.receive_batch(BATCH, users), users)
        taken = 0
        while taken < STOP_DRAIN:
            users = [] if secured else None
            batch = sock.receive_nowait(min(BATCH, STOP_DRAIN - taken), users)
            if not batch:
                break
            self._take(batch, users)
            taken += len(batch)
            await trio.lowlevel.checkpoint()  # heartbeats go on; the bound holds
        sock.close()
        log.info("the collector is closed (%d queued writes taken at the stop)", taken)
        self._collected.set()

    def _take(self, batch: list[list[bytes]], users: list[str] | None) -> None:
        """Apply (active) or hold (passive) a batch of client writes; with
        CURVE, ``users`` are their senders (each must be allowed to write)."""
        core = self.core
        now = trio.current_time()
        updates = []
        for index, frames in enumerate(batch):
            if users is not None and not self._may_write(users[index], frames):
                continue
            try:
                update = core.collect(
                    frames, now, None if users is None else users[index]
                )
            except RemoteProtocolError as exc:
                self._reject("collector", exc)
                continue
            if update is not None:
                updates.append(update)
        self.publisher.publish_all(updates)
        if core.serving:  # (a client write changes no role: no _after)
            deadline = core.store.next_deadline()
            if deadline is not None and deadline < self._expiry_at:
                self._expiry_wakeup.set()

    async def _timers(self) -> NoReturn:
        core = self.core
        while True:
            now = trio.current_time()
            core.poll(now)
            self._after(now)
            self._timer_wakeup = trio.Event()
            with trio.move_on_at(core.next_deadline()):
                await self._timer_wakeup.wait()

    async def _work(self) -> NoReturn:
        """Long work in bounded steps, a schedule point after each."""
        core = self.core
        while True:
            await self._work_wakeup.wait()
            self._work_wakeup = trio.Event()
            while core.busy:
                now = trio.current_time()
                self.publisher.publish_all(core.step(now))
                self._after(now)
                await trio.lowlevel.checkpoint()
            self._after(trio.current_time())
            self._expiry_wakeup.set()  # a takeover ended: deadlines are due

    async def _serve_snapshots(self, router: Socket) -> NoReturn:
        transfers, secured = self._transfers, self.zap is not None
        while True:
            self._send_denials(router)
            requests: list[list[bytes]] = []
            users: list[str] | None = [] if secured else None
            if transfers:
                requests = router.receive_nowait(64, users)
            else:
                self.snapshots.release_index()
                with trio.CancelScope() as self._snapshot_wait:
                    requests = await router.receive_batch(64, users)
                self._snapshot_wait = None
            now = trio.current_time()
            for index, frames in enumerate(requests):
                user = None if users is None else users[index]
                if is_status_request(frames[1:]):
                    self._on_status_request(router, frames, now, user)
                else:
                    self._on_request(frames, now, user)
            if requests:  # (votes may have changed the role)
                self._after(now)
            if not transfers:
                continue
            self._persist()  # a transfer shows the map: what it shows is kept
            moved = self.snapshots.pump(router, now)
            if self._queued:
                self._start_queued(now)
            if moved:
                await trio.lowlevel.checkpoint()
            elif transfers:  # every client's queue is full: poll, wake for requests
                with trio.move_on_after(ROUTER_RETRY_INTERVAL):
                    await router.wait(zmq.POLLIN)

    def _on_status_request(
        self, router: Socket, frames: list[bytes], now: float, user: str | None
    ) -> None:
        """Answer at once, in every role and state: never a vote, never
        queued behind snapshots.  A secured server answers a key it allows
        now (not one removed or replaced since it connected)."""
        identity, request = frames[0], frames[1:]
        try:
            check_status_request(request)
        except RemoteProtocolError as exc:
            self._reject("snapshot", exc)
            return
        if user is not None and self.zap is not None:
            grant = self.zap.grant(user)
            if not (grant.read or grant.write):
                self.core.stats["reads_denied"] += 1
                return
        self.core.stats["status_requests"] += 1
        try:
            sent = router.try_send(
                [identity, *encode_status_reply(self.status_report(now))]
            )
        except UnroutableError:
            sent = False
        if not sent:
            log.debug("a status client went away or reads nothing: not answered")

    def _on_request(self, frames: list[bytes], now: float, user: str | None) -> None:
        identity, request = frames[0], frames[1:]
        try:
            subtree = decode_request(request)
        except RemoteProtocolError as exc:
            self._reject("snapshot", exc)
            return
        from_peer = identity.startswith(PEER_IDENTITY)
        if user is not None:  # secured: only the pair's key is the peer
            from_peer = from_peer and user == PAIR
            if not self._may_read(user, identity, subtree):
                return
        answer, outcome = self.core.on_request(
            now, from_peer=from_peer, subtree=subtree
        )
        self._on_bstar(outcome)
        if not answer:
            log.debug("request not answered in role %s", self.core.role.value)
            return
        if self.snapshots.queue(identity, subtree):  # answered in turn
            self._start_queued(now)

    def _start_queued(self, now: float) -> None:
        """Start waiting transfers (at most ``MAX_TRANSFERS`` at a time, each
        holds a key list until it ends) once a takeover is done."""
        core = self.core
        if not (self._queued and core.serving):
            return
        self.publisher.admit()  # a subtree tracked now has a count to send
        started = self.snapshots.start_queued(now, self._begin)
        if started and self._snapshot_wait is not None:
            self._snapshot_wait.cancel()

    def _begin(self, identity: bytes, subtree: bytes, now: float) -> Transfer:
        core = self.core
        end = core.kthxbai(subtree)
        if subtree == HISTORY:
            return Transfer(identity, core.store, [], end, now, core.history(now))
        keys, scan = self.snapshots.index(core.store).source(subtree)
        return Transfer(identity, core.store, keys, end, now, None, scan)

    async def _send_state(self, heartbeat: float) -> NoReturn:
        bstar, sock = self.core.bstar, self._state_sock
        assert bstar is not None and sock is not None
        deadline = trio.current_time()
        while True:
            sock.refresh()
            sock.try_send([encode_state(bstar.state)])
            deadline = max(deadline + heartbeat, trio.current_time())
            await trio.sleep_until(deadline)

    async def _hear_peer(self, sock: Socket) -> NoReturn:
        core = self.core
        while True:
            batch = await sock.receive_batch(64)
            now = trio.current_time()
            for frames in batch:
                try:
                    self._on_bstar(core.on_peer_state(frames, now))
                except RemoteProtocolError as exc:
                    self._reject("peer heartbeat", exc)
            self._after(now)

    async def _hear_claims(self, sock: Socket) -> NoReturn:
        while True:
            batch = await sock.receive_batch(64)
            now = trio.current_time()
            for frames in batch:
                try:
                    self.core.on_peer_hugz(frames, now)
                except RemoteProtocolError as exc:
                    self._reject("peer's HUGZ", exc)

    async def _sync_disk(self, data: DataDir) -> NoReturn:
        while True:
            await trio.sleep(SYNC_INTERVAL)
            await trio.to_thread.run_sync(data.sync)

    async def _tend_publisher(self, interval: float) -> NoReturn:
        """Read what subscribers send the publisher at least once an
        interval, in every role.  The active does so before each HUGZ and
        each batch it publishes; a passive publishes nothing, and libzmq
        queues what subscribers send, and frees the connections that went
        away, only when the socket is used: unread, each connection made to
        a passive would stay in its memory with all it sent."""
        while True:
            await trio.sleep(interval)
            self.publisher.admit()

    async def _report(self, interval: float) -> NoReturn:
        while True:
            await trio.sleep(interval)
            log.info("status %s", self.status())

    # -- permissions (a secured server) ------------------------------------

    def _may_write(self, user: str, frames: Sequence[bytes]) -> bool:
        """True if ``user`` may write the key of the KVSET ``frames``;
        otherwise the write is counted, logged and refused to its client."""
        assert self.zap is not None
        grant = self.zap.grant(user)
        key = frames[0] if frames else b""
        if user != PAIR and is_handover(frames):
            reason = f"client {client_name(user)!r} sent a hand-over: only the pair's servers may"
        elif grant.may_write(key):
            return True
        else:
            allowed = ", ".join(repr(p.decode(errors="replace")) for p in grant.write)
            reason = (
                f"client {client_name(user)!r} may not write {key.decode(errors='replace')!r} "
                + (
                    f"(it may write keys under {allowed})"
                    if allowed
                    else "(it may write no key)"
                )
            )
        self.core.stats["writes_denied"] += 1
        self._log.log(logging.WARNING, "write denied", "refused a write: %s", reason)
        uuid = frames[2] if len(frames) == 5 else b""
        if uuid:  # (one without a UUID cannot be told: an empty one means a snapshot)
            for identity in self._routes.get(user, ()):
                self._deny(identity, uuid, key, reason)
        return False

    def _may_read(self, user: str, identity: bytes, subtree: bytes) -> bool:
        """True if ``user`` may have a snapshot of ``subtree``; otherwise it
        is counted, logged and refused.  Remembers where ``user`` asks from:
        a refused write is reported there."""
        assert self.zap is not None
        routes = self._routes.setdefault(user, deque(maxlen=ROUTES_PER_USER))
        if identity not in routes:
            routes.append(identity)
        grant = self.zap.grant(user)
        if grant.may_read(b"" if subtree == HISTORY else subtree):
            return True
        self.core.stats["reads_denied"] += 1
        allowed = ", ".join(repr(p.decode(errors="replace")) for p in grant.read)
        shown = (
            "the whole map" if not subtree else repr(subtree.decode(errors="replace"))
        )
        reason = f"client {client_name(user)!r} may not read {shown} " + (
            f"(it may read keys under {allowed})" if allowed else "(it may read no key)"
        )
        self._log.log(logging.WARNING, "read denied", "refused a snapshot: %s", reason)
        self._deny(identity, b"", subtree, reason)
        return False

    def _may_subscribe(self, user: str, prefix: bytes) -> bool:
        """True if ``user`` may have the updates under ``prefix``."""
        assert self.zap is not None
        grant = self.zap.grant(user)
        if prefix == HUGZ or grant.may_read(prefix):
            return True
        self.core.stats["reads_denied"] += 1
        self._log.log(
            logging.WARNING,
            "subscription denied",
            "refused a subscription: client %r may not read %r",
            client_name(user),
            prefix.decode(errors="replace"),
        )
        return False

    def _deny(self, identity: bytes, uuid: bytes, key: bytes, reason: str) -> None:
        self._denials.append([identity, *encode_denial(uuid, key, reason)])
        if self._snapshot_wait is not None:
            self._snapshot_wait.cancel()  # its task owns the socket: it sends

    def _send_denials(self, router: Socket) -> None:
        """Best effort: a client that went away, or reads nothing, gets none."""
        denials = self._denials
        while denials:
            with contextlib.suppress(UnroutableError):
                router.try_send(denials.popleft())

    def _reject(self, where: str, exc: RemoteProtocolError) -> None:
        self.core.stats["rejected"] += 1
        self.rejections[where] += 1
        self.rejected_rules[where, exc.rule] += 1
        self._log.log(
            logging.WARNING, where, "rejected on the %s socket: %s", where, exc
        )

    async def _serve_metrics(
        self, s: ServerSettings, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        from trioclone.server.metrics import MetricsEndpoint

        assert s.metrics_port is not None
        endpoint = MetricsEndpoint(self)
        self.metrics = endpoint
        await endpoint.serve(s.metrics_bind, s.metrics_port, task_status=task_status)

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
        core, publisher = self.core, self.publisher
        deadline = trio.current_time()
        while True:
            publisher.admit()  # first: the subtree heartbeats are for subscribers
            publisher.publish_all([core.hugz(), *core.subtrees.heartbeats()])
            deadline = max(deadline + interval, trio.current_time())
            await trio.sleep_until(deadline)

    async def _expire(self) -> NoReturn:
        core = self.core
        while True:
            deletes = core.expire(trio.current_time())
            self.publisher.publish_all(deletes)
            if deletes:
                await trio.lowlevel.checkpoint()  # more may be due: a step at a time
                continue
            deadline = core.store.next_deadline() if core.serving else None
            self._expiry_at = math.inf if deadline is None else deadline
            self._expiry_wakeup = trio.Event()
            with trio.move_on_at(self._expiry_at):
                await self._expiry_wakeup.wait()

    # -- PASSIVE -----------------------------------------------------------

    async def _passive(self) -> None:
        pair = self.pair
        assert pair is not None
        self._trace("passive", "enter")
        follower = Follower(
            self._sockets,
            [pair.peer],
            [b""],
            sub_options=[(zmq.RCVHWM, self.settings.publisher_hwm)],
            identity=lambda: PEER_IDENTITY + os.urandom(8).hex().encode(),
        )
        self._follower = follower
        self._after(trio.current_time())  # the replica's first requests
        try:
            await follower.run(self._mirror)
        finally:
            self._follower = None
            self._trace("passive", "exit")

    async def _mirror(self, is_reply: bool, batch: list[list[bytes]]) -> None:
        now = trio.current_time()
        feed(self.core, is_reply, batch, now, self._reject_from_active)
        self._after(now)

    def _reject_from_active(self, where: str, exc: RemoteProtocolError) -> None:
        self._reject(f"active's {where}", exc)
