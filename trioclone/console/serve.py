"""Run the console: its client, its tasks and its HTTP server, in one nursery."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

import trio
import zmq

from trioclone.client.agent import open_client
from trioclone.console.hub import Console
from trioclone.curve import Curve
from trioclone.endpoints import Endpoints
from trioclone.errors import ConfigError

log = logging.getLogger("trioclone.console")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, read_only: bool) -> None:
    """Writes are only served on loopback: the console has no log-in."""
    if not is_loopback(host) and not read_only:
        raise ConfigError(
            f"--bind {host} would let anyone who reaches it write the map (the "
            "console has no log-in): add --read-only, or keep the default "
            "127.0.0.1 and reach it over an SSH tunnel"
        )


async def serve_console(
    servers: Sequence[Endpoints],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    subtree: str = "",
    read_only: bool = False,
    timeout: float = 5.0,
    curve: Curve | None = None,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the console until cancelled; ``task_status`` gets its URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    from trioclone.console.app import build_app

    check_bind(host, read_only=read_only)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with open_client(servers, subtree, context=context, curve=curve) as clone:
            console = Console(
                clone,
                servers,
                subtree=subtree,
                read_only=read_only,
                timeout=timeout,
                curve=curve,
                context=context,
            )
            config = Config()
            config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
            config.accesslog = None
            config.errorlog = logging.getLogger("trioclone.console.http")
            config.graceful_timeout = 1.0
            app = build_app(console, loopback=is_loopback(host), host=host)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(console.run)
                binds = await nursery.start(serve, app, config)
                url = f"{binds[0]}/"
                log.info(
                    "console at %s for %s%s",
                    url,
                    ", ".join(map(str, servers)),
                    " (read-only)" if read_only else "",
                )
                task_status.started(url)
    finally:
        context.destroy(linger=0)
