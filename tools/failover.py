"""Measure Model Six failover on 127.0.0.1: SIGKILL the primary mid-stream.

Each run starts a primary and a backup process (free ports on 127.0.0.1),
streams distinct keys to both collectors every ~2 ms while a subscriber
records what the primary publishes, SIGKILLs the primary after 1 s, and
votes on the backup every second (as a failing-over client) until it holds
a full snapshot.  Reported per timing setting: the failover time (SIGKILL
to full snapshot) and the updates lost (published by the primary but not
in the backup's map, and written after the kill but never applied).

    python tools/failover.py [--runs N] [--json]

Every process it starts is stopped (by PID) before it exits.  It reuses the
integration tests' helpers (tests/integration/procs.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.procs import (
    DEFAULT_TIMING,
    FAST_TIMING,
    Pair,
    Processes,
    request_snapshot,
)

CONFIGS = {
    "default": DEFAULT_TIMING,
    "heartbeat-0.2": FAST_TIMING,
}


def one_run(timing: tuple[str, ...]) -> dict[str, Any]:
    """One pair (each server's data folder in a temporary one), one kill."""
    with (
        tempfile.TemporaryDirectory(prefix="trioclone-failover-") as tmp,
        Processes(Path(tmp)) as procs,
        Pair(procs, timing) as pair,
    ):
        primary, _backup = pair.start()
        pair.probe(pair.sub_primary)
        run = pair.stream_and_kill(primary, vote_port=pair.p2, before=1.0, after=0.5)
        if run.snapshot is None or run.failover is None:
            return {"error": f"no snapshot from the backup after {run.votes} votes"}
        time.sleep(0.5)
        final = request_snapshot(pair.ctx, pair.p2) or run.snapshot
        values = final.values()
        return {
            "failover_s": round(run.failover, 3),
            "votes": run.votes,
            "published_by_primary": len(run.from_primary),
            "lost_published": len(run.lost(run.snapshot)),
            "written_after_kill": len(run.written_after_kill),
            "lost_after_kill": sum(k not in values for k in run.written_after_kill),
            "lost_any": sum(values.get(k) != v for k, v in pair.known.items()),
        }


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["failover_s"] for r in runs if "failover_s" in r]
    summary: dict[str, Any] = {
        "config": name,
        "args": list(CONFIGS[name]),
        "runs": runs,
        "errors": sum("error" in r for r in runs),
        "lost_published": sum(r.get("lost_published", 0) for r in runs),
        "lost_after_kill": sum(r.get("lost_after_kill", 0) for r in runs),
        "lost_any": sum(r.get("lost_any", 0) for r in runs),
    }
    if times:
        summary["failover_s"] = {
            "min": min(times),
            "median": statistics.median(times),
            "max": max(times),
        }
    return summary


def show(summary: dict[str, Any]) -> None:
    args = " ".join(summary["args"]) or "(defaults: --heartbeat 1.0 --hugz 1.0)"
    print(f"{summary['config']}: {args}")
    if "failover_s" in summary:
        f = summary["failover_s"]
        print(
            f"  failover  min {f['min']:.3f} s  median {f['median']:.3f} s"
            f"  max {f['max']:.3f} s  over {len(summary['runs'])} runs"
        )
    for i, run in enumerate(summary["runs"], 1):
        if "error" in run:
            print(f"  run {i}: ERROR {run['error']}")
            continue
        print(
            f"  run {i}: {run['failover_s']:.3f} s, {run['votes']} votes, "
            f"{run['published_by_primary']} published by the primary, "
            f"{run['lost_published']} lost; {run['written_after_kill']} written "
            f"after the kill, {run['lost_after_kill']} lost; "
            f"{run['lost_any']} of all writes lost"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", "-n", type=int, default=3, help="runs per setting")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    summaries = []
    for name, timing in CONFIGS.items():
        runs = []
        for _ in range(args.runs):
            try:
                runs.append(one_run(timing))
            except (TimeoutError, AssertionError) as exc:
                runs.append({"error": f"{type(exc).__name__}: {exc}"})
        summaries.append(summarise(name, runs))
    if args.json:
        print(json.dumps({"host": "127.0.0.1", "settings": summaries}, indent=2))
    else:
        for summary in summaries:
            show(summary)
    bad = any(s["errors"] or s["lost_any"] for s in summaries)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
