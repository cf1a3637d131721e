"""The ``trioclone`` command: ``serve`` and the client commands."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import zmq

from trioclone.cli_client import (
    VARIABLES,
    add_client_commands,
    base_port,
    count,
    heartbeats,
    hwm,
    port,
    seconds,
)
from trioclone.cli_console import add_console_command
from trioclone.cli_relay import add_relay_command
from trioclone.cli_status import add_status_command
from trioclone.config import ENV_PREFIX, Effective, Setting, resolve, table
from trioclone.errors import ConfigError, leaves
from trioclone.logformat import LOG_FORMATS, configure
from trioclone.server.clone import STOP_LIMIT, CloneServer
from trioclone.server.datadir import DataDirError, default_folder
from trioclone.server.metrics import require_prometheus
from trioclone.server.settings import (
    FSYNC_MODES,
    ServerSettings,
    check_ports_apart,
    default,
    default_ports,
    pair_settings,
)
from trioclone.signals import STOP_SIGNALS, run_until_signalled

log = logging.getLogger("trioclone")
supervisor_log = logging.getLogger("trioclone.pair")

#: ``serve`` options that set a setting, passed unchanged to both servers of
#: ``serve --pair``: the ``pair_settings`` keyword each sets, its type and its
#: help.  Their defaults are the settings' (``settings.default``).
SETTINGS_OPTIONS: dict[str, tuple[str, Callable[[str], object], str]] = {
    "--heartbeat": (
        "heartbeat",
        seconds,
        "Binary Star heartbeat in seconds; the same on both",
    ),
    "--peer-expiry": (
        "expiry_heartbeats",
        heartbeats,
        "heartbeats of peer silence before it counts as dead",
    ),
    "--hugz": ("hugz_interval", seconds, "HUGZ interval in seconds"),
    "--sync-timeout": (
        "sync_timeout",
        seconds,
        "passive: seconds of silence before a snapshot is retried",
    ),
    "--pending-size": ("pending_size", count, "pending list bound"),
    "--pending-age": ("pending_age", seconds, "pending entry max age in seconds"),
    "--status-interval": (
        "status_interval",
        seconds,
        "seconds between status lines in the log",
    ),
    "--applied-horizon": (
        "applied_horizon",
        seconds,
        "seconds a replaced write is remembered, so a client's resend of it "
        "is dropped; keep it above the clients' write horizon",
    ),
    "--applied-limit": (
        "applied_limit",
        count,
        "at most this many replaced writes are remembered",
    ),
    "--backlog-limit": (
        "backlog_limit",
        count,
        "passive: stream updates kept while a snapshot loads",
    ),
    "--snapshot-stall": (
        "snapshot_stall",
        seconds,
        "a snapshot client that reads nothing this long is dropped",
    ),
    "--publisher-hwm": (
        "publisher_hwm",
        hwm,
        "updates queued per subscriber before the publisher drops, 0 for no "
        "limit (a client notices a drop and snapshots again)",
    ),
    "--metrics-port": (
        "metrics_port",
        port,
        "serve Prometheus metrics at http://BIND:PORT/metrics (needs "
        "pip install 'trioclone[metrics]'; with --pair the backup's is PORT+1)",
    ),
    "--metrics-bind": (
        "metrics_bind",
        str,
        "the address the metrics endpoint listens on",
    ),
}


def _dest(option: str) -> str:
    """Where argparse keeps ``option``: "--peer-expiry" -> "peer_expiry"."""
    return option.removeprefix("--").replace("-", "_")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    effective: Effective | None = None
    server: str | None = None
    if args.run is run_serve:  # its settings also come from env and file
        try:
            effective = resolve(
                build_parser, setting_parsers, argv, args, os.environ, VARIABLES
            )
            server = serve_mode(args)
        except ConfigError as exc:
            parser.exit(2, f"trioclone: {exc}\n")
        args.effective = effective
    # the role tells apart the two servers' text lines
    configure(args.log_level, args.log_format, server, getattr(args, "role", None))
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        outside = [] if effective is None else effective.from_outside(str(exc))
        said = f" (not from flags: {', '.join(outside)})" if outside else ""
        parser.exit(2, f"trioclone: {exc}{said}\n")
    except KeyboardInterrupt:
        return 130
    return code


def setting_parsers(
    parser: argparse.ArgumentParser,
) -> list[argparse.ArgumentParser]:
    """The parsers whose options are ``serve``'s settings (see config.py):
    the top-level one (the log options) and ``serve``'s own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [parser, action.choices["serve"]]
    raise LookupError("no serve command")


def serve_settings_table() -> list[Setting]:
    """Every setting of ``serve``, in the order ``--help`` shows them."""
    return table(setting_parsers(build_parser()))


def serve_mode(args: argparse.Namespace) -> str:
    """standalone, primary, backup or pair; ConfigError if none is set."""
    if args.pair:
        return "pair"
    if args.standalone:
        return "standalone"
    if args.role is None:
        raise ConfigError(
            "serve needs a mode: --standalone, --role primary|backup or --pair "
            "(or TRIOCLONE_STANDALONE, TRIOCLONE_ROLE, TRIOCLONE_PAIR, or the "
            "keys standalone, role, pair of the --config file)"
        )
    return str(args.role)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trioclone",
        description="A high-availability key-value map (ZeroMQ Clone, Model Six).",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO; per-update logging is DEBUG only)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text: one readable line per record; json: one JSON object per "
        "line (default %(default)s)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    add_serve(commands)
    add_client_commands(commands)
    add_status_command(commands)
    add_relay_command(commands)
    add_console_command(commands)
    return parser


def add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a server: standalone, one side of a pair, or a local pair",
        description=(
            "Run a Clone server. Ports P (snapshots), P+1 (updates), P+2 (writes). "
            "Defaults as the ZeroMQ Guide: primary P=5556 with Binary Star port "
            "5003, backup P=5566 with 5004. With --pair, --port and --state-port "
            "are the primary's, --peer-port and --peer-state-port the backup's. "
            "Every option --NAME is also the variable TRIOCLONE_NAME and the key "
            "NAME of the --config file (flag > environment > file > default; "
            "see docs/configuration.md)."
        ),
    )
    # one is required, from a flag, the environment or the config file
    mode = serve.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", help="one server, no pair")
    mode.add_argument("--role", choices=["primary", "backup"], help="side of the pair")
    mode.add_argument(
        "--pair",
        action="store_true",
        help="a primary and a backup on this host, each restarted when it exits",
    )
    serve.add_argument("--port", type=base_port, help="base port P (default by role)")
    serve.add_argument(
        "--bind", default="*", help="interface to bind (default: all, '*')"
    )
    serve.add_argument(
        "--peer", help="the peer's host (default localhost; not with --pair)"
    )
    serve.add_argument("--peer-port", type=base_port, help="the peer's base port P")
    serve.add_argument("--state-port", type=port, help="our Binary Star port")
    serve.add_argument(
        "--peer-state-port", type=port, help="the peer's Binary Star port"
    )
    durable = serve.add_mutually_exclusive_group()
    durable.add_argument(
        "--data-dir",
        type=Path,
        help="the folder that keeps the map across restarts (default: "
        "$XDG_DATA_HOME/trioclone/ROLE-PORT, or ~/.local/share/...; with "
        "--pair, a folder per server inside it)",
    )
    durable.add_argument(
        "--in-memory",
        action="store_true",
        help="keep the map in memory only: it is lost when both servers stop",
    )
    serve.add_argument(
        "--fsync",
        choices=FSYNC_MODES,
        default="always",
        help="always: each commit waits for the disk, nothing published is "
        "lost by a power cut; interval: synced once a second; off: when the "
        "OS likes (default %(default)s; a killed process loses nothing in any mode)",
    )
    secure = serve.add_argument_group(
        "security (docs/security.md)",
        "Without these the server speaks plain CHP: anyone who reaches its "
        "ports can read and write the map.",
    )
    secure.add_argument(
        "--curve-secret",
        type=Path,
        metavar="FILE",
        help="the pair's secret certificate (trioclone keygen; both servers "
        "use the same one): every socket uses CURVE",
    )
    secure.add_argument(
        "--curve-clients",
        type=Path,
        metavar="FOLDER",
        help="the folder of the allowed clients' public certificates "
        "(NAME.key); read again when it changes",
    )
    secure.add_argument(
        "--permissions",
        type=Path,
        metavar="FILE",
        help="TOML: the key prefixes each client may read and write "
        "(default: every allowed client reads and writes everything)",
    )
    serve.add_argument(
        "--reset-data",
        action="store_true",
        help="delete the map kept in the data folder and start empty "
        "(with --pair: at the first start only)",
    )
    for option, (setting, kind, text) in SETTINGS_OPTIONS.items():
        serve.add_argument(
            option,
            type=kind,
            default=default(setting),
            help=f"{text} (default %(default)s)",
        )
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"a TOML file of settings: the flags' names without the dashes "
        f"(default: ${ENV_PREFIX}CONFIG if set; flags and {ENV_PREFIX}* "
        "variables beat it)",
    )
    serve.add_argument(
        "--print-config",
        nargs="?",
        const="text",
        choices=["text", "json"],
        help="print the effective settings and where each came from (as TOML, "
        "or json), and exit without starting",
    )
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if args.metrics_port is not None:
        require_prometheus()  # a clear error now, not from inside the server
    if args.pair:
        return run_local_pair(args)
    role = serve_mode(args)
    settings = server_settings(
        args,
        role,
        port=args.port,
        peer_host=args.peer or "localhost",
        peer_port=args.peer_port,
        state_port=args.state_port,
        peer_state_port=args.peer_state_port,
    )
    server = CloneServer(settings)  # reads the keys: a bad one is refused now
    if print_config(args):
        return 0
    failed = False
    try:
        trio.run(serve_until_signalled, server)
    except* zmq.ZMQError as group:  # a bind failed: port in use, bad address
        for exc in leaves(group):
            log.error("cannot start the %s server: %s", role, exc)
        failed = True
    except* DataDirError as kept:  # its map on disk cannot be used
        for problem in leaves(kept):
            log.error("the %s server stops: %s", role, problem)
        failed = True
    except* OSError as listen:  # the metrics port: in use, bad address
        for error in leaves(listen):
            log.error("cannot start the %s server's metrics endpoint: %s", role, error)
        failed = True
    return 1 if failed else 0


def data_dir(args: argparse.Namespace, role: str, port: int) -> str | None:
    """Where ``role``'s map is kept: None with ``--in-memory``; with
    ``--pair``, a folder per server inside ``--data-dir``."""
    if args.in_memory:
        return None
    if args.data_dir is None:
        return str(default_folder(role, port))
    if args.pair:
        return str(Path(args.data_dir) / f"{role}-{port}")
    return str(args.data_dir)


def server_settings(
    args: argparse.Namespace,
    role: str,
    *,
    port: int | None,
    peer_host: str,
    peer_port: int | None,
    state_port: int | None,
    peer_state_port: int | None,
) -> ServerSettings:
    own_port = port if port is not None else default_ports(role)[0]
    return pair_settings(
        role,
        port=port,
        data_dir=data_dir(args, role, own_port),
        fsync=args.fsync,
        reset_data=args.reset_data,
        **security_settings(args),
        bind_host=args.bind,
        peer_host=peer_host,
        peer_port=peer_port,
        state_port=state_port,
        peer_state_port=peer_state_port,
        **{
            setting: getattr(args, _dest(option))
            for option, (setting, _, _) in SETTINGS_OPTIONS.items()
        },
    )


def security_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The security options as settings (absolute: ``--pair``'s children
    and a daemon may run elsewhere)."""
    return {
        name: None if value is None else str(Path(value).absolute())
        for name in ("curve_secret", "curve_clients", "permissions")
        for value in [getattr(args, name)]
    }


async def serve_until_signalled(server: CloneServer) -> None:
    await run_until_signalled(server)


# -- serve --pair: two servers on this host, kept running --------------------


@dataclass(frozen=True)
class Side:
    """Where one server of a local pair listens."""

    port: int  # base port P
    state_port: int  # Binary Star heartbeat


def run_local_pair(args: argparse.Namespace) -> int:
    """Run ``serve --role primary`` and ``--role backup`` as supervised children."""
    commands = local_pair_commands(args)
    if print_config(args):
        return 0
    return trio.run(Supervisor(commands, env=child_environment(os.environ)).run)


def print_config(args: argparse.Namespace) -> bool:
    """With ``--print-config``: print the settings (checked) and say so."""
    effective: Effective | None = getattr(args, "effective", None)
    if not args.print_config or effective is None:
        return False
    print(effective.render(args.print_config))
    return True


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the TRIOCLONE_ settings: a local pair's servers
    get every setting as a flag."""
    return {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}


#: Settings ``local_pair_commands`` gives each server its own way; every
#: other setting of ``serve`` is passed to both servers as it is.
PER_SERVER = frozenset(
    {
        *("standalone", "role", "pair", "bind", "peer", "port", "peer_port"),
        *("state_port", "peer_state_port", "data_dir", "in_memory"),
        *("log_level", "log_format", "reset_data"),
        *("curve_secret", "curve_clients", "permissions"),  # made absolute
        "metrics_port",  # the backup's is the primary's + 1
    }
)


def as_flag(row: Setting, value: object) -> list[str]:
    """``value`` of ``row`` as command-line arguments ([] if it is unset)."""
    if row.switch:
        return [row.flag] if value else []
    if value is None:
        return []
    return [row.flag, repr(value) if isinstance(value, float) else str(value)]


def local_pair_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The two children's command lines; ConfigError if the options clash."""
    if args.peer is not None:
        raise ConfigError(
            "--peer does not go with --pair: both servers run on this host "
            "(use --role primary/backup --peer HOST for servers on two hosts)"
        )
    port, state_port = default_ports("primary")
    peer_port, peer_state_port = default_ports("backup")
    primary = Side(
        port if args.port is None else args.port,
        state_port if args.state_port is None else args.state_port,
    )
    backup = Side(
        peer_port if args.peer_port is None else args.peer_port,
        peer_state_port if args.peer_state_port is None else args.peer_state_port,
    )
    check_ports_apart(
        {
            "the primary's --port": (primary.port, 3),
            "the backup's --peer-port": (backup.port, 3),
            "the primary's --state-port": (primary.state_port, 1),
            "the backup's --peer-state-port": (backup.state_port, 1),
        }
    )
    # The servers reach each other at the address they bind, or at localhost.
    peer_host = "localhost" if args.bind in ("*", "0.0.0.0") else args.bind
    shared: list[str] = []
    for row in serve_settings_table():
        if row.dest not in PER_SERVER:
            shared += as_flag(row, getattr(args, row.dest))
    metrics: dict[str, list[str]] = {"primary": [], "backup": []}
    if args.metrics_port is not None:  # one endpoint each, side by side
        if args.metrics_port >= 65535:
            raise ConfigError(
                "--metrics-port with --pair needs PORT+1 free: at most 65534"
            )
        metrics["primary"] = ["--metrics-port", str(args.metrics_port)]
        metrics["backup"] = ["--metrics-port", str(args.metrics_port + 1)]
    if args.reset_data:  # the supervisor drops it from a restart
        shared.append("--reset-data")
    for name, value in security_settings(args).items():
        if value is not None:
            shared += [f"--{name.replace('_', '-')}", value]
    commands = {}
    for role, own, peer in (("primary", primary, backup), ("backup", backup, primary)):
        settings = server_settings(  # the child would refuse these too, later
            args,
            role,
            port=own.port,
            peer_host=peer_host,
            peer_port=peer.port,
            state_port=own.state_port,
            peer_state_port=peer.state_port,
        )
        CloneServer(settings)  # reads the keys: a bad one is refused now
        commands[role] = [
            sys.executable,
            "-m",
            "trioclone",
            "--log-level",
            args.log_level,
            "--log-format",
            args.log_format,
            "serve",
            "--role",
            role,
            "--bind",
            args.bind,
            "--peer",
            peer_host,
            "--port",
            str(own.port),
            "--peer-port",
            str(peer.port),
            "--state-port",
            str(own.state_port),
            "--peer-state-port",
            str(peer.state_port),
            *(
                ["--in-memory"]
                if args.in_memory
                else ["--data-dir", data_dir(args, role, own.port) or ""]
            ),
            *shared,
            *metrics[role],
        ]
    return commands


@dataclass(frozen=True)
class Backoff:
    """How long to wait before restarting a child that exited."""

    first: float = 1.0
    cap: float = 30.0
    steady: float = 10.0  # after a run this long, start again from ``first``

    def delay(self, previous: float | None, ran: float) -> float:
        if previous is None or ran >= self.steady:
            return self.first
        return min(2 * previous, self.cap)


class Supervisor:
    """Keeps child processes running until SIGINT, SIGTERM or SIGHUP.

    A child that exits is restarted after a back-off; the others keep
    running.  A signal stops every child (SIGTERM, SIGKILL after ``grace``
    seconds) and ``run`` returns 0; it returns 1 if every child failed at
    its first start (ports taken, say), as there is nothing to keep running.
    """

    def __init__(
        self,
        commands: Mapping[str, Sequence[str]],
        backoff: Backoff | None = None,
        grace: float = STOP_LIMIT + 2.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.commands = dict(commands)
        self.env = None if env is None else dict(env)  # None: ours
        self.backoff = backoff or Backoff()
        self.grace = grace
        self._failed_at_start: set[str] = set()
        self._scope: trio.CancelScope | None = None

    async def run(self) -> int:
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for name, command in self.commands.items():
                    nursery.start_soon(self._keep_running, name, command)
                async for signum in signals:
                    supervisor_log.info(
                        "stopping the servers on %s", signal.Signals(signum).name
                    )
                    nursery.cancel_scope.cancel()
                    break
        return 1 if self._gave_up else 0

    @property
    def _gave_up(self) -> bool:
        return self._failed_at_start == set(self.commands)

    async def _keep_running(self, name: str, command: Sequence[str]) -> None:
        delay: float | None = None  # None: not restarted yet
        while True:
            started = trio.current_time()
            pid, status = await self._run_once(name, command)
            # a restart keeps the map the first run made
            command = [arg for arg in command if arg != "--reset-data"]
            ran = trio.current_time() - started
            supervisor_log.warning(
                "the %s server (pid %d) %s after %.1f s",
                name,
                pid,
                describe(status),
                ran,
            )
            if delay is None and status > 0 and ran < self.backoff.steady:
                self._failed_to_start(name)
                if self._gave_up:
                    return
            delay = self.backoff.delay(delay, ran)
            supervisor_log.info("restarting the %s server in %.1f s", name, delay)
            await trio.sleep(delay)

    async def _run_once(self, name: str, command: Sequence[str]) -> tuple[int, int]:
        """Run ``command`` until it exits: its PID and exit status."""
        # A session of its own: a Ctrl-C at the terminal reaches the
        # supervisor alone, which stops each child with one SIGTERM (a
        # child that got both would take the second as "stop at once").
        process = await trio.lowlevel.open_process(
            list(command), env=self.env, start_new_session=True
        )
        supervisor_log.info("started the %s server: pid %d", name, process.pid)
        try:
            return process.pid, await process.wait()
        finally:
            if process.returncode is None:  # cancelled: we are stopping
                with trio.CancelScope(shield=True):
                    await self._stop(name, process)

    async def _stop(self, name: str, process: trio.Process) -> None:
        process.terminate()
        with trio.move_on_after(self.grace):
            await process.wait()
        if process.returncode is None:
            supervisor_log.warning(
                "the %s server (pid %d) ignored SIGTERM for %g s; killing it",
                name,
                process.pid,
                self.grace,
            )
            process.kill()
        status = await process.wait()
        supervisor_log.info(
            "stopped the %s server (pid %d): it %s", name, process.pid, describe(status)
        )

    def _failed_to_start(self, name: str) -> None:
        self._failed_at_start.add(name)
        if self._gave_up:
            supervisor_log.error(
                "no server could start (see the errors above); giving up"
            )
            assert self._scope is not None
            self._scope.cancel()


def describe(status: int) -> str:
    """An exit status as words: "exited with status 1", "was killed by SIGKILL"."""
    if status >= 0:
        return f"exited with status {status}"
    try:
        name = signal.Signals(-status).name
    except ValueError:
        name = f"signal {-status}"
    return f"was killed by {name}"
