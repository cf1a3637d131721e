"""What subtree heartbeats cost a server, measured in-process on its core.

    python tools/subtree_cost.py [--quick] [--out tools/results/subtree-cost-....json]

A subtree client can only notice a missed update because the server tracks
the prefixes clients subscribe to and publishes, with every HUGZ, one
subtree heartbeat per tracked prefix (trioclone/core/subtrees.py).  This
measures the price, on the same code the server runs:

* per update: ``ServerCore.collect`` (decode, repeat check, store, tracking)
  of 100-byte values under 0, 10, 100 and 1,000 tracked prefixes, and the
  tracker's own share (``Subtrees.published``), with the prefixes all of
  one length and spread over three lengths (the cost is one dict lookup
  per distinct length);
* per HUGZ interval: building the heartbeats, per tracked prefix, and
  their size on the wire.

Each figure is the best of several rounds (CPU time of this process), so
it is the cost of the work, not of whatever else the machine ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from trioclone.core.chp import SEQUENCE
from trioclone.core.server import ServerCore
from trioclone.core.subtrees import Subtrees

TRACKED = [0, 10, 100, 1000]


def prefixes(count: int, spread: bool) -> list[bytes]:
    """``count`` subscribed prefixes; with ``spread``, of three lengths."""
    if not spread:
        return [b"/svc/%04d/" % n for n in range(count)]
    shapes = [b"/s%d/", b"/svc/%04d/", b"/service/%06d/"]
    return [shapes[n % 3] % n for n in range(count)]


def keys(tracked: list[bytes], count: int) -> list[bytes]:
    """Keys of 16+ bytes, under the tracked prefixes (or not, if none)."""
    if not tracked:
        return [b"/svc/%04d/%06d" % (n % 1000, n) for n in range(count)]
    return [tracked[n % len(tracked)] + b"%06d" % n for n in range(count)]


def kvsets(keys: list[bytes]) -> list[list[bytes]]:
    body, zero = b"x" * 100, SEQUENCE.pack(0)
    return [[key, zero, os.urandom(16), b"", body] for key in keys]


def cpu() -> float:
    return time.process_time()


def collect_cost(tracked: list[bytes], updates: int, rounds: int) -> float:
    """Microseconds of CPU per ``ServerCore.collect``."""
    messages = kvsets(keys(tracked, updates))
    best = float("inf")
    for _ in range(rounds):
        core = ServerCore()
        core.start(0.0)
        for prefix in tracked:
            core.subtrees.on_subscription([b"\x01" + prefix])
        collect = core.collect
        started = cpu()
        for frames in messages:
            collect(frames, 1.0)
        best = min(best, cpu() - started)
    return best / updates * 1e6


def tracker_cost(tracked: list[bytes], updates: int, rounds: int) -> float:
    """Microseconds of CPU per ``Subtrees.published``."""
    subtrees = Subtrees()
    for prefix in tracked:
        subtrees.on_subscription([b"\x01" + prefix])
    names = keys(tracked, updates)
    published = subtrees.published
    best = float("inf")
    for _ in range(rounds):
        started = cpu()
        for sequence, key in enumerate(names, 1):
            published(key, sequence)
        best = min(best, cpu() - started)
    return best / updates * 1e6


def heartbeat_cost(tracked: list[bytes], rounds: int) -> tuple[float, float]:
    """Microseconds per tracked prefix to build the heartbeats, and bytes."""
    subtrees = Subtrees()
    for sequence, prefix in enumerate(tracked, 1):
        subtrees.on_subscription([b"\x01" + prefix])
        subtrees.published(prefix + b"k", 1_000_000 + sequence)
    best = float("inf")
    beats: list[list[bytes]] = []
    for _ in range(rounds):
        started = cpu()
        for _ in range(100):
            beats = subtrees.heartbeats()
        best = min(best, (cpu() - started) / 100)
    size = sum(len(frame) for beat in beats for frame in beat) / len(tracked)
    return best / len(tracked) * 1e6, size


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(quick: bool) -> dict[str, Any]:
    updates = 50_000 if quick else 200_000
    rounds = 3 if quick else 5
    rows = []
    for spread in (False, True):
        for count in TRACKED:
            tracked = prefixes(count, spread)
            row: dict[str, Any] = {
                "tracked": count,
                "lengths": len({len(p) for p in tracked}),
                "collect_us": round(collect_cost(tracked, updates, rounds), 2),
                "tracker_us": round(tracker_cost(tracked, updates, rounds), 3),
            }
            if count:
                per, size = heartbeat_cost(tracked, rounds)
                row["heartbeat_us_per_subtree"] = round(per, 3)
                row["heartbeat_bytes_per_subtree"] = round(size, 1)
            rows.append(row)
    return {
        "tool": "subtree_cost",
        "mode": "quick" if quick else "full",
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "updates": updates,
        "rounds": rounds,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"subtree heartbeat cost ({result['mode']} mode, commit {result['commit']}, "
        f"best of {result['rounds']} rounds of {result['updates']:,} updates)",
        "tracked  lengths  collect us/update  tracker us/update  "
        "heartbeat us/subtree  heartbeat B/subtree",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['tracked']:7d}  {row['lengths']:7d}  {row['collect_us']:17.2f}  "
            f"{row['tracker_us']:17.3f}  "
            f"{row.get('heartbeat_us_per_subtree', 0):20.3f}  "
            f"{row.get('heartbeat_bytes_per_subtree', 0):19.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller rounds")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    parser.add_argument("--out", type=Path, help="also write JSON here (and .txt)")
    args = parser.parse_args()
    result = measure(args.quick)
    text = table(result)
    print(json.dumps(result, indent=1) if args.json else text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
