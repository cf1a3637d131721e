"""Server processes on 127.0.0.1: free ports, start, wait ready, CPU, RSS, stop.

``Fleet`` starts the ceiling (``tools/ceiling.py``), trioclone standalone
servers and trioclone pairs, each logging to a file, and stops every process
it started by PID on exit (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket as pysocket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from benchlib.wire import HOST, PLAIN, Context, Security, server_sequence

TOOLS = Path(__file__).resolve().parent.parent
CEILING = TOOLS / "ceiling.py"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_GRACE = 5.0

FAST = ("--heartbeat", "0.2", "--hugz", "0.2")

_handed_out: set[int] = set()


def free_ports(span: int = 3) -> int:
    """A base port P with P .. P+span-1 free on 127.0.0.1 (never handed out twice)."""
    for _ in range(200):
        with pysocket.socket() as s:
            s.bind((HOST, 0))
            base = int(s.getsockname()[1])
        block = range(base, base + span)
        if (
            base + span <= 65535
            and not _handed_out & set(block)
            and all(map(_free, block))
        ):
            _handed_out.update(block)
            return base
    raise RuntimeError("no free block of ports on 127.0.0.1")


def _free(port: int) -> bool:
    with pysocket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    name: str
    kind: str  # "ceiling", "trioclone" or "durable"
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    state_port: int | None = None  # a pair's Binary Star heartbeat PUB
    security: Security = PLAIN  # what a client's sockets need to reach it

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the whole process (all threads) so far."""
        return _cpu(Path(f"/proc/{self.pid}/stat"))

    def main_thread_cpu_seconds(self) -> float:
        """CPU of the main thread alone (a Python server's interpreter; the
        rest is libzmq's I/O threads, where CURVE does its cryptography)."""
        return _cpu(Path(f"/proc/{self.pid}/task/{self.pid}/stat"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.pid}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Fleet:
    """Starts servers; on exit stops each one it started, by PID."""

    def __init__(self, ctx: Context, log_dir: Path) -> None:
        self.ctx = ctx
        self.log_dir = log_dir
        self.started: list[Server] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def _spawn(
        self,
        name: str,
        kind: str,
        port: int,
        args: list[str],
        state_port: int | None = None,
        security: Security = PLAIN,
    ) -> Server:
        log_path = self.log_dir / f"{len(self.started):02d}-{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = Server(name, kind, port, popen, log_path, state_port, security)
        self.started.append(server)
        return server

    def start(
        self,
        kind: str,
        name: str | None = None,
        timeout: float = 20.0,
        extra: Sequence[str] = (),
        port: int | None = None,
        security: Security = PLAIN,
    ) -> Server:
        """A standalone server of ``kind``, answering snapshot requests:
        "ceiling", "trioclone" (its map in memory) or "durable" (its map kept
        in a data folder under the log folder; ``extra`` may set --fsync).

        ``extra``: more options for its command line (CURVE keys, say), and
        ``security``: the CURVE options a client then needs."""
        name = name or kind
        port = port or free_ports()
        if kind == "ceiling":
            args = [sys.executable, str(CEILING), "--port", str(port), *extra]
        else:
            kept = (
                ["--data-dir", str(self.log_dir / f"data-{name}")]
                if kind == "durable"
                else ["--in-memory"]
            )
            args = trioclone_command(
                "--standalone", "--port", str(port), "--bind", HOST, *kept, *extra
            )
        server = self._spawn(name, kind, port, args, security=security)
        self.wait_ready(server, timeout)
        return server

    def start_pair(
        self,
        *,
        fast: bool,
        timeout: float = 30.0,
        extra: Sequence[str] = (),
        security: Security = PLAIN,
        tag: str | None = None,
    ) -> tuple[Server, Server]:
        """A trioclone pair: primary ACTIVE, backup PASSIVE and synced.

        ``extra``: more ``trioclone serve`` options, for both servers;
        ``security``: the CURVE options a client then needs; ``tag``: in
        the log files' names.
        """
        p1, p2 = free_ports(), free_ports()
        s1, s2 = free_ports(1), free_ports(1)
        timing = list(FAST) if fast else []
        tag = tag or ("fast" if fast else "default")

        def side(role: str, own: int, peer: int, state: int, peer_state: int) -> Server:
            args = trioclone_command(
                "--role", role, "--port", str(own), "--peer-port", str(peer),
                "--state-port", str(state), "--peer-state-port", str(peer_state),
                "--bind", HOST, "--peer", HOST, "--in-memory", *timing, *extra,
            )  # fmt: skip
            return self._spawn(f"{role}-{tag}", "trioclone", own, args, state, security)

        primary = side("primary", p1, p2, s1, s2)
        backup = side("backup", p2, p1, s2, s1)
        if not wait_for_log(backup, "synced from the active", timeout):
            raise RuntimeError(f"pair did not come up; see {backup.log_path}")
        self.wait_ready(primary, timeout)
        return primary, backup

    def wait_ready(self, server: Server, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.1) + 2):
            if not server.alive:
                raise RuntimeError(f"{server.name} exited; see {server.log_path}")
            if server_sequence(self.ctx, server.port, 0.5, server.security) is not None:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"{server.name} not ready in {timeout} s; see {server.log_path}"
        )

    def kill(self, server: Server, sig: int = signal.SIGKILL) -> None:
        if server.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, sig)
        _reap(server, time.monotonic() + STOP_GRACE)

    def stop(self, *servers: Server) -> None:
        for server in servers:
            if server.alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for server in servers:
            _reap(server, deadline)

    def stop_all(self) -> None:
        self.stop(*self.started)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all threads) so far."""
    return _cpu(Path(f"/proc/{pid}/stat"))


def _cpu(stat_path: Path) -> float:
    stat = stat_path.read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _reap(server: Server, deadline: float) -> None:
    try:
        server.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # stop the others
            server.popen.wait(timeout=STOP_GRACE)


def trioclone_command(*serve_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trioclone",
        "--log-level",
        "INFO",
        "serve",
        *serve_args,
    ]


def wait_for_log(server: Server, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 2):
        if text in server.log():
            return True
        if time.monotonic() > deadline or not server.alive:
            break
        time.sleep(0.05)
    return text in server.log()


def new_context() -> Context:
    return zmq.Context()
