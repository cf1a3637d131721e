"""Client commands: ``trioclone get|set|del|watch|dump|load``."""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import trio

from trioclone.cli_progress import lines_shown, shown, snapshot_shown
from trioclone.client.agent import DEFAULT_SERVERS, CloneClient, open_client
from trioclone.client.events import (
    CloneEvent,
    DeleteEvent,
    ResyncEvent,
    SetEvent,
    key_bytes,
)
from trioclone.core.chp import is_reserved
from trioclone.core.client import ClientTimings
from trioclone.curve import Curve, write_key_pair
from trioclone.endpoints import Endpoints, check_port
from trioclone.errors import (
    ConfigError,
    LocalProtocolError,
    PermissionDeniedError,
    WriteTimeoutError,
)
from trioclone.progress import Meter
from trioclone.server.settings import COUNT, HEARTBEATS, HWM, SECONDS, Rule

EXIT_NOT_FOUND = 1
EXIT_NO_SERVER = 3
EXIT_NOT_CONFIRMED = 4
EXIT_DENIED = 5  # a secured server refused: see docs/security.md
#: The client commands' environment variables (``serve`` lets them be).
SERVER_KEY_VARIABLE = "TRIOCLONE_SERVER_KEY"
CLIENT_KEY_VARIABLE = "TRIOCLONE_CLIENT_KEY"
VARIABLES = (SERVER_KEY_VARIABLE, CLIENT_KEY_VARIABLE)

QUIET_HELP = "no progress on stderr (shown only when it is a terminal)"

T = TypeVar("T")
Command = Callable[[CloneClient, argparse.Namespace], Coroutine[Any, Any, int]]


def add_client_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    common = client_options()
    get = commands.add_parser("get", parents=[common], help="print one value")
    get.add_argument("key")
    get.set_defaults(run=client_command(do_get, subtree="key"))
    put = commands.add_parser("set", parents=[common], help="write a value")
    put.add_argument("key")
    put.add_argument("value")
    put.add_argument("--ttl", type=seconds, help="seconds until the key expires")
    put.set_defaults(run=client_command(do_set, subtree="key"))
    delete = commands.add_parser("del", parents=[common], help="delete a key")
    delete.add_argument("key")
    delete.set_defaults(run=client_command(do_del, subtree="key"))
    load = commands.add_parser(
        "load",
        parents=[common],
        help="write every key of a 'dump --json' file, each confirmed",
        description="Write every key of FILE (the output of 'trioclone dump "
        '--json\': an object of key -> text, or {"base64": ...}) through the '
        "servers' normal path, each write confirmed. The whole file is checked "
        "before anything is written. On a terminal, stderr shows progress "
        "(keys confirmed, rate, ETA) unless --quiet.",
    )
    load.add_argument("file", type=Path, help="the JSON file ('-' for stdin)")
    load.add_argument(
        "--window",
        type=count,
        default=1000,
        help="writes awaiting confirmation at once (default %(default)s)",
    )
    load.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    load.set_defaults(run=run_load, progress="load")
    for name, handler, text in (
        ("watch", do_watch, "print changes as they happen (Ctrl-C stops)"),
        ("dump", do_dump, "print every key and value"),
    ):
        cmd = commands.add_parser(name, parents=[common], help=text)
        cmd.add_argument("prefix", nargs="?", default="", help="key prefix")
        cmd.add_argument("--json", action="store_true", help="JSON output")
        cmd.set_defaults(run=client_command(handler, subtree="prefix"))
        if name == "dump":
            cmd.description = (
                "Print every key and value under the prefix. On a terminal, "
                "stderr shows the snapshot's progress (keys received, rate, and "
                "an ETA for the whole map) and, when stdout is not a terminal, "
                "lines written, unless --quiet."
            )
            cmd.add_argument("--quiet", action="store_true", help=QUIET_HELP)
            cmd.set_defaults(progress="dump")

    keygen = commands.add_parser(
        "keygen",
        help="write a CURVE key pair: NAME.key (public) and NAME.key_secret",
        description="Write a new CURVE key pair in the ZeroMQ certificate "
        "format: NAME.key, the public certificate to give the other side, and "
        "NAME.key_secret (mode 0600), which never leaves its owner. A pair of "
        "servers shares one key pair; each client has its own.",
    )
    keygen.add_argument("name", help="the key pair's name (a plain file name)")
    keygen.add_argument(
        "--dir",
        type=Path,
        default=Path("."),
        help="the folder to write them in (default: the current one)",
    )
    keygen.set_defaults(run=run_keygen)


def client_options(
    timeout: float = 5.0, timeout_help: str | None = None
) -> argparse.ArgumentParser:
    """The options every client command takes: servers, keys, timeout."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        action="append",
        type=server_address,
        metavar="ADDRESS",
        help="tcp://HOST:PORT of a server; repeat for a pair "
        f"(default: {' and '.join(DEFAULT_SERVERS)})",
    )
    common.add_argument(
        "--server-key",
        type=Path,
        metavar="FILE",
        default=_env_path(SERVER_KEY_VARIABLE),
        help="the servers' public certificate, for secured servers "
        "(default: $TRIOCLONE_SERVER_KEY)",
    )
    common.add_argument(
        "--client-key",
        type=Path,
        metavar="FILE",
        default=_env_path(CLIENT_KEY_VARIABLE),
        help="this client's secret certificate (NAME.key_secret) "
        "(default: $TRIOCLONE_CLIENT_KEY)",
    )
    common.add_argument(
        "--timeout",
        type=seconds,
        default=timeout,
        help=timeout_help
        or "seconds to wait for a server (and more while its snapshot "
        "keeps arriving), and for a write to be confirmed (at most the write "
        f"horizon, {ClientTimings.write_horizon:g} s; default 5)",
    )
    return common


def run_keygen(args: argparse.Namespace) -> int:
    write_key_pair(args.dir, args.name)  # ConfigError: exit 2 with its reason
    print(f"wrote {args.dir / args.name}.key and {args.dir / args.name}.key_secret")
    return 0


def client_curve(args: argparse.Namespace) -> Curve | None:
    """The CURVE options ``--server-key`` and ``--client-key`` give."""
    if args.server_key is None and args.client_key is None:
        return None
    if args.server_key is None or args.client_key is None:
        raise ConfigError(
            "--server-key and --client-key go together: the servers' public "
            "certificate and this client's secret one"
        )
    return Curve.client_files(args.server_key, args.client_key)


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


# -- option types: a bad value exits 2 with "argument --NAME: ..." -------------


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    return _checked(SECONDS, _float(text), text)


def heartbeats(text: str) -> float:
    """A finite number of heartbeats, at least one."""
    return _checked(HEARTBEATS, _float(text), text)


def count(text: str) -> int:
    """A whole number, at least one."""
    return _checked(COUNT, _int(text), text)


def hwm(text: str) -> int:
    """A ZeroMQ high-water mark: a whole number, 0 for no limit."""
    return _checked(HWM, _int(text), text)


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    return _port(text, span=1)


def base_port(text: str) -> int:
    """A server's base port P: P, P+1 and P+2 are all TCP ports."""
    return _port(text, span=3)


def server_address(text: str) -> Endpoints:
    """``tcp://HOST:PORT`` (or ``HOST:PORT``, ``HOST``, ``[IPv6]:PORT``)."""
    try:
        return Endpoints.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _checked(rule: Rule, value: T, text: str) -> T:
    """``value`` (read from ``text``) if it keeps ``rule``."""
    if not rule.holds(value):
        raise argparse.ArgumentTypeError(f"must be {rule.words}, not {text!r}")
    return value


def _port(text: str, span: int) -> int:
    value = _int(text)
    try:
        check_port(value, span)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


# -- running a command -----------------------------------------------------------


def client_command(
    handler: Command, subtree: str
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        servers = args.server or [Endpoints.parse(s) for s in DEFAULT_SERVERS]
        args.curve = client_curve(args)  # ConfigError: exit 2 with its reason
        try:
            return trio.run(connected, handler, args, servers, getattr(args, subtree))
        except KeyboardInterrupt:
            return 130
        except LocalProtocolError as exc:  # e.g. --ttl 0, a reserved key
            print(f"trioclone: {exc}", file=sys.stderr)
            return 2

    return run


async def connected(
    handler: Command,
    args: argparse.Namespace,
    servers: list[Endpoints],
    subtree: str,
) -> int:
    async with open_client(servers, subtree, curve=args.curve) as clone:
        try:
            with snapshot_shown(args, clone, servers, subtree):
                await synced_in_time(clone, args.timeout)
        except PermissionDeniedError as exc:
            print(f"trioclone: refused: {exc}", file=sys.stderr)
            return EXIT_DENIED
        if not clone.synced:
            print(
                f"trioclone: no server answered within {args.timeout:g} s "
                f"(tried {', '.join(map(str, servers))})",
                file=sys.stderr,
            )
            return EXIT_NO_SERVER
        return await handler(clone, args)


async def synced_in_time(clone: CloneClient, timeout: float) -> bool:
    """Wait ``timeout`` seconds for a complete snapshot, and then again as
    long as each wait saw more of it arrive (a large map takes longer than
    ``--timeout`` to send; a server that stops sending is the client's to
    leave, after its request timeout)."""
    received = 0
    while True:
        with trio.move_on_after(timeout):
            await clone.wait_synced()
            return True
        now = clone.snapshot_progress
        if now is None or now <= received:
            return False
        received = now


async def do_get(clone: CloneClient, args: argparse.Namespace) -> int:
    value = clone.get(args.key)
    if value is None:
        print(f"trioclone: {args.key}: no such key", file=sys.stderr)
        return EXIT_NOT_FOUND
    print(show(value))
    return 0


async def do_set(clone: CloneClient, args: argparse.Namespace) -> int:
    if not args.value:
        print(
            "trioclone: an empty value is a delete: use 'trioclone del'",
            file=sys.stderr,
        )
        return 2
    write = clone.set(args.key, args.value, ttl=args.ttl, timeout=args.timeout)
    return await confirmed(write)


async def do_del(clone: CloneClient, args: argparse.Namespace) -> int:
    return await confirmed(clone.delete(args.key, timeout=args.timeout))


async def confirmed(write: Coroutine[Any, Any, int]) -> int:
    try:
        sequence = await write
    except WriteTimeoutError as exc:
        print(f"trioclone: {exc}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    except PermissionDeniedError as exc:
        print(f"trioclone: refused: {exc}", file=sys.stderr)
        return EXIT_DENIED
    print(f"ok, sequence {sequence}")
    return 0


async def do_dump(clone: CloneClient, args: argparse.Namespace) -> int:
    items = sorted(clone.items(args.prefix))
    if args.json:
        print(json.dumps({key: as_json(value) for key, value in items}, indent=1))
    else:
        with lines_shown(args, "dump", len(items)) as written:
            for number, (key, value) in enumerate(items, 1):
                print(f"{key}={show(value)}")
                written(number)
    return 0


class LoadFileError(Exception):
    """A file that ``trioclone load`` refuses (nothing is written)."""


def read_dump(path: Path) -> dict[str, bytes]:
    """The keys and values of a ``dump --json`` file, every one checked."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadFileError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadFileError(f"{path}: not a JSON object of key -> value")
    entries: dict[str, bytes] = {}
    for key, value in data.items():
        where = f"{path}: key {key!r}"
        if isinstance(value, str):
            body = value.encode()
        elif isinstance(value, dict) and set(value) == {"base64"}:
            try:
                body = base64.b64decode(value["base64"], validate=True)
            except (TypeError, ValueError) as exc:
                raise LoadFileError(f"{where}: bad base64 ({exc})") from None
        else:
            raise LoadFileError(f'{where}: a value is text or {{"base64": ...}}')
        if not body:
            raise LoadFileError(f"{where}: an empty value (a delete)")
        if not key or is_reserved(key_bytes(key)):
            raise LoadFileError(f"{where}: not a key a client may write")
        entries[key] = body
    return entries


def run_load(args: argparse.Namespace) -> int:
    try:
        args.entries = read_dump(args.file)
    except LoadFileError as exc:
        print(f"trioclone: {exc}; nothing was written", file=sys.stderr)
        return 2
    args.subtree = ""  # confirmations come from the whole map
    return client_command(do_load, subtree="subtree")(args)


async def do_load(clone: CloneClient, args: argparse.Namespace) -> int:
    """Every entry, ``args.window`` writes in flight at a time; on a terminal,
    the writes confirmed so far (and failed) are shown on stderr."""
    entries: dict[str, bytes] = args.entries
    window = trio.Semaphore(args.window)
    confirmed = 0
    failed: list[str] = []
    refused: list[str] = []

    async def write(key: str, body: bytes) -> None:
        nonlocal confirmed
        try:
            await clone.set(key, body, timeout=args.timeout)
            confirmed += 1
        except WriteTimeoutError:
            failed.append(key)
        except PermissionDeniedError as exc:
            refused.append(str(exc))
        finally:
            window.release()

    meter = Meter("load", len(entries), trio.current_time())
    with shown(
        args, clone.nursery, meter, lambda: (confirmed, len(failed) + len(refused))
    ):
        async with trio.open_nursery() as nursery:
            for key, body in entries.items():
                await window.acquire()
                nursery.start_soon(write, key, body)
    if refused:
        print(
            f"trioclone: refused: {len(refused)} of {len(entries)} writes, "
            f"first: {sorted(refused)[0]}",
            file=sys.stderr,
        )
        return EXIT_DENIED
    if failed:
        print(
            f"trioclone: {len(failed)} of {len(entries)} writes not confirmed "
            f"within {args.timeout:g} s (they may still have been applied), "
            f"first: {sorted(failed)[0]!r}",
            file=sys.stderr,
        )
        return EXIT_NOT_CONFIRMED
    print(f"ok, {len(entries)} keys written")
    return 0


async def do_watch(clone: CloneClient, args: argparse.Namespace) -> int:
    """The state under the prefix first (as a resync line), then each change:
    applied in order, the lines always rebuild the server's map."""
    async for event in clone.watch(args.prefix, state=True):
        print(render(event, args.json), flush=True)
    return 0


def render(event: CloneEvent, as_json_lines: bool) -> str:
    if isinstance(event, SetEvent):
        if as_json_lines:
            return json.dumps(
                {
                    "event": "set",
                    "key": event.key,
                    "sequence": event.sequence,
                    "value": as_json(event.value),
                }
            )
        return f"set {event.key}={show(event.value)}"
    if isinstance(event, DeleteEvent):
        if as_json_lines:
            return json.dumps(
                {"event": "delete", "key": event.key, "sequence": event.sequence}
            )
        return f"del {event.key}"
    assert isinstance(event, ResyncEvent)
    if as_json_lines:
        changes = {
            k: None if v is None else as_json(v) for k, v in event.changes.items()
        }
        return json.dumps(
            {"event": "resync", "server": event.server, "changes": changes}
        )
    return f"resync from {event.server}: {len(event.changes)} changed"


def show(value: bytes) -> str:
    """Text as it is; anything else (binary, control bytes) escaped."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return repr(value)
    return text if text.isprintable() else repr(value)


def as_json(value: bytes) -> str | dict[str, str]:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode()}
