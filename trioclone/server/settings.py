"""Where a server binds, where its peer is, and its timings and limits."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TypeGuard

from trioclone.endpoints import BACKUP_PORT, PRIMARY_PORT, Endpoints, check_port
from trioclone.errors import CloneError, ConfigError

PRIMARY_STATE_PORT = 5003
#: How a durable map's commits reach the disk (see server/datadir.py).
FSYNC_MODES = ("always", "interval", "off")
BACKUP_STATE_PORT = 5004


@dataclass(frozen=True)
class Rule:
    """What a number in the settings must be: a test, and how it is said.

    The settings, the blocking client and the command line's option types
    (``trioclone.cli_client``) all check numbers with these.
    """

    words: str  # "a whole number >= 1": completes "NAME must be ..."
    holds: Callable[[object], bool]

    def check(
        self, name: str, value: object, error: type[CloneError] = ConfigError
    ) -> None:
        if not self.holds(value):
            raise error(f"{name} must be {self.words}, got {value!r}")


def _real(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


SECONDS = Rule(
    "a positive, finite number of seconds",
    lambda v: _real(v) and 0 < v < math.inf,
)
HEARTBEATS = Rule(
    "a finite number of heartbeats, at least 1",
    lambda v: _real(v) and 1 <= v < math.inf,
)
COUNT = Rule("a whole number >= 1", lambda v: _whole(v) and v >= 1)
#: A ZeroMQ high-water mark.
HWM = Rule(
    "a whole number >= 0 (0: no limit)",
    lambda v: _whole(v) and v >= 0,
)


@dataclass(frozen=True)
class PairSettings:
    """This server's side of a Binary Star pair."""

    primary: bool
    state_bind: str  # our PUB for the Binary Star heartbeat
    state_peer: str  # the peer's heartbeat PUB
    peer: Endpoints  # the peer's CHP sockets (the passive syncs from them)
    heartbeat: float = 1.0
    expiry_heartbeats: float = 2.0

    def __post_init__(self) -> None:
        SECONDS.check("heartbeat", self.heartbeat)
        HEARTBEATS.check("expiry_heartbeats (the peer expiry)", self.expiry_heartbeats)


@dataclass(frozen=True)
class ServerSettings:
    """Everything a ``CloneServer`` needs; defaults as the Guide's servers."""

    bind: Endpoints
    pair: PairSettings | None = None
    hugz_interval: float = 1.0
    sync_timeout: float = 5.0
    sync_retry: float = 1.0
    pending_size: int = 100_000
    pending_age: float = 30.0
    #: Replaced writes are remembered this long (at least the clients' write
    #: horizon), and at most this many (see core/applied.py).
    applied_horizon: float = 120.0
    applied_limit: int = 1_000_000
    backlog_limit: int = 1_000_000
    #: A snapshot client that takes no message for this long is dropped.
    snapshot_stall: float = 30.0
    publisher_hwm: int = 100_000
    collector_hwm: int = 100_000
    status_interval: float = 60.0
    name: str = field(default="clone")
    #: The folder that keeps the map on disk (server/datadir.py); None: in
    #: memory only.  ``fsync``: always, interval or off.  ``reset_data``:
    #: start empty, deleting what the folder kept.
    data_dir: str | None = None
    fsync: str = "always"
    reset_data: bool = False
    #: The Prometheus endpoint (server/metrics.py): its TCP port (0: any
    #: free one; None: no endpoint) and the address it listens on.
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"
    #: CURVE (docs/security.md): the pair's secret certificate, the folder
    #: of allowed clients' public certificates, and what each may read and
    #: write (core/permissions.py).  None: plain CHP, open to anyone.
    curve_secret: str | None = None
    curve_clients: str | None = None
    permissions: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "hugz_interval",
            "sync_timeout",
            "sync_retry",
            "pending_age",
            "applied_horizon",
            "snapshot_stall",
            "status_interval",
        ):
            SECONDS.check(name, getattr(self, name))
        for name in ("pending_size", "applied_limit", "backlog_limit"):
            COUNT.check(name, getattr(self, name))
        for name in ("publisher_hwm", "collector_hwm"):
            HWM.check(name, getattr(self, name))
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(
                f"metrics_port must be a TCP port 1-65535 (0: any free one), "
                f"not {self.metrics_port!r}"
            )
        if not self.metrics_bind:
            raise ConfigError("metrics_bind must be an address to listen on")
        if (self.curve_secret is None) != (self.curve_clients is None):
            raise ConfigError(
                "curve_secret and curve_clients go together: the server's "
                "secret key, and the folder of the clients it allows"
            )
        if self.permissions is not None and self.curve_secret is None:
            raise ConfigError(
                "permissions need CURVE (curve_secret and curve_clients): "
                "without keys no client can be told from another"
            )
        if self.fsync not in FSYNC_MODES:
            raise ConfigError(
                f"fsync must be one of {', '.join(FSYNC_MODES)}, not {self.fsync!r}"
            )


def check_ports_apart(ports: Mapping[str, tuple[int, int]]) -> None:
    """No two of the named port blocks ``(first, count)`` share a port."""
    named = list(ports.items())
    for i, (name, (first, count)) in enumerate(named):
        for other, (other_first, other_count) in named[:i]:
            if first < other_first + other_count and other_first < first + count:
                raise ConfigError(
                    f"{other} ({_span(other_first, other_count)}) and "
                    f"{name} ({_span(first, count)}) overlap"
                )


def _span(first: int, count: int) -> str:
    return f"port {first}" if count == 1 else f"ports {first}-{first + count - 1}"


def default(setting: str) -> object:
    """The default of a ``pair_settings`` keyword that is a settings field."""
    for spec in (*fields(PairSettings), *fields(ServerSettings)):
        if spec.name == setting:
            return spec.default
    raise KeyError(setting)


def default_ports(role: str) -> tuple[int, int]:
    """The Guide's base port P and Binary Star port for ``role``."""
    if role == "backup":
        return BACKUP_PORT, BACKUP_STATE_PORT
    return PRIMARY_PORT, PRIMARY_STATE_PORT


def pair_settings(
    role: str,
    *,
    port: int | None = None,
    bind_host: str = "*",
    peer_host: str = "localhost",
    peer_port: int | None = None,
    state_port: int | None = None,
    peer_state_port: int | None = None,
    heartbeat: float = PairSettings.heartbeat,
    expiry_heartbeats: float = PairSettings.expiry_heartbeats,
    **options: object,
) -> ServerSettings:
    """Settings for ``role`` ("primary", "backup" or "standalone")."""
    if role not in ("primary", "backup", "standalone"):
        raise ConfigError(f"role must be primary, backup or standalone, not {role!r}")
    primary = role != "backup"
    own, own_state = default_ports(role)
    other, other_state = default_ports("primary" if role == "backup" else "backup")
    port = port if port is not None else own
    bind = Endpoints.tcp(bind_host, port)
    pair = None
    if role != "standalone":
        state_port = state_port if state_port is not None else own_state
        peer_state_port = (
            peer_state_port if peer_state_port is not None else other_state
        )
        check_port(state_port)
        check_port(peer_state_port)
        check_ports_apart(
            {
                "the CHP ports": (port, 3),
                "the Binary Star port": (state_port, 1),
            }
        )
        pair = PairSettings(
            primary=primary,
            state_bind=f"tcp://{bind_host}:{state_port}",
            state_peer=f"tcp://{peer_host}:{peer_state_port}",
            peer=Endpoints.tcp(
                peer_host, peer_port if peer_port is not None else other
            ),
            heartbeat=heartbeat,
            expiry_heartbeats=expiry_heartbeats,
        )
    return ServerSettings(bind=bind, pair=pair, name=role, **options)  # type: ignore[arg-type]
