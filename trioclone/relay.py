"""``trioclone relay``: a read replica that clients use exactly like a server.

It listens on a server's three ports (base P) and sits between clients and
the pair (or another relay: relays chain):

* P+1, the stream: libzmq's proxy forwards the upstream publisher's every
  message (an XSUB connected to the server in use) to an XPUB here, in C,
  with the pair's own sequence numbers, lineage and HUGZ.  Subscriptions go
  the other way, so the upstream's subtree heartbeats follow what the
  relay's clients subscribe to (the proxy's capture socket hands them to
  the relay too, which subscribes a new XSUB to them after a failover).
* P+2, writes: a second proxy forwards every client KVSET (an XSUB here) to
  every upstream collector (an XPUB connected to each), as a client sends
  them; a write's confirmation is its update on the stream, as always.
* P, snapshots: answered from the mirror (``core/relay.py``), a replica of
  the whole map that follows the pair as a client does, failover included:
  a DEALER to the server in use, and as its stream a SUB of the relay's own
  publisher (over inproc): what the relay's clients are sent, and nothing
  they send.

A snapshot is answered only while the mirror is in sync, and after it has
taken in every update the publisher sent before (``_drain``: the one
reader of the mirror's stream), so it never says a sequence older than
what the relay's clients were already sent.
Out of sync (the upstream lost, a gap, a reset), a request gets no answer,
as from a passive server, and the client tries its next server.  When the
mirror moves to another upstream, the stream proxy stops and starts again
connected to it: nothing is forwarded in between, so the HUGZ stop and a
relay cut off from the pair falls silent, which moves its clients on.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import trio
import zmq
from trio_util import AsyncValue

from trioclone import __version__
from trioclone._follow import (
    BATCH,
    BatchHandler,
    Connection,
    Follower,
    Timers,
    feed,
)
from trioclone._log import Limited
from trioclone._proxy import run_proxy
from trioclone._zmq import ROUTER_RETRY_INTERVAL, Socket, Sockets, UnroutableError
from trioclone.core.chp import decode_request
from trioclone.core.relay import RelayMirror
from trioclone.core.replica import Timings
from trioclone.core.snapshot import Transfer
from trioclone.core.status import (
    check_status_request,
    encode_status_reply,
    is_status_request,
)
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError
from trioclone.server.snapshots import Snapshots

log = logging.getLogger("trioclone.relay")

HWM = 100_000  # stream and writes, each way: as a server's publisher and collector
SNAPSHOT_HWM = 10_000
MAX_SUBSCRIPTION = 65_536  # as a server's publisher (see server/clone.py)
#: Capture messages taken in before a snapshot starts; more still queued
#: (a flood) and the snapshot waits for the next turn.
DRAIN_LIMIT = 65_536
STALL = 30.0  # a snapshot client that takes nothing this long is dropped
_names = itertools.count()


class StreamFollower(Follower):
    """A ``Follower`` whose stream comes through the stream proxy: each
    connection opens an XSUB to the server in use and runs the proxy from
    it to the relay's publisher for as long as the connection lasts.  The
    mirror reads the publisher's output like any subscriber (``mirror``,
    over inproc), so it sees exactly what the relay's clients are sent and
    nothing that they send."""

    def __init__(
        self,
        sockets: Sockets,
        endpoints: Sequence[Endpoints],
        downstream: Socket,
        mirror: Socket,
        capture: Socket,
        subscriptions: Socket,
        take: Callable[[], bool],
    ) -> None:
        super().__init__(sockets, endpoints, ())
        self._downstream, self.mirror = downstream, mirror
        self._capture, self._handed_up = capture, subscriptions
        self._take = take
        self._upstream: Socket | None = None
        #: What the publisher has handed up (its subscribers' prefixes, one
        #: subscription per prefix): a new XSUB must subscribe to them again.
        self.topics: set[bytes] = set()
        #: The proxy runs for the connection in use: ``mirror`` is its stream.
        self.forwarding = False

    def _track(self) -> None:
        """Take in the (un)subscriptions the proxy handed up meanwhile (the
        capture's copies of them: its SUB takes nothing else)."""
        for _ in range(1_000):
            batch = self._handed_up.receive_nowait(BATCH)
            if not batch:
                return
            for frames in batch:
                if len(frames) == 1 and frames[0][:1] == b"\x01":
                    self.topics.add(frames[0][1:])
                elif len(frames) == 1 and frames[0][:1] == b"\x00":
                    self.topics.discard(frames[0][1:])

    async def _serve(self, connection: Connection, handle: BatchHandler) -> None:
        server = self._endpoints[connection.server]
        # A fresh XSUB for each upstream: libzmq aborts the process if a
        # socket's pipe is disconnected with a message part still queued
        # (fq.cpp's ``!_more``), so the last one is closed, not reused.
        self._track()
        if self._upstream is not None:
            self._upstream.close()
        upstream = self._upstream = self._sockets.open(
            zmq.XSUB, connect=[server.publisher], options=[(zmq.RCVHWM, HWM)]
        )
        upstream.raw.send(b"\x01")  # the whole stream, for the mirror
        for topic in self.topics:  # and every prefix a client follows
            upstream.raw.send(b"\x01" + topic)
        while self.mirror.receive_nowait(BATCH):
            pass  # the last connection's: never handed on
        dealer = self._sockets.open(zmq.DEALER, connect=[server.snapshot])
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    run_proxy, self._sockets, upstream, self._downstream, self._capture
                )
                self.forwarding = True
                nursery.start_soon(self._replies, dealer, connection, handle)
                nursery.start_soon(self._stream)
        finally:
            self.forwarding = False
            dealer.close()

    async def _stream(self) -> NoReturn:
        """Wake when the stream has messages, and let ``take`` have them all
        at once: no batch is ever held across a schedule point, where a
        snapshot's drain could take later ones first."""
        while True:
            await self.mirror.wait(zmq.POLLIN)
            self._take()
            self._track()
            await trio.lowlevel.checkpoint()


class CloneRelay:
    """A relay listening at ``bind``, following ``upstreams`` (a pair's two
    servers, one server, or relays)."""

    def __init__(
        self,
        upstreams: Sequence[Endpoints],
        bind: Endpoints,
        *,
        timings: Timings | None = None,
        stall: float = STALL,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.upstreams = list(upstreams)
        self.bind = bind
        self.mirror = RelayMirror(len(self.upstreams), timings or Timings())
        self.stats: Counter[str] = Counter()
        self._log = Limited(log)
        self.snapshots = Snapshots(stall, self.stats, self._log)
        #: The mirror may answer snapshots (for tests and the logs).
        self.serving = AsyncValue(False)
        self.rejections: Counter[str] = Counter()
        self._context = context
        self._follower: StreamFollower | None = None
        self._timers = Timers(self.mirror, self._dispatch)
        self._snapshot_wait: trio.CancelScope | None = None
        self._stop = trio.Event()
        self._started: float | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        bind, upstreams = self.bind, self.upstreams
        serial = next(_names)
        mirrored = f"inproc://trioclone-relay-{serial}-stream"
        captured = f"inproc://trioclone-relay-{serial}-capture"
        with Sockets(self._context) as sockets:
            router = sockets.open(
                zmq.ROUTER,
                bind=[bind.snapshot],
                options=[(zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, SNAPSHOT_HWM)],
            )
            downstream = sockets.open(
                zmq.XPUB,
                bind=[bind.publisher],
                options=[(zmq.SNDHWM, HWM), (zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)],
            )
            writes_in = sockets.open(
                zmq.XSUB, bind=[bind.collector], options=[(zmq.RCVHWM, HWM)]
            )
            writes_out = sockets.open(
                zmq.XPUB,
                connect=[u.collector for u in upstreams],
                options=[(zmq.SNDHWM, HWM)],
            )
            downstream.raw.bind(mirrored)
            mirror = sockets.open(
                zmq.SUB,
                connect=[mirrored],
                subscribe=[b""],
                options=[(zmq.RCVHWM, HWM)],
                secure=False,
            )
            # The proxy copies what it forwards, both ways, to ``capture``;
            # ``subscriptions`` takes in only the (un)subscriptions.
            capture = sockets.open(zmq.PUB, bind=[captured], secure=False)
            subscriptions = sockets.open(
                zmq.SUB,
                connect=[captured],
                subscribe=[b"\x00", b"\x01"],
                secure=False,
            )
            # Every client's writes, whether or not an upstream collector is
            # connected yet (its own subscription comes later).
            writes_in.raw.send(b"\x01")
            self._follower = StreamFollower(
                sockets,
                upstreams,
                downstream,
                mirror,
                capture,
                subscriptions,
                self._drain,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(run_proxy, sockets, writes_in, writes_out)
                nursery.start_soon(self._follower.run, self._handle)
                nursery.start_soon(self._timers.run)
                nursery.start_soon(self._serve_snapshots, router)
                log.info(
                    "relay listening: %s, following %s",
                    bind,
                    ", ".join(map(str, upstreams)),
                )
                self._started = trio.current_time()
                task_status.started(self)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        log.info("relay stopped")

    def status(self) -> dict[str, object]:
        """The reply to ``STATUS?``, in a server's terms where they apply."""
        now = trio.current_time()
        return {
            "name": "relay",
            "version": __version__,
            "pair": False,
            **self.mirror.status([str(u) for u in self.upstreams]),
            "snapshot_transfers": len(self.snapshots.transfers),
            "snapshot_queued": len(self.snapshots.queued),
            "uptime": 0.0 if self._started is None else now - self._started,
            "rejected": dict(self.rejections),
            "counters": {
                **self.stats,
                **{f"mirror_{k}": v for k, v in self.mirror.stats.items()},
            },
        }

    # -- the mirror ------------------------------------------------------------

    async def _handle(self, is_reply: bool, batch: list[list[bytes]]) -> None:
        feed(self.mirror, is_reply, batch, trio.current_time(), self._reject)
        self._dispatch()

    def _reject(self, where: str, exc: RemoteProtocolError) -> None:
        self.rejections[where] += 1
        self._log.log(logging.WARNING, where, "rejected %s: %s", where, exc)

    def _dispatch(self) -> None:
        mirror, follower = self.mirror, self._follower
        assert follower is not None
        actions, mirror.actions = mirror.actions, []
        follower.apply(actions)
        serving = mirror.serving
        if serving != self.serving.value:
            if serving:
                log.info(
                    "in sync with %s: %d keys, sequence %d, lineage %s",
                    self.upstreams[mirror.server],
                    len(mirror.live),
                    mirror.sequence,
                    mirror.lineage,
                )
            else:
                log.warning("out of sync: snapshot requests wait unanswered")
            self.serving.value = serving
        if serving and self.snapshots.queued and self._snapshot_wait is not None:
            self._snapshot_wait.cancel()
        self._timers.wake()

    def _drain(self) -> bool:
        """Take in what the relay has published so far (the one reader of
        the mirror's stream, from its stream task and before a snapshot);
        False if more is still queued (a flood) or there is no stream now."""
        follower = self._follower
        if follower is None or not follower.forwarding:
            return False
        now = trio.current_time()
        taken, drained = 0, False
        while taken < DRAIN_LIMIT:
            batch = follower.mirror.receive_nowait(BATCH)
            if not batch:
                drained = True
                break
            taken += len(batch)
            feed(self.mirror, False, batch, now, self._reject)
        if taken:
            self._dispatch()
        return drained

    # -- snapshots ---------------------------------------------------------------

    async def _serve_snapshots(self, router: Socket) -> NoReturn:
        snapshots = self.snapshots
        while True:
            if snapshots.transfers or snapshots.queued:
                requests = router.receive_nowait(64)
            else:
                snapshots.release_index()
                requests = []
                with trio.CancelScope() as self._snapshot_wait:
                    requests = await router.receive_batch(64)
                self._snapshot_wait = None
            now = trio.current_time()
            for frames in requests:
                if is_status_request(frames[1:]):
                    self._on_status_request(router, frames)
                else:
                    self._on_request(frames)
            self._start_queued(now)
            if not snapshots.transfers:
                if snapshots.queued:  # the mirror takes in a flood first
                    with trio.move_on_after(ROUTER_RETRY_INTERVAL):
                        await router.wait(zmq.POLLIN)
                continue
            if snapshots.pump(router, now):
                await trio.lowlevel.checkpoint()
            else:  # every client's queue is full: poll, wake for requests
                with trio.move_on_after(ROUTER_RETRY_INTERVAL):
                    await router.wait(zmq.POLLIN)

    def _on_request(self, frames: list[bytes]) -> None:
        identity, request = frames[0], frames[1:]
        try:
            subtree = decode_request(request)
        except RemoteProtocolError as exc:
            self._reject("snapshot", exc)
            return
        if not self.mirror.serving:
            self.stats["snapshots_unready"] += 1
            log.debug("out of sync: a snapshot request is not answered")
            return
        self.snapshots.queue(identity, subtree)

    def _start_queued(self, now: float) -> None:
        """Start waiting transfers, once the mirror holds what was forwarded."""
        snapshots = self.snapshots
        if not snapshots.queued:
            return
        drained = self._drain()
        self._dispatch()
        if not self.mirror.serving:
            self.stats["snapshots_unready"] += len(snapshots.queued)
            snapshots.queued.clear()  # asked in sync; unanswered now, as above
            return
        if drained:
            snapshots.start_queued(now, self._begin)

    def _begin(self, identity: bytes, subtree: bytes, now: float) -> Transfer:
        store = self.mirror.live
        keys, scan = self.snapshots.index(store).source(subtree)
        end = self.mirror.kthxbai(subtree)
        return Transfer(identity, store, keys, end, now, None, scan)

    def _on_status_request(self, router: Socket, frames: list[bytes]) -> None:
        identity, request = frames[0], frames[1:]
        try:
            check_status_request(request)
        except RemoteProtocolError as exc:
            self._reject("snapshot", exc)
            return
        self.stats["status_requests"] += 1
        try:
            router.try_send([identity, *encode_status_reply(self.status())])
        except UnroutableError:
            log.debug("a status client went away: not answered")
