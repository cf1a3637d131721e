"""The deterministic simulation (tests/sim/world.py): 500 seeds, exact
replay, and the known bugs it must catch."""

from __future__ import annotations

import multiprocessing

import pytest

from tests.sim.mutants import MUTANTS
from tests.sim.world import Result, run

SEEDS = 500


def test_every_invariant_holds_for_the_first_500_seeds() -> None:
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results: list[Result] = pool.map(run, range(SEEDS), chunksize=10)
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(
        [r.summary() for r in failed]
        + [f"replay one with: python tools/sim.py --seed {failed[0].seed}"]
    )
    # the schedules do exercise the faults, and the writers are heard
    assert sum(len(r.faults) for r in results) > 10 * SEEDS
    assert sum(r.confirmed for r in results) > 0.95 * sum(r.writes for r in results)


def test_a_seed_replays_exactly() -> None:
    first, second = run(7), run(7)
    assert first.trace == second.trace
    assert first.digest() == second.digest()
    assert run(8).trace != first.trace


# Each known bug, put back (tests/sim/mutants.py), and the first seed that
# catches it: python tools/sim.py --seeds 1000 --mutant NAME --stop (since
# servers keep their maps on disk, confirmed-before-live is first caught at
# 782).
CAUGHT = {
    # bugs that the issue "Nothing lost, nothing stale, nothing twice" fixed
    "backlog-dropped": 251,  # case 1
    "lineage-ignored": 372,  # case 2
    "window-ignored": 0,  # case 3
    "subtree-gaps-ignored": 67,  # case 4
    "split-writes-discarded": 183,  # case 6
    "confirmed-before-live": 782,  # the replica core's confirmation rule
    # bugs the simulation found (the seed is each one's regression test; the
    # fixes of three more, found in earlier versions of the schedule, are not
    # caught within 500 seeds now and have core tests instead:
    # expiry-not-handed-over, branch-ignored and pending-replayed-over-newer)
    "timer-float": 5,
    "window-not-handed-over": 53,
    "backoff-drops-the-stream": 251,
    "retracked-from-zero": 198,  # again, since a passive reads subscriptions
}


@pytest.mark.parametrize("mutant", sorted(CAUGHT))
def test_the_simulation_catches_a_known_bug(mutant: str) -> None:
    seed = CAUGHT[mutant]
    assert run(seed).ok
    with MUTANTS[mutant]():
        result = run(seed)
    assert not result.ok, f"{mutant} went unnoticed: {result.summary()}"
