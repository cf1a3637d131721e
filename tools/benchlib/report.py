"""The results table (ceiling | trioclone | ratio | target | PASS/MISS) and targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Results = dict[str, Any]

KINDS = ("ceiling", "trioclone")


def fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    return f"{value:{spec}}{unit}"


def ratio(trioclone: Any, ceiling: Any) -> float | None:
    if not isinstance(trioclone, int | float) or not isinstance(ceiling, int | float):
        return None
    if ceiling == 0:
        return None
    return float(trioclone) / float(ceiling)


def dig(tree: Any, *path: str) -> Any:
    for step in path:
        if not isinstance(tree, dict) or step not in tree:
            return None
        tree = tree[step]
    return tree


class Table:
    COLUMNS = (46, 17, 17, 8, 14, 5)

    def __init__(self) -> None:
        self.lines: list[str] = []

    def title(self, text: str) -> None:
        self.lines.append("")
        self.lines.append(text)

    def row(self, *cells: str) -> None:
        label, *rest = cells
        widths = self.COLUMNS
        parts = [label.ljust(widths[0])]
        for cell, width in zip(rest, widths[1:], strict=False):
            parts.append(cell.rjust(width))
        self.lines.append("  ".join(parts).rstrip())

    def compare(
        self,
        label: str,
        pair: dict[str, Any] | None,
        key: Callable[[Any], Any],
        *,
        spec: str = ",.0f",
        unit: str = "",
        target: str = "",
        status: str = "",
        show_ratio: bool = True,
    ) -> None:
        pair = pair or {}
        values = [
            key(pair.get(kind)) if pair.get(kind) is not None else None
            for kind in KINDS
        ]
        r = ratio(values[1], values[0]) if show_ratio else None
        self.row(
            label,
            *(fmt(v, spec, unit) for v in values),
            fmt(r, ".2f", "x") if r is not None else "",
            target,
            status,
        )

    def render(self) -> str:
        return "\n".join(self.lines)


def figure(value: Any) -> str:
    """A measured figure, shortly: thousands separated, else 3 digits."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return fmt(value)


def status(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def targets(results: Results) -> list[dict[str, Any]]:
    """Each target: its name, the measured value, the limit, PASS/MISS."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: str, ok: bool | None) -> None:
        out.append(
            {"target": name, "value": value, "limit": limit, "status": status(ok)}
        )

    for target in ceiling_targets(results):
        out.append(target)

    for settings, limit in (("default", 2.5), ("fast", 1.0)):
        took = dig(results, "failover", settings, "seconds")
        add(
            f"failover, {settings} settings (s)",
            took,
            f"< {limit} s",
            None if took is None else took < limit,
        )
        lost = dig(results, "failover", settings, "lost")
        add(
            f"failover, {settings}: lost updates",
            lost,
            "= 0",
            None if lost is None else lost == 0,
        )

    changes = dig(results, "failover", "idle", "backup_changes")
    if changes is not None:
        add("idle fast pair: backup state changes", changes, "= 0", changes == 0)

    for keys, per_key in sorted(
        (int(n), dig(m, "bytes_per_key"))
        for n, m in (dig(results, "memory", "trioclone") or {}).items()
        if n.isdigit()
    ):
        add(
            f"memory at {keys:,} keys (B/key)",
            per_key,
            "< 200 B/key",
            None if per_key is None else per_key < 200,
        )
    return out


#: Issue 12's targets against the ceiling (same run, medians of alternating
#: rounds): name, where each side's figure is, the limit on the ratio, and
#: whether a higher ratio is better.
CEILING_TARGETS = (
    ("loss-free rate", ("lossfree",), "rate", 0.9, True),
    (
        "CPU per update at each one's loss-free rate",
        ("lossfree",),
        "cpu_us",
        1.15,
        False,
    ),
    ("p99 latency at 1,000 updates/s", ("latency", "1000"), "p99_ms", 1.3, False),
    ("100k-key snapshot time (exact)", ("snapshots", "100000"), "full", 1.2, False),
)


def ceiling_targets(results: Results) -> list[dict[str, Any]]:
    """Each of issue 12's targets: trioclone / ceiling, limit, PASS/MISS,
    and both sides' figures."""
    out = []
    for name, where, field, limit, higher in CEILING_TARGETS:
        pair = dig(results, *where) or {}
        values = []
        for kind in KINDS:
            value = dig(pair, kind, field)
            if field == "full":  # a snapshot: its time, if every KVSYNC came
                value = dig(value, "seconds") if dig(value, "complete") else None
            values.append(value)
        c, t = values
        r = ratio(t, c)
        ok = None if r is None else (r >= limit if higher else r <= limit)
        if field == "full" and dig(pair, "trioclone", "full") and t is None:
            ok = False  # trioclone's snapshot was not exact
        out.append(
            {
                "target": f"{name} vs ceiling",
                "value": r,
                "limit": f"{'>=' if higher else '<='} {limit}x",
                "status": status(ok),
                "ceiling": c,
                "trioclone": t,
            }
        )
    return out


def render(results: Results) -> str:
    table = Table()
    mode = results.get("mode", "?")
    table.lines.append(
        f"trioclone benchmark ({mode} mode) {results.get('started', '')}; "
        f"trioclone {results.get('trioclone_commit', '?')}; "
        f"{results.get('cpus')} CPUs; load average {results.get('load_before')} before, "
        f"{results.get('load_after')} after; {results.get('elapsed', 0):.0f} s"
    )
    table.row("", "ceiling", "trioclone", "ratio", "target", "")
    throughput(table, results)
    lossfree(table, results)
    latency(table, results)
    snapshots(table, results)
    failover(table, results)
    memory(table, results)
    growth(table, results)
    table.title("Targets against the ceiling (same run, medians of alternating rounds)")
    for t in results.get("targets", []):
        if "ceiling" not in t:
            continue
        shown = "-" if t["value"] is None else f"{t['value']:.2f}x"
        table.lines.append(
            f"  target: {t['target']} {t['limit']}; measured: {shown} "
            f"(trioclone {figure(t['trioclone'])}, ceiling "
            f"{figure(t['ceiling'])}): "
            f"{ {'PASS': 'met', 'MISS': 'missed'}.get(t['status'], 'n/a') }"
        )
    table.title("Targets")
    for t in results.get("targets", []):
        value = t["value"]
        shown = fmt(value, ".2f") if isinstance(value, float) else fmt(value, ",")
        table.row(f"  {t['target']}", "", shown, "", t["limit"], t["status"] or "n/a")
    errors = results.get("errors") or {}
    if errors:
        table.title("Errors (sections that did not complete)")
        for name, text in errors.items():
            table.lines.append(f"  {name}: {text.strip().splitlines()[-1]}")
    return table.render()


def throughput(table: Table, results: Results) -> None:
    runs = results.get("throughput") or {}
    for subs, pair in sorted(runs.items(), key=lambda kv: int(kv[0])):
        updates = dig(pair, "trioclone", "updates")
        table.title(
            f"a. Flood, {subs} subscriber(s), {fmt(updates, ',')} updates, 10k keys stored"
        )
        flood_rows(table, pair)
    large = results.get("throughput_large")
    if large:
        keys = dig(large, "trioclone", "keys_stored")
        table.title(f"a. Flood, 1 subscriber, {fmt(keys, ',')} keys stored (growth)")
        flood_rows(table, large, target=False)


def flood_rows(table: Table, pair: dict[str, Any], *, target: bool = True) -> None:
    runs = len(dig(pair, "trioclone", "runs_rate") or [])
    table.compare(
        f"  updates/s received (wall; median of {runs})", pair, lambda p: p["rate"]
    )
    table.compare(
        "  server CPU per update (/proc, whole run)",
        pair,
        lambda p: p["cpu_us"],
        spec=".1f",
        unit=" us",
    )
    paired = pair.get("paired_cpu_ratios") or []
    if len(paired) > 1:
        table.lines.append(
            "    CPU ratio of each back-to-back pair of runs: "
            + ", ".join(f"{r:.2f}" for r in paired)
        )
    table.compare(
        "  lost (max per subscriber)", pair, lambda p: p["lost_max"], show_ratio=False
    )
    table.compare(
        "  writers' send rate", pair, lambda p: p["writer_rate"], show_ratio=False
    )
    table.compare(
        "  harness saturated? (writers or subscribers)",
        pair,
        lambda p: p.get("harness_saturated"),
        show_ratio=False,
    )
    table.compare(
        "  every CPU busy? (server + harness > 90%)",
        pair,
        lambda p: p.get("machine_saturated"),
        show_ratio=False,
    )


def lossfree(table: Table, results: Results) -> None:
    pair = results.get("lossfree")
    if not pair:
        return
    duration = dig(pair, "trioclone", "duration")
    writers = dig(pair, "trioclone", "writers")
    rounds = len(dig(pair, "trioclone", "runs_rate") or [])
    table.title(
        f"b. Highest loss-free rate, 1 subscriber, {fmt(duration, '.0f')} s steps, "
        f"{fmt(writers, 'd')} writer processes; median of {rounds} rounds"
    )
    r = ratio(dig(pair, "trioclone", "rate"), dig(pair, "ceiling", "rate"))
    table.compare(
        "  offered rate with every update on time",
        pair,
        lambda p: p["rate"],
        target=">= 0.9x",
        status=status(None if r is None else r >= 0.9),
    )
    r = ratio(dig(pair, "trioclone", "cpu_us"), dig(pair, "ceiling", "cpu_us"))
    table.compare(
        "  server CPU per update at that rate",
        pair,
        lambda p: p.get("cpu_us"),
        spec=".1f",
        unit=" us",
        target="<= 1.15x",
        status=status(None if r is None else r <= 1.15),
    )
    table.compare(
        "  hit the top of the ladder?", pair, lambda p: p["capped"], show_ratio=False
    )
    table.compare(
        "  harness saturated? (writers or subscriber)",
        pair,
        lambda p: p.get("harness_saturated"),
        show_ratio=False,
    )
    for kind in KINDS:
        rates = dig(pair, kind, "runs_rate") or []
        cpus = dig(pair, kind, "runs_cpu_us") or []
        table.lines.append(
            f"    {kind} each round: "
            + ", ".join(
                f"{fmt(r, ',')}/s ({fmt(c, '.1f')} us)"
                for r, c in zip(rates, cpus, strict=False)
            )
        )
        steps = dig(pair, kind, "steps") or []
        text = ", ".join(step_text(s) for s in steps)
        table.lines.append(f"    {kind} steps of the last round: {text}")


def step_text(step: dict[str, Any]) -> str:
    text = f"{step['offered'] / 1000:g}k"
    if not step["ok"]:
        text += f"(lost {step['lost']}, lag {step['lag']:.2f} s)"
    if step.get("harness_saturated"):
        text += "(harness)"
    return text


def latency(table: Table, results: Results) -> None:
    runs = results.get("latency") or {}
    for name, pair in runs.items():
        rate = dig(pair, "trioclone", "rate")
        rounds = len(dig(pair, "trioclone", "runs") or [])
        table.title(
            f"c. Latency KVSET -> KVPUB at {fmt(rate, ',.0f')}/s; "
            f"p50, p99: median of {rounds} rounds"
        )
        r = ratio(dig(pair, "trioclone", "p99_ms"), dig(pair, "ceiling", "p99_ms"))
        ok = (r <= 1.3) if (name == "1000" and r is not None) else None
        table.compare("  p50", pair, lambda p: p.get("p50_ms"), spec=".3f", unit=" ms")
        table.compare(
            "  p99",
            pair,
            lambda p: p.get("p99_ms"),
            spec=".3f",
            unit=" ms",
            target="<= 1.3x" if name == "1000" else "",
            status=status(ok),
        )
        table.compare("  max", pair, lambda p: p.get("max_ms"), spec=".3f", unit=" ms")
        table.compare("  lost", pair, lambda p: p.get("lost"), show_ratio=False)
        for kind in KINDS:
            each = dig(pair, kind, "runs") or []
            table.lines.append(
                f"    {kind} p99 of each round: "
                + ", ".join(f"{e['p99_ms']:.3f}" for e in each)
                + " ms"
            )
    late = results.get("timer_lateness")
    if late:
        table.lines.append(
            "  (this machine now: a 1 ms sleep wakes late by "
            f"p50 {late['p50_ms']:.3f} / p99 {late['p99_ms']:.3f} / "
            f"max {late['max_ms']:.3f} ms)"
        )


def snapshots(table: Table, results: Results) -> None:
    runs = results.get("snapshots") or {}
    for keys, pair in sorted(runs.items(), key=lambda kv: int(kv[0])):
        table.title(f"d. Snapshots, {int(keys):,} keys")
        full_ok = None
        if keys == "100000":
            r = ratio(
                dig(pair, "trioclone", "full", "seconds"),
                dig(pair, "ceiling", "full", "seconds"),
            )
            full_ok = None if r is None else r <= 1.2
        table.compare(
            "  full snapshot, ICANHAZ -> KTHXBAI",
            pair,
            lambda p: dig(p, "full", "seconds"),
            spec=".3f",
            unit=" s",
            target="<= 1.2x" if full_ok is not None else "",
            status=status(full_ok),
        )
        paired = pair.get("paired_full_ratios") or []
        if len(paired) > 1:
            table.lines.append(
                "    time ratio of each back-to-back pair: "
                + ", ".join(f"{r:.2f}" for r in paired)
                + " (the table shows each side's median)"
            )
        table.compare(
            "  ... every KVSYNC arrived?",
            pair,
            lambda p: dig(p, "full", "complete"),
            show_ratio=False,
        )
        table.compare(
            "  /hot/ subtree (1%)",
            pair,
            lambda p: dig(p, "subtree", "seconds"),
            spec=".4f",
            unit=" s",
        )
        table.compare(
            "  ... every KVSYNC arrived?",
            pair,
            lambda p: dig(p, "subtree", "complete"),
            show_ratio=False,
        )
        if dig(pair, "trioclone", "fifty") or dig(pair, "ceiling", "fifty"):
            subtree = dig(pair, "trioclone", "fifty", "subtree") or "full"
            table.compare(
                f"  50 clients at once ({subtree or 'full'}): last KTHXBAI",
                pair,
                lambda p: dig(p, "fifty", "seconds"),
                spec=".2f",
                unit=" s",
            )
            table.compare(
                "  ... all 50 complete?",
                pair,
                lambda p: dig(p, "fifty", "complete"),
                show_ratio=False,
            )
        if dig(pair, "trioclone", "slow_reader"):
            table.compare(
                "  slow reader (0.3 s pause per 10k): time",
                pair,
                lambda p: dig(p, "slow_reader", "seconds"),
                spec=".2f",
                unit=" s",
            )
            table.compare(
                "  ... got every message?",
                pair,
                lambda p: dig(p, "slow_reader", "complete"),
                show_ratio=False,
            )


def failover(table: Table, results: Results) -> None:
    runs = results.get("failover") or {}
    if not runs:
        return
    table.title(
        "e. Failover of a trioclone pair (writer ~1,000/s to both; vote every 0.2 s)"
    )
    for settings, limit in (("default", 2.5), ("fast", 1.0)):
        run = runs.get(settings)
        if not run:
            continue
        took = run.get("seconds")
        table.row(
            f"  {settings}: SIGKILL primary -> backup KTHXBAI",
            "",
            fmt(took, ".2f", " s"),
            "",
            f"< {limit} s",
            status(None if took is None else took < limit),
        )
        lost = run.get("lost")
        table.row(
            f"  {settings}: published keys missing at backup",
            "",
            f"{fmt(lost, ',')} of {fmt(run.get('published_before_kill'), ',')}",
            "",
            "= 0",
            status(None if lost is None else lost == 0),
        )
    idle = runs.get("idle")
    if idle:
        changes = idle.get("backup_changes")
        table.row(
            f"  idle fast pair, {idle['seconds']:.0f} s: backup state changes",
            "",
            fmt(changes, ","),
            "",
            "= 0",
            status(changes == 0 if changes is not None else None),
        )


def memory(table: Table, results: Results) -> None:
    pair = results.get("memory")
    if not pair:
        return
    table.title("f. Memory (VmRSS), 16-byte keys, 100-byte values")
    table.compare(
        "  empty server RSS",
        pair,
        lambda p: p.get("empty", 0) / 2**20,
        spec=".1f",
        unit=" MiB",
    )
    sizes = sorted(
        {k for kind in KINDS for k in (pair.get(kind) or {}) if k.isdigit()}, key=int
    )
    for keys in sizes:
        per_key = dig(pair, "trioclone", keys, "bytes_per_key")
        table.compare(
            f"  RSS with {int(keys):,} keys",
            pair,
            lambda p, k=keys: dig(p, k, "rss") / 2**20 if dig(p, k, "rss") else None,
            spec=".1f",
            unit=" MiB",
        )
        table.compare(
            "  ... bytes per key beyond key and value",
            pair,
            lambda p, k=keys: dig(p, k, "bytes_per_key"),
            spec=",.0f",
            unit=" B",
            target="< 200 B/key",
            status=status(None if per_key is None else per_key < 200),
        )


def growth(table: Table, results: Results) -> None:
    rows = results.get("growth") or {}
    if not rows:
        return
    table.title("g. Growth")
    for label, pair in rows.items():
        table.lines.append(f"  {label}")
        for kind in KINDS:
            table.lines.append(f"    {kind:<10} {pair.get(kind) or '-'}")
