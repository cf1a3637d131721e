"""libzmq's proxy (``zmq_proxy_steerable``) in a worker thread, owned by a Trio task.

The proxy moves every message between two sockets in C, with the GIL
released, and copies each one to ``capture`` if given (the messages of
both directions, each as it is forwarded).  ``run_proxy`` starts it and,
when its Trio task is cancelled, sends it ``TERMINATE`` on a control socket
and waits for the thread to return: nothing outlives the task, and the
three sockets are the Trio side's again afterwards (the thread's return is
the hand-back).  While it runs, no Trio task may touch them.
"""

from __future__ import annotations

import itertools
from typing import Any, NoReturn

import trio
import zmq

from trioclone._zmq import Socket, Sockets

_names = itertools.count()


class ProxyError(RuntimeError):
    """The proxy returned by itself: one of its sockets failed."""


async def run_proxy(
    sockets: Sockets,
    frontend: Socket,
    backend: Socket,
    capture: Socket | None = None,
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Forward until cancelled; ``ProxyError`` if the proxy stops by itself."""
    name = f"inproc://trioclone-proxy-{next(_names)}"
    control = sockets.open(zmq.PAIR, bind=[name], secure=False)
    steer = sockets.open(zmq.PAIR, connect=[name], secure=False)
    raw_capture = None if capture is None else capture.raw
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_when_cancelled, steer)
            task_status.started()
            try:
                await trio.to_thread.run_sync(
                    zmq.proxy_steerable,
                    frontend.raw,
                    backend.raw,
                    raw_capture,
                    control.raw,
                    abandon_on_cancel=False,
                )
            except zmq.ZMQError as exc:
                await trio.lowlevel.checkpoint()  # Cancelled, if it was asked to stop
                raise ProxyError(f"the proxy stopped: {exc}") from exc
            await trio.lowlevel.checkpoint()  # (a thread's return is not one)
            raise ProxyError("the proxy stopped by itself")
    finally:
        control.close()
        steer.close()


async def _terminate_when_cancelled(steer: Socket) -> None:
    try:
        await trio.sleep_forever()
    finally:
        steer.raw.send(b"TERMINATE")  # inproc PAIR: queued at once
