"""The bench's own child processes (load workers), always stopped on exit.

``Children`` starts worker processes from a ``forkserver`` context and, on
exit, asks each to stop (a shared event, a "stop" command), then terminates
and finally kills by PID whatever is still running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from typing import Any

from benchlib import workers
from benchlib.servers import process_cpu_seconds
from benchlib.wire import PLAIN, Security

JOIN_GRACE = 5.0


def context() -> ForkServerContext:
    import multiprocessing

    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["benchlib.workers"])
    return mp


class Writer:
    """The parent's end of a ``workers.writer`` process."""

    def __init__(self, conn: Connection, process: BaseProcess) -> None:
        self.conn = conn
        self.process = process

    def send(self, *command: object) -> None:
        self.conn.send(command)

    def receive(self, timeout: float) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"writer {self.process.pid} silent for {timeout} s")
        return self.conn.recv()

    def call(self, *command: object, timeout: float = 60.0) -> Any:
        self.send(*command)
        return self.receive(timeout)


class Subscriber:
    """The parent's view of a ``workers.subscriber`` process (shared counters)."""

    def __init__(self, stats: Any, sockets: int) -> None:
        self.stats = stats
        self.sockets = sockets

    def counts(self) -> list[int]:
        return [int(self.stats[workers.SLOTS * i]) for i in range(self.sockets)]

    def firsts(self) -> list[float]:
        return [self.stats[workers.SLOTS * i + 1] for i in range(self.sockets)]

    def lasts(self) -> list[float]:
        return [self.stats[workers.SLOTS * i + 2] for i in range(self.sockets)]

    def live(self) -> bool:
        return all(self.stats[workers.SLOTS * i + 3] > 0 for i in range(self.sockets))

    def cpu(self) -> float:
        return float(self.stats[workers.SLOTS * self.sockets])


class Children:
    def __init__(self, mp: ForkServerContext) -> None:
        self.mp = mp
        self.stop_event = mp.Event()
        self.processes: list[BaseProcess] = []
        self.conns: list[Connection] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(self, target: Callable[..., None], *args: object) -> BaseProcess:
        process = self.mp.Process(target=target, args=args, daemon=True)
        process.start()
        self.processes.append(process)
        return process

    def pipe(self) -> tuple[Connection, Connection]:
        parent, child = self.mp.Pipe()
        self.conns.append(parent)
        return parent, child

    def writers(
        self,
        count: int,
        collectors: Sequence[int],
        publisher: int,
        timeout: float = 20.0,
        security: Security = PLAIN,
    ) -> list[Writer]:
        """``count`` writer processes, each with a live path to the collectors
        (``security``: their sockets' CURVE options)."""
        started = []
        for index in range(count):
            parent, child = self.pipe()
            process = self.start(
                workers.writer,
                child,
                index,
                list(collectors),
                publisher,
                self.stop_event,
                security,
            )
            started.append(Writer(parent, process))
        for writer in started:
            if not writer.receive(timeout):
                raise RuntimeError("a writer's probe never came back")
        return started

    def subscribers(
        self,
        count: int,
        publisher: int,
        sockets: int = 1,
        security: Security = PLAIN,
    ) -> list[Subscriber]:
        subs = []
        for _ in range(count):
            stats = self.mp.RawArray("d", workers.SLOTS * sockets + 1)
            self.start(
                workers.subscriber,
                publisher,
                sockets,
                stats,
                self.stop_event,
                security,
            )
            subs.append(Subscriber(stats, sockets))
        return subs

    def cpu_seconds(self) -> float:
        """User + system CPU of every running child so far (all threads)."""
        total = 0.0
        for process in self.processes:
            if process.pid is not None and process.is_alive():
                total += process_cpu_seconds(process.pid)
        return total

    def stop_all(self) -> None:
        self.stop_event.set()
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + JOIN_GRACE
        for process in self.processes:
            process.join(max(deadline - time.monotonic(), 0.1))
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.join(JOIN_GRACE)
        for conn in self.conns:
            conn.close()
        self.processes.clear()
        self.conns.clear()
