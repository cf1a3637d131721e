"""The ``trioclone`` command: ``serve`` and the client commands."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import trio
import zmq

from trioclone.cli_client import (
    add_client_commands,
    base_port,
    count,
    heartbeats,
    hwm,
    port,
    seconds,
)
from trioclone.errors import ConfigError
from trioclone.server.clone import STOP_LIMIT, CloneServer
from trioclone.server.datadir import DataDirError, default_folder
from trioclone.server.settings import (
    FSYNC_MODES,
    ServerSettings,
    check_ports_apart,
    default,
    default_ports,
    pair_settings,
)

log = logging.getLogger("trioclone")
E = TypeVar("E", bound=BaseException)
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
}


def _dest(option: str) -> str:
    """Where argparse keeps ``option``: "--peer-expiry" -> "peer_expiry"."""
    return option.removeprefix("--").replace("-", "_")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    role = getattr(args, "role", None)
    tag = f" [{role}]" if role else ""  # tells apart the two servers' lines
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format=f"%(asctime)s{tag} %(name)s %(levelname)s %(message)s",
    )
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        parser.exit(2, f"trioclone: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return code


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
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    add_serve(commands)
    add_client_commands(commands)
    return parser


def add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run a server: standalone, one side of a pair, or a local pair",
        description=(
            "Run a Clone server. Ports P (snapshots), P+1 (updates), P+2 (writes). "
            "Defaults as the ZeroMQ Guide: primary P=5556 with Binary Star port "
            "5003, backup P=5566 with 5004. With --pair, --port and --state-port "
            "are the primary's, --peer-port and --peer-state-port the backup's."
        ),
    )
    mode = serve.add_mutually_exclusive_group(required=True)
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
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    if args.pair:
        return run_local_pair(args)
    role = "standalone" if args.standalone else args.role
    settings = server_settings(
        args,
        role,
        port=args.port,
        peer_host=args.peer or "localhost",
        peer_port=args.peer_port,
        state_port=args.state_port,
        peer_state_port=args.peer_state_port,
    )
    failed = False
    try:
        trio.run(serve_until_signalled, CloneServer(settings))
    except* zmq.ZMQError as group:  # a bind failed: port in use, bad address
        for exc in leaves(group):
            log.error("cannot start the %s server: %s", role, exc)
        failed = True
    except* DataDirError as kept:  # its map on disk cannot be used
        for problem in leaves(kept):
            log.error("the %s server stops: %s", role, problem)
        failed = True
    return 1 if failed else 0


def leaves(group: BaseExceptionGroup[E]) -> list[E]:
    """The exceptions in ``group`` and the groups nested in it (a task's
    error reaches here inside its nursery's group)."""
    found: list[E] = []
    for exc in group.exceptions:
        found.extend(leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


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


async def serve_until_signalled(server: CloneServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (bounded: see
    ``CloneServer.stop``); a second signal meanwhile stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, signals, server, nursery.cancel_scope)
            await server.run()
            nursery.cancel_scope.cancel()


async def _stop_on_signals(
    signals: AsyncIterator[int], server: CloneServer, scope: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not server.stopping:
            log.info("stopping on %s (a second signal stops at once)", name)
            server.stop()
        else:
            log.warning("stopping at once on a second signal (%s)", name)
            scope.cancel()
            return


# -- serve --pair: two servers on this host, kept running --------------------


@dataclass(frozen=True)
class Side:
    """Where one server of a local pair listens."""

    port: int  # base port P
    state_port: int  # Binary Star heartbeat


def run_local_pair(args: argparse.Namespace) -> int:
    """Run ``serve --role primary`` and ``--role backup`` as supervised children."""
    commands = local_pair_commands(args)
    return trio.run(Supervisor(commands).run)


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
    shared: list[str] = ["--fsync", args.fsync]
    for option in SETTINGS_OPTIONS:
        shared += [option, repr(getattr(args, _dest(option)))]
    if args.reset_data:
        shared.append("--reset-data")
    commands = {}
    for role, own, peer in (("primary", primary, backup), ("backup", backup, primary)):
        server_settings(  # the child would refuse these too, after we started it
            args,
            role,
            port=own.port,
            peer_host=peer_host,
            peer_port=peer.port,
            state_port=own.state_port,
            peer_state_port=peer.state_port,
        )
        commands[role] = [
            sys.executable,
            "-m",
            "trioclone",
            "--log-level",
            args.log_level,
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
    """Keeps child processes running until SIGINT or SIGTERM.

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
    ) -> None:
        self.commands = dict(commands)
        self.backoff = backoff or Backoff()
        self.grace = grace
        self._failed_at_start: set[str] = set()
        self._scope: trio.CancelScope | None = None

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
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
        process = await trio.lowlevel.open_process(list(command))
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
