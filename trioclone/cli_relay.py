"""``trioclone relay``: run a read replica in front of a pair (or a relay)."""

from __future__ import annotations

import argparse
import logging

import trio
import zmq

from trioclone.cli_client import base_port, seconds, server_address
from trioclone.core.replica import Timings
from trioclone.endpoints import PRIMARY_PORT, Endpoints
from trioclone.errors import leaves
from trioclone.relay import CloneRelay
from trioclone.signals import run_until_signalled

log = logging.getLogger("trioclone.relay")


def add_relay_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    relay = commands.add_parser(
        "relay",
        help="run a read replica that clients use like a server",
        description=(
            "Mirror a pair (or a relay) and serve its map to clients on ports P "
            "(snapshots), P+1 (updates, forwarded by libzmq as the pair sends "
            "them) and P+2 (writes, forwarded to every upstream). Clients, the "
            "Guide's too, use it exactly like a server; relays chain."
        ),
    )
    relay.add_argument(
        "--upstream",
        action="append",
        required=True,
        type=server_address,
        metavar="ADDRESS",
        help="tcp://HOST:PORT of a server of the pair (or of a relay); repeat "
        "for the other server",
    )
    relay.add_argument(
        "--port",
        type=base_port,
        default=PRIMARY_PORT,
        help="base port P (default %(default)s)",
    )
    relay.add_argument(
        "--bind", default="*", help="interface to bind (default: all, '*')"
    )
    defaults = Timings()
    relay.add_argument(
        "--silence-timeout",
        type=seconds,
        default=defaults.silence_timeout,
        help="seconds without a word from the upstream before trying the next "
        "(default %(default)s)",
    )
    relay.add_argument(
        "--request-timeout",
        type=seconds,
        default=defaults.request_timeout,
        help="seconds to wait for an upstream's snapshot reply (default %(default)s)",
    )
    relay.set_defaults(run=run_relay)


def run_relay(args: argparse.Namespace) -> int:
    timings = Timings(
        request_timeout=args.request_timeout, silence_timeout=args.silence_timeout
    )
    relay = CloneRelay(
        args.upstream, Endpoints.tcp(args.bind, args.port), timings=timings
    )
    failed = False
    try:
        trio.run(run_until_signalled, relay)
    except* zmq.ZMQError as group:  # a bind failed: port in use, bad address
        for exc in leaves(group):
            log.error("cannot start the relay: %s", exc)
        failed = True
    return 1 if failed else 0
