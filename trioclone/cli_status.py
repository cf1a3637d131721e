"""``trioclone status``: what each server of a pair is doing.

Exit codes: 0 when at least one server answered (with ``--check``: when
exactly one is active); 1 with ``--check`` when none or more than one of
those that answered is active; 3 when no server answered.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import trio

from trioclone.cli_client import EXIT_NO_SERVER, client_curve, client_options
from trioclone.client.agent import DEFAULT_SERVERS
from trioclone.client.status import ServerStatus, ask_all
from trioclone.endpoints import Endpoints

EXIT_NOT_ONE_ACTIVE = 1

#: The table's columns: heading, and how a status shows in it.
COLUMNS = (
    "SERVER",
    "NAME",
    "STATE",
    "SYNCED",
    "SEQUENCE",
    "KEYS",
    "LINEAGE",
    "PENDING",
    "PEER HB",
    "SNAPSHOTS",
    "UPTIME",
    "VERSION",
)


def add_status_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    options = client_options(2.0, "seconds to wait for each server (default 2.0)")
    status = commands.add_parser(
        "status",
        parents=[options],
        help="show each server's role, sequence and health",
        description="Ask each server for its status on its snapshot socket "
        "(never a Binary Star vote). Exit 0 when a server answered (with "
        "--check: when exactly one server is active), 1 with --check when "
        "none or two are active, 3 when no server answered.",
    )
    status.add_argument("--json", action="store_true", help="JSON output")
    status.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless exactly one server is active (a health probe)",
    )
    status.set_defaults(run=run_status)


def run_status(args: argparse.Namespace) -> int:
    servers: list[Endpoints] = args.server or [
        Endpoints.parse(s) for s in DEFAULT_SERVERS
    ]
    curve = client_curve(args)  # ConfigError: exit 2 with its reason
    results = trio.run(ask_all, servers, args.timeout, None, curve)
    print(render_json(results) if args.json else render_table(results))
    return exit_code(results, check=args.check)


def exit_code(results: Sequence[ServerStatus], *, check: bool) -> int:
    if all(result.status is None for result in results):
        return EXIT_NO_SERVER
    if check and sum(result.active for result in results) != 1:
        return EXIT_NOT_ONE_ACTIVE
    return 0


def render_json(results: Sequence[ServerStatus]) -> str:
    servers = [
        {
            "server": str(result.server),
            "reachable": result.status is not None,
            "error": result.error,
            **(result.status or {}),
        }
        for result in results
    ]
    actives = sum(result.active for result in results)
    return json.dumps({"servers": servers, "actives": actives}, indent=1)


def render_table(results: Sequence[ServerStatus]) -> str:
    """One row per server, in the order asked; an unreachable one says why."""
    rows = {id(r): _row(r.status) for r in results if r.status is not None}
    widths = [len(heading) for heading in COLUMNS]
    widths[0] = max(widths[0], *(len(str(r.server)) for r in results))
    for cells in rows.values():
        widths = [max(w, len(c)) for w, c in zip(widths, cells, strict=True)]
    lines = [_line(list(COLUMNS), widths)]
    for result in results:
        row = rows.get(id(result))
        if row is None:
            server = str(result.server).ljust(widths[0])
            lines.append(f"{server}  unreachable: {result.error}")
        else:
            lines.append(_line([str(result.server), *row[1:]], widths))
    return "\n".join(lines)


def _row(status: dict[str, object]) -> list[str]:
    return [
        "",  # (the server's address, filled in by the caller)
        str(status.get("name")),
        str(status.get("state")),
        "yes" if status.get("synced") else "no",
        str(status.get("sequence")),
        str(status.get("keys")),
        str(status.get("lineage") or "-"),
        str(status.get("pending")),
        "-"
        if status.get("role") == "relay"
        else _age(status.get("peer_heartbeat_age"), bool(status.get("pair"))),
        str(status.get("snapshot_transfers")),
        _duration(status.get("uptime")),
        str(status.get("version")),
    ]


def _line(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
    ).rstrip()


def _age(value: object, pair: bool) -> str:
    if not pair:
        return "standalone"
    if not isinstance(value, int | float):
        return "never"
    return f"{value:.1f}s"


def _duration(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    total = int(value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
