"""Attacks on a secured server, and the races around permissions changes
(from the adversarial review of issue 11).  Real tcp and the real clock,
as in test_security.py; every wait is bounded."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import trio
import zmq

from tests.shells.test_security import (
    GUARD,
    QUIET,
    Keys,
    address,
    make_keys,
    refused_then_failed_over,
    secured,
    secured_pair,
    serving,
)
from trioclone import Curve, PermissionDeniedError, open_client
from trioclone.client.status import ask_all
from trioclone.core.chp import SEQUENCE
from trioclone.curve import read_key_pair, write_key_pair
from trioclone.endpoints import Endpoints
from trioclone.errors import ConfigError
from trioclone.server.clone import CloneServer
from trioclone.server.zap import ZapHandler


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path)


PERMS = """
[clients.admin]
read = [""]
write = [""]
[default]
read = ["public/"]
write = ["public/"]
"""


def raw(
    context: zmq.Context[zmq.Socket[bytes]], kind: int, curve: Curve
) -> zmq.Socket[bytes]:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in curve.options(binds=False):
        sock.setsockopt(option, value)
    return sock


async def test_a_stray_message_on_the_publisher_does_not_shift_subscriptions(
    keys: Keys,
) -> None:
    """libzmq's XPUB_MANUAL keeps no subscriber for a message that is not a
    subscription (an XSUB may send one), so a SUBSCRIBE applied after it
    would go to the next subscriber: a guest's second connection would get
    an admin's vetted prefix.  The server drops the subscriptions read with
    such a message instead (their clients subscribe again)."""
    settings = secured(keys, PERMS, hugz_interval=60.0)  # XPUB read when we say
    admin, guest = keys.client("admin"), keys.client("guest")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    a1, a2 = raw(context, zmq.XSUB, guest), raw(context, zmq.XSUB, guest)
    victims = [raw(context, zmq.SUB, admin) for _ in range(3)]
    try:
        with trio.fail_after(GUARD):
            async with (
                serving(settings) as server,
                open_client([address(settings)], curve=admin) as writer,
            ):
                await writer.wait_synced()
                for sock in (a1, a2, *victims):
                    sock.connect(settings.bind.publisher)
                await trio.sleep(0.3)  # connected (handshakes)
                server.publisher.admit()
                a1.send(b"")  # not a subscription
                for victim in victims:
                    victim.setsockopt(zmq.SUBSCRIBE, b"secret/")
                a2.send(b"\x01public/")  # the guest may
                await trio.sleep(0.3)  # all queued at the server's XPUB
                server.publisher.admit()
                await writer.set("secret/x", "hidden")
                await writer.set("public/y", "shown")
                await trio.sleep(0.2)
                stolen = []
                while a2.poll(0):
                    stolen.append(a2.recv_multipart()[0])
                assert b"secret/x" not in stolen
                assert server.core.stats["subscriptions_dropped"] >= 1
                assert server.rejections["publisher"] >= 1
                # the sender is banned: its key may not connect again
                async with open_client(
                    [address(settings)], "public/", curve=guest
                ) as again:
                    with trio.move_on_after(QUIET):
                        await again.wait_synced()
                    assert not again.synced
                assert server.core.stats["auth_denied"] >= 1
                await writer.set("public/z", "the others go on")
    finally:
        for sock in (a1, a2, *victims):
            sock.close(0)
        context.term()


def test_no_client_key_may_be_named_as_the_pair(keys: Keys) -> None:
    with pytest.raises(ConfigError, match="not starting with \\. or @"):
        write_key_pair(keys.folder, "@pair")
    write_key_pair(keys.folder, "mallory")
    shutil.copy(keys.folder / "mallory.key", keys.clients / "@pair.key")
    with pytest.raises(ConfigError, match=r"@pair\.key"):
        CloneServer(secured(keys))


async def test_a_key_replaced_under_the_same_name_may_no_longer_write(
    keys: Keys,
) -> None:
    settings = secured(keys, PERMS.replace("admin", "alice"))
    alice = keys.client("alice")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=alice) as clone,
        ):
            await clone.wait_synced()
            await clone.set("secret/a", "1")
            write_key_pair(keys.folder, "alice2")
            shutil.copy(keys.folder / "alice2.key", keys.clients / "alice.key")
            assert server.zap is not None
            server.zap.reload(trio.current_time(), at_once=True)
            with pytest.raises(PermissionDeniedError, match="'alice' may not write"):
                await clone.set("secret/a", "written by the old key", timeout=5)


async def test_a_removed_key_gets_no_status(keys: Keys) -> None:
    settings = secured(keys, PERMS)
    guest = keys.client("guest")
    with trio.fail_after(GUARD):
        async with serving(settings) as server:
            endpoint = Endpoints.parse(address(settings))
            [first] = await ask_all([endpoint], 5.0, curve=guest)
            assert first.status is not None
            (keys.clients / "guest.key").unlink()
            assert server.zap is not None
            server.zap.reload(trio.current_time(), at_once=True)
            [after] = await ask_all([endpoint], 0.5, curve=guest)
            assert after.status is None


async def test_a_bad_key_dropped_in_the_clients_folder_keeps_the_server_up(
    keys: Keys,
) -> None:
    """40 Z85 characters whose value overflows (z85 raises struct.error)."""
    settings = secured(keys)
    alice = keys.client("alice")
    with trio.fail_after(GUARD):
        async with (
            serving(settings) as server,
            open_client([address(settings)], curve=alice) as clone,
        ):
            await clone.wait_synced()
            (keys.clients / "broken.key").write_text(
                'curve\n    public-key = "' + "#" * 40 + '"\n'
            )
            assert server.zap is not None
            server.zap.reload(trio.current_time(), at_once=True)
            await clone.set("k", "the server is still up", timeout=5)
            assert "alice" in server.zap.allowed.values()


async def test_a_write_the_active_refused_is_not_replayed_by_a_passive_that_reloads_later(
    keys: Keys,
) -> None:
    """Each server reloads the permissions file on its own once-a-second
    clock (or an operator updates the two hosts one after the other): for a
    while the passive still allows what the active now refuses.  The client
    is told PermissionDeniedError, but the passive holds the write in its
    pending list and applies it at a takeover (docs/security.md: 'not
    applied, by the active or by the passive (so a takeover never replays
    it)').  Simulated with the passive's file not yet narrowed."""

    narrowed = keys.folder / "narrowed.toml"
    narrowed.write_text('[clients.deploy]\nwrite = ["config/"]\n')
    old = keys.folder / "old.toml"
    old.write_text('[clients.deploy]\nwrite = [""]\n')

    def catch_up(passive: CloneServer) -> None:  # the passive's file too
        old.write_text(narrowed.read_text())
        assert passive.zap is not None
        passive.zap.reload(trio.current_time(), at_once=True)

    with trio.fail_after(GUARD):
        passive = await refused_then_failed_over(
            keys, secured_pair(keys, narrowed, old), catch_up
        )
    assert passive.core.store.get(b"secret/b") is None, (
        "a write the client was told was refused was applied"
    )
    assert passive.core.stats["pending_refused"] == 1


async def test_an_anonymous_denied_write_is_not_taken_as_a_refused_snapshot(
    keys: Keys,
) -> None:
    """A denied write without a UUID (a bare PUB, the Guide's style) is
    refused with an empty UUID to every snapshot socket of its key, which a
    trioclone client of that key reads as 'the server refused a snapshot'
    and keeps for good: its wait_synced raises on its next resync."""

    settings = secured(keys, '[default]\nread = [""]\nwrite = ["public/"]\n')
    guest = keys.client("guest")
    context = zmq.Context()
    pub = raw(context, zmq.PUB, guest)
    try:
        with trio.fail_after(GUARD):
            async with (
                serving(settings) as server,
                open_client([address(settings)], curve=guest) as clone,
            ):
                await clone.wait_synced()
                pub.connect(settings.bind.collector)
                await trio.sleep(0.3)
                pub.send_multipart([b"secret/x", SEQUENCE.pack(0), b"", b"", b"v"])
                while server.core.stats["writes_denied"] < 1:
                    await trio.sleep(0.01)
                await trio.sleep(0.3)
                assert clone._refused.value is None, clone._refused.value
    finally:
        pub.close(0)
        context.term()


def _zap(keys: Keys) -> ZapHandler:
    return ZapHandler(read_key_pair(keys.server), keys.clients, None, Counter())


def test_a_file_name_that_is_not_utf8_is_refused_and_never_answered(
    keys: Keys,
) -> None:
    keys.client("alice")
    odd = keys.clients / os.fsdecode(b"jos\xe9.key")
    shutil.copy(keys.clients / "alice.key", odd)
    with pytest.raises(ConfigError, match="printable UTF-8"):
        _zap(keys)  # at the start: refused, the file named
    odd.unlink()
    zap = _zap(keys)
    zap.reload(100.0)
    write_key_pair(keys.folder, "jose")
    shutil.copy(keys.folder / "jose.key", odd)
    zap.reload(101.0)  # while serving: left out, never a User-Id
    assert sorted(zap.allowed.values()) == ["alice"]


def test_a_bad_file_in_the_folder_does_not_hold_up_a_revocation(keys: Keys) -> None:
    keys.client("alice")
    keys.client("mallory")
    zap = _zap(keys)
    zap.reload(100.0)
    (keys.clients / "mallory.key").unlink()
    (keys.clients / "bob.key").write_text("half a certificate")
    os.mkfifo(keys.clients / "fifo.key")  # reading it would block for ever
    zap.reload(101.0)
    assert sorted(zap.allowed.values()) == ["alice"]


def test_a_broken_permissions_file_keeps_the_previous_permissions(keys: Keys) -> None:
    keys.client("alice")
    path = keys.folder / "permissions.toml"
    path.write_text('[clients.alice]\nwrite = ["config/"]\n')
    zap = ZapHandler(read_key_pair(keys.server), keys.clients, path, Counter())
    zap.reload(100.0)
    path.write_text("[clients.alice\n")
    zap.reload(101.0)
    assert zap.permissions.grant("alice").write == (b"config/",)
