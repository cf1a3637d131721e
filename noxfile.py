"""Sessions: lint, typecheck, tests, bench, lateness, subtrees, sim, fuzz,
chaos and console (``nox -s bench -- --quick``)."""

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[metrics]", "mypy")  # metrics.py is typed against it
    session.run("mypy", "--strict", "trioclone")


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "tools/bench.py", *session.posargs)


@nox.session
def lateness(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "tools/lateness.py", *session.posargs)


@nox.session
def subtrees(session: nox.Session) -> None:
    session.install("-e", ".")
    session.run("python", "tools/subtree_cost.py", *session.posargs)


@nox.session
def sim(session: nox.Session) -> None:
    """The deterministic simulation: ``nox -s sim -- --seeds 20000``."""
    session.install("-e", ".[test]")
    session.run("python", "tools/sim.py", *session.posargs)


@nox.session
def fuzz(session: nox.Session) -> None:
    """Live fuzzing of a real server pair, ``TRIOCLONE_FUZZ_EXAMPLES`` examples
    (5,000 unless set): ``nox -s fuzz``."""
    session.install("-e", ".[test]")
    examples = os.environ.get("TRIOCLONE_FUZZ_EXAMPLES", "5000")
    session.run(
        "pytest",
        "tests/integration/test_fuzz_live.py",
        "-s",
        *session.posargs,
        env={"TRIOCLONE_FUZZ_EXAMPLES": examples},
    )


@nox.session
def chaos(session: nox.Session) -> None:
    """SIGKILL and restart a real pair under load, then check what it kept:
    ``nox -s chaos -- --cycles 50 --seed 7``."""
    session.install("-e", ".")
    session.run("python", "tools/chaos.py", *session.posargs)


@nox.session
def console(session: nox.Session) -> None:
    """The web console under load in a real Chromium (Debian's chromium and
    chromium-driver): ``nox -s console -- --out tools/results/console-X.json``."""
    session.install("-e", ".[test]")
    session.run("python", "tools/console_load.py", *session.posargs)
