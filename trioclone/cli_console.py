"""``trioclone console``: the map in a web browser (``trioclone.console``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Coroutine
from functools import partial
from typing import Any

import trio

from trioclone.cli_client import client_curve, client_options, port
from trioclone.client.agent import DEFAULT_SERVERS
from trioclone.endpoints import Endpoints
from trioclone.errors import leaves

log = logging.getLogger("trioclone.console")

INSTALL_HINT = "the console needs its web stack: pip install 'trioclone[console]'"


def add_console_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    console = commands.add_parser(
        "console",
        parents=[client_options()],
        help="serve a live web console of the map",
        description="Mirror the map and serve a web page of it: the key tree, "
        "live updates, each server's status, and (unless --read-only) set, edit "
        "and delete through confirmed writes. Open http://BIND:PORT/ in a browser.",
    )
    console.add_argument(
        "--port", type=port, default=8080, help="HTTP port (default %(default)s)"
    )
    console.add_argument(
        "--bind",
        default="127.0.0.1",
        help="address to listen on (default %(default)s; any other than "
        "loopback needs --read-only: the console has no log-in)",
    )
    console.add_argument(
        "--subtree", default="", help="mirror only the keys under this prefix"
    )
    console.add_argument(
        "--read-only", action="store_true", help="no writes from the page"
    )
    console.set_defaults(run=run_console)


def run_console(args: argparse.Namespace) -> int:
    try:
        import hypercorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        print(f"trioclone: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from trioclone.console.serve import check_bind, serve_console

    check_bind(args.bind, read_only=args.read_only)  # ConfigError: exit 2
    servers = args.server or [Endpoints.parse(s) for s in DEFAULT_SERVERS]
    run = partial(
        serve_console,
        servers,
        host=args.bind,
        port=args.port,
        subtree=args.subtree,
        read_only=args.read_only,
        timeout=args.timeout,
        curve=client_curve(args),  # ConfigError: exit 2 with its reason
    )
    failed = False
    try:
        trio.run(_announced, run)
    except* OSError as group:  # the port is taken, or the address is not ours
        for exc in leaves(group):
            log.error("cannot start the console: %s", exc)
        failed = True
    return 1 if failed else 0


async def _announced(run: partial[Coroutine[Any, Any, None]]) -> None:
    """Run the console; say where it is on stdout once it listens."""
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run)
        print(f"console at {url}", flush=True)
