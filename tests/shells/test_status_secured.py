"""The status request to a CURVE-secured server (tcp on 127.0.0.1, real
clock, every wait bounded): answered for an allowed key only."""

from __future__ import annotations

import trio

from tests.shells.test_security import GUARD, Keys, keys, secured, serving
from trioclone.client.status import ask_all

__all__ = ["keys"]  # the fixture


async def test_status_from_a_secured_server_needs_an_allowed_key(keys: Keys) -> None:
    settings = secured(keys)
    alice = keys.client("alice")
    mallory = keys.client("mallory", allowed=False)
    with trio.fail_after(GUARD):
        async with serving(settings) as server:
            (allowed,) = await ask_all([settings.bind], 5.0, curve=alice)
            assert allowed.status is not None, allowed.error
            assert allowed.status["state"] == "ACTIVE"
            for curve in (mallory, None):  # a key it does not know; no CURVE
                (refused,) = await ask_all([settings.bind], 0.5, curve=curve)
                assert refused.status is None
                assert refused.error == "no answer within 0.5 s"
            assert server.core.stats["status_requests"] == 1
            assert server.core.stats["auth_denied"] >= 1
