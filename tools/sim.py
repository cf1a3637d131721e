"""Run the deterministic simulation (tests/sim/) over many seeds, or one.

    python tools/sim.py --seed 42           # replay one seed, print its trace
    python tools/sim.py --seeds 20000       # seeds 0..19999, on every core
    python tools/sim.py --seeds 500 --mutant backlog-dropped
                                            # put a known bug back: must fail

Exit status: 0 if every seed kept every invariant, 1 otherwise (each failing
seed is printed with the invariants it broke), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.sim.mutants import MUTANTS
from tests.sim.world import Result, run

_mutant: str | None = None


def _init(mutant: str | None) -> None:
    global _mutant
    _mutant = mutant


def one(seed: int) -> Result:
    patch = MUTANTS[_mutant]() if _mutant else contextlib.nullcontext()
    with patch:
        return run(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="replay this seed and print its trace")
    which.add_argument("--seeds", type=int, default=500, help="how many seeds (500)")
    parser.add_argument("--start", type=int, default=0, help="the first seed (0)")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="processes (all cores)"
    )
    parser.add_argument(
        "--mutant", choices=sorted(MUTANTS), help="put a known bug back first"
    )
    parser.add_argument(
        "--stop", action="store_true", help="stop at the first failing seed"
    )
    args = parser.parse_args(argv)
    if args.seed is not None:
        _init(args.mutant)
        result = one(args.seed)
        print("\n".join(result.trace))
        print(result.summary())
        return 0 if result.ok else 1
    if args.seeds < 1 or args.jobs < 1 or args.start < 0:
        parser.error("--seeds and --jobs must be at least 1, --start at least 0")
    seeds = range(args.start, args.start + args.seeds)
    started, failed, faults, writes, confirmed = time.perf_counter(), [], 0, 0, 0
    with multiprocessing.get_context("spawn").Pool(
        args.jobs, _init, (args.mutant,)
    ) as pool:
        for result in pool.imap(one, seeds, chunksize=8):
            faults += len(result.faults)
            writes += result.writes
            confirmed += result.confirmed
            if not result.ok:
                failed.append(result.seed)
                print(result.summary(), flush=True)
                if args.stop:
                    pool.terminate()
                    break
    elapsed = time.perf_counter() - started
    print(
        f"{args.seeds} seeds from {args.start}"
        + (f" with mutant {args.mutant}" if args.mutant else "")
        + f": {len(failed)} failed, {faults} faults, {confirmed}/{writes} writes "
        f"confirmed, {elapsed:.1f} s on {args.jobs} processes"
    )
    if failed:
        print(f"replay one with: python tools/sim.py --seed {failed[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
