"""The defaults and limits the README states, as the code has them."""

from __future__ import annotations

import inspect

from trioclone.cli import build_parser
from trioclone.client.agent import CloneClient
from trioclone.client.aio import AsyncioClient, connect
from trioclone.client.blocking import BlockingClient
from trioclone.core.client import ClientTimings
from trioclone.core.subtrees import Subtrees
from trioclone.server import snapshots


def test_server_defaults_are_the_documented_ones() -> None:
    options = build_parser().parse_args(["serve", "--standalone"])
    assert (options.heartbeat, options.hugz, options.peer_expiry) == (1.0, 1.0, 2.0)
    assert options.applied_horizon == 120.0
    assert options.applied_limit == 1_000_000
    assert options.snapshot_stall == 30.0
    assert (snapshots.MAX_TRANSFERS, snapshots.MAX_QUEUED) == (256, 10_000)
    assert Subtrees().limit == 10_000


def test_client_defaults_are_the_documented_ones() -> None:
    timings = ClientTimings()
    assert timings.write_horizon == 30.0
    assert timings.silence_timeout == 2.0
    assert (timings.request_timeout, timings.backoff) == (1.0, 0.5)
    for method in (
        CloneClient.set,
        CloneClient.delete,
        AsyncioClient.set,
        AsyncioClient.delete,
    ):
        assert inspect.signature(method).parameters["timeout"].default == 5.0
    for opening in (BlockingClient.__init__, AsyncioClient.__init__, connect):
        assert inspect.signature(opening).parameters["sync_timeout"].default == 10.0
    for command in (["get", "/k"], ["set", "/k", "v"], ["del", "/k"]):
        assert build_parser().parse_args(command).timeout == 5.0
