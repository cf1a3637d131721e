"""Secured (CURVE, a clients folder, a permissions file) against plain, side by side.

Three set-ups, each plain and secured, all six running at once and
measured in the same run, taking turns (plain then secured, back to back):

* the ceiling (``tools/ceiling.py``, standalone) without and with CURVE on
  its three sockets: what CURVE's encryption costs a server that does
  nothing else;
* a standalone trioclone server without and with ``--curve-secret``,
  ``--curve-clients`` and ``--permissions`` (the same work as the ceiling);
* a trioclone pair (primary ACTIVE, backup PASSIVE), the same options for
  both: every socket, the pair's heartbeat and sync links too, is CURVE.

The ZAP task lets in the bench's one client key; the permissions file lets
it write only under the bench's prefixes, so every write is checked.

The load generator and the subscribers connect with the bench's own key
pair (made here with ``trioclone.curve``) to a secured server.  Writers
send each update to both collectors of a pair, as the Guide's Model Six
clients do; the subscriber listens to the primary.

Measured: floods with one subscriber (wall rate, server CPU per update,
the backup's too) and the highest loss-free offered rate (a bisected
ladder), each ``rounds`` times.  Before that, checks that the secured
servers are what they claim: a plain client gets no snapshot, and a write
outside the permitted prefixes is refused.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import load
from benchlib.report import dig, status
from benchlib.servers import Fleet, Server, wait_for_log
from benchlib.wire import (
    DATA_PREFIXES,
    PROBE,
    Context,
    Feeder,
    Security,
    kvset,
    server_sequence,
)
from trioclone.curve import Curve, write_key_pair

KINDS = ("plain", "secured")
SETUPS = ("ceiling", "standalone", "pair")
LABELS = {
    "ceiling": "ceiling (bare pyzmq), standalone",
    "standalone": "trioclone, standalone",
    "pair": "trioclone pair (writers send to both)",
}
#: The prefixes the bench's client may write: its data keys and its probes.
WRITABLE = (*DATA_PREFIXES, PROBE)
DENIED_KEY = b"/denied/bench"
RATES = list(range(5_000, 300_001, 5_000))  # bisected: 6 steps
TARGET = 0.9  # the issue's: secured loss-free rate >= 0.9x plain


@dataclass(frozen=True)
class Keys:
    """What the secured servers are started with, and what a client needs."""

    ceiling_args: tuple[str, ...]
    server_args: tuple[str, ...]
    security: Security


def make_keys(folder: Path) -> Keys:
    """A key pair for the servers and one for the bench's client, the
    client's public certificate in a clients folder, a permissions file."""
    keys, clients = folder / "keys", folder / "clients"
    keys.mkdir()
    clients.mkdir()
    pair = write_key_pair(keys, "pair")
    bench = write_key_pair(keys, "bench")
    shutil.copy(keys / "bench.key", clients / "bench.key")
    permissions = folder / "permissions.toml"
    writable = ", ".join(f'"{p.decode()}"' for p in WRITABLE)
    permissions.write_text(f'[clients.bench]\nread = [""]\nwrite = [{writable}]\n')
    secret = str(keys / "pair.key_secret")
    return Keys(
        ceiling_args=("--curve-secret", secret),
        server_args=(
            "--curve-secret",
            secret,
            "--curve-clients",
            str(clients),
            "--permissions",
            str(permissions),
        ),
        security=tuple(Curve.for_client(pair.public, bench).options(binds=False)),
    )


Setup = tuple[Server, Server | None]  # a server (a pair's primary) and its backup


def run(
    mp: Any,
    ctx: Context,
    fleet: Fleet,
    *,
    flood: int,
    rounds: int,
    step: float,
    key_space: int,
) -> dict[str, Any]:
    keys = make_keys(Path(tempfile.mkdtemp(prefix="curve-", dir=fleet.log_dir)))
    setups: dict[str, dict[str, Setup]] = {
        "ceiling": {
            "plain": (fleet.start("ceiling", "ceiling-plain"), None),
            "secured": (
                fleet.start(
                    "ceiling",
                    "ceiling-curve",
                    extra=keys.ceiling_args,
                    security=keys.security,
                ),
                None,
            ),
        },
        "standalone": {
            "plain": (fleet.start("trioclone", "standalone-plain"), None),
            "secured": (
                fleet.start(
                    "trioclone",
                    "standalone-secured",
                    extra=keys.server_args,
                    security=keys.security,
                ),
                None,
            ),
        },
        "pair": {
            "plain": fleet.start_pair(fast=False, tag="plain"),
            "secured": fleet.start_pair(
                fast=False,
                extra=keys.server_args,
                security=keys.security,
                tag="secured",
            ),
        },
    }
    out: dict[str, Any] = {
        "checks": checks(ctx, setups["pair"]["secured"][0], setups["ceiling"]),
        "rounds": rounds,
    }
    for setup in setups.values():  # warm-up, not counted
        for server, backup in setup.values():
            load.flood(
                mp,
                ctx,
                server,
                subscribers=1,
                count=10_000,
                key_space=key_space,
                backup=backup,
            )
    floods: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {k: [] for k in KINDS} for s in SETUPS
    }
    ladders: dict[str, dict[str, list[dict[str, Any]]]] = {
        s: {k: [] for k in KINDS} for s in SETUPS
    }
    for _ in range(rounds):
        for name, setup in setups.items():
            for kind, (server, backup) in setup.items():
                floods[name][kind].append(
                    load.flood(
                        mp,
                        ctx,
                        server,
                        subscribers=1,
                        count=flood,
                        key_space=key_space,
                        backup=backup,
                    )
                )
    for _ in range(rounds):
        for name, setup in setups.items():
            for kind, (server, backup) in setup.items():
                ladders[name][kind].append(
                    load.ladder(
                        mp,
                        ctx,
                        server,
                        rates=RATES,
                        duration=step,
                        bisect=True,
                        key_space=key_space,
                        backup=backup,
                    )
                )
    for name, setup in setups.items():
        out[name] = summarize(floods[name], ladders[name])
        fleet.stop(*(s for pair in setup.values() for s in pair if s is not None))
    return out


def checks(
    ctx: Context, secured: Server, ceilings: dict[str, Setup]
) -> dict[str, bool]:
    """Is the secured pair secured, its permission check running, and the
    CURVE ceiling CURVE?"""
    ceiling = ceilings["secured"][0]
    feeder = Feeder(
        ctx, [secured.port], secured.port, b"deny", security=secured.security
    )
    try:
        if not feeder.probe():
            raise RuntimeError("no probe echo from the secured primary")
        feeder.send(kvset(DENIED_KEY, b"refused"))
        denied = wait_for_log(secured, "refused a write", 5.0)
    finally:
        feeder.close()
    return {
        "secured pair refuses a plain client's snapshot": server_sequence(
            ctx, secured.port, 1.0
        )
        is None,
        "secured pair answers a CURVE client": server_sequence(
            ctx, secured.port, 2.0, secured.security
        )
        is not None,
        "secured pair refuses a write outside the permitted prefixes": denied,
        "CURVE ceiling refuses a plain client": server_sequence(ctx, ceiling.port, 1.0)
        is None,
    }


def summarize(
    floods: dict[str, list[dict[str, Any]]], ladders: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Per kind the best flood (least CPU) and ladder (highest rate), every
    run's figures, and the secured/plain ratio of each back-to-back pair."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        best = min(floods[kind], key=lambda r: r["cpu_us"])
        top = max(ladders[kind], key=lambda r: r["rate"] or 0)
        out[kind] = {
            "flood": best,
            "lossfree": top,
            "runs_cpu_us": [r["cpu_us"] for r in floods[kind]],
            "runs_backup_cpu_us": [
                r["backup_cpu_us"] for r in floods[kind] if "backup_cpu_us" in r
            ],
            "runs_rate": [r["rate"] for r in floods[kind]],
            "runs_lossfree": [r["rate"] for r in ladders[kind]],
        }
    out["paired"] = {
        "cpu": [
            s["cpu_us"] / p["cpu_us"]
            for p, s in zip(floods["plain"], floods["secured"], strict=True)
        ],
        "lossfree": [
            s["rate"] / p["rate"] if s["rate"] and p["rate"] else None
            for p, s in zip(ladders["plain"], ladders["secured"], strict=True)
        ],
    }
    return out


def ratio(result: dict[str, Any], setup: str, *path: str) -> float | None:
    plain = dig(result, setup, "plain", *path)
    secured = dig(result, setup, "secured", *path)
    numbers = [v for v in (plain, secured) if isinstance(v, int | float)]
    if len(numbers) < 2 or any(isinstance(v, bool) for v in numbers):
        return None
    return secured / plain if plain else None


def targets(result: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's target: the secured pair's loss-free rate >= 0.9x plain's."""
    if not result:
        return []
    r = ratio(result, "pair", "lossfree", "rate")
    return [
        {
            "target": "secured pair loss-free rate vs plain",
            "value": r,
            "limit": f">= {TARGET}x",
            "status": status(None if r is None else r >= TARGET),
        }
    ]


def render(result: dict[str, Any] | None) -> list[str]:
    """The table: plain | secured | ratio, for the ceiling and the pair."""
    if not result:
        return []
    lines = [
        "",
        "i. Secured (CURVE on every socket, ZAP, permissions) vs plain, same run",
        f"{'':46}  {'plain':>17}  {'secured':>17}  {'ratio':>8}",
    ]

    def row(
        label: str, setup: str, path: tuple[str, ...], spec: str, unit: str = ""
    ) -> None:
        values = [dig(result, setup, kind, *path) for kind in KINDS]
        shown = [
            "-" if v is None else str(v) if isinstance(v, bool) else f"{v:{spec}}{unit}"
            for v in values
        ]
        r = ratio(result, setup, *path)
        lines.append(
            f"{label:46}  {shown[0]:>17}  {shown[1]:>17}  "
            f"{'' if r is None else format(r, '.2f') + 'x':>8}"
        )

    for setup in SETUPS:
        lines.append(f"  {LABELS[setup]}")
        row("    flood, 1 subscriber: updates/s", setup, ("flood", "rate"), ",.0f")
        cpu_label = "active's CPU" if setup == "pair" else "server CPU"
        row(
            f"    flood: {cpu_label} per update",
            setup,
            ("flood", "cpu_us"),
            ".1f",
            " us",
        )
        main = "      of which main thread (rest: libzmq)"
        row(main, setup, ("flood", "main_cpu_us"), ".1f", " us")
        if setup == "pair":
            row(
                "    flood: backup's CPU per update",
                setup,
                ("flood", "backup_cpu_us"),
                ".1f",
                " us",
            )
            row(main, setup, ("flood", "backup_main_cpu_us"), ".1f", " us")
        row(
            "    flood: writers' and subscriber's CPU",
            setup,
            ("flood", "load_cpu_us"),
            ".1f",
            " us",
        )
        row("    flood: lost", setup, ("flood", "lost_max"), ",")
        row(
            "    flood: generator saturated?",
            setup,
            ("flood", "generator_saturated"),
            "",
        )
        row("    highest loss-free rate", setup, ("lossfree", "rate"), ",")
        row(
            "    ... generator saturated?",
            setup,
            ("lossfree", "generator_saturated"),
            "",
        )
        paired = dig(result, setup, "paired") or {}
        lines.append(
            "      secured/plain of each back-to-back pair: CPU "
            + ", ".join(f"{r:.2f}" for r in paired.get("cpu", []))
            + "; loss-free rate "
            + ", ".join(
                "-" if r is None else f"{r:.2f}" for r in paired.get("lossfree", [])
            )
        )
        for kind in KINDS:
            rates = dig(result, setup, kind, "runs_lossfree") or []
            lines.append(
                f"      {kind} loss-free rate of each round: "
                + ", ".join("-" if r is None else f"{r:,}" for r in rates)
            )
    for t in targets(result):
        value = t["value"]
        shown = "-" if value is None else f"{value:.2f}x"
        lines.append(
            f"  target: {t['target']} {shown} ({t['limit']}): {t['status'] or 'n/a'}"
        )
    for name, ok in (result.get("checks") or {}).items():
        lines.append(f"  check: {name}: {'yes' if ok else 'NO'}")
    return lines
