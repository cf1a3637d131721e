"""The web console under load, in a real headless Chromium: run
``tests/browser/test_console_load.py`` (10,000 keys, updates at each rate to
random keys, while a page shows 500 of them) and keep its figures.

``python tools/console_load.py --out tools/results/console-DATE-COMMIT.json``
(``nox -s console``).  Needs Debian's ``chromium`` and ``chromium-driver``.
Writes the JSON (the commit, the machine's CPUs and load, one run per rate)
and a table beside it as ``.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (
    ("rate_offered", "offered/s"),
    ("updates_sent", "sent"),
    ("lag_updates_p50", "lag p50"),
    ("lag_updates_p99", "lag p99"),
    ("lag_seconds_p99", "p99 s"),
    ("lag_updates_max", "lag max"),
    ("caught_up_after_s", "caught up s"),
    ("first_listing_s", "first listing s"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--seconds", type=float, default=30.0, help="per rate")
    parser.add_argument("--rates", default="500,1000,2000", help="updates/s each")
    args = parser.parse_args()
    scratch = args.out.with_suffix(".runs.json")
    scratch.unlink(missing_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    load_before = os.getloadavg()
    env = {
        **os.environ,
        "TRIOCLONE_CONSOLE_REPORT": str(scratch),
        "TRIOCLONE_CONSOLE_SECONDS": str(args.seconds),
        "TRIOCLONE_CONSOLE_RATES": args.rates,
    }
    test = "tests/browser/test_console_load.py"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
    )
    runs = json.loads(scratch.read_text()) if scratch.exists() else []
    listing = listing_cost()
    scratch.unlink(missing_ok=True)
    report = {
        "commit": commit,
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "tests_passed": done.returncode == 0,
        "runs": runs,
        "listing_ms": listing,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = render(report)
    args.out.with_suffix(".txt").write_text(table + "\n")
    print(table)
    return done.returncode


def listing_cost() -> dict[str, float]:
    """Milliseconds to list the root of a map of N keys (in 100 folders), as
    ``/api/tree`` does on the console's loop (the client's ``view`` decodes
    the keys, ``list_prefix`` groups them): the best of three."""
    from trioclone.client.events import key_text
    from trioclone.console.listing import list_prefix

    cost = {}
    for size in (10_000, 100_000, 1_000_000):
        keys = [b"/svc/%d/k%07d" % (n % 100, n) for n in range(size)]
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            list_prefix([key_text(k) for k in keys if k.startswith(b"")], "")
            best = min(best, time.perf_counter() - began)
        cost[str(size)] = round(best * 1000, 1)
    return cost


def render(report: dict[str, object]) -> str:
    runs = report["runs"]
    assert isinstance(runs, list)
    lines = [
        f"console under load, commit {report['commit']}, {report['cpus']} CPUs, "
        f"load {report['load_before']} before, {report['load_after']} after; "
        f"the test's checks {'passed' if report['tests_passed'] else 'FAILED'}",
        "10,000 keys; updates to random keys; a page shows 500 of them; lag = "
        "updates the page trails the writes by (sampled every 50 ms)",
        "  ".join(f"{title:>15}" for _, title in COLUMNS),
    ]
    for run in runs:
        lines.append("  ".join(f"{run[key]!s:>15}" for key, _ in COLUMNS))
    listing = report["listing_ms"]
    assert isinstance(listing, dict)
    lines.append(
        "listing the root of a map (ms, on the console's loop): "
        + ", ".join(f"{int(n):,} keys {ms}" for n, ms in listing.items())
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
