"""``trioclone serve --pair``: two servers kept running like a process manager.

The supervisor runs as a real process, as do its children, on 127.0.0.1 and
free ports with the real clock.  Every wait is bounded, every test has a
hard time limit (disarmed before the processes are stopped), and every
process is stopped by PID at the end: the supervisor, then its children
(found in its log and in /proc) by ``Children.stop``; and a test fails if
one of them is still running after that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

import trioclone
from tests.integration.procs import (
    FAST_TIMING,
    HOST,
    Processes,
    ServerProcess,
    free_base_ports,
    free_ports,
    tcp,
    time_limit,
)
from trioclone.cli import Backoff, Supervisor, describe

STARTED = re.compile(r"started the (?P<role>primary|backup) server: pid (?P<pid>\d+)")
# The supervisor SIGKILLs a child that ignores SIGTERM this long (not an option).
SUPERVISOR_GRACE = Supervisor({}).grace

# --------------------------------------------------------------------------
# the back-off and the words of the log
# --------------------------------------------------------------------------


def test_backoff_doubles_on_quick_failures_up_to_the_cap() -> None:
    backoff = Backoff(first=1.0, cap=30.0, steady=10.0)
    delays = []
    delay = None
    for _ in range(8):
        delay = backoff.delay(delay, ran=0.2)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_backoff_starts_again_after_a_steady_run() -> None:
    backoff = Backoff(first=1.0, cap=30.0, steady=10.0)
    assert backoff.delay(16.0, ran=9.9) == 30.0
    assert backoff.delay(16.0, ran=10.0) == 1.0
    assert backoff.delay(None, ran=0.0) == 1.0


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (0, "exited with status 0"),
        (1, "exited with status 1"),
        (-signal.SIGKILL, "was killed by SIGKILL"),
        (-signal.SIGTERM, "was killed by SIGTERM"),
    ],
)
def test_describe(status: int, words: str) -> None:
    assert describe(status) == words


# --------------------------------------------------------------------------
# the supervisor with stand-in children (real processes, in this process)
# --------------------------------------------------------------------------


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "trioclone.pair"]


async def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``condition()`` every 20 ms (real clock) until it is true."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def run_until_signal(
    supervisor: Supervisor, ready: Callable[[], bool], signum: int
) -> int:
    """Run the supervisor; once ``ready()``, send this process ``signum``.
    What ``run`` returned (within 30 s, or trio.TooSlowError)."""
    code: list[int] = []

    async def run() -> None:
        code.append(await supervisor.run())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_until(ready)
            # the signal receiver is open: the supervisor started its children
            os.kill(os.getpid(), signum)
    assert len(code) == 1
    return code[0]


@pytest.mark.slow
async def test_supervisor_restarts_only_the_child_that_exited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioclone.pair")
    supervisor = Supervisor(
        {
            "steady": python("import time; time.sleep(60)"),
            "flaky": python("raise SystemExit(3)"),
        },
        backoff=Backoff(first=0.1, cap=0.4, steady=30.0),
    )

    def flaky_started_5_times() -> bool:
        return sum("started the flaky" in m for m in messages(caplog)) >= 5

    code = await run_until_signal(supervisor, flaky_started_5_times, signal.SIGTERM)
    assert code == 0
    log = messages(caplog)
    steady = [m for m in log if m.startswith("started the steady server")]
    assert len(steady) == 1  # never restarted: the flaky one does not stop it
    steady_pid = int(steady[0].split()[-1])
    assert not alive(steady_pid)
    assert (
        f"stopped the steady server (pid {steady_pid}): it was killed by SIGTERM" in log
    )
    flaky_exits = [m for m in log if m.startswith("the flaky server")]
    assert all("exited with status 3" in m for m in flaky_exits)
    delays = [m.split()[-2] for m in log if m.startswith("restarting the flaky")]
    assert delays[:4] == ["0.1", "0.2", "0.4", "0.4"]  # doubling up to the cap
    assert not any("restarting the steady" in m for m in log)
    assert "stopping the servers on SIGTERM" in log
    assert not any("giving up" in m for m in log)


@pytest.mark.slow
async def test_supervisor_gives_up_when_no_child_can_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trioclone.pair")
    supervisor = Supervisor(
        {"a": python("raise SystemExit(1)"), "b": python("raise SystemExit(1)")},
        backoff=Backoff(first=0.2, cap=1.0, steady=30.0),
    )
    with trio.fail_after(30):
        assert await supervisor.run() == 1
    log = messages(caplog)
    gave_up = log.index("no server could start (see the errors above); giving up")
    assert not any(m.startswith("restarting") for m in log[gave_up:])
    assert not any(m.startswith("started") for m in log[gave_up:])


@pytest.mark.slow
async def test_supervisor_kills_a_child_that_ignores_sigterm(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="trioclone.pair")
    ready = tmp_path / "ready"
    stubborn = python(
        "import pathlib, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor({"stubborn": stubborn}, grace=0.5)
    assert await run_until_signal(supervisor, ready.exists, signal.SIGINT) == 0
    log = messages(caplog)
    assert any("ignored SIGTERM for 0.5 s; killing it" in m for m in log)
    assert any(m.endswith("it was killed by SIGKILL") for m in log)
    assert "stopping the servers on SIGINT" in log


# --------------------------------------------------------------------------
# the real thing: serve --pair, a client, and SIGKILL to either server
# --------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command: state, parent, ..."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def parent_of(pid: int) -> int | None:
    stat = proc_stat(pid)
    return None if stat is None else int(stat[1])


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one is dead, only not reaped)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def pids() -> list[int]:
    return [
        int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
    ]


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args[:-1] else None


class Children:
    """The supervisor's children, as its log reports them."""

    def __init__(self, supervisor: ServerProcess) -> None:
        self.supervisor = supervisor
        self.seen: set[int] = set()
        # its children serve at these base ports (a squatter has no --role)
        self.ports = {option(supervisor.args, o) for o in ("--port", "--peer-port")}

    def lines(self) -> list[str]:
        return self.supervisor.log().splitlines()

    def started(self, role: str) -> list[tuple[int, int]]:
        """(line number, pid) of each start of ``role``."""
        found = []
        for number, line in enumerate(self.lines()):
            match = STARTED.search(line)
            if match and match["role"] == role:
                found.append((number, int(match["pid"])))
                self.seen.add(int(match["pid"]))
        return found

    def wait_started(self, role: str, count: int, timeout: float = 30.0) -> int:
        """The line number of the ``count``-th start of ``role``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.supervisor.alive:
            starts = self.started(role)
            if len(starts) >= count:
                return starts[count - 1][0]
            time.sleep(0.05)
        raise TimeoutError(f"no start #{count} of the {role}:\n{self.tail()}")

    def pid(self, role: str, count: int) -> int:
        return self.started(role)[count - 1][1]

    def wait_line(self, *parts: str, after: int, timeout: float = 30.0) -> int:
        """The number of the first line past ``after`` holding every part."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for number, line in enumerate(self.lines()):
                if number > after and all(part in line for part in parts):
                    return number
            time.sleep(0.05)
        raise TimeoutError(f"no line with {parts} after line {after}:\n{self.tail()}")

    def kill(self, pid: int) -> None:
        """SIGKILL a child; it must be the supervisor's."""
        assert parent_of(pid) == self.supervisor.pid
        os.kill(pid, signal.SIGKILL)

    def refresh(self) -> None:
        """Add to ``seen`` every child the log names and, while the supervisor
        runs, every process whose parent it is (one started but not logged)."""
        self.started("primary")
        self.started("backup")
        if self.supervisor.alive:  # not reaped: its PID is still its own
            self.seen.update(p for p in pids() if parent_of(p) == self.supervisor.pid)

    def is_child(self, pid: int) -> bool:
        """``pid`` runs ``trioclone serve --role ...`` at one of the pair's ports
        (so a PID reused by another process is left alone)."""
        args = command_line(pid)
        return (
            running(pid)
            and args[1:3] == ["-m", "trioclone"]
            and "serve" in args
            and "--role" in args
            and option(args, "--port") in self.ports
        )

    def stop(self, procs: Processes) -> None:
        """Stop the supervisor, then SIGKILL any child of it still running.

        SIGTERM, then a wait 5 s longer than the supervisor's own grace for
        its children; if it still runs, SIGSTOP (it starts no other child), a
        last look for its children, SIGKILL.  Then SIGKILL every child seen,
        orphaned or not, that still runs ``trioclone serve``.
        """
        supervisor = self.supervisor
        self.refresh()
        if supervisor.alive:
            os.kill(supervisor.pid, signal.SIGTERM)
            os.kill(supervisor.pid, signal.SIGCONT)  # had a test stopped it
            try:
                supervisor.popen.wait(SUPERVISOR_GRACE + 5.0)
            except subprocess.TimeoutExpired:
                os.kill(supervisor.pid, signal.SIGSTOP)
                self.refresh()
                procs.kill(supervisor)
        self.refresh()  # the log names every child it started
        for pid in sorted(self.seen):
            if self.is_child(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def check_none_left(self, timeout: float = 5.0) -> None:
        """Fail if a child of the supervisor still runs after ``stop``: one in
        ``seen``, or one that ``seen`` missed (any ``serve --role`` at the
        pair's ports).  Those are SIGKILLed before failing."""
        deadline = time.monotonic() + timeout
        while True:
            left = sorted(p for p in self.seen | set(pids()) if self.is_child(p))
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        missed = sorted(set(left) - self.seen)
        assert not left, f"children still running after the stop: {left} ({missed=})"

    def tail(self) -> str:
        return "\n".join(self.lines()[-40:])


def pair_options(port: int, peer_port: int) -> list[str]:
    """``serve --pair`` on 127.0.0.1 at these base ports, with free state ports."""
    s1, s2 = free_ports(2)
    return [
        "--pair",
        "--bind",
        HOST,
        "--port",
        str(port),
        "--peer-port",
        str(peer_port),
        "--state-port",
        str(s1),
        "--peer-state-port",
        str(s2),
    ]


@contextlib.contextmanager
def supervised(
    procs: Processes, *serve_args: str
) -> Iterator[tuple[ServerProcess, Children]]:
    """``trioclone serve *serve_args`` (a supervisor); at the end it and its
    children are stopped, and no child may be left running.  Enter a
    ``time_limit`` after this, so that its alarm cannot interrupt the stop."""
    supervisor = procs.start("pair", *serve_args)
    children = Children(supervisor)
    try:
        yield supervisor, children
    finally:
        children.stop(procs)
        children.check_none_left()


@contextlib.contextmanager
def local_pair(procs: Processes) -> Iterator[tuple[ServerProcess, Children, list[str]]]:
    p1, p2 = free_base_ports(2)
    with supervised(procs, *pair_options(p1, p2), *FAST_TIMING) as (sup, children):
        yield sup, children, [tcp(p1), tcp(p2)]


def dump(servers: list[str]) -> dict[str, str]:
    """What a fresh ``trioclone dump --json`` prints."""
    command = [sys.executable, "-m", "trioclone", "--log-level", "WARNING", "dump"]
    command += ["/pair/", "--json", "--timeout", "10"]
    for server in servers:
        command += ["--server", server]
    got = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert got.returncode == 0, got.stderr
    result: dict[str, str] = json.loads(got.stdout)
    return result


@pytest.mark.slow
def test_serve_pair_survives_the_death_of_either_server(tmp_path: Path) -> None:
    with (
        Processes(tmp_path) as procs,
        local_pair(procs) as (supervisor, children, servers),
        time_limit(180),  # disarmed before the processes are stopped
    ):
        children.wait_started("primary", 1)
        children.wait_started("backup", 1)
        children.wait_line("[backup]", "synced from the active", after=-1)
        written: dict[str, str] = {}

        def write(key: str, value: str) -> None:
            clone.set(key, value, timeout=30)  # confirmed: the map holds it
            written[key] = value

        def mirrored() -> dict[str, str]:
            return {k: v.decode() for k, v in clone.items("/pair/")}

        with trioclone.connect(servers, sync_timeout=15) as clone:
            for i in range(10):
                write(f"/pair/a{i}", f"first-{i}")
            assert mirrored() == written

            # SIGKILL the primary, with the supervisor frozen so that it
            # cannot restart it yet: the backup takes over when the client
            # votes; the client keeps the whole map and can still write.
            os.kill(supervisor.pid, signal.SIGSTOP)
            try:
                children.kill(children.pid("primary", 1))
                assert mirrored() == written
                for i in range(5):
                    write(f"/pair/b{i}", f"after-primary-{i}")
                assert mirrored() == written
            finally:
                os.kill(supervisor.pid, signal.SIGCONT)
            takeover = children.wait_line("[backup]", "PASSIVE -> ACTIVE", after=-1)
            restart = children.wait_started("primary", 2)
            assert takeover < restart
            children.wait_line("restarting the primary server in 1.0 s", after=-1)
            # it rejoins as passive and copies the map from the backup
            children.wait_line("[primary]", "-> PASSIVE", after=restart)
            children.wait_line("[primary]", "synced from the active", after=restart)

            # SIGKILL the backup: the restarted primary takes over (on a vote,
            # or on hearing the restarted backup, whichever comes first).
            children.kill(children.pid("backup", 1))
            for i in range(5):
                write(f"/pair/c{i}", f"after-backup-{i}")
            assert mirrored() == written
            restart = children.wait_started("backup", 2)
            children.wait_line("[backup]", "synced from the active", after=restart)
            assert clone.get("/pair/a0") == b"first-0"

        assert dump(servers) == written  # a fresh client gets everything
        assert len(children.started("primary")) == 2
        assert len(children.started("backup")) == 2
        log = supervisor.log()
        assert re.search(r"the primary server \(pid \d+\) was killed by SIGKILL", log)
        assert re.search(r"the backup server \(pid \d+\) was killed by SIGKILL", log)

        # SIGTERM stops both servers, restarts nothing, exits 0
        supervisor.popen.send_signal(signal.SIGTERM)
        assert supervisor.popen.wait(30) == 0, children.tail()
        log = supervisor.log()
        assert "stopping the servers on SIGTERM" in log
        for role in ("primary", "backup"):
            pid = children.pid(role, 2)
            assert f"stopped the {role} server (pid {pid})" in log
            assert not alive(pid)
        assert len(children.started("primary")) == 2
        assert len(children.started("backup")) == 2
        assert "Traceback" not in log


@pytest.mark.slow
def test_serve_pair_stops_on_sigint_and_exits_0(tmp_path: Path) -> None:
    with (
        Processes(tmp_path) as procs,
        local_pair(procs) as (supervisor, children, _),
        time_limit(60),  # disarmed before the processes are stopped
    ):
        children.wait_line("[backup]", "synced from the active", after=-1)
        supervisor.popen.send_signal(signal.SIGINT)
        assert supervisor.popen.wait(30) == 0, children.tail()
        log = supervisor.log()
        assert "stopping the servers on SIGINT" in log
        for role in ("primary", "backup"):
            assert not alive(children.pid(role, 1))
            assert len(children.started(role)) == 1
        assert "restarting" not in log


@pytest.mark.slow
@pytest.mark.parametrize("hang_up", [False, True], ids=["ctrl-c", "hang-up"])
def test_a_terminal_stops_each_server_gracefully(tmp_path: Path, hang_up: bool) -> None:
    """SIGINT to the whole process group (a Ctrl-C), or SIGHUP to the
    supervisor (the terminal hung up: the children have sessions of their
    own): each child gets one SIGTERM from the supervisor, not the SIGINT
    too, which it would take as a second signal ("stop at once")."""
    p1, p2 = free_base_ports(2)
    with Processes(tmp_path) as procs:
        supervisor = procs.start(
            "pair", *pair_options(p1, p2), *FAST_TIMING, new_session=True
        )
        children = Children(supervisor)
        try:
            with time_limit(60):
                children.wait_line("[backup]", "synced from the active", after=-1)
                if hang_up:
                    os.kill(supervisor.pid, signal.SIGHUP)
                else:
                    os.killpg(supervisor.pid, signal.SIGINT)
                assert supervisor.popen.wait(30) == 0, children.tail()
        finally:
            children.stop(procs)
            children.check_none_left()
        log = supervisor.log()
        assert log.count("stopping on SIGTERM") == 2, children.tail()
        assert "at once" not in log
        assert log.count(" stopped") >= 2  # each child's last line


@pytest.mark.slow
def test_serve_pair_gives_up_when_both_ports_are_taken(tmp_path: Path) -> None:
    p1, p2 = free_base_ports(2)
    with Processes(tmp_path) as procs:
        with time_limit(40):  # disarmed before the processes are stopped
            for name, port in (("squatter-1", p1), ("squatter-2", p2)):
                squatter = procs.start(
                    name, "--standalone", "--bind", HOST, "--port", str(port)
                )
                assert squatter.wait_for_log("listening", 15), squatter.log()
        with (
            supervised(procs, *pair_options(p1, p2)) as (supervisor, children),
            time_limit(60),
        ):
            assert supervisor.popen.wait(30) == 1, children.tail()
            log = supervisor.log()
            assert "no server could start (see the errors above); giving up" in log
            assert "Address already in use" in log
            for role in ("primary", "backup"):
                assert not alive(children.pid(role, 1))
