"""The Prometheus endpoint: ``GET /metrics`` over HTTP, a Trio task.

A task in the server's nursery listens (``trio.serve_tcp``); each scrape
reads the server's figures at that moment (a custom collector over
``CloneServer.status_report`` and its duration histograms), so nothing is
counted twice and nothing on the update path knows about Prometheus.
prometheus-client (the ``metrics`` extra) only formats the text.

A scrape is bounded: the request head is at most ``MAX_HEAD`` bytes and
must arrive within ``REQUEST_TIMEOUT`` seconds, at most ``MAX_CONNECTIONS``
are served at once, and anything but ``GET`` or ``HEAD`` of ``/metrics``
gets 404 or 405.  A bad scrape is logged (rate-limited) and closed; it
never disturbs the server.  After answering, what the client still sends is
read and dropped for up to ``LINGER`` seconds, so closing does not reset
the connection before the answer is read.  docs/monitoring.md lists every metric.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from trioclone._log import Limited
from trioclone.core.bstar import State
from trioclone.core.server import Role
from trioclone.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from trioclone.server.clone import CloneServer
    from trioclone.server.durations import Durations

log = logging.getLogger("trioclone.metrics")

INSTALL_HINT = "pip install 'trioclone[metrics]'"
MAX_HEAD = 8192
REQUEST_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
#: After answering: read (and drop) at most this much for at most this long.
LINGER = 1.0
MAX_DRAIN = 1 << 20
PATH = "/metrics"
PREFIX = "trioclone_"


def require_prometheus() -> None:
    """prometheus-client can be imported; ``ConfigError`` saying how to
    install it if not."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--metrics-port needs prometheus-client, which is not installed: "
            f"{INSTALL_HINT}"
        ) from None


def metric_name(text: str) -> str:
    """``text`` as a metric name: letters, digits and underscores."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", text)
    return name if not name[:1].isdigit() else f"_{name}"


class ServerCollector:
    """Reads one server's figures at scrape time."""

    def __init__(self, server: CloneServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        server = self.server
        report = server.status_report(trio.current_time())
        yield InfoMetricFamily(
            f"{PREFIX}server",
            "The server's name (primary, backup or standalone) and version",
            value={"name": str(report["name"]), "version": str(report["version"])},
        )
        state = GaugeMetricFamily(
            f"{PREFIX}state",
            "Binary Star state: 1 for the state the server is in, else 0",
            labels=["state"],
        )
        for each in State:
            state.add_metric([each.name], float(report["state"] == each.name))
        yield state
        role = GaugeMetricFamily(
            f"{PREFIX}role",
            "Role: 1 for the role the server has (waiting, active, passive), else 0",
            labels=["role"],
        )
        for each_role in Role:
            role.add_metric([each_role.value], float(report["role"] == each_role.value))
        yield role
        for field, text in GAUGES.items():
            value = report[field]
            if value is None:
                continue  # (no peer heard yet: no age to show)
            assert isinstance(value, int | float)
            name = f"{PREFIX}{field}{'_seconds' if field in SECONDS else ''}"
            yield GaugeMetricFamily(name, text, value=float(value))
        counters = report["counters"]
        assert isinstance(counters, dict)
        for name, count in sorted(counters.items()):
            yield CounterMetricFamily(
                f"{PREFIX}{metric_name(name)}",
                COUNTERS.get(name, f"The server's {name} counter"),
                value=count,
            )
        rejected = CounterMetricFamily(
            f"{PREFIX}rejected_messages",
            "Messages rejected as malformed, by socket and the rule they broke",
            labels=["socket", "rule"],
        )
        for (where, rule), count in sorted(server.rejected_rules.items()):
            rejected.add_metric([where, rule], count)
        yield rejected
        faults = CounterMetricFamily(
            f"{PREFIX}bstar_faults",
            "Binary Star faults, each counted once per episode",
            labels=["fault"],
        )
        bstar = server.core.bstar
        for fault, count in sorted(({} if bstar is None else bstar.faults).items()):
            faults.add_metric([fault], count)
        yield faults
        yield _histogram(
            "snapshot_duration_seconds",
            "Snapshot replies, from their first message to their last",
            server.snapshot_durations,
        )
        yield _histogram(
            "commit_duration_seconds",
            "Commits of the map on disk (with --data-dir)",
            server.commit_durations,
        )


def _histogram(name: str, text: str, durations: Durations) -> Metric:
    from prometheus_client.core import HistogramMetricFamily

    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), float(count))
        for bound, count in durations.cumulative()
    ]
    return HistogramMetricFamily(
        f"{PREFIX}{name}", text, buckets=buckets, sum_value=durations.sum
    )


#: Status fields exported as gauges, with their help.
GAUGES = {
    "sequence": "The sequence of the newest update in the server's map",
    "keys": "Keys in the server's map",
    "pending": "Client writes a passive holds until the active publishes them",
    "window": "Replaced writes remembered so that resends are dropped",
    "synced": "1 if active, or passive with a complete copy of the active's map",
    "serving": "1 if active and answering (not in the middle of a takeover)",
    "peer_heartbeat_age": "Seconds since the peer's last Binary Star heartbeat",
    "snapshot_transfers": "Snapshot replies in progress",
    "snapshot_queued": "Snapshot requests waiting for a reply to start",
    "subtrees_tracked": "Subtrees whose subscribers get subtree heartbeats",
    "uptime": "Seconds since the server's sockets were bound",
}

#: Gauges in seconds (their names end in _seconds).
SECONDS = frozenset(("peer_heartbeat_age", "uptime"))

#: Help for the counters the server keeps; others get a generic one.
COUNTERS = {
    "updates": "Client writes this server applied as active (TTL expiries: expired)",
    "published": "Messages published (updates, HUGZ, subtree heartbeats)",
    "snapshots_served": "Snapshot replies sent to the end",
    "snapshots_refused": "Snapshot requests not answered: too many waiting",
    "snapshots_stalled": "Snapshot clients dropped for taking nothing",
    "status_requests": "Status requests answered",
    "takeovers": "Times this server went from passive to active (failovers)",
    "expired": "Keys deleted because their TTL ran out",
    "rejected": "Messages rejected as malformed, on every socket",
    "duplicates": "Client writes dropped as repeats of one already applied",
    "pending_dropped": "Pending writes dropped: the list was full or too old",
    "auth_denied": "Connections the ZAP handler denied",
    "writes_denied": "Client writes rejected for want of permission",
}


class MetricsEndpoint:
    """Serves ``GET /metrics`` for one server."""

    def __init__(self, server: CloneServer) -> None:
        require_prometheus()
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        ProcessCollector(registry=self.registry)
        self._limit = trio.CapacityLimiter(MAX_CONNECTIONS)
        self._log = Limited(log)
        #: The (host, port) it listens on, once bound.
        self.address: tuple[str, int] | None = None
        #: Scrapes answered, and requests refused, since it started.
        self.scrapes = 0
        self.refused = 0

    async def serve(
        self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:  # named: the caller reports it as it is
            raise OSError(
                exc.errno, f"--metrics-port {port} on {host}: {exc.strerror or exc}"
            ) from exc
        sockname = listeners[0].socket.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        log.info("metrics at http://%s:%d%s", host, self.address[1], PATH)
        await trio.serve_listeners(self._handle, listeners, task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            if self._limit.borrowed_tokens >= MAX_CONNECTIONS:
                self._refuse("too many scrapes at once")
                return
            async with self._limit:
                with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                    await self._answer(stream)
                if scope.cancelled_caught:
                    self._refuse(f"no whole request within {REQUEST_TIMEOUT:g} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._refuse(f"connection failed: {exc}")
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head and b"\n\n" not in head:
            if len(head) > MAX_HEAD:
                await self._send(stream, 431, "request head too large\n")
                return
            chunk = await stream.receive_some(MAX_HEAD)
            if not chunk:
                self._refuse("closed before a whole request")
                return
            head += chunk
        line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._send(stream, 400, "not an HTTP request\n")
            return
        method, target, _ = parts
        if target.split("?", 1)[0] != PATH:
            await self._send(stream, 404, f"only {PATH} is here\n")
            return
        if method not in ("GET", "HEAD"):
            await self._send(stream, 405, "only GET and HEAD\n", allow=True)
            return
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        self.scrapes += 1
        await self._respond(stream, 200, CONTENT_TYPE_LATEST, body, method == "HEAD")

    async def _send(
        self, stream: trio.SocketStream, code: int, text: str, allow: bool = False
    ) -> None:
        self._refuse(f"answered {code} {REASONS[code]}: {text.strip()}")
        extra = "Allow: GET, HEAD\r\n" if allow else ""
        await self._respond(
            stream, code, "text/plain; charset=utf-8", text.encode(), False, extra
        )

    async def _respond(
        self,
        stream: trio.SocketStream,
        code: int,
        content_type: str,
        body: bytes,
        head_only: bool,
        extra: str = "",
    ) -> None:
        header = (
            f"HTTP/1.1 {code} {REASONS[code]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n"
        ).encode()
        await stream.send_all(header if head_only else header + body)
        # Read what the client still sends (an oversized head, say) for a
        # moment before closing: closing with unread input resets the
        # connection, and the client may lose the answer.
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            drained = 0
            while drained < MAX_DRAIN:
                chunk = await stream.receive_some(MAX_HEAD)
                if not chunk:
                    break
                drained += len(chunk)

    def _refuse(self, why: str) -> None:
        self.refused += 1
        self._log.log(logging.WARNING, "metrics", "metrics request refused: %s", why)


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}
